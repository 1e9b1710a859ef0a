"""Shared-prefix training forward: each group's image and prompt encoded once per micro-batch.

In GRPO the ``G`` responses of a group share one prompt (image + text). The per-response path
(:meth:`egm.generation.rollout.Rollout.model_inputs`) repeats the prompt in every row, so the
vision tower and the language model's prompt positions run ``G`` times per pass. Here a
micro-batch's responses are packed one row per prompt::

    row j = [prompt_j | c_1[:-1] | c_2[:-1] | ... ]   (right-padded to the longest row)

with a 4-D attention mask in which the prompt is causal, and each completion sees the whole
prompt plus its own causal past (never another completion), and with explicit position ids
equal to those of the unshared sequence ``[prompt_j, c_k]``: Qwen3-VL's 3-D M-RoPE from the
model's own ``get_rope_index`` (image tokens at their grid positions, text after them), InternVL's
1-D ``0..P+t-1``. Images sit only in the prompt, so the vision tower sees each image once per row
and Qwen3-VL's deepstack features land on the same prompt positions as in the unshared forward.
The last token of a completion predicts nothing, so it is left out of the row; the first token
of every completion is predicted by the prompt's last position, so that hidden state is shared
and receives the gradient of all ``G`` first tokens.

:func:`shared_prefix_hidden` gives the final hidden states (after the final norm, before
``lm_head``) at the positions that predict each completion token, ``(b, t, H)`` in the order of
``idx``; the chunked head (:func:`egm.models.head.masked_logprobs`) turns them into log-probs and
entropies, with the completion ids and mask ``(b, t)`` trimmed to the longest response of
``idx`` -- the contract of the per-response path, so log-probs, entropies and gradients are equal
up to rounding (``tests/rl/test_prefix.py``).

Attention implementations: ``sdpa`` (boolean mask) and ``eager`` (additive float mask) take a
custom 4-D mask, which transformers passes through unchanged (``masking_utils`` returns a 4-D
mask as-is). FlashAttention-2/3 and flex attention cannot take an arbitrary dense mask:
:func:`shared_prefix_support` names the reason, and the caller falls back to per-response.

A micro-batch holding part of a group encodes that group's prompt once for that micro-batch:
a group split over ``k`` micro-batches is encoded ``k`` times per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from egm.generation.rollout import Rollout
from egm.models.base import GroundingAdapter
from egm.models.head import DEFAULT_CHUNK_TOKENS, hf_model, masked_logprobs, output_head, trunk_hidden_states

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class PackedGroups:
    """A micro-batch packed one row per prompt (module docstring).

    Attributes:
        inputs: keyword arguments of the HF base model (``input_ids`` ``(R, L)``, 4-D
            ``attention_mask`` ``(R, 1, L, L)``, ``position_ids`` ``(3, R, L)`` or ``(R, L)``,
            the prompts' image tensors).
        index: ``(b, t)`` index into the flattened ``(R * L)`` hidden states of the position that
            predicts each completion token (padding entries point at a prompt's last position).
        completion_ids, completion_mask: ``(b, t)``, as :meth:`Rollout.model_inputs` returns them.
        rows: the prompt of each row.
    """

    inputs: dict[str, Tensor]
    index: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    rows: list[int]

    @property
    def num_positions(self) -> int:
        """Token positions the language model computes (rows x padded row length)."""
        return int(self.inputs["input_ids"].numel())


def attention_implementation(model: torch.nn.Module) -> str:
    cfg = hf_model(model).config
    text = getattr(cfg, "text_config", None) or cfg
    return str(getattr(text, "_attn_implementation", None) or getattr(cfg, "_attn_implementation", "eager"))


def shared_prefix_support(model: torch.nn.Module) -> str | None:
    """``None`` when ``model`` can run the shared-prefix forward, else the reason it cannot."""
    impl = attention_implementation(model)
    if impl not in SUPPORTED_ATTENTION:
        return (f"attention implementation {impl!r} cannot take the shared-prefix 4-D attention mask "
                f"(supported: {', '.join(SUPPORTED_ATTENTION)})")
    base = hf_model(model)
    text = getattr(base.config, "text_config", None) or base.config
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)}: the shared-prefix mask covers full attention only"
    if not hasattr(base, "model") or not hasattr(base, "get_output_embeddings"):
        return f"{type(base).__name__} has no .model backbone / output embeddings"
    return None


def sequence_positions(model: torch.nn.Module, encoding: dict[str, Tensor], extra: int) -> Tensor:
    """``(D, P + extra)`` position ids of the unshared sequence ``[prompt, extra text tokens]``.

    M-RoPE models (a backbone with ``get_rope_index``, Qwen3-VL): the model's own function on the
    prompt followed by ``extra`` text tokens (``D = 3``: temporal, height, width). Others
    (InternVL): ``0 .. P + extra - 1`` (``D = 1``).
    """
    ids = encoding["input_ids"].reshape(1, -1)
    n = ids.shape[1] + extra
    backbone = hf_model(model).model
    if not hasattr(backbone, "get_rope_index"):
        return torch.arange(n).reshape(1, n)
    pad = torch.zeros(1, extra, dtype=ids.dtype)
    types = torch.cat([encoding["mm_token_type_ids"].reshape(1, -1).to(ids.dtype), pad], 1)
    pos, _ = backbone.get_rope_index(input_ids=torch.cat([ids, pad], 1), mm_token_type_ids=types,
                                     image_grid_thw=encoding.get("image_grid_thw"), attention_mask=None)
    return pos[:, 0].cpu()  # (3, n)


def packed_positions(ro: Rollout, idx: Sequence[int] | Tensor | None = None) -> int:
    """Token positions (rows x padded row length) the shared-prefix forward of ``idx`` computes,
    without building it: the cost a token-budget micro-batcher should count."""
    idx = torch.arange(len(ro)) if idx is None else torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    prompt_lengths = ro.prompt_lengths.tolist()
    width: dict[int, int] = {}
    for p, n in zip(ro.prompt_index[idx].tolist(), ro.completion_mask[idx].sum(1).tolist()):
        width[p] = width.get(p, prompt_lengths[p]) + max(n - 1, 0)
    return len(width) * max(width.values(), default=0)


def prefix_micro_batches(ro: Rollout, idx: Tensor | None = None, max_tokens: int | None = None,
                         max_responses: int | None = None) -> list[Tensor]:
    """Split the responses ``idx`` into micro-batches that keep groups together.

    Responses are ordered by (prompt, response) and cut greedily where the next one would exceed
    ``max_tokens`` packed positions (:func:`packed_positions`: rows x longest row) or
    ``max_responses`` responses; a group is split only where it does not fit, and then its prompt
    is encoded once per micro-batch holding part of it. A response over ``max_tokens`` on its
    own gets a micro-batch of its own. Within a mini-batch the split does not change the gradient
    (every loss is divided by the mini-batch's normaliser).
    """
    idx = torch.arange(len(ro)) if idx is None else torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    order = idx[torch.argsort(ro.prompt_index[idx] * len(ro) + idx)].tolist()
    out: list[list[int]] = []
    for i in order:
        cur = out[-1] if out else None
        if cur is None or (max_tokens is not None and packed_positions(ro, cur + [i]) > max_tokens) \
                or (max_responses is not None and len(cur) >= max_responses):
            out.append([i])
        else:
            cur.append(i)
    return [torch.tensor(m, dtype=torch.long) for m in out]


def pack_groups(model: torch.nn.Module, adapter: GroundingAdapter, ro: Rollout,
                idx: Sequence[int] | Tensor | None = None, device: torch.device | str | None = None) -> PackedGroups:
    """Pack the responses ``idx`` of ``ro`` one row per prompt (module docstring).

    Rows are sorted by prompt and completions within a row by response index; outputs follow
    ``idx``. Response lengths come from ``completion_mask`` (1s, then 0s).
    """
    idx = torch.arange(len(ro)) if idx is None else torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    if len(idx) == 0:
        raise ValueError("pack_groups needs at least one response")
    t = max(int(ro.lengths[idx].max()), 1)
    comp, cmask = ro.completion_ids[idx, :t], ro.completion_mask[idx, :t]
    lengths = cmask.sum(1).tolist()
    pidx, ridx = ro.prompt_index[idx].tolist(), idx.tolist()
    # canonical layout (rows by prompt, completions by response index): the same set of responses
    # packs the same way whatever the order of idx, so old and new log-probs agree bit for bit
    rows = sorted(set(pidx))
    members = {j: sorted((i for i, p in enumerate(pidx) if p == j), key=ridx.__getitem__) for j in rows}

    encs, segs, positions = [], [], []
    index = torch.zeros(len(idx), t, dtype=torch.long)  # row-local first, made global once L is known
    row_of = torch.zeros(len(idx), dtype=torch.long)
    widths = []
    for r, j in enumerate(rows):
        enc = ro.prompt_encodings[j]
        P = enc["input_ids"].shape[-1]
        pos = sequence_positions(model, enc, t)  # (D, P + t)
        ids, seg, rpos, start = [enc["input_ids"].reshape(-1)], [torch.zeros(P, dtype=torch.long)], [pos[:, :P]], P
        starts = {}
        for k, i in enumerate(members[j]):
            n = max(lengths[i] - 1, 0)  # inputs c[:-1]; the last token predicts nothing
            ids.append(comp[i, :n])
            seg.append(torch.full((n,), k + 1, dtype=torch.long))
            rpos.append(pos[:, P:P + n])
            starts[i], start = start, start + n
        encs.append((enc, torch.cat(ids)))
        segs.append(torch.cat(seg))
        positions.append(torch.cat(rpos, 1))
        widths.append(start)
        s = torch.arange(t)
        for i in members[j]:
            # token 0 <- the prompt's last position; token s >= 1 <- completion input s - 1
            index[i] = torch.where((s == 0) | (s >= lengths[i]), P - 1, starts[i] + s - 1)
            row_of[i] = r

    L = max(widths)
    index += row_of[:, None] * L

    # per-row encodings (prompt tensors + completion inputs), right-padded by the adapter
    per_row = []
    for enc, ids in encs:
        e = dict(enc)
        n_comp = ids.numel() - enc["input_ids"].shape[-1]
        e["input_ids"] = ids.reshape(1, -1).to(enc["input_ids"].dtype)
        e["attention_mask"] = torch.ones_like(e["input_ids"])
        for key in adapter.token_keys:
            e[key] = torch.cat([enc[key].reshape(1, -1), torch.zeros(1, n_comp, dtype=enc[key].dtype)], 1)
        per_row.append(e)
    inputs = adapter.pad_batch(per_row, "right")

    seg = torch.full((len(rows), L), -1, dtype=torch.long)
    D = positions[0].shape[0]
    pos = torch.zeros(D, len(rows), L, dtype=torch.long)
    for r, (s, p) in enumerate(zip(segs, positions)):
        seg[r, :len(s)] = s
        pos[:, r, :p.shape[1]] = p
    inputs["attention_mask"] = shared_prefix_mask(seg, attention_implementation(model), _float_dtype(model))
    inputs["position_ids"] = pos if D > 1 else pos[0]
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        index, comp, cmask = index.to(device), comp.to(device), cmask.to(device)
    return PackedGroups(inputs, index, comp, cmask, rows)


def shared_prefix_mask(segments: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """``(R, 1, L, L)`` attention mask from ``(R, L)`` segment ids (0 prompt, k >= 1 completion k,
    -1 padding): causal within the row, and a completion sees only the prompt and itself.

    Boolean (True = attend) for SDPA; additive float (0 / dtype min) for eager attention, which
    adds the mask to its scores. Padding queries attend to themselves only (no empty softmax row).
    """
    L = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = causal & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool)
    allowed = allowed[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return hf_model(model).get_input_embeddings().weight.dtype


def shared_prefix_hidden(model: torch.nn.Module, packed: PackedGroups) -> Tensor:
    """``(b, t, H)`` final hidden states (after the final norm) predicting each completion token."""
    h = trunk_hidden_states(model, packed.inputs)  # (R, L, H)
    return h.reshape(-1, h.shape[-1])[packed.index]


def shared_prefix_logprobs(model: torch.nn.Module, adapter: GroundingAdapter, ro: Rollout,
                           idx: Sequence[int] | Tensor | None, temperature: float = 1.0, with_entropy: bool = False,
                           entropy_grad: bool = True, device: torch.device | str | None = None,
                           chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(logp, entropy, completion_ids, completion_mask)`` of the responses ``idx``, each ``(b, t)``:
    the shared-prefix counterpart of :func:`egm.rl.ppo.token_logprobs` on ``ro.model_inputs(adapter, idx)``,
    through the same chunked head (:func:`egm.models.head.masked_logprobs`; 0 outside the mask)."""
    packed = pack_groups(model, adapter, ro, idx, device)
    hidden = shared_prefix_hidden(model, packed)
    logp, ent = masked_logprobs(hidden, output_head(model), packed.completion_ids, packed.completion_mask,
                                temperature, with_entropy, entropy_grad, chunk_tokens)
    return logp, ent, packed.completion_ids, packed.completion_mask

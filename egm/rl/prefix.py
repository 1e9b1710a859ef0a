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

Two ways to keep completions apart inside a row:

* **split attention** (:data:`SPLIT_ATTENTION`, the default of :class:`egm.rl.module.GRPOModule`;
  PrefixGrouper's design): each layer runs causal SDPA over the prompt, then each completion's
  attention over ``[prompt K/V ; its own K/V]`` (on CPU two kernel calls merged by log-sum-exp,
  :mod:`egm.rl.merged_attention`), ``G C (P + C)`` scores per row instead of the ``L^2`` of one
  dense mask. It is an attention function registered with transformers'
  ``AttentionInterface`` under its own name; :func:`use_split_attention` switches a model's
  language model to it. Called without a :class:`SplitLayout` (generation, SFT, per-response
  scoring) it *is* SDPA, mask function included, so the switch changes nothing else. The layout
  travels as a keyword argument of the forward, so gradient-checkpoint recomputation sees it too.
* **dense mask**: ``sdpa`` (boolean) or ``eager`` (additive float) with a custom ``(R, 1, L, L)``
  mask, which transformers passes through unchanged (``masking_utils`` returns a 4-D mask as-is).

FlashAttention-2/3 and flex attention take neither: :func:`shared_prefix_support` names the
reason, and the caller falls back to per-response.

A micro-batch holding part of a group encodes that group's prompt once for that micro-batch:
a group split over ``k`` micro-batches is encoded ``k`` times per pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from egm.generation.rollout import Rollout
from egm.models.base import GroundingAdapter
from egm.models.head import DEFAULT_CHUNK_TOKENS, hf_model, masked_logprobs, output_head, trunk_hidden_states
from egm.rl import merged_attention

SPLIT_ATTENTION = "egm_split_prefix"
LAYOUT_KWARG = "egm_prefix_layout"
SUPPORTED_ATTENTION = ("sdpa", "eager", SPLIT_ATTENTION)


@dataclass
class PackedGroups:
    """A micro-batch packed one row per prompt (module docstring).

    Attributes:
        inputs: keyword arguments of the HF base model (``input_ids`` ``(R, L)``, 4-D
            ``attention_mask`` ``(R, 1, L, L)`` -- or, under split attention, the
            :class:`SplitLayout` as :data:`LAYOUT_KWARG` and a ``(R, 1, 1, 1)`` placeholder mask --,
            ``position_ids`` ``(3, R, L)`` or ``(R, L)``, the prompts' image tensors).
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


@dataclass
class SplitLayout:
    """Where the prompt and each completion sit in the packed rows, for :func:`split_prefix_attention`.

    ``R`` rows, prompts padded to ``Pm`` positions, ``G`` completion slots per row of ``C``
    positions each (shorter prompts, completions and rows with fewer completions are padded;
    padded slots gather position 0 and are masked as keys, and their outputs are dropped).

    Attributes:
        prefix_index: ``(R, Pm)`` row positions of the prompt tokens (attended causally).
        prefix_valid: ``(R, Pm)`` boolean: the real prompt tokens (False on a shorter prompt's padding).
        comp_index: ``(R, G * C)`` row positions of the completion inputs, slot by slot.
        comp_mask: ``(R * G, 1, C, Pm + C)`` boolean: the real prompt tokens, then causal over
            the completion's own tokens.
        source: ``(R * L,)`` for every row position, its output among ``[prompt outputs (R * Pm) ;
            completion outputs (R * G * C) ; one zero row]`` (row padding takes the zero row).
    """

    prefix_index: Tensor
    prefix_valid: Tensor
    comp_index: Tensor
    comp_mask: Tensor
    source: Tensor
    groups: int
    width: int

    def to(self, device: torch.device | str) -> SplitLayout:
        return SplitLayout(self.prefix_index.to(device), self.prefix_valid.to(device), self.comp_index.to(device),
                           self.comp_mask.to(device), self.source.to(device), self.groups, self.width)


def split_layout(segments: Tensor) -> SplitLayout:
    """:class:`SplitLayout` of packed rows from their ``(R, L)`` segment ids (0 prompt, k >= 1
    completion k, -1 padding; each segment contiguous, the prompt first)."""
    R, L = segments.shape
    rows = [[torch.nonzero(seg == k).reshape(-1) for k in range(int(seg.max()) + 1)] for seg in segments]
    Pm = max(len(r[0]) for r in rows)
    G = max(len(r) - 1 for r in rows)
    C = max((len(c) for r in rows for c in r[1:]), default=0)
    prefix_index = torch.zeros(R, Pm, dtype=torch.long)
    prefix_valid = torch.zeros(R, Pm, dtype=torch.bool)
    comp_index = torch.zeros(R, G, C, dtype=torch.long)
    zero_row = R * Pm + R * G * C
    source = torch.full((R, L), zero_row, dtype=torch.long)
    for r, segs in enumerate(rows):
        p = segs[0]
        prefix_index[r, :len(p)], prefix_valid[r, :len(p)] = p, True
        source[r, p] = r * Pm + torch.arange(len(p))
        for g, c in enumerate(segs[1:]):
            comp_index[r, g, :len(c)] = c
            source[r, c] = R * Pm + (r * G + g) * C + torch.arange(len(c))
    own = torch.ones(C, C, dtype=torch.bool).tril()
    comp_mask = torch.cat([prefix_valid[:, None, None, :].expand(R, G, C, Pm),
                           own[None, None].expand(R, G, C, C)], -1).reshape(R * G, 1, C, Pm + C)
    return SplitLayout(prefix_index, prefix_valid, comp_index.reshape(R, G * C), comp_mask, source.reshape(-1), G, C)


def split_prefix_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[Tensor, None]:
    """transformers attention function (``AttentionInterface``): split prompt/completion attention
    when the forward carries a :class:`SplitLayout` (keyword :data:`LAYOUT_KWARG`), plain SDPA
    otherwise.

    ``query`` ``(R, H, L, d)``, ``key``/``value`` ``(R, H_kv, L, d)``; returns ``(R, L, H, d)``.
    The prompt block is transformers' own SDPA function (causal kernel, grouped-query heads,
    scaling). The completions, on CPU: :func:`egm.rl.merged_attention.prefix_completion_attention`
    (all completion queries against the prompt's K/V in one kernel call, each completion against
    its own in a second, merged by log-sum-exp; nothing copied, nothing recomputed). Elsewhere (or
    with dropout): SDPA of each completion over ``[prompt K/V ; its own K/V]`` with the prompt's
    K/V expanded over the ``G`` slots; with gradients on, that expansion and the attention are
    recomputed in backward (``torch.utils.checkpoint``) rather than kept, so a row holds the
    prompt's K/V once, not ``G`` times. Either way the prompt's K/V gradient is the sum over the
    completions that read it.
    """
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    layout: SplitLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    R, H, L, d = query.shape

    def take(x: Tensor, index: Tensor) -> Tensor:  # (R, h, L, d) at (R, n) -> (R, h, n, d)
        # one row copy per position from the (R L, h d) token rows (the projections' own layout, so
        # no copy before it); a gather over (R, h, n, d) would read an int64 index per element
        rows = x.transpose(1, 2).reshape(R * L, -1)
        flat = (index + torch.arange(R, device=index.device)[:, None] * L).reshape(-1)
        return rows.index_select(0, flat).view(R, index.shape[1], x.shape[1], d).transpose(1, 2)

    qp, kp, vp = (take(x, layout.prefix_index) for x in (query, key, value))
    # prompts are right-padded within their block, so plain causal attention never lets a real
    # prompt token see padding (padded queries are dropped): no mask, the causal kernel
    out_p, _ = sdpa(module, qp, kp, vp, None, dropout=dropout, scaling=scaling, is_causal=True)
    parts = [out_p.reshape(-1, H, d)]  # (R * Pm, H, d)
    if layout.width:
        G, C = layout.groups, layout.width

        def after_prompt(own: Tensor, prompt: Tensor) -> Tensor:  # [prompt ; own] keys per slot
            shared = prompt[:, None].expand(R, G, *prompt.shape[1:]).reshape(R * G, *prompt.shape[1:])
            return torch.cat([shared, own], 2)

        def completions(qc: Tensor, kc: Tensor, vc: Tensor, kp: Tensor, vp: Tensor) -> Tensor:
            out, _ = sdpa(module, qc, after_prompt(kc, kp), after_prompt(vc, vp), layout.comp_mask,
                          dropout=dropout, scaling=scaling, is_causal=False)
            return out

        qc, kc, vc = (take(x, layout.comp_index) for x in (query, key, value))
        if merged_attention.supported(query, dropout):
            # all completion queries against the prompt in one kernel call, each completion against
            # its own keys in another, merged by log-sum-exp: no copy of the prompt's K/V
            out_c = merged_attention.prefix_completion_attention(qc, kp, vp, kc, vc, layout.prefix_valid, G, C,
                                                                 scaling).transpose(1, 2)
        else:
            qc, kc, vc = (merged_attention.slots(x, G, C) for x in (qc, kc, vc))  # (R G, h, C, d)
            if torch.is_grad_enabled() and not dropout:
                # the prompt's keys and values expanded G times would be saved for backward in every
                # layer (G x the prompt's K/V): recompute them in backward from the unexpanded ones
                out_c = torch.utils.checkpoint.checkpoint(completions, qc, kc, vc, kp, vp, use_reentrant=False)
            else:
                out_c = completions(qc, kc, vc, kp, vp)
        parts.append(out_c.reshape(-1, H, d))  # (R * G * C, H, d)
    parts.append(query.new_zeros(1, H, d))
    return torch.cat(parts).index_select(0, layout.source).view(R, L, H, d), None


AttentionInterface.register(SPLIT_ATTENTION, split_prefix_attention)
AttentionMaskInterface.register(SPLIT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_split_attention(model: torch.nn.Module) -> str | None:
    """Switch ``model``'s language model from SDPA to :data:`SPLIT_ATTENTION`; ``None`` when done
    (or already on), else the reason it stays as it is (the dense mask is used then)."""
    impl = attention_implementation(model)
    if impl == SPLIT_ATTENTION:
        return None
    if impl != "sdpa":
        return f"split attention is built on SDPA; attention implementation {impl!r} keeps the dense mask"
    base = hf_model(model)
    key = "text_config" if getattr(base.config, "text_config", None) is not None else ""
    base.set_attn_implementation({key: SPLIT_ATTENTION})
    if attention_implementation(model) != SPLIT_ATTENTION:
        return f"{type(base).__name__} did not take the attention implementation {SPLIT_ATTENTION!r}"
    return None


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
    impl = attention_implementation(model)
    if impl == SPLIT_ATTENTION:
        # the layout carries the mask; a 4-D placeholder is passed through by transformers'
        # mask code untouched (no (R, L, L) mask is built) and ignored by the split attention
        inputs[LAYOUT_KWARG] = split_layout(seg)
        inputs["attention_mask"] = torch.ones(len(rows), 1, 1, 1, dtype=torch.bool)
    else:
        inputs["attention_mask"] = shared_prefix_mask(seg, impl, _float_dtype(model))
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

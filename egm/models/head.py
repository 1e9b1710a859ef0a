"""Token log-probs, entropies and cross-entropy at the real vocabulary without full logits.

Why: the released checkpoints have 151,936 (Qwen3-VL) and 151,674 (InternVL3-hf) vocabulary rows.
Projecting every response token of a micro-batch to the whole vocabulary and taking a float32
``log_softmax`` (plus a ``softmax`` for the entropy) holds several ``(b, t, V)`` float32 tensors
at once: 6.3x one logits tensor in the path this module replaces, about 30 GB for 8 responses of
1,024 tokens at Qwen3-VL-2B's head. Here the trunk's last hidden states are projected in chunks
of ``chunk_tokens`` tokens; each chunk's logits are freed as soon as its log-probs (and
entropies) are taken and recomputed in backward (non-reentrant activation checkpointing), so the
peak depends on the chunk size, not on ``b x t x V``. Only the positions that carry a target
(response tokens, SFT label tokens) are projected at all.

The gradient of the chunk's log-probs and entropies with respect to its logits is written out
(:class:`_LogprobEntropy`) instead of being left to autograd through ``log_softmax`` and
``softmax``: it needs two ``(n, V)`` float32 buffers rather than four or five.

The head is *called* (``head(hidden)``), never read as a weight: under DeepSpeed ZeRO-3 its
weight is partitioned and gathered by the module's own hooks, and LoRA on the head, tied
embeddings and any wrapper keep working. Both recomputation and the chunks stay inside one
autograd graph, so every parameter's gradient is accumulated once per backward (what ZeRO-2/3's
gradient hooks expect).

Peers: verl's ``entropy_from_logits_with_chunking`` / ``use_fused_kernels``, OpenRLHF's chunked
logsumexp, Liger-kernel's fused linear losses (Triton, GPU only).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# 512 tokens x 151,936 rows x 4 bytes = 0.31 GB per float32 buffer; a chunk's backward holds
# about two of them (logits, their gradient). tools/bench_logprobs.py measures it.
DEFAULT_CHUNK_TOKENS = 512
# float32 elements per block of the head's backward sweep on CPU (:func:`backward_block_rows`)
BACKWARD_BLOCK_ELEMENTS = 1 << 20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (bf16/fp16 logits are upcast as the plain path does; float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def _scaled(z: Tensor, temperature: float, out: Tensor | None = None) -> Tensor:
    """A float32 (or float64) copy of ``z / temperature``, safe to modify in place: fresh, or
    written into ``out``."""
    out = z.to(_compute_dtype(z.dtype), copy=True) if out is None else out.copy_(z)
    if temperature > 0 and temperature != 1.0:
        out.mul_(1.0 / temperature)
    return out


def _buffer(stats: dict | None, name: str, z: Tensor) -> Tensor | None:
    """A ``z``-shaped float32 (float64) buffer kept in ``stats["buffers"]`` (shared by the chunks
    of one :func:`chunked_logprobs` call), or ``None`` without one.

    Why: a fresh 0.3 GB buffer per chunk is fresh pages from the operating system on CPU (glibc
    maps blocks this large anew on every allocation), which costs about as much as the
    arithmetic of a sweep; reusing one buffer across the chunks of a call avoids it. (CUDA's
    caching allocator reuses blocks anyway.)"""
    ws = None if stats is None else stats.get("buffers")
    if ws is None:
        return None
    dtype, (n, V) = _compute_dtype(z.dtype), z.shape
    buf = ws.get(name)
    if buf is None or buf.shape[0] < n or buf.shape[1] != V or buf.dtype != dtype or buf.device != z.device:
        buf = ws[name] = torch.empty(n, V, dtype=dtype, device=z.device)
    return buf[:n]


class _LogprobEntropy(torch.autograd.Function):
    """``z (n, V) -> (logp (n,), entropy (n,))`` of ``softmax(z / T)``, with the gradient written out:

    d logp_k / d z_j = ([j = k] - p_j) / T,    d H / d z_j = -p_j (log p_j + H) / T.

    Each pass over the ``(n, V)`` logits is a memory-bound sweep of ``V = 151,936`` floats per
    token, so the passes are counted: the forward takes 7 (copy, scale, max, shift, exp, sum, and
    one batched dot product ``sum_j e_j s_j`` for the entropy; without the entropy the exponentials
    overwrite the shifted logits, so no second buffer is allocated), the backward 6 (copy, shift,
    exp, two per-token affine terms, product), swept block by block of rows
    (:func:`backward_block_rows`) and written into the gradient in the logits' dtype.

    ``stats``: under activation checkpointing (:func:`chunked_logprobs`) the chunk is recomputed
    in backward only to get its logits back; the first forward leaves its ``logsumexp`` and
    entropy in this dict and the recomputation reuses them instead of sweeping the logits again.
    Its ``"buffers"`` (:func:`_buffer`) hold the forward's two float buffers across chunks. The
    backward holds no ``(n, V)`` float buffer, only its blocks and the gradient itself: nothing
    beyond that is alive during the head's weight-gradient matmul, where the head's peak is.
    """

    @staticmethod
    def forward(ctx, z: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                stats: dict | None = None):
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.set_materialize_grads(False)
        if stats is not None and "lse" in stats:  # checkpoint's recomputation: the logits are what it is for
            lse, ent = stats["lse"], stats["ent"]
            scale = 1.0 / temperature if temperature > 0 else 1.0
            logp = z.gather(-1, targets[:, None]).squeeze(-1).to(lse.dtype) * scale - lse
            ctx.save_for_backward(z, targets, lse, ent)
            return logp, (ent if with_entropy else None)
        s = _scaled(z, temperature, _buffer(stats, "s", z))
        m = s.amax(-1, keepdim=True)
        s.sub_(m)  # s_j = z_j / T - max: log p_j = s_j - log S
        target = s.gather(-1, targets[:, None]).squeeze(-1)
        ent = None
        if with_entropy:  # H = -sum p log p = log S - sum_j e_j s_j / S
            e = _buffer(stats, "e", z)
            e = s.exp() if e is None else torch.exp(s, out=e)
            total = e.sum(-1)
            ent = total.log() - torch.bmm(e[:, None, :], s[:, :, None]).reshape(-1) / total
            del e
        else:  # no second buffer: the exponentials overwrite s
            total = s.exp_().sum(-1)
        del s
        log_total = total.log()
        lse = m.squeeze(-1) + log_total
        logp = target - log_total
        if stats is not None:
            stats["lse"], stats["ent"] = lse, (ent.detach() if ent is not None else lse.new_empty(0))
        ctx.save_for_backward(z, targets, lse, ent.detach() if ent is not None else lse.new_empty(0))
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_ent: Tensor | None):
        z, targets, lse, ent = ctx.saved_tensors
        T = ctx.temperature if ctx.temperature > 0 and ctx.temperature != 1.0 else 1.0
        dtype = _compute_dtype(z.dtype)
        zero = lse.new_zeros(z.shape[0])
        g_l = zero if g_logp is None else g_logp.to(dtype)
        g_e = zero if (g_ent is None or not ctx.with_entropy) else g_ent.to(dtype)
        # grad_j = p_j (a log p_j + b) + [j = k] g_logp / T, with per-token a and b
        a, b = -g_e / T, -(g_l + (g_e * ent if ctx.with_entropy else 0)) / T
        g_t = (g_l / T)[:, None]
        grad = torch.empty_like(z)
        rows = max(min(backward_block_rows(z), z.shape[0]), 1)
        blocks = [torch.empty(rows, z.shape[1], dtype=dtype, device=z.device) for _ in range(2)]
        for i in range(0, z.shape[0], rows):
            j = min(i + rows, z.shape[0])
            s, p = (x[:j - i] for x in blocks)  # the last block may be shorter
            torch.add(-lse[i:j, None], s.copy_(z[i:j]), alpha=1.0 / T, out=s)  # log p = z / T - lse
            torch.exp(s, out=p)
            s.mul_(a[i:j, None]).add_(b[i:j, None]).mul_(p)
            if g_logp is not None:
                s.scatter_add_(-1, targets[i:j, None], g_t[i:j])
            grad[i:j] = s
        return grad, None, None, None, None


def backward_block_rows(z: Tensor) -> int:
    """Rows of the ``(n, V)`` logits that :class:`_LogprobEntropy`'s backward sweeps at a time.

    Why: the backward's six passes (copy, shift, exp, two per-token affine terms, product) read
    and write each element several times. Over whole ``(n, V)`` float32 buffers every pass is a
    trip to main memory, and each fresh buffer of that size costs its page faults; a block of
    about 4 MiB stays in the processor's cache across the passes and is reused from block to block
    (``tools/bench_logprobs.py`` measures the head). A GPU keeps the whole chunk as one block:
    there each pass is one kernel launch, and the launches would multiply.
    """
    if z.device.type != "cpu":
        return max(z.shape[0], 1)
    return max(BACKWARD_BLOCK_ELEMENTS // max(z.shape[1], 1), 1)


def _chunk(head: torch.nn.Module, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
           stats: dict | None = None):
    return _LogprobEntropy.apply(head(h), targets, temperature, with_entropy, stats)


def chunked_logprobs(hidden: Tensor, head: torch.nn.Module, targets: Tensor, temperature: float = 1.0,
                     with_entropy: bool = False, entropy_grad: bool = True,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``(n,)`` of ``targets`` under ``softmax(head(hidden) / temperature)``, and the exact
    entropies ``(n,)`` when ``with_entropy``, for ``n`` flat positions ``hidden (n, H)``.

    ``entropy_grad=False`` returns the entropy outside the autograd graph (logged only). Results
    are float32 (float64 for a float64 head).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n = hidden.shape[0]
    grad = torch.is_grad_enabled()
    logps, ents = [], []
    buffers: dict[str, Tensor] = {}  # the forward's float buffers, shared by the chunks, freed below
    for s in range(0, n, chunk_tokens):
        h, t = hidden[s:s + chunk_tokens], targets[s:s + chunk_tokens]
        stats = {"buffers": buffers}
        if grad:
            lp, ent = checkpoint(_chunk, head, h, t, temperature, with_entropy, stats, use_reentrant=False)
        else:
            lp, ent = _chunk(head, h, t, temperature, with_entropy, stats)
        logps.append(lp)
        if with_entropy:
            ents.append(ent if entropy_grad else ent.detach())
    buffers.clear()  # checkpoint keeps each chunk's arguments until backward: drop the buffers now
    dtype = _compute_dtype(hidden.dtype if n == 0 else logps[0].dtype)
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=dtype)
    ent = (torch.cat(ents) if ents else hidden.new_zeros(0, dtype=dtype)) if with_entropy else None
    return logp, ent


def _unflatten(values: Tensor, mask: Tensor) -> Tensor:
    """Scatter the ``(n,)`` values of the masked positions back into a zero ``(b, t)`` tensor."""
    out = values.new_zeros(mask.shape)
    return out.masked_scatter(mask, values)


def masked_logprobs(hidden: Tensor, head: torch.nn.Module, targets: Tensor, mask: Tensor | None = None,
                    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = True,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """:func:`chunked_logprobs` over ``(b, t)`` positions: ``hidden (b, t, H)``, ``targets (b, t)``.

    Only positions where ``mask`` is true are projected; the others are 0 in both outputs (the
    loss masks them anyway). Returns ``(logp (b, t), entropy (b, t) | None)``.
    """
    mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    lp, ent = chunked_logprobs(hidden[mask], head, targets[mask], temperature, with_entropy, entropy_grad,
                               chunk_tokens)
    return _unflatten(lp, mask), None if ent is None else _unflatten(ent, mask)


# -- the model side: hidden states from the trunk, the output head ------------------------------

def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``...ForConditionalGeneration`` under a PEFT wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The vocabulary projection module (``lm_head``; tied to the input embeddings where the config ties them)."""
    head = hf_model(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(hf_model(model)).__name__} has no output embeddings (lm_head)")
    return head


def trunk_hidden_states(model: torch.nn.Module, inputs: Mapping[str, Tensor]) -> Tensor:
    """Last hidden states ``(b, L, H)`` of a Qwen3-VL / InternVL ``...ForConditionalGeneration``
    (vision tower + language model + final norm), without the vocabulary projection.

    The same call the model's own ``forward`` makes before ``lm_head``; ``labels`` are dropped
    (the loss is computed here) and no KV cache is built.
    """
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    return hf_model(model).model(**kwargs, use_cache=False)[0]


def completion_logprobs(model: torch.nn.Module, inputs: Mapping[str, Tensor], completion_ids: Tensor,
                        completion_mask: Tensor | None = None, temperature: float = 1.0,
                        with_entropy: bool = False, entropy_grad: bool = True,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``(b, t)`` of the completions at the end of ``inputs`` (and exact entropies).

    ``inputs`` end with the ``t`` completion tokens (left-padded prompt + completion, as
    :meth:`egm.generation.rollout.Rollout.model_inputs` builds them): the hidden state at position
    ``L - t - 1 + k`` predicts completion token ``k``. Positions outside ``completion_mask`` are 0.
    """
    t = completion_ids.shape[1]
    hidden = trunk_hidden_states(model, inputs)[:, -(t + 1):-1]  # (b, t, H)
    return masked_logprobs(hidden, output_head(model), completion_ids, completion_mask, temperature,
                           with_entropy, entropy_grad, chunk_tokens)


def label_cross_entropy(model: torch.nn.Module, inputs: Mapping[str, Tensor],
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """The causal-LM loss of ``inputs["labels"]`` (mean over target tokens) and the target count.

    The same number as the model's own ``loss`` (shifted labels, ``ignore_index`` skipped), with
    logits computed only at the target positions, in chunks.
    """
    labels = inputs["labels"][:, 1:]
    mask = labels != ignore_index
    hidden = trunk_hidden_states(model, inputs)[:, :-1]
    logp, _ = chunked_logprobs(hidden[mask], output_head(model), labels[mask], chunk_tokens=chunk_tokens)
    n = mask.sum()
    return -logp.sum() / n.clamp_min(1), n

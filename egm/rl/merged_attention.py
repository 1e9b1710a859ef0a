"""Completions' attention over [prompt K/V ; own K/V], as two kernel calls merged by log-sum-exp.

Why: in the shared-prefix forward (:mod:`egm.rl.prefix`) each of the ``G`` completions of a row
attends to its prompt's keys and values and, causally, to its own. Run as ``G`` batch entries
over the concatenated keys, the prompt's K/V is copied ``G`` times per layer and the kernel works
on ``G`` small blocks of ``C`` queries. The softmax over a union of key blocks splits exactly:
with ``o_b, lse_b`` the attention output and log-sum-exp of the queries over block ``b``,

    lse = log(exp(lse_1) + exp(lse_2)),    o = exp(lse_1 - lse) o_1 + exp(lse_2 - lse) o_2

(the flash-decoding / ring-attention merge). So all ``G C`` completion queries of a row go
against the prompt's keys in one call (no mask, no copy), each completion against its own keys
in a second, causal call, and the two are merged. The backward is each block's own kernel
backward called with the *merged* output and log-sum-exp: the kernel forms
``P_ij = exp(s_ij - lse_i)`` and ``D_i = sum_k dO_ik O_ik`` from them, which are the probabilities
and the softmax-gradient term of the whole union restricted to the block. Nothing is expanded,
so nothing needs recomputing in backward.

PyTorch's SDPA does not return its log-sum-exp; the CPU flash-attention kernel's aten operators
do (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``, with grouped-query
heads). They are private: this module is the one place that calls them, :func:`supported` checks
their schema, and ``tests/rl/test_merged_attention.py`` checks them against a float64 softmax, so a
PyTorch release that changes them fails there (and :mod:`egm.rl.prefix` falls back to the copied
K/V path, which is what runs on other devices).
"""

from __future__ import annotations

import torch
from torch import Tensor

EXPECTED_FORWARD_ARGS = ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale")
EXPECTED_BACKWARD_ARGS = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal",
                      "attn_mask", "scale")


def _ops():
    aten = torch.ops.aten
    return (aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_flash_attention_for_cpu_backward.default)


def kernel_schema() -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """Argument names of the two CPU flash-attention operators, ``None`` if this PyTorch lacks them."""
    try:
        fwd, bwd = _ops()
    except (AttributeError, RuntimeError):
        return None
    return tuple(a.name for a in fwd._schema.arguments), tuple(a.name for a in bwd._schema.arguments)


_SUPPORTED = kernel_schema() == (EXPECTED_FORWARD_ARGS, EXPECTED_BACKWARD_ARGS)


def supported(query: Tensor, dropout: float = 0.0) -> bool:
    """Whether :func:`prefix_completion_attention` can run: CPU tensors, no dropout, and the
    operators with the arguments this module was written against."""
    return _SUPPORTED and query.device.type == "cpu" and not dropout


def slots(x: Tensor, groups: int, width: int) -> Tensor:
    """``(R, h, G C, ...)`` slot by slot -> ``(R G, h, C, ...)``."""
    R, h = x.shape[:2]
    return x.reshape(R, h, groups, width, *x.shape[3:]).transpose(1, 2).reshape(R * groups, h, width, *x.shape[3:])


def unslots(x: Tensor, rows: int) -> Tensor:
    """Inverse of :func:`slots`: ``(R G, h, C, ...)`` -> ``(R, h, G C, ...)``."""
    RG, h, C = x.shape[:3]
    G = RG // rows
    return x.reshape(rows, G, h, C, *x.shape[3:]).transpose(1, 2).reshape(rows, h, G * C, *x.shape[3:])


class _PrefixCompletionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qc: Tensor, kp: Tensor, vp: Tensor, kc: Tensor, vc: Tensor, prefix_bias: Tensor | None,
                groups: int, width: int, scale: float | None):
        fwd, _ = _ops()
        R = qc.shape[0]
        o1, lse1 = fwd(qc, kp, vp, 0.0, False, attn_mask=prefix_bias, scale=scale)
        o2, lse2 = fwd(*(slots(x, groups, width) for x in (qc, kc, vc)), 0.0, True, scale=scale)
        o2, lse2 = unslots(o2, R), unslots(lse2, R)
        lse = torch.logaddexp(lse1, lse2)
        out = (o1.to(lse.dtype) * (lse1 - lse).exp_()[..., None]).add_(o2.to(lse.dtype) * (lse2 - lse).exp_()[..., None])
        out = out.to(qc.dtype)
        ctx.save_for_backward(qc, kp, vp, kc, vc, prefix_bias, out, lse)
        ctx.groups, ctx.width, ctx.scale = groups, width, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        _, bwd = _ops()
        qc, kp, vp, kc, vc, prefix_bias, out, lse = ctx.saved_tensors
        G, C, scale = ctx.groups, ctx.width, ctx.scale
        grad_out = grad_out.contiguous()
        dq1, dkp, dvp = bwd(grad_out, qc, kp, vp, out, lse, 0.0, False, attn_mask=prefix_bias, scale=scale)
        dq2, dkc, dvc = bwd(*(slots(x, G, C) for x in (grad_out, qc, kc, vc, out, lse)), 0.0, True, scale=scale)
        R = qc.shape[0]
        return dq1 + unslots(dq2, R), dkp, dvp, unslots(dkc, R), unslots(dvc, R), None, None, None, None


def prefix_completion_attention(qc: Tensor, kp: Tensor, vp: Tensor, kc: Tensor, vc: Tensor,
                                prefix_valid: Tensor | None, groups: int, width: int,
                                scale: float | None = None) -> Tensor:
    """Attention of every completion query over its row's prompt and, causally, its own completion.

    ``qc`` ``(R, H, G C, d)`` and ``kc``/``vc`` ``(R, H_kv, G C, d)``: the completions of each row,
    slot by slot (``G`` slots of ``C`` positions; a shorter completion is right-padded in its slot,
    whose padding only later padding sees). ``kp``/``vp`` ``(R, H_kv, P, d)``: the prompts' keys
    and values; ``prefix_valid`` ``(R, P)`` marks real prompt keys (``None``: all are). Query head
    ``i`` reads key head ``i // (H / H_kv)`` (transformers' ``repeat_kv``). Returns ``(R, H, G C, d)``.
    """
    bias = None
    if prefix_valid is not None and not bool(prefix_valid.all()):
        bias = torch.zeros(prefix_valid.shape, dtype=qc.dtype, device=qc.device)
        bias = bias.masked_fill(~prefix_valid, float("-inf"))[:, None, None, :]
    args = [x.contiguous() for x in (qc, kp, vp, kc, vc)]
    return _PrefixCompletionAttention.apply(*args, bias, groups, width, scale)

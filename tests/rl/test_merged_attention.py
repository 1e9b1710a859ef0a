"""The completions' attention merged by log-sum-exp (egm/rl/merged_attention.py) against a float64
softmax over each completion's concatenated keys ``[prompt ; own causal past]``: outputs and the
gradients of queries, keys and values, with grouped-query heads, prompts of different lengths
(padded keys) and a padded completion slot; and the private PyTorch operators it wraps, whose
names and arguments must be the ones the module was written against."""

from __future__ import annotations

import pytest
import torch

from egm.rl import merged_attention
from egm.rl.merged_attention import kernel_schema, prefix_completion_attention, supported

R, H, HKV, G, C, P, D = 2, 4, 2, 3, 5, 7, 8


def reference(qc, kp, vp, kc, vc, valid, scale):
    """Each completion slot alone: softmax over [its row's real prompt keys ; its own causal keys]."""
    outs = []
    for r in range(R):
        for g in range(G):
            sl = slice(g * C, (g + 1) * C)
            k = torch.cat([kp[r], kc[r, :, sl]], 1).repeat_interleave(H // HKV, 0)
            v = torch.cat([vp[r], vc[r, :, sl]], 1).repeat_interleave(H // HKV, 0)
            allowed = torch.cat([valid[r][None].expand(C, P), torch.ones(C, C, dtype=torch.bool).tril()], 1)
            scores = (qc[r, :, sl] @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
            outs.append(torch.softmax(scores, -1) @ v)
    return torch.stack(outs).view(R, G, H, C, D).transpose(1, 2).reshape(R, H, G * C, D)


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qc = torch.randn(R, H, G * C, D, generator=g, dtype=dtype)
    kc, vc = (torch.randn(R, HKV, G * C, D, generator=g, dtype=dtype) for _ in range(2))
    kp, vp = (torch.randn(R, HKV, P, D, generator=g, dtype=dtype) for _ in range(2))
    return [x.requires_grad_(True) for x in (qc, kp, vp, kc, vc)]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_the_private_kernels_are_the_ones_this_module_was_written_against():
    """Fails on a PyTorch release that renames or changes the CPU flash-attention operators
    (the shared-prefix forward then falls back to the copied-K/V path: slower, same numbers)."""
    assert kernel_schema() == (merged_attention.EXPECTED_FORWARD_ARGS, merged_attention.EXPECTED_BACKWARD_ARGS)
    assert supported(torch.zeros(1))
    assert not supported(torch.zeros(1), dropout=0.1)
    assert not supported(torch.zeros(1, device="meta"))


@pytest.mark.parametrize("padded_prompt", [False, True])
def test_float64_equals_the_softmax_over_the_concatenated_keys(padded_prompt):
    valid = torch.ones(R, P, dtype=torch.bool)
    if padded_prompt:
        valid[1, 5:] = False  # row 1's prompt is 2 tokens shorter
    x = inputs(torch.float64)
    out = prefix_completion_attention(*x, valid, G, C, 0.3)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad((out * w).sum(), x)
    x2 = [t.detach().clone().requires_grad_(True) for t in x]
    ref = reference(*x2, valid, 0.3)
    want = torch.autograd.grad((ref * w).sum(), x2)
    assert rel(out, ref) < 1e-12
    for name, a, b in zip(("q", "k_prompt", "v_prompt", "k_own", "v_own"), got, want):
        assert rel(a, b) < 1e-12, name
    if padded_prompt:  # padded prompt keys are never read: no gradient reaches them
        assert got[1][1, :, 5:].abs().max() == 0 and got[2][1, :, 5:].abs().max() == 0


def test_bfloat16_is_as_close_as_sdpa_over_the_concatenated_keys():
    """In bf16 the merge rounds twice (each block's output, then the sum): its error against
    float64 stays within twice that of one SDPA call per completion over its concatenated keys."""
    valid = torch.ones(R, P, dtype=torch.bool)
    x = [t.detach() for t in inputs(torch.float64, seed=3)]
    ref = reference(*x, valid, D ** -0.5)
    qc, kp, vp, kc, vc = (t.bfloat16() for t in x)
    merged = prefix_completion_attention(qc, kp, vp, kc, vc, valid, G, C).double()
    allowed = torch.cat([torch.ones(C, P, dtype=torch.bool), torch.ones(C, C, dtype=torch.bool).tril()], 1)
    plain = torch.empty_like(ref)
    for r in range(R):
        for g in range(G):
            sl = slice(g * C, (g + 1) * C)
            k, v = torch.cat([kp[r], kc[r, :, sl]], 1), torch.cat([vp[r], vc[r, :, sl]], 1)
            plain[r, :, sl] = torch.nn.functional.scaled_dot_product_attention(
                qc[r:r + 1, :, sl], k[None], v[None], attn_mask=allowed, enable_gqa=True)[0].double()
    assert 0 < rel(merged, ref) <= 2 * rel(plain, ref)

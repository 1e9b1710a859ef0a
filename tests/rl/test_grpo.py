"""GRPO math (Eq. 3-7) against float64 values computed by hand with ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from egm.rl.grpo import (
    ADV_EPS,
    agg_loss,
    clipped_surrogate,
    entropy_from_logits,
    group_advantages,
    group_has_spread,
    grpo_loss,
    kl_k3,
    sampled_token_entropy,
    select_groups,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def _adv_ref(group, eps=ADV_EPS, unbiased=True):
    n = len(group)
    if n < 2 or max(group) == min(group):
        return [0.0] * n
    mean = sum(group) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1 if unbiased else n))
    return [(r - mean) / (std + eps) for r in group]


def _ppo_ref(lp, old, a, eps=0.2):
    rho = math.exp(max(-20.0, min(20.0, lp - old)))
    return min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)


def _k3_ref(lp, ref):
    """verl ``low_var_kl``: log-ratio clamped to [-20, 20], then k3 clamped to [-10, 10]."""
    x = max(-20.0, min(20.0, ref - lp))
    return max(-10.0, min(10.0, math.exp(x) - x - 1))


# --- advantages (Eq. 7)


def test_group_advantages_hand_computed():
    groups = [[1.0, 0.0, 0.5], [0.2, 0.9, 0.9], [0.7, 0.7, 0.7]]
    flat = [r for g in groups for r in g]
    adv, zero = group_advantages(t(flat), group_size=3)
    want = [a for g in groups for a in _adv_ref(g)]
    torch.testing.assert_close(adv, t(want), rtol=0, atol=1e-14)
    assert adv[0].item() == pytest.approx(0.5 / (0.5 + 1e-6))  # unbiased std of group 0 is 0.5
    assert torch.equal(adv[6:], torch.zeros(3, dtype=D))  # equal rewards: exactly 0, not noise
    assert zero.item() == pytest.approx(1 / 3)
    adv2, zero2 = group_advantages(t(groups))  # (P, G) layout
    torch.testing.assert_close(adv2.flatten(), adv)
    torch.testing.assert_close(zero2, zero)


def test_group_advantages_population_std_and_eps():
    g = [1.0, 0.0, 0.5, 0.25]
    adv, _ = group_advantages(t(g), group_size=4, unbiased=False, eps=0.1)
    torch.testing.assert_close(adv, t(_adv_ref(g, eps=0.1, unbiased=False)), rtol=0, atol=1e-14)


def test_group_advantages_edge_cases():
    adv, zero = group_advantages(t([0.3, 0.9, 0.0]), group_size=1)  # one-sample groups
    assert torch.equal(adv, torch.zeros(3, dtype=D)) and zero.item() == 1.0
    adv, zero = group_advantages(torch.zeros(0, dtype=D), group_size=4)
    assert adv.numel() == 0 and zero.item() == 0.0
    adv, _ = group_advantages(torch.tensor([1, 0]), group_size=2)  # int rewards -> float
    assert adv.dtype == torch.float32 and not torch.isnan(adv).any()
    for bad in [dict(rewards=t([1.0, 2.0, 3.0]), group_size=2), dict(rewards=t([1.0]))]:
        with pytest.raises(ValueError):
            group_advantages(**bad)
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(t([1.0, math.nan]), group_size=2)


def test_group_advantages_match_trl_formula():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    r = torch.rand(4, 16, dtype=D, generator=torch.Generator().manual_seed(0))
    adv, _ = group_advantages(r, eps=1e-4)
    mean = r.mean(1, keepdim=True)
    std = trl_utils.nanstd(r, dim=1, keepdim=True)
    torch.testing.assert_close(adv, (r - mean) / (std + 1e-4))


# --- surrogate (Eq. 3)

# (logp, old_logp, A) per token, covering every branch of the clip
CASES = [
    (-1.0, -1.0, 2.0),  # ratio 1
    (-0.9, -1.0, 2.0),  # ratio 1.105 inside
    (-0.5, -1.0, 2.0),  # ratio 1.65, A > 0: clipped at 1.2
    (-0.5, -1.0, -2.0),  # ratio 1.65, A < 0: unclipped (pessimistic) branch
    (-2.0, -1.0, -2.0),  # ratio 0.37, A < 0: clipped at 0.8
    (-2.0, -1.0, 2.0),  # ratio 0.37, A > 0: unclipped
]


def test_clipped_surrogate_hand_computed():
    lp, old, a = (t([[c[k] for c in CASES]]) for k in range(3))
    obj, clipped = clipped_surrogate(lp, old, a, torch.ones_like(lp, dtype=torch.bool))
    want = [_ppo_ref(*c) for c in CASES]
    torch.testing.assert_close(obj, t([want]), rtol=0, atol=1e-14)
    assert clipped.tolist() == [[False, False, True, False, True, False]]


def test_surrogate_huge_log_prob_gap():
    lp = t([[1000.0, -1000.0, 1000.0]])
    old = t([[0.0, 0.0, 0.0]])
    a = t([[1.0, -1.0, -1.0]])
    lp.requires_grad_(True)
    obj, clipped = clipped_surrogate(lp, old, a, torch.ones(1, 3, dtype=torch.bool))
    assert torch.isfinite(obj).all()
    torch.testing.assert_close(obj[0, :2], t([1.2, -0.8]))  # clipping applies
    assert obj[0, 2].item() == pytest.approx(-math.exp(20.0))  # log-ratio clamped at 20
    assert clipped.tolist() == [[True, True, False]]
    obj.sum().backward()
    assert torch.isfinite(lp.grad).all() and torch.equal(lp.grad, torch.zeros_like(lp))
    obj_dc, _ = clipped_surrogate(lp, old, a, torch.ones(1, 3, dtype=torch.bool), dual_clip=3.0)
    assert obj_dc[0, 2].item() == -3.0  # verl's dual clip floors A<0 tokens at 3 * A


def test_masked_garbage_is_harmless():
    lp = t([[-1.0, math.nan, -math.inf]]).requires_grad_(True)
    old = t([[-1.2, -math.inf, math.nan]])
    mask = t([[1, 0, 0]], dtype=torch.bool)
    loss, m = grpo_loss(lp, old, t([1.0]), mask, ref_logp=old, entropy=-lp, beta=0.1, gamma=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v) for v in m.values())


# --- KL (Eq. 5), entropy (Eq. 6)


def test_kl_k3_hand_computed_and_guarded():
    pairs = [(-1.0, -1.0), (-1.0, -1.5), (-2.0, -0.3), (0.0, -1e3), (-1e3, 0.0), (-1e-9, 0.0)]
    lp = t([[p[0] for p in pairs]])
    ref = t([[p[1] for p in pairs]])
    kl = kl_k3(lp, ref)
    torch.testing.assert_close(kl, t([[_k3_ref(*p) for p in pairs]]), rtol=1e-12, atol=1e-15)
    assert torch.isfinite(kl).all() and (kl >= 0).all() and kl[0, 0].item() == 0.0
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) * 1e-4  # float32, tiny gaps
    assert (kl_k3(x, torch.zeros_like(x)) >= 0).all()
    assert kl_k3(lp, ref, mask=t([[1, 0, 1, 0, 0, 0]], torch.bool))[0, 1].item() == 0.0


def test_kl_k3_is_clamped_at_10_with_zero_gradient_beyond():
    """ref - logp = 7: unclamped k3 = e^7 - 8 = 1088.63; verl's low_var_kl gives 10, gradient 0.

    Below the clamp dk3/dlogp = 1 - e^(ref - logp) (x = ref - logp, dk3/dx = e^x - 1, dx/dlogp = -1).
    """
    assert math.exp(7) - 8 == pytest.approx(1088.633, abs=1e-3)
    gaps = [7.0, 2.0, 0.5, -10.0, -11.5, -30.0]  # ref - logp
    lp = torch.zeros(1, len(gaps), dtype=D, requires_grad=True)
    kl = kl_k3(lp, t([gaps]))
    want = [10.0, math.exp(2) - 3, math.exp(0.5) - 1.5, math.exp(-10) + 9, 10.0, 10.0]
    torch.testing.assert_close(kl, t([want]), rtol=1e-12, atol=0)
    kl.sum().backward()
    want_grad = [0.0, 1 - math.exp(2), 1 - math.exp(0.5), 1 - math.exp(-10), 0.0, 0.0]
    torch.testing.assert_close(lp.grad, t([want_grad]), rtol=1e-12, atol=0)
    # inside grpo_loss the token-mean KL of [7, 0.5] is (10 + e^0.5 - 1.5) / 2, not ~545
    lp2 = torch.zeros(1, 2, dtype=D)
    _, m = grpo_loss(lp2, lp2, t([0.0]), torch.ones(1, 2, dtype=torch.bool), ref_logp=t([[7.0, 0.5]]), beta=0.005)
    assert m["kl"].item() == pytest.approx((10 + math.exp(0.5) - 1.5) / 2, rel=1e-12)


def test_entropy_estimators():
    logits = t([[[0.0, 1.0, 2.0], [5.0, -math.inf, 5.0]]])
    h = entropy_from_logits(logits)
    z = sum(math.exp(v) for v in (0.0, 1.0, 2.0))
    want0 = -sum(math.exp(v) / z * (v - math.log(z)) for v in (0.0, 1.0, 2.0))
    torch.testing.assert_close(h, t([[want0, math.log(2.0)]]), rtol=0, atol=1e-14)
    logits.requires_grad_(True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert entropy_from_logits(torch.zeros(2, 3, 7, dtype=torch.bfloat16)).dtype == torch.float32
    torch.testing.assert_close(sampled_token_entropy(t([[-0.5, -2.0]])), t([[0.5, 2.0]]))


# --- aggregation


V = [[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]]
M = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]]  # full, truncated, empty


def test_agg_modes_hand_computed():
    v, m = t(V), t(M, torch.bool)
    assert agg_loss(v, m, "token-mean").item() == pytest.approx((10 + 30) / 6)
    assert agg_loss(v, m, "seq-mean-token-mean").item() == pytest.approx((10 / 4 + 30 / 2 + 0) / 3)
    assert agg_loss(v, m, "token-mean", normalizer=12).item() == pytest.approx(40 / 12)
    with pytest.raises(ValueError, match="agg"):
        agg_loss(v, m, "seq-sum")


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_all_masked_is_zero_not_nan(agg):
    lp = t(V).requires_grad_(True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    adv = t([1.0, -1.0, 0.0])
    loss, metrics = grpo_loss(lp, lp.detach() - 5, adv, mask, ref_logp=t(V), beta=1.0, agg=agg)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))
    assert metrics["clip_frac"].item() == 0.0 and metrics["num_tokens"].item() == 0


# --- full loss and gradients


def _grpo_ref(lp, old, ref, ent, adv, mask, beta, gamma, agg):
    """Eq. 3 negated, term by term with ``math``."""

    def agg_(per_tok):
        if agg == "token-mean":
            n = sum(sum(row) for row in mask)
            total = sum(v for r, mr in zip(per_tok, mask) for v, k in zip(r, mr) if k)
            return total / max(n, 1)
        seqs = [
            sum(v for v, k in zip(r, mr) if k) / max(sum(mr), 1) for r, mr in zip(per_tok, mask)
        ]
        return sum(seqs) / len(seqs)

    rows = range(len(lp))
    cols = range(len(lp[0]))
    surr = [[_ppo_ref(lp[i][j], old[i][j], adv[i]) for j in cols] for i in rows]
    kl = [[_k3_ref(lp[i][j], ref[i][j]) for j in cols] for i in rows]
    return -agg_(surr) + beta * agg_(kl) - gamma * agg_(ent), agg_(kl), agg_(ent)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_loss_matches_equations(agg):
    lp = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -3.0, 9.0, 9.0]]
    old = [[-1.1, -1.0, -1.0, -0.1], [-0.3, -2.0, 0.0, 0.0]]
    ref = [[-1.5, -0.4, -2.5, -0.2], [-0.1, -3.5, 0.0, 0.0]]
    ent = [[0.7, 1.2, 0.1, 0.0], [2.0, 0.4, 0.0, 0.0]]
    adv = [1.5, -0.7]
    mask = [[1, 1, 1, 1], [1, 1, 0, 0]]
    beta, gamma = 0.005, 0.01
    loss, m = grpo_loss(
        t(lp), t(old), t(adv), t(mask, torch.bool),
        ref_logp=t(ref), entropy=t(ent), beta=beta, gamma=gamma, agg=agg,
    )
    want, want_kl, want_ent = _grpo_ref(lp, old, ref, ent, adv, mask, beta, gamma, agg)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["kl"].item() == pytest.approx(want_kl, rel=1e-12)
    assert m["entropy"].item() == pytest.approx(want_ent, rel=1e-12)
    # clipped: (0, 1) rho = e^0.5 with A > 0 and (1, 1) rho = e^-1 with A < 0
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    assert m["ppo_kl"].item() == pytest.approx((-0.1 - 0.5 + 1.0 + 0 + 0 + 1.0) / 6)
    assert m["num_tokens"].item() == 6


def test_grpo_loss_requires_inputs_for_active_terms():
    x, mask = t([[-1.0]]), t([[1]], torch.bool)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, t([1.0]), mask, beta=0.1)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(x, x, t([1.0]), mask, gamma=0.1)
    _, m = grpo_loss(x, x, t([1.0]), mask)
    assert "kl" not in m and "entropy" not in m


def test_token_mean_gradient_by_hand():
    """d loss / d logp = -A * rho / N on the unclipped branch, 0 on the clipped side."""
    lp0 = [[-1.0, -0.5, -2.0], [-0.4, -3.0, -1.0]]
    old = [[-1.0, -1.0, -2.0], [-0.5, -1.0, -1.0]]
    adv = [2.0, -1.0]
    mask = [[1, 1, 1], [1, 1, 0]]
    lp = t(lp0).requires_grad_(True)
    loss, _ = grpo_loss(lp, t(old), t(adv), t(mask, torch.bool))
    loss.backward()
    n = 5
    want = [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        for j in range(3):
            rho = math.exp(lp0[i][j] - old[i][j])
            a = adv[i]
            clipped_side = (a > 0 and rho > 1.2) or (a < 0 and rho < 0.8)
            if mask[i][j] and not clipped_side:
                want[i][j] = -a * rho / n
    # token (0, 1): ratio e^0.5 > 1.2 with A > 0 -> 0; token (1, 1): ratio e^-2 < 0.8, A < 0 -> 0
    assert want[0][0] == -2.0 / n and want[0][1] == 0.0 and want[1][1] == 0.0
    torch.testing.assert_close(lp.grad, t(want), rtol=1e-12, atol=1e-15)


def test_seq_mean_gradient_is_eq7_token_advantage():
    """Eq. 7: at rho = 1 each token's gradient is -A_i / |o_i| / B."""
    old = t([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, 0.0, 0.0]])
    lp = old.clone().requires_grad_(True)
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]], torch.bool)
    loss, _ = grpo_loss(lp, old, t([1.0, -3.0]), mask, agg="seq-mean-token-mean")
    loss.backward()
    want = t([[-1 / 4 / 2] * 4, [3 / 2 / 2] * 2 + [0.0, 0.0]])
    torch.testing.assert_close(lp.grad, want, rtol=1e-14, atol=1e-15)


def test_bf16_inputs_are_upcast():
    lp = torch.full((2, 3), -1.0, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, m = grpo_loss(lp, lp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


# --- DAPO dynamic sampling: the group filter


def test_group_has_spread_flags_groups_with_equal_rewards():
    # G = 3: [0.5, 0.5, 0.5] and [1, 1, 1] have no spread; a 1e-12 difference counts as spread
    r = t([0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.2, 0.2, 0.2 + 1e-12])
    assert group_has_spread(r, 3).tolist() == [False, True, False, True]
    assert group_has_spread(r.view(4, 3), 3).tolist() == [False, True, False, True]
    with pytest.raises(ValueError):
        group_has_spread(r, 5)


def test_select_groups_prefers_spread_in_draw_order_and_pads_when_short():
    # batch of 4 (candidates 0-3) + refills 4-7; spread at 1, 3, 4, 6, 7
    spread = torch.tensor([False, True, False, True, True, False, True, True])
    sel = select_groups(spread, 4)
    assert sel.index.tolist() == [1, 3, 4, 6]
    assert (sel.dropped, sel.padded, sel.surplus) == (3, 0, 1)  # groups 0, 2, 5 dropped; 7 not needed
    # only 2 of 5 candidates have spread: keep both, complete with the first zero-spread groups
    sel = select_groups(torch.tensor([False, True, False, False, True]), 4)
    assert sel.index.tolist() == [0, 1, 2, 4]
    assert (sel.dropped, sel.padded, sel.surplus) == (1, 2, 0)
    with pytest.raises(ValueError):
        select_groups(torch.tensor([True]), 2)

"""The PPO update loop as a plain function (egm.rl.ppo), without a Trainer: a toy linear policy whose
accumulated micro-batch gradients are compared with the gradient of the whole mini-batch's loss,
written out by hand and computed in float64 (uneven response lengths, both aggregations, KL and
entropy terms, several mini-batches and epochs, two simulated ranks)."""

from __future__ import annotations

import functools

import pytest
import torch

from egm.rl.grpo import grpo_loss
from egm.rl.ppo import global_normalizer, padding_fraction, ppo_updates, token_micro_batches

B, T, D, V = 6, 5, 4, 7
LENGTHS = torch.tensor([1, 4, 2, 5, 3, 2])


class ToyPolicy:
    """logits = x @ W per response token (``x``: fixed ``(B, T, D)`` features), float64."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        self.ids = torch.randint(0, V, (B, T), generator=g)
        self.mask = (torch.arange(T)[None] < LENGTHS[:, None]).long()
        self.W = torch.randn(D, V, generator=g, dtype=torch.float64, requires_grad=True)
        self.adv = torch.randn(B, generator=g, dtype=torch.float64)
        self.seen: list[list[int]] = []  # the responses of each forward

    def full(self, W=None):
        """``(B, T)`` log-probs and exact entropies of every response token."""
        logits = self.x @ (self.W if W is None else W)
        logp_all = torch.log_softmax(logits, -1)
        return logp_all.gather(-1, self.ids[..., None])[..., 0], -(logp_all.exp() * logp_all).sum(-1)

    def forward(self, idx):
        """The callback: trimmed to the longest response of ``idx``, as Rollout.model_inputs does."""
        self.seen.append(idx.tolist())
        t = int(LENGTHS[idx].max())
        logp, ent = self.full()
        return logp[idx, :t], ent[idx, :t], self.mask[idx, :t]


def reference_loss(pol, idx, W, old=None, ref=None, agg="token-mean", beta=0.0, gamma=0.0, eps=0.2):
    """The negated Eq. 3 objective over the responses ``idx`` at once, by hand."""
    logp, ent = pol.full(W)
    logp, ent, m = logp[idx], ent[idx], pol.mask[idx].double()
    a = pol.adv[idx, None]
    r = torch.exp(logp - (logp.detach() if old is None else old[idx]))
    terms = -torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    if ref is not None:
        x = ref[idx] - logp
        terms = terms + beta * (torch.exp(x) - x - 1)  # k3
    terms = terms - gamma * ent
    if agg == "token-mean":
        return (terms * m).sum() / m.sum()
    return ((terms * m).sum(-1) / m.sum(-1)).mean()


def run(pol, *, mini, micro, epochs=1, old=None, ref=None, lr=0.0, agg="token-mean", beta=0.0, gamma=0.0, **kw):
    grads, flags = [], []

    def step():
        grads.append(pol.W.grad.clone())
        with torch.no_grad():
            pol.W -= lr * pol.W.grad
        pol.W.grad = None

    loss = functools.partial(grpo_loss, clip_eps=0.2, beta=beta, gamma=gamma, agg=agg)
    stats = ppo_updates(pol.forward, loss, pol.mask, pol.adv, old, ref, mini=mini, micro=micro, epochs=epochs,
                        backward=lambda value: value.backward(), optimizer_step=step, agg=agg,
                        begin_micro_batch=flags.append, **kw)
    return stats, grads, flags


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_accumulated_micro_batches_give_the_full_batch_gradient(agg):
    pol = ToyPolicy()
    with torch.no_grad():
        ref = pol.full()[0] + 0.1 * torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W0 = pol.W.detach().clone().requires_grad_(True)
    stats, grads, flags = run(pol, mini=B, micro=4, ref=ref, agg=agg, beta=0.3, gamma=0.05)
    (expected,) = torch.autograd.grad(reference_loss(pol, torch.arange(B), W0, ref=ref, agg=agg, beta=0.3, gamma=0.05), W0)
    assert len(grads) == 1 and stats["optimizer_steps"] == 1
    torch.testing.assert_close(grads[0], expected, rtol=1e-10, atol=1e-12)
    assert flags == [False, True]  # begin_micro_batch: only the last micro-batch closes the step
    assert stats["loss"] == pytest.approx(float(reference_loss(pol, torch.arange(B), W0.detach(), ref=ref, agg=agg,
                                                                beta=0.3, gamma=0.05)), rel=1e-10)
    assert stats["clip_frac"] == 0.0 and abs(stats["ppo_kl"]) < 1e-12  # ratio 1: old = logp.detach()


def test_several_mini_batches_and_epochs_step_on_exactly_what_they_saw():
    """2 epochs x 3 mini-batches of 2 responses, SGD steps: each step's gradient is the hand-written
    clipped loss's over its own responses at the weights of that moment; every epoch sees each
    response once."""
    pol = ToyPolicy(seed=3)
    with torch.no_grad():
        old = pol.full()[0]
    W = pol.W.detach().clone()
    stats, grads, _ = run(pol, mini=2, micro=1, epochs=2, old=old, lr=2.0, seed=5)
    steps = [sum(pol.seen[2 * k:2 * k + 2], []) for k in range(6)]  # micro=1: two forwards per step
    for e in range(2):
        assert sorted(sum(steps[3 * e:3 * e + 3], [])) == list(range(B))
    for k, idx in enumerate(steps):
        Wk = W.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(reference_loss(pol, torch.tensor(idx), Wk, old=old), Wk)
        torch.testing.assert_close(grads[k], g, rtol=1e-9, atol=1e-12)
        W = W - 2.0 * g
    torch.testing.assert_close(pol.W.detach(), W, rtol=1e-9, atol=1e-12)
    assert stats["optimizer_steps"] == 6 and len(stats["minibatch_losses"]) == 6
    assert stats["clip_frac"] > 0  # the SGD steps moved the ratios past 1 +- 0.2


def test_shuffle_moves_whole_groups():
    """``group``: with G = 2 responses per prompt and a mini-batch of one group, every optimiser
    step sees exactly one whole group, and every epoch sees every group once (what the
    shared-prefix forward needs to encode each prompt once per micro-batch)."""
    pol = ToyPolicy(seed=3)
    with torch.no_grad():
        old = pol.full()[0]
    stats, _, _ = run(pol, mini=2, micro=2, epochs=3, old=old, lr=0.5, seed=11, group=2)
    steps = [sorted(s) for s in pol.seen]
    assert stats["optimizer_steps"] == 9 and len(steps) == 9
    assert all(s in ([0, 1], [2, 3], [4, 5]) for s in steps), steps
    for e in range(3):
        assert sorted(sum(steps[3 * e:3 * e + 3], [])) == list(range(B))
    assert len({tuple(map(tuple, steps[3 * e:3 * e + 3])) for e in range(3)}) > 1  # shuffled, not fixed
    pol2 = ToyPolicy(seed=3)
    run(pol2, mini=2, micro=2, epochs=3, old=old, lr=0.5, seed=11)  # group 1: responses mix across prompts
    assert any(sorted(s) not in ([0, 1], [2, 3], [4, 5]) for s in pol2.seen)


def test_two_ranks_average_to_the_global_batch_gradient():
    """Two ranks with different token counts, normalised by the global count over the world
    (reduce_sum) and then averaged as DDP does, give the one-process gradient of the whole batch."""
    pol = ToyPolicy(seed=7)
    W0 = pol.W.detach().clone().requires_grad_(True)
    halves = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])]  # 7 and 10 tokens
    total = float(pol.mask.sum())
    rank_grads = []
    for idx in halves:
        sub = ToyPolicy(seed=7)
        sub.x, sub.ids, sub.mask, sub.adv = pol.x[idx], pol.ids[idx], pol.mask[idx], pol.adv[idx]
        sub.forward = lambda i, sub=sub, idx=idx: _sub_forward(sub, idx, i)
        _, grads, _ = run(sub, mini=3, micro=2, reduce_sum=lambda t: torch.tensor(total), world=2)
        rank_grads.append(grads[0])
    (expected,) = torch.autograd.grad(reference_loss(pol, torch.arange(B), W0), W0)
    torch.testing.assert_close((rank_grads[0] + rank_grads[1]) / 2, expected, rtol=1e-10, atol=1e-12)


def _sub_forward(sub, idx, i):
    t = int(LENGTHS[idx][i].max())
    logp, ent = sub.full()
    return logp[i, :t], ent[i, :t], sub.mask[i, :t]


def test_global_normalizer():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(global_normalizer(mask, "token-mean")) == 3.0
    assert float(global_normalizer(mask, "seq-mean-token-mean")) == 2.0
    assert float(global_normalizer(mask, "token-mean", lambda t: t + 5.0, world=2)) == 4.0  # (3 + 5) / 2
    assert float(global_normalizer(torch.zeros(1, 3), "token-mean", lambda t: t, world=2)) == 0.5  # floor 1/world


@pytest.mark.parametrize("budget", [1, 5, 8, 12, 100])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_token_budget_micro_batches_give_the_full_batch_gradient(agg, budget):
    """Micro-batches packed by token count (sorted by length, any budget: one response each, a few,
    all at once) accumulate exactly the float64 gradient of the whole mini-batch."""
    pol = ToyPolicy(seed=11)
    with torch.no_grad():
        ref = pol.full()[0] + 0.1 * torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    W0 = pol.W.detach().clone().requires_grad_(True)
    stats, grads, flags = run(pol, mini=B, micro=1, ref=ref, agg=agg, beta=0.2, gamma=0.03,
                              split=lambda mb: token_micro_batches(mb, LENGTHS, budget))
    (expected,) = torch.autograd.grad(reference_loss(pol, torch.arange(B), W0, ref=ref, agg=agg, beta=0.2,
                                                     gamma=0.03), W0)
    torch.testing.assert_close(grads[0], expected, rtol=1e-10, atol=1e-12)
    assert sorted(sum(pol.seen, [])) == list(range(B))  # every response once
    assert all(len(s) * int(LENGTHS[s].max()) <= budget or len(s) == 1 for s in pol.seen)
    assert flags[-1] and not any(flags[:-1])


def test_token_micro_batches_pack_sorted_lengths_by_hand():
    lengths = torch.tensor([3, 10, 2, 9, 4, 1])
    got = [b.tolist() for b in token_micro_batches(torch.arange(6), lengths, 20)]
    # sorted: 10 (1), 9 (3), 4 (4), 3 (0), 2 (2), 1 (5); 2 x 10 <= 20; then 4 x 4 <= 20 < 5 x 4
    assert got == [[1, 3], [4, 0, 2, 5]]
    assert [b.tolist() for b in token_micro_batches(torch.tensor([0, 2]), lengths, 1)] == [[0], [2]]
    # padding: [10, 9] -> 2 x 10 = 20 positions for 19 tokens; [4, 3, 2, 1] -> 16 for 10
    assert padding_fraction(lengths, [torch.tensor(b) for b in got]) == pytest.approx(1 - 29 / 36)
    assert padding_fraction(lengths, [torch.arange(6)]) == pytest.approx(1 - 29 / 60)
    with pytest.raises(ValueError, match="max_tokens"):
        token_micro_batches(torch.arange(6), lengths, 0)

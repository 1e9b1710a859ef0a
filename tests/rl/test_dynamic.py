"""DAPO dynamic sampling (egm.rl.dynamic) on hand-made rollouts: which groups, how many refills."""

from __future__ import annotations

import torch

from egm.rl.dynamic import concat_rollouts, dynamic_sampling, take_groups
from egm.generation.rollout import Rollout

G, PAD = 2, 0


def _rollout(names: list[str], lengths: list[int]) -> Rollout:
    """Prompts ``names``, ``G`` responses each; response tokens are ``100 * prompt + response``."""
    n = len(names) * G
    t = max(lengths)
    ids = torch.full((n, t), PAD)
    for i, L in enumerate(lengths):
        ids[i, :L] = 100 * (i // G) + i % G + 1
    lens = torch.tensor(lengths)
    mask = (torch.arange(t)[None] < lens[:, None]).long()
    return Rollout([{"id": x} for x in names], [{"p": x} for x in names], ids, mask, lens,
                   torch.zeros(n, dtype=torch.bool), [f"{names[i // G]}{i % G}" for i in range(n)], G)


def test_concat_and_take_groups_keep_groups_whole_and_pad():
    a, b = _rollout(["a0", "a1"], [1, 3, 2, 2]), _rollout(["b0"], [5, 1])
    ab = concat_rollouts([a, b], PAD)
    assert ab.completion_ids.shape == (6, 5) and ab.completion_mask.sum().item() == 14
    assert ab.completion_ids[1].tolist() == [2, 2, 2, 0, 0]  # a0's 2nd response, padded to 5
    part = take_groups(ab, torch.tensor([0, 2]))  # a0 and b0
    assert [e["id"] for e in part.examples] == ["a0", "b0"] and part.texts == ["a00", "a01", "b00", "b01"]
    assert part.lengths.tolist() == [1, 3, 5, 1] and part.completion_ids.shape == (4, 5)
    assert part.completion_ids[2].tolist() == [1] * 5 and part.prompt_encodings == [{"p": "a0"}, {"p": "b0"}]


def test_dynamic_sampling_drops_zero_spread_and_refills():
    # 4 prompts; groups 0 and 2 have equal rewards -> 2 short, keep rate 1/2 -> ask for 4 prompts
    first = _rollout(["p0", "p1", "p2", "p3"], [1] * 8)
    r0 = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.3, 0.3, 0.9, 0.1])
    calls = []

    def refill(n, round_):
        calls.append((n, round_))
        names = [f"r{round_}_{i}" for i in range(n)]
        # refill groups: r1_0 zero spread, r1_1 spread, r1_2 spread (surplus), r1_3 zero spread
        return _rollout(names, [2] * (n * G)), torch.tensor([0.2, 0.2, 0.0, 1.0, 0.4, 0.6, 0.7, 0.7])

    out = dynamic_sampling(first, r0, refill, max_refill_rounds=3, pad_id=PAD)
    assert calls == [(4, 1)]  # one round filled the batch: the loop stops before round 2
    assert [e["id"] for e in out.rollout.examples] == ["p1", "p3", "r1_1", "r1_2"]
    torch.testing.assert_close(out.rewards, torch.tensor([0.0, 0.5, 0.9, 0.1, 0.0, 1.0, 0.4, 0.6], dtype=torch.float64))
    assert (out.dropped, out.padded, out.rounds, out.refill_prompts, out.refill_tokens) == (4, 0, 1, 4, 16)
    assert len(out.rollout) == 8 and out.rollout.completion_ids.shape == (8, 2)


def test_dynamic_sampling_pads_with_zero_spread_groups_at_the_bound():
    first = _rollout(["p0", "p1", "p2"], [1] * 6)
    r0 = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])  # only p1 has spread: 2 short, keep rate 1/3 -> 3 (= P)
    calls = []

    def refill(n, round_):
        calls.append(n)
        return _rollout([f"r{round_}_{i}" for i in range(n)], [1] * (n * G)), torch.zeros(n * G)  # never spread

    out = dynamic_sampling(first, r0, refill, max_refill_rounds=2, pad_id=PAD)
    # round 1: 2 short, keep rate 1/3 -> ceil(6) capped at P = 3; round 2: keep rate 1/6 -> 3 again
    assert calls == [3, 3]
    assert [e["id"] for e in out.rollout.examples] == ["p0", "p1", "p2"]  # earliest zero-spread groups pad
    assert (out.dropped, out.padded, out.rounds) == (6, 2, 2)


def test_dynamic_sampling_agrees_on_the_largest_request_over_ranks():
    """A full rank still refills when another rank is short (same generate calls on every rank)."""
    first = _rollout(["p0", "p1"], [1] * 4)
    r0 = torch.tensor([0.0, 1.0, 0.2, 0.3])  # this rank: both groups have spread, wants 0
    seen, calls = [], []

    def agree(n):
        seen.append(n)
        return 2 if len(seen) == 1 else n  # the other rank asks for 2 prompts in round 1

    def refill(n, round_):
        calls.append(n)
        return _rollout(["x", "y"], [1] * 4), torch.tensor([0.0, 1.0, 0.0, 1.0])

    out = dynamic_sampling(first, r0, refill, max_refill_rounds=3, pad_id=PAD, agree=agree)
    assert seen == [0, 0] and calls == [2]
    assert [e["id"] for e in out.rollout.examples] == ["p0", "p1"] and out.dropped == 0


def test_no_refill_rounds_leaves_the_batch_as_is():
    first = _rollout(["p0", "p1"], [1] * 4)
    out = dynamic_sampling(first, torch.tensor([1.0, 1.0, 0.0, 1.0]), lambda n, r: 1 / 0, 0, PAD)
    assert out.rollout is not None and [e["id"] for e in out.rollout.examples] == ["p0", "p1"]
    assert (out.dropped, out.padded, out.rounds) == (0, 1, 0)

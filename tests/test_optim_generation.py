import math

import pytest
import torch

from egm.generation.sampling import TABLE5_ROLLOUT, TABLE7_INFERENCE, SamplingParams
from egm.optim import build_optimizer, cosine_with_warmup, verl_cosine_with_warmup


def test_cosine_with_warmup_hand_values():
    # warm-up 4 of 14 steps: 1/4, 2/4, 3/4, 4/4, then cosine over 10 steps.
    assert [cosine_with_warmup(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_with_warmup(4, 4, 14) == 1.0
    assert cosine_with_warmup(9, 4, 14) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_with_warmup(14, 4, 14) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(14, 4, 14, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(0, 0, 1) == 1.0


def test_verl_cosine_hand_values():
    # verl: warm-up 4 of 14 rollout batches from 0: 0, 1/4, 2/4, 3/4, then cosine over 10 batches
    assert [verl_cosine_with_warmup(s, 4, 14) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert verl_cosine_with_warmup(9, 4, 14) == pytest.approx(0.5)  # cos(pi/2): half way
    assert verl_cosine_with_warmup(14, 4, 14) == pytest.approx(0.0, abs=1e-12)
    assert verl_cosine_with_warmup(0, 4, 14, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert verl_cosine_with_warmup(2, 4, 14, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert verl_cosine_with_warmup(14, 4, 14, min_lr_ratio=0.1) == pytest.approx(0.1)


def _lrs(schedule, steps, **kw):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = build_optimizer([p], 3e-6, 0.01, (0.9, 0.999), 30, 120, schedule=schedule, **kw)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):  # the module's order: optimiser step at the current LR, then scheduler step
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_sequences_egm_vs_verl_table5():
    """Table 5: LR 3e-6, 30 warm-up steps. egm starts at 3e-6/30 per optimiser step; verl at 0
    per rollout batch, every optimiser step of a batch sharing its LR."""
    assert _lrs("per_step", 4) == pytest.approx([1e-7, 2e-7, 3e-7, 4e-7], rel=1e-12)
    assert _lrs("verl", 4) == pytest.approx([0.0, 1e-7, 2e-7, 3e-7], rel=1e-12, abs=0)
    # two optimiser steps per rollout batch (mini_batch_size = half the batch)
    assert _lrs("verl", 6, steps_per_batch=2) == pytest.approx([0.0, 0.0, 1e-7, 1e-7, 2e-7, 2e-7], rel=1e-12, abs=0)
    # the peak: egm reaches 3e-6 at optimiser step 29, verl at rollout batch 30
    egm, verl = _lrs("per_step", 32), _lrs("verl", 32)
    assert egm[29] == pytest.approx(3e-6)
    assert verl[29] == pytest.approx(29 / 30 * 3e-6) and verl[30] == pytest.approx(3e-6)
    with pytest.raises(ValueError):
        _lrs("linear", 1)


def test_table5_rollout_columns():
    """Table 5 (rollout): temperature 0.7 / 0.7, top_p 0.9 / 0.7, top_k 50 / -1, max_response_length 1024."""
    q, i = TABLE5_ROLLOUT["qwen3_vl"], TABLE5_ROLLOUT["internvl"]
    assert (q.temperature, q.top_p, q.top_k, q.max_new_tokens, q.repetition_penalty) == (0.7, 0.9, 50, 1024, 1.0)
    assert (i.temperature, i.top_p, i.top_k, i.max_new_tokens, i.repetition_penalty) == (0.7, 0.7, -1, 1024, 1.0)


def test_optimizer_groups_and_schedule_step():
    lin = torch.nn.Linear(3, 2)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    cfg = build_optimizer(list(lin.parameters()) + list(frozen.parameters()), 1e-3, 0.1, (0.9, 0.95), 2, 10)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]  # weight decayed, bias not
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)  # step 0 of a 2-step warm-up
    opt.step(); sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_sampling_params_table7_and_validation():
    kw = TABLE7_INFERENCE.hf_generate_kwargs()
    assert kw["do_sample"] is False and kw["max_new_tokens"] == 4096 and kw["repetition_penalty"] == 1.0
    rl = SamplingParams(temperature=0.7, top_p=0.7, top_k=-1, max_new_tokens=1024)
    kw = rl.hf_generate_kwargs()
    assert kw == {"max_new_tokens": 1024, "repetition_penalty": 1.0, "do_sample": True,
                  "temperature": 0.7, "top_p": 0.7, "top_k": None}
    assert rl.vllm_kwargs()["top_k"] == -1 and rl.vllm_kwargs()["max_tokens"] == 1024
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": 0}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)

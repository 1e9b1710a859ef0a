import math

import pytest
import torch

from egm.generation import TABLE7_INFERENCE, SamplingParams
from egm.optim import build_optimizer, cosine_with_warmup


def test_cosine_with_warmup_hand_values():
    # warm-up 4 of 14 steps: 1/4, 2/4, 3/4, 4/4, then cosine over 10 steps.
    assert [cosine_with_warmup(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_with_warmup(4, 4, 14) == 1.0
    assert cosine_with_warmup(9, 4, 14) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_with_warmup(14, 4, 14) == pytest.approx(0.0, abs=1e-12)
    assert cosine_with_warmup(14, 4, 14, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(0, 0, 1) == 1.0


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

"""GRPO LightningModule (paper Sec. 4.3, Eq. 3-8; settings of Sec. 5.1 and Table 5).

One training batch of ``P`` prompts is one GRPO iteration, wired from separately tested parts:

1. **rollout** -- ``G = n_samples`` responses per prompt (:mod:`egm.rl.rollout`: HF ``generate``
   or colocated vLLM, weights pushed before every rollout);
2. **reward** (Eq. 8) -- ``alpha * IoU + (1 - alpha) * [IoU > 0.5]`` (:func:`egm.reward.reward_from_texts`);
3. **advantage** (Eq. 7) -- group-normalised (:func:`egm.rl.grpo.group_advantages`);
4. **old log-probs** -- the current policy before any update, no grad (skipped when the batch
   is consumed by exactly one optimiser step: then ``old = logp.detach()``, the same numbers);
5. **reference log-probs** -- a frozen copy of the initial policy (with LoRA: the base model under
   ``disable_adapter()``), only when ``beta != 0``;
6. **PPO updates** -- ``ppo_epochs`` passes over mini-batches of ``mini_batch_size`` prompts; each
   mini-batch is one optimiser step accumulated over micro-batches of ``micro_batch_size``
   responses, with the loss normalised by the mini-batch's *global* token count (all ranks), so
   the accumulated gradient equals the full mini-batch gradient; the LR schedule steps per
   optimiser step.

Log-probs always come from the training model (logits / rollout temperature). Dropout is switched
off (as verl does): with identical weights the PPO ratio is then exactly 1.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from egm.generation import SamplingParams
from egm.models.base import GroundingAdapter
from egm.optim import build_optimizer
from egm.reward import reward_from_texts
from egm.rl.grpo import Agg, group_advantages, grpo_loss, sampled_token_entropy
from egm.rl.rollout import HFEngine, Rollout, RolloutEngine, token_logprobs
from egm.rl.vllm_engine import VLLMSettings
from egm.sft import GroundingEvalHooks, GroundingValidation

log = logging.getLogger(__name__)


TABLE5_ROLLOUT = SamplingParams(temperature=0.7, top_p=1.0, top_k=-1, max_new_tokens=1024)


class GRPOModule(GroundingEvalHooks, LightningModule):
    """GRPO with the grounding reward for any :class:`~egm.models.base.GroundingAdapter` model.

    Args:
        adapter: model family adapter (checkpoint = the SFT export, dtype, LoRA, ...).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW + cosine (Table 5: LR 3e-6,
            30 warm-up steps, cosine).
        n_samples: ``G``, responses per prompt (Table 5: n_samples 16).
        rollout: rollout sampling (Table 5: temperature 0.7, top_p 0.9/0.7, top_k 50/-1,
            max_response_length 1024).
        clip_eps: PPO clip ratio epsilon (0.2). beta: KL weight (Qwen 0.005, InternVL 0).
        gamma: entropy weight (Qwen 0, InternVL 0.01). alpha: reward weight (0.5).
        agg: ``"token-mean"`` (paper: token-level mean loss) or ``"seq-mean-token-mean"`` (Eq. 3/7).
        entropy: ``"exact"`` (full-distribution entropy, verl) or ``"sampled"`` (Eq. 6 literally).
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: prompts per optimiser step (``None``: the whole batch, one step per epoch).
        micro_batch_size: responses per forward/backward (gradient accumulation inside a step).
        max_grad_norm: gradient clipping (``None``: off; DeepSpeed clips through its own config).
        engine: ``"hf"`` (``model.generate``) or ``"vllm"`` (colocated, GPU).
        rollout_batch_size: responses per HF ``generate`` call (``None``: all at once).
        vllm: vLLM engine settings (``engine: vllm`` only).
        val_sampling: validation decoding (Table 7: greedy).
        export_dir: Hugging Face export at the end of ``fit`` (``None``: none).
        seed: rollout seed (combined with step and rank).
    """

    def __init__(
        self,
        adapter: GroundingAdapter,
        lr: float = 3e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.0,
        n_samples: int = 16,
        rollout: SamplingParams = TABLE5_ROLLOUT,
        clip_eps: float = 0.2,
        beta: float = 0.0,
        gamma: float = 0.0,
        alpha: float = 0.5,
        agg: Agg = "token-mean",
        entropy: Literal["exact", "sampled"] = "exact",
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 8,
        max_grad_norm: float | None = 1.0,
        engine: Literal["hf", "vllm"] = "hf",
        rollout_batch_size: int | None = None,
        vllm: VLLMSettings | None = None,
        val_sampling: SamplingParams = SamplingParams(),
        export_dir: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        rollout, val_sampling = _sampling(rollout), _sampling(val_sampling)  # a YAML mapping also works
        vllm = VLLMSettings(**vllm) if isinstance(vllm, dict) else vllm
        if n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 (group-relative advantages), got {n_samples}")
        if ppo_epochs < 1 or micro_batch_size < 1 or (mini_batch_size is not None and mini_batch_size < 1):
            raise ValueError("ppo_epochs, micro_batch_size and mini_batch_size must be >= 1")
        if rollout.greedy:
            raise ValueError("rollout.temperature must be > 0: GRPO needs different samples per group")
        self.save_hyperparameters(ignore=["adapter"])
        self.automatic_optimization = False
        self.adapter = adapter
        self.rollout, self.vllm_settings = rollout, vllm
        self.model: torch.nn.Module | None = None
        self.engine: RolloutEngine | None = None
        self.validation = GroundingValidation(self, val_sampling)
        self.last_stats: dict[str, Any] = {}  # numbers of the last training step (tests, debugging)
        object.__setattr__(self, "ref_model", None)  # not a submodule: never checkpointed or optimised

    # -- model -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.adapter.load_model()
        _no_dropout(self.model)
        self.model.train()  # from_pretrained returns eval mode; gradient checkpointing needs train mode
        if self.hparams.beta != 0.0 and self.adapter.lora is None:
            ref = self.adapter.load_model().eval()  # same checkpoint = the initial policy
            for p in ref.parameters():
                p.requires_grad_(False)
            object.__setattr__(self, "ref_model", ref)

    def collate_fn(self, stage: str):
        """Train: the examples themselves (rollouts need samples + images); eval: as SFT."""
        if stage == "train":
            return lambda examples: {"examples": list(examples)}

        def collate_eval(examples):
            return {"inputs": self.adapter.collate_generate(examples),
                    "examples": [{"sample": ex["sample"]} for ex in examples]}

        return collate_eval

    def build_engine(self) -> RolloutEngine:
        h = self.hparams
        if h.engine == "hf":
            return HFEngine(self.adapter, self.model, h.rollout_batch_size)
        if h.engine == "vllm":
            from dataclasses import asdict

            from egm.rl.vllm_engine import VLLMEngine

            t = self.trainer
            return VLLMEngine(self.adapter, **asdict(self.vllm_settings or VLLMSettings()), rank=t.global_rank,
                              local_rank=t.local_rank, world_size=t.world_size)
        raise ValueError(f"engine must be 'hf' or 'vllm', got {h.engine!r}")

    def on_fit_start(self) -> None:
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        if self.engine is None:
            self.engine = self.build_engine()

    # -- optimiser -------------------------------------------------------------------------
    def steps_per_batch(self, prompts: int) -> int:
        mini = self.hparams.mini_batch_size or prompts
        return self.hparams.ppo_epochs * math.ceil(prompts / mini)

    def configure_optimizers(self):
        h = self.hparams
        batches = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        prompts = getattr(getattr(self._trainer, "datamodule", None), "batch_size", None) or 1
        total = batches * self.steps_per_batch(prompts)
        return build_optimizer(self.model.parameters(), h.lr, h.weight_decay, tuple(h.betas),
                               h.warmup_steps, total, h.min_lr_ratio)

    # -- log-probs -------------------------------------------------------------------------
    def _forward_logp(self, model, ro: Rollout, idx, with_entropy=False, entropy_grad=False):
        inputs, comp, mask = ro.model_inputs(self.adapter, idx, self.device)
        logp, ent = token_logprobs(model, inputs, comp, self.rollout.temperature, with_entropy, entropy_grad)
        return logp, ent, comp, mask

    @torch.no_grad()
    def score(self, ro: Rollout, reference: bool = False) -> torch.Tensor:
        """``(B, T)`` log-probs of all responses under the policy (or the frozen reference)."""
        out = torch.zeros(ro.completion_ids.shape, dtype=torch.float32, device=self.device)
        model, ctx = self.model, contextlib.nullcontext()
        if reference:
            if self.ref_model is not None:
                model = self.ref_model
            else:  # LoRA: the base model is the initial policy
                ctx = self.model.disable_adapter()
        with ctx:
            for idx in torch.arange(len(ro)).split(self.hparams.micro_batch_size):
                logp, _, comp, _ = self._forward_logp(model, ro, idx)
                out[idx.to(self.device), :comp.shape[1]] = logp
        return out

    # -- training --------------------------------------------------------------------------
    def rollout_seed(self) -> int:
        return (self.hparams.seed * 1_000_003 + self.global_step * 7919 + self.global_rank) % (2**31)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        h = self.hparams
        examples, G = batch["examples"], h.n_samples
        clock = _Clock()
        self.engine.update_weights(self.model)
        ro = self.engine.generate(examples, G, self.rollout, seed=self.rollout_seed())
        clock.lap("rollout")

        samples = [ex["sample"] for ex in examples]
        rew = reward_from_texts(ro.texts, [s.box for s in samples for _ in range(G)],
                                [(s.width, s.height) for s in samples for _ in range(G)],
                                family=self.adapter.family, alpha=h.alpha)
        adv, zero_spread = group_advantages(torch.as_tensor(rew.rewards, dtype=torch.float32), G)
        adv = adv.to(self.device)
        clock.lap("reward")

        P = len(examples)
        mini = (h.mini_batch_size or P) * G  # responses per optimiser step
        n_steps = self.steps_per_batch(P)
        old = None if n_steps == 1 else self.score(ro)
        clock.lap("old_logp")
        ref = self.score(ro, reference=True) if h.beta != 0.0 else None
        clock.lap("ref")

        stats = self._ppo_updates(ro, adv, old, ref, mini)
        clock.lap("update")

        lengths = ro.lengths.float()
        logs = {**rew.metrics("train/reward/"),
                "train/response_len": lengths.mean().item(),
                "train/response_len_max": lengths.max().item(),
                "train/truncated_frac": ro.truncated.float().mean().item(),
                "train/zero_spread_frac": float(zero_spread),
                "train/rollout_tokens_per_s": ro.num_tokens / max(clock.t["rollout"], 1e-9),
                "train/lr": self.lr_schedulers().get_last_lr()[0],
                **{f"train/{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
                **{f"time/{k}_s": v for k, v in clock.t.items()},
                **{f"time/{k}_frac": v / max(clock.total, 1e-9) for k, v in clock.t.items()}}
        # each rank rolled out its own prompts (whole groups): reduce the metrics over ranks
        sync = self.trainer.world_size > 1 if self._trainer else False
        maxed = {k: logs.pop(k) for k in ("train/response_len_max",)}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=P, sync_dist=sync)
        self.log_dict(maxed, on_step=True, on_epoch=False, batch_size=P, sync_dist=sync, reduce_fx="max")
        self.log("train/reward", logs["train/reward/mean"], prog_bar=True, batch_size=P, sync_dist=sync)
        logs.update(maxed)
        self.last_stats = {**logs, **stats, "advantages": adv.cpu(), "lengths": ro.lengths,
                           "rewards": torch.as_tensor(rew.rewards)}

    def _ppo_updates(self, ro: Rollout, adv, old, ref, mini: int) -> dict[str, Any]:
        """``ppo_epochs`` x mini-batches of optimiser steps; returns averaged loss metrics."""
        h = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        mask_all = ro.completion_mask
        gen = torch.Generator().manual_seed(self.rollout_seed())
        B = len(ro)
        shuffle = h.ppo_epochs > 1 or mini < B
        sums: dict[str, float] = defaultdict(float)
        mb_losses: list[float] = []
        first_mb: dict[str, float] = {}
        exact_grad = h.gamma != 0.0 and h.entropy == "exact"
        for _ in range(h.ppo_epochs):
            order = torch.randperm(B, generator=gen) if shuffle else torch.arange(B)
            for mb in order.split(mini):
                normalizer = self._global_normalizer(mask_all[mb])
                mb_sums: dict[str, float] = defaultdict(float)
                for mc in mb.split(h.micro_batch_size):
                    logp, ent, comp, mask = self._forward_logp(self.model, ro, mc, True, exact_grad)
                    if h.entropy == "sampled":
                        ent = sampled_token_entropy(logp)
                    t, dmc = comp.shape[1], mc.to(self.device)
                    loss, m = grpo_loss(logp, logp.detach() if old is None else old[dmc, :t], adv[dmc], mask,
                                        None if ref is None else ref[dmc, :t], ent, h.clip_eps, h.beta, h.gamma,
                                        h.agg, normalizer=normalizer)
                    self.manual_backward(loss)
                    ntok = float(m["num_tokens"])
                    mb_sums["loss"] += float(loss.detach())
                    mb_sums["tokens"] += ntok
                    for k in ("clip_frac", "ppo_kl"):
                        mb_sums[k] += float(m[k]) * ntok
                    for k in ("pg_loss", "kl", "entropy"):  # already normalised by the mini-batch
                        if k in m:
                            mb_sums[k] += float(m[k])
                if h.max_grad_norm is not None:
                    self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                tok = max(mb_sums["tokens"], 1.0)
                mb_stats = {"loss": mb_sums["loss"], "pg_loss": mb_sums["pg_loss"],
                            "clip_frac": mb_sums["clip_frac"] / tok, "ppo_kl": mb_sums["ppo_kl"] / tok,
                            **{k: mb_sums[k] for k in ("kl", "entropy") if k in mb_sums}}
                first_mb = first_mb or mb_stats
                mb_losses.append(mb_sums["loss"])
                for k, v in mb_stats.items():
                    sums[k] += v
        n = max(len(mb_losses), 1)
        out: dict[str, Any] = {k: v / n for k, v in sums.items()}
        out["optimizer_steps"] = len(mb_losses)
        out["minibatch_losses"] = mb_losses
        out["first_minibatch"] = first_mb
        return out

    def _global_normalizer(self, mask: torch.Tensor) -> torch.Tensor:
        """Mini-batch denominator over all ranks / world size (DDP then averages gradients)."""
        local = mask.sum() if self.hparams.agg == "token-mean" else torch.tensor(mask.shape[0])
        local = local.to(self.device, torch.float32)
        world = self.trainer.world_size if self._trainer else 1
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum") if world > 1 else local
        return (total / world).clamp_min(1.0 / world)


def _sampling(p: SamplingParams | dict) -> SamplingParams:
    return SamplingParams(**p) if isinstance(p, dict) else p


def _no_dropout(model: torch.nn.Module) -> None:
    """RL forwards run without dropout (verl disables it), so old and new log-probs agree."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class _Clock:
    """Wall-clock laps of the step's phases (rollout / reward / old_logp / ref / update)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.t[name] = self.t.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.t.values())

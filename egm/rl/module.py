"""GRPO LightningModule (paper Sec. 4.3, Eq. 3-8; settings of Sec. 5.1 and Table 5).

One training batch of ``P`` prompts is one GRPO iteration, wired from separately tested parts:

1. **rollout** -- ``G = n_samples`` responses per prompt (:mod:`egm.generation`: HF ``generate``
   or colocated vLLM, weights pushed before every rollout; :func:`egm.generation.engines.build_engine`);
2. **reward** (Eq. 8) -- ``alpha * IoU + (1 - alpha) * [IoU > 0.5]`` (:func:`egm.reward.reward_from_texts`,
   answers parsed by the adapter's own ``parse``);
3. **advantage** (Eq. 7) -- group-normalised (:func:`egm.rl.grpo.group_advantages`);
4. **old log-probs** -- the current policy before any update, no grad (skipped when the batch
   is consumed by exactly one optimiser step: then ``old = logp.detach()``, the same numbers);
5. **reference log-probs** -- a frozen copy of the initial policy (with LoRA: the base model under
   ``disable_adapter()``), only when ``beta != 0``;
6. **PPO updates** (:func:`egm.rl.ppo.ppo_updates`) -- ``ppo_epochs`` passes over mini-batches of ``mini_batch_size`` prompts; each
   mini-batch is one optimiser step accumulated over micro-batches of ``micro_batch_size``
   responses, with the loss normalised by the mini-batch's *global* token count (all ranks), so
   the accumulated gradient equals the full mini-batch gradient; the LR schedule steps per
   optimiser step (``lr_schedule="per_step"``) or as verl, per rollout batch from LR 0
   (``"verl"``, :func:`egm.optim.verl_cosine_with_warmup`).

Optional DAPO dynamic sampling (``dynamic_sampling``, off by default) sits between 2 and 3: groups
whose ``G`` rewards are all equal are dropped and replaced by groups of fresh prompts
(:mod:`egm.rl.dynamic`).

Log-probs always come from the training model (logits / rollout temperature). Every dropout is
switched off, HF attention dropout included (:func:`egm.models.base.disable_dropout`), so that
with identical weights the PPO ratio is exactly 1. verl gets there differently: it scores old log-probs in
``eval()`` and updates in ``train()`` mode, which is dropout-free only because the released
Qwen3-VL / InternVL3 configs set their dropouts to 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from egm.config_checks import GRPO_RULES, check_ranges
from egm.errors import InputError
from egm.generation.engines import build_engine
from egm.generation.rollout import Rollout, RolloutEngine
from egm.generation.sampling import TABLE5_ROLLOUT, SamplingParams
from egm.generation.vllm import VLLMSettings
from egm.models.base import GroundingAdapter, disable_dropout
from egm.optim import build_optimizer
from egm.reward import reward_from_texts
from egm.rl.dynamic import dynamic_sampling as dapo_dynamic_sampling
from egm.rl.grpo import Agg, group_advantages, grpo_loss, sampled_token_entropy
from egm.models.head import DEFAULT_CHUNK_TOKENS
from egm.rl.ppo import ppo_updates, token_logprobs, token_micro_batches
from egm.rl.prefix import prefix_micro_batches, shared_prefix_logprobs, shared_prefix_support, use_split_attention
from egm.strategies import begin_micro_batch
from egm.timing import PhaseClock
from egm.validation import GroundingEvalHooks, GroundingValidation

log = logging.getLogger(__name__)


@dataclass
class ReferencePolicy:
    """Holds the frozen initial policy of the KL term (Eq. 5), or ``None`` (``beta == 0``, or LoRA,
    where the base model under ``disable_adapter()`` is the reference).

    A plain object rather than an ``nn.Module`` attribute: a LightningModule registers every module
    it is given as a submodule, which would checkpoint, optimise and DDP/DeepSpeed-wrap the
    reference; what this holder holds stays outside the module tree.
    """

    model: torch.nn.Module | None = None


class GRPOModule(GroundingEvalHooks, LightningModule):
    """GRPO with the grounding reward for any :class:`~egm.models.base.GroundingAdapter` model.

    Args:
        adapter: model family adapter (checkpoint = the SFT export, dtype, LoRA, ...).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW + cosine (Table 5: LR 3e-6,
            30 warm-up steps, cosine). Table 5 gives no weight decay, so the paper ran verl's
            AdamW default, 0.01 (the default here too; verl decays every parameter, egm skips
            biases and norms, see :func:`egm.optim.build_optimizer`).
        lr_schedule: ``"per_step"``: the cosine steps per optimiser step and starts at
            ``lr / warmup_steps``; ``"verl"``: steps once per rollout batch and starts at LR 0
            (verl's ``get_cosine_schedule_with_warmup``). The same when each rollout batch is one
            optimiser step (Table 5's reading) except for that start: a one-step shift.
        n_samples: ``G``, responses per prompt (Table 5: n_samples 16).
        rollout: rollout sampling; ``None``: Table 5's column for the adapter's family
            (:data:`egm.generation.sampling.TABLE5_ROLLOUT`), with a warning, since a recipe should state it.
        clip_eps: PPO clip ratio epsilon (0.2). beta: KL weight (Qwen 0.005, InternVL 0).
        gamma: entropy weight (Qwen 0, InternVL 0.01). alpha: reward weight (0.5).
        agg: ``"token-mean"`` (paper: token-level mean loss) or ``"seq-mean-token-mean"`` (Eq. 3/7).
        entropy: ``"exact"`` (full-distribution entropy, verl) or ``"sampled"`` (Eq. 6 literally).
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: prompts per optimiser step *on each rank*, like the datamodule's
            ``batch_size`` (``None``: the rank's whole batch, one step per epoch). verl's
            ``ppo_mini_batch_size`` counts prompts over all ranks, so it is ``mini_batch_size x
            world size``; verl's default 256 with Table 5's batch size 256 is one optimiser step
            per rollout batch.
        micro_batch_size: responses per forward/backward (gradient accumulation inside a step; memory
            only, the loss is normalised by the mini-batch's global token count). Table 5's "per
            device train batch size 32" is verl's ``ppo_micro_batch_size_per_gpu``, this knob.
        micro_batch_tokens: instead of ``micro_batch_size``, micro-batches of at most this many
            padded (prompt + response) tokens, responses sorted by length
            (:func:`egm.rl.ppo.token_micro_batches`; verl's ``use_dynamic_bsz`` +
            ``ppo_max_token_len_per_gpu``). Also used by the old/reference log-prob passes.
        logprob_chunk_tokens: response tokens per chunk of the vocabulary projection
            (:mod:`egm.models.head`): the head's peak memory is about three float32
            ``chunk x V`` buffers, whatever the micro-batch.
        max_grad_norm: gradient clipping (``None``: off; DeepSpeed clips through its own config).
        engine: ``"hf"`` (``model.generate``) or ``"vllm"`` (colocated, GPU).
        rollout_batch_size: responses per HF ``generate`` call (``None``: all at once).
        vllm: vLLM engine settings (``engine: vllm`` only).
        val_sampling: validation decoding (Table 7: greedy).
        export_dir: Hugging Face export at the end of ``fit`` (``None``: none).
        seed: rollout seed (combined with step and rank).
        dynamic_sampling: DAPO dynamic sampling (off: the paper's GRPO). Groups whose rewards have
            zero spread are dropped and the batch refilled with fresh prompts drawn from the
            training set (:mod:`egm.rl.dynamic`), at most ``max_refill_rounds`` rounds; a batch
            still short is completed with zero-spread groups. Logged as ``train/dynamic/*``.
        shared_prefix: old, reference and current log-probs from one row per prompt,
            ``[prompt, c_1, ..., c_G]``: each group's image and prompt encoded once per micro-batch
            (:mod:`egm.rl.prefix`; same numbers as per response). Attention implementations that
            cannot take its mask (FlashAttention) fall back to per response, with a warning.
        prefix_attention: how completions are kept apart in a shared-prefix row: ``"split"``
            (default; SDPA over the prompt, then each completion over ``[prompt ; itself]``,
            :func:`egm.rl.prefix.split_prefix_attention`) or ``"mask"`` (one dense ``L x L`` mask
            per row). Split needs SDPA; with eager attention the dense mask is used (logged).
    """

    def __init__(
        self,
        adapter: GroundingAdapter,
        lr: float = 3e-6,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 30,
        min_lr_ratio: float = 0.0,
        lr_schedule: Literal["per_step", "verl"] = "per_step",
        n_samples: int = 16,
        rollout: SamplingParams | None = None,
        clip_eps: float = 0.2,
        beta: float = 0.0,
        gamma: float = 0.0,
        alpha: float = 0.5,
        agg: Agg = "token-mean",
        entropy: Literal["exact", "sampled"] = "exact",
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 8,
        micro_batch_tokens: int | None = None,
        logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        max_grad_norm: float | None = 1.0,
        engine: Literal["hf", "vllm"] = "hf",
        rollout_batch_size: int | None = None,
        vllm: VLLMSettings | None = None,
        val_sampling: SamplingParams = SamplingParams(),
        export_dir: str | None = None,
        seed: int = 0,
        dynamic_sampling: bool = False,
        max_refill_rounds: int = 2,
        shared_prefix: bool = True,
        prefix_attention: Literal["split", "mask"] = "split",
    ):
        check_ranges("GRPOModule", locals(), GRPO_RULES)  # before any model loads (egm.config_checks)
        super().__init__()
        rollout = table5_rollout(adapter.family) if rollout is None else rollout
        rollout, val_sampling = _sampling(rollout), _sampling(val_sampling)  # a YAML mapping also works
        vllm = VLLMSettings(**vllm) if isinstance(vllm, dict) else vllm
        if n_samples < 2:
            raise InputError(f"n_samples must be >= 2 (group-relative advantages), got {n_samples}")
        if ppo_epochs < 1 or micro_batch_size < 1 or (mini_batch_size is not None and mini_batch_size < 1):
            raise InputError("ppo_epochs, micro_batch_size and mini_batch_size must be >= 1")
        if rollout.greedy:
            raise InputError("rollout.temperature must be > 0: GRPO needs different samples per group")
        if weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {weight_decay}")
        if lr_schedule not in ("per_step", "verl"):
            raise InputError(f"lr_schedule must be 'per_step' or 'verl', got {lr_schedule!r}")
        if prefix_attention not in ("split", "mask"):
            raise InputError(f"prefix_attention must be 'split' or 'mask', got {prefix_attention!r}")
        if max_refill_rounds < 0:
            raise InputError(f"max_refill_rounds must be >= 0, got {max_refill_rounds}")
        self.save_hyperparameters(ignore=["adapter"])
        self.hparams["rollout"] = rollout  # the resolved settings, also when the family default applied
        self.automatic_optimization = False
        self.adapter = adapter
        self.rollout, self.vllm_settings = rollout, vllm
        self.model: torch.nn.Module | None = None
        self.engine: RolloutEngine | None = None
        self.validation = GroundingValidation(self, val_sampling)
        self.last_stats: dict[str, Any] = {}  # numbers of the last training step (tests, debugging)
        self.reference = ReferencePolicy()
        self.shared_prefix = shared_prefix  # off when the model's attention cannot take its mask

    # -- model -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.load_policy()
        disable_dropout(self.model)
        reason = shared_prefix_support(self.model) if self.shared_prefix else None
        if reason is not None:
            log.warning("shared_prefix off, log-probs computed per response: %s", reason)
            self.shared_prefix = False
        self.model.train()  # from_pretrained returns eval mode; gradient checkpointing needs train mode
        if self.hparams.beta != 0.0 and self.adapter.lora is None:
            ref = self.adapter.load_model().eval()  # same checkpoint = the initial policy
            for p in ref.parameters():
                p.requires_grad_(False)
            self.reference.model = ref
        if self.shared_prefix and self.hparams.prefix_attention == "split":
            for model in filter(None, (self.model, self.reference.model)):
                reason = use_split_attention(model)
                if reason is not None:
                    log.info("shared_prefix: dense attention mask: %s", reason)

    def collate_fn(self, stage: str):
        """Train: the examples themselves (rollouts need samples + images); eval: as SFT."""
        if stage == "train":
            return lambda examples: {"examples": list(examples)}

        return self.collate_eval

    def on_fit_start(self) -> None:
        if self.reference.model is not None:
            self.reference.model.to(self.device)
        if self.engine is None:  # tests may set their own engine first
            t = self.trainer
            self.engine = build_engine(self.hparams.engine, self.adapter, self.model, self.hparams.rollout_batch_size,
                                       self.vllm_settings, t.global_rank, t.local_rank, t.world_size)

    # -- optimiser -------------------------------------------------------------------------
    def steps_per_batch(self, prompts: int) -> int:
        mini = self.hparams.mini_batch_size or prompts
        return self.hparams.ppo_epochs * math.ceil(prompts / mini)

    def configure_optimizers(self):
        h = self.hparams
        batches = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        prompts = getattr(getattr(self._trainer, "datamodule", None), "batch_size", None) or 1
        k = self.steps_per_batch(prompts)
        verl = h.lr_schedule == "verl"  # verl: the schedule counts rollout batches
        return build_optimizer(self.model.parameters(), h.lr, h.weight_decay, tuple(h.betas), h.warmup_steps,
                               batches if verl else batches * k, h.min_lr_ratio,
                               schedule="verl" if verl else "per_step", steps_per_batch=k)

    # -- log-probs -------------------------------------------------------------------------
    def _forward_logp(self, model, ro: Rollout, idx, with_entropy=False, entropy_grad=False):
        if self.shared_prefix:
            return shared_prefix_logprobs(model, self.adapter, ro, idx, self.rollout.temperature, with_entropy,
                                          entropy_grad, self.device, self.hparams.logprob_chunk_tokens)
        inputs, comp, mask = ro.model_inputs(self.adapter, idx, self.device)
        logp, ent = token_logprobs(model, inputs, comp, self.rollout.temperature, with_entropy, entropy_grad,
                                   completion_mask=mask, chunk_tokens=self.hparams.logprob_chunk_tokens)
        return logp, ent, comp, mask

    def micro_batches(self, ro: Rollout, idx: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The responses ``idx`` (default: all) in micro-batches: by count, or by tokens."""
        idx = torch.arange(len(ro)) if idx is None else idx
        if self.shared_prefix:  # groups kept together, cost counted as packed
            return prefix_micro_batches(ro, idx, self.hparams.micro_batch_tokens,
                                        self.hparams.micro_batch_size if self.hparams.micro_batch_tokens is None else None)
        if self.hparams.micro_batch_tokens is None:
            return list(idx.split(self.hparams.micro_batch_size))
        return token_micro_batches(idx, ro.sequence_lengths, self.hparams.micro_batch_tokens)

    @torch.no_grad()
    def score(self, ro: Rollout, reference: bool = False) -> torch.Tensor:
        """``(B, T)`` log-probs of all responses under the policy (or the frozen reference)."""
        out = torch.zeros(ro.completion_ids.shape, dtype=torch.float32, device=self.device)
        model, ctx = self.model, contextlib.nullcontext()
        if reference:
            if self.reference.model is not None:
                model = self.reference.model
            else:  # LoRA: the base model is the initial policy
                ctx = self.model.disable_adapter()
        with ctx:
            for idx in self.micro_batches(ro):
                logp, _, comp, _ = self._forward_logp(model, ro, idx)
                out[idx.to(self.device), :comp.shape[1]] = logp
        return out

    # -- training --------------------------------------------------------------------------
    def rollout_seed(self) -> int:
        return (self.hparams.seed * 1_000_003 + self.global_step * 7919 + self.global_rank) % (2**31)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        h = self.hparams
        examples, G = batch["examples"], h.n_samples
        clock = PhaseClock()
        self.engine.update_weights(self.model)
        ro = self.engine.generate(examples, G, self.rollout, seed=self.rollout_seed())
        clock.lap("rollout")

        rew = self.rewards(ro)  # logged on the batch's own prompts, dynamic sampling or not
        rewards = torch.as_tensor(rew.rewards, dtype=torch.float32)
        _, zero_spread = group_advantages(rewards, G)
        clock.lap("reward")
        dyn_logs: dict[str, float] = {}
        if h.dynamic_sampling:
            dyn = dapo_dynamic_sampling(ro, rewards, self._refill, h.max_refill_rounds, self.adapter.pad_token_id,
                                        agree=self._max_over_ranks)
            ro, rewards = dyn.rollout, dyn.rewards.float()
            clock.lap("refill")
            dyn_logs = {"train/dynamic/dropped_groups": float(dyn.dropped),
                        "train/dynamic/padded_groups": float(dyn.padded),
                        "train/dynamic/refill_rounds": float(dyn.rounds),
                        "train/dynamic/refill_prompts": float(dyn.refill_prompts),
                        "train/dynamic/refill_tokens_per_s": dyn.refill_tokens / max(clock.t["refill"], 1e-9)}
        adv, _ = group_advantages(rewards, G)
        adv = adv.to(self.device)

        P = len(examples)
        mini = (h.mini_batch_size or P) * G  # responses per optimiser step
        n_steps = self.steps_per_batch(P)
        old = None if n_steps == 1 else self.score(ro)
        clock.lap("old_logp")
        ref = self.score(ro, reference=True) if h.beta != 0.0 else None
        clock.lap("ref")

        stats = self.ppo_updates(ro, adv, old, ref, mini)
        clock.lap("update")

        lengths = ro.lengths.float()
        logs = {**rew.metrics("train/reward/"),
                "train/response_len": lengths.mean().item(),
                "train/response_len_max": lengths.max().item(),
                "train/truncated_frac": ro.truncated.float().mean().item(),
                "train/zero_spread_frac": float(zero_spread),
                **dyn_logs,
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
        self.last_stats = {**logs, **stats, "advantages": adv.cpu(), "lengths": ro.lengths, "rewards": rewards,
                           "examples": ro.examples}

    def rewards(self, ro: Rollout):
        """Eq. 8 for every response of ``ro`` against its prompt's box (``RewardOutput``)."""
        G, samples = ro.group_size, [ex["sample"] for ex in ro.examples]
        return reward_from_texts(ro.texts, [s.box for s in samples for _ in range(G)],
                                 [(s.width, s.height) for s in samples for _ in range(G)],
                                 parse=self.adapter.parse, alpha=self.hparams.alpha)

    # -- DAPO dynamic sampling -------------------------------------------------------------
    def refill_examples(self, n: int, round_: int) -> list[dict[str, Any]]:
        """``n`` fresh prompts for a refill: drawn without replacement from the training set.

        Outside Lightning's dataloader iterator (the epoch still visits every prompt once); seeded
        by (seed, step, rank, round), so a resumed run draws the same prompts.
        """
        ds = self.trainer.train_dataloader.dataset
        gen = torch.Generator().manual_seed(self.rollout_seed() * 31 + round_)
        return [ds[int(i)] for i in torch.randperm(len(ds), generator=gen)[:n]]

    def _refill(self, n: int, round_: int) -> tuple[Rollout, torch.Tensor]:
        examples = self.refill_examples(n, round_)
        ro = self.engine.generate(examples, self.hparams.n_samples, self.rollout,
                                  seed=(self.rollout_seed() + 104_729 * round_) % (2**31))
        return ro, torch.as_tensor(self.rewards(ro).rewards)

    def _max_over_ranks(self, n: int) -> int:
        """The largest refill request over ranks: every rank rolls out in the same rounds."""
        if not self._trainer or self.trainer.world_size == 1:
            return n
        t = torch.tensor(float(n), device=self.device)
        return int(self.trainer.strategy.reduce(t, reduce_op="max"))

    def ppo_updates(self, ro: Rollout, adv: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
                    mini: int) -> dict[str, Any]:
        """:func:`egm.rl.ppo.ppo_updates` wired to this module's model, optimiser and ranks."""
        h = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()

        exact_grad = h.gamma != 0.0 and h.entropy == "exact"  # else the entropy is only logged

        def forward(idx: torch.Tensor):
            logp, ent, _, mask = self._forward_logp(self.model, ro, idx, True, exact_grad)
            return logp, sampled_token_entropy(logp) if h.entropy == "sampled" else ent, mask

        def optimizer_step() -> None:
            if h.max_grad_norm is not None:
                self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()

        world = self.trainer.world_size if self._trainer else 1
        loss = functools.partial(grpo_loss, clip_eps=h.clip_eps, beta=h.beta, gamma=h.gamma, agg=h.agg)
        return ppo_updates(forward, loss, ro.completion_mask, adv, old, ref, mini=mini, micro=h.micro_batch_size,
                           backward=self.manual_backward, optimizer_step=optimizer_step, epochs=h.ppo_epochs,
                           agg=h.agg, seed=self.rollout_seed(),
                           begin_micro_batch=lambda last: begin_micro_batch(self._trainer, last),
                           reduce_sum=lambda t: self.trainer.strategy.reduce(t, reduce_op="sum"), world=world,
                           split=functools.partial(self.micro_batches, ro), group=h.n_samples)


def _sampling(p: SamplingParams | dict) -> SamplingParams:
    return SamplingParams(**p) if isinstance(p, dict) else p


def table5_rollout(family: str) -> SamplingParams:
    """Table 5's rollout column for ``family``, with a warning: recipes should state their rollout."""
    if family not in TABLE5_ROLLOUT:
        raise InputError(f"model.rollout is not set and Table 5 has no rollout column for family {family!r}; "
                         f"set model.init_args.rollout (families with defaults: {sorted(TABLE5_ROLLOUT)})")
    p = dataclasses.replace(TABLE5_ROLLOUT[family])  # a copy: the table is shared
    warnings.warn(f"model.rollout is not set: using Table 5's {family} rollout column {p}; state it in the "
                  f"config (model.init_args.rollout) to silence this", UserWarning, stacklevel=3)
    return p

"""The PPO update of one GRPO rollout batch, as a plain function (paper Sec. 4.3, Table 5).

:func:`ppo_updates` runs ``epochs`` passes over the batch's ``B`` responses in mini-batches of
``mini`` responses; each mini-batch is one optimiser step, its gradient accumulated over
micro-batches of ``micro`` responses (memory only). Every micro-batch loss is divided by the
*mini-batch's* normaliser (:func:`global_normalizer`: its token count, or sequence count, summed
over all ranks and divided by the world size, since DDP/DeepSpeed then average the ranks'
gradients), so the accumulated gradient equals that of the whole global mini-batch at once,
whatever the micro-batch split or the ranks' response lengths.

The caller supplies the model side as callables, so the loop runs without a ``Trainer``
(``tests/rl/test_ppo.py`` checks it against a float64 reference on a toy policy):

* ``forward(idx) -> (logp, entropy, mask)``: ``(b, t)`` log-probs (with grad), entropies (or
  ``None``) and response mask of the responses ``idx`` (:func:`token_logprobs`);
* ``loss(logp, old_logp, advantages, mask, ref_logp, entropy, normalizer=...) -> (loss, metrics)``:
  :func:`egm.rl.grpo.grpo_loss` with the run's settings bound (``functools.partial``);
* ``backward(loss)``, ``optimizer_step()`` (clip, step, zero the gradients, step the schedule);
* ``begin_micro_batch(last)`` before each micro-batch (:func:`egm.strategies.begin_micro_batch`:
  DeepSpeed's accumulation boundary);
* ``reduce_sum(tensor)``: the sum over ranks (``None`` on one process).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from egm.rl.grpo import Agg, entropy_from_logits

Forward = Callable[[Tensor], tuple[Tensor, Tensor | None, Tensor]]
Loss = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def token_logprobs(model: torch.nn.Module, inputs: Mapping[str, Tensor], completion_ids: Tensor,
                   temperature: float = 1.0, with_entropy: bool = False,
                   entropy_grad: bool = True) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``(b, t)`` of ``completion_ids`` under ``model`` (and exact entropies ``(b, t)``).

    Logits are divided by the rollout temperature, as verl and TRL do, so that the recomputed
    distribution is the one responses were sampled from. Only the last ``t + 1`` positions are
    projected to the vocabulary (``logits_to_keep``). ``entropy_grad=False`` computes the
    entropy outside the autograd graph (logged only, when the entropy weight gamma is 0).
    """
    t = completion_ids.shape[1]
    logits = model(**inputs, logits_to_keep=t + 1).logits[:, :-1]  # (b, t, V): position k predicts token k
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = entropy_from_logits(logits)
    return logp, ent


def global_normalizer(mask: Tensor, agg: Agg, reduce_sum: Callable[[Tensor], Tensor] | None = None,
                      world: int = 1, device: torch.device | str | None = None) -> Tensor:
    """A mini-batch's loss denominator: its tokens (``token-mean``) or sequences
    (``seq-mean-token-mean``) summed over all ranks, divided by ``world`` (DDP averages gradients)."""
    local = mask.sum() if agg == "token-mean" else torch.tensor(mask.shape[0])
    local = local.to(device, torch.float32)
    total = reduce_sum(local.clone()) if world > 1 else local
    return (total / world).clamp_min(1.0 / world)


def _noop(last: bool) -> None:
    pass


def ppo_updates(
    forward: Forward,
    loss: Loss,
    completion_mask: Tensor,
    advantages: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    *,
    mini: int,
    micro: int,
    backward: Callable[[Tensor], None],
    optimizer_step: Callable[[], None],
    epochs: int = 1,
    agg: Agg = "token-mean",
    seed: int = 0,
    begin_micro_batch: Callable[[bool], None] = _noop,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    world: int = 1,
) -> dict[str, Any]:
    """``epochs`` x mini-batches of optimiser steps over one rollout batch (module docstring).

    Args:
        forward: ``idx -> (logp, entropy, mask)`` for the responses ``idx``.
        loss: the per-micro-batch loss (``grpo_loss`` with its settings bound).
        completion_mask: ``(B, T)`` response mask of the whole batch (for the normalisers).
        advantages: ``(B,)`` Eq. 7 advantages, on the device the losses are computed on.
        old_logp: ``(B, T)`` log-probs before the update, or ``None`` when the batch is one
            optimiser step (then ``old = logp.detach()``: the same numbers, no extra pass).
        ref_logp: ``(B, T)`` reference log-probs (``None`` when ``beta == 0``).
        mini, micro: responses per optimiser step / per forward-backward.
        agg: the loss aggregation, for the normaliser: tokens or sequences.
        seed: seed of the mini-batch shuffle (used when ``epochs > 1`` or ``mini < B``).

    Returns:
        metrics averaged over the optimiser steps (``loss``, ``pg_loss``, ``clip_frac``,
        ``ppo_kl``, ``kl``/``entropy`` when computed), ``optimizer_steps``,
        ``minibatch_losses`` and the ``first_minibatch``'s metrics.
    """
    device = advantages.device
    gen = torch.Generator().manual_seed(seed)
    B = completion_mask.shape[0]
    shuffle = epochs > 1 or mini < B
    sums: dict[str, float] = defaultdict(float)
    mb_losses: list[float] = []
    first_mb: dict[str, float] = {}
    for _ in range(epochs):
        order = torch.randperm(B, generator=gen) if shuffle else torch.arange(B)
        for mb in order.split(mini):
            normalizer = global_normalizer(completion_mask[mb], agg, reduce_sum, world, device)
            mb_sums: dict[str, float] = defaultdict(float)
            micros = mb.split(micro)
            for i, mc in enumerate(micros):
                begin_micro_batch(i == len(micros) - 1)
                logp, ent, mask = forward(mc)
                t, dmc = logp.shape[1], mc.to(device)
                value, m = loss(logp, logp.detach() if old_logp is None else old_logp[dmc, :t], advantages[dmc], mask,
                                None if ref_logp is None else ref_logp[dmc, :t], ent, normalizer=normalizer)
                backward(value)
                ntok = float(m["num_tokens"])
                mb_sums["loss"] += float(value.detach())
                mb_sums["tokens"] += ntok
                for k in ("clip_frac", "ppo_kl"):
                    mb_sums[k] += float(m[k]) * ntok
                for k in ("pg_loss", "kl", "entropy"):  # already normalised by the mini-batch
                    if k in m:
                        mb_sums[k] += float(m[k])
            optimizer_step()
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

"""The PPO update of one GRPO rollout batch, as a plain function (paper Sec. 4.3, Table 5).

:func:`ppo_updates` runs ``epochs`` passes over the batch's ``B`` responses in mini-batches of
``mini`` responses; each mini-batch is one optimiser step, its gradient accumulated over
micro-batches of ``micro`` responses, or as ``split`` cuts it (by token count:
:func:`token_micro_batches`; memory only). Every micro-batch loss is divided by the
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

from egm.models.head import DEFAULT_CHUNK_TOKENS, completion_logprobs
from egm.rl.grpo import Agg

Forward = Callable[[Tensor], tuple[Tensor, Tensor | None, Tensor]]
Loss = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def token_logprobs(model: torch.nn.Module, inputs: Mapping[str, Tensor], completion_ids: Tensor,
                   temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = True,
                   completion_mask: Tensor | None = None,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``(b, t)`` of ``completion_ids`` under ``model`` (and exact entropies ``(b, t)``).

    Logits are divided by the rollout temperature, as verl and TRL do, so that the recomputed
    distribution is the one responses were sampled from. The vocabulary projection runs in chunks
    of ``chunk_tokens`` response tokens, only where ``completion_mask`` is set (0 elsewhere), and
    is recomputed in backward (:func:`egm.models.head.completion_logprobs`): the full ``(b, t, V)``
    logits never exist. ``entropy_grad=False`` computes the entropy outside the autograd graph
    (logged only, when the entropy weight gamma is 0).
    """
    return completion_logprobs(model, inputs, completion_ids, completion_mask, temperature, with_entropy,
                               entropy_grad, chunk_tokens)


def token_micro_batches(idx: Tensor, lengths: Tensor, max_tokens: int) -> list[Tensor]:
    """Split the responses ``idx`` into micro-batches of at most ``max_tokens`` padded tokens.

    verl's ``use_dynamic_bsz`` / ``ppo_max_token_len_per_gpu``, EasyR1's ``dynamic_batching``: the
    responses are sorted by ``lengths`` (longest first) and packed greedily while
    ``rows x longest row <= max_tokens``, so one long response no longer sets the padded length of
    many short ones. A response longer than ``max_tokens`` gets a micro-batch of its own. The
    gradient does not depend on the split (every loss is divided by the mini-batch's normaliser).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = idx[torch.argsort(lengths[idx], descending=True, stable=True)]
    out: list[list[int]] = []
    longest = 0
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        if out and (len(out[-1]) + 1) * longest <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
            longest = n
    return [torch.tensor(b, dtype=idx.dtype) for b in out]


def padding_fraction(lengths: Tensor, batches: list[Tensor]) -> float:
    """Fraction of padded positions when each batch is padded to its longest row."""
    padded = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    return 1.0 - float(sum(int(lengths[b].sum()) for b in batches)) / max(padded, 1)


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
    split: Callable[[Tensor], list[Tensor]] | None = None,
    group: int = 1,
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
        split: ``mb -> micro-batches``, replacing ``micro`` (:func:`token_micro_batches` packs by
            token count; the shared-prefix forward keeps groups together:
            :func:`egm.rl.prefix.prefix_micro_batches`).
        agg: the loss aggregation, for the normaliser: tokens or sequences.
        seed: seed of the mini-batch shuffle (used when ``epochs > 1`` or ``mini < B``).
        group: responses ``[k * group, (k + 1) * group)`` share a prompt; the shuffle moves whole
            groups, so that a mini-batch of a multiple of ``group`` responses holds whole groups
            and the shared-prefix forward encodes each prompt once per micro-batch instead of
            once per stray response (the gradient of a mini-batch does not depend on its order).

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
        if not shuffle:
            order = torch.arange(B)
        elif group > 1 and B % group == 0:
            order = (torch.randperm(B // group, generator=gen)[:, None] * group + torch.arange(group)).reshape(-1)
        else:
            order = torch.randperm(B, generator=gen)
        for mb in order.split(mini):
            normalizer = global_normalizer(completion_mask[mb], agg, reduce_sum, world, device)
            mb_sums: dict[str, float] = defaultdict(float)
            micros = mb.split(micro) if split is None else split(mb)
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

"""GRPO math (paper Sec. 4.3, Eq. 3-7): group advantages, PPO clip, k3 KL, entropy, aggregation.

Plain tensor functions; the GRPO LightningModule only wires rollout -> reward -> advantage -> loss.
Shapes: ``B`` sequences (``num_prompts * G`` responses, contiguous per prompt), ``T`` response
tokens, ``V`` vocabulary. ``mask`` is ``(B, T)``, 1/True on response tokens that count (not
padding, not prompt). All per-token functions accept garbage (``inf``/``nan``) at masked positions.

Choices (and why)
-----------------
* **Advantage std (Eq. 7)**: unbiased sample std (``torch.std``, ``correction=1``) plus
  ``eps = 1e-6`` in the denominator, as verl's ``compute_grpo_outcome_advantage`` -- the paper
  trains with verl (Sec. 5.1), so this reproduces its numbers (TRL also uses the unbiased std, with
  ``eps = 1e-4``). Groups whose rewards are all equal get exactly 0 (not ``0 / eps`` noise), and
  one-sample groups get 0 (verl would give ``r / (1 + eps)`` there, which carries no
  group-relative signal).
* **Ratio and KL guards**: log-ratios are clamped to ``[-20, 20]`` before ``exp`` (verl's bound):
  finite values and gradients even for ``logp - old_logp = 1000``; beyond the bound the gradient
  is 0. The optional dual clip (``dual_clip``, verl's ``clip_ratio_c = 3``) bounds the loss of
  negative-advantage tokens; off by default, so the loss is Eq. 3 exactly.
* **KL (Eq. 5)**: the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` per token, computed as
  ``expm1(x) - x`` for accuracy near 0, after the ``[-20, 20]`` log-ratio clamp, then clamped to
  ``[0, 10]`` as verl's ``kl_penalty(..., "low_var_kl")`` does (its lower bound is -10, but k3 is
  >= 0 in exact arithmetic): one token far from the reference (``ref - logp = 7`` gives
  ``e^7 - 8 = 1089``) then adds at most 10 and no gradient, instead of dominating the batch KL.
* **Entropy (Eq. 6)**: two estimators. :func:`entropy_from_logits` is the exact per-token
  entropy of the full distribution -- the module's default, as verl (which the paper used)
  computes it; :func:`sampled_token_entropy` is the paper's literal ``-log pi(o_t)``, an unbiased
  but noisier estimate whose gradient only lowers the sampled tokens' probabilities.
* **Zero-spread groups**: off by default (the paper's GRPO trains on them, at advantage 0);
  :func:`group_has_spread` and :func:`select_groups` implement DAPO's dynamic sampling
  (Yu et al. 2025; verl ``filter_groups``), which :mod:`egm.rl.dynamic` wires to refills.
* **Aggregation**: ``"token-mean"`` (sum over all valid tokens of the batch / their count, DAPO)
  is the default because the paper's text says "GRPO with a token-level mean loss [DAPO]" and
  verl's ``loss_agg_mode="token-mean"`` implements it; Eq. 3/7 (``A_i / |o_i|`` then ``1/G``) is
  ``"seq-mean-token-mean"``: per-sequence token mean, then mean over all ``B`` sequences
  (an empty response contributes 0 but still counts, as the ``1/G`` of Eq. 3 and TRL's
  ``loss_type="grpo"``). Token-mean weighs every token equally, so long reasoning chains are
  not down-weighted. Pass ``normalizer`` (global token count, or sequence count) when a batch
  is split into micro-batches or ranks so that the accumulated gradient equals the full-batch one.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Agg = Literal["token-mean", "seq-mean-token-mean"]
AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean")
LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 4.9e8: finite in float32, gradient 0 beyond
KL_CLAMP = 10.0  # verl low_var_kl: per-token k3 bounded by 10, gradient 0 beyond
ADV_EPS = 1e-6  # verl's epsilon in compute_grpo_outcome_advantage


def _float(x: Tensor) -> Tensor:
    """Upcast half precision to float32 (ratios of bf16 log-probs are too coarse); keep f32/f64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def group_advantages(
    rewards: Tensor,
    group_size: int | None = None,
    eps: float = ADV_EPS,
    unbiased: bool = True,
) -> tuple[Tensor, Tensor]:
    """Eq. 7: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` within each prompt's group.

    Args:
        rewards: ``(num_prompts * G,)`` laid out contiguously per prompt (then ``group_size=G``
            is required), or ``(num_prompts, G)``.
        group_size: ``G`` for 1-D rewards; must match ``rewards.shape[1]`` if given for 2-D.
        eps: added to the std; zero-spread groups bypass it and get exactly 0.
        unbiased: sample std (``n - 1``, verl/TRL) if True, population std (``n``) otherwise.

    Returns:
        ``advantages`` shaped like ``rewards`` (float, no grad), and ``zero_spread_frac``: a 0-d
        tensor, the share of groups whose rewards are all equal (including one-sample groups),
        i.e. groups that give no learning signal.
    """
    r = torch.as_tensor(rewards).detach()
    r = r if r.is_floating_point() else r.float()
    if r.dim() == 1:
        if group_size is None or group_size < 1:
            raise ValueError("1-D rewards need group_size >= 1 (the G samples of one prompt)")
        if r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        grouped = r.view(-1, group_size)
    elif r.dim() == 2:
        if group_size is not None and group_size != r.shape[1]:
            raise ValueError(f"group_size={group_size} but rewards are {tuple(r.shape)}")
        grouped = r
    else:
        raise ValueError(f"rewards must be (P*G,) or (P, G), got {tuple(r.shape)}")
    if not torch.isfinite(grouped).all():
        raise ValueError("non-finite reward: the reward function must return finite values")
    num_groups, g = grouped.shape
    if num_groups == 0:
        return r.clone(), r.new_zeros(())
    mean = grouped.mean(dim=1, keepdim=True)  # (P, 1)
    if g > 1:
        std = grouped.std(dim=1, correction=1 if unbiased else 0, keepdim=True)
    else:
        std = torch.zeros_like(mean)
    spread = grouped.amax(dim=1, keepdim=True) > grouped.amin(dim=1, keepdim=True)  # (P, 1)
    adv = torch.where(spread, (grouped - mean) / (std + eps), torch.zeros_like(grouped))
    return adv.reshape(r.shape), (~spread).to(r.dtype).mean()


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    r = torch.as_tensor(rewards).detach()
    if r.dim() == 1:
        if group_size < 1 or r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        return r.view(-1, group_size)
    if r.dim() != 2 or r.shape[1] != group_size:
        raise ValueError(f"rewards must be (P*G,) or (P, {group_size}), got {tuple(r.shape)}")
    return r


def group_has_spread(rewards: Tensor, group_size: int) -> Tensor:
    """``(P,)`` bool: True where a prompt's ``G`` rewards are not all equal.

    DAPO's dynamic-sampling filter (verl ``algorithm.filter_groups``, metric = the sequence
    reward): a group with zero spread gets advantage 0 for every response (Eq. 7), so it adds
    tokens to the loss but no policy gradient. Exact equality, as the advantage itself uses.
    """
    g = _groups(rewards, group_size)
    return g.amax(dim=1) > g.amin(dim=1)


class GroupSelection(NamedTuple):
    """Which candidate groups fill a batch of ``target`` prompts (see :func:`select_groups`)."""

    index: Tensor  # (target,) candidate group indices, in draw order
    dropped: int  # zero-spread groups left out
    padded: int  # zero-spread groups kept because too few groups had spread
    surplus: int  # groups with spread left out because the batch was already full


def select_groups(has_spread: Tensor, target: int) -> GroupSelection:
    """DAPO dynamic sampling: the first ``target`` candidate groups with reward spread.

    ``has_spread`` ``(N,)`` covers the batch's own groups followed by the refills, in the order
    they were drawn. verl's DAPO recipe keeps generating until ``train_batch_size`` groups have
    spread and raises once ``max_num_gen_batches`` is reached; here a batch still short after
    the last refill is completed with the earliest zero-spread groups instead (``padded``), so
    every rank always trains on ``target`` groups (same micro-batch and optimiser-step counts on
    every rank, which DDP/ZeRO need) and the shortfall degrades to plain GRPO rather than
    stopping the run.
    """
    has_spread = torch.as_tensor(has_spread, dtype=torch.bool).flatten()
    if target < 0 or has_spread.numel() < target:
        raise ValueError(f"need {target} groups, only {has_spread.numel()} candidates")
    good = torch.nonzero(has_spread).flatten()
    flat = torch.nonzero(~has_spread).flatten()
    take = good[:target]
    pad = flat[:target - take.numel()]
    index = torch.cat([take, pad]).sort().values
    return GroupSelection(index, int(flat.numel() - pad.numel()), int(pad.numel()),
                          int(good.numel() - take.numel()))


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO objective of Eq. 3: ``min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)``.

    Args:
        logp: ``(B, T)`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``(B, T)`` under the behaviour policy (treated as constant).
        advantages: ``(B,)`` sequence advantages broadcast over tokens, or ``(B, T)``.
        mask: ``(B, T)`` valid response tokens.
        clip_eps: PPO clip ratio epsilon (Table 5: 0.2).
        dual_clip: if set (verl: 3.0), the objective of tokens with ``A < 0`` is floored at
            ``dual_clip * A``.

    Returns:
        ``objective`` ``(B, T)`` (to maximise; 0 at masked tokens) and ``clipped`` ``(B, T)`` bool,
        True where the clipped branch is the active one (for the clip fraction).
    """
    mask = mask.bool()
    logp, old_logp = _float(logp), _float(old_logp).detach()
    adv = _float(advantages).detach()
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # (B, 1) or (B, T)
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    unclipped = ratio * adv
    clipped_obj = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped_obj)
    is_clipped = (clipped_obj < unclipped) & mask
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        objective = torch.where(adv < 0, torch.maximum(objective, dual_clip * adv), objective)
    return torch.where(mask, objective, torch.zeros_like(objective)), is_clipped


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Eq. 5, per token: ``exp(ref - logp) - (ref - logp) - 1`` -> ``(B, T)``, in ``[0, 10]``.

    The k3 estimator of ``KL(pi_theta || pi_ref)`` on tokens sampled from the policy. As verl's
    ``low_var_kl``: the log-ratio is clamped to ``[-20, 20]``, then the value to ``KL_CLAMP = 10``
    (k3 exceeds 10 for ``ref - logp`` above ~2.61 or below ~-11); past either clamp the
    gradient is 0. Masked tokens give 0.
    """
    logp, ref_logp = _float(logp), _float(ref_logp).detach()
    x = ref_logp - logp
    if mask is not None:
        x = torch.where(mask.bool(), x, torch.zeros_like(x))
    x = x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.expm1(x) - x).clamp(0.0, KL_CLAMP)


def sampled_token_entropy(logp: Tensor) -> Tensor:
    """Eq. 6 as written: ``H = -log pi(o_t)`` of the sampled token -> ``(B, T)``."""
    return -_float(logp)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Exact per-token entropy ``-(softmax * log_softmax).sum(-1)``: ``(B, T, V) -> (B, T)``.

    ``-inf`` logits (filtered vocabulary) contribute 0, not NaN. Materialises two ``(B, T, V)``
    float32 tensors: call it per micro-batch.
    """
    logq = torch.log_softmax(_float(logits), dim=-1)
    q = logq.exp()
    return -(q * torch.where(torch.isfinite(logq), logq, torch.zeros_like(logq))).sum(-1)


def agg_loss(
    values: Tensor,
    mask: Tensor,
    agg: Agg = "token-mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Aggregate per-token ``values`` ``(B, T)`` to a scalar over the valid tokens of ``mask``.

    * ``"token-mean"`` (DAPO, default): ``sum_{i,t} v / N`` with ``N`` the number of valid tokens
      (or ``normalizer``).
    * ``"seq-mean-token-mean"`` (Eq. 3/7): ``sum_i (sum_t v_{i,t} / |o_i|) / B`` (or
      ``/ normalizer``); an empty sequence contributes 0.

    An all-masked batch gives 0 (denominators are clamped to >= 1), never NaN.
    """
    mask = mask.bool()
    v = torch.where(mask, values, torch.zeros_like(values))
    if agg == "token-mean":
        denom = mask.sum().clamp_min(1) if normalizer is None else normalizer
        return v.sum() / denom
    if agg == "seq-mean-token-mean":
        per_seq = v.sum(-1) / mask.sum(-1).clamp_min(1)  # (B,)
        denom = max(per_seq.shape[0], 1) if normalizer is None else normalizer
        return per_seq.sum() / denom
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Tensor | None = None,
    entropy: Tensor | None = None,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    gamma: float = 0.0,
    agg: Agg = "token-mean",
    *,
    dual_clip: float | None = None,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negated Eq. 3 objective: ``loss = -agg(surrogate) + beta * agg(KL) - gamma * agg(H)``.

    Args:
        logp, old_logp, mask: ``(B, T)``; advantages: ``(B,)`` (Eq. 7, from
            :func:`group_advantages`) or ``(B, T)``.
        ref_logp: ``(B, T)`` frozen reference policy log-probs; required when ``beta != 0``,
            logged as ``kl`` whenever given.
        entropy: ``(B, T)`` per-token entropy, :func:`entropy_from_logits` (module default) or
            :func:`sampled_token_entropy` (Eq. 6 literally); required when ``gamma != 0``.
        clip_eps, beta, gamma: Table 5 -- 0.2; Qwen beta=0.005, gamma=0; InternVL beta=0,
            gamma=0.01.
        agg: ``"token-mean"`` (default, DAPO) or ``"seq-mean-token-mean"`` (Eq. 3/7).
        dual_clip, normalizer: see :func:`clipped_surrogate` and :func:`agg_loss`.

    Returns:
        ``loss`` (0-d, differentiable w.r.t. ``logp`` and ``entropy``) and detached 0-d metrics:
        ``pg_loss``, ``clip_frac`` (share of valid tokens clipped), ``ppo_kl`` (mean
        ``old_logp - logp``), ``num_tokens``, and ``kl`` / ``entropy`` when given.
    """
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the frozen reference policy's log-probs)")
    if gamma != 0.0 and entropy is None:
        raise ValueError(
            "gamma != 0 needs entropy: entropy_from_logits(logits) or sampled_token_entropy(logp)"
        )
    mask = mask.bool()
    objective, clipped = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps, dual_clip)
    pg_loss = -agg_loss(objective, mask, agg, normalizer)
    loss = pg_loss
    n_tok = mask.sum()
    valid = n_tok.clamp_min(1)
    log_ratio = torch.where(mask, _float(old_logp) - _float(logp), torch.zeros_like(objective))
    metrics: dict[str, Tensor] = {
        "pg_loss": pg_loss.detach(),
        "clip_frac": clipped.sum().to(objective.dtype) / valid,
        "ppo_kl": log_ratio.detach().sum() / valid,
        "num_tokens": n_tok.to(objective.dtype),
    }
    if ref_logp is not None:
        kl = agg_loss(kl_k3(logp, ref_logp, mask), mask, agg, normalizer)
        metrics["kl"] = kl.detach()
        if beta != 0.0:
            loss = loss + beta * kl
    if entropy is not None:
        ent = agg_loss(_float(entropy), mask, agg, normalizer)
        metrics["entropy"] = ent.detach()
        if gamma != 0.0:
            loss = loss - gamma * ent
    return loss, metrics

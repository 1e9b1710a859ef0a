"""The plain log-prob head: full ``(b, t, V)`` logits, ``log_softmax`` + ``gather``, entropy from a
second softmax. egm used it before :mod:`egm.models.head`; it stays here only as the independent
reference the lean head is tested against (and as ``plain`` in tools/bench_logprobs.py)."""

from __future__ import annotations

import torch

from egm.rl.grpo import entropy_from_logits


def plain_token_logprobs(model, inputs, completion_ids, temperature=1.0, with_entropy=False):
    """``(logp (b, t), entropy (b, t) | None)`` from the model's own forward and full logits."""
    t = completion_ids.shape[1]
    logits = model(**inputs, logits_to_keep=t + 1).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp, entropy_from_logits(logits) if with_entropy else None

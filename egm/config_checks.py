"""Range checks of every numeric hyper-parameter, run at the top of each ``__init__``.

Why here and not where a value is used: ``egm fit`` builds the LightningModule and the
datamodule before any model loads, so a bad value found in ``__init__`` costs a second, while
one found in ``training_step`` costs a model load and a round of rollouts first -- or costs
nothing at all and trains wrongly (``clip_eps: -1`` makes the clipped surrogate 0 for every
positive advantage; STYLE habit 7: fail loudly at the edge). One table per class, in one place,
so a reader sees every allowed range at once; the message names the key and its range.

A rule is a string: ``"> 0"``, ``">= 1"``, ``"[0, 1]"``, ``"[0, 1)"``; ``"int >= 1"`` also
requires an integer (not a bool); ``"... | None"`` admits None; ``"each [0, 1)"`` applies to
every element of a sequence. NaN and infinities fail every rule.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from egm.errors import InputError

_OPTIMISER = {
    "lr": "> 0",
    "weight_decay": ">= 0",
    "betas": "each [0, 1)",
    "warmup_steps": "int >= 0",
    "min_lr_ratio": "[0, 1]",
}

#: egm.sft.SFTModule
SFT_RULES: dict[str, str] = {**_OPTIMISER, "logprob_chunk_tokens": "int >= 1"}

#: egm.rl.module.GRPOModule (paper Table 5 names)
GRPO_RULES: dict[str, str] = {
    **_OPTIMISER,
    "n_samples": "int >= 2",  # G: group-relative advantages need two responses
    "clip_eps": "> 0",
    "beta": ">= 0",
    "gamma": ">= 0",
    "alpha": "[0, 1]",
    "ppo_epochs": "int >= 1",
    "mini_batch_size": "int >= 1 | None",
    "micro_batch_size": "int >= 1",
    "micro_batch_tokens": "int >= 1 | None",
    "logprob_chunk_tokens": "int >= 1",
    "max_grad_norm": "> 0 | None",
    "rollout_batch_size": "int >= 1 | None",
    "seed": "int >= 0",
    "max_refill_rounds": "int >= 0",
}

#: egm.data.datamodule.GroundingDataModule
DATAMODULE_RULES: dict[str, str] = {
    "train_weights": "each >= 0 | None",
    "batch_size": "int >= 1",
    "eval_batch_size": "int >= 1 | None",
    "num_workers": "int >= 0",
    "epoch_size": "int >= 1 | None",
    "max_train_samples": "int >= 1 | None",
    "max_eval_samples": "int >= 1 | None",
    "seed": "int >= 0",
}

#: egm.models.base.GroundingAdapter (and its families)
ADAPTER_RULES: dict[str, str] = {"max_length": "int >= 1"}

_RULE = re.compile(
    r"^(?P<each>each )?(?P<int>int )?(?:(?P<op>>=|>|<=|<) (?P<num>\S+)|(?P<lo>[\[(])(?P<a>\S+), (?P<b>\S+)(?P<hi>[\])]))"
    r"(?P<none> \| None)?$"
)


def finite_number(v: Any) -> float | None:
    """``v`` as a float if it is a real number (not a bool) and finite, else None.

    Integers too large for a float (``10**400``) are None, not an ``OverflowError``. Configs and
    the data layer's JSON records check their numbers with this one function.
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _ok(v: Any, m: re.Match) -> bool:
    if m["int"] and not isinstance(v, int):
        return False
    x = finite_number(v)
    if x is None:
        return False
    if m["op"]:
        n = float(m["num"])
        return {">=": x >= n, ">": x > n, "<=": x <= n, "<": x < n}[m["op"]]
    a, b = float(m["a"]), float(m["b"])
    return (x >= a if m["lo"] == "[" else x > a) and (x <= b if m["hi"] == "]" else x < b)


def check_ranges(owner: str, values: Mapping[str, Any], rules: Mapping[str, str]) -> None:
    """Raise ``ValueError`` for the first value outside its rule: ``"GRPOModule: clip_eps must be > 0, got -1"``.

    ``values`` is typically ``locals()`` at the top of ``__init__``; keys without a rule and
    rules without a value are ignored (a subclass may add or drop parameters).
    """
    for key, rule in rules.items():
        if key not in values:
            continue
        m = _RULE.match(rule)
        if m is None:  # pragma: no cover - a typo in the tables above
            raise AssertionError(f"bad rule {rule!r} for {key}")
        v = values[key]
        if v is None and m["none"]:
            continue
        items = list(v) if m["each"] and isinstance(v, (list, tuple)) else None
        if m["each"] and items is None:
            good = False
        else:
            good = all(_ok(x, m) for x in items) if items is not None else _ok(v, m)
        if not good:
            raise InputError(f"{owner}: {key} must be {_describe(m)}, got {v!r:.80}")


def _describe(m: re.Match) -> str:
    """``"int >= 1 | None"`` -> ``"an integer >= 1 (or null)"``."""
    bound = f"{m['op']} {m['num']}" if m["op"] else f"in {m['lo']}{m['a']}, {m['b']}{m['hi']}"
    what = "an integer " if m["int"] else "a finite number "
    many = "integers" if m["int"] else "finite numbers"
    text = f"a list of {many} each {bound}" if m["each"] else f"{what}{bound}"
    return text + (" (or null)" if m["none"] else "")


def looks_local(name_or_path: str) -> bool:
    """Whether a ``from_pretrained`` argument is meant as a local folder rather than a hub id.

    Every supported family's hub ids are ``org/name`` (``Qwen/Qwen3-VL-2B-Thinking``,
    ``OpenGVLab/InternVL3-1B-hf``), so anything else is a local path: a bare name without ``/``,
    an absolute path, one starting with ``.`` or ``~``, one with ``os.sep`` or ``\\``, more than
    one ``/``, a trailing ``/``, or an ``a/b`` whose ``a`` is a folder here (``runs/sft`` when
    ``runs/`` exists). ``egm fit`` and ``egm evaluate`` both decide through this one rule (the
    adapter's ``__init__`` calls :func:`check_checkpoint_path`).
    """
    p = name_or_path
    if "/" not in p or p.startswith(("/", ".", "~")) or "\\" in p or (os.sep != "/" and os.sep in p):
        return True
    if p.count("/") > 1 or p.endswith("/"):
        return True
    return os.path.isdir(p.split("/")[0])


def check_checkpoint_path(name_or_path: str) -> None:
    """A local checkpoint path that does not exist fails now, naming it, never as a hub lookup.

    (Hugging Face answers a missing ``runs/x/y`` with ``Repo id must be in the form ...``, which
    never says that the folder is missing, and a bare ``x`` with ~50 s of hub retries.)
    """
    if looks_local(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(
            f"pretrained_model_name_or_path {name_or_path!r}: no such local checkpoint folder "
            f"(cwd {os.getcwd()}); a Hugging Face hub id has the form 'org/name'"
        )

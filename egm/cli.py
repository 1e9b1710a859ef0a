"""The ``egm`` command.

``egm fit|validate|test|predict`` is Lightning's ``LightningCLI`` (configs, dotted overrides such
as ``--model.lr 3e-6``, ``--print_config``, ``class_path`` subclass selection): the recipes in
``configs/`` name the LightningModule and LightningDataModule they use.

The other subcommands (``egm demo``, ``egm make-tiny``, ...) are plain type-hinted functions
exposed through jsonargparse, so they get the same ``--config``/``--print_config`` handling.
They are registered below by dotted path, or by the path of a script of the source checkout
(``tools/demo.py``: the demo is no part of the library), and imported only when called:
``egm --help`` and a tool's ``--help`` never import torch, Lightning, vLLM or DeepSpeed. A tool's
log messages (``egm.*`` loggers, INFO and up) go to stderr.

Every command reports a user error -- a missing file or folder, a bad value, a malformed manifest,
truncated weights (:mod:`egm.errors` says which exceptions are one) -- as one line,
``egm <command>: error: <message naming the file or field>``, with exit status 1 (2 when the
command line or a config file does not parse); ``EGM_DEBUG=1`` shows the traceback instead. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

LIGHTNING_COMMANDS = {
    "fit": "train a model (SFT or GRPO, chosen by the config's model.class_path)",
    "validate": "run the validation loop (grounding accuracy per eval split)",
    "test": "run the test loop on the configured eval splits",
    "predict": "generate answers for a datamodule's predict split",
}

# name -> ("module:function", one-line help). The function's signature is the command's schema.
TOOL_COMMANDS: dict[str, tuple[str, str]] = {}
REPO_ROOT = Path(__file__).resolve().parents[1]  # the source checkout holding tools/ and configs/


def register_tool(name: str, target: str, help: str) -> None:
    """Add an ``egm <name>`` subcommand that calls ``module:function`` (or ``script.py:function``,
    a path under :data:`REPO_ROOT`) via jsonargparse."""
    TOOL_COMMANDS[name] = (target, help)


register_tool("demo", "tools/demo.py:demo", "the CPU demo: tiny Qwen3-VL + synthetic world, SFT, before/after table")
register_tool("demo-rl", "tools/demo.py:demo_rl", "the CPU demo's GRPO stage on top of the SFT demo's export, before/after table")
register_tool("demo-budget", "tools/demo.py:demo_budget", "the SFT demo's test-time reasoning-budget curve (egm evaluate --reasoning_budget)")
register_tool("demo-seeds", "tools/demo.py:demo_seeds", "the demo over seeds and the reasoning vs box-only vs GRPO ablation (mean, spread, McNemar)")
register_tool("make-tiny", "egm.models.tiny:make_tiny", "write a tiny random Qwen3-VL / InternVL checkpoint folder")
register_tool("make-synthetic", "egm.data.synthetic:make_synthetic", "render the synthetic grounding world (images + manifests)")
register_tool("import-refer", "egm.data.refer:import_refer", "RefCOCO/+/g (REFER layout) -> JSONL manifests")
register_tool("import-cocoa", "egm.data.cocoa:import_cocoa", "COCO-Amodal annotations -> JSONL manifest")
register_tool("import-tao-amodal", "egm.data.tao_amodal:import_tao_amodal", "TAO-Amodal annotations -> JSONL manifest")
register_tool("evaluate", "egm.eval.checkpoint:evaluate_checkpoint", "accuracy, mean IoU, parse failures and latency of a checkpoint")
register_tool("curate", "egm.curation.jobs:curate", "teacher-VLM reasoning / amodal descriptions for SFT (Sec. 4.1, Figs. 8-11)")
register_tool("select-rl-data", "egm.curation.selection:select_rl_data", "learnability-based RL subset (Sec. 4.2)")
register_tool("analyze-failures", "egm.curation.failures:analyze_failures", "categorise grounding failures with a teacher (Sec. 3, Fig. 13, Table 1)")
register_tool("report", "egm.eval.report:make_report", "Table 3/4-style tables and figures from results.json files")


def _usage() -> str:
    width = max(len(n) for n in [*LIGHTNING_COMMANDS, *TOOL_COMMANDS])
    lines = [
        "usage: egm <command> [--config CONFIG.yaml] [--section.key VALUE ...]",
        "",
        "EGM: efficient visual grounding with test-time reasoning (SFT + GRPO) on small VLMs.",
        "",
        "Lightning commands (LightningCLI; see `egm fit --help`):",
        *(f"  {n:<{width}}  {h}" for n, h in LIGHTNING_COMMANDS.items()),
        "",
        "Tools (see `egm <tool> --help`):",
        *(f"  {n:<{width}}  {h}" for n, (_, h) in TOOL_COMMANDS.items()),
        "",
        "Examples:",
        "  egm fit --config configs/demo_sft.yaml",
        "  egm fit --config configs/rl_internvl.yaml --model.lr 3e-6 --print_config",
    ]
    return "\n".join(lines)


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(load_script(module) if module.endswith(".py") else importlib.import_module(module), attr)


def load_script(relpath: str):
    """A script of the source checkout (``tools/demo.py``) as a module, loaded once."""
    path = REPO_ROOT / relpath
    # a top-level name: jsonargparse imports a function's module by name to describe its
    # parameters, and "tools.demo" would need a "tools" package on sys.path
    name = "egm_script_" + relpath.removesuffix(".py").replace("/", "_").replace(".", "_")
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise SystemExit(f"egm: {relpath} not found under {REPO_ROOT}: this command runs from a source checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a record comes (tests swap it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; sys.stderr is read per record
        pass


def _log_to_stderr() -> None:
    """Show the ``egm.*`` loggers' INFO and up on stderr, once per process."""
    logger = logging.getLogger("egm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)


def run_tool(name: str, args: Sequence[str]):
    """Run a registered tool command with jsonargparse (``--config`` and ``--print_config`` work)."""
    from jsonargparse import auto_cli

    target, _ = TOOL_COMMANDS[name]
    fn = _resolve(target)
    # exit_on_error=False: a parse error is raised (with its cause), and main() prints it in one line
    return auto_cli(fn, args=list(args), as_positional=False, exit_on_error=False)


def lightning_cli(args: Sequence[str] | None = None, run: bool = True):
    """Build the ``LightningCLI`` behind ``egm fit|validate|test|predict``.

    Model and datamodule are chosen by ``class_path`` in the config (subclass mode), so one
    command serves SFT, GRPO and evaluation recipes. Optimisers are configured by each module
    (the paper's schedules are part of the recipe), not by the CLI.
    """
    from unittest import mock

    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    # Given ``args``, this runs from within Python (a tool such as ``egm demo``); Lightning decides
    # that from ``sys.argv`` and warns when the tool's own command line is there too.
    argv = sys.argv if args is None else sys.argv[:1]
    with mock.patch.object(sys, "argv", argv):
        return LightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            args=None if args is None else list(args),
            run=run,
            # parse errors are raised, not printed with the usage: main() prints them in one line
            parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in LIGHTNING_COMMANDS}},
        )


def main(argv: Sequence[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if argv[0] not in TOOL_COMMANDS and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        print(f"egm: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    try:
        if argv[0] in TOOL_COMMANDS:
            _log_to_stderr()
            run_tool(argv[0], argv[1:])
        else:
            # from the command line LightningCLI reads sys.argv itself (passing it as `args` too
            # makes Lightning warn that it is meant to run from within Python)
            lightning_cli(None if from_command_line else argv)
    except Exception as e:
        report_user_error(argv[0] if not argv[0].startswith("-") else "", e)
        raise


def report_user_error(command: str, exc: BaseException) -> None:
    """Exit with ``egm <command>: error: <one line>`` if ``exc`` is a user error (:mod:`egm.errors`).

    Returns (the caller re-raises, with its traceback) for a bug, or whenever ``EGM_DEBUG`` is set
    to anything but ``0`` or nothing. Exit status 2 for a command line or config that does not
    parse (argparse's convention), 1 for other bad input.
    """
    if os.environ.get("EGM_DEBUG", "0") not in ("", "0"):
        return
    from egm.errors import describe, find_user_error

    err = find_user_error(exc)
    if err is None:
        return
    print(f"{' '.join(['egm', command]).strip()}: error: {describe(err)}", file=sys.stderr, flush=True)
    raise SystemExit(2 if isinstance(err, argparse.ArgumentError) else 1) from None


if __name__ == "__main__":  # pragma: no cover
    main()

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from egm import cli

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(autouse=True)
def _restore_egm_logger():
    """`cli.main` on a tool attaches a stderr handler to the `egm` logger: undo it after each test."""
    logger = logging.getLogger("egm")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:], logger.level = handlers, level


def _egm(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "egm.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_top_level_help_is_light():
    """`egm --help` must not import torch/Lightning (fast, works without a GPU)."""
    code = "import sys, egm.cli; egm.cli.main(['--help']); print(sorted(m for m in ('torch','lightning','vllm','deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "fit" in out and "make-tiny" in out
    assert out.strip().splitlines()[-1] == "[]"


def test_unknown_command_exits_2():
    r = _egm("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.fixture
def toy_config(tmp_path):
    cfg = {
        "seed_everything": 3,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "toy_lightning.ToyRegression", "init_args": {"lr": 0.1, "hidden": 4}},
        "data": {"class_path": "toy_lightning.ToyData", "init_args": {"n": 8}},
    }
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_fit_help_lists_trainer_and_model_options():
    r = _egm("fit", "--help")
    assert r.returncode == 0, r.stderr
    assert "--trainer.max_steps" in r.stdout and "--model" in r.stdout and "--print_config" in r.stdout


def test_print_config_shows_dotted_override(toy_config):
    r = _egm("fit", "--config", str(toy_config), "--model.lr", "3e-06", "--print_config")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["model"]["class_path"] == "toy_lightning.ToyRegression"
    assert printed["model"]["init_args"]["lr"] == pytest.approx(3e-6)
    assert printed["model"]["init_args"]["hidden"] == 4
    assert printed["trainer"]["max_steps"] == 2


def test_fit_runs_and_override_reaches_module(toy_config, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    c = cli.lightning_cli(["fit", "--config", str(toy_config), "--model.lr", "0.05", "--model.hidden", "3"])
    assert c.model.hparams.lr == 0.05 and c.model.net[0].out_features == 3
    assert c.trainer.global_step == 2
    assert (Path(c.trainer.log_dir or toy_config.parent) / "config.yaml").exists()


def test_tool_command_goes_through_jsonargparse(monkeypatch, capsys):
    seen = {}

    def fake_tool(out_dir: str, seed: int = 0) -> None:
        seen.update(out_dir=out_dir, seed=seed)

    monkeypatch.setitem(cli.TOOL_COMMANDS, "fake", ("fake_mod:fake_tool", "test"))
    monkeypatch.setattr(cli, "_resolve", lambda target: fake_tool)
    cli.main(["fake", "--out_dir", "x", "--seed", "7"])
    assert seen == {"out_dir": "x", "seed": 7}


def test_demo_commands_run_the_repository_script():
    """`egm demo` / `egm demo-rl` are tools/demo.py's functions (the demo is no library module)."""
    demo = cli.load_script("tools/demo.py")
    assert cli._resolve(cli.TOOL_COMMANDS["demo"][0]) is demo.demo
    assert cli._resolve(cli.TOOL_COMMANDS["demo-rl"][0]) is demo.demo_rl
    assert cli.load_script("tools/demo.py") is demo  # loaded once
    r = _egm("demo-rl", "--help")
    assert r.returncode == 0, r.stderr
    assert "--max_steps" in r.stdout and "--n_eval" in r.stdout
    with pytest.raises(SystemExit, match="tools/nothing.py not found under .*source checkout"):
        cli.load_script("tools/nothing.py")


def test_demo_tools_from_the_console_script_outside_the_checkout(tmp_path):
    """The installed `egm` script, run from another folder: the demo tools describe their
    arguments (the script's module name needs no `tools` package on sys.path), and
    `--config X --print_config` is jsonargparse's, since the recipe argument is `--recipe`."""
    egm = Path(sys.executable).parent / "egm"
    run = lambda *a: subprocess.run([str(egm), *a], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=180)
    r = run("demo-seeds", "--help")
    assert r.returncode == 0, r.stderr
    assert "--seeds" in r.stdout and "--threads" in r.stdout
    (tmp_path / "mine.yaml").write_text("recipe: my_rl.yaml\nmax_steps: 7\nseed: 3\n")
    r = run("demo-rl", "--config", "mine.yaml", "--print_config")
    assert r.returncode == 0, r.stderr
    assert "recipe: my_rl.yaml" in r.stdout and "max_steps: 7" in r.stdout and "seed: 3" in r.stdout


def test_a_tool_building_the_lightning_cli_gets_no_args_warning(monkeypatch):
    """`egm demo` builds the LightningCLI with its own args while sys.argv holds the tool's command
    line; Lightning must not warn "args parameter is intended to run from within Python"."""
    import warnings

    monkeypatch.setattr(sys, "argv", ["egm", "demo", "--seed", "1"])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        cli.lightning_cli(["--config", "configs/demo_sft.yaml", "--print_config"], run=False)
    assert not [w for w in seen if "args parameter" in str(w.message)]
    assert sys.argv == ["egm", "demo", "--seed", "1"]  # restored


def test_tool_logs_reach_stderr(tmp_path, capsys):
    """What a tool used to print (here make-synthetic's summary) is logged to stderr instead."""
    cli.main(["make-synthetic", "--out_dir", str(tmp_path), "--n_train", "2", "--n_val", "1", "--n_test", "1"])
    err = capsys.readouterr().err
    assert "INFO: make_synthetic: wrote 4 samples to" in err

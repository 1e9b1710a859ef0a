import logging
import os
import shlex
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


# -- user errors: one line naming the file or field, non-zero exit, no traceback (egm.errors) ------

ROOT = HERE.parent
SFT = str(ROOT / "configs" / "demo_sft.yaml")
ADAPTER_PATH = "--model.init_args.adapter.init_args.pretrained_model_name_or_path"

# (command line with {T} = a prepared folder, exit status, what the one line names): one case per
# command (a Lightning command's subprocess costs seconds of imports). Each fails
# before any model loads; {T}/some_dir exists, {T}/full holds a stray file, {T}/bad.jsonl is a
# manifest whose first line lacks fields and whose second is no JSON, and runs/ exists in the cwd
# ({T}), so that runs/nope is a missing local folder, as in a checkout.
USER_ERRORS = [
    ("fit --config {SFT} " + ADAPTER_PATH + " runs/nope", 1,
     ["pretrained_model_name_or_path 'runs/nope': no such local checkpoint folder"]),
    ("validate --config {T}/missing.yaml", 2, ['"config"', "{T}/missing.yaml"]),
    ("test --config {SFT} --model.init_args.bogus 3", 2, ['"model"', "Option 'bogus' is not accepted"]),
    ("predict --config {SFT} " + ADAPTER_PATH + " {T}/some_dir --data.init_args.batch_size 0", 1,
     ["GroundingDataModule: batch_size must be an integer >= 1, got 0"]),
    ("demo --threads 0", 1, ["threads must be >= 1, got 0"]),
    ("demo-rl --root {T}/some_dir", 1, ["{T}/some_dir/data/synthetic_config.json"]),
    ("demo-budget --root {T}/some_dir", 1, ["'{T}/some_dir/sft_export': no such local checkpoint folder"]),
    ("demo-seeds --seeds [0] --threads 0", 1, ["threads must be >= 1, got 0"]),
    ("make-tiny --family qwen3_vl --out_dir {T}/full", 1, ["{T}/full is not empty"]),
    ("make-synthetic --out_dir {T}/s --difficulties [nope]", 1, ["unknown difficulties ['nope']"]),
    ("make-synthetic --out_dir {T}/s --n_train abc", 2, ['"n_train"', "abc"]),
    ("import-refer --data_root {T}/some_dir --out_dir {T}/o", 1, ["no REFER dataset under {T}/some_dir"]),
    ("import-cocoa --annotation_json {T}/missing.json --image_dir {T} --out {T}/o.jsonl", 1, ["{T}/missing.json"]),
    ("import-tao-amodal --annotation_json {T}/bad.jsonl --image_dir {T} --out {T}/o.jsonl", 1, ["{T}/bad.jsonl"]),
    ("evaluate --checkpoint runs/nope --manifests '{{val: {T}/bad.jsonl}}' --out_dir {T}/o", 1,
     ["pretrained_model_name_or_path 'runs/nope': no such local checkpoint folder"]),
    ("curate --manifest {T}/bad.jsonl --output {T}/o.jsonl", 1, ["{T}/bad.jsonl:1: field 'image': missing"]),
    ("select-rl-data --manifest {T}/bad.jsonl --reference {T}/p.jsonl --learner {T}/p.jsonl --output {T}/o.jsonl", 1,
     ["{T}/bad.jsonl:1: field 'image': missing"]),
    ("analyze-failures --predictions {T}/missing.jsonl --manifest {T}/bad.jsonl --output {T}/o.jsonl", 1,
     ["{T}/missing.jsonl"]),
    ("report --results [{T}/some_dir]", 1, ["{T}/some_dir/results.json: cannot read results"]),
]


@pytest.fixture
def bad_inputs(tmp_path):
    for d in ("runs", "some_dir", "full"):
        (tmp_path / d).mkdir()
    (tmp_path / "full" / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\nnot json\n')
    return tmp_path


def _egm_in(cwd, *args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "egm.cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=timeout)


def _assert_one_line_error(r, command: str, rc: int, names: list[str]):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == rc and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith(f"egm {command}: error: "), r.stderr[-3000:]
    for name in names:
        assert name in lines[-1], (name, lines[-1])
    # the one line is the whole report (a tool's INFO log or Lightning's "Seed set" may precede it)
    assert [ln for ln in lines if ln.startswith("egm ") or ln.startswith(" ")] == lines[-1:], r.stderr[-3000:]


def test_every_command_has_a_user_error_case():
    assert {c.split()[0] for c, _, _ in USER_ERRORS} == set(cli.LIGHTNING_COMMANDS) | set(cli.TOOL_COMMANDS)


@pytest.mark.parametrize("line,rc,names", USER_ERRORS, ids=[f"{c.split()[0]}-{i}" for i, (c, _, _) in enumerate(USER_ERRORS)])
def test_user_error_is_one_line_naming_file_or_field(bad_inputs, line, rc, names):
    T = str(bad_inputs)
    r = _egm_in(bad_inputs, *shlex.split(line.format(T=T, SFT=SFT)))
    _assert_one_line_error(r, line.split()[0], rc, [n.format(T=T) for n in names])


def test_truncated_weights_are_named(tiny_dirs, tmp_path):
    """An interrupted copy: safetensors alone says "incomplete metadata, file not fully covered"."""
    import shutil

    ck = shutil.copytree(tiny_dirs["qwen3_vl"], tmp_path / "ck")
    weights = ck / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    (tmp_path / "m.jsonl").write_text("")
    r = _egm_in(tmp_path, "evaluate", "--checkpoint", str(ck), "--manifests", f"{{val: {tmp_path / 'm.jsonl'}}}",
                "--out_dir", str(tmp_path / "o"))
    _assert_one_line_error(r, "evaluate", 1, [f"{weights}: unreadable weights", "file not fully covered"])


def test_egm_debug_shows_the_traceback(bad_inputs):
    line = ["make-synthetic", "--out_dir", str(bad_inputs / "s"), "--difficulties", "[nope]"]
    r = _egm_in(bad_inputs, *line, env={"EGM_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback" in r.stderr and "egm.errors.InputError: unknown difficulties" in r.stderr


def _tool_raising(monkeypatch, exc):
    def broken_tool() -> None:
        raise exc

    monkeypatch.setitem(cli.TOOL_COMMANDS, "broken", ("m:broken_tool", "test"))
    monkeypatch.setattr(cli, "_resolve", lambda target: broken_tool)


@pytest.mark.parametrize("exc", [ValueError("not enough values to unpack"), TypeError("bad operand"),
                                 KeyError("x"), RuntimeError("wrapped") ])
def test_a_bug_keeps_its_traceback(monkeypatch, exc):
    """A plain ValueError, TypeError, ... is a bug: it propagates (Python prints the traceback)."""
    _tool_raising(monkeypatch, exc)
    with pytest.raises(type(exc)):
        cli.main(["broken"])


def test_a_user_error_wrapped_by_a_library_is_found(monkeypatch, capsys):
    """jsonargparse raises its Union error *from* the __init__'s error: the cause is reported."""
    from egm.errors import InputError

    try:
        try:
            raise InputError("SFTModule: lr must be > 0, got -1")
        except InputError as e:
            raise ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]") from e
    except ValueError as wrapped:
        _tool_raising(monkeypatch, wrapped)
    with pytest.raises(SystemExit) as e:
        cli.main(["broken"])
    assert e.value.code == 1
    assert capsys.readouterr().err == "egm broken: error: SFTModule: lr must be > 0, got -1\n"


def test_a_bug_in_an_error_handler_is_not_taken_for_the_user_error(monkeypatch):
    """Implicit context (raised while handling a FileNotFoundError) is not a cause: a bug."""
    try:
        try:
            raise FileNotFoundError("x.json")
        except FileNotFoundError:
            raise TypeError("bug in the handler")  # noqa: B904
    except TypeError as bug:
        _tool_raising(monkeypatch, bug)
    with pytest.raises(TypeError):
        cli.main(["broken"])


def test_a_parse_error_of_fit_names_the_key(capsys):
    """jsonargparse raises (exit_on_error=False) instead of printing its ~100-line usage: the key
    from the first line of its message, the reason from the end of its chain of causes."""
    with pytest.raises(SystemExit) as e:
        cli.main(["fit", "--config", SFT, "--trainer.max_steps", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "egm fit: error: Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: abc\n"

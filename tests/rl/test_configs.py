"""The RL recipes resolve through the real CLI (`egm fit --config ... --print_config`), and the
paper recipes carry the numbers of the paper's Table 5, read from the table itself
(``tests/fixtures/paper_table5.tsv``, copied verbatim from the paper)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from egm import cli
from egm.generation.sampling import TABLE5_ROLLOUT, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
TABLE5 = ROOT / "tests" / "fixtures" / "paper_table5.tsv"
COLUMN = {"qwen3_vl": 1, "internvl": 2}  # "RL of QwenVL Model Series", "RL of InternVL Model Series"


def table5(family: str) -> dict[str, float]:
    """One column of Table 5 as ``{row name: number}`` (non-numeric rows such as dtype are strings)."""
    out: dict[str, float] = {}
    for line in TABLE5.read_text(encoding="utf-8").splitlines()[2:]:
        cells = line.split("\t")
        if len(cells) == 3 and cells[1]:
            try:
                out[cells[0]] = float(cells[COLUMN[family]])
            except ValueError:
                out[cells[0]] = cells[COLUMN[family]]
    return out


@pytest.mark.parametrize("name, family", [("rl_qwen3vl", "qwen3_vl"), ("rl_internvl", "internvl")])
def test_paper_recipes_carry_table5(capsys, monkeypatch, name, family):
    t = table5(family)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        cli.lightning_cli(["fit", "--config", f"configs/{name}.yaml", "--print_config"])
    cfg = yaml.safe_load(capsys.readouterr().out)
    m, r = cfg["model"]["init_args"], cfg["model"]["init_args"]["rollout"]
    assert cfg["trainer"]["max_epochs"] == t["epochs"]
    assert cfg["data"]["init_args"]["batch_size"] * cfg["trainer"]["devices"] == t["batch size"]
    assert m["clip_eps"] == t["clip_ratio $\\epsilon$"] and m["alpha"] == t["reward weight $\\alpha$"]
    assert m["beta"] == t["KL weight $\\beta$"] and m["gamma"] == t["Entropy weight $\\gamma$"]
    assert m["lr"] == t["LR"] and m["warmup_steps"] == t["LR warmup steps"] and t["LR scheduler name"] == "cosine"
    assert m["n_samples"] == t["n_samples"] and r["max_new_tokens"] == t["max_response_length"]
    assert (r["temperature"], r["top_p"], r["top_k"]) == (t["temperature"], t["top_p"], t["top_k"])
    assert SamplingParams(**r) == TABLE5_ROLLOUT[family]  # the library's table agrees with the paper's


@pytest.mark.parametrize("name, beta, gamma, temperature, top_p, top_k", [
    ("rl_qwen3vl", 0.005, 0.0, 0.7, 0.9, 50), ("rl_internvl", 0.0, 0.01, 0.7, 0.7, -1),
    ("demo_rl", 0.0, 0.0, 1.0, 0.9, 50)])  # the CPU demo explores more (see configs/demo_rl.yaml)
def test_rl_config_resolves(capsys, monkeypatch, name, beta, gamma, temperature, top_p, top_k):
    """In-process (fast); the subprocess test below checks the real command once."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        cli.lightning_cli(["fit", "--config", f"configs/{name}.yaml", "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    m = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"] == "egm.rl.module.GRPOModule"
    assert (m["beta"], m["gamma"], m["rollout"]["top_p"], m["rollout"]["top_k"]) == (beta, gamma, top_p, top_k)
    assert m["clip_eps"] == 0.2 and m["alpha"] == 0.5 and m["rollout"]["temperature"] == temperature
    if name != "demo_rl":
        assert m["lr"] == 3e-6 and m["warmup_steps"] == 30 and m["n_samples"] == 16
        assert m["rollout"]["max_new_tokens"] == 1024 and m["engine"] == "vllm"
        assert cfg["trainer"]["max_epochs"] == 5 and cfg["trainer"]["devices"] == 8
        assert cfg["data"]["init_args"]["batch_size"] * cfg["trainer"]["devices"] == 256
        # the family's Table 5 column is the source of truth for the rollout block
        family = {"egm.models.Qwen3VLAdapter": "qwen3_vl", "egm.models.InternVLAdapter": "internvl"}[
            m["adapter"]["class_path"]]
        assert SamplingParams(**m["rollout"]) == TABLE5_ROLLOUT[family]
        # verl's ppo_mini_batch_size (256 prompts, all GPUs) = the batch: one optimiser step per rollout batch
        assert m["mini_batch_size"] * cfg["trainer"]["devices"] == 256 and m["ppo_epochs"] == 1
        # verl numerics: AdamW weight decay 0.01, fp32 master weights with bf16 compute, its LR schedule
        assert m["weight_decay"] == 0.01 and m["lr_schedule"] == "verl"
        assert cfg["trainer"]["precision"] == "bf16-mixed" and m["adapter"]["init_args"]["torch_dtype"] == "float32"
        assert m["dynamic_sampling"] is False  # DAPO is not the paper's recipe


def test_egm_fit_print_config_command():
    r = subprocess.run([sys.executable, "-m", "egm.cli", "fit", "--config", "configs/rl_internvl.yaml",
                        "--print_config"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "egm.rl.module.GRPOModule" in r.stdout and "InternVLAdapter" in r.stdout

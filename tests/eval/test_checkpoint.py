"""evaluate() end to end on a tiny offline Qwen3-VL checkpoint through the adapter's generate path."""

import pytest
import torch
from PIL import Image

from egm.data.manifest import Sample
from egm.eval.checkpoint import hf_generate_fn
from egm.eval.runner import evaluate
from egm.generation.hf import count_generated
from egm.generation.sampling import SamplingParams
from egm.models import Qwen3VLAdapter


def test_count_generated_stops_at_first_stop_token():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9]])
    assert count_generated(ids, {2, 0}) == [3, 5]


@pytest.mark.timeout(60)
def test_tiny_qwen_end_to_end(qwen_dir, tmp_path):
    adapter = Qwen3VLAdapter(str(qwen_dir))
    torch.manual_seed(0)
    model = adapter.load_model().eval()
    gen = hf_generate_fn(adapter, model, SamplingParams(max_new_tokens=8))
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (90, 120, 30)).save(img)
    samples = [Sample(id=f"s{i}", image=str(img), width=64, height=64, sentence="the red car", task="vanilla",
                      box=[8.0, 8.0, 40.0, 40.0], split="refcoco_unc_val", source="synthetic") for i in range(4)]
    res = evaluate(gen, {"refcoco_unc_val": samples}, tmp_path / "run", batch_size=2, parse_fn=adapter.parse,
                   model_name="tiny", latency_fraction=0.25)
    m = res["splits"]["refcoco_unc_val"]
    assert m["n"] == 4 and 0 < m["mean_tokens"] <= 8
    assert res["latency"]["n"] == 1 and res["latency"]["mean_ms"] > 0


def test_evaluate_checkpoint_from_manifest(tiny_dirs, tmp_path):
    from egm.data.manifest import write_manifest
    from egm.eval.checkpoint import evaluate_checkpoint

    ckpt = tiny_dirs["internvl"]
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (90, 120, 30)).save(img)
    man = tmp_path / "cocoa_val.jsonl"
    write_manifest(man, [Sample(id=f"s{i}", image=str(img), width=64, height=64, sentence="the cup", task="amodal",
                                box=[8.0, 8.0, 40.0, 70.0], split="cocoa_val", source="synthetic") for i in range(2)])
    res = evaluate_checkpoint(str(ckpt), {"cocoa_val": str(man)}, str(tmp_path / "run"), family="internvl",
                              torch_dtype="float32", device="cpu", max_new_tokens=4, latency_fraction=0.5)
    assert res["splits"]["cocoa_val"]["n"] == 2 and res["n_params"] > 0 and res["model"] == ckpt.name


def test_engine_generate_fn_over_a_rollout_engine(qwen_dir, tmp_path):
    """The vLLM evaluation path goes through the rollout-engine interface; check it with the HF engine."""
    import transformers

    from egm.eval.checkpoint import _count_params, engine_generate_fn
    from egm.generation.hf import HFEngine

    adapter = Qwen3VLAdapter(str(qwen_dir))
    model = adapter.load_model().eval()
    exs = [{"sample": Sample(id=f"s{i}", image="x.png", width=64, height=64, sentence="the red car",
                             task="vanilla", box=[8.0, 8.0, 40.0, 40.0], split="v", source="t"),
            "image": Image.new("RGB", (64, 64), (30 * i, 120, 30))} for i in range(3)]
    greedy = SamplingParams(max_new_tokens=8)
    engine = HFEngine(adapter, model)
    outs = engine_generate_fn(engine, greedy)(exs)
    ro = engine.generate(exs, n=1, sampling=greedy)  # greedy: the same answers again
    assert [o.text for o in outs] == ro.texts and [o.num_tokens for o in outs] == ro.lengths.tolist()
    assert all(1 <= o.num_tokens <= 8 for o in outs)
    cfg = transformers.AutoConfig.from_pretrained(qwen_dir)
    assert _count_params(cfg) == sum(p.numel() for p in model.parameters())


def test_vllm_engine_without_vllm_is_a_clear_error(qwen_dir, tmp_path, monkeypatch):
    import sys

    from egm.eval.checkpoint import evaluate_checkpoint

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM
    with pytest.raises(ImportError, match="egm\\[gpu\\]"):
        evaluate_checkpoint(str(qwen_dir), {}, str(tmp_path), engine="vllm", device="cpu", torch_dtype="float32")
    with pytest.raises(ValueError, match="engine must be"):
        evaluate_checkpoint(str(qwen_dir), {}, str(tmp_path), engine="tgi")

"""Shared-prefix forward (egm/rl/prefix.py) against the per-response forward, on both tiny families.

The reference scores each response alone, as the unshared sequence ``[prompt, completion]``
through the model's own HF forward (``model(**ro.model_inputs(...)).logits``), one response at a
time (no padding), and sums the gradients. The shared path packs several groups, uneven
response lengths and different prompt lengths (prompt lengths differ by image size and sentence)
into one micro-batch, in a shuffled response order.

Tolerances: transformers' RMSNorm computes in float32 whatever the model dtype (and eager
attention its softmax), so a float64 model's gradients carry float32 rounding (about 1e-7
relative) wherever the two layouts sum gradient contributions in another order; the bound
asked for is 1e-6 (float64) and 1e-5 (float32), per parameter tensor, relative to its norm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from egm.generation.rollout import Rollout, encode_prompts
from egm.models import InternVLAdapter, Qwen3VLAdapter
from egm.models.base import LoraSettings, disable_dropout
from egm.rl import merged_attention
from egm.rl.grpo import entropy_from_logits
from egm.rl.prefix import (SPLIT_ATTENTION, attention_implementation, pack_groups, packed_positions,
                           prefix_micro_batches, shared_prefix_logprobs, shared_prefix_mask, shared_prefix_support,
                           split_layout, use_split_attention)

ADAPTERS = {"qwen3_vl": Qwen3VLAdapter, "internvl": InternVLAdapter}
TEMPERATURE = 0.7
G = 3
LENGTHS = [1, 5, 3, 4, 2, 6]  # uneven; a 1-token response predicts from the prompt alone
ORDER = [4, 0, 2, 5, 1, 3]  # shuffled: both groups' responses interleaved


def _image(rng, w, h):
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_rollout(adapter, lengths=LENGTHS, group=G, seed=0) -> Rollout:
    """Two prompts of different lengths (image size and sentence) x ``group`` random completions."""
    rng = np.random.default_rng(seed)
    exs = [{"image": _image(rng, 64, 64), "sentence": "the red circle"},
           {"image": _image(rng, 96, 64), "sentence": "the small blue square on the left behind the circle"}]
    exs = exs[: len(lengths) // group]
    lengths = torch.tensor(lengths)
    T = int(lengths.max())
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, 300, (len(lengths), T), generator=gen)  # ordinary tokens, no placeholders
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, adapter.pad_token_id)
    return Rollout(exs, encode_prompts(adapter, exs), ids, mask, lengths, torch.zeros(len(lengths), dtype=torch.bool),
                   [""] * len(lengths), group)


def load(tiny_dirs, family, dtype="float64", attn="sdpa", lora=False, checkpointing=False, split=False):
    ad = ADAPTERS[family](str(tiny_dirs[family]), torch_dtype=dtype, attn_implementation=attn,
                          lora=LoraSettings(rank=4, alpha=8) if lora else None, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = ad.load_model()
    disable_dropout(model)
    model.train()
    if lora:  # LoRA B starts at 0 (zero gradient for A): make every adapter weight matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    if split:
        assert use_split_attention(model) is None and attention_implementation(model) == SPLIT_ATTENTION
    return ad, model


def merged_spy(monkeypatch, enabled: bool) -> list:
    """Record the calls of the log-sum-exp merged completions' attention; ``enabled=False`` makes
    it unsupported, as on a device without the kernel (the copied-K/V path runs then)."""
    calls = []
    real = merged_attention.prefix_completion_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(merged_attention, "prefix_completion_attention", spy)
    if not enabled:
        monkeypatch.setattr(merged_attention, "supported", lambda *a, **k: False)
    return calls


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def per_response(model, ad, ro, idx, w, u):
    """Reference: each response alone through the HF forward; log-probs, entropies, summed gradients."""
    logp, ent = torch.zeros_like(w), torch.zeros_like(w)
    model.zero_grad(set_to_none=True)
    for r, i in enumerate(idx):
        inputs, comp, mask = ro.model_inputs(ad, [i])
        t = comp.shape[1]
        logits = model(**inputs).logits[:, -t - 1:-1] / TEMPERATURE
        lp = torch.log_softmax(logits, -1).gather(-1, comp[..., None])[..., 0]
        en = entropy_from_logits(logits)
        ((w[r:r + 1, :t] * lp + u[r:r + 1, :t] * en) * mask).sum().backward()
        logp[r, :t], ent[r, :t] = lp.detach()[0], en.detach()[0]
    return logp, ent, grads(model)


def shared(model, ad, ro, idx, w, u):
    logp, ent, comp, mask = shared_prefix_logprobs(model, ad, ro, idx, TEMPERATURE, True, True)
    model.zero_grad(set_to_none=True)
    ((w * logp + u * ent) * mask).sum().backward()
    return logp.detach(), ent.detach(), mask.bool(), grads(model)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same(model, ad, ro, idx, tol):
    idx = torch.tensor(idx)
    t = int(ro.lengths[idx].max())
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    w, u = torch.randn(len(idx), t, generator=gen, dtype=dtype), torch.randn(len(idx), t, generator=gen, dtype=dtype)
    logp, ent, mask, g = shared(model, ad, ro, idx, w, u)
    ref_logp, ref_ent, g_ref = per_response(model, ad, ro, idx, w, u)
    assert rel(logp[mask], ref_logp[mask]) <= tol and rel(ent[mask], ref_ent[mask]) <= tol
    assert g.keys() == g_ref.keys() and len(g) > 0
    worst = max((rel(g[k], g_ref[k]), k) for k in g_ref)
    assert worst[0] <= tol, worst
    return g


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
@pytest.mark.parametrize("variant", ["split", "split-lora", "split-checkpointing", "copied", "copied-checkpointing",
                                     "mask", "mask-lora", "mask-checkpointing", "mask-eager"])
def test_float64_equals_per_response(tiny_dirs, family, variant, monkeypatch):
    """Both ways of keeping completions apart (split attention, dense mask), against the
    per-response HF forward (which runs plain SDPA: the split function without a layout).
    ``split``: the completions' attention merged by log-sum-exp (the CPU kernel, counted);
    ``copied``: split attention as it runs off CPU, the prompt's K/V copied per completion."""
    calls = merged_spy(monkeypatch, enabled=not variant.startswith("copied"))
    if variant.startswith("copied"):
        variant = variant.replace("copied", "split")
    ad, model = load(tiny_dirs, family, "float64", attn="eager" if variant.endswith("eager") else "sdpa",
                     lora=variant.endswith("lora"), checkpointing=variant.endswith("checkpointing"),
                     split=variant.startswith("split"))
    ro = make_rollout(ad)
    packed = pack_groups(model, ad, ro, torch.tensor(ORDER))
    R, L = packed.inputs["input_ids"].shape
    dense = packed.inputs["attention_mask"].shape == (R, 1, L, L)
    assert dense == variant.startswith("mask")  # split: no (L, L) mask is built
    g = assert_same(model, ad, ro, ORDER, 1e-6)
    assert (len(calls) > 0) == (variant.startswith("split") and merged_attention.supported(next(model.parameters())))
    if variant.endswith("lora"):
        assert any("lora_A" in k for k in g) and not any("lora" not in k for k in g)
    else:  # the vision tower is trained through the one shared encoding
        assert any(k.startswith(ad.vision_attr) for k in g)


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
@pytest.mark.parametrize("kind", ["split", "copied", "mask"])
def test_float32_equals_per_response_on_a_partial_group(tiny_dirs, family, kind, monkeypatch):
    merged_spy(monkeypatch, enabled=kind != "copied")
    ad, model = load(tiny_dirs, family, "float32", split=kind != "mask")
    ro = make_rollout(ad)
    assert_same(model, ad, ro, [5, 0, 3], 1e-5)  # a micro-batch holding parts of both groups


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
def test_packing_counts_each_prompt_once_and_uses_the_unshared_positions(tiny_dirs, family):
    ad, model = load(tiny_dirs, family, "float32")
    ro = make_rollout(ad)
    packed = pack_groups(model, ad, ro, ORDER)
    P = [e["input_ids"].shape[-1] for e in ro.prompt_encodings]
    assert packed.rows == [0, 1]  # rows by prompt, whatever the order of idx
    L = max(P[j] + sum(LENGTHS[i] - 1 for i in range(j * G, (j + 1) * G)) for j in (0, 1))
    assert packed.inputs["input_ids"].shape == (2, L) and packed.num_positions == 2 * L == packed_positions(ro, ORDER)
    assert pack_groups(model, ad, ro, [5, 3]).num_positions == packed_positions(ro, [5, 3]) == P[1] + 5 + 3
    # images: each prompt's pixel tensors once
    key = "pixel_values"
    assert packed.inputs[key].shape[0] == sum(e[key].shape[0] for e in ro.prompt_encodings)
    # row 0 (prompt 0): prompt, then the inputs c[:-1] of responses 0 (none), 1, 2
    ids = packed.inputs["input_ids"][0]
    c = ro.completion_ids
    expect = torch.cat([ro.prompt_encodings[0]["input_ids"][0], c[0, :0], c[1, :4], c[2, :2]])
    assert torch.equal(ids[:len(expect)], expect) and (ids[len(expect):] == ad.pad_token_id).all()
    # positions of response 1's inputs = those of the full unshared sequence [prompt 0, c_1]
    pos = packed.inputs["position_ids"]
    backbone = model.model
    full = torch.cat([ro.prompt_encodings[0]["input_ids"][0], c[1, :4]])[None]
    if family == "qwen3_vl":
        types = torch.cat([ro.prompt_encodings[0]["mm_token_type_ids"][0], torch.zeros(4, dtype=torch.long)])[None]
        want, _ = backbone.get_rope_index(full, types, image_grid_thw=ro.prompt_encodings[0]["image_grid_thw"])
        want = want[:, 0]
        start = P[0]
        assert torch.equal(pos[:, 0, :P[0]], want[:, :P[0]])
        assert torch.equal(pos[:, 0, start:start + 4], want[:, P[0]:])
        assert not torch.equal(want[0], want[1])  # really 3-D: image tokens have grid positions
    else:
        start = P[0]
        assert torch.equal(pos[0, start:start + 4], torch.arange(P[0], P[0] + 4))
        assert full.shape[1] == P[0] + 4
    # hidden-state index: response 2's first token is predicted by the prompt's last position
    r2 = ORDER.index(2)
    assert packed.index[r2, 0] == P[0] - 1 and packed.index[r2, 1] == P[0] + 4
    # the same responses in another order: the same packed rows, outputs in the new order
    again = pack_groups(model, ad, ro, sorted(ORDER))
    assert torch.equal(again.inputs["input_ids"], packed.inputs["input_ids"])
    assert torch.equal(again.index[torch.tensor(ORDER)], packed.index)  # ORDER permutes 0..B-1


def test_micro_batches_keep_groups_together_within_the_token_budget(tiny_dirs):
    ad = ADAPTERS["qwen3_vl"](str(tiny_dirs["qwen3_vl"]))
    ro = make_rollout(ad)
    P = [e["input_ids"].shape[-1] for e in ro.prompt_encodings]
    whole = P[1] + sum(n - 1 for n in LENGTHS[3:])  # group 1 (the longer prompt) in one row
    shuffled = torch.tensor(ORDER)
    mbs = prefix_micro_batches(ro, shuffled, max_tokens=whole)
    assert [m.tolist() for m in mbs] == [[0, 1, 2], [3, 4, 5]]  # one group each: both fit, never mixed
    assert all(packed_positions(ro, m) <= whole for m in mbs)
    tight = prefix_micro_batches(ro, shuffled, max_tokens=P[1] + 3)
    assert sorted(torch.cat(tight).tolist()) == list(range(6))
    assert all(len(set(ro.prompt_index[m].tolist())) == 1 for m in tight)  # a split group, never two prompts
    assert [m.tolist() for m in tight if 5 in m.tolist()] == [[5]]  # 6 tokens > budget: alone
    by_count = prefix_micro_batches(ro, shuffled, max_responses=4)
    assert [m.tolist() for m in by_count] == [[0, 1, 2, 3], [4, 5]]


def test_mask_completions_see_the_prompt_and_their_own_past_only():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = shared_prefix_mask(seg, "sdpa", torch.float32)[0, 0].int()
    assert m.tolist() == [[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0],
                          [1, 1, 0, 0, 1, 0],
                          [0, 0, 0, 0, 0, 1]]  # padding attends to itself only
    f = shared_prefix_mask(seg, "eager", torch.float64)
    assert f.dtype == torch.float64 and torch.equal(f == 0, m.bool()[None, None])


def test_split_layout_by_hand():
    """Two rows: prompt 2 + completions of 2 and 1 inputs; prompt 3 + one completion of 1."""
    seg = torch.tensor([[0, 0, 1, 1, 2, -1],
                        [0, 0, 0, 1, -1, -1]])
    lay = split_layout(seg)
    assert (lay.groups, lay.width) == (2, 2)
    assert lay.prefix_index.tolist() == [[0, 1, 0], [0, 1, 2]]
    assert lay.comp_index.tolist() == [[2, 3, 4, 0], [3, 0, 0, 0]]
    # slot (row 0, completion 1): its 2 prompt keys (3rd masked as padding), then itself causally
    assert lay.comp_mask[0, 0].int().tolist() == [[1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    assert lay.comp_mask[2, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # outputs: prompts at r * 3 + i, completion slots after the 6 prompt slots, padding -> zero row 14
    assert lay.source.tolist() == [0, 1, 6, 7, 8, 14,
                                   3, 4, 5, 10, 14, 14]


def test_split_attention_without_a_layout_is_sdpa(tiny_dirs):
    """The switch changes nothing outside the shared-prefix forward: logits and greedy generation
    of the ordinary forward are bitwise those of SDPA, and the saved config does not name it."""
    ad, model = load(tiny_dirs, "qwen3_vl", "float32")
    model.eval()
    inputs = make_rollout(ad).model_inputs(ad, [0, 1, 2])[0]
    before, gen_before = model(**inputs).logits, model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert use_split_attention(model) is None and attention_implementation(model) == SPLIT_ATTENTION
    assert torch.equal(model(**inputs).logits, before)
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_before)
    assert hf_config_text(model).find("egm") < 0


def hf_config_text(model) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.config.save_pretrained(d)
        return open(f"{d}/config.json").read()


def test_attention_without_arbitrary_masks_is_refused_with_its_name(tiny_dirs):
    ad, model = load(tiny_dirs, "internvl", "float32")
    assert shared_prefix_support(model) is None
    model.config.text_config._attn_implementation = "flash_attention_2"
    reason = shared_prefix_support(model)
    assert reason is not None and "flash_attention_2" in reason


# --- GRPOModule: prompts encoded once per pass, same step as per response, ratio exactly 1 ----------


@pytest.fixture(scope="module")
def train_manifest(tmp_path_factory):
    from egm.data.synthetic import make_synthetic

    return make_synthetic(str(tmp_path_factory.getbasetemp() / "syn_prefix"), n_train=4, n_val=2, n_test=2,
                          image_size=64)["train"]


class Counter:
    """Forward hooks: images into the vision towers and token positions into the language models."""

    def __init__(self, family):
        self.family, self.calls = family, []  # one (images, positions) per vision-tower call

    def vision(self, module, args, kwargs, out):
        if self.family == "qwen3_vl":
            self.calls.append([int(kwargs["grid_thw"].shape[0]), 0])
        else:  # tiles; the tiny InternVL has one tile per image
            self.calls.append([int(kwargs["pixel_values"].shape[0]), 0])

    def language(self, module, args, kwargs, out):
        emb = kwargs["inputs_embeds"]
        self.calls[-1][1] += emb.shape[0] * emb.shape[1]


def _step(train_manifest, ckpt, family, shared_prefix):
    import lightning as L

    from egm.data.datamodule import GroundingDataModule
    from egm.generation.sampling import SamplingParams
    from egm.rl.module import GRPOModule

    m = GRPOModule(ADAPTERS[family](str(ckpt)), lr=1e-3, warmup_steps=0, n_samples=4, beta=0.01,
                   rollout=SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=8),
                   ppo_epochs=2, micro_batch_size=8, max_grad_norm=None, shared_prefix=shared_prefix)
    m.configure_model()
    counter = Counter(family)
    generate = None

    def count_after_rollout(*a, **kw):  # rollouts use the vision tower too: count the training passes only
        ro = generate(*a, **kw)
        for model in (m.model, m.reference.model):
            backbone = model.model
            lm = backbone.language_model
            m.adapter.vision_tower(model).register_forward_hook(counter.vision, with_kwargs=True)
            lm.register_forward_hook(counter.language, with_kwargs=True)
        m.last_rollout = ro
        return ro

    def on_fit_start():
        nonlocal generate
        type(m).on_fit_start(m)
        generate = m.engine.generate
        m.engine.generate = count_after_rollout

    m.on_fit_start = on_fit_start
    t = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0)
    t.fit(m, GroundingDataModule(train=train_manifest, batch_size=2))
    return m, counter.calls


@pytest.mark.parametrize("family", ["qwen3_vl", "internvl"])
def test_grpo_step_encodes_each_prompt_once_per_pass(tiny_dirs, train_manifest, family, monkeypatch):
    import egm.rl.module as rl_module
    from egm.reward import grounding_reward

    def spread(texts, gt_boxes, sizes, parse=None, alpha=0.5):  # distinct rewards: advantages != 0
        out = grounding_reward([None] * len(texts), gt_boxes, alpha)
        return type(out)(np.linspace(0, 1, len(texts)), out.iou, out.success, out.parse_ok, out.failures)

    monkeypatch.setattr(rl_module, "reward_from_texts", spread)
    m, calls = _step(train_manifest, tiny_dirs[family], family, True)
    ro = m.last_rollout
    P, B = len(ro.examples), len(ro)
    assert (P, B) == (2, 8) and m.last_stats["optimizer_steps"] == 2
    # the default: split attention, in the policy and the reference alike
    assert attention_implementation(m.model) == attention_implementation(m.reference.model) == SPLIT_ATTENTION
    packed = pack_groups(m.model, m.adapter, ro)
    # 4 passes (old log-probs, reference, 2 updates), each one micro-batch: P images, one row per prompt
    assert calls == [[P, packed.num_positions]] * 4
    s = m.last_stats["first_minibatch"]
    assert s["ppo_kl"] == 0.0 and s["clip_frac"] == 0.0  # PPO ratio exactly 1 at the first update

    m2, calls2 = _step(train_manifest, tiny_dirs[family], family, False)
    ro2 = m2.last_rollout
    assert torch.equal(ro2.completion_ids, ro.completion_ids)  # same rollout, so the same step
    per_response = ro2.model_inputs(m2.adapter)[0]["input_ids"].numel()
    assert calls2 == [[B, per_response]] * 4  # G images per prompt per pass
    assert packed.num_positions < per_response
    for k in ("loss", "kl", "entropy", "pg_loss"):
        assert m.last_stats[k] == pytest.approx(m2.last_stats[k], rel=1e-5, abs=1e-7), k


def test_grpo_module_falls_back_to_per_response_with_the_reason(tiny_dirs, caplog):
    from egm.rl.module import GRPOModule

    m = GRPOModule(InternVLAdapter(str(tiny_dirs["internvl"])), n_samples=2, rollout=_sampling())
    m.configure_model()
    assert m.shared_prefix and attention_implementation(m.model) == SPLIT_ATTENTION  # sdpa: on, split
    mask = GRPOModule(InternVLAdapter(str(tiny_dirs["internvl"])), n_samples=2, rollout=_sampling(),
                      prefix_attention="mask")
    mask.configure_model()
    assert mask.shared_prefix and attention_implementation(mask.model) == "sdpa"
    ad = InternVLAdapter(str(tiny_dirs["internvl"]), attn_implementation="eager")
    with caplog.at_level("INFO", logger="egm.rl.module"):
        eager = GRPOModule(ad, n_samples=2, rollout=_sampling())
        eager.configure_model()
    assert eager.shared_prefix and attention_implementation(eager.model) == "eager"  # the dense mask
    assert "dense attention mask" in caplog.text and "'eager'" in caplog.text
    caplog.clear()
    off = GRPOModule(ad, n_samples=2, rollout=_sampling(), shared_prefix=False)
    off.configure_model()
    assert not off.shared_prefix
    # an implementation without arbitrary masks: configure_model switches to per response and says why
    flash = GRPOModule(ad, n_samples=2, rollout=_sampling())
    flash.model = None
    model = ad.load_model()
    model.config.text_config._attn_implementation = "flash_attention_2"
    flash.load_policy = lambda: model
    with caplog.at_level("WARNING", logger="egm.rl.module"):
        flash.configure_model()
    assert not flash.shared_prefix
    assert "shared_prefix off, log-probs computed per response" in caplog.text and "flash_attention_2" in caplog.text


def _sampling():
    from egm.generation.sampling import SamplingParams

    return SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=4)


def test_bench_cost_model_by_hand():
    """tools/bench_prefix.py's cost model: one layer, one head of 64, no vision and no head
    vocabulary, checked against multiply-adds counted by hand; then the head and vision terms."""
    from egm.cli import load_script

    bp = load_script("tools/bench_prefix.py")
    text = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=1,
                num_key_value_heads=1, head_dim=64)
    per_token_linear = 4 * 64 * 64 + 3 * 64 * 128  # q, k, v, o projections + gate, up, down
    assert bp.lm_macs(text, 10, 7) == 10 * (per_token_linear + 2 * 64 * 7)
    P, G, C = 30, 4, 5
    L = P + G * C
    per_response = G * (P + C) * (per_token_linear + 2 * 64 * (P + C))
    dense = L * (per_token_linear + 2 * 64 * L)
    split = P * (per_token_linear + 2 * 64 * P) + G * C * (per_token_linear + 2 * 64 * (P + C))
    assert bp.predicted_speedup(text, 0, 0.0, P, G, C, "mask") == pytest.approx(per_response / dense, rel=1e-12)
    assert bp.predicted_speedup(text, 0, 0.0, P, G, C) == pytest.approx(per_response / split, rel=1e-12)
    head = G * C * 64 * 1000
    assert bp.predicted_speedup(text, 1000, 5e6, P, G, C) == pytest.approx(
        (per_response + G * 5e6 + head) / (split + 5e6 + head), rel=1e-12)
    assert bp.vision_macs(32, 2, 64, 10, 10) == 2 * 10 * (4 * 32 * 32 + 2 * 32 * 64 + 2 * 32 * 10)

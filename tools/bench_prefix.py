"""Shared-prefix vs per-response GRPO training passes (old log-probs, reference, update) at the paper's token shapes.

Model: random weights from a config with the real 151,936-row vocabulary (embedding and
``lm_head``), a trunk of ``--hidden`` x ``--layers`` (Qwen3-VL-like: 8 heads of 64, 4 KV heads,
MLP 3x hidden) and a shallow vision tower (``--vision-depth`` x ``--vision-hidden``). Inputs:
``P`` prompts shaped as the real processors shape them -- Qwen3-VL: a 586x480 image is an image
grid of 30x36 patches (270 tokens after the 2x2 merge); InternVL3: a 640x427 image at
``max_patches`` 12 is 7 tiles of 448x448 (7 x 256 = 1,792 tokens) -- plus ``--text`` text
tokens, and ``G`` responses of ``C`` tokens each. The adapter (collation, padding) is the tiny
checkpoint's, whose special-token ids the config reuses.

Each phase runs as :class:`egm.rl.module.GRPOModule` runs it, over micro-batches (``--micro``
responses, or ``--micro-tokens``: the same token budget for every path, each path counting tokens
as it computes them, groups kept whole by the shared prefix), every path through the chunked head
(:mod:`egm.models.head`, 512 tokens per chunk): old log-probs and reference log-probs
(``no_grad``; the reference is a frozen copy), update (log-probs + exact entropy with grad,
:func:`egm.rl.grpo.grpo_loss`, backward, one optimiser step). The paths alternate in this process,
``--repeat`` rounds (median): per response, shared prefix with split attention (the default),
``--mask`` the shared prefix with the dense mask, ``--trl`` TRL GRPOTrainer's scoring on the same
model and inputs (a whole-sequence forward per response, ``logits_to_keep``,
``selective_log_softmax``, entropy without gradient). Peak memory: each round's peak RSS growth in
this process (freed memory returned with ``malloc_trim`` and the high-water mark reset through
``/proc/self/clear_refs`` before each round; Linux). Each round line also gives ``sys_s``, the
kernel time of the round: on CPU it is mostly the page faults of memory the allocator takes fresh
from the system (every round starts trimmed). glibc's transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` where the kernel's THP mode is ``madvise``) cut the
number of faults but not that time (docs/shared_prefix.md, run g). The first line printed is this
CPU's matmul rate in float32 and bf16 (:func:`matmul_gflops`); ``--dtype bfloat16`` stops there
with an error where bf16 is over 4x slower than float32 (x86 CPUs with AVX2 but no AVX512 have
no bf16 GEMM kernel: a round would take hours). A cost model
(:func:`predicted_speedup`) prints the speed-up the arithmetic predicts for this trunk and for the released sizes.

    .venv-test/bin/python tools/bench_prefix.py --family qwen3_vl --G 16 --C 120 --hidden 512 --layers 96 \
        --micro-tokens 4096 --dtype bfloat16 --trl --repeat 2 --threads 2
    .venv-test/bin/python tools/bench_prefix.py --family internvl --G 16 --C 120 --hidden 512 --layers 48 \
        --micro-tokens 4096 --dtype bfloat16 --trl --repeat 2 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 151_936
PROBE_N = 256  # matmul size of the machine fingerprint (matmul_gflops)


def build(family: str, a, tiny: Path):
    """(adapter, policy, reference, prompt encodings) for ``a.prompts`` prompts of the family's real shape."""
    import transformers

    from egm.models import InternVLAdapter, Qwen3VLAdapter

    ad = (Qwen3VLAdapter if family == "qwen3_vl" else InternVLAdapter)(str(tiny))
    ids = ad.tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=VOCAB, hidden_size=a.hidden, intermediate_size=3 * a.hidden, num_hidden_layers=a.layers,
                num_attention_heads=a.hidden // 64, num_key_value_heads=max(a.hidden // 128, 1), head_dim=64,
                max_position_embeddings=32768, tie_word_embeddings=False, pad_token_id=ad.pad_token_id)
    if family == "qwen3_vl":
        cfg = transformers.Qwen3VLConfig(
            text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                     "mrope_section": [12, 10, 10], "mrope_interleaved": True}},
            vision_config=dict(depth=a.vision_depth, hidden_size=a.vision_hidden, intermediate_size=4 * a.vision_hidden,
                               num_heads=a.vision_hidden // 64, patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2, out_hidden_size=a.hidden, num_position_embeddings=2304,
                               deepstack_visual_indexes=list(range(min(a.vision_depth, 2)))),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        cfg = transformers.InternVLConfig(
            vision_config=dict(hidden_size=a.vision_hidden, num_hidden_layers=a.vision_depth,
                               num_attention_heads=a.vision_hidden // 64, intermediate_size=4 * a.vision_hidden,
                               image_size=[448, 448], patch_size=[14, 14]),
            text_config={**text, "model_type": "qwen2"},
            image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=256, downsample_ratio=0.5, tie_word_embeddings=False)
        cls = transformers.InternVLForConditionalGeneration
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).to(getattr(torch, a.dtype)).train()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    encs = [prompt_encoding(family, ad, cfg, a.text, gen) for _ in range(a.prompts)]
    return ad, model, ref, encs


def prompt_encoding(family: str, ad, cfg, n_text: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One prompt as the family's processor encodes a 586x480 (Qwen3-VL) / 640x427 (InternVL3) image."""
    ids = ad.tokenizer.convert_tokens_to_ids
    words = torch.randint(1000, VOCAB - 1000, (n_text,), generator=gen)
    head, tail = words[: n_text // 3], words[n_text // 3:]
    if family == "qwen3_vl":
        grid = torch.tensor([[1, 30, 36]])  # 586x480 -> 480x576 px resized, 16 px patches
        n_img = int(grid.prod()) // 4
        image = torch.cat([torch.tensor([ids("<|vision_start|>")]), torch.full((n_img,), cfg.image_token_id),
                           torch.tensor([ids("<|vision_end|>")])])
        seq = torch.cat([head, image, tail])[None]
        types = (seq == cfg.image_token_id).long()
        return {"input_ids": seq, "attention_mask": torch.ones_like(seq), "mm_token_type_ids": types,
                "pixel_values": torch.randn(int(grid.prod()), 3 * 2 * 16 * 16, generator=gen), "image_grid_thw": grid}
    tiles = 7  # 640x427 at max_patches 12: 3x2 tiles + thumbnail
    image = torch.cat([torch.tensor([ids("<img>")]), torch.full((tiles * 256,), cfg.image_token_id),
                       torch.tensor([ids("</img>")])])
    seq = torch.cat([head, image, tail])[None]
    return {"input_ids": seq, "attention_mask": torch.ones_like(seq),
            "pixel_values": torch.randn(tiles, 3, 448, 448, generator=gen)}


def lm_macs(text: dict, tokens: int, context: float) -> float:
    """Forward multiply-adds of ``tokens`` positions through the language model's layers, each
    attending to ``context`` positions on average (linear layers + attention scores/values)."""
    h, L, inter = text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]
    nh, nkv = text["num_attention_heads"], text["num_key_value_heads"]
    hd = text.get("head_dim") or h // nh
    per_token = L * (2 * h * nh * hd + 2 * h * nkv * hd + 3 * h * inter + 2 * nh * hd * context)
    return tokens * per_token


def vision_macs(hidden: int, depth: int, inter: int, patches: int, window: int) -> float:
    """Forward multiply-adds of a ViT over ``patches`` patches, attention within ``window`` patches."""
    return depth * patches * (4 * hidden * hidden + 2 * hidden * inter + 2 * hidden * window)


def predicted_speedup(text: dict, vocab: int, vision: float, P: int, G: int, C: int,
                      attention: str = "split") -> float:
    """Per-response / shared-prefix forward compute of one group (the backward scales alike), as
    the paths compute it: per response, G x (vision + LM over P + C positions, each scored
    against the P + C keys of its padded row); shared, the vision once and one row of
    P + G C positions -- with ``attention="split"`` the prompt's P positions scored against P
    keys and each completion's C against P + C, with ``"mask"`` every position against all
    L = P + G C keys of the dense row; the head (hidden x vocab) on the G x C completion tokens in
    both. The head is why a narrow trunk caps the gain (at hidden 512 it costs ~3x a stack of 8
    layers per completion token), and the dense row's L^2 attention why long responses cap the
    masked layout (docs/shared_prefix.md)."""
    head = G * C * text["hidden_size"] * vocab
    L = P + G * C
    per_response = G * (vision + lm_macs(text, P + C, P + C)) + head
    if attention == "split":
        shared = vision + lm_macs(text, P, P) + lm_macs(text, G * C, P + C) + head
    else:
        shared = vision + lm_macs(text, L, L) + head
    return per_response / shared


def cost_model_rows(a, P: int) -> list[tuple[str, float]]:
    """Predicted speed-ups at this run's shape for this bench's model and the released sizes."""
    from egm.models.real import ARCHITECTURES

    fam = a.family
    if fam == "qwen3_vl":
        patches, window = 30 * 36, 30 * 36  # one 586x480 image: full attention over its patches
    else:
        patches, window = 7 * 1024, 1024  # 7 tiles of 32 x 32 patches, attention within a tile
    bench_text = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, intermediate_size=3 * a.hidden,
                      num_attention_heads=a.hidden // 64, num_key_value_heads=max(a.hidden // 128, 1), head_dim=64)
    rows = [(f"this bench (hidden {a.hidden} x {a.layers})", predicted_speedup(
        bench_text, VOCAB, vision_macs(a.vision_hidden, a.vision_depth, 4 * a.vision_hidden, patches, window), P, a.G, a.C))]
    for size, arch in ARCHITECTURES[fam].items():
        v = arch["vision"]
        vis = vision_macs(v["hidden_size"], v.get("depth") or v["num_hidden_layers"], v["intermediate_size"], patches, window)
        rows.append((f"released {size}", predicted_speedup(arch["text"], arch["text"]["vocab_size"], vis, P, a.G, a.C)))
    return rows


def rollout(ad, encs, G: int, C: int):
    from egm.generation.rollout import Rollout

    B = len(encs) * G
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, VOCAB - 1000, (B, C), generator=gen)
    return Rollout([{} for _ in encs], encs, ids, torch.ones(B, C, dtype=torch.long), torch.full((B,), C),
                   torch.zeros(B, dtype=torch.bool), [""] * B, G)


PATHS = {"per_response": "per response", "shared": "shared (split)", "mask": "shared (mask)", "trl": "TRL"}


def logprobs(path: str, model, ad, ro, idx, grad: bool):
    from egm.rl.ppo import token_logprobs
    from egm.rl.prefix import shared_prefix_logprobs

    if path in ("shared", "mask"):  # which attention is the model's (set_path)
        logp, ent, _, mask = shared_prefix_logprobs(model, ad, ro, idx, 0.7, grad, grad)
        return logp, ent, mask
    inputs, comp, mask = ro.model_inputs(ad, idx)
    if path == "trl":  # TRL GRPOTrainer's scoring: the whole sequence per response, logits of the
        # last C + 1 positions, temperature, selective_log_softmax; its entropy takes no gradient
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        logits = model(**inputs, logits_to_keep=comp.shape[1] + 1).logits[:, :-1] / 0.7
        logp = selective_log_softmax(logits, comp)
        with torch.no_grad():
            ent = entropy_from_logits(logits)
        return logp, ent, mask
    logp, ent = token_logprobs(model, inputs, comp, 0.7, grad, grad, completion_mask=mask)
    return logp, ent, mask


def set_path(path: str, *models) -> None:
    """Split attention for "shared", SDPA for the others (the split function without a layout is
    SDPA, but "mask" needs SDPA itself to take its dense mask)."""
    from egm.rl.prefix import use_split_attention

    for m in models:
        if path == "shared":
            assert use_split_attention(m) is None
        else:
            m.set_attn_implementation({"text_config": "sdpa"})


def micro_batches(path: str, ro, a) -> list[torch.Tensor]:
    """``--micro-tokens``: the same token budget for every path, counted as each computes it
    (per response: padded prompt + response; shared: rows x longest row, groups kept whole);
    else ``--micro`` responses."""
    from egm.rl.ppo import token_micro_batches
    from egm.rl.prefix import prefix_micro_batches

    if a.micro_tokens is None:
        return list(torch.arange(len(ro)).split(a.micro))
    if path in ("shared", "mask"):
        return prefix_micro_batches(ro, None, a.micro_tokens)
    return token_micro_batches(torch.arange(len(ro)), ro.sequence_lengths, a.micro_tokens)


def run_round(path: str, ad, model, ref, ro, a) -> dict[str, float]:
    """Seconds of the three phases for one rollout batch, and the round's peak RSS growth (GiB)."""
    from egm.rl.grpo import grpo_loss

    set_path(path, model, ref)
    micros = micro_batches(path, ro, a)
    base = reset_peak()
    sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    out = {}
    for name, m in (("old", model), ("ref", ref)):
        t0 = time.perf_counter()
        with torch.no_grad():
            for idx in micros:
                logprobs(path, m, ad, ro, idx, False)
        out[name] = time.perf_counter() - t0
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a real step that leaves the weights as they are
    adv = torch.linspace(-1, 1, len(ro))
    norm = ro.completion_mask.sum().float()
    t0 = time.perf_counter()
    for idx in micros:
        logp, ent, mask = logprobs(path, model, ad, ro, idx, True)
        loss, _ = grpo_loss(logp.float(), logp.detach().float(), adv[idx], mask, None, ent.float(), gamma=0.01,
                            normalizer=norm)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["update"] = time.perf_counter() - t0
    out["peak_gib"] = vm("VmHWM") - base
    out["sys_s"] = resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0  # mostly page faults of fresh memory
    out["micro_batches"] = len(micros)
    return out


def vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> float:
    """Return freed memory to the system and reset the peak RSS (Linux: ``clear_refs`` 5), so that
    each round's ``VmHWM`` is its own; returns the RSS the round starts from."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return vm("VmRSS")


def matmul_gflops(dtype: torch.dtype, n: int = PROBE_N, reps: int = 4) -> float:
    """This CPU's rate for an ``n x n`` matmul in ``dtype`` (GFLOP/s): a fingerprint of the machine
    printed with the results, and the check that ``--dtype bfloat16`` is usable here at all. Where
    the CPU has no bf16 GEMM kernel (AVX2-only x86: no AVX512 for oneDNN's bf16 path), torch falls
    back to a reference loop several hundred times slower than float32."""
    x = torch.randn(n, n, dtype=dtype)
    x @ x
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ x
    return reps * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["qwen3_vl", "internvl"], default="qwen3_vl")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--G", type=int, default=16)
    ap.add_argument("--C", type=int, default=120, help="response tokens")
    ap.add_argument("--text", type=int, default=30, help="text tokens of the prompt (besides the image)")
    ap.add_argument("--micro", type=int, default=16, help="responses per micro-batch (without --micro-tokens)")
    ap.add_argument("--micro-tokens", type=int, default=None,
                    help="token budget per micro-batch, the same for every path (as GRPOModule's micro_batch_tokens)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=256)
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mask", action="store_true", help="also the shared prefix with the dense mask")
    ap.add_argument("--trl", action="store_true", help="also TRL's scoring (needs trl; the test venv has it)")
    ap.add_argument("--json", help="write the measurements to this file")
    return ap.parse_args()


def main() -> None:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    rates = {dt: matmul_gflops(getattr(torch, dt)) for dt in ("float32", "bfloat16")}
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; matmul {PROBE_N}x{PROBE_N}: "
          + ", ".join(f"{dt} {r:.1f} GFLOP/s" for dt, r in rates.items()), flush=True)
    if a.dtype == "bfloat16" and rates["bfloat16"] < rates["float32"] / 4:
        raise SystemExit(f"--dtype bfloat16: this CPU multiplies bf16 matrices at {rates['bfloat16']:.1f} GFLOP/s "
                         f"against {rates['float32']:.1f} in float32 (no bf16 GEMM kernel); a round would take "
                         "hours. Run with --dtype float32.")
    from egm.models.tiny import tiny_checkpoint

    if a.trl:
        import trl.trainer.utils  # noqa: F401  (imported before timing)

    paths = ["per_response", "shared"] + (["mask"] if a.mask else []) + (["trl"] if a.trl else [])
    with tempfile.TemporaryDirectory() as d:
        ad, model, ref, encs = build(a.family, a, tiny_checkpoint(a.family, Path(d) / "tiny"))
        ro = rollout(ad, encs, a.G, a.C)
        times: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
        for _ in range(a.repeat):
            for path in paths:
                times[path].append(run_round(path, ad, model, ref, ro, a))
                print(f"  {PATHS[path]}: " + ", ".join(f"{k} {v:.2f}" for k, v in times[path][-1].items()), flush=True)
        P = encs[0]["input_ids"].shape[1]
    budget = f"micro-batches of {a.micro_tokens} tokens" if a.micro_tokens else f"micro-batches of {a.micro} responses"
    print(f"{a.family}: P={P} prompt tokens, G={a.G}, C={a.C}, {a.prompts} prompt(s), {budget}, "
          f"hidden {a.hidden} x {a.layers} layers, vocab {VOCAB}, vision {a.vision_hidden} x {a.vision_depth}, "
          f"{a.dtype}, {torch.get_num_threads()} thread(s), CPU, median of {a.repeat}")
    print(f"LM token positions per pass: per response {a.prompts * a.G * (P + a.C)}, "
          f"shared prefix {a.prompts * (P + a.G * (a.C - 1))}; micro-batches per pass: "
          + ", ".join(f"{PATHS[p]} {times[p][0]['micro_batches']}" for p in paths))
    med = {p: {ph: statistics.median(t[ph] for t in ts) for ph in ("old", "ref", "update", "peak_gib")}
           for p, ts in times.items()}
    for p in med:
        med[p]["all"] = statistics.median(t["old"] + t["ref"] + t["update"] for t in times[p])
    others = [p for p in paths if p != "shared"]
    print(f"{'phase':<9}" + "".join(f"{PATHS[p] + ' s':>18}" for p in paths)
          + "".join(f"{PATHS[p] + ' / shared':>26}" for p in others))
    for phase in ("old", "ref", "update", "all", "peak_gib"):
        sh = med["shared"][phase]
        print(f"{phase:<9}" + "".join(f"{med[p][phase]:>18.2f}" for p in paths)
              + "".join(f"{med[p][phase] / sh:>25.2f}x" for p in others))
    print("(peak_gib: peak RSS growth of a round, GiB)")
    print("cost model (forward multiply-adds, egm-independent arithmetic), predicted speed-up at this shape:")
    for name, r in cost_model_rows(a, P):
        print(f"  {name:<32}{r:>6.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "P": P, "rounds": times, "median": med}, indent=1))


if __name__ == "__main__":
    main()

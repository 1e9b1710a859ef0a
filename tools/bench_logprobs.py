"""The log-prob head at the real vocabulary: plain vs lean (egm) vs TRL's functions, in one process.

Part 1, per shape (responses x tokens): peak memory growth and wall time of one micro-batch's
forward and backward through the vocabulary head alone, at Qwen3-VL-2B's head (V = 151,936 rows,
hidden 2048, float32), temperature 0.7, log-probs and exact entropies. The trunk is stood in for by
its last hidden states (a leaf that takes a gradient), so the numbers are the head's own cost.

* ``plain``: the path egm used before (kept as the test reference, ``tests/reference_head.py``):
  full ``(b, t, V)`` float32 logits, ``log_softmax`` + ``gather``, entropy from a second softmax,
  both with gradient (gamma != 0);
* ``lean``: :func:`egm.models.head.masked_logprobs` (chunks of ``--chunk`` tokens, logits freed and
  recomputed in backward, gradient written out), entropy with gradient;
* ``trl``: TRL's ``selective_log_softmax`` on full logits, ``entropy_from_logits`` under ``no_grad``
  (what TRL's GRPOTrainer does: its entropy takes no gradient).

Memory: the growth of the process's resident set over its level before the path, sampled every
millisecond by a thread (the script re-runs itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
freed tensors leave the resident set),
on CUDA ``torch.cuda.max_memory_allocated``. It is printed as a multiple of one float32 logits
tensor of the micro-batch (``b x t x V x 4`` bytes). A path whose predicted peak exceeds the
memory available is skipped and printed with its prediction. Time: the best of ``--repeat`` runs,
paths interleaved; ratios are against ``plain`` where it ran.

Part 2: the padding of GRPO micro-batches for a rollout-like length distribution (most responses
60-150 tokens, a few truncated at the maximum), fixed-size micro-batches in rollout order vs
:func:`egm.rl.ppo.token_micro_batches` (sorted by length, packed up to a token budget).

Part 3 (``--trunk``): the activation memory per token of the released text trunks under gradient
checkpointing (:func:`trunk_bytes_per_token`), from which the recipes' ``micro_batch_tokens`` follow.

    python tools/bench_logprobs.py [--shapes 4x512,8x1024,32x256] [--repeat 2] [--threads 2] [--device cpu] [--trunk]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time

V_QWEN3VL, H_2B = 151_936, 2048
PREDICTED_PEAK = {"plain": 6.5, "trl": 3.2, "lean": 1.2}  # x one fp32 logits tensor, from earlier runs


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident-set growth over the level at entry, sampled by a thread every millisecond."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.growth = self.peak - self.base


def _paths():
    import torch
    from trl.trainer.utils import entropy_from_logits as trl_entropy, selective_log_softmax

    from egm.models.head import masked_logprobs
    from egm.rl.grpo import entropy_from_logits

    def plain(h, head, ids, mask, T, chunk):
        logits = head(h).float() / T
        logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
        return logp, entropy_from_logits(logits)

    def lean(h, head, ids, mask, T, chunk):
        return masked_logprobs(h, head, ids, mask, T, with_entropy=True, entropy_grad=True, chunk_tokens=chunk)

    def trl(h, head, ids, mask, T, chunk):
        logits = head(h).float() / T
        logp = selective_log_softmax(logits, ids)
        with torch.no_grad():
            ent = trl_entropy(logits)
        return logp, ent

    return {"plain": plain, "lean": lean, "trl": trl}


def run_path(fn, b: int, t: int, V: int, H: int, T: float, chunk: int, device: str, seed: int = 0):
    """One micro-batch forward + backward; returns (seconds, peak bytes, loss)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=g)
    head = head.to(device)
    h = (torch.randn(b, t, H, generator=g)).to(device).requires_grad_(True)
    ids = torch.randint(0, V, (b, t), generator=g).to(device)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    adv = torch.randn(b, 1, generator=g).to(device)
    head.weight.grad = torch.zeros_like(head.weight)  # the gradient buffer exists in every path
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        logp, ent = fn(h, head, ids, mask, T, chunk)
        loss = -(logp * adv).mean() - 0.01 * ent.mean()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else mem.growth
    out = float(loss.detach())
    del head, h, logp, ent, loss
    gc.collect()
    return dt, peak, out


def bench_shapes(shapes, repeat: int, chunk: int, device: str, V: int, H: int, T: float = 0.7) -> list[dict]:
    paths = _paths()
    rows = []
    for b, t in shapes:
        logits_bytes = b * t * V * 4
        res = {k: {"times": [], "peak": 0, "loss": None, "skipped": None} for k in paths}
        for k in paths:
            need = PREDICTED_PEAK[k] * logits_bytes
            avail = _available() if not device.startswith("cuda") else None
            if avail is not None and need > 0.7 * avail:  # headroom: other processes may grow meanwhile
                res[k]["skipped"] = f"needs ~{need / 2**30:.0f} GiB, {avail / 2**30:.0f} GiB available"
        for _ in range(repeat):
            for k, fn in paths.items():
                if res[k]["skipped"]:
                    continue
                dt, peak, loss = run_path(fn, b, t, V, H, T, chunk, device)
                res[k]["times"].append(dt)
                res[k]["peak"] = max(res[k]["peak"], peak)
                res[k]["loss"] = loss
        for k, r in res.items():
            rows.append({"shape": f"{b}x{t}", "path": k, "logits_gib": logits_bytes / 2**30, **r})
    return rows


def print_table(rows) -> None:
    print(f"| micro-batch | path | peak (GiB) | peak / fp32 logits | time (s) | time / plain |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = {r["path"]: r for r in rows if r["shape"] == shape}
        base = group["plain"]
        for k, r in group.items():
            if r["skipped"]:
                print(f"| {shape} | {k} | not run ({r['skipped']}) | | | |")
                continue
            best = min(r["times"])
            rel = f"{best / min(base['times']):.2f}x" if base["times"] else "n/a"
            print(f"| {shape} | {k} | {r['peak'] / 2**30:.2f} | {r['peak'] / 2**30 / r['logits_gib']:.2f}x | "
                  f"{best:.1f} | {rel} |")
    losses = {(r["shape"], r["path"]): r["loss"] for r in rows if r["loss"] is not None}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ls = [v for (s, _), v in losses.items() if s == shape]
        if len(ls) > 1:
            print(f"{shape}: the paths' losses agree to {max(ls) - min(ls):.2e}")


def bench_padding(n_responses: int = 512, max_len: int = 1024, truncated_frac: float = 0.03,
                  micro: int = 32, budget: int | None = None, seed: int = 0) -> dict[str, float]:
    """Padding fraction of fixed-size micro-batches in rollout order vs token-budget packing."""
    import torch

    from egm.rl.ppo import padding_fraction, token_micro_batches

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(60, 151, (n_responses,), generator=g)
    trunc = torch.rand(n_responses, generator=g) < truncated_frac
    lengths[trunc] = max_len
    idx = torch.arange(n_responses)
    budget = budget or micro * int(lengths.float().mean().ceil())
    fixed = list(idx.split(micro))
    packed = token_micro_batches(idx, lengths, budget)
    return {"responses": n_responses, "truncated": int(trunc.sum()), "micro": micro, "budget": budget,
            "fixed_padding": padding_fraction(lengths, fixed), "fixed_batches": len(fixed),
            "packed_padding": padding_fraction(lengths, packed), "packed_batches": len(packed)}


# Text trunks of the released checkpoints (their config.json): Qwen3-VL-2B's and -8B's Qwen3 LMs
# (2B as in tools/gpu_check_deepspeed.py; 8B = Qwen3-8B) and InternVL3-8B's Qwen2.5-7B LM.
TRUNKS = {
    "Qwen3-VL-2B": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                                        num_key_value_heads=8, head_dim=128), 28),
    "Qwen3-VL-8B": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                                        num_key_value_heads=8, head_dim=128), 36),
    "InternVL3-8B": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                                         num_key_value_heads=4), 28),
}


def trunk_bytes_per_token(name: str, tokens: int = 1024, repeat: int = 2) -> dict[str, float]:
    """Activation memory per token of a released LM trunk under gradient checkpointing, float32.

    Gradient checkpointing keeps each decoder layer's input, ``hidden x 4`` bytes per token and
    layer (by construction); backward then recomputes one layer at a time, whose activations are
    measured here: the peak growth of forward + backward of a one-layer trunk at the released
    widths, parameters frozen (the gradient flows to the input embeddings, so no weight gradient
    is counted), the worst of ``repeat`` runs. A trunk of ``n`` layers holds about
    ``n x hidden x 4 + recompute`` bytes per token; bf16 activations are half.
    """
    import torch
    import transformers

    cfg_name, dims, n_layers = TRUNKS[name]
    cfg = getattr(transformers, cfg_name)(vocab_size=1024, num_hidden_layers=1, **dims)
    model = transformers.AutoModel.from_config(cfg).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    peak = 0
    for _ in range(repeat):
        x = torch.randn(1, tokens, dims["hidden_size"], requires_grad=True)
        with PeakRSS() as mem:
            model(inputs_embeds=x, use_cache=False).last_hidden_state.sum().backward()
        peak = max(peak, mem.growth)
        del x
    del model
    gc.collect()
    per_layer = dims["hidden_size"] * 4
    recompute = peak / tokens - per_layer
    return {"per_layer": per_layer, "recompute": recompute, "layers": n_layers,
            "per_token": n_layers * per_layer + recompute}


def _mmap_every_allocation() -> None:
    """Re-run this script with glibc's malloc returning every block over 64 KiB to the system on
    ``free`` (``MALLOC_MMAP_THRESHOLD_``): the resident set then follows the live tensors, also the
    few-MB activations that the default heap would keep after freeing."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})


def main() -> None:
    _mmap_every_allocation()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4x512,8x1024,32x256")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="lean path: tokens per chunk (default: the library's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab", type=int, default=V_QWEN3VL)
    ap.add_argument("--hidden", type=int, default=H_2B)
    ap.add_argument("--padding-only", action="store_true")
    ap.add_argument("--trunk", action="store_true", help="also measure the released trunks' activations per token")
    args = ap.parse_args()

    import torch

    from egm.models.head import DEFAULT_CHUNK_TOKENS

    torch.set_num_threads(args.threads)
    chunk = args.chunk or DEFAULT_CHUNK_TOKENS
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, V {args.vocab}, "
          f"hidden {args.hidden}, chunk {chunk}, float32, temperature 0.7")
    if not args.padding_only:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        print_table(bench_shapes(shapes, args.repeat, chunk, args.device, args.vocab, args.hidden))
    if args.trunk:
        print()
        print("| trunk (gradient checkpointing, float32) | checkpoint per layer per token | one layer's recompute "
              "per token (measured) | all layers: per token |")
        print("|---|---:|---:|---:|")
        for name in TRUNKS:
            r = trunk_bytes_per_token(name)
            print(f"| {name} | {r['per_layer'] / 2**10:.1f} KiB | {r['recompute'] / 2**10:.1f} KiB | "
                  f"{r['per_token'] / 2**10:.0f} KiB ({r['layers']} layers) |")
    print()
    print("| rollout (responses, truncated at 1024) | micro-batches | padding |")
    print("|---|---|---:|")
    for seed in (0, 1, 2):
        p = bench_padding(seed=seed)
        print(f"| {p['responses']}, {p['truncated']} (seed {seed}) | {p['fixed_batches']} x {p['micro']} responses "
              f"(rollout order) | {100 * p['fixed_padding']:.1f} % |")
        print(f"| {p['responses']}, {p['truncated']} (seed {seed}) | {p['packed_batches']} by tokens "
              f"(budget {p['budget']}, sorted) | {100 * p['packed_padding']:.1f} % |")


if __name__ == "__main__":
    main()

"""Size and speed of the tiny checkpoints on this CPU (numbers quoted in reports).

Prints, per family: parameters, forward+backward time of a training batch of 8 images
(128x128), and greedy generation time of 32 new tokens for a batch of 8 and for one prompt.

    python tools/bench_tiny.py [--threads 1] [--batch 8] [--new_tokens 32]
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch
from jsonargparse import CLI
from PIL import Image

from egm.models import ADAPTERS
from egm.models.tiny import FAMILIES, tiny_checkpoint


def _examples(n: int, size: int = 128) -> list[dict]:
    rng = np.random.default_rng(0)
    return [dict(image=Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
                 sentence="the small red circle behind the second square", task="vanilla",
                 box=[10, 20, 90, 100], width=size, height=size,
                 reasoning="The red circle is partly occluded; its box extends slightly to the left.")
            for _ in range(n)]


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(threads: int = 1, batch: int = 8, new_tokens: int = 32, repeat: int = 5, root: str | None = None) -> None:
    torch.set_num_threads(threads)
    root = root or tempfile.mkdtemp(prefix="egm-tiny-")
    for fam in FAMILIES:
        ad = ADAPTERS[fam](str(tiny_checkpoint(fam, root)))
        model = ad.load_model()
        n_params = sum(p.numel() for p in model.parameters())
        exs = _examples(batch)
        train = ad.collate_train(exs)

        def step():
            model.zero_grad(set_to_none=True)
            model(**train).loss.backward()

        model.train()
        t_step = _time(step, repeat)
        model.eval()
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=ad.pad_token_id)
        gen_b, gen_1 = ad.collate_generate(exs), ad.collate_generate(exs[:1])
        with torch.no_grad():
            t_gen_b = _time(lambda: model.generate(**gen_b, **kw), max(1, repeat // 2))
            t_gen_1 = _time(lambda: model.generate(**gen_1, **kw), max(1, repeat // 2))
        print(f"{fam:9s} params {n_params / 1e6:.2f} M | train batch {batch} (seq {train['input_ids'].shape[1]}) "
              f"fwd+bwd {t_step * 1e3:.0f} ms | greedy {new_tokens} tok: batch {batch} {t_gen_b * 1e3:.0f} ms, "
              f"1 prompt {t_gen_1 * 1e3:.0f} ms | threads {threads}")


if __name__ == "__main__":
    CLI(main)

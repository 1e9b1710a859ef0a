"""Write the tiny offline checkpoints (both families by default); see egm/models/tiny.py.

    python tools/make_tiny.py --out_dir artifacts/tiny                 # both families
    python tools/make_tiny.py --out_dir artifacts/tiny --family qwen3_vl --text_hidden 256 --text_layers 4
"""

from __future__ import annotations

from pathlib import Path

from jsonargparse import CLI

from egm.models.tiny import FAMILIES, default_dims, make_tiny

_D = default_dims()


def main(out_dir: str, family: str | None = None, seed: int = 0, vocab_size: int = _D["vocab_size"],
         text_hidden: int = _D["text_hidden"], text_layers: int = _D["text_layers"],
         text_heads: int = _D["text_heads"], kv_heads: int = _D["kv_heads"], head_dim: int = _D["head_dim"],
         intermediate: int = _D["intermediate"], vision_hidden: int = _D["vision_hidden"],
         vision_depth: int = _D["vision_depth"], vision_heads: int = _D["vision_heads"],
         image_size: int = _D["image_size"], max_pixels: int = _D["max_pixels"],
         patch_size: int = _D["patch_size"]) -> None:
    """Build ``out_dir/<family>`` for each family (or only ``family``).

    Args:
        out_dir: parent folder; each family goes to its own sub-folder.
        family: ``qwen3_vl`` or ``internvl``; both when omitted.
        seed: weight and tokenizer seed.
        vocab_size: upper bound of the BPE vocabulary (the corpus may give fewer tokens).
        text_hidden, text_layers, text_heads, kv_heads, head_dim, intermediate: language model.
        vision_hidden, vision_depth, vision_heads: vision tower.
        image_size: InternVL tile side in pixels (patch = image_size / 8, 16 tokens per tile).
        max_pixels: Qwen3-VL processor's largest image area (one token per (2 patch_size)^2 pixels).
        patch_size: Qwen3-VL vision patch side in pixels (16; the CPU demo uses 8: 4x the image
            tokens, which is what lets every seed learn *where* things are, docs/demo.md).
    """
    dims = {k: v for k, v in locals().items() if k in _D}
    for fam in [family] if family else FAMILIES:
        path = make_tiny(fam, Path(out_dir) / fam, seed=seed, **dims)
        print(path)


if __name__ == "__main__":
    CLI(main)

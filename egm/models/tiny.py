"""Tiny offline Hugging Face checkpoints of both families, for tests and the CPU demo.

Why: every test and the CPU demo must exercise *exactly* the code path of a real checkpoint
(``from_pretrained`` on a folder holding config, safetensors weights, tokenizer, processor and
chat template), without network and in milliseconds. :func:`make_tiny` writes such a folder:

* config: the real architecture class (``Qwen3VLForConditionalGeneration`` /
  ``InternVLForConditionalGeneration``) with small dims (all of them arguments);
* weights: seeded random init (``torch.manual_seed(seed)``), so a folder is reproducible, with
  two changes to the standard init (:func:`_init_for_grounding`) that let a from-scratch model
  learn to *locate* things within minutes on a CPU;
* tokenizer: a byte-level BPE trained offline with ``tokenizers`` on a corpus of the Figure-7
  prompts, referring-expression words, JSON / ``<box>`` answers and reasoning sentences. It uses
  the Qwen2 pre-tokenizer regex, which isolates every digit, so a 0-1000 coordinate costs at
  most four tokens and the demo can learn to emit boxes; frequent words become single tokens;
* the special tokens, processor config and chat template the real processors need (the
  templates mimic Qwen3-VL-Thinking -- generation prompt ``<|im_start|>assistant\\n<think>\\n``
  -- and InternVL3-hf).

Test fixture pattern (no shared conftest needed)::

    @pytest.fixture(scope="session")
    def qwen_dir(tmp_path_factory):
        return tiny_checkpoint("qwen3_vl", tmp_path_factory.getbasetemp() / "tiny")

:func:`tiny_checkpoint` reuses a folder already built with the same arguments, so every test
module of a session shares one build per family.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from egm.errors import InputError
from egm.models.real import PRETOKENIZE_REGEX, build_folder, make_real  # Qwen2's pre-tokenizer regex (digits isolated)

FAMILIES = ("qwen3_vl", "internvl")
_MARKER = "egm_tiny.json"
_VERSION = 3
# Init scales for grounding from scratch (see _init_for_grounding).
QK_INIT_SCALE = 4.0
VISION_POS_INIT_STD = 1.0

_CHAT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SPECIAL = {
    "qwen3_vl": _CHAT + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "internvl": _CHAT + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
}
# Added but not "special": they must survive decode(skip_special_tokens=True).
_ADDED = {"qwen3_vl": ["<think>", "</think>"], "internvl": ["<ref>", "</ref>", "<box>", "</box>"]}

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)
INTERNVL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_WORDS = (
    "left right top bottom middle center upper lower corner edge circle square triangle "
    "rectangle shape object red green blue yellow white black gray orange purple small large "
    "big tiny first second third fourth last behind front occluded hidden visible partly "
    "extend extends slightly significantly beyond outside inside image frame border the a an "
    "of to in on at is it its and or with which that this there near next above below "
    "between closest farthest one two three object's"
).split()
_REASONING = [
    "The {c} {s} is in the {p} part of the image.",
    "I see {n} shapes; the {o} from the {d} is the {c} {s}.",
    "The {s} is partly occluded by another shape, so its amodal box extends {m} beyond the visible part.",
    "Its visible region ends at the {d} edge, but the full object extends {m} further.",
    "Counting from the {d}, the {o} {s} is {c}.",
]


def _corpus(rng: random.Random, n: int = 3000) -> list[str]:
    """Text the tokenizer is trained on: prompts, answers and reasoning of the grounding task."""
    from egm.models.prompts import FIGURE7_TEMPLATES

    colors = "red green blue yellow white black gray orange purple".split()
    shapes = "circle square triangle rectangle shape object".split()
    places = "left right top bottom middle center upper lower".split()
    ords = "first second third fourth last".split()
    lines = [" ".join(_WORDS), " ".join(w.capitalize() for w in _WORDS), "0 1 2 3 4 5 6 7 8 9"]
    lines += ["system\nuser\nassistant\nYou are a tiny test model.\n"] * 50  # chat-template scaffolding
    for _ in range(n):
        sent = f"the {rng.choice(['', 'small ', 'large '])}{rng.choice(colors)} {rng.choice(shapes)}"
        sent += rng.choice(["", f" on the {rng.choice(places)}", f" {rng.choice(['behind', 'near', 'above', 'below'])} the {rng.choice(shapes)}"])
        box = sorted(rng.randint(0, 1000) for _ in range(2)) + sorted(rng.randint(0, 1000) for _ in range(2))
        x1, x2, y1, y2 = box
        lines.append(rng.choice(list(FIGURE7_TEMPLATES.values())).replace("{sent}", sent))
        lines.append(f'```json\n[\n\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{sent}"}}\n]\n```')
        lines.append(f"<ref>{sent}</ref><box>[[{x1}, {y1}, {x2}, {y2}]]</box>")
        lines.append(rng.choice(_REASONING).format(
            c=rng.choice(colors), s=rng.choice(shapes), p=rng.choice(places), n=rng.choice(["two", "three"]),
            o=rng.choice(ords), d=rng.choice(places), m=rng.choice(["slightly", "significantly"])))
    return lines


def build_tokenizer(family: str, vocab_size: int = 1024, seed: int = 0):
    """Train the byte-level BPE and wrap it in the family's transformers tokenizer class."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_added = len(_SPECIAL[family]) + len(_ADDED[family])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_added, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL[family]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _ADDED[family]])
    extra: Any
    if family == "qwen3_vl":
        extra = None
    else:  # named tokens read by InternVLProcessor (tokenizer.start_image_token, ...)
        extra = {"start_image_token": "<img>", "end_image_token": "</img>",
                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    kw = dict(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
              pad_token="<|endoftext|>", model_max_length=4096)
    if extra:
        kw["extra_special_tokens"] = extra
    return Qwen2Tokenizer(**kw)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    hw = 5 * half // 16  # real Qwen3-VL: head_dim 128 -> [24, 20, 20]
    return [half - 2 * hw, hw, hw]


def _qwen_config(tok, text_hidden, text_layers, text_heads, kv_heads, head_dim, intermediate,
                 vision_hidden, vision_depth, vision_heads, max_pixels, patch_size, **_):
    from transformers import Qwen3VLConfig

    ids = tok.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=intermediate,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": _mrope_section(head_dim), "mrope_interleaved": True},
            pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
            num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=text_hidden, num_position_embeddings=(math.isqrt(max_pixels) // patch_size) ** 2,
            deepstack_visual_indexes=list(range(min(vision_depth, text_layers, 2))),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _internvl_config(tok, text_hidden, text_layers, text_heads, kv_heads, head_dim, intermediate,
                     vision_hidden, vision_depth, vision_heads, image_size, **_):
    from transformers import InternVLConfig

    patch = image_size // 8
    return InternVLConfig(
        vision_config=dict(
            hidden_size=vision_hidden, num_hidden_layers=vision_depth, num_attention_heads=vision_heads,
            intermediate_size=2 * vision_hidden, image_size=[image_size, image_size], patch_size=[patch, patch],
        ),
        text_config=dict(
            model_type="qwen2", vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=intermediate,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        ),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=16,
        downsample_ratio=0.5, tie_word_embeddings=False,
    )


def _processor(family: str, tok, image_size: int, max_pixels: int, patch_size: int = 16):
    from transformers import InternVLProcessor, Qwen3VLProcessor

    from egm.models.base import video_free

    if family == "qwen3_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ip = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": max_pixels},
                                      patch_size=patch_size, merge_size=2, temporal_patch_size=2)
        return video_free(Qwen3VLProcessor)(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE,
                                            **_video_processor(family, image_size, max_pixels))
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                  min_patches=1, max_patches=1)
    return video_free(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=16,
                                         chat_template=INTERNVL_CHAT_TEMPLATE,
                                         **_video_processor(family, image_size, max_pixels))


def _video_processor(family: str, image_size: int, max_pixels: int) -> dict[str, Any]:
    """``{"video_processor": ...}`` where torchvision imports (the processors then require one), else ``{}``."""
    import transformers

    if not transformers.utils.is_torchvision_available():
        return {}
    cfg = _video_config(family, image_size, max_pixels)
    return {"video_processor": getattr(transformers, cfg.pop("video_processor_type"))(**cfg)}


def _video_config(family: str, image_size: int, max_pixels: int) -> dict[str, Any]:
    """Hand-written video processor config, so that a machine *with* torchvision (where the
    processors insist on one) loads the folder too; EGM itself never processes videos."""
    if family == "qwen3_vl":
        return {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "temporal_patch_size": 2,
                "merge_size": 2, "size": {"shortest_edge": 32 * 32, "longest_edge": max_pixels}}
    return {"video_processor_type": "InternVLVideoProcessor", "size": {"height": image_size, "width": image_size}}


def default_dims() -> dict[str, int]:
    """Default tiny sizes (every one can be overridden through ``make_tiny(**dims)``).

    ``vocab_size`` is an upper bound: the BPE stops when the corpus has no pair left to merge
    twice (about 640 tokens with the default corpus). ``patch_size`` is the Qwen3-VL vision
    patch side (its position table covers ``max_pixels`` at that patch); the CPU demo uses 8.
    """
    return dict(vocab_size=1024, text_hidden=128, text_layers=2, text_heads=4, kv_heads=2, head_dim=32,
                intermediate=384, vision_hidden=64, vision_depth=2, vision_heads=4,
                image_size=64, max_pixels=128 * 128, patch_size=16)


def _write(family: str, out: Path, seed: int, dims: dict[str, int], init_seed: int,
           vision_position: str = "sincos") -> None:
    from transformers import GenerationConfig, InternVLForConditionalGeneration, Qwen3VLForConditionalGeneration

    tok = build_tokenizer(family, dims["vocab_size"], seed)
    cfg = (_qwen_config if family == "qwen3_vl" else _internvl_config)(tok, **dims)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else InternVLForConditionalGeneration
    torch.manual_seed(init_seed)
    model = cls(cfg).eval()
    _init_for_grounding(model, vision_position)
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    _processor(family, tok, dims["image_size"], dims["max_pixels"], dims["patch_size"]).save_pretrained(out)
    video = out / "video_preprocessor_config.json"
    if not video.exists():
        video.write_text(json.dumps(_video_config(family, dims["image_size"], dims["max_pixels"]), indent=2))
    n = sum(p.numel() for p in model.parameters())
    (out / _MARKER).write_text(json.dumps(
        {"family": family, "seed": seed, "init_seed": init_seed, "dims": dims, "vision_position": vision_position,
         "version": _VERSION, "parameters": n}, indent=1))


@torch.no_grad()
def _init_for_grounding(model: torch.nn.Module, vision_position: str = "sincos") -> None:
    """Make attention content-selective and positions visible from the first step.

    With the standard init (std 0.02 everywhere) a tiny VLM learns *what* is in the image in a
    few dozen steps but sits for hundreds of steps at chance on *where* it is: the absolute
    position code of the vision tower is tiny next to the patch content, and near-uniform
    attention averages the object token with the background, which cancels the position signal.
    Measured on this CPU (quadrant of one square, batch 16, lr 2e-3): standard init at chance
    after 500 steps; query/key projections x4 learns it by ~475 steps; with the vision position
    embedding at std 1.0 as well, by ~325 steps. Real checkpoints are pre-trained and unaffected.

    ``vision_position="sincos"`` (default) starts that embedding as the smooth 2-D code of
    :func:`sincos_grid` instead of random numbers of the same scale ("random"): the box
    coordinates are then a linear read-out of an object's patches rather than a table to
    memorise. Over the demo's seeds 1 and 2 it moved ``val_plain`` after 1250 steps from
    55.0 / 76.2 to 88.7 / 67.5 (docs/demo.md, "What we tried").
    """
    for name, p in model.named_parameters():
        if p.ndim == 2 and any(k in name for k in ("q_proj", "k_proj", ".qkv.")):
            p.mul_(QK_INIT_SCALE)
        # Qwen3-VL: visual.pos_embed (an Embedding); InternVL: vision_tower.embeddings.position_embeddings
        if name.endswith(("visual.pos_embed.weight", "vision_tower.embeddings.position_embeddings")):
            p.normal_(0.0, VISION_POS_INIT_STD)
            rows = p.shape[-2]
            g, cls = next(((int(math.isqrt(rows - c)), c) for c in (0, 1) if math.isqrt(rows - c) ** 2 == rows - c), (0, 0))
            if vision_position == "sincos" and g > 1 and p.shape[-1] % 4 == 0:  # InternVL: class-token row stays random
                p.view(-1, rows, p.shape[-1])[:, cls:] = VISION_POS_INIT_STD * sincos_grid(g, p.shape[-1])


def sincos_grid(grid: int, dim: int) -> torch.Tensor:
    """``(grid * grid, dim)`` 2-D sine-cosine position code, row-major, per-element std ~1.

    Half the channels code the row, half the column, each with ``dim / 4`` frequencies spread
    geometrically from a quarter turn across the whole grid to a quarter turn per patch. The
    lowest one is monotonic over the grid, so a box coordinate is a linear read-out of the code
    of the object's patches from the first step; a random code (std 1) would have to be
    memorised patch by patch instead, and whether that happens within the demo's budget was a
    matter of the seed (issue 25).
    """
    n = dim // 4
    omega = (math.pi / 2) * (1.0 / grid) ** (1 - torch.arange(n, dtype=torch.float64) / max(n - 1, 1))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        ang = coord[:, None] * omega[None]
        parts += [ang.sin(), ang.cos()]
    code = torch.cat(parts, dim=1)
    code = code - code.mean(0)
    return (code / code.std()).float()


def _same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def make_tiny(family: str, out_dir: str | Path, seed: int = 0, init_seed: int | None = None, shape: str = "toy",
              vision_position: str = "sincos",
              size: str = "tiny", dtype: str = "float32", **dims: int) -> Path:
    """Write a complete tiny checkpoint folder for ``family`` ("qwen3_vl" or "internvl").

    ``seed`` seeds the tokenizer's corpus and, unless ``init_seed`` is given, the random weights;
    ``init_seed`` changes the weights alone, so that runs over seeds share one vocabulary
    (``egm demo --seed``).

    ``shape="real"`` writes a real-shaped folder instead (:func:`egm.models.real.make_real`: the
    released tokenizer, added tokens, chat template and processors; ``size`` "tiny" for a
    64-wide trunk with the released 151,936 / 151,674 embedding rows, or a released size such as
    "2B" with random weights in ``dtype``). ``shape="toy"`` (default) is the small trained
    vocabulary above, which the demo can learn from scratch. ``vision_position``: the vision
    tower's initial position code, "sincos" or "random" (:func:`_init_for_grounding`).

    Idempotent: the folder is built in a temporary sibling and left untouched when an existing
    one is byte-identical; a different earlier tiny build is replaced; any other non-empty
    folder is refused (we never delete something we did not write).
    """
    if shape == "real":
        if dims or init_seed is not None:
            raise InputError(f"shape='real' takes size/seed/dtype, not {sorted(dims) or ['init_seed']}")
        return make_real(family, out_dir, size=size, seed=seed, dtype=dtype)
    if shape != "toy":
        raise InputError(f"shape must be 'toy' or 'real', got {shape!r}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    unknown = set(dims) - set(default_dims())
    if unknown:
        raise ValueError(f"unknown tiny dims {sorted(unknown)}; known: {sorted(default_dims())}")
    full = {**default_dims(), **dims}
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / _MARKER).exists():
        raise FileExistsError(f"{out} is not empty and is not a tiny EGM checkpoint; refusing to overwrite")
    if vision_position not in ("sincos", "random"):
        raise InputError(f"vision_position must be 'sincos' or 'random', got {vision_position!r}")
    return build_folder(out, lambda tmp: _write(family, tmp, seed, full, seed if init_seed is None else init_seed,
                                                vision_position),
                        _same_tree)


def tiny_checkpoint(family: str, root: str | Path, seed: int = 0, **dims: int) -> Path:
    """Path of a tiny checkpoint under ``root``, built once per (family, seed, dims)."""
    key = json.dumps({"seed": seed, "dims": {**default_dims(), **dims}, "v": _VERSION}, sort_keys=True)
    out = Path(root) / f"{family}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (out / _MARKER).exists():
        return out
    return make_tiny(family, out, seed=seed, **dims)

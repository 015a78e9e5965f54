"""Model directories built locally (no hub): for tests, the CPU demo, benchmarks and ``qzoom build-tiny``.

``build_model_dir(family, size)`` writes a complete Hugging Face model directory (config, random
weights, tokenizer, processor) that ``AutoModelForImageTextToText.from_pretrained`` and
``swift infer --model DIR`` load exactly like a downloaded checkpoint. Sizes:

- ``tiny``: a few layers of width 128 (about 20 M parameters, mostly the 151936-row embedding), for tests;
- ``bench``: width 512, 12 layers (tens of millions of parameters), for CPU benchmarks;
- full-size shapes of the real checkpoints (``full_size_config``) to instantiate with random weights on a
  GPU, where compute cost equals the real model's.

Builds are deterministic (seeded), cached under ``QZOOM_CACHE`` (default ``~/.cache/qzoom_swift``) and
written atomically, so parallel test processes and interrupted builds never see half a directory.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.synthetic.tokenizer import (
    LLAVA_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN_VOCAB_SIZE,
    build_llava_tokenizer,
    build_qwen_tokenizer,
)

BUILDER_VERSION = 2  # 2: LLaVA towers saved in llava-hf's key layout
SIZES = ("tiny", "bench")


def cache_root() -> Path:
    """``QZOOM_CACHE`` (default ``~/.cache/qzoom_swift``), as read by the configuration module."""
    from qzoom_swift.config import read_env

    return read_env().cache_dir


_TEXT_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.05),
    "bench": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=2),
}
_VISION_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2),
    "bench": dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4),
}


def _qwen2_5_vl_config(size: str) -> dict[str, Any]:
    text = dict(_TEXT_SIZES[size], vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": None})
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    t = half // 4
    text["rope_parameters"]["mrope_section"] = [t, (half - t) // 2, half - t - (half - t) // 2]
    depth = _VISION_SIZES[size]["depth"]
    vision = dict(_VISION_SIZES[size], out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=list(range(1, depth, 2)))
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=True)


def _qwen3_vl_config(size: str) -> dict[str, Any]:
    text = dict(_TEXT_SIZES[size], vocab_size=QWEN_VOCAB_SIZE, max_position_embeddings=32768)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    h = (half * 5) // 16
    text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_section": [half - 2 * h, h, h], "mrope_interleaved": True})
    depth = _VISION_SIZES[size]["depth"]
    vision = dict(_VISION_SIZES[size], out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=256,
                  deepstack_visual_indexes=list(range(min(depth, 3))))
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=True)


def _llava_config(size: str, image_token_id: int, vocab_size: int) -> dict[str, Any]:
    t = _TEXT_SIZES[size]
    text = dict(model_type="llama", vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-5, **t)
    v = _VISION_SIZES[size]
    vision = dict(model_type="clip_vision_model", hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                  num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"], image_size=224, patch_size=14,
                  projection_dim=v["hidden_size"])
    return dict(text_config=text, vision_config=vision, image_token_index=image_token_id, image_seq_length=256,
                vision_feature_layer=-2, vision_feature_select_strategy="default")


# Full-size shapes of the checkpoints the paper uses (values of their public config.json files; the fields left
# out equal the transformers defaults, checked in tests/test_full_width.py).
FULL_SIZE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", dict(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           tokens_per_second=2, fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=True)),
    "Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", dict(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           tokens_per_second=2, fullatt_block_indexes=[7, 15, 23, 31]),
        tie_word_embeddings=False)),
    "Qwen3-VL-4B-Instruct": ("qwen3_vl", dict(
        text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh"),
        tie_word_embeddings=True)),
    "llava-1.5-7b-hf": ("llava", dict(
        text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, rms_norm_eps=1e-5),
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-2,
        vision_feature_select_strategy="default")),
}


def _llava_tiny_config(size: str) -> dict[str, Any]:
    tok = build_llava_tokenizer(None)
    vocab = ((len(tok) + 63) // 64) * 64
    return _llava_config(size, tok.convert_tokens_to_ids("<image>"), vocab)


def _llava_processor(tokenizer, image_size: int = 224):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size}, do_center_crop=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT_TEMPLATE)


def _qwen_image_processor(patch: int, **extra: Any):
    from transformers import Qwen2VLImageProcessor

    unit = (patch * 2) ** 2  # pixels of one merged visual token
    image_kwargs: dict[str, Any] = dict(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                        size={"shortest_edge": 4 * unit, "longest_edge": 4096 * unit})
    return Qwen2VLImageProcessor(**image_kwargs, **extra)


def _qwen2_5_vl_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=_qwen_image_processor(14), tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)


def _qwen3_vl_processor(tokenizer):
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    image_processor = _qwen_image_processor(16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(patch_size=16), chat_template=QWEN3_VL_CHAT_TEMPLATE)


def _llava_generation(tokenizer) -> dict[str, Any]:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _qwen_generation(tokenizer) -> dict[str, Any]:
    return dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)


@dataclass(frozen=True)
class _FamilyBuilder:
    """How to build one family's synthetic model.

    Each family names itself once here, like ``FamilySpec`` in the registry, so the builders dispatch on a
    table instead of testing family names.
    """

    family: str
    config_class: str
    """transformers config class (looked up on first use: importing transformers is slow)."""
    local_config: Callable[[str], dict[str, Any]]
    """size (``tiny``/``bench``) -> config kwargs of a locally built model."""
    tokenizer: Callable[[], Any]
    processor: Callable[[Any], Any]
    """tokenizer -> processor."""
    generation: Callable[[Any], dict[str, Any]]
    """tokenizer -> ``GenerationConfig`` kwargs."""
    full_size_processor: Callable[[Any], Any] | None = None
    """tokenizer -> processor of the real checkpoints, where it differs from ``processor`` (image size)."""
    checkpoint_layout: Callable[[Path], None] | None = None
    """Rewrites the saved weights' keys into the real checkpoints' layout, where transformers saves another."""


_BUILDERS: dict[str, _FamilyBuilder] = {
    builder.family: builder
    for builder in (
        _FamilyBuilder("qwen2_5_vl", "Qwen2_5_VLConfig", _qwen2_5_vl_config,
                       partial(build_qwen_tokenizer, None, chat_template=QWEN2_VL_CHAT_TEMPLATE),
                       _qwen2_5_vl_processor, _qwen_generation),
        _FamilyBuilder("qwen3_vl", "Qwen3VLConfig", _qwen3_vl_config,
                       partial(build_qwen_tokenizer, None, chat_template=QWEN3_VL_CHAT_TEMPLATE),
                       _qwen3_vl_processor, _qwen_generation),
        _FamilyBuilder("llava", "LlavaConfig", _llava_tiny_config, partial(build_llava_tokenizer, None),
                       _llava_processor, _llava_generation, partial(_llava_processor, image_size=336),
                       lambda out_dir: _llava_hf_key_layout(out_dir)),
    )
}


def _builder(family: str) -> _FamilyBuilder:
    builder = _BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILY_NAMES}")
    return builder


def make_config(family: str, config_kwargs: dict[str, Any]):
    """A transformers config object of ``family`` from plain dict kwargs."""
    import transformers

    config_class = getattr(transformers, _builder(family).config_class)
    return config_class(**copy.deepcopy(config_kwargs))


def full_size_config(name: str):
    """The config of a real checkpoint by name (e.g. ``Qwen2.5-VL-7B-Instruct``), for random-init cost runs."""
    if name not in FULL_SIZE_CONFIGS:
        raise KeyError(f"no full-size shape named {name!r}; known: {sorted(FULL_SIZE_CONFIGS)}")
    family, kwargs = FULL_SIZE_CONFIGS[name]
    return family, make_config(family, kwargs)


FULL_SIZE_SHORT_NAMES: dict[str, str] = {
    "qwen2_5_vl_7b": "Qwen2.5-VL-7B-Instruct",
    "qwen2_5_vl_3b": "Qwen2.5-VL-3B-Instruct",
    "qwen3_vl_4b": "Qwen3-VL-4B-Instruct",
    "llava1_5_7b": "llava-1.5-7b-hf",
}
"""Short names (the recipe folders under ``qzoom_swift/recipes/``) -> ``FULL_SIZE_CONFIGS`` keys."""


@dataclass(frozen=True)
class CutShape:
    """A full-width shape with fewer text and vision layers, and the branch layout that still fits it."""

    name: str
    family: str
    config: Any
    """transformers config of the cut model (real widths, heads, vocab; fewer layers)."""
    branch_layer: int
    branch_depth: int
    """B and R for the cut depth (``default_branch_layer``; B + R <= text layers)."""
    full_attention_blocks: tuple[int, ...] = ()
    """Qwen2.5-VL vision blocks with full attention kept by the cut (the rest are windowed)."""
    deepstack_taps: tuple[int, ...] = ()
    """Qwen3-VL vision blocks whose features are injected after LLM layers 0.. (one level each)."""


def _cut_vision(kwargs: dict[str, Any], vision_layers: int, branch_layer: int) -> dict[str, Any]:
    """Vision kwargs cut to ``vision_layers`` blocks, keeping the structure the Q-Zoom paths depend on.

    Qwen2.5-VL keeps the full-attention blocks that still exist (else the last block becomes one); Qwen3-VL
    keeps the DeepStack taps that still exist, at most B of them (injections after LLM layers >= B would
    touch the branch layers, which the single prefill and the ONNX graphs do not support), else taps the
    last block. LLaVA needs 2 CLIP layers (its features come from the second to last).
    """
    vision = dict(kwargs["vision_config"])
    if "num_hidden_layers" in vision:  # CLIP (LLaVA)
        if vision_layers < 2:
            raise ValueError("LLaVA takes features from the second to last CLIP layer: keep >= 2 vision layers")
        vision["num_hidden_layers"] = vision_layers
        return vision
    vision["depth"] = vision_layers
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision_layers] or [
            vision_layers - 1]
    if "deepstack_visual_indexes" in vision:
        taps = [i for i in vision["deepstack_visual_indexes"] if i < vision_layers][:branch_layer]
        vision["deepstack_visual_indexes"] = taps or [vision_layers - 1]
    return vision


def cut_full_size_config(name: str, text_layers: int, vision_layers: int, branch_depth: int = 3,
                         image_token_id: int | None = None) -> CutShape:
    """The shape ``name`` (a ``FULL_SIZE_CONFIGS`` key or a short name) at reduced depth, for CPU checks.

    Widths, heads, KV heads, head_dim, rotary sections and the vocabulary stay real; B is what
    ``QZoomConfig`` picks for the cut depth. ``image_token_id`` replaces LLaVA's image token (the locally
    built tokenizer numbers ``<image>`` differently from the real one).
    """
    from qzoom_swift.config import default_branch_layer

    name = FULL_SIZE_SHORT_NAMES.get(name, name)
    if name not in FULL_SIZE_CONFIGS:
        raise KeyError(f"no full-size shape named {name!r}; known: {sorted(FULL_SIZE_CONFIGS)}")
    family, kwargs = FULL_SIZE_CONFIGS[name]
    if text_layers < branch_depth + 1:
        raise ValueError(f"{text_layers} text layers cannot hold B >= 1 base layer plus R={branch_depth} branch "
                         f"layers: keep >= {branch_depth + 1}")
    if vision_layers < 1:
        raise ValueError("keep at least one vision layer")
    kwargs = copy.deepcopy(kwargs)
    text = kwargs["text_config"]
    text["num_hidden_layers"] = text_layers
    b = default_branch_layer(family, text_layers, int(text["hidden_size"]), branch_depth)
    kwargs["vision_config"] = vision = _cut_vision(kwargs, vision_layers, b)
    if image_token_id is not None and "image_token_index" in kwargs:
        kwargs["image_token_index"] = image_token_id
    return CutShape(name, family, make_config(family, kwargs), b, branch_depth,
                    tuple(vision.get("fullatt_block_indexes", ())), tuple(vision.get("deepstack_visual_indexes", ())))


def full_size_processor(name: str):
    """(processor, generation-config kwargs) for a full-size shape: the locally built tokenizer and the real
    image geometry (LLaVA-1.5: CLIP at 336 px, 576 image tokens)."""
    name = FULL_SIZE_SHORT_NAMES.get(name, name)
    family, _ = FULL_SIZE_CONFIGS[name]
    builder = _builder(family)
    tokenizer = builder.tokenizer()
    return (builder.full_size_processor or builder.processor)(tokenizer), builder.generation(tokenizer)


def _write_model_dir(family: str, config, out_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    builder = _builder(family)
    tokenizer = builder.tokenizer()
    processor = builder.processor(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.eval()
    model.generation_config = GenerationConfig(**builder.generation(tokenizer))
    model.save_pretrained(str(out_dir))
    if builder.checkpoint_layout is not None:
        builder.checkpoint_layout(out_dir)
    processor.save_pretrained(str(out_dir))


def _llava_hf_key_layout(out_dir: Path) -> None:
    """Give the saved CLIP tower llava-hf's ``vision_tower.vision_model.`` key level, as real checkpoints
    (llava-hf/llava-1.5-7b-hf) have it: transformers saves the tower without it and loads either, vLLM's loader
    reads only the real layout. Same tensors, renamed keys."""
    from safetensors.torch import load_file, save_file

    for f in out_dir.glob("*.safetensors"):
        tensors = load_file(f)
        renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
                   for k, v in tensors.items()}
        save_file(renamed, f, metadata={"format": "pt"})


def tiny_config(family: str, size: str = "tiny"):
    """The config of a locally built model (``tiny`` or ``bench``)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return make_config(family, _builder(family).local_config(size))


def build_model_dir(family: str, size: str = "tiny", *, cache_dir: str | Path | None = None, seed: int = 0,
                    force: bool = False) -> Path:
    """Build (once) and return a model directory for ``family`` at ``size``; reused while it exists."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / "models" / f"{family}-{size}-s{seed}-v{BUILDER_VERSION}"
    if out.is_dir() and (out / "config.json").is_file() and not force:
        return out
    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root / "models"))
    try:
        _write_model_dir(family, tiny_config(family, size), tmp, seed)
        if out.exists():
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():  # another process won the race with a complete dir
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

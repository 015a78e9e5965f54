"""The locally built tiny model dirs load and run like real checkpoints, for each family."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES
from qzoom_swift.synthetic.images import QUESTION, make_shape_image, sample_shapes
from qzoom_swift.synthetic.models import build_model_dir, tiny_config

EXPECTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "processor_config.json", "generation_config.json", "chat_template.jinja")
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|vision_start|>": 151652, "<|vision_end|>": 151653,
                    "<|image_pad|>": 151655}


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    """``loaded(family)`` -> (model, processor, inputs for one image question); loaded once per module."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            d = tiny_dir(family)
            model = AutoModelForImageTextToText.from_pretrained(d).eval()
            processor = AutoProcessor.from_pretrained(d)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            image = make_shape_image(sample_shapes(1)[0], size=(392, 280))
            inputs = processor(text=[prompt], images=[image], return_tensors="pt")
            cache[family] = (model, processor, inputs)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_dir_has_expected_files(tiny_dir, family):
    d = tiny_dir(family)
    missing = [f for f in EXPECTED_FILES if not (d / f).is_file()]
    assert not missing, f"{d} lacks {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids(loaded, family):
    model, processor, _ = loaded(family)
    tok = processor.tokenizer
    if family == "llava":
        image_id = tok.convert_tokens_to_ids("<image>")
        assert image_id == model.config.image_token_index
        assert image_id != tok.unk_token_id
    else:
        # ms-swift hard-codes these ids in its Qwen templates.
        assert {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_IDS} == QWEN_SPECIAL_IDS
        assert model.config.image_token_id == 151655


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_logits(loaded, family):
    model, _, inputs = loaded(family)
    with torch.inference_mode():
        logits = model(**inputs).logits
    seq = inputs["input_ids"].shape[1]
    assert tuple(logits.shape) == (1, seq, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def _feature_rows(features) -> int:
    if isinstance(features, torch.Tensor):
        return features.shape[0] if features.dim() == 2 else features.shape[0] * features.shape[1]
    return sum(_feature_rows(f) for f in features)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_match_visual_features(loaded, family):
    model, _, inputs = loaded(family)
    n_placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if family == "llava":
        expected = 256  # (224 / 14)^2 patches, CLS dropped by the "default" feature strategy
        kwargs = {"pixel_values": inputs["pixel_values"]}
    else:
        expected = int(inputs["image_grid_thw"].prod()) // 4  # 2x2 patch merge
        kwargs = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    assert n_placeholders == expected
    with torch.inference_mode():
        out = model.model.get_image_features(**kwargs)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    assert _feature_rows(features) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_four_tokens(loaded, family):
    model, _, inputs = loaded(family)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] - inputs["input_ids"].shape[1] == 4


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_deterministic_per_seed(tmp_path, family):
    a = build_model_dir(family, cache_dir=tmp_path / "a", seed=0)
    b = build_model_dir(family, cache_dir=tmp_path / "b", seed=0)
    c = build_model_dir(family, cache_dir=tmp_path / "c", seed=1)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed, different weights"
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert _sha(a / "tokenizer.json") == _sha(b / "tokenizer.json")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa), "different seed, identical weights"


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_size_config(family):
    cfg = tiny_config(family, "bench")  # config only, no weights built
    assert cfg.text_config.hidden_size == 512
    assert cfg.text_config.num_hidden_layers == 12

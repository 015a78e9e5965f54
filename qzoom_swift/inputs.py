"""Processor inputs for image questions, the way a chat client sends them (tests, demo, benchmarks)."""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

ImageInput = Image.Image | str | os.PathLike
"""One image as a caller may pass it: a PIL image or the path of an image file."""
SOURCE_KEY = "qzoom_source"
"""``Image.info`` key holding the file an image was read from (errors name it after decoding)."""


def load_image(item: Any, where: str) -> Image.Image:
    """``item`` (PIL image or path) as a decoded RGB image; errors name ``where`` and the file.

    PIL decodes lazily, so a truncated file would otherwise fail far away, without its name.
    """
    if isinstance(item, str | os.PathLike):
        path = os.fspath(item)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{where}: cannot read image {path}: {type(exc).__name__}: {exc}") from exc
        image.info[SOURCE_KEY] = path
        return image
    if isinstance(item, Image.Image):
        name = getattr(item, "filename", "") or item.info.get(SOURCE_KEY) or ""
        try:
            image = item.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: cannot decode image {name or '(in memory)'}: {type(exc).__name__}: {exc}") \
                from exc
        if name:
            image.info[SOURCE_KEY] = name
        return image
    raise TypeError(f"{where}: expected a PIL image or an image path, got {type(item).__name__}")


def sample_images(images: Any, questions: str | list[str]) -> tuple[list[list[Image.Image]], list[str]]:
    """Per-sample decoded images and the questions, with the batch shape checked.

    With one question ``images`` is that question's image(s); with a list of questions it must hold one
    entry per question, each an image, a path, or a list of them.
    """
    if isinstance(questions, str):
        questions, images = [questions], [images]
    if not isinstance(questions, list | tuple) or not all(isinstance(q, str) for q in questions):
        raise TypeError("questions: expected a string or a list of strings")
    if not isinstance(images, list | tuple):
        raise TypeError(f"images: expected a list (one entry per question), got {type(images).__name__}")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} image entries for {len(questions)} questions: pass one entry (an image, a "
                         "path or a list of them) per question")
    out = []
    for i, entry in enumerate(images):
        items = list(entry) if isinstance(entry, list | tuple) else [entry]
        out.append([load_image(item, f"sample {i} image {j}") for j, item in enumerate(items)])
    return out, list(questions)


def chat_inputs(processor, images: list[Image.Image] | list[list[Image.Image]], questions: str | list[str],
                padding_side: str = "left"):
    """Batch of chat prompts (one user turn, images first, then the question) with the generation prompt.

    ``images``/``questions`` are per sample when ``questions`` is a list; left padding, as for generation.
    """
    if isinstance(questions, str):
        questions, images = [questions], [images]
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} image lists for {len(questions)} questions: pass one list per question")
    texts = []
    for sample_images, question in zip(images, questions):
        content = [{"type": "image"} for _ in sample_images] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True))
    flat = [img for sample_images in images for img in sample_images]
    processor.tokenizer.padding_side = padding_side
    return processor(text=texts, images=flat or None, return_tensors="pt", padding=True)


def resize_image_runs(ids: list[int], image_token: int, old_counts: list[int], new_counts: list[int]) -> list[int]:
    """``ids`` with image ``k``'s ``old_counts[k]`` image tokens as ``new_counts[k]`` tokens (markup kept).

    Counted, not by runs: LLaVA's crop tokens directly follow its source image's. One home for the prompt
    rewrites of the serving wings: a placeholder per image (count 1) for vLLM, which expands them itself, and
    back; LLaMA-Factory's view of an image replaced by the Q-Zoom low-budget one.
    """
    if len(old_counts) != len(new_counts):
        raise ValueError(f"{len(old_counts)} old and {len(new_counts)} new image token counts")
    out: list[int] = []
    k = skip = 0
    for t in ids:
        if skip:
            if t != image_token:
                raise ValueError(f"image {k - 1} has fewer than its {old_counts[k - 1]} tokens in the prompt")
            skip -= 1
            continue
        if t != image_token:
            out.append(t)
            continue
        if k >= len(old_counts):
            raise ValueError(f"the prompt holds more image tokens than its {len(old_counts)} image(s)")
        out.extend([image_token] * new_counts[k])
        skip, k = old_counts[k] - 1, k + 1
    if k != len(old_counts) or skip:
        raise ValueError(f"the prompt holds {k} of its {len(old_counts)} image(s)' tokens")
    return out


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

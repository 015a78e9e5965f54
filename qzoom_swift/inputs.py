"""Processor inputs for image questions, the way a chat client sends them (tests, demo, benchmarks)."""

from __future__ import annotations

from PIL import Image


def chat_inputs(processor, images: list[Image.Image] | list[list[Image.Image]], questions: str | list[str],
                padding_side: str = "left"):
    """Batch of chat prompts (one user turn, images first, then the question) with the generation prompt.

    ``images``/``questions`` are per sample when ``questions`` is a list; left padding, as for generation.
    """
    if isinstance(questions, str):
        questions, images = [questions], [images]
    texts = []
    for sample_images, question in zip(images, questions):
        content = [{"type": "image"} for _ in sample_images] + [{"type": "text", "text": question}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True))
    flat = [img for sample_images in images for img in sample_images]
    processor.tokenizer.padding_side = padding_side
    return processor(text=texts, images=flat or None, return_tensors="pt", padding=True)

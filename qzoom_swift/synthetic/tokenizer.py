"""A small byte-level BPE tokenizer built offline, with the Qwen-VL special tokens at their real ids.

No tokenizer can be downloaded on our machines, yet ms-swift hard-codes Qwen's special-token ids
(``<|image_pad|>`` = 151655, ``<|endoftext|>``/``<|im_end|>`` stripped by id). So the BPE learnt here
is padded with never-emitted filler entries up to 151643, where the real special tokens begin.
Everything is deterministic: the corpus is generated from fixed word lists and a seeded RNG.
"""

from __future__ import annotations

import random
from pathlib import Path

# The Qwen2.5-VL / Qwen3-VL added-token layout, starting at id 151643.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_VOCAB_SIZE = 151936  # embedding rows of the real Qwen2.5-VL-3B / Qwen3-VL models

# Qwen2's pre-tokenizer split pattern (contractions, letters, single digits, punctuation, spaces).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL: same markup, no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "",
)

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_WORDS = (
    "what is the color of shape circle square triangle digit number text word letter inside box marked "
    "image picture photo document chart table page title value answer question read small large red green "
    "blue yellow black white gray orange purple left right top bottom center corner region area detail "
    "how many which where who when does show shown written label line bar pie axis year total percent "
    "a an of in on at to for with and or not yes no this that there here it its one two three four five six "
    "seven eight nine zero single phrase using output grounding bounding region interest please describe "
    "assistant user system helpful you are the model zoom crop token budget resolution high low fine coarse"
).split()


def tokenizer_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """VQA-like sentences plus digits and punctuation, so the BPE covers what tests and demos say."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.5:
            words.insert(rng.randint(0, n), str(rng.randint(0, 9999)))
        sentence = " ".join(words)
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice(["?", ".", "!", ":", ",", ""]))
    lines.append("0123456789 ()[]{}<>+-*/=.,;:!?'\"#%&_|~^$@\\")
    return lines


def _train_bpe(vocab_size: int, seed: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    model_state = tok.model.__getstate__()
    import json

    state = json.loads(model_state)
    vocab: dict[str, int] = state["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return vocab, merges


def build_qwen_tokenizer(out_dir: str | Path | None, *, chat_template: str = QWEN2_VL_CHAT_TEMPLATE,
                         bpe_size: int = 4000, seed: int = 0):
    """Train the BPE and save a ``Qwen2Tokenizer`` whose special tokens sit at the real Qwen ids.

    The caller passes the family's ``chat_template`` (Qwen2.5-VL's by default), so no family name is tested here.
    """
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = _train_bpe(bpe_size, seed)
    next_id = len(vocab)
    for i in range(next_id, QWEN_FIRST_SPECIAL_ID):
        vocab[f"<|qzoom_filler_{i}|>"] = i
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    # Added in the real order first, so that ids follow Qwen's layout; then name eos/pad among them.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]}
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = chat_template
    check = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|image_pad|>", "</think>"])
    expected = [QWEN_FIRST_SPECIAL_ID, 151655, QWEN_FIRST_SPECIAL_ID + len(QWEN_SPECIAL_TOKENS) - 1]
    if check != expected:
        raise RuntimeError(f"tiny tokenizer special ids {check} != real Qwen ids {expected}")
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_llava_tokenizer(out_dir: str | Path | None, *, bpe_size: int = 4000, seed: int = 0):
    """Byte-level BPE with LLaVA-1.5's ``<s>``/``</s>``/``<image>``/``<pad>`` tokens right after it."""
    from transformers import AddedToken, Qwen2Tokenizer

    vocab, merges = _train_bpe(bpe_size, seed)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<image>", special=True, normalized=False)]}
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer

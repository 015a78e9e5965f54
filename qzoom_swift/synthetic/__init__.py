"""Models and data built locally, with no model or dataset hub.

- ``models``: Hugging Face model dirs with random weights at tiny, bench and real shapes (``qzoom build-tiny``,
  the tests, the benchmarks, the zoom bench's toy VLM);
- ``tokenizer``: the Qwen and LLaVA tokenizers those dirs carry (real special-token ids, small vocabularies);
- ``images``: seeded shape images and a small ms-swift jsonl dataset of them.

The real loading code is the same code path as for downloaded checkpoints; only where the files come from differs.
"""

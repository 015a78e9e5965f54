"""Benchmarks of the Q-Zoom paper that evalscope 1.14 does not ship, registered as evalscope benchmarks.

Importing this module registers (once; re-imports are no-ops):

- ``textvqa``: TextVQA validation (``lmms-lab/textvqa``), VQA soft accuracy, a subclass of evalscope's VQAv2;
- ``hr_bench_4k`` / ``hr_bench_8k``: HR-Bench (``DreamMr/HR-Bench``), A-D multiple choice, base64 images;
- ``mme_realworld_lite``: MME-RealWorld-Lite (``yifanzhang114/MME-RealWorld-lite-lmms-eval``), A-E choice;
- ``qzoom_bench``: the zoom bench's test split (``qzoom demo`` writes it), exact match, the bare question.

Each reads a local copy in Hugging Face layout (``dataset_args={name: {"dataset_id": DIR}}``); see
``qzoom_swift.eval.suite.BENCHMARKS`` for the exact files and columns. The multiple-choice prompts ask
for the letter directly (as the paper's lmms-eval prompts do) with evalscope's ``ANSWER:`` line; override
them with ``dataset_args.<name>.prompt_template`` (fields ``{question}`` and ``{letters}``).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from evalscope.api.benchmark import BenchmarkMeta, MultiChoiceAdapter, VisionLanguageAdapter
from evalscope.api.dataset import Sample
from evalscope.api.messages import ChatMessageUser, ContentImage, ContentText
from evalscope.api.registry import BENCHMARK_REGISTRY, register_benchmark
from evalscope.benchmarks.vqav2.vqav2_adapter import VQAv2Adapter
from evalscope.constants import Tags
from evalscope.utils.io_utils import bytes_to_base64

MC_PROMPT = (
    "{question}\n"
    "Answer with the option's letter from the given choices directly. The last line of your response should be "
    "of the form 'ANSWER: [LETTER]' (without quotes) where [LETTER] is one of {letters}."
)
TEXTVQA_PROMPT = (
    "{question}\nAnswer the question using a single word or phrase. The last line of your response should be of "
    'the form "ANSWER: [ANSWER]" (without quotes).'
)


def image_data_uri(value: Any) -> str | None:
    """A data URI for an image cell: HF Image struct ``{bytes, path}``, raw bytes or a base64 string.

    The MIME label is sniffed from the bytes (PNG/JPEG/other), though the model side ignores it anyway.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
        if value is None:
            return None
    if isinstance(value, str):
        if value.startswith("data:"):
            return value
        if len(value) < 4096 and Path(value).is_file():
            value = Path(value).read_bytes()
        else:
            value = base64.b64decode(value + "=" * (-len(value) % 4))
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"unsupported image cell of type {type(value).__name__}")
    fmt = "png" if bytes(value[:8]) == b"\x89PNG\r\n\x1a\n" else "jpeg"
    return bytes_to_base64(bytes(value), format=fmt, add_header=True)


def _local_data_file(dataset_id: str, names: tuple[str, ...]) -> str | None:
    """The first file of ``names`` inside a local dataset folder (HR-Bench's snapshot names its files)."""
    folder = Path(dataset_id)
    if not folder.is_dir():
        return None
    for name in names:
        hits = sorted(folder.glob(name)) or sorted(folder.glob(f"**/{name}"))
        if hits:
            return str(hits[0])
    return None


class _LetterChoiceAdapter(VisionLanguageAdapter, MultiChoiceAdapter):
    """Shared record -> Sample of the A-D/E benchmarks (one image, question, lettered options)."""

    def _mc_sample(self, question: str, options: list[str], answer: str, image: Any, metadata: dict) -> Sample:
        letters = [chr(ord("A") + i) for i in range(len(options))]
        option_lines = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, options))
        prompt = self.prompt_template.format(question=f"{question.strip()}\n{option_lines}",
                                             letters=", ".join(letters))
        content: list = []
        uri = image_data_uri(image)
        if uri:
            content.append(ContentImage(image=uri))
        content.append(ContentText(text=prompt))
        return Sample(input=[ChatMessageUser(content=content)], choices=letters, target=answer.strip().upper(),
                      metadata=metadata)


_HR_DESCRIPTION = """
## Overview
HR-Bench (Wang et al., 2024): multiple-choice questions about 4K / 8K images, single-instance (FSP) and
cross-instance (FCP) fine-grained perception. Registered by qzoom_swift from a local copy of
DreamMr/HR-Bench; accuracy over all rows (the paper's "average" weights FSP and FCP equally; both have
400 rows, so the two agree on the full split).
"""


class _HRBenchAdapter(_LetterChoiceAdapter):
    parquet_name = ""

    def load_subset(self, subset, data_loader):
        files = _local_data_file(self.dataset_id, (self.parquet_name,))
        if files is None:
            return super().load_subset(subset, data_loader)
        # The hub snapshot names its files hr_bench_4k/8k.parquet, which `datasets` reads as split "train":
        # select the file by name instead, so one snapshot folder serves both benchmarks.
        loader = data_loader(
            data_id_or_path=self.dataset_id, split=self.eval_split, subset=subset, sample_fields=self.record_to_sample,
            filter_func=self.sample_filter, limit=self.limit, repeats=self.repeats, shuffle=self.shuffle,
            shuffle_choices=self.shuffle_choices, seed=self.seed, data_source=self.dataset_hub,
            version=self.dataset_revision, force_redownload=self.force_redownload, dataset_dir=self.dataset_dir,
            data_files={self.eval_split: files},
        )
        return loader.load()

    def record_to_sample(self, record: dict[str, Any]) -> Sample:
        options = [str(record[k]) for k in ("A", "B", "C", "D") if record.get(k) is not None]
        return self._mc_sample(str(record["question"]), options, str(record["answer"]), record.get("image"),
                               {"index": record.get("index"), "category": record.get("category"),
                                "cycle_category": record.get("cycle_category")})


_MME_DESCRIPTION = """
## Overview
MME-RealWorld-Lite (Zhang et al., 2024): 1,919 multiple-choice (A-E) questions on high-resolution real-world
images (perception and reasoning; monitoring, autonomous driving, OCR, diagrams, remote sensing).
Registered by qzoom_swift from a local copy of yifanzhang114/MME-RealWorld-lite-lmms-eval; accuracy.
"""


def _strip_option_label(option: str) -> str:
    text = option.strip()
    if len(text) >= 3 and text[0] == "(" and text[2] == ")":
        return text[3:].strip()
    return text


class MMERealWorldLiteAdapter(_LetterChoiceAdapter):
    def record_to_sample(self, record: dict[str, Any]) -> Sample:
        options = [_strip_option_label(str(o)) for o in (record.get("multi-choice options") or [])]
        image = record.get("bytes") if record.get("bytes") is not None else record.get("image")
        return self._mc_sample(str(record["question"]), options, str(record["answer"]), image,
                               {"index": record.get("index"), "question_id": record.get("question_id"),
                                "category": record.get("category"), "l2_category": record.get("l2-category")})


_TEXTVQA_DESCRIPTION = """
## Overview
TextVQA (Singh et al., 2019) validation: questions that need reading scene text, 10 human answers each.
Registered by qzoom_swift from a local copy of lmms-lab/textvqa; VQA soft accuracy (evalscope's VQAv2
scorer, the official leave-one-out formula) with exact match as a second metric.
"""


class TextVQAAdapter(VQAv2Adapter):
    def record_to_sample(self, record: dict[str, Any]) -> Sample:
        sample = super().record_to_sample(record)
        # Image first, as the paper's lmms-eval prompt (and every Q-Zoom training sample) puts it.
        parts = sample.input[0].content
        sample.input[0].content = [p for p in parts if isinstance(p, ContentImage)] + \
                                  [p for p in parts if not isinstance(p, ContentImage)]
        return sample


_QZOOM_BENCH_DESCRIPTION = """
## Overview
The qzoom_swift zoom bench: synthetic 448 px scenes with a fine question (the digit in a small red box, legible
only near native scale) and a coarse one (the colour of a large shape), single-word answers and ground-truth
boxes (``kind``, ``box`` in the metadata). ``qzoom demo`` writes the local copy; exact match.
"""


class QZoomBenchAdapter(TextVQAAdapter):
    """The bench's question as the toy model was trained on it (no answer-format instruction), image first."""

    def record_to_sample(self, record: dict[str, Any]) -> Sample:
        sample = super().record_to_sample(record)
        sample.metadata.update(kind=record.get("kind"), box=record.get("box"))
        return sample


def _register(meta: BenchmarkMeta, adapter: type) -> None:
    if BENCHMARK_REGISTRY.is_materialized(meta.name):
        return
    register_benchmark(meta)(adapter)


def _register_all() -> None:
    mc = dict(tags=[Tags.MULTIPLE_CHOICE, Tags.MULTI_MODAL], metric_list=["acc"], prompt_template=MC_PROMPT)
    for size in ("4k", "8k"):
        cls = type(f"HRBench{size.upper()}Adapter", (_HRBenchAdapter,), {"parquet_name": f"hr_bench_{size}.parquet"})
        cls.__module__ = __name__
        globals()[cls.__name__] = cls
        _register(BenchmarkMeta(name=f"hr_bench_{size}", pretty_name=f"HR-Bench {size.upper()}",
                                dataset_id="DreamMr/HR-Bench", eval_split="test",
                                description=_HR_DESCRIPTION, **mc), cls)
    _register(BenchmarkMeta(name="mme_realworld_lite", pretty_name="MME-RealWorld-Lite",
                            dataset_id="yifanzhang114/MME-RealWorld-lite-lmms-eval", eval_split="train",
                            description=_MME_DESCRIPTION, **mc), MMERealWorldLiteAdapter)
    _register(BenchmarkMeta(name="textvqa", pretty_name="TextVQA", dataset_id="lmms-lab/textvqa",
                            tags=[Tags.MULTI_MODAL, Tags.QA], metric_list=["vqa_score", "exact_match"],
                            primary_metric="vqa_score", eval_split="validation", prompt_template=TEXTVQA_PROMPT,
                            description=_TEXTVQA_DESCRIPTION, evaluation_version="v1.1"), TextVQAAdapter)
    _register(BenchmarkMeta(name="qzoom_bench", pretty_name="Zoom bench", dataset_id="qzoom_bench",
                            tags=[Tags.MULTI_MODAL, Tags.QA], metric_list=["exact_match", "vqa_score"],
                            primary_metric="exact_match", eval_split="test", prompt_template="{question}",
                            description=_QZOOM_BENCH_DESCRIPTION, evaluation_version="v1.1"), QZoomBenchAdapter)


_register_all()

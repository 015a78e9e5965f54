"""Answer matchers: is a model answer right, given the ground truth(s)?

Stage 3 (gate labels) and stage 2 (hard-sample mining) both turn free-text answers into right/wrong.
Each matcher returns a score in [0, 1]; ``is_correct`` thresholds it. An empty answer is never right
(the released code's substring test counted it as a match). ``vqa``, ``anls`` and ``relaxed`` call the
scorers of evalscope's TextVQA/VQAv2, DocVQA and ChartQA benchmarks (the optional ``eval`` extra), so a
label made in stage 2/3 means what ``qzoom eval`` reports; ``exact`` is our own (VQA normalisation).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (the VQA convention)."""
    text = str(text).lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(gt: str | Sequence[str]) -> list[str]:
    return [gt] if isinstance(gt, str) else [str(g) for g in gt]


def exact_match(answer: str, gt: str | Sequence[str]) -> float:
    """1 if the normalised answer equals any normalised ground truth."""
    a = normalize_answer(answer)
    return float(bool(a) and any(a == normalize_answer(g) for g in _as_list(gt)))


def _evalscope(module: str, name: str, matcher: str):
    """``module.name`` from evalscope: the scorer ``qzoom eval`` reports with, so labels and scores agree."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"the {matcher!r} matcher scores with evalscope's {module}.{name}: "
                          "pip install 'qzoom_swift[eval]' (evalscope 1.14)") from exc


def vqa_soft_accuracy(answer: str, gt: str | Sequence[str]) -> float:
    """VQA accuracy as evalscope's VQAv2/TextVQA scorer: min(#matching annotators / 3, 1), leave-one-out averaged."""
    if not str(answer).strip():
        return 0.0
    score = _evalscope("evalscope.benchmarks.vqav2.vqav2_adapter", "_vqa_soft_accuracy", "vqa")
    return float(score(str(answer), _as_list(gt)))


def anls(answer: str, gt: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity (DocVQA/InfoVQA), evalscope's ``anls`` metric: best over ground
    truths, 0 below ``threshold``; an empty answer scores 0 (evalscope gives 1 when the truth is empty too)."""
    if not str(answer).strip():
        return 0.0
    metric = _evalscope("evalscope.metrics.nlp.metrics", "ANLS", "anls")(thresh_hold=threshold)
    return float(metric.apply([str(answer)], [json.dumps(_as_list(gt))])[0])


def relaxed_accuracy(answer: str, gt: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy, evalscope's ``relaxed_correctness`` (Qwen-VL's): numbers within ``tolerance``
    relative error, other answers equal ignoring case; 1 if any ground truth passes. Empty answers score 0."""
    answer = str(answer).strip()
    if not answer:
        return 0.0
    correct = _evalscope("evalscope.benchmarks.chartqa.utils", "relaxed_correctness", "relaxed")
    return float(any(correct(answer, g.strip(), max_relative_change=tolerance) for g in _as_list(gt)))


MATCHERS: dict[str, Callable[[str, str | Sequence[str]], float]] = {
    "exact": exact_match,
    "vqa": vqa_soft_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
}


EVALSCOPE_MATCHERS = ("vqa", "anls", "relaxed")


def get_matcher(name: str) -> Callable[[str, str | Sequence[str]], float]:
    """The matcher ``name``; one backed by evalscope fails here, when a job starts, if the extra is missing."""
    if name not in MATCHERS:
        raise ValueError(f"unknown answer matcher {name!r}; choose from {', '.join(MATCHERS)} (or 'judge')")
    if name in EVALSCOPE_MATCHERS:
        from qzoom_swift.extras import require_extra

        require_extra("eval", f"the {name!r} matcher (evalscope's scorer)")
    return MATCHERS[name]


def is_correct(score: float, threshold: float = 0.5) -> bool:
    return score >= threshold

"""Answer matchers: is a model answer right, given the ground truth(s)?

Stage 3 (gate labels) and stage 2 (hard-sample mining) both turn free-text answers into right/wrong.
Each matcher returns a score in [0, 1]; ``is_correct`` thresholds it. An empty answer is never right
(the released code's substring test counted it as a match).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"^[-+]?\d*\.?\d+(e[-+]?\d+)?%?$")


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


def vqa_soft_accuracy(answer: str, gt: str | Sequence[str]) -> float:
    """VQA accuracy: min(#annotators who gave this answer / 3, 1)."""
    a = normalize_answer(answer)
    if not a:
        return 0.0
    return min(sum(a == normalize_answer(g) for g in _as_list(gt)) / 3.0, 1.0)


def _levenshtein(a: str, b: str) -> int:
    try:
        import Levenshtein  # optional: the `eval` extra brings it (levenshtein / python-Levenshtein)
    except ImportError as exc:
        raise ImportError("the ANLS matcher needs the Levenshtein module: pip install 'qzoom_swift[eval]' "
                          "(or just `pip install levenshtein`)") from exc
    return Levenshtein.distance(a, b)


def anls(answer: str, gt: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity (DocVQA/InfoVQA): best over ground truths, 0 below threshold."""
    a = " ".join(str(answer).lower().split())
    if not a:
        return 0.0
    best = 0.0
    for g in _as_list(gt):
        g = " ".join(g.lower().split())
        if not g:
            continue
        sim = 1.0 - _levenshtein(a, g) / max(len(a), len(g))
        best = max(best, sim if sim >= threshold else 0.0)
    return best


def _to_number(text: str) -> float | None:
    t = str(text).strip().replace(",", "").rstrip(".")
    if not _NUMBER.match(t.lower()):
        return None
    value = float(t.rstrip("%"))
    return value / 100.0 if t.endswith("%") else value


def relaxed_accuracy(answer: str, gt: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA: numbers within 5% relative error count; other answers must match exactly."""
    for g in _as_list(gt):
        a_num, g_num = _to_number(answer), _to_number(g)
        if a_num is not None and g_num is not None:
            if g_num == 0.0:
                if a_num == 0.0:
                    return 1.0
            elif abs(a_num - g_num) / abs(g_num) <= tolerance:
                return 1.0
        elif exact_match(answer, g):
            return 1.0
    return 0.0


MATCHERS: dict[str, Callable[[str, str | Sequence[str]], float]] = {
    "exact": exact_match,
    "vqa": vqa_soft_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
}


def get_matcher(name: str) -> Callable[[str, str | Sequence[str]], float]:
    if name not in MATCHERS:
        raise ValueError(f"unknown answer matcher {name!r}; choose from {', '.join(MATCHERS)} (or 'judge')")
    return MATCHERS[name]


def is_correct(score: float, threshold: float = 0.5) -> bool:
    return score >= threshold

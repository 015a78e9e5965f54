"""Stage 3 label rules: which resolution-trajectory samples teach the gate, and what they teach.

A sample answered at increasing token budgets is kept only when its correctness is a step function
(wrong ... wrong, right ... right), because only then "more resolution helps" is a property of the
question and not noise. The gate then learns 1 (zoom) at a budget where the answer is still wrong,
and 0 at a budget where it is already right. Everything here is pure and seeded.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qzoom_swift.config import GateSampling

DEFAULT_TRAJECTORY = (64, 144, 256, 576, 1024, 2048)
KINDS = ("easy", "transition", "always_wrong", "unstable", "unstable_top", "hallucinated", "unknown")
"""easy / transition are kept; the rest are discarded: always_wrong, unstable (not a clean step), unstable_top
(the top budgets' answers disagree), hallucinated (their consensus misses the ground truth), unknown (a judge
verdict is missing)."""
DROP_KINDS = ("always_wrong", "unstable", "unstable_top", "hallucinated", "unknown")

SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
"""The short-answer suffix the released inference appends to every question (reference §5.1)."""
SHORT_ANSWER_MARKERS = ("single word or phrase", "one word", "a word or a phrase", "short answer", "briefly",
                        "option's letter", "letter of the", "yes or no")
"""Phrases that already ask for a short answer (case-insensitive); such prompts are left alone."""
_PUNCT = str.maketrans("", "", string.punctuation)


def asks_short_answer(text: str) -> bool:
    """Whether ``text`` already asks for a short answer (one of ``SHORT_ANSWER_MARKERS``)."""
    low = text.lower()
    return any(marker in low for marker in SHORT_ANSWER_MARKERS)


def ensure_short_answer(text: str) -> str:
    """``text`` with the short-answer instruction on a new line, unless it already asks for a short answer.

    Stage-3 labels compare short answers: a prompt without such an instruction makes the model answer in
    sentences, which no matcher (nor the released containment test) scores reliably.
    """
    return text if asks_short_answer(text) else f"{text.rstrip()}\n{SHORT_ANSWER_INSTRUCTION}"


def release_normalize(text: Any) -> str:
    """The release's ``_normalize_answer``: lower case, ends stripped, then ``string.punctuation`` deleted.

    Inner spaces stay as they are, and "3.5" becomes "35": the released filter compares exactly these strings.
    """
    return str(text).lower().strip().translate(_PUNCT)


def release_ground_truth(gt: str | Sequence[str]) -> str:
    """The release's ground truth: one answer, only lower-cased and stripped (punctuation kept).

    The release reads one ``text`` field; of several ground truths the first stands in for it.
    """
    first = gt if isinstance(gt, str) else next(iter(gt), "")
    return str(first).lower().strip()


def release_contains(a: str, b: str) -> bool:
    """The release's match of two already-normalised strings: one contains the other.

    An empty string never matches here (the release's substring test matched it with everything, a bug the
    README's "Empty answers in stage 3" row lists).
    """
    return bool(a and b) and (a in b or b in a)


def lenient_normalize(text: Any) -> str:
    """The ``consensus`` rule's normalisation: lower case, punctuation removed, spaces collapsed."""
    return " ".join(str(text).lower().translate(_PUNCT).split())


def contains_either(a: Any, b: Any) -> bool:
    """The ``consensus`` rule's match: one ``lenient_normalize``-d answer contains the other (empty never)."""
    return release_contains(lenient_normalize(a), lenient_normalize(b))


@dataclass(frozen=True)
class ConsensusScore:
    """Right/wrong of one trajectory against the consensus of its top budgets (reference §4.2)."""

    correct: tuple[bool, ...]
    """Each answer against the consensus (or, when the consensus is dropped, against the ground truth)."""
    target: str
    """The consensus: the most common normalised answer of the top budgets (ties: the lower budget's)."""
    drop: str | None = None
    """None, ``unstable_top`` (the top answers disagree) or ``hallucinated`` (the consensus misses the truth)."""


def released_score(answers: Sequence[str], gt: str | Sequence[str], top: int = 2) -> ConsensusScore:
    """The release's ``_filter_for_hard_cases`` scoring, rule for rule (the default, ``released``).

    Answers are ``release_normalize``-d; the consensus is the most common of the top ``top``; the sample is
    ``unstable_top`` unless some answer occurs at least twice among them (with two: the top two are identical
    strings, so "red car" / "the red car" is unstable); it is ``hallucinated`` unless the consensus and the
    ground truth (``release_ground_truth``: punctuation kept, so "3.5" or "1,000" never matches "35" or
    "1000") contain one another; each budget is right when it and the consensus contain one another.
    """
    if not answers:
        raise ValueError("empty trajectory")
    norm = [release_normalize(a) for a in answers]
    group = norm[-max(1, top):]
    target, freq = Counter(group).most_common(1)[0]
    truth = release_ground_truth(gt)
    if len(group) >= top and freq < 2:
        drop: str | None = "unstable_top"
    elif not release_contains(target, truth):
        drop = "hallucinated"
    else:
        return ConsensusScore(tuple(release_contains(a, target) for a in norm), target)
    return ConsensusScore(tuple(release_contains(a, truth) for a in norm), target, drop)  # = matches_truth


def consensus_score(answers: Sequence[str], gt: str | Sequence[str], top: int = 2) -> ConsensusScore:
    """The ``consensus`` rule: the release's shape, more lenient (an option; ``released`` is the default).

    Differences from ``released_score``: answers and ground truths are normalised alike (punctuation removed,
    spaces collapsed), the top answers need only contain the consensus (not equal it), and any of several
    ground truths may match. ``Counter.most_common`` breaks ties by first occurrence, so with two top answers
    that differ as strings but contain one another the lower budget's wins.
    """
    if not answers:
        raise ValueError("empty trajectory")
    gts = [gt] if isinstance(gt, str) else [str(g) for g in gt]
    group = [lenient_normalize(a) for a in answers[-max(1, min(top, len(answers))):]]
    target = Counter(group).most_common(1)[0][0]
    if not all(contains_either(a, target) for a in group):
        drop: str | None = "unstable_top"
    elif not any(contains_either(target, g) for g in gts):
        drop = "hallucinated"
    else:
        return ConsensusScore(tuple(contains_either(a, target) for a in answers), target)
    return ConsensusScore(tuple(any(contains_either(a, g) for g in gts) for a in answers), target, drop)


CONSENSUS_SCORERS = {"released": released_score, "consensus": consensus_score}
"""The scorings that compare each budget with the consensus of the top budgets (the others use a matcher)."""


def matches_truth(scoring: str, answer: str, gt: str | Sequence[str]) -> bool:
    """Whether ``answer`` alone matches the ground truth under a ``CONSENSUS_SCORERS`` scoring's own rule."""
    if scoring == "released":
        return release_contains(release_normalize(answer), release_ground_truth(gt))
    return any(contains_either(answer, g) for g in ([gt] if isinstance(gt, str) else gt))


@dataclass(frozen=True)
class TrajectoryClass:
    kind: str
    """easy (right everywhere), transition (a clean step), always_wrong, unstable (discarded)."""
    step: int | None = None
    """Index of the first right budget (0 for easy); None when discarded."""


def classify_trajectory(correct: Sequence[bool], stable_top: int = 2) -> TrajectoryClass:
    """Step-function test; the top ``stable_top`` budgets must all be right (a stable reference answer)."""
    c = [bool(x) for x in correct]
    if not c:
        raise ValueError("empty trajectory")
    if not any(c):
        return TrajectoryClass("always_wrong")
    step = c.index(True)
    if not all(c[step:]):
        return TrajectoryClass("unstable")  # right, then wrong again: not monotone
    if len(c) - step < min(stable_top, len(c)):
        return TrajectoryClass("unstable")  # only the very top is right: the reference itself is shaky
    return TrajectoryClass("easy" if step == 0 else "transition", step)


def sample_rng(sample_id: str, seed: int) -> random.Random:
    """A per-sample RNG: the same sample gets the same draw whatever order samples are processed in."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def choose_gate_example(cls: TrajectoryClass, num_budgets: int, rng: random.Random, positive_prob: float = 0.9,
                        exclude_top: int = 2) -> tuple[int, int] | None:
    """(label, budget index) for a kept sample, following the released recipe.

    Transition: with ``positive_prob`` label 1 at one of the last two wrong budgets (next to the step),
    else label 0 at a right budget below the top ``exclude_top`` (None when there is none: the released
    label is -100). Easy: label 0 at a budget below the top. The top budgets are never used as inputs: they
    define the reference answer.
    """
    if cls.kind not in ("easy", "transition"):
        return None
    usable_right = list(range(cls.step, max(num_budgets - exclude_top, 0)))
    if cls.kind == "easy":
        return (0, rng.choice(usable_right)) if usable_right else None
    if rng.random() < positive_prob:
        wrong = list(range(max(cls.step - 2, 0), cls.step))
        return 1, rng.choice(wrong)
    return (0, rng.choice(usable_right)) if usable_right else None  # released: -100, no example


def balance_easy(ids_by_kind: dict[str, list[str]], easy_per_transition: float, seed: int) -> set[str]:
    """Keep every transition and about ``easy_per_transition`` times as many easy samples (seeded draw)."""
    transitions = list(ids_by_kind.get("transition", []))
    easy = sorted(ids_by_kind.get("easy", []))
    if easy_per_transition < 0:
        return set(transitions) | set(easy)
    want = min(len(easy), int(round(easy_per_transition * len(transitions))))
    rng = random.Random(seed)
    return set(transitions) | set(rng.sample(easy, want))


def trajectory_reference(row: dict) -> str | list[str] | None:
    """The ground truth of a trajectory record: its last assistant turn, else an ``answer``/``answers`` field."""
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return message.get("content")
    return row.get("answer") or row.get("answers")


def trajectory_class(row: dict, sampling: GateSampling) -> tuple[TrajectoryClass, list[bool] | None]:
    """(class, right/wrong per budget) of one trajectory record under ``sampling.scoring``.

    ``auto`` follows the record's ``qzoom_scoring`` (what ``qzoom gate-labels`` used), else ``released``;
    a judge's verdicts are ``stored`` in ``qzoom_correct``. A matcher reuses the stored ``qzoom_correct`` of a
    record it scored (or that does not say how it was scored) and recomputes the others from the answers.
    """
    scoring = sampling.scoring if sampling.scoring != "auto" else (row.get("qzoom_scoring") or "released")
    answers = [str(a) for a in row["qzoom_answers"]]
    if scoring in CONSENSUS_SCORERS:
        gt = trajectory_reference(row)
        if not gt:
            return TrajectoryClass("unknown"), None
        score = CONSENSUS_SCORERS[scoring](answers, gt, sampling.stable_top)
        if score.drop is not None:
            return TrajectoryClass(score.drop), list(score.correct)
        # released: no test beyond the step (its top answers equal the consensus); consensus: the top must be right
        stable = 1 if scoring == "released" else sampling.stable_top
        return classify_trajectory(score.correct, stable), list(score.correct)
    if scoring in ("stored", "judge") or (row.get("qzoom_correct") is not None and
                                             row.get("qzoom_scoring") in (None, scoring)):
        correct = row.get("qzoom_correct")  # a judge's verdicts, or this matcher's scores as the job stored them
        if correct is None or any(c is None for c in correct):
            return TrajectoryClass("unknown"), None
        correct = [bool(c) for c in correct]
    else:
        from qzoom_swift.labels.matchers import get_matcher, is_correct

        gt = trajectory_reference(row)
        if not gt:
            return TrajectoryClass("unknown"), None
        matcher = get_matcher(scoring)
        correct = [is_correct(matcher(a, gt), sampling.correct_threshold) for a in answers]
    return classify_trajectory(correct, sampling.stable_top), correct


def _row_id(index: int, row: dict) -> str:
    """The record's ``qzoom_id``, else ``<index>-<hash>`` (trajectories written by another tool)."""
    if row.get("qzoom_id"):
        return str(row["qzoom_id"])
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"{index}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def gate_training_row(row: dict, rid: str, label: int, index: int, kind: str, patch_unit: int | None) -> dict:
    """One ``swift sft`` row: the record (``qzoom_*`` fields dropped) at its drawn budget, with its gate label.

    The budget becomes ``chat_template_kwargs`` min = max pixels, so the template encodes exactly it; the
    prompt gets the short-answer instruction when the answers were produced with it (``qzoom_short_answer``);
    a record without an assistant turn gets its ground truth as the response (the gate reads the token before it).
    """
    unit = row.get("qzoom_patch_unit") or patch_unit
    if not unit:
        raise ValueError(f"trajectory {rid} has no qzoom_patch_unit (pixels per visual token side; 28 for "
                         "Qwen2.5-VL, 32 for Qwen3-VL): written by `qzoom gate-labels`, or set it in the records")
    budget = int(row["qzoom_budgets"][index])
    pixels = budget * int(unit) * int(unit)
    record = {k: v for k, v in row.items() if not k.startswith("qzoom_")}
    messages = [dict(m) if isinstance(m, dict) else m for m in record.get("messages") or []]
    if row.get("qzoom_short_answer"):
        user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        if user is not None and isinstance(user.get("content"), str):
            user["content"] = ensure_short_answer(user["content"])
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        gt = trajectory_reference(row)
        messages.append({"role": "assistant", "content": gt if isinstance(gt, str) else str((gt or [""])[0])})
    record["messages"] = messages
    record["chat_template_kwargs"] = dict(record.get("chat_template_kwargs") or {}, min_pixels=pixels,
                                          max_pixels=pixels)
    record.update(qzoom_gate=int(label), qzoom_gate_meta={"id": rid, "kind": kind, "budget": budget})
    return record


def gate_training_rows(trajectories: Sequence[dict], sampling: GateSampling,
                       patch_unit: int | None = None) -> tuple[list[dict], dict[str, Any]]:
    """The released stage-3 draw (reference §4.2), seeded: filter, 1:1 easy/transition balance, one budget each.

    The one rule behind ``qzoom gate-labels``' ``gate_train.jsonl`` and the ms-swift preprocessor, so both give
    the same rows for the same trajectories and ``sampling``. Every easy and transition sample counts in the
    balance; a drawn sample without a usable budget (the released label -100) then gives no row. Returns the
    rows (in input order) and a summary.
    """
    kinds: Counter = Counter()
    by_kind: dict[str, list[str]] = {}
    found: dict[str, tuple[int, dict, TrajectoryClass]] = {}
    for i, row in enumerate(trajectories):
        rid = _row_id(i, row)
        cls, _ = trajectory_class(row, sampling)
        kinds[cls.kind] += 1
        if cls.kind in ("easy", "transition"):
            by_kind.setdefault(cls.kind, []).append(rid)
            found[rid] = (i, row, cls)
    keep = balance_easy(by_kind, sampling.easy_per_transition, sampling.seed)
    rows, labels = [], Counter()
    for rid in sorted(keep, key=lambda r: found[r][0]):
        _, row, cls = found[rid]
        choice = choose_gate_example(cls, len(row["qzoom_budgets"]), sample_rng(rid, sampling.seed),
                                     sampling.positive_prob)  # the top two budgets are never inputs (released)
        if choice is None:
            kinds["no_example"] += 1
            continue
        rows.append(gate_training_row(row, rid, choice[0], choice[1], cls.kind, patch_unit))
        labels[choice[0]] += 1
    easy_kept = sum(1 for r in keep if found[r][2].kind == "easy")
    summary = {"answered": len(trajectories), "kinds": {k: v for k, v in kinds.items() if k != "no_example"},
               "kept": len(rows), "discarded": {k: kinds[k] for k in DROP_KINDS if kinds[k]},
               "no_example": kinds["no_example"], "easy_dropped_for_balance": len(by_kind.get("easy", [])) - easy_kept,
               "labels": {"zoom(1)": labels[1], "no_zoom(0)": labels[0]}}
    return rows, summary


@dataclass(frozen=True)
class CalibrationPoint:
    tau: float
    accuracy: float
    """Estimated answer accuracy when zooming exactly the samples with p >= tau."""
    skip_ratio: float
    """Fraction of samples answered from the low-resolution pass (no RoI)."""


def calibration_curve(gate_probs: Sequence[float], correct_low: Sequence[bool], correct_zoom: Sequence[bool],
                      taus: Sequence[float] | None = None) -> list[CalibrationPoint]:
    """Accuracy / no-RoI ratio over thresholds, from per-sample low-res and zoomed correctness."""
    if not (len(gate_probs) == len(correct_low) == len(correct_zoom)) or not gate_probs:
        raise ValueError("calibration needs the same, non-zero number of probabilities and outcomes")
    if taus is None:
        taus = sorted({0.0, 1.0 + 1e-9, *[float(p) for p in gate_probs]})
    n = len(gate_probs)
    curve = []
    for tau in taus:
        zoom = [p >= tau for p in gate_probs]
        acc = sum((cz if z else cl) for z, cl, cz in zip(zoom, correct_low, correct_zoom)) / n
        curve.append(CalibrationPoint(float(tau), acc, 1.0 - sum(zoom) / n))
    return curve


THRESHOLD_RULES = ("plateau-middle", "edge")
"""Where ``choose_threshold`` puts tau_gate: ``edge`` on the chosen curve point (the gate probability of the
least confident zoomed held-out sample: the rule before plateaus existed); ``plateau-middle`` (default) in the
middle, in logit space, of the plateau of thresholds around it that are at least as accurate and skip nearly as
much (``threshold_plateau``)."""


@dataclass(frozen=True)
class Plateau:
    """Thresholds ``low`` < tau <= ``high`` that are as good as the chosen one on the held-out set."""

    low: float
    high: float


def threshold_plateau(curve: Sequence[CalibrationPoint], chosen: CalibrationPoint, min_skip: float) -> Plateau:
    """The run of curve points around ``chosen`` with accuracy >= chosen's and no-RoI ratio >= ``min_skip``.

    A threshold between two neighbouring curve points decides like the upper one, so the plateau reaches from
    the curve threshold just below the run (exclusive; 0 when there is none) to the run's top. Zooming a sample
    that is right (or wrong) either way costs no estimated accuracy, so on a gate that separates the two kinds
    of question, every threshold between the clusters is on the plateau, however wide the gap between them.
    """
    points = sorted(curve, key=lambda p: p.tau)
    i = next(k for k, p in enumerate(points) if p.tau == chosen.tau)

    def ok(p: CalibrationPoint) -> bool:
        return p.accuracy >= chosen.accuracy - 1e-12 and p.skip_ratio >= min_skip - 1e-12

    lo = hi = i
    while lo > 0 and ok(points[lo - 1]):
        lo -= 1
    while hi + 1 < len(points) and ok(points[hi + 1]):
        hi += 1
    return Plateau(points[lo - 1].tau if lo > 0 else 0.0, points[hi].tau)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def plateau_middle(plateau: Plateau) -> float:
    """The middle of the plateau in logit space: the same margin, in the gate's own units, to either edge.

    Gate probabilities of the two kinds of question sit near 0 and near 1, where probability differences say
    little (1e-5 vs 1e-3 is a 4.6 logit gap); the logit is what the gate's Linear head moves linearly. An edge
    at 0 or at/above 1 has no finite logit: then the upper edge is kept (no margin can be computed).
    """
    low, high = plateau.low, plateau.high
    if not (0.0 < low < high < 1.0):
        return high
    mid = 0.5 * (_logit(low) + _logit(high))
    return 1.0 / (1.0 + math.exp(-mid))


def choose_threshold(curve: Sequence[CalibrationPoint], *, max_accuracy_drop: float | None = None,
                     target_skip_ratio: float | None = None,
                     rule: str = "plateau-middle") -> tuple[CalibrationPoint, Plateau]:
    """(threshold with its held-out accuracy and no-RoI ratio, its plateau).

    The decisions: skip most while staying within ``max_accuracy_drop`` of the curve's best accuracy, or skip
    at least ``target_skip_ratio`` of the samples with the smallest threshold. ``edge`` returns that curve
    point: a threshold equal to a zoomed held-out sample's probability, so a test sample a hair less confident
    is skipped. ``plateau-middle`` moves to the middle of the plateau of thresholds at least as accurate and
    skipping at least ``target_skip_ratio`` (or the chosen ratio minus ``max_accuracy_drop``: the margin may
    cost as much no-RoI ratio as the decisions may cost accuracy), and reports the decisions made there.
    """
    if (max_accuracy_drop is None) == (target_skip_ratio is None):
        raise ValueError("choose exactly one of max_accuracy_drop and target_skip_ratio")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule={rule!r}; choose from {', '.join(THRESHOLD_RULES)}")
    points = sorted(curve, key=lambda p: p.tau)
    if target_skip_ratio is not None:
        chosen = next((p for p in points if p.skip_ratio >= target_skip_ratio), points[-1])
        min_skip = min(target_skip_ratio, chosen.skip_ratio)
    else:
        best = max(p.accuracy for p in points)
        ok = [p for p in points if p.accuracy >= best - max_accuracy_drop - 1e-12]
        chosen = max(ok, key=lambda p: (p.skip_ratio, -p.tau))
        min_skip = chosen.skip_ratio - max_accuracy_drop
    plateau = threshold_plateau(points, chosen, min_skip)
    if rule == "edge":
        return chosen, plateau
    tau = plateau_middle(plateau)
    decided = next(p for p in points if p.tau >= tau)  # p >= tau zooms: the first curve point at or above tau
    return CalibrationPoint(tau, decided.accuracy, decided.skip_ratio), plateau

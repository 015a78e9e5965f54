"""Stage 3 label rules: which resolution-trajectory samples teach the gate, and what they teach.

A sample answered at increasing token budgets is kept only when its correctness is a step function
(wrong ... wrong, right ... right), because only then "more resolution helps" is a property of the
question and not noise. The gate then learns 1 (zoom) at a budget where the answer is still wrong,
and 0 at a budget where it is already right. Everything here is pure and seeded.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TRAJECTORY = (64, 144, 256, 576, 1024, 2048)
KINDS = ("easy", "transition", "always_wrong", "unstable")


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
    else label 0 at a right budget below the top ``exclude_top``. Easy: label 0 at a budget below the top.
    The top budgets are never used as inputs: they define the reference answer.
    """
    if cls.kind not in ("easy", "transition"):
        return None
    usable_right = list(range(cls.step, max(num_budgets - exclude_top, 0)))
    if cls.kind == "easy":
        return (0, rng.choice(usable_right)) if usable_right else None
    if rng.random() < positive_prob or not usable_right:
        wrong = list(range(max(cls.step - 2, 0), cls.step))
        return 1, rng.choice(wrong)
    return 0, rng.choice(usable_right)


def balance_easy(ids_by_kind: dict[str, list[str]], easy_per_transition: float, seed: int) -> set[str]:
    """Keep every transition and about ``easy_per_transition`` times as many easy samples (seeded draw)."""
    transitions = list(ids_by_kind.get("transition", []))
    easy = sorted(ids_by_kind.get("easy", []))
    if easy_per_transition < 0:
        return set(transitions) | set(easy)
    want = min(len(easy), int(round(easy_per_transition * len(transitions))))
    rng = random.Random(seed)
    return set(transitions) | set(rng.sample(easy, want))


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


def choose_threshold(curve: Sequence[CalibrationPoint], *, max_accuracy_drop: float | None = None,
                     target_skip_ratio: float | None = None) -> CalibrationPoint:
    """The threshold that skips most while staying within ``max_accuracy_drop`` of the curve's best accuracy,
    or the smallest threshold that skips at least ``target_skip_ratio`` of the samples."""
    if (max_accuracy_drop is None) == (target_skip_ratio is None):
        raise ValueError("choose exactly one of max_accuracy_drop and target_skip_ratio")
    points = sorted(curve, key=lambda p: p.tau)
    if target_skip_ratio is not None:
        for point in points:
            if point.skip_ratio >= target_skip_ratio:
                return point
        return points[-1]
    best = max(p.accuracy for p in points)
    ok = [p for p in points if p.accuracy >= best - max_accuracy_drop - 1e-12]
    return max(ok, key=lambda p: (p.skip_ratio, -p.tau))

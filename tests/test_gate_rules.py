"""Pure stage-3 rules: answer matchers, trajectory consistency, gate-example sampling, calibration."""

from __future__ import annotations

import json
import math

import pytest

from qzoom_swift.labels.gate import (
    CalibrationPoint,
    Plateau,
    TrajectoryClass,
    balance_easy,
    calibration_curve,
    choose_gate_example,
    choose_threshold,
    classify_trajectory,
    plateau_middle,
    sample_rng,
)
from qzoom_swift.labels.matchers import (
    anls,
    exact_match,
    get_matcher,
    normalize_answer,
    relaxed_accuracy,
    vqa_soft_accuracy,
)


def test_normalize_and_exact_match():
    assert normalize_answer("  The Red, car! ") == "red car"
    assert exact_match("red car.", ["Red Car", "blue"]) == 1.0
    assert exact_match("red", "blue") == 0.0
    assert exact_match("", "") == 0.0  # an empty answer is never right


def test_vqa_soft_accuracy_counts_annotators():
    gts = ["two", "two", "2", "two", "three"]
    assert vqa_soft_accuracy("two", gts) == 1.0
    assert vqa_soft_accuracy("2", gts) == 1.0  # evalscope's VQA normalisation maps number words to digits
    assert vqa_soft_accuracy("three", gts) == pytest.approx(4 / 15)  # official leave-one-out average: (4 x 1/3 + 0) / 5
    assert vqa_soft_accuracy("four", gts) == 0.0


def test_anls_threshold_and_best_ground_truth():
    assert anls("invoice 1234", "invoice 1234") == 1.0
    assert anls("invoice 1235", ["nothing alike", "invoice 1234"]) == pytest.approx(1 - 1 / 12)
    assert anls("abc", "xyz") == 0.0  # similarity below 0.5 counts as 0
    assert anls("", "abc") == 0.0


def test_relaxed_accuracy_numbers_and_text():
    assert relaxed_accuracy("104", "100") == 1.0
    assert relaxed_accuracy("106", "100") == 0.0
    assert relaxed_accuracy("12%", "0.12") == 1.0
    assert relaxed_accuracy("1,000", "1000") == 0.0  # as evalscope's ChartQA scorer: "1,000" is not a number
    assert relaxed_accuracy("", "") == 0.0  # an empty answer is never right
    assert relaxed_accuracy("Yes", "yes") == 1.0
    assert relaxed_accuracy("0", "0") == 1.0
    with pytest.raises(ValueError, match="judge"):
        get_matcher("bleu")


MATCHER_CASES = [  # (matcher, answer, ground truth(s))
    ("anls", "invoice 1234", ["invoice 1234"]), ("anls", "Invoice  1235", ["nothing", "invoice 1234"]),
    ("anls", "abc", ["xyz"]), ("anls", "total: 12", ["12", "total 12"]), ("anls", "ACME Corp.", ["acme corp"]),
    ("relaxed", "104", ["100"]), ("relaxed", "106", ["100"]), ("relaxed", "12%", ["0.12"]),
    ("relaxed", "Yes", ["yes"]), ("relaxed", "0", ["0"]), ("relaxed", "0.1", ["0"]), ("relaxed", "1,000", ["1000"]),
    ("relaxed", "2019", ["2018", "2019"]), ("relaxed", "red", ["Red"]), ("relaxed", "-3.1", ["-3"]),
    ("vqa", "two", ["two", "two", "2", "two", "three"]), ("vqa", "three", ["two", "two", "2", "two", "three"]),
    ("vqa", "The Red car.", ["red car"] * 10), ("vqa", "1,000", ["1000"] * 2 + ["one thousand"] * 8),
    ("vqa", "yes", ["yes"]), ("vqa", "no", ["yes"] * 10),
]


@pytest.mark.parametrize(("matcher", "answer", "gts"), MATCHER_CASES)
def test_matchers_equal_evalscope_scorers(matcher, answer, gts):
    """The stage 2/3 matchers score as ``qzoom eval`` does: evalscope's own metric on the same strings."""
    from evalscope.benchmarks.chartqa.utils import relaxed_correctness
    from evalscope.benchmarks.vqav2.vqav2_adapter import _vqa_soft_accuracy
    from evalscope.metrics.nlp.metrics import ANLS

    expected = {"anls": lambda: ANLS().apply([answer], [json.dumps(gts)])[0],
                "relaxed": lambda: float(any(relaxed_correctness(answer, g) for g in gts)),
                "vqa": lambda: _vqa_soft_accuracy(answer, gts)}[matcher]()
    assert get_matcher(matcher)(answer, gts) == pytest.approx(expected)
    assert get_matcher(matcher)(answer, gts if len(gts) > 1 else gts[0]) == pytest.approx(expected)  # str truth


@pytest.mark.parametrize(("correct", "expected"), [
    ([True, True, True, True], TrajectoryClass("easy", 0)),
    ([False, False, True, True], TrajectoryClass("transition", 2)),
    ([False, True, True, True], TrajectoryClass("transition", 1)),
    ([False, False, False, False], TrajectoryClass("always_wrong")),
    ([False, True, False, True], TrajectoryClass("unstable")),
    ([True, True, False, True], TrajectoryClass("unstable")),
    ([False, False, False, True], TrajectoryClass("unstable")),  # only the top right: no stable reference
])
def test_classify_trajectory(correct, expected):
    assert classify_trajectory(correct) == expected


def test_classify_with_a_single_stable_top():
    assert classify_trajectory([False, False, False, True], stable_top=1) == TrajectoryClass("transition", 3)


def test_gate_examples_follow_the_released_rules():
    n = 6  # budgets 0..5; top two (4, 5) are never inputs
    transition = TrajectoryClass("transition", 3)
    labels = [choose_gate_example(transition, n, sample_rng(f"s{i}", 0)) for i in range(400)]
    positives = [idx for lab, idx in labels if lab == 1]
    negatives = [idx for lab, idx in labels if lab == 0]
    assert set(positives) == {1, 2}  # the last two wrong budgets, next to the step
    assert set(negatives) == {3}  # right, below the top two
    assert 0.85 < len(positives) / len(labels) < 0.95
    easy = [choose_gate_example(TrajectoryClass("easy", 0), n, sample_rng(f"e{i}", 0)) for i in range(100)]
    assert {lab for lab, _ in easy} == {0} and {idx for _, idx in easy} == {0, 1, 2, 3}
    # a step right below the top: no right budget is usable, so the 10% negative draw gives no example
    # (the released label -100), the rest are positives
    late = TrajectoryClass("transition", 4)
    draws = [choose_gate_example(late, n, sample_rng(f"l{i}", 0)) for i in range(200)]
    assert {d[0] for d in draws if d is not None} == {1} and 0 < draws.count(None) < 40
    assert choose_gate_example(TrajectoryClass("unstable"), n, sample_rng("u", 0)) is None


def test_sample_rng_is_order_independent_and_seeded():
    assert sample_rng("a", 1).random() == sample_rng("a", 1).random()
    assert sample_rng("a", 1).random() != sample_rng("a", 2).random()


def test_balance_easy_keeps_all_transitions():
    ids = {"transition": ["t1", "t2"], "easy": [f"e{i}" for i in range(10)]}
    kept = balance_easy(ids, 1.0, seed=0)
    assert {"t1", "t2"} <= kept and len(kept) == 4
    assert balance_easy(ids, 1.0, seed=0) == kept
    assert len(balance_easy(ids, 2.5, seed=0)) == 2 + 5
    assert len(balance_easy(ids, -1, seed=0)) == 12  # negative: keep everything


def test_calibration_curve_and_threshold_choice():
    probs = [0.9, 0.8, 0.3, 0.1]
    low = [False, False, True, True]  # the two confident samples need the zoom
    zoom = [True, True, True, False]  # zooming hurts the last one
    curve = calibration_curve(probs, low, zoom, taus=[0.0, 0.2, 0.5, 0.85, 1.01])
    assert [(p.tau, p.accuracy, p.skip_ratio) for p in curve] == [
        (0.0, 0.75, 0.0), (0.2, 1.0, 0.25), (0.5, 1.0, 0.5), (0.85, 0.75, 0.75), (1.01, 0.5, 1.0)]
    best, plateau = choose_threshold(curve, max_accuracy_drop=0.0, rule="edge")
    assert best == CalibrationPoint(0.5, 1.0, 0.5) and plateau == Plateau(0.2, 0.5)
    assert choose_threshold(curve, max_accuracy_drop=0.25, rule="edge")[0].tau == 0.85
    assert choose_threshold(curve, target_skip_ratio=0.7, rule="edge")[0].tau == 0.85
    # plateau-middle: the middle of the plateau in logit space, with the decisions made there
    middle, plateau = choose_threshold(curve, max_accuracy_drop=0.0)
    assert plateau == Plateau(0.2, 0.5) and middle.tau == pytest.approx(1 / 3)  # odds 1/4 and 1 -> odds 1/2
    assert (middle.accuracy, middle.skip_ratio) == (1.0, 0.5)
    odds = math.sqrt(0.85 / 0.15)
    middle, plateau = choose_threshold(curve, target_skip_ratio=0.7)
    assert plateau == Plateau(0.5, 0.85) and middle == CalibrationPoint(pytest.approx(odds / (1 + odds)), 0.75, 0.75)
    # a 0.25 drop: the 0.5 point (more accurate, 0.25 less skip) joins the plateau, whose middle decides like 0.85
    middle, plateau = choose_threshold(curve, max_accuracy_drop=0.25)
    odds = math.sqrt(0.25 * 0.85 / 0.15)
    assert plateau == Plateau(0.2, 0.85) and middle == CalibrationPoint(pytest.approx(odds / (1 + odds)), 0.75, 0.75)
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(curve)
    with pytest.raises(ValueError, match="rule='lowest'; choose from plateau-middle, edge"):
        choose_threshold(curve, max_accuracy_drop=0.0, rule="lowest")


def test_plateau_middle_keeps_a_margin_on_separated_gate_probabilities():
    """The toy's shape: coarse questions near 1e-5, fine ones at 0.86-0.88. The edge rule sits on the least
    confident fine question; the middle keeps the held-out decisions and a margin of 4.4 logits to both sides."""
    probs = [1e-5, 2e-5, 1e-3, 0.86, 0.87, 0.88]
    low = [True, True, True, False, False, False]
    zoom = [True] * 6
    curve = calibration_curve(probs, low, zoom)
    edge, plateau = choose_threshold(curve, max_accuracy_drop=0.01, rule="edge")
    middle, same = choose_threshold(curve, max_accuracy_drop=0.01)
    assert edge == CalibrationPoint(0.86, 1.0, 0.5) and plateau == same == Plateau(1e-3, 0.86)
    logit = math.log(1e-3 / (1 - 1e-3)) / 2 + math.log(0.86 / 0.14) / 2  # -2.546
    assert middle.tau == pytest.approx(1 / (1 + math.exp(-logit))) and 0.07 < middle.tau < 0.075
    again = calibration_curve(probs, low, zoom, taus=[middle.tau])[0]
    assert (again.accuracy, again.skip_ratio) == (middle.accuracy, middle.skip_ratio) == (1.0, 0.5)


def test_plateau_reaches_across_an_accuracy_drop_the_edge_rule_spends_on_skipping():
    """The full demo's case: 1% allowed accuracy drop lets the edge rule skip the least confident fine
    questions (tau 0.846 among fine probabilities 0.84-0.88). The plateau (accuracy at least as good, no-RoI
    ratio at most 1% lower) reaches down to the coarse cluster: its middle zooms every fine question again."""
    probs = [1e-6 * (k + 1) for k in range(50)] + [0.840 + 0.0008 * k for k in range(50)]
    low = [True] * 50 + [False] * 50
    curve = calibration_curve(probs, low, [True] * 100)
    edge, plateau = choose_threshold(curve, max_accuracy_drop=0.01, rule="edge")
    assert (edge.tau, edge.accuracy, edge.skip_ratio) == (pytest.approx(0.8408), 0.99, 0.51)
    middle, _ = choose_threshold(curve, max_accuracy_drop=0.01)
    assert plateau == Plateau(pytest.approx(50e-6), pytest.approx(0.8408))  # from the most confident coarse question
    assert (middle.accuracy, middle.skip_ratio) == (1.0, 0.5) and 0.015 < middle.tau < 0.017  # logit -4.1


@pytest.mark.parametrize("plateau, expected", [
    (Plateau(0.0, 0.0), 0.0),  # the chosen point zooms everything: nothing below it
    (Plateau(0.0, 0.3), 0.3),  # no gate probability below: no finite lower edge, the edge is kept
    (Plateau(0.9, 1.0 + 1e-9), 1.0 + 1e-9),  # never zoom: no finite upper edge
    (Plateau(0.25, 0.75), 0.5),  # symmetric in logit space
])
def test_plateau_middle_edges(plateau, expected):
    assert plateau_middle(plateau) == pytest.approx(expected)


def test_overwrite_removes_the_jobs_own_outputs_but_refuses_foreign_files(tmp_path):
    import json

    from qzoom_swift.labels.jobs import JobError, prepare_out_dir

    (tmp_path / "job.json").write_text(json.dumps({"settings": {}}))
    for name in ("shard-00000.jsonl", "summary.json", "gate_train.jsonl"):
        (tmp_path / name).write_text("x\n")
    root, previous = prepare_out_dir(tmp_path, True, {}, (), "gate-label", ("gate_train.jsonl",))
    assert previous is None and list(root.iterdir()) == []
    (tmp_path / "job.json").write_text(json.dumps({"settings": {}}))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="notes.txt"):
        prepare_out_dir(tmp_path, True, {}, (), "gate-label", ("gate_train.jsonl",))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_judge_trajectory_pairs_answers_and_keeps_unknowns():
    from qzoom_swift.labels.gate_job import judge_trajectory
    from qzoom_swift.labels.judge import parse_judgement

    calls = []

    def fake_judge(items):
        calls.extend(items)
        replies = {("x", "y"): "A: No\nB: Yes", ("z", "z"): "I am not sure"}
        return [parse_judgement(replies[(a, b)]) for _q, _r, a, b in items]

    assert judge_trajectory(fake_judge, "Q?", ["ref", "alt"], ["x", "y", "z"]) == [False, True, None]
    assert [c[1] for c in calls] == ["ref / alt", "ref / alt"] and [c[2:] for c in calls] == [("x", "y"), ("z", "z")]

"""Stage-3 scoring ``released`` (the default) against the release's filter, written out here on its own.

``_release_reference`` transcribes ``_normalize_answer``, ``_filter_for_hard_cases`` and
``create_high_res_signal`` (YuHengsss/Q-Zoom ``qwen-vl-finetune/qwenvl/data/data_qwen.py``) independently of
``qzoom_swift.labels.gate``; the tests compare the library's kinds, right/wrong and possible draws with it.
"""

from __future__ import annotations

import random
import string
from collections import Counter

import pytest

from qzoom_swift.config import GateSampling
from qzoom_swift.labels.gate import (
    choose_gate_example,
    gate_training_rows,
    released_score,
    sample_rng,
    trajectory_class,
)

BUDGETS = [64, 144, 256, 576, 1024]


def _release_reference(answers: list[str], text: str) -> tuple[str, list[bool] | None, set]:
    """(kind, right/wrong per budget, every (label, budget index) the release can draw; None = its -100)."""
    norm = [a.lower().strip().translate(str.maketrans("", "", string.punctuation)) for a in answers]
    gt = str(text).lower().strip()
    group = norm[-2:] if len(norm) >= 2 else norm
    target, freq = Counter(group).most_common(1)[0]
    if len(group) >= 2 and freq < 2:
        return "unstable_top", None, set()
    if target not in gt and gt not in target:
        return "hallucinated", None, set()
    right = [(target in a or a in target) for a in norm]
    correct_indices = [i for i, r in enumerate(right) if r]
    wrong_indices = [i for i, r in enumerate(right) if not r]
    if not wrong_indices:
        return "easy", right, {(0, i) for i in correct_indices[:-2]}
    if len(wrong_indices) != wrong_indices[-1] + 1:
        return "unstable", right, set()
    draws = {(1, i) for i in wrong_indices[-2:]}
    draws |= {(0, i) for i in correct_indices[:-2]} if len(correct_indices) > 2 else {None}
    return "transition", right, draws


def _row(answers, gt, i=0):
    return {"qzoom_id": f"{i}-case", "images": ["x.png"], "qzoom_budgets": BUDGETS, "qzoom_answers": answers,
            "qzoom_patch_unit": 28, "messages": [{"role": "user", "content": "<image>What is it?"},
                                                 {"role": "assistant", "content": gt}]}


# (answers at 5 ascending budgets, ground truth, the release's kind) -- the kind is asserted twice: against the
# value written here and against _release_reference.
CASES = [
    (["blue", "blue", "red", "red", "Red."], "red", "transition"),  # "Red." and "red" are identical once normalised
    (["red"] * 5, "red", "easy"),
    (["blue", "blue", "It is red.", "red", "red"], "red", "transition"),  # a sentence holding the consensus: right
    (["blue", "red", "blue", "red", "red"], "red", "unstable"),  # wrong budgets are not a prefix
    (["blue", "blue", "blue", "red", "red"], "red", "transition"),  # no right budget below the top two: -100
    (["blue", "blue", "blue", "green", "green"], "red", "hallucinated"),
    # decimal and comma: punctuation leaves the answers, not the ground truth ("35" vs "3.5", "1000" vs "1,000")
    (["3", "3", "3.5", "3.5", "3.5"], "3.5", "hallucinated"),
    (["100", "100", "1,000", "1,000", "1000"], "1,000", "hallucinated"),
    (["3", "3", "3", "35", "35"], "3.5", "hallucinated"),
    (["2", "2", "7", "7", "7"], "7", "transition"),
    # article: "red car" and "the red car" at the top two are not identical: unstable
    (["blue", "blue", "car", "red car", "the red car"], "red car", "unstable_top"),
    (["blue", "blue", "car", "the red car", "the red car"], "red car", "transition"),  # gt inside the consensus
    # near-identical top answers
    (["red", "red", "red", "red car", "red cars"], "red", "unstable_top"),
    (["red", "red", "red", "red  car", "red car"], "red", "unstable_top"),  # inner spaces are kept
    (["red", "red", "red", " red car ", "red car!"], "red car", "easy"),  # ends stripped, punctuation deleted
    (["st louis", "st louis", "st louis", "St. Louis", "st louis"], "St. Louis", "hallucinated"),
]


@pytest.mark.parametrize(("answers", "gt", "kind"), CASES)
def test_released_scoring_equals_the_release_filter(answers, gt, kind):
    ref_kind, ref_right, ref_draws = _release_reference(answers, gt)
    assert ref_kind == kind  # the table and the transcription agree
    sampling = GateSampling()  # the default: scoring auto -> released for a record that does not say
    cls, correct = trajectory_class(_row(answers, gt), sampling)
    assert cls.kind == kind
    if ref_right is not None:
        assert correct == ref_right
    draws = {choose_gate_example(cls, len(BUDGETS), sample_rng(f"s{i}", 0)) for i in range(300)}
    assert draws == (ref_draws or {None})


def test_released_scoring_matches_the_reference_on_random_trajectories():
    """Several hundred trajectories over answers that differ only in punctuation, articles, spaces and case."""
    vocab = ["red", "Red.", "red car", "the red car", "red  car", "3.5", "35", "3", "1,000", "1000", "car", "blue",
             "It is red.", "St. Louis", "st louis", "A"]
    truths = ["red", "Red car", "3.5", "1,000", "1000", "st. louis", "a", "The red car"]
    rng = random.Random(0)
    kinds = Counter()
    for i in range(600):
        top = rng.choice(vocab)
        answers = [rng.choice(vocab) for _ in range(3)] + [top, top if rng.random() < 0.7 else rng.choice(vocab)]
        gt = rng.choice(truths)
        ref_kind, ref_right, _ = _release_reference(answers, gt)
        cls, correct = trajectory_class(_row(answers, gt, i), GateSampling(scoring="released"))
        assert cls.kind == ref_kind, (answers, gt)
        if ref_right is not None:
            assert correct == ref_right, (answers, gt)
        kinds[ref_kind] += 1
    assert set(kinds) == {"easy", "transition", "unstable", "unstable_top", "hallucinated"}  # every branch ran


def test_released_takes_one_ground_truth_and_consensus_any():
    answers = ["7", "7", "ten", "ten", "ten"]
    row = {**_row(answers, "x"), "messages": [{"role": "user", "content": "<image>How many?"}],
           "answers": ["10", "ten"]}
    assert trajectory_class(row, GateSampling(scoring="released"))[0].kind == "hallucinated"  # only "10" counts
    assert trajectory_class(row, GateSampling(scoring="consensus"))[0].kind == "transition"


def test_lenient_consensus_keeps_what_the_release_drops():
    for answers, gt in [(["2", "2", "3.5", "3.5", "3.5"], "3.5"), (["20", "20", "1,000", "1,000", "1000"], "1,000"),
                        (["blue", "blue", "car", "red car", "the red car"], "red car")]:
        assert trajectory_class(_row(answers, gt), GateSampling(scoring="consensus"))[0].kind == "transition"
        assert trajectory_class(_row(answers, gt), GateSampling())[0].kind != "transition"


def test_empty_answers_never_match_a_listed_difference():
    # the release's substring test counts "" as right everywhere ("easy"); here it is wrong (README row)
    answers = ["", "", "red", "red", "red"]
    assert _release_reference(answers, "red")[0] == "easy"
    assert trajectory_class(_row(answers, "red"), GateSampling())[0].kind == "transition"
    assert released_score(["", "", "", "", ""], "red").drop == "hallucinated"


def test_records_follow_their_own_scoring_and_default_to_released():
    answers, gt = ["blue", "blue", "car", "red car", "the red car"], "red car"
    assert trajectory_class({**_row(answers, gt), "qzoom_scoring": "consensus"}, GateSampling())[0].kind == "transition"
    assert trajectory_class({**_row(answers, gt), "qzoom_scoring": "released"}, GateSampling())[0].kind == "unstable_top"
    assert trajectory_class(_row(answers, gt), GateSampling())[0].kind == "unstable_top"


def test_gate_training_rows_under_released_scoring():
    rows = [_row(a, g, i) for i, (a, g, _k) in enumerate(CASES)]
    train, summary = gate_training_rows(rows, GateSampling(seed=3))
    expected = Counter(k for *_x, k in CASES)
    assert summary["kinds"] == dict(expected)
    for row in train:
        meta = row["qzoom_gate_meta"]
        answers, gt, kind = CASES[int(meta["id"].split("-")[0])]
        assert meta["kind"] == kind in ("easy", "transition")
        assert (row["qzoom_gate"], BUDGETS.index(meta["budget"])) in _release_reference(answers, gt)[2]

"""The demo's settings and report helpers on hand-made values: variants, seeds, the reproducible view."""

from __future__ import annotations

import pytest

from qzoom_swift.bench.evaluate import EvalRun
from qzoom_swift.bench.report import reproducible_view, variant_rows
from qzoom_swift.bench.settings import demo_config


def test_variants_roi_fallback_threshold_rule_and_eval_split_settings():
    cfg = demo_config("quick", ["variants=free_placement, distractors=2,free_placement+distractors=1"])
    assert cfg.variant_specs() == {"free_placement": {"free_placement": True}, "distractors=2": {"distractors": 2},
                                   "free_placement+distractors=1": {"free_placement": True, "distractors": 1}}
    assert demo_config("quick", []).variant_specs() == {}
    defaults = demo_config("full", [])
    assert (defaults.roi_fallback, defaults.threshold_rule, defaults.eval_split) == ("peak", "plateau-middle", "test")
    assert set(defaults.variant_specs()) == {"free_placement", "distractors=2"}  # the report's harder-variant rows
    for bad in ("variants=distractors", "variants=blur=3", "roi_fallback=nearest", "threshold_rule=lowest",
                "eval_split=train"):
        with pytest.raises(SystemExit, match="qzoom demo: --set"):
            demo_config("quick", [bad])


def test_eval_runs_carry_the_fallback_only_where_they_zoom():
    assert EvalRun("b", "never", 16, "peak").overrides() == {"mode": "never", "low_min_tokens": 16,
                                                             "low_max_tokens": 16}
    assert EvalRun("q", "zoom", 16, "peak").overrides()["roi_fallback"] == "peak"
    assert EvalRun("q", "always", 16).overrides()["roi_fallback"] == "none"


def _run(mode: str, acc: float, box: float | None = None) -> dict:
    return {"mode": mode, "accuracy": acc, "accuracy_fine": acc, "accuracy_coarse": 1.0, "zoom_rate_fine": 0.5,
            "zoom_rate_coarse": 0.0, "box": None if box is None else {"contains_target": box}}


def test_variant_rows_one_per_variant_and_run():
    variants = {"distractors=2": {"questions": {"fine": 8, "coarse": 8},
                                  "runs": {"baseline@256": _run("never", 0.75), "qzoom": _run("zoom", 0.5, 0.625)}}}
    rows = variant_rows(variants)
    assert rows[1] == "## Harder variants (same trained models, no retraining)"
    assert rows[-2] == "| distractors=2 | baseline@256 | 8 / 8 | 75.0% | 75.0% | 100.0% | - | - |"
    assert rows[-1] == "| distractors=2 | Q-Zoom (gated) | 8 / 8 | 50.0% | 50.0% | 100.0% | 62.5% | 50.0% / 0.0% |"
    assert variant_rows({}) == []


def test_reproducible_view_drops_timings_and_names_the_run_folders():
    def summary(out: str, cache: str, seconds: float) -> dict:
        return {"report": f"{out}/report.md", "model_dir": f"{cache}/toy/abc/sft/checkpoint-40", "total_s": seconds,
                "command": f"qzoom demo --out {out}", "stages": {"toy_base": {"seconds": seconds, "this_run": "ran",
                                                                              "outputs": {"loss_last": 9.1}}},
                "metrics": {"runs": {"qzoom": {"accuracy": 0.5, "mean_latency_ms": seconds,
                                               "relative_throughput": seconds}}},
                "acceptance": [{"target": "x >= 4x the 16x baseline's throughput", "measured": seconds, "met": False},
                               {"target": "gate", "measured": 0.5, "met": True}]}

    a, b = summary("/tmp/a", "/c1", 1.0), summary("/tmp/b", "/c2", 2.0)
    assert reproducible_view(a) == reproducible_view(b)
    view = reproducible_view(a)
    assert view["command"] == "qzoom demo --out <out>" and view["model_dir"] == "<cache>/toy/abc/sft/checkpoint-40"
    assert view["stages"] == {"toy_base": {"outputs": {"loss_last": 9.1}}}
    assert view["acceptance"][0] == {"target": "x >= 4x the 16x baseline's throughput"}
    b["stages"]["toy_base"]["outputs"]["loss_last"] = 9.2
    assert reproducible_view(a) != reproducible_view(b)

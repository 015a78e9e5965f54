"""The demo's vLLM rows, wiring only (no vLLM here): the setting, the stage list, the comparison and its report.

The rows themselves run in the vLLM environment: ``tests/vllm_wing/test_bench_vllm_rows.py``.
"""

from __future__ import annotations

import pytest

from qzoom_swift.bench import demo
from qzoom_swift.bench.report import reproducible_view, vllm_rows
from qzoom_swift.bench.settings import demo_config
from qzoom_swift.bench.vllm_rows import (
    FLAG_POINTS,
    VLLMRowsSpec,
    compare,
    transformers_name,
    vllm_environment,
    vllm_runs,
)


def test_vllm_rows_are_off_by_default_and_one_more_stage_when_set():
    cfg = demo_config("full", [])
    assert cfg.vllm_bin == "" and cfg.vllm_batch == 1
    assert demo.stages_for(cfg) == demo.STAGES  # a run without vLLM keeps its nine stages and their keys
    on = demo_config("quick", ["vllm_bin=.venv-vllm/bin", "vllm_batch=8"])
    assert [s.name for s in demo.stages_for(on)] == [s.name for s in demo.STAGES] + ["vllm"]
    assert on.vllm_batch == 8
    assert "vllm_bin" not in demo.VLLM_STAGE.settings  # another path to the same environment keeps the answers
    assert set(demo.VLLM_STAGE.deps) >= {"calibrate", "evaluate"}
    with pytest.raises(SystemExit, match="vllm_batch=0"):
        demo_config("quick", ["vllm_batch=0"])


def test_a_vllm_bin_without_python_is_refused_before_any_stage_runs(tmp_path):
    import subprocess
    import sys

    with pytest.raises(FileNotFoundError, match=f"vllm_bin={tmp_path}"):
        vllm_environment(str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "qzoom_swift.cli", "demo", "--preset", "quick", "--out",
                          str(tmp_path / "run"), "--set", f"vllm_bin={tmp_path}"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and f"qzoom demo: vllm_bin={tmp_path}" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run" / "stages").exists()


def test_runs_and_spec():
    runs = vllm_runs(16, 256, "peak", 256)
    assert [r.name for r in runs] == ["qzoom (vLLM)", "baseline@16 (vLLM)", "baseline@256 (vLLM)"]
    assert [transformers_name(r.name) for r in runs] == ["qzoom", "baseline@16", "baseline@256"]
    assert runs[0].overrides()["roi_fallback"] == "peak" and runs[2].overrides()["low_max_tokens"] == 256
    spec = VLLMRowsSpec("m", "c", "b", "o", [r.__dict__ for r in runs], runs[-1].name)
    assert spec.model_len() == 16 + 256 + 256 + 4  # the longest prompt (low + crop) plus text and answer room


def _row(run: str, i: int, correct: bool, answer: str = "5", zoomed: bool = False, latency: float = 0.1) -> dict:
    return {"run": run, "id": f"q{i}", "kind": "fine" if i % 2 == 0 else "coarse", "correct": correct,
            "answer": answer, "zoomed": zoomed, "latency_s": latency}


def test_compare_flags_a_gap_over_one_point_on_the_same_questions():
    n = 100
    transformers = [_row("qzoom", i, i >= 4, zoomed=i % 2 == 0) for i in range(n)] + \
                   [_row("baseline@16", i, i >= 1) for i in range(n + 50)]  # 50 questions the vLLM rows lack
    vllm = [_row("qzoom (vLLM)", i, i >= 5, zoomed=i % 2 == 0, latency=0.05) for i in range(n)] + \
           [_row("baseline@16 (vLLM)", i, i >= 3, answer="x" if i < 2 else "5") for i in range(n)]
    metrics = {"runs": {"qzoom (vLLM)": {"router_share": 0.3}, "baseline@16 (vLLM)": {"router_share": 0.0},
                        "baseline@256 (vLLM)": {}}}
    out = compare(vllm, metrics, transformers)
    q = out["qzoom (vLLM)"]
    assert q["questions"] == n and q["accuracy_transformers"] == 0.96 and q["accuracy_vllm"] == 0.95
    assert q["difference_points"] == pytest.approx(-1.0) and not q["flag"]  # exactly 1 point: within
    assert q["same_decision"] == 1.0 and q["samples_per_s_vllm"] == pytest.approx(20.0)
    b = out["baseline@16 (vLLM)"]
    assert b["questions"] == n and b["difference_points"] == pytest.approx(-2.0) and b["flag"]
    assert b["same_answer"] == 0.98
    assert out["baseline@256 (vLLM)"] == {"transformers_run": "baseline@256", "questions": 0}
    assert FLAG_POINTS == 1.0


def _vllm_summary() -> dict:
    runs = {"qzoom (vLLM)": {"mode": "zoom", "accuracy": 0.95, "accuracy_fine": 0.9, "accuracy_coarse": 1.0,
                             "samples_per_s": 10.0, "router_share": 0.3},
            "baseline@16 (vLLM)": {"mode": "never", "accuracy": 0.55, "accuracy_fine": 0.1, "accuracy_coarse": 1.0,
                                   "samples_per_s": 20.0, "router_share": 0.0}}
    comparison = {"qzoom (vLLM)": {"transformers_run": "qzoom", "questions": 100, "accuracy_vllm": 0.95,
                                   "accuracy_transformers": 0.965, "difference_points": -1.5, "flag": True,
                                   "same_answer": 0.98, "same_decision": 1.0, "samples_per_s_vllm": 10.0,
                                   "samples_per_s_transformers": 12.0, "router_share": 0.3},
                  "baseline@16 (vLLM)": {"transformers_run": "baseline@16", "questions": 100, "accuracy_vllm": 0.55,
                                         "accuracy_transformers": 0.55, "difference_points": 0.0, "flag": False,
                                         "same_answer": 1.0, "same_decision": 1.0, "samples_per_s_vllm": 20.0,
                                         "samples_per_s_transformers": 15.0, "router_share": 0.0}}
    return {"runs": runs, "comparison": comparison, "batch": 1, "versions": {"vllm": "0.32.0", "torch": "2.13.0"},
            "engine_start_s": 70.0, "flag_points": 1.0}


def test_report_section_puts_each_vllm_row_beside_its_transformers_row_and_flags_the_gap():
    lines = vllm_rows(_vllm_summary())
    assert lines[1] == "## On vLLM" and "vLLM 0.32.0" in lines[3]
    q = next(line for line in lines if line.startswith("| qzoom (vLLM)"))
    assert "95.0% (90.0% / 100.0%)" in q and "96.5%" in q and "-1.5 points" in q and "**over 1 point**" in q
    assert "30.0%" in q  # the router's share of Q-Zoom-vLLM time
    b = next(line for line in lines if line.startswith("| baseline@16 (vLLM)"))
    assert b.endswith("| - | - |") and "+0.0 points" in b
    assert vllm_rows(None) == []


def test_reproducible_view_drops_the_vllm_timings():
    summary = {"report": "/tmp/a/report.md", "model_dir": "/c/toy/abc/sft/checkpoint-40", "vllm": _vllm_summary()}
    view = reproducible_view(summary)["vllm"]
    assert "engine_start_s" not in view and "samples_per_s" not in view["runs"]["qzoom (vLLM)"]
    q = view["comparison"]["qzoom (vLLM)"]
    assert "samples_per_s_vllm" not in q and "router_share" not in q and q["accuracy_vllm"] == 0.95


def test_answers_written_under_other_settings_are_dropped_before_resuming(tmp_path):
    from dataclasses import replace

    from qzoom_swift.bench.vllm_rows import ANSWERS_FILE, _claim

    runs = [r.__dict__ for r in vllm_runs(16, 256, "peak", 256)]
    spec = VLLMRowsSpec("m", "c", "b", str(tmp_path), runs, "baseline@256 (vLLM)", limit=10)
    answers = tmp_path / ANSWERS_FILE
    answers.write_text('{"run": "qzoom (vLLM)", "id": "x"}\n')
    _claim(spec)  # answers of unknown settings (no spec.json beside them)
    assert not answers.exists()
    answers.write_text("kept\n")
    _claim(replace(spec, limit=None, kv_cache_space_gb=2))  # more questions, another cache size: same answers
    assert answers.read_text() == "kept\n"
    _claim(replace(spec, batch_size=8))
    assert not answers.exists()

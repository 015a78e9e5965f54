"""`qzoom demo` (the README's main command) end to end, reduced: 4 records, 4 training steps per swift sft.

One run as a subprocess (as `make demo` runs it; ms-swift runs in-process there and must not leak into the
test process), then the same command again, which must skip every stage. Checks the report and summary,
each stage's artefact (pseudo-label shard, stage-1 checkpoint, gate checkpoint continued from it with a
calibrated tau_gate, zoom stats) and the value ranges of the zoom comparison.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STAGES = ["model", "data", "pseudo_labels", "rpn_train", "gate_labels", "gate_train", "calibrate", "zoom"]
MODES = ["never", "always", "zoom"]
RECORDS, STEPS = 4, 4


def _demo(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "qzoom_swift.cli", "demo", "--out", str(out), "--records", str(RECORDS),
           "--steps", str(STEPS)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=900)
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    first, seconds = _demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return out, first, summary


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_demo_prints_a_line_per_stage_and_writes_report_and_summary(demo):
    out, run, summary = demo
    lines = run.stdout.splitlines()
    assert "random weights" in lines[1] and "accuracy is meaningless" in lines[1]
    for i, name in enumerate(STAGES, 1):
        assert sum(line.startswith(f"[{i}/{len(STAGES)}] ") for line in lines) == 1, name
    assert lines[-1].startswith("total ") and "report.md" in lines[-1]
    assert list(summary["stages"]) == STAGES
    assert summary["stages_ran"] + summary["stages_cached"] == len(STAGES) and summary["stages_ran"] >= 7
    assert summary["settings"]["records"] == RECORDS and summary["settings"]["steps"] == STEPS
    assert summary["family"] == "qwen2_5_vl" and summary["sft"] == "in-process"
    for st in summary["stages"].values():
        assert st["status"] == "ran" and st["seconds"] >= 0 and st["line"]
        assert all(Path(p).exists() for p in st["artefacts"])
        assert (out / "stages" / f"{st['name']}.json").is_file()
    assert 0 < sum(st["seconds"] for st in summary["stages"].values()) <= summary["total_s"]

    report = (out / "report.md").read_text()
    assert "random" in report and "plumbing" in report and "accuracy is meaningless" in report
    assert "## Stages" in report and "## Zoom modes" in report
    stage_rows = [line for line in report.splitlines() if line.startswith("| ") and (
        " | ran | " in line or " | cached | " in line)]
    assert len(stage_rows) == len(STAGES)
    assert all(" | ran | " in line for line in stage_rows[1:])  # only the model dir may come from the cache
    mode_rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")
                 and line.split(" | ")[0][2:] in MODES}
    assert set(mode_rows) == set(MODES) and "1.00x" in mode_rows["never"]
    assert "synthetic" in report and "always_wrong" in report


def test_stage1_labels_and_rpn_checkpoint(demo):
    _, _, summary = demo
    labels = summary["stages"]["pseudo_labels"]["outputs"]
    rows = _rows(Path(labels["shards"][0]))
    assert len(rows) == RECORDS and labels["outcomes"]["labelled"] == RECORDS  # raised thresholds: all labelled
    assert all(r["qzoom_status"] == "ok" and any(1 in row for row in r["qzoom_rpn_labels"]) for r in rows)

    rpn = summary["stages"]["rpn_train"]["outputs"]
    ckpt = Path(rpn["checkpoint"])
    assert ckpt.name == f"checkpoint-{STEPS}" and (ckpt / "qzoom_branch.safetensors").is_file()
    assert rpn["trained_branches"] == ["rpn"] and len(rpn["losses"]) == STEPS
    assert rpn["loss_last"] < rpn["loss_first"]
    assert json.loads((ckpt / "qzoom_config.json").read_text())["extra"]["trained_branches"] == ["rpn"]


def test_stage3_gate_checkpoint_continues_stage1_and_is_calibrated(demo):
    _, _, summary = demo
    gate_labels = summary["stages"]["gate_labels"]["outputs"]
    assert gate_labels["answered"] == RECORDS and gate_labels["kinds"] == {"always_wrong": RECORDS}
    assert gate_labels["kept"] == 0  # random weights: no consistency label survives
    assert any("synthetic" in note for note in summary["stages"]["gate_train"]["notes"])

    gate = summary["stages"]["gate_train"]["outputs"]
    ckpt = Path(gate["checkpoint"])
    stage1 = Path(summary["stages"]["rpn_train"]["outputs"]["checkpoint"])
    assert gate["adapters"] == str(stage1) and gate["trained_branches"] == ["rpn", "gate"]
    assert len(gate["losses"]) == STEPS
    trained, before = load_file(str(ckpt / "qzoom_branch.safetensors")), load_file(
        str(stage1 / "qzoom_branch.safetensors"))
    assert trained.keys() == before.keys()
    rpn_keys = [k for k in trained if k.startswith("rpn.")]
    gate_keys = [k for k in trained if k.startswith("gate.")]
    assert rpn_keys and gate_keys
    assert all(torch.equal(trained[k], before[k]) for k in rpn_keys)  # the stage-1 RPN, carried over
    assert any(not torch.equal(trained[k], before[k]) for k in gate_keys)  # the gate trained

    cal = summary["stages"]["calibrate"]["outputs"]
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert cal["checkpoint"] == str(ckpt) and config["tau_gate"] == pytest.approx(cal["tau_gate"])
    assert 0.0 <= cal["tau_gate"] <= 1.0 and cal["samples"] == RECORDS
    assert config["extra"]["gate_calibration"]["samples"] == RECORDS and cal["skip_ratio"] >= 0.5
    assert (ckpt / "gate_calibration.json").is_file() and Path(cal["curve_png"]).is_file()


def test_zoom_modes_values(demo):
    _, _, summary = demo
    zoom = summary["stages"]["zoom"]["outputs"]
    assert zoom["checkpoint"] == summary["stages"]["calibrate"]["outputs"]["checkpoint"]
    assert zoom["tau_gate"] == pytest.approx(summary["stages"]["calibrate"]["outputs"]["tau_gate"])
    stats = json.loads(Path(zoom["stats"]).read_text())
    modes = summary["zoom"]
    assert list(modes) == MODES and stats["modes"] == modes
    for mode, m in modes.items():
        per = stats["per_sample"][mode]
        assert len(per) == m["samples"] == RECORDS
        assert 0.0 <= m["zoom_rate"] <= 1.0
        assert m["zoom_rate"] == pytest.approx(sum(s["zoomed"] for s in per) / RECORDS)
        assert m["mean_visual_tokens"] > 0 and m["mean_latency_s"] > 0 and m["relative_throughput"] > 0
        assert m["mean_visual_tokens"] == pytest.approx(m["mean_visual_tokens_low"] + m["mean_visual_tokens_roi"])
        assert sum(m["reasons"].values()) == RECORDS
    never, always = modes["never"], modes["always"]
    assert never["zoom_rate"] == 0.0 and never["mean_visual_tokens_roi"] == 0 and never["reasons"] == {
        "never": RECORDS}
    assert never["relative_throughput"] == 1.0
    assert always["mean_visual_tokens_low"] == never["mean_visual_tokens_low"]  # same low-resolution pass
    assert always["mean_visual_tokens"] >= never["mean_visual_tokens"]
    assert set(always["reasons"]) <= {"forced", "no_roi"}
    assert always["zoom_rate"] == always["reasons"].get("forced", 0) / RECORDS
    assert set(modes["zoom"]["reasons"]) <= {"gate", "below_gate", "no_roi"}
    gate = modes["zoom"]["gate_prob_range"]
    assert gate is not None and 0.0 <= gate[0] <= gate[1] <= 1.0


def test_rerun_skips_every_finished_stage(demo):
    out, _, first = demo
    again, seconds = _demo(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = [line for line in again.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(STAGES) and all("(cached)" in line for line in lines), lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages_cached"] == len(STAGES) and summary["stages_ran"] == 0
    assert summary["zoom"] == first["zoom"]  # taken from the cache, not recomputed
    assert seconds < 120

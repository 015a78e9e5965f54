"""`qzoom demo --preset quick` (the README's main command, reduced) end to end, as a subprocess.

Every stage runs on a handful of bench samples with a few training steps: the bench, the toy base (vision
warm-up + swift sft), stage-1 pseudo labels + RPN swift sft, stage-3 gate labels + gate swift sft +
calibration, and the evaluation of baselines and Q-Zoom. The checks are on structure and value ranges, not on
the accuracy targets (those need the full preset). Then: a rerun skips every stage, and an evaluation killed
halfway (a torn last line included) resumes without duplicates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # runs the swift CLI or the demo: not in the quick loop (-m "not slow")

STAGES = ["bench", "toy_base", "pseudo_labels", "rpn_train", "gate_labels", "gate_train", "calibrate", "evaluate",
          "variants"]
RUNS = ["baseline@16", "baseline@64", "baseline@256", "qzoom", "always"]


def _demo(out: Path, *extra: str, **env_extra: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "qzoom_swift.cli", "demo", "--preset", "quick", "--out", str(out), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **env_extra)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=1200, env=env)
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    first, _ = _demo(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, first, json.loads((out / "summary.json").read_text())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_demo_prints_progress_and_writes_report_summary_and_figures(demo):
    out, run, summary = demo
    lines = run.stdout.splitlines()
    for i, name in enumerate(STAGES, 1):
        stage_lines = [line for line in lines if line.startswith(f"[{i}/{len(STAGES)}] ")]
        assert len(stage_lines) in (1, 2), name  # "running... (progress: tail -f LOG)" then the result
        assert "(cached)" in stage_lines[-1] or "running..." in stage_lines[0]
    assert lines[-1].startswith("total ") and "report.md" in lines[-1]
    assert any(line.startswith("acceptance targets met: ") for line in lines)
    assert list(summary["stages"]) == STAGES and summary["preset"] == "quick"
    assert summary["stages_ran"] + summary["stages_cached"] == len(STAGES)
    for st in summary["stages"].values():
        assert st["seconds"] >= 0 and st["line"] and all(Path(p).exists() for p in st["artefacts"])
        assert (out / "stages" / f"{st['name']}.json").is_file() and Path(st["log"]).is_file()
    for name in ("pareto", "overlays", "gate_calibration"):
        png = Path(summary["figures"][name])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    report = (out / "report.md").read_text()
    for heading in ("## Results on the test split", "## Localisation and routing", "## Acceptance", "## Stages"):
        assert heading in report
    assert "Reduced preset" in report
    assert f"evalscope {summary['versions']['evalscope']}" in report and "seed 0 (bench splits: train 1" in report
    acceptance_rows = [line for line in report.splitlines() if line.endswith(" | yes |") or line.endswith(" | NO |")]
    assert len(acceptance_rows) == len(summary["acceptance"]) == 9
    assert sum(a["met"] for a in summary["acceptance"]) == sum(line.endswith("yes |") for line in acceptance_rows)
    # the default numerics=portable reached torch: 2 threads and AVX2 kernels whatever the CPU (and the report says so)
    assert (summary["metrics"]["threads"], summary["metrics"]["cpu_kernels"]) == (2, "AVX2")
    assert "CPU threads 2, kernels AVX2 (numerics=portable)" in report


def test_bench_and_toy_base(demo):
    _, _, summary = demo
    bench = summary["bench"]
    assert bench["sizes"] == {"train": 40, "val": 12, "test": 16}
    assert bench["questions"]["test"] == {"fine": 8, "coarse": 8}
    toy = summary["stages"]["toy_base"]["outputs"]
    model_dir = Path(toy["model_dir"])
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "processor_config.json").is_file()
    assert toy["steps"] == 40 and toy["params_without_embedding"] < 3e6 and 0 <= toy["warmup_accuracy"] <= 1
    config = json.loads((model_dir / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 4 and config["text_config"]["hidden_size"] == 128


def test_stage1_rows_pool_labels_at_the_low_budget_and_train_only_the_rpn(demo):
    out, _, summary = demo
    labels = summary["stages"]["pseudo_labels"]["outputs"]
    assert labels["label_tokens"] == 256
    shard = [r for s in labels["shards"] for r in _rows(Path(s))]
    assert len(shard) == 20 and all(r["qzoom_attn_grid"] == [16, 16] for r in shard)  # the high-budget pass
    rows = _rows(out / "stage1" / "rpn_train.jsonl")
    assert len(rows) == len(shard)
    assert all(r["chat_template_kwargs"] == {"min_pixels": 16 * 784, "max_pixels": 16 * 784} for r in rows)
    rpn = summary["stages"]["rpn_train"]["outputs"]
    ckpt = Path(rpn["checkpoint"])
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert rpn["trained_branches"] == ["rpn"] and (rpn["branch_layer"], rpn["branch_depth"]) == (2, 2)
    assert (config["low_min_tokens"], config["low_max_tokens"], config["roi_min_tokens"], config["roi_max_tokens"]) \
        == (16, 16, 16, 64)
    assert config["blur_kernel"] == 1 and config["tau_roi"] == 0.2


def test_stage3_gate_continues_stage1_and_is_calibrated(demo):
    _, _, summary = demo
    gl = summary["stages"]["gate_labels"]["outputs"]
    assert gl["budgets"] == [16, 64, 256] and gl["answered"] == 20 and gl["heldout_answered"] == 12
    assert sum(gl["kinds"].values()) == 20
    gate = summary["stages"]["gate_train"]["outputs"]
    if gl["kept"] == 0:  # an undertrained toy keeps no consistency label: the ground-truth fallback, said so
        assert gate["labels"] == "bench ground truth (fallback)" and summary["stages"]["gate_train"]["notes"]
    ckpt, stage1 = Path(gate["checkpoint"]), Path(summary["stages"]["rpn_train"]["outputs"]["checkpoint"])
    assert gate["adapters"] == str(stage1) and gate["trained_branches"] == ["rpn", "gate"]
    trained, before = load_file(str(ckpt / "qzoom_branch.safetensors")), load_file(str(stage1 / "qzoom_branch.safetensors"))
    assert all(torch.equal(trained[k], before[k]) for k in trained if k.startswith("rpn."))
    assert any(not torch.equal(trained[k], before[k]) for k in trained if k.startswith("gate."))
    cal = summary["stages"]["calibrate"]["outputs"]
    assert json.loads((ckpt / "qzoom_config.json").read_text())["tau_gate"] == pytest.approx(cal["tau_gate"])
    assert cal["samples"] == 12 and 0 <= cal["skip_ratio"] <= 1
    low, high = cal["plateau"]
    assert cal["rule"] == "plateau-middle" and low <= cal["tau_gate"] <= high
    assert summary["calibration"] == {"rule": cal["rule"], "plateau": cal["plateau"], "tau_gate": cal["tau_gate"]}
    stored = json.loads((ckpt / "gate_calibration.json").read_text())
    assert stored["rule"] == "plateau-middle" and stored["plateau"] == {"low": low, "high": high}


def test_evaluation_values(demo):
    out, _, summary = demo
    m = summary["metrics"]
    assert list(m["runs"]) == RUNS and m["reference"] == "baseline@256"
    answers = _rows(out / "evaluate" / "answers.jsonl")
    assert len(answers) == 16 * len(RUNS) and len({(a["run"], a["id"]) for a in answers}) == len(answers)
    for name, r in m["runs"].items():
        mine = [a for a in answers if a["run"] == name]
        assert r["samples"] == 16 and r["accuracy"] == pytest.approx(sum(a["correct"] for a in mine) / 16)
        for key in ("accuracy", "accuracy_fine", "accuracy_coarse", "zoom_rate"):
            assert 0.0 <= r[key] <= 1.0
        assert r["relative_throughput"] > 0 and r["mean_latency_ms"] > 0
        assert sum(r["reasons"].values()) == 16
        if r["mode"] == "never":
            assert r["mean_visual_tokens"] == r["tokens"] and r["zoom_rate"] == 0
    assert m["runs"]["baseline@256"]["relative_throughput"] == 1.0
    always = m["runs"]["always"]
    assert set(always["reasons"]) <= {"forced", "no_roi"} and always["mean_visual_tokens"] >= 16
    assert set(m["runs"]["qzoom"]["reasons"]) <= {"gate", "below_gate", "no_roi"}
    roi_max = summary["demo_config"]["roi_max_tokens"]
    assert summary["config"]["roi_max_tokens"] == roi_max == 256  # the Q-Zoom runs' setting, not the checkpoint's 64
    assert summary["config"]["roi_fallback"] == summary["demo_config"]["roi_fallback"] == "peak"
    for a in answers:
        if a["zoomed"]:
            assert 16 <= a["visual_tokens_roi"] <= roi_max and a["box"] is not None
    assert set(m["pseudo_labels"]) <= {"fine", "coarse"}


def test_rerun_skips_every_stage_and_a_killed_evaluation_resumes(demo):
    out, _, first = demo
    again, seconds = _demo(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    lines = [line for line in again.stdout.splitlines() if line.startswith("[") and "running..." not in line]
    assert len(lines) == len(STAGES) and all("(cached)" in line for line in lines), lines
    assert json.loads((out / "summary.json").read_text())["metrics"]["runs"] == first["metrics"]["runs"]

    answers = out / "evaluate" / "answers.jsonl"
    kept = answers.read_text().splitlines()[:30]
    answers.write_text("\n".join(kept) + "\n" + '{"run": "qzoom", "id": "te')  # killed mid-line
    (out / "stages" / "evaluate.json").unlink()  # the stage never finished
    resumed, _ = _demo(out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = _rows(answers)
    assert len(rows) == 16 * len(RUNS) and len({(r["run"], r["id"]) for r in rows}) == len(rows)
    assert [json.dumps(r) for r in rows[:30]] == [json.dumps(json.loads(line)) for line in kept]


def test_two_runs_on_one_machine_write_the_same_summary(demo, tmp_path):
    """Reproducible: a second run (own output folder, own toy cache, so the toy base is trained again) writes the
    same summary.json as the first, compared without timings, throughput and paths (``reproducible_view``, whose
    ``VOLATILE_KEYS`` say why each is left out)."""
    from qzoom_swift.bench.report import reproducible_view

    _, _, first = demo
    res, _ = _demo(tmp_path / "run", QZOOM_CACHE=str(tmp_path / "cache"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    second = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert second["stages"]["toy_base"]["this_run"] == "ran"  # trained again, not read from the first run's cache
    a, b = reproducible_view(first), reproducible_view(second)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


def test_the_bench_test_split_runs_through_qzoom_eval_with_the_demo_answers(demo, tmp_path):
    """The same data flows through evalscope: `qzoom eval --benchmarks qzoom_bench` on the demo's model gives,
    per question, the answer the demo's own evaluation recorded for the same run."""
    out, _, summary = demo
    data_root = Path(summary["evalscope_data_root"])
    assert (data_root / "qzoom_bench" / "data" / "test-00000-of-00001.parquet").is_file()
    cmd = [sys.executable, "-m", "qzoom_swift.cli", "eval", "--model", summary["model_dir"], "--checkpoint",
           summary["checkpoint"], "--data-root", str(data_root), "--benchmarks", "qzoom_bench",
           "--run", "baseline:256", "--limit", "6", "--max-new-tokens", "4", "--device", "cpu",
           "--out", str(tmp_path / "eval")]
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf"))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted((tmp_path / "eval" / "runs" / "baseline@256" / "evalscope").glob("*/predictions/*/*.jsonl"))
    preds = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(preds) == 6
    demo_answers = {a["id"]: a for a in _rows(out / "evaluate" / "answers.jsonl") if a["run"] == "baseline@256"}
    for p in preds:
        qid = p["metadata"]["question_id"]
        assert qid in demo_answers and p["metadata"]["kind"] == demo_answers[qid]["kind"]
        assert p["model_output"]["metadata"]["qzoom"]["visual_tokens"] == 256
        content = p["model_output"]["choices"][0]["message"]["content"]
        text = content if isinstance(content, str) else "".join(c.get("text", "") for c in content)
        assert text.strip() == demo_answers[qid]["answer"].strip()
    table = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert table["benchmarks"] == ["qzoom_bench"]


def test_a_larger_canvas_reuses_another_presets_toy_base_behind_a_raised_image_cap(demo, tmp_path):
    """The hires preset's path, at quick sizes: 672 px scenes (6x6 tokens at the low budget, 24x24 at native
    scale) answered by the quick preset's toy base (trained on 448 px scenes, found in the cache the module's run
    filled), whose processor cap is raised to the 576-token baseline in a copy that shares the weight files."""
    _, _, first = demo
    out = tmp_path / "run"
    res, _ = _demo(out, "--set", "canvas=672", "--set", "toy_preset=quick", "--set", "low_tokens=36",
                   "--set", "high_tokens=576", "--set", "gate_budgets=36,144,576")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"]["spec"]["canvas"] == 672 and summary["bench"]["spec"]["shape_size"] == [165, 285]
    toy = summary["stages"]["toy_base"]
    trained = Path(first["stages"]["toy_base"]["outputs"]["model_dir"])
    assert toy["this_run"] == "cached" and toy["outputs"]["trained_model_dir"] == str(trained)  # not retrained
    assert toy["outputs"]["trained_on"] == 448 and toy["outputs"]["toy_preset"] == "quick"
    served = Path(summary["model_dir"])
    assert served == trained.parent / f"{trained.name}-max576"
    cap = json.loads((served / "processor_config.json").read_text())["image_processor"]["size"]["longest_edge"]
    assert cap == 576 * 784 and (served / "model.safetensors").stat().st_ino == (trained / "model.safetensors").stat().st_ino
    labels = summary["stages"]["pseudo_labels"]["outputs"]
    assert labels["label_tokens"] == 576
    assert all(r["qzoom_attn_grid"] == [24, 24] for s in labels["shards"] for r in _rows(Path(s)))
    ckpt = json.loads((Path(summary["stages"]["rpn_train"]["outputs"]["checkpoint"]) / "qzoom_config.json").read_text())
    assert (ckpt["low_min_tokens"], ckpt["low_max_tokens"]) == (36, 36)
    runs = summary["metrics"]["runs"]
    assert list(runs) == ["baseline@36", "baseline@144", "baseline@576", "qzoom", "always"]
    assert [runs[f"baseline@{t}"]["mean_visual_tokens"] for t in (36, 144, 576)] == [36, 144, 576]
    for a in _rows(out / "evaluate" / "answers.jsonl"):
        if a["run"] in ("qzoom", "always"):
            assert a["visual_tokens_low"] == 36 and (a["grid"] is None or a["grid"] == [6, 6])
    ceiling = summary["ceiling"]
    assert ceiling["end_to_end"] == runs["baseline@36"]["relative_throughput"]
    assert ceiling["qzoom_fraction"] == pytest.approx(runs["qzoom"]["relative_throughput"] / ceiling["end_to_end"])
    assert "Attainable ceiling: the base model at the low budget alone" in (out / "report.md").read_text()


def test_set_overrides_are_typed_and_unknown_keys_are_refused():
    from qzoom_swift.bench.settings import PRESETS, demo_config

    cfg = demo_config("full", ["toy_steps=1500", "free_placement=true", "tau_roi=0.1", "gate_budgets=16,256"])
    assert (cfg.toy_steps, cfg.free_placement, cfg.tau_roi, cfg.budgets) == (1500, True, 0.1, (16, 256))
    assert cfg.train_images == PRESETS["full"].train_images
    with pytest.raises(SystemExit, match="KEY one of seed, numerics, canvas, toy_preset, free_placement"):
        demo_config("full", ["toy_step=3"])
    with pytest.raises(SystemExit, match="expected true or false"):
        demo_config("quick", ["free_placement=maybe"])
    with pytest.raises(SystemExit, match="invalid literal"):
        demo_config("quick", ["toy_steps=many"])

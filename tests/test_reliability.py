"""Issue #21: no poison record, no silent fallback, no half-loaded model, validated settings, errors that name
the input, no orphan processes. One test (or more) per defect of the fault campaign, numbered as in the issue.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from qzoom_swift.checkpoint import BranchCheckpointError
from qzoom_swift.config import CONFIG_NAME, QZoomConfig
from qzoom_swift.testing.serving import chat_status, start_swift_deploy, stop_process_tree, wait_for_models


@pytest.fixture(scope="module")
def qz(tiny_dir):
    """One Q-Zoom model on the tiny Qwen2.5-VL, small budgets (fast on CPU)."""
    from qzoom_swift import QZoomModel

    return QZoomModel.from_pretrained(tiny_dir("qwen2_5_vl"), config_overrides={
        "low_min_tokens": 16, "low_max_tokens": 64, "roi_min_tokens": 16, "roi_max_tokens": 64})


def _image(colour=(200, 40, 40), size=(224, 168)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"tensors changed by a failed load: {changed[:5]}"


@pytest.fixture()
def checkpoint(qz, tmp_path):
    """A saved checkpoint of ``qz``'s branches, whose own weights differ from a fresh copy-init."""
    from qzoom_swift.branches import get_branches

    with torch.no_grad():
        for p in get_branches(qz.model).parameters():
            p.add_(0.01)
    qz.save_branches(tmp_path / "ckpt")
    return tmp_path / "ckpt"


# ------------------------------------------------------------------- 3: a failed load leaves the model as it was


def test_3_failed_load_of_wrong_depth_leaves_model_unchanged(qz, checkpoint):
    cfg = json.loads((checkpoint / CONFIG_NAME).read_text())
    cfg["branch_depth"] = cfg["branch_depth"] + 1  # the file holds R layers, the config now says R+1
    (checkpoint / CONFIG_NAME).write_text(json.dumps(cfg))
    before = _model_state(qz.model)
    config_before = qz.config
    with pytest.raises(BranchCheckpointError, match="branch_depth|incomplete|no place"):
        qz.load_branches(checkpoint)
    _assert_same_state(qz.model, before)
    assert qz.config is config_before


def test_3_wrong_tensor_shape_leaves_model_unchanged(qz, checkpoint):
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "qzoom_branch.safetensors"
    tensors = load_file(str(weights))
    tensors["rpn.head.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(weights))
    before = _model_state(qz.model)
    with pytest.raises(BranchCheckpointError, match=r"'rpn.head.q_proj.weight' has shape \(3, 3\)"):
        qz.load_branches(checkpoint)
    _assert_same_state(qz.model, before)


# ------------------------------------------------------------------------ 4: generate checks the batch shape


def test_4_generate_refuses_images_and_questions_of_different_lengths(qz):
    with pytest.raises(ValueError, match="1 image entries for 2 questions"):
        qz.generate([[_image()]], ["Colour?", "Shape?"], max_new_tokens=1)


def test_4_generate_accepts_paths_and_pil_per_sample(qz, tmp_path):
    img = _image()
    path = tmp_path / "a.png"
    img.save(path)
    by_pil = qz.generate([[img], [img]], ["Colour?", "Colour?"], max_new_tokens=2)
    by_path = qz.generate([str(path), path], ["Colour?", "Colour?"], max_new_tokens=2)
    assert [a.text for a in by_path] == [a.text for a in by_pil]
    assert qz.generate(str(path), "Colour?", max_new_tokens=2)[0].text == by_pil[0].text


# ------------------------------------------------------------------------------------------------ 8: NaN


def test_8_non_finite_branch_tensor_is_refused_with_its_name(qz, checkpoint):
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "qzoom_branch.safetensors"
    tensors = load_file(str(weights))
    tensors["gate.head.weight"][0, 3] = float("nan")
    save_file(tensors, str(weights))
    before = _model_state(qz.model)
    with pytest.raises(BranchCheckpointError, match=r"'gate.head.weight' holds 1 non-finite"):
        qz.load_branches(checkpoint)
    _assert_same_state(qz.model, before)


def test_8_nan_gate_probability_is_its_own_reason_and_answers_low_res(qz, caplog):
    from qzoom_swift.branches import get_branches
    from qzoom_swift.zoom import zoom_decisions

    assert zoom_decisions([float("nan"), None], "zoom", 0.1) == [(False, "gate_nan"), (False, "no_image")]
    head = get_branches(qz.model).gate.head
    saved = head.bias.detach().clone()
    try:
        with torch.no_grad():
            head.bias.fill_(float("nan"))
        with caplog.at_level(logging.WARNING, logger="qzoom_swift.zoom"):
            answer = qz.generate([_image()], "Colour?", max_new_tokens=2, config_overrides={"tau_gate": 0.0})[0]
        low = qz.generate([_image()], "Colour?", max_new_tokens=2, config_overrides={"mode": "never"})[0]
    finally:
        with torch.no_grad():
            head.bias.copy_(saved)
    assert answer.stats.reason == "gate_nan" and not answer.stats.zoomed and math.isnan(answer.stats.gate_prob)
    assert answer.text == low.text
    assert "non-finite gate probability" in caplog.text


# --------------------------------------------------------------------------- 9: settings checked when set


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tau_gate", float("nan"), r"QZoomConfig.tau_gate=nan: expected a finite number >= 0"),
    ("tau_gate", "0.5", r"QZoomConfig.tau_gate='0.5': expected a finite number"),
    ("tau_roi", None, r"QZoomConfig.tau_roi=None: expected a finite number in \[0, 1\]"),
    ("blur_kernel", 4, r"QZoomConfig.blur_kernel=4: expected an odd integer >= 1"),
    ("min_box_side", 0, r"QZoomConfig.min_box_side=0: expected an integer >= 1"),
    ("blur_sigma", -1.0, r"QZoomConfig.blur_sigma=-1.0: expected a finite number > 0"),
    ("roi_max_tokens", 0, r"QZoomConfig.roi_max_tokens=0: expected an integer >= 1"),
    ("branch_layer", 0, r"QZoomConfig.branch_layer=0: expected an integer >= 1"),
    ("low_max_tokens", 64, r"low_min_tokens=256 > low_max_tokens=64"),
])
def test_9_config_fields_are_validated_on_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        QZoomConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        QZoomConfig().with_overrides({field: value})


def test_9_config_file_with_null_threshold_names_file_and_field(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**QZoomConfig().to_dict(), "tau_roi": None}))
    with pytest.raises(ValueError, match=rf"{tmp_path / CONFIG_NAME}: QZoomConfig.tau_roi=None"):
        QZoomConfig.load(tmp_path)


def test_9_edited_branch_layer_is_refused_at_load(qz, checkpoint):
    cfg = json.loads((checkpoint / CONFIG_NAME).read_text())
    cfg["branch_layer"] = cfg["branch_layer"] - 1  # same shapes (copies of other layers): only the metadata tells
    (checkpoint / CONFIG_NAME).write_text(json.dumps(cfg))
    before = _model_state(qz.model)
    with pytest.raises(BranchCheckpointError, match=r"says branch_layer=\d+ but .* saved with branch_layer=\d+"):
        qz.load_branches(checkpoint)
    _assert_same_state(qz.model, before)


# -------------------------------------------------------------------------- 10: errors name the user's file


def test_10_corrupt_safetensors_names_the_file(qz, checkpoint):
    weights = checkpoint / "qzoom_branch.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(BranchCheckpointError, match=f"cannot read {weights}"):
        qz.load_branches(checkpoint)


def test_10_invalid_config_json_names_the_file(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{\"tau_gate\": 0.1,")
    with pytest.raises(ValueError, match=rf"{tmp_path / CONFIG_NAME}: not a valid Q-Zoom config json"):
        QZoomConfig.load(tmp_path)


def test_10_api_image_errors_name_sample_and_file(qz, tmp_path):
    good = tmp_path / "good.png"
    _image().save(good)
    truncated = tmp_path / "cut.jpg"
    _image(size=(320, 240)).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"sample 1 image 0: cannot read image {truncated}"):
        qz.generate([good, truncated], ["Colour?", "Colour?"], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"sample 0 image 0: cannot read image .*missing.png"):
        qz.generate([tmp_path / "missing.png"], ["Colour?"], max_new_tokens=1)
    with pytest.raises(TypeError, match="sample 0 image 0: expected a PIL image or an image path, got int"):
        qz.generate([3], ["Colour?"], max_new_tokens=1)
    thin = tmp_path / "thin.png"
    _image(size=(3, 900)).save(thin)
    with pytest.raises(ValueError, match=rf"sample 0 image 0 {thin}: input image of 3x900") as info:
        qz.generate([thin], ["Colour?"], max_new_tokens=1)
    assert "crop of" not in str(info.value)


# ------------------------------------------------------------------------------- 1: no poison record in a job


def _shape_rows(root, n: int, seed: int = 3) -> list[dict]:
    from qzoom_swift.synthetic.images import write_shape_dataset

    data = write_shape_dataset(root, n=n, seed=seed)
    return [json.loads(line) for line in data.read_text().splitlines() if line.strip()]


def _with_question(row: dict, question: str) -> dict:
    return {**row, "messages": [{"role": "user", "content": f"<image>{question}"}, *row["messages"][1:]]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _pseudo_options(model, dataset, out, **kw):
    from qzoom_swift.labels.pseudo import PseudoLabelOptions

    base = dict(model=str(model), dataset=str(dataset), out=str(out), max_new_tokens=4, progress=False, calibration=2,
                max_tokens=64, tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9, batch_size=2)
    base.update(kw)
    return PseudoLabelOptions(**base)


def test_1_long_question_is_rejected_before_the_model_and_the_job_goes_on(tiny_dir, tmp_path):
    from qzoom_swift.labels.pseudo import run_pseudo_labels

    rows = _shape_rows(tmp_path / "img", 3)
    long_row = _with_question(rows[1], "Which colour? " + "zoom " * 2000)
    data = _jsonl(tmp_path / "data.jsonl", [rows[0], long_row, rows[1], rows[2]])
    out = tmp_path / "out"
    summary = run_pseudo_labels(_pseudo_options(tiny_dir("qwen2_5_vl"), data, out, max_prompt_tokens=1000))
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, "prompt_too_long")]
    assert "> the limit 1000" in rejects[0]["detail"]
    labelled = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in _lines(shard)]
    assert sorted(int(r["qzoom_id"].split("-")[0]) for r in labelled) == [0, 2, 3]
    assert summary["complete"] and summary["records_done"] == 4


def test_1_default_prompt_limit_fits_the_visual_budget_and_the_context():
    from qzoom_swift.labels.jobs import DEFAULT_TEXT_TOKENS, LabelJob

    class Opts:
        max_prompt_tokens = None
        dataset, out, shard_size = "x", "y", 10

    job = LabelJob(Opts())
    assert job.prompt_limit(None, 576) == 576 + DEFAULT_TEXT_TOKENS
    assert job.prompt_limit(2048, 576) == 2048  # never beyond the model's context
    Opts.max_prompt_tokens = 300
    assert job.prompt_limit(2048, 576) == 300


def test_1_a_record_that_fails_inside_the_model_is_rejected_and_never_retried(tiny_dir, tmp_path, monkeypatch):
    import qzoom_swift.labels.attention as attention
    from qzoom_swift.labels.pseudo import run_pseudo_labels

    rows = _shape_rows(tmp_path / "img", 4)
    poison = _with_question(rows[2], "Which colour? " + "please " * 300)
    data = _jsonl(tmp_path / "data.jsonl", [rows[0], rows[1], poison, rows[3]])
    real = attention.generate_with_attention
    calls = {"poison": 0}

    def fake(model, inputs, *args, **kwargs):
        if inputs["input_ids"].shape[1] > 250:  # the poison record is in this batch
            calls["poison"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(attention, "generate_with_attention", fake)
    out = tmp_path / "out"
    opts: dict = {}  # the default prompt limit lets the 300-word question through: it fails inside the model
    summary = run_pseudo_labels(_pseudo_options(tiny_dir("qwen2_5_vl"), data, out, **opts))
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["index"], r["reason"]) for r in rejects] == [(2, "out_of_memory")]
    assert "OutOfMemoryError" in rejects[0]["detail"]
    labelled = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in _lines(shard)]
    assert sorted(int(r["qzoom_id"].split("-")[0]) for r in labelled) == [0, 1, 3]  # its batch-mate is answered
    assert summary["complete"]
    calls["poison"] = 0
    for line in (out / "shard-00000.jsonl",):  # lose record 3's line: the resume recomputes its block
        kept = [r for r in _lines(line) if not r["qzoom_id"].startswith("3-")]
        line.write_text("".join(json.dumps(r) + "\n" for r in kept))
    again = run_pseudo_labels(_pseudo_options(tiny_dir("qwen2_5_vl"), data, out, **opts))
    assert calls["poison"] == 0, "a rejected record ran through the model again"
    assert again["complete"] and again["this_run"]["processed"] == 1


@pytest.mark.parametrize("job", ["mine-hard", "gate-labels"])
def test_1_other_jobs_reject_long_prompts_and_go_on(tiny_dir, tmp_path, job):
    from qzoom_swift import cli

    rows = _shape_rows(tmp_path / "img", 3)
    data = _jsonl(tmp_path / "data.jsonl", [rows[0], _with_question(rows[1], "Colour? " + "zoom " * 1500), rows[2]])
    out = tmp_path / "out"
    common = ["--model", str(tiny_dir("qwen2_5_vl")), "--dataset", str(data), "--out", str(out), "--batch-size", "2",
              "--max-new-tokens", "2", "--no-progress", "--max-prompt-tokens", "1200"]
    extra = (["--low-min-tokens", "16", "--low-max-tokens", "64", "--roi-min-tokens", "16", "--roi-max-tokens", "64"]
             if job == "mine-hard" else ["--budgets", "16,64"])
    assert cli.main([job, *common, *extra]) == 0
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, "prompt_too_long")]
    done = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in _lines(shard)]
    assert sorted(int(r["qzoom_id"].split("-")[0]) for r in done) == [0, 2]


# -------------------------------------------------------------- 5: resume does not depend on how a path is typed


def _mine_options(model, dataset, out, **kw):
    from qzoom_swift.labels.mining import MineOptions

    base = dict(model=str(model), checkpoint=None, dataset=str(dataset), out=str(out), max_new_tokens=2,
                batch_size=2, progress=False, limit=2,
                config_overrides={"low_min_tokens": 16, "low_max_tokens": 64, "roi_min_tokens": 16,
                                  "roi_max_tokens": 64})
    base.update(kw)
    return MineOptions(**base)


def test_5_same_dataset_written_differently_resumes(tiny_dir, tmp_path, monkeypatch):
    import shutil

    from qzoom_swift.labels.jobs import JOB_FILE, JobError
    from qzoom_swift.labels.mining import run_mine_hard
    from qzoom_swift.synthetic.images import write_shape_dataset

    monkeypatch.chdir(tmp_path)
    write_shape_dataset(tmp_path / "jobs", n=3, seed=4, name="x.jsonl")
    model = tiny_dir("qwen2_5_vl")
    first = run_mine_hard(_mine_options(model, "jobs/x.jsonl", "out"))
    assert first["answered"] == 2
    job = json.loads((tmp_path / "out" / JOB_FILE).read_text())
    assert job["settings"]["dataset"] == str(tmp_path / "jobs" / "x.jsonl")  # stored resolved
    assert job["dataset_fingerprint"].startswith("sha256:")
    again = run_mine_hard(_mine_options(model, tmp_path / "jobs" / "x.jsonl", "out"))  # absolute: same dataset
    assert again["answered"] == 2
    shutil.copy(tmp_path / "jobs" / "x.jsonl", tmp_path / "moved.jsonl")  # same content elsewhere: same dataset
    assert run_mine_hard(_mine_options(model, "moved.jsonl", "out"))["answered"] == 2
    with pytest.raises(JobError) as info:  # a real difference is listed with both values
        run_mine_hard(_mine_options(model, "jobs/x.jsonl", "out", max_new_tokens=3))
    message = str(info.value)
    assert "max_new_tokens: earlier 2, now 3" in message and "dataset" not in message.split("(", 1)[1].split(")")[0]
    assert message.index("rerun with the earlier values") < message.index("--overwrite")


# ------------------------------------------------------------------------------------ 11: mine-hard budgets


def test_11_mine_hard_low_min_tokens_and_a_failed_start_leaves_no_job_file(tiny_dir, tmp_path, capsys):
    from qzoom_swift import cli

    data = _jsonl(tmp_path / "data.jsonl", _shape_rows(tmp_path / "img", 2))
    out = tmp_path / "out"
    common = ["mine-hard", "--model", str(tiny_dir("qwen2_5_vl")), "--dataset", str(data), "--out", str(out),
              "--max-new-tokens", "2", "--no-progress", "--roi-min-tokens", "16", "--roi-max-tokens", "64"]
    assert cli.main([*common, "--low-max-tokens", "64"]) != 0
    err = capsys.readouterr().err
    assert "low_min_tokens=256 > low_max_tokens=64" in err
    assert not (out / "job.json").exists()
    assert cli.main([*common, "--model", str(tmp_path / "no-model")]) != 0  # fails after job.json was written
    assert not (out / "job.json").exists()
    capsys.readouterr()
    assert cli.main([*common, "--low-min-tokens", "16", "--low-max-tokens", "64"]) == 0
    assert (out / "job.json").is_file() and len(_lines(out / "shard-00000.jsonl")) == 2


# ------------------------------------------------------------ 0: benchmark data is what the user passed, always


def _docvqa_targets(samples) -> list[str]:
    return sorted(s.target for s in samples)


@pytest.fixture()
def two_docvqa_folders(tmp_path):
    """Two local DocVQA copies with different contents (2 and 3 samples, other colours)."""
    from qzoom_swift.testing.eval_data import write_eval_datasets

    a = write_eval_datasets(tmp_path / "a", ["docvqa"], n=2, seed=0)["docvqa"]
    b = write_eval_datasets(tmp_path / "b", ["docvqa"], n=3, seed=7)["docvqa"]
    return a, b


def test_0_two_folders_in_one_process_give_their_own_samples(two_docvqa_folders, tmp_path):
    from qzoom_swift.eval.local_data import load_benchmark_samples

    a, b = two_docvqa_folders
    first = load_benchmark_samples("docvqa", a, tmp_path / "cache")
    second = load_benchmark_samples("docvqa", b, tmp_path / "cache")
    assert len(first) == 2 and len(second) == 3
    assert _docvqa_targets(first) != _docvqa_targets(second)
    again = load_benchmark_samples("docvqa", a, tmp_path / "cache")  # and back: still the first folder's
    assert _docvqa_targets(again) == _docvqa_targets(first)


_LOAD_IN_CHILD = """
import json, sys
from qzoom_swift.eval.local_data import load_benchmark_samples
samples = load_benchmark_samples("docvqa", sys.argv[1], sys.argv[2])
print("TARGETS=" + json.dumps(sorted(s.target for s in samples)))
"""

_STALE_GLOBAL_ENTRY = """
import sys
from evalscope import TaskConfig
from evalscope.api.registry import get_benchmark
cfg = TaskConfig(datasets=["docvqa"], dataset_args={"docvqa": {"dataset_id": sys.argv[1]}}, eval_type="mock_llm",
                 model="mock")
get_benchmark("docvqa", cfg).load_dataset()
"""


def test_0_two_folders_in_two_processes_with_a_stale_global_cache(two_docvqa_folders, tmp_path):
    import os
    import subprocess
    import sys

    from qzoom_swift.eval.local_data import load_benchmark_samples
    from qzoom_swift.testing.eval_data import write_eval_datasets

    a, b = two_docvqa_folders
    stale = write_eval_datasets(tmp_path / "stale", ["docvqa"], n=1, seed=3)["docvqa"]
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "global-hf"))  # a machine whose cache holds docvqa
    subprocess.run([sys.executable, "-c", _STALE_GLOBAL_ENTRY, str(stale)], env=env, check=True, capture_output=True)
    assert any((tmp_path / "global-hf").rglob("*.arrow"))
    got = {}
    for name, folder in (("a", a), ("b", b)):
        proc = subprocess.run([sys.executable, "-c", _LOAD_IN_CHILD, str(folder), str(tmp_path / "cache")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got[name] = json.loads(proc.stdout.split("TARGETS=", 1)[1])
    assert got["a"] == _docvqa_targets(load_benchmark_samples("docvqa", a, tmp_path / "cache2"))
    assert len(got["a"]) == 2 and len(got["b"]) == 3


def test_0_eval_results_of_changed_files_are_not_reused(two_docvqa_folders, tmp_path):
    import argparse

    from qzoom_swift.eval.command import _pending, build_run_specs

    a, _ = two_docvqa_folders
    args = argparse.Namespace(runs=["baseline:64"], benchmarks="docvqa", data_root=None, datasets=[f"docvqa={a}"],
                              preset="none", out=tmp_path / "out", model="m", checkpoint=None, limit=1,
                              max_new_tokens=2, dtype="auto", device="cpu", attn_implementation=None,
                              eval_batch_size=1, prompts="short")
    [spec], _ = build_run_specs(args)
    bench = spec["benchmarks"]["docvqa"]
    assert bench["dataset"] == str(a.resolve())
    stored = Path(spec["run_dir"]) / "bench" / "docvqa.json"
    stored.parent.mkdir(parents=True)
    stored.write_text(json.dumps({"fingerprint": bench["fingerprint"], "settings": bench, "result": {}}))
    assert _pending(spec) == []
    data_file = next(p for p in a.rglob("*.parquet"))
    data_file.write_bytes(data_file.read_bytes() + b"\0")  # the user replaced the files
    [spec2], _ = build_run_specs(args)
    assert _pending(spec2) == ["docvqa"]


# ------------------------------------------------------- 2: a Q-Zoom model type needs the Q-Zoom template


@pytest.mark.parametrize(("model_type", "template", "message"), [
    ("qzoom_qwen2_5_vl", "qwen2_5_vl", "--model_type qzoom_qwen2_5_vl is a Q-Zoom model type but --template "
                                       "qwen2_5_vl is a stock template"),
    ("qwen2_5_vl", "qzoom_qwen2_5_vl", "--template qzoom_qwen2_5_vl is a Q-Zoom template but --model_type "
                                       "qwen2_5_vl is a stock model type"),
])
def test_2_mismatched_template_and_model_type_are_refused(tiny_dir, model_type, template, message):
    from swift.model import get_model_processor
    from swift.template import get_template

    from qzoom_swift.swift_plugin import register

    register()
    _, processor = get_model_processor(str(tiny_dir("qwen2_5_vl")), model_type=model_type, load_model=False)
    with pytest.raises(ValueError, match=message):
        get_template(processor, template_type=template)
    assert get_template(processor, template_type=model_type) is not None  # the matching pair is fine


# --------------------------------------------- swift deploy: start-up checks (6), media (10), usage (11), signals (7)


def _start_deploy(tiny_dir, tmp_path, knobs: dict, env_extra: dict | None = None):
    """``swift deploy`` with the plugin on the tiny Qwen2.5-VL; returns (launcher, base url, log path)."""
    return start_swift_deploy(tiny_dir("qwen2_5_vl"), tmp_path, knobs, "--max_new_tokens", "3", env_extra=env_extra)


def _png_uri(colour=(30, 160, 60), size=(320, 240)) -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def deploy(tiny_dir, tmp_path_factory):
    """A ``swift deploy`` with zoom forced on every image (tau_roi 0: the box always survives), stopped after
    the test (per test, so the last test of this module can check that nothing is left running)."""
    tmp = tmp_path_factory.mktemp("deploy")
    proc, base, log = _start_deploy(tiny_dir, tmp, {"QZOOM_MODE": "always", "QZOOM_TAU_ROI": 0.0,
                                                    "QZOOM_ROI_MIN_TOKENS": 16, "QZOOM_ROI_MAX_TOKENS": 64})
    name = wait_for_models(base, proc, timeout=240)
    try:
        assert name is not None, log.read_text()[-3000:]
        yield base, name, log
    finally:
        stop_process_tree(proc)


@pytest.mark.slow
def test_10_deploy_answers_unsupported_and_empty_media_with_a_message(deploy):
    base, name, _ = deploy
    text = {"type": "text", "text": "Colour?"}
    code, body = chat_status(base, name, [{"type": "video_url", "video_url": {"url": _png_uri()}}, text])
    assert code == 400 and "serves images and text only" in body["message"] and "1 video entry" in body["message"]
    code, body = chat_status(base, name, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, text])
    assert code == 400 and "image 0 (data URI with 0 payload characters) cannot be read" in body["message"]
    assert body["message"].startswith("messages[0].content[0] (image): ")  # issue 29 item 1: the entry is named


@pytest.mark.slow
def test_29_8_deploy_reads_no_server_side_file_or_url_by_default(deploy, tmp_path):
    """Issue 29 item 8: the server reads only what the request carries unless QZOOM_ALLOWED_LOCAL_MEDIA_PATH /
    QZOOM_ALLOW_MEDIA_URLS say otherwise (test_deploy_guard runs a server that allows both)."""
    base, name, _ = deploy
    text = {"type": "text", "text": "Colour?"}
    local = tmp_path / "green.png"
    Image.new("RGB", (320, 240), (30, 160, 60)).save(local)
    refused = {str(local): "reads no files named in a request", f"file://{local}": "reads no file:// URLs",
               "http://127.0.0.1:9/green.png": "fetches no URLs on a client's behalf"}
    for url, reason in refused.items():
        code, body = chat_status(base, name, [{"type": "image_url", "image_url": {"url": url}}, text])
        assert code in (400, 422) and reason in json.dumps(body), (url, code, body)
    payload = _png_uri().split(",", 1)[1]
    for url in (_png_uri(), payload):  # a data URL and bare base64 are the request's own bytes
        code, body = chat_status(base, name, [{"type": "image_url", "image_url": {"url": url}}, text])
        assert code == 200, body


@pytest.mark.slow
def test_11_deploy_usage_counts_the_tokens_the_zoomed_pass_read(deploy):
    import re
    import time

    base, name, log = deploy
    code, body = chat_status(base, name, [{"type": "image_url", "image_url": {"url": _png_uri()}},
                                    {"type": "text", "text": "What colour is it?"}])
    assert code == 200, body
    time.sleep(0.5)
    decisions = re.findall(r"qzoom: zoom\(forced\) p=\S+(?: box=\[[^]]*\]/\[[^]]*\])? read=(\d+) visual=(\d+)\+(\d+)",
                           log.read_text())
    assert decisions, log.read_text()[-2000:]
    read, low, roi = map(int, decisions[-1])
    assert roi > 0 and read > low + roi
    assert body["usage"]["prompt_tokens"] == read  # pass 1 plus the inserted crop, not pass 1 alone


@pytest.mark.slow
def test_6_deploy_refuses_to_start_with_a_broken_router(tiny_dir, tmp_path):
    proc, base, log = _start_deploy(tiny_dir, tmp_path, {"QZOOM_MODE": "zoom"},
                                    {"QZOOM_ROUTER": "onnx", "QZOOM_ONNX_DIR": str(tmp_path / "no-onnx")})
    try:
        name = wait_for_models(base, proc, timeout=240)
        assert name is None, "the server started (and would answer every request with HTTP 400)"
        assert proc.wait(timeout=60) != 0
        assert f"no exported fp32 graph at {tmp_path / 'no-onnx'}" in log.read_text()
    finally:
        stop_process_tree(proc)


def test_10_corrupt_onnx_graph_names_the_file(tmp_path):
    from qzoom_swift.onnx.export import onnx_filename
    from qzoom_swift.onnx.router import OnnxRouter, OnnxRouterError

    for branch in ("gate", "rpn"):
        (tmp_path / onnx_filename(branch, "fp32")).write_bytes(b"\x08\x07garbage, not a protobuf \xff\xfe")
    with pytest.raises(OnnxRouterError, match=f"cannot read the ONNX graph {tmp_path / onnx_filename('gate', 'fp32')}"):
        OnnxRouter(tmp_path, provider="cpu")


@pytest.mark.slow
def test_7_sigterm_to_swift_deploy_stops_the_server(tiny_dir, tmp_path):
    import psutil

    proc, base, log = _start_deploy(tiny_dir, tmp_path, {"QZOOM_MODE": "never"})
    try:
        assert wait_for_models(base, proc, timeout=240) is not None, log.read_text()[-3000:]
        server = psutil.Process(proc.pid).children(recursive=True)
        assert server
        proc.terminate()  # SIGTERM to the `swift` launcher only, as a process manager sends it
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, f"swift deploy server still running after the launcher was stopped: {alive}"
    finally:
        stop_process_tree(proc)


_PARENT = """
import sys
from qzoom_swift.procs import run_child
child = [sys.executable, "-c", "import os, sys, time; from qzoom_swift.procs import die_with_parent; "
         "die_with_parent(15, int(sys.argv[1])); print('child', os.getpid(), flush=True); time.sleep(300)",
         str(__import__('os').getpid())]
sys.exit(run_child(child))
"""


_WATCHED_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import os, time; from qzoom_swift.procs import exit_when_reparented; "
                          "exit_when_reparented(poll_s=0.2); print('child', os.getpid(), flush=True); time.sleep(300)"])
time.sleep(300)
"""


def test_7_a_watched_child_stops_when_its_killed_parent_is_gone():
    """``exit_when_reparented`` (vLLM's engine processes): no kernel hook, the child polls its parent's id."""
    import signal
    import subprocess
    import sys

    import psutil

    parent = subprocess.Popen([sys.executable, "-c", _WATCHED_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.startswith("child "), line
        child = psutil.Process(int(line.split()[1]))
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs([child], timeout=15)
        assert not alive, "the child outlived its killed parent"
    finally:
        parent.kill()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_7_a_stopped_or_killed_parent_leaves_no_child(tmp_path, how):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.startswith("child "), line
        child = psutil.Process(int(line.split()[1]))
        time.sleep(0.3)  # the parent's handlers are in place once the child runs
        parent.send_signal(getattr(signal, how))
        rc = parent.wait(timeout=30)
        if how != "SIGKILL":
            assert rc == 128 + int(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        gone, alive = psutil.wait_procs([child], timeout=15)
        assert not alive, f"child left running after {how} to its parent"
    finally:
        parent.kill()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_7_stopped_or_killed_qzoom_eval_leaves_no_worker(tiny_dir, tmp_path, how):
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from qzoom_swift.testing.eval_data import write_eval_datasets

    write_eval_datasets(tmp_path / "data", ["docvqa"], n=32)  # a worker that runs ~10 s if left alone
    cmd = [sys.executable, "-m", "qzoom_swift.cli", "eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run",
           "baseline:64", "--benchmarks", "docvqa", "--data-root", str(tmp_path / "data"), "--out",
           str(tmp_path / "out"), "--limit", "32", "--max-new-tokens", "32", "--device", "cpu"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    workers: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not workers and parent.poll() is None:
            workers = [p for p in psutil.Process(parent.pid).children(recursive=True)
                       if "worker" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert workers, "the eval worker never started"
        time.sleep(0.5)  # the worker has set its parent-death signal
        parent.send_signal(getattr(signal, how))
        rc = parent.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=4)
        assert not alive, f"qzoom eval worker left running after its parent got {how}: {alive}"
        assert how == "SIGKILL" or rc == 128 + signal.SIGTERM  # stopped, and says so
    finally:
        parent.kill()
        for worker in workers:  # clean up whatever the code under test left (orphans are no longer our children)
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass


def test_7_this_module_left_no_process_or_port_behind():
    """Everything the tests above started is gone: no child of this pytest process, hence no port it holds."""
    import psutil

    me = psutil.Process()
    alive = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()[:4]) for p in alive]
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid == me.pid]
    assert not listening, listening


@pytest.mark.slow
def test_11_save_branches_folder_loads_with_swift_infer_adapters_alone(qz, tiny_dir, shape_dataset, tmp_path):
    """No --tuner_type, --model_type or --external_plugins: the folder's args.json names them."""
    import os
    import subprocess

    from qzoom_swift.bench.sft import swift_executable

    ckpt = qz.save_branches(tmp_path / "ckpt")
    args = json.loads((ckpt / "args.json").read_text())
    assert args["tuner_type"] == "qzoom" and args["model_type"] == "qzoom_qwen2_5_vl"
    cmd = [str(swift_executable()), "infer", "--model", str(tiny_dir("qwen2_5_vl")), "--adapters", str(ckpt),
           "--val_dataset", str(shape_dataset), "--max_new_tokens", "1", "--max_batch_size", "2",
           "--result_path", str(tmp_path / "out.jsonl")]
    env = dict(os.environ, MODELSCOPE_CACHE=str(tmp_path / "ms"), OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "qzoom: " in run.stdout + run.stderr  # the zoom generation ran, not the stock template
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4

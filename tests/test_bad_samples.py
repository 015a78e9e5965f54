"""Issue 29: one bad sample fails alone — CPU allocation failures are ``out_of_memory`` (item 4), a corrupt
benchmark sample is scored as failed while the run goes on (item 2), and under a real memory limit
(``ulimit -v``) a sample too large to fit is rejected, the others kept, and a resume does not retry it (item 9).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qzoom_swift.failures import OOM_REASON, is_out_of_memory


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the real exception is the point
        return exc
    raise AssertionError("expected the allocation to fail")


# ------------------------------------------------------------------- item 4: CPU allocation failure = out_of_memory


def test_real_cpu_allocation_failures_are_out_of_memory():
    torch_cpu = _raised(lambda: torch.empty(2**42, dtype=torch.uint8))  # 4 TiB: torch's CPU allocator refuses
    assert type(torch_cpu) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(torch_cpu)
    numpy_cpu = _raised(lambda: np.empty(2**46, dtype=np.uint8))
    assert isinstance(numpy_cpu, MemoryError)
    for exc in (torch_cpu, numpy_cpu, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"),
                MemoryError(), RuntimeError("not enough memory: you tried to allocate 1 GB")):
        assert is_out_of_memory(exc), exc
    try:
        raise ValueError("image bytes are not a readable image ()") from numpy_cpu
    except ValueError as wrapped:
        assert is_out_of_memory(wrapped)  # the decoder's MemoryError, re-raised by decode_image
    for exc in (ValueError("image bytes are not a readable image"), RuntimeError("shape mismatch [3, 4] vs [4]"),
                KeyError("memory")):
        assert not is_out_of_memory(exc), exc


def test_labelling_records_a_cpu_allocation_failure_as_out_of_memory(tiny_dir, tmp_path, monkeypatch):
    """The model's forward on one record hits torch's real CPU allocator failure: rejected as out_of_memory."""
    import qzoom_swift.labels.attention as attention
    from qzoom_swift.labels.pseudo import PseudoLabelOptions, run_pseudo_labels
    from qzoom_swift.synthetic.images import write_shape_dataset

    rows = [json.loads(line) for line in write_shape_dataset(tmp_path / "img", n=3, seed=3).read_text().splitlines()]
    rows[1] = {**rows[1], "messages": [{"role": "user", "content": "<image>Which colour? " + "please " * 300},
                                       *rows[1]["messages"][1:]]}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = attention.generate_with_attention

    def allocating(model, inputs, *args, **kwargs):
        if inputs["input_ids"].shape[1] > 250:  # the long record: its activations do not fit this "machine"
            torch.empty(2**42, dtype=torch.uint8)
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(attention, "generate_with_attention", allocating)
    out = tmp_path / "out"
    summary = run_pseudo_labels(PseudoLabelOptions(
        model=str(tiny_dir("qwen2_5_vl")), dataset=str(data), out=str(out), max_new_tokens=4, progress=False,
        calibration=2, max_tokens=64, tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9, batch_size=2))
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, OOM_REASON)]
    assert "DefaultCPUAllocator" in rejects[0]["detail"]
    labelled = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in _lines(shard)]
    assert sorted(int(r["qzoom_id"].split("-")[0]) for r in labelled) == [0, 2]
    assert summary["complete"]


# ------------------------------------------------------------------- item 2: a bad eval sample fails alone


def _message(i: int, corrupt: bool = False):
    import base64
    import io

    from evalscope.api.messages import ChatMessageUser, ContentImage, ContentText

    from qzoom_swift.synthetic.images import make_shape_image, sample_shapes

    buf = io.BytesIO()
    make_shape_image(sample_shapes(4, (224, 168), seed=i)[i], (224, 168)).save(buf, format="PNG")
    data = buf.getvalue()[: len(buf.getvalue()) // 2] if corrupt else buf.getvalue()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return [ChatMessageUser(content=[ContentText(text=f"Which colour is shape {i}?"), ContentImage(image=uri)])]


@pytest.mark.parametrize("batch", [1, 4])
def test_model_api_scores_a_bad_sample_as_failed_and_answers_the_others(tiny_dir, monkeypatch, batch):
    """A truncated image and a sample whose forward runs out of memory (batch 1 and one batch of 4):
    each gets an empty, failed answer naming its reason; the other samples get the answers they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    from evalscope.api.model import GenerateConfig

    from qzoom_swift.eval.model_api import UNREADABLE_IMAGE, QZoomAPI

    knobs = dict(low_max_tokens=32, low_min_tokens=16, roi_max_tokens=32, roi_min_tokens=16, device="cpu",
                 max_new_tokens=3, mode="zoom", tau_gate=0.0)
    api = QZoomAPI(str(tiny_dir("qwen2_5_vl")), max_batch_size=batch, batch_window_s=5.0 if batch > 1 else 0.0,
                   **knobs)
    alone = {i: api.generate(_message(i), [], "auto", GenerateConfig()).completion for i in (0, 3)}
    real = api.qz.generate
    sizes: list[int] = []

    def generate(images, questions, **kwargs):
        sizes.append(len(questions))
        if any("shape 2" in q for q in questions):  # this sample's activations do not fit: a real CPU failure
            torch.empty(2**42, dtype=torch.uint8)
        return real(images, questions, **kwargs)

    monkeypatch.setattr(api.qz, "generate", generate)
    msgs = [_message(0), _message(1, corrupt=True), _message(2), _message(3)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda m: api.generate(m, [], "auto", GenerateConfig()), msgs))
    meta = [o.metadata["qzoom"] for o in outs]
    assert [m.get("failure") for m in meta] == [None, UNREADABLE_IMAGE, OOM_REASON, None]
    assert outs[1].completion == "" and "image file is truncated" in outs[1].error and meta[1]["failed"]
    assert outs[2].completion == "" and "DefaultCPUAllocator" in meta[2]["error"]
    assert outs[0].completion == alone[0] and outs[3].completion == alone[3]  # the neighbours are answered
    assert not meta[0].get("failed") and meta[0]["visual_tokens"] > 0
    if batch > 1:
        assert sizes[0] == 3 and sorted(sizes[1:]) == [1, 1, 1]  # the failed batch of 3, then one by one


def test_a_model_that_fails_every_sample_stops_the_benchmark(tiny_dir, monkeypatch):
    """More failures in a row than MAX_CONSECUTIVE_FAILURES is a broken model, not bad samples: it raises."""
    from evalscope.api.model import GenerateConfig

    from qzoom_swift.eval.model_api import QZoomAPI
    from qzoom_swift.failures import MAX_CONSECUTIVE_FAILURES, MODEL_ERROR

    api = QZoomAPI(str(tiny_dir("qwen2_5_vl")), device="cpu", max_new_tokens=2, low_max_tokens=32,
                   low_min_tokens=16)
    monkeypatch.setattr(api.qz, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken weights")))
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        assert api.generate(_message(0), [], "auto", GenerateConfig()).metadata["qzoom"]["failure"] == MODEL_ERROR
    with pytest.raises(RuntimeError, match=f"failed on {MAX_CONSECUTIVE_FAILURES + 1} samples in a row"):
        api.generate(_message(0), [], "auto", GenerateConfig())


def _eval_cli(args: list[str]) -> str:
    import contextlib
    import io

    from qzoom_swift import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(args)
    assert rc == 0, buf.getvalue()[-3000:]
    return buf.getvalue()


def _predictions(run_dir) -> dict[tuple[str, int], dict]:
    rows = {}
    for f in sorted(run_dir.glob("evalscope/*/predictions/*/*.jsonl")):
        for row in _lines(f):
            rows[(f.name, row["index"])] = row
    return rows


@pytest.mark.slow
def test_qzoom_eval_scores_a_corrupt_sample_as_failed_and_goes_on(tmp_path, tiny_dir, monkeypatch):
    """Sample 1 of each benchmark is a truncated image: at batch 1 and on two CPU workers at batch 4, every other
    sample is answered, the corrupt one is scored (in n) as failed with its reason in the predictions and the
    summary, the command succeeds, and a rerun finds the results current instead of stopping on it again."""
    from qzoom_swift.testing.eval_data import write_eval_datasets

    benches = ("docvqa", "vstar_bench")
    write_eval_datasets(tmp_path / "data", benches, n=4, corrupt=[1], hr_size=(448, 336))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    base = ["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "zoom:64:tau_gate=0", "--benchmarks",
            ",".join(benches), "--data-root", str(tmp_path / "data"), "--max-new-tokens", "2"]
    runs = {"b1": [*base, "--out", str(tmp_path / "b1"), "--device", "cpu"],
            "b4": [*base, "--out", str(tmp_path / "b4"), "--devices", "cpu,cpu", "--eval-batch-size", "4"]}
    for name, args in runs.items():
        stdout = _eval_cli(args)
        run_dir = tmp_path / name / "runs" / "zoom@64"
        preds = _predictions(run_dir)
        assert len(preds) == 8, sorted(preds)  # every sample ran, the ones after the corrupt one included
        for (file, index), row in preds.items():
            out, meta = row["model_output"], row["model_output"]["metadata"]["qzoom"]
            if index == 1:
                assert meta["failed"] and meta["failure"] == "unreadable_image", (name, file)
                assert "image file is truncated" in out["error"] and out["choices"][0]["message"]["content"] == ""
            else:
                assert not meta.get("failed") and meta["visual_tokens"] > 0, (name, file, index)
        for bench in benches:
            result = json.loads((run_dir / "bench" / f"{bench}.json").read_text())["result"]
            assert (result["samples"], result["num"], result["failed"]) == (4, 4, 1)
            assert result["failures"] == {"unreadable_image": 1} and result["failed_samples"][0]["index"] == 1
            assert result["zoom_rate"] == 1.0  # over the three answered samples
        row = next(r for r in csv_rows(tmp_path / name / "summary.csv"))
        assert (row["samples"], row["failed"]) == ("8", "2")
        assert "| 8 | 2 |" in stdout
        if name == "b4":
            sizes = [r["model_output"]["metadata"]["qzoom"]["batch_size"] for r in preds.values() if r["index"] != 1]
            assert max(sizes) > 1  # it did batch, with the corrupt sample among the concurrent calls
    again = _eval_cli(runs["b1"])
    assert "zoom@64: stored results are current, skipped" in again


def csv_rows(path) -> list[dict]:
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------- item 9: a real memory limit (ulimit -v)

_HOOK = '''\
import atexit
import os
import resource

_limit = os.environ.get("TEST_RLIMIT_AS_BYTES")
if _limit:  # what `ulimit -v` does, for this process and the workers it starts
    resource.setrlimit(resource.RLIMIT_AS, (int(_limit), int(_limit)))
_peaks = os.environ.get("TEST_VMPEAK_DIR")
if _peaks:
    def _record() -> None:
        with open("/proc/self/status") as f:
            peak = next(line.split()[1] for line in f if line.startswith("VmPeak:"))
        with open(os.path.join(_peaks, str(os.getpid())), "w") as f:
            f.write(peak)
    atexit.register(_record)
'''
LARGE = (10000, 10000)
"""The large sample: decoding it takes 400 MB (PIL keeps RGB in 4 bytes a pixel), converting it as much again."""
MARGIN = 200 * 2**20
"""The limit is the peak address space of the same job on normal-sized images plus this (peaks repeat to ~1 MB)."""


def _qzoom(args: list[str], tmp_path, *, limit: int | None = None, peaks=None):
    """The real ``qzoom`` console script in a child process, optionally under an address-space limit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    env.pop("TEST_RLIMIT_AS_BYTES", None)
    if limit:
        env["TEST_RLIMIT_AS_BYTES"] = str(limit)
    if peaks is not None:
        peaks.mkdir(parents=True, exist_ok=True)
        env["TEST_VMPEAK_DIR"] = str(peaks)
    proc = subprocess.run([str(Path(sys.executable).with_name("qzoom")), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _peak(peaks) -> int:
    return max(int(p.read_text()) for p in peaks.iterdir()) * 1024


@pytest.fixture(scope="module")
def pressure_data(tmp_path_factory):
    """Three shape records (normal.jsonl) and the same with record 1's image at LARGE (large.jsonl)."""
    from qzoom_swift.synthetic.images import ShapeSample, make_shape_image, write_shape_dataset

    root = tmp_path_factory.mktemp("pressure")
    normal = write_shape_dataset(root, n=3, seed=3)
    rows = _lines(normal)
    big = root / "large.png"
    make_shape_image(ShapeSample("purple", "circle", (2000, 2000, 6000, 5000)), LARGE).save(big)
    rows[1] = {**rows[1], "images": [str(big)], "messages": [rows[1]["messages"][0],
                                                              {"role": "assistant", "content": "purple"}]}
    large = root / "large.jsonl"
    large.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return normal, large


@pytest.mark.slow
@pytest.mark.parametrize("job", ["gate-labels", "mine-hard", "pseudo-labels"])
def test_labelling_under_a_memory_limit_rejects_the_large_record_and_keeps_the_others(
        tiny_dir, tmp_path, pressure_data, job):
    normal, large = pressure_data
    extra = {"gate-labels": ["--budgets", "16,64"],
             "mine-hard": ["--low-min-tokens", "16", "--low-max-tokens", "64", "--roi-min-tokens", "16",
                           "--roi-max-tokens", "64"],
             "pseudo-labels": ["--max-tokens", "64", "--calibration", "2", "--tau-fg", "0.9", "--tau-bg", "0.8",
                               "--max-box-fraction", "0.9"]}[job]

    def command(dataset, out):
        return [job, "--model", str(tiny_dir("qwen2_5_vl")), "--dataset", str(dataset), "--out", str(out),
                "--batch-size", "2", "--max-new-tokens", "2", "--no-progress", *extra]

    _qzoom(command(normal, tmp_path / "calibration"), tmp_path, peaks=tmp_path / "peaks")
    limit = _peak(tmp_path / "peaks") + MARGIN
    out = tmp_path / "out"
    _qzoom(command(large, out), tmp_path, limit=limit)
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, OOM_REASON)], rejects
    assert "MemoryError" in rejects[0]["detail"] and "large.png" in rejects[0]["detail"]
    done = sorted(int(r["qzoom_id"].split("-")[0]) for s in out.glob("shard-*.jsonl") for r in _lines(s))
    assert done == [0, 2]
    # lose record 0 (the large record's batch-mate), then resume without the limit, where record 1 would fit:
    # record 0 is labelled again, the rejected record 1 is not run again
    for shard in out.glob("shard-*.jsonl"):
        shard.write_text("".join(json.dumps(r) + "\n" for r in _lines(shard) if not r["qzoom_id"].startswith("0-")))
    _qzoom(command(large, out), tmp_path)
    assert _lines(out / "rejects.jsonl") == rejects
    assert sorted(int(r["qzoom_id"].split("-")[0]) for s in out.glob("shard-*.jsonl") for r in _lines(s)) == [0, 2]


@pytest.mark.slow
def test_qzoom_eval_under_a_memory_limit_fails_the_large_sample_and_keeps_the_others(tiny_dir, tmp_path):
    from qzoom_swift.testing.eval_data import write_eval_datasets

    write_eval_datasets(tmp_path / "normal", ["docvqa"], n=3)
    write_eval_datasets(tmp_path / "large", ["docvqa"], n=3, large={1: LARGE})

    def command(data, out):
        return ["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "zoom:64:tau_gate=0", "--benchmarks",
                "docvqa", "--data-root", str(data), "--max-new-tokens", "2", "--device", "cpu", "--out", str(out)]

    _qzoom(command(tmp_path / "normal", tmp_path / "calibration"), tmp_path, peaks=tmp_path / "peaks")
    limit = _peak(tmp_path / "peaks") + MARGIN
    out = tmp_path / "out"
    _qzoom(command(tmp_path / "large", out), tmp_path, limit=limit)
    result = json.loads((out / "runs" / "zoom@64" / "bench" / "docvqa.json").read_text())["result"]
    assert (result["samples"], result["failed"], result["failures"]) == (3, 1, {OOM_REASON: 1})
    assert result["failed_samples"][0]["index"] == 1 and "MemoryError" in result["failed_samples"][0]["error"]
    preds = _predictions(out / "runs" / "zoom@64")
    assert sorted(i for (_, i), r in preds.items() if not r["model_output"]["metadata"]["qzoom"].get("failed")) == [0, 2]
    # a rerun without the limit keeps the stored result: the large sample is not tried again
    again = _qzoom(command(tmp_path / "large", out), tmp_path)
    assert "zoom@64: stored results are current, skipped" in again.stdout
    assert json.loads((out / "runs" / "zoom@64" / "bench" / "docvqa.json").read_text())["result"] == result

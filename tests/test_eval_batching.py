"""Batched evalscope calls: the batcher (threads, window, errors) and ``qzoom eval --eval-batch-size``."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qzoom_swift.eval.batcher import Batcher

# ------------------------------------------------------------------------------------------ the batcher


class Recorder:
    """A ``run_batch`` that records its batches and how many ran at once; raises for items named 'bad'."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.batches: list[tuple[object, list]] = []
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, key, items):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.batches.append((key, list(items)))
        try:
            time.sleep(self.delay_s)
            bad = [i for i in items if str(i).startswith("bad")]
            if bad:
                raise ValueError(f"cannot answer {bad[0]}")
            return [f"{key}:{i}:answer" for i in items]
        finally:
            with self.lock:
                self.active -= 1


def _submit_all(batcher: Batcher, calls: list[tuple[object, object]], **kw) -> list:
    """Submit every (item, key) from its own thread, all released at once; results or exceptions, in order."""
    start = threading.Barrier(len(calls))

    def one(call):
        start.wait()
        try:
            return batcher.submit(call[0], call[1], **kw)
        except Exception as exc:  # the test inspects which calls failed
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def test_concurrent_threads_get_their_own_answers_in_batches():
    run = Recorder()
    batcher = Batcher(run, name="t")
    calls = [(i, "k") for i in range(10)]
    results = _submit_all(batcher, calls, max_batch=4, window_s=2.0)
    assert results == [f"k:{i}:answer" for i in range(10)]  # each caller its own answer
    sizes = [len(items) for _, items in run.batches]
    assert sum(sizes) == 10 and max(sizes) == 4 and all(s <= 4 for s in sizes)
    assert len(run.batches) <= 4  # grouped, not one by one
    assert run.peak == 1  # one model call at a time
    assert batcher.batch_sizes == sizes


def test_calls_with_other_settings_never_share_a_batch():
    run = Recorder()
    batcher = Batcher(run)
    calls = [(i, "a" if i % 2 else "b") for i in range(8)]
    results = _submit_all(batcher, calls, max_batch=8, window_s=0.5)
    assert results == [f"{k}:{i}:answer" for i, k in calls]
    for key, items in run.batches:
        assert all(("a" if i % 2 else "b") == key for i in items)


def test_a_lone_call_waits_no_longer_than_the_window():
    run = Recorder(delay_s=0.0)
    batcher = Batcher(run)
    t0 = time.monotonic()
    assert batcher.submit(1, "k", max_batch=8, window_s=0.3) == "k:1:answer"
    waited = time.monotonic() - t0
    assert 0.3 <= waited < 1.0, waited  # the window, not forever (no companion ever came)
    t0 = time.monotonic()
    assert batcher.submit(2, "k", max_batch=1, window_s=30.0) == "k:2:answer"  # a full batch runs at once
    assert time.monotonic() - t0 < 1.0
    # A call that waited for a busy model does not wait a second window: 3 calls, batches of 2, window 0.4 s,
    # a model call of 0.5 s: the third call's window has passed when the first batch ends.
    run.delay_s = 0.5
    t0 = time.monotonic()
    results = _submit_all(batcher, [(i, "k") for i in range(3)], max_batch=2, window_s=0.4)
    assert results == [f"k:{i}:answer" for i in range(3)]
    assert time.monotonic() - t0 < 0.5 + 0.5 + 0.35, "the third call waited another window"


def test_an_exception_reaches_only_its_own_call_of_a_failing_batch():
    run = Recorder()
    batcher = Batcher(run)
    calls = [("ok1", "k"), ("bad1", "k"), ("ok2", "k"), ("ok3", "other")]
    results = _submit_all(batcher, calls, max_batch=4, window_s=1.0)
    assert results[0] == "k:ok1:answer" and results[2] == "k:ok2:answer" and results[3] == "other:ok3:answer"
    assert isinstance(results[1], ValueError) and "bad1" in str(results[1])
    # the failing batch of three was retried one call at a time; the other key's batch never saw the error
    batches = [sorted(items) for _, items in run.batches]
    assert ["bad1", "ok1", "ok2"] in batches and ["ok1"] in batches and ["bad1"] in batches and ["ok2"] in batches
    assert batches.count(["ok3"]) == 1
    assert batcher.submit("ok4", "k", max_batch=1) == "k:ok4:answer"  # the worker thread survived


def test_a_wrong_result_count_fails_the_batch_not_the_process():
    batcher = Batcher(lambda key, items: [1] if len(items) > 1 else ["alone"])
    assert _submit_all(batcher, [(0, "k"), (1, "k")], max_batch=2, window_s=1.0) == ["alone", "alone"]
    with pytest.raises(ValueError):
        batcher.submit(0, "k", max_batch=0)


# ------------------------------------------------------------------------------------------ the model API


def _message(i: int):
    import base64

    from evalscope.api.messages import ChatMessageUser, ContentImage, ContentText

    from qzoom_swift.synthetic.images import make_shape_image, sample_shapes

    buf = io.BytesIO()
    make_shape_image(sample_shapes(4, (224, 168), seed=i)[i], (224, 168)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [ChatMessageUser(content=[ContentText(text=f"Which colour is shape {i}?"), ContentImage(image=uri)])]


def test_model_api_batches_concurrent_calls_with_the_same_answers(tiny_dir, monkeypatch):
    from evalscope.api.model import GenerateConfig

    from qzoom_swift.eval.model_api import QZoomAPI

    knobs = dict(low_max_tokens=32, low_min_tokens=16, roi_max_tokens=32, roi_min_tokens=16, device="cpu",
                 max_new_tokens=3, mode="zoom", tau_gate=0.0)
    model = str(tiny_dir("qwen2_5_vl"))
    single = QZoomAPI(model, **knobs)
    batched = QZoomAPI(model, max_batch_size=4, batch_window_s=5.0, **knobs)
    assert batched.qz is single.qz and batched._batcher is single._batcher  # one queue per set of weights
    with pytest.raises(ValueError, match="max_batch_size"):
        QZoomAPI(model, max_batch_size=0, **knobs)
    msgs = [_message(i) for i in range(4)]
    run = lambda api: lambda m: api.generate(m, [], "auto", GenerateConfig())  # noqa: E731
    one_by_one = [run(single)(m) for m in msgs]
    sizes: list[int] = []
    original = batched.qz.generate

    def counting(images, questions, **kwargs):
        sizes.append(len(questions))
        return original(images, questions, **kwargs)

    monkeypatch.setattr(batched.qz, "generate", counting)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run(batched), msgs))
    assert sizes == [4]  # one generate call for the four concurrent samples
    for a, b in zip(one_by_one, together):
        assert a.completion == b.completion
        qa, qb = a.metadata["qzoom"], b.metadata["qzoom"]
        assert (qa["batch_size"], qb["batch_size"]) == (1, 4)
        assert qa["box"] == qb["box"] and qa["zoomed"] and qb["zoomed"]
        assert b.message.perf_metrics.latency > 0 and qb["wall_s"] == pytest.approx(qb["batch_wall_s"] / 4)


# ------------------------------------------------------------------------------------------ qzoom eval


def _predictions(out: Path, run: str) -> dict[tuple[str, int], dict]:
    """(file, sample index) -> the prediction row, over every benchmark of ``run``."""
    rows = {}
    for f in sorted((out / "runs" / run / "evalscope").glob("*/predictions/*/*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            rows[(f.name, row["index"])] = row
    return rows


def _eval(args: list[str]) -> str:
    from qzoom_swift import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(args)
    assert rc == 0, buf.getvalue()[-3000:]
    return buf.getvalue()


@pytest.mark.slow
def test_qzoom_eval_batch_4_answers_as_batch_1(tmp_path, tiny_dir, monkeypatch):
    from qzoom_swift.testing.eval_data import write_eval_datasets

    write_eval_datasets(tmp_path / "data", ["docvqa"], n=6)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    base = ["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "zoom:64:tau_gate=0", "--benchmarks", "docvqa",
            "--data-root", str(tmp_path / "data"), "--max-new-tokens", "3", "--device", "cpu"]
    _eval([*base, "--out", str(tmp_path / "b1"), "--eval-batch-size", "1"])
    _eval([*base, "--out", str(tmp_path / "b4"), "--eval-batch-size", "4"])
    one, four = _predictions(tmp_path / "b1", "zoom@64"), _predictions(tmp_path / "b4", "zoom@64")
    assert len(one) == 6 and one.keys() == four.keys()
    for key in one:
        a, b = one[key]["model_output"], four[key]["model_output"]
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"], key
        assert a["metadata"]["qzoom"]["box"] == b["metadata"]["qzoom"]["box"]
    assert {r["model_output"]["metadata"]["qzoom"]["batch_size"] for r in one.values()} == {1}
    assert max(r["model_output"]["metadata"]["qzoom"]["batch_size"] for r in four.values()) > 1  # it did batch

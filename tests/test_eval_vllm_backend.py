"""``qzoom eval --backend vllm`` without vLLM: the model API's vLLM path on a stand-in engine, the engine registry,
the ``--vllm-arg`` rules and the run specs. The real engine runs in tests/vllm_wing/test_vllm_eval.py."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from PIL import Image

from qzoom_swift.eval import vllm_backend
from qzoom_swift.eval.batcher import Batcher

TOO_LONG = "sample 1: its prompt has 9999 tokens, more than the engine's max_model_len=1024"


class FakeEngine:
    """``QZoomVLLM``'s public surface: ``router.config``, ``generate`` (records its batches), ``shutdown``."""

    def __init__(self, *args, **kwargs) -> None:
        from qzoom_swift.config import QZoomConfig

        self.args, self.kwargs = args, kwargs
        self.router = SimpleNamespace(config=QZoomConfig())
        self.calls: list[dict] = []
        self.stopped = False

    def generate(self, images, questions, *, config_overrides=None, max_new_tokens=64, sampling_params=None):
        from qzoom_swift.vllm_plugin.engine import VLLMAnswer
        from qzoom_swift.zoom import ZoomStats

        self.calls.append({"questions": list(questions), "overrides": config_overrides, "max_new": max_new_tokens,
                           "sampling": sampling_params})
        answers = []
        for q in questions:
            if "bad" in q:
                answers.append(VLLMAnswer("", ZoomStats(reason="error"), None, error=TOO_LONG,
                                          failure="prompt_too_long"))
                continue
            if "unreadable" in q:
                answers.append(VLLMAnswer("", ZoomStats(reason="error"), None, error="cannot open",
                                          failure="unreadable_image"))
                continue
            zoomed = "zoom" in q
            st = ZoomStats(zoomed=zoomed, reason="gate" if zoomed else "below_gate", gate_prob=0.9 if zoomed else 0.1,
                           box=(0.25, 0.25, 0.75, 0.5) if zoomed else None, visual_tokens_low=16,
                           visual_tokens_roi=12 if zoomed else 0, prompt_tokens=40, time_pass1_s=0.001,
                           time_pass2_s=0.002 if zoomed else 0.0, time_decode_s=0.01)
            answers.append(VLLMAnswer(f"answer to {q}", st, [5, 6], cached_tokens=32))
        return answers

    def shutdown(self) -> None:
        self.stopped = True


def _message(text: str):
    import base64
    import io

    from evalscope.api.messages import ChatMessageUser, ContentImage, ContentText

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [ChatMessageUser(content=[ContentImage(image=uri), ContentText(text=text)])]


def test_vllm_backend_answers_a_batch_in_one_generate_and_scores_a_failed_sample(monkeypatch):
    from evalscope.api.model import GenerateConfig

    from qzoom_swift.eval.model_api import QZoomAPI

    engine = FakeEngine()
    monkeypatch.setattr(vllm_backend, "load_vllm_engine", lambda *a, **k: (
        engine, Batcher(vllm_backend._batch_runner(engine), name="test-vllm")))
    api = QZoomAPI("/models/m", backend="vllm", engine_args={"max_model_len": 1024}, mode="zoom", tau_gate=0.5,
                   low_max_tokens=512, max_batch_size=4, batch_window_s=2.0, max_new_tokens=3)
    assert api.qz is engine.router and api.effective_config.tau_gate == 0.5
    questions = ["zoom one", "bad two", "plain three", "zoom four"]
    start = threading.Barrier(len(questions))

    def ask(q):
        start.wait()
        return api.generate(_message(q), [], "auto", GenerateConfig())

    with ThreadPoolExecutor(len(questions)) as pool:
        outputs = dict(zip(questions, pool.map(ask, questions)))
    [call] = engine.calls  # the four concurrent samples went to the engine as one batch
    assert sorted(call["questions"]) == sorted(questions)
    assert call["overrides"] == {"mode": "zoom", "tau_gate": 0.5, "low_max_tokens": 512}
    assert call["max_new"] == 3 and call["sampling"] is None  # greedy: QZoomVLLM's default
    zoom = outputs["zoom one"]
    meta = zoom.metadata["qzoom"]
    assert zoom.completion == "answer to zoom one" and zoom.error is None
    assert (meta["backend"], meta["zoomed"], meta["reason"], meta["gate_prob"]) == ("vllm", True, "gate", 0.9)
    assert meta["box"] == (0.25, 0.25, 0.75, 0.5) and meta["visual_tokens"] == 28 and meta["cached_tokens"] == 32
    assert meta["batch_size"] == 4 and meta["mode"] == "zoom" and meta["tau_gate"] == 0.5
    # router share + crop encoding + share of the engine call; prefill and decode are one vLLM call: no ttft
    assert meta["latency_s"] == pytest.approx(0.013) and zoom.message.perf_metrics.latency == pytest.approx(0.013)
    assert zoom.message.perf_metrics.ttft is None
    assert outputs["plain three"].metadata["qzoom"]["zoomed"] is False
    bad = outputs["bad two"]
    assert bad.completion == "" and bad.error == f"prompt_too_long: RuntimeError: {TOO_LONG}"
    bad_meta = bad.metadata["qzoom"]
    assert (bad_meta["failed"], bad_meta["failure"], bad_meta["backend"]) == (True, "prompt_too_long", "vllm")


def test_vllm_backend_stops_after_too_many_failed_samples_in_a_row(monkeypatch):
    from evalscope.api.model import GenerateConfig

    from qzoom_swift.eval.model_api import QZoomAPI
    from qzoom_swift.failures import MAX_CONSECUTIVE_FAILURES

    engine = FakeEngine()
    monkeypatch.setattr(vllm_backend, "load_vllm_engine", lambda *a, **k: (
        engine, Batcher(vllm_backend._batch_runner(engine), name="test-vllm")))
    api = QZoomAPI("/models/m", backend="vllm")
    for _ in range(MAX_CONSECUTIVE_FAILURES):
        assert api.generate(_message("bad"), [], "auto", GenerateConfig()).metadata["qzoom"]["failed"]
        # an unreadable image is the sample's own data: scored as failed, never counted toward the stop
        assert api.generate(_message("unreadable"), [], "auto", GenerateConfig()).metadata["qzoom"]["failure"] == \
            "unreadable_image"
    with pytest.raises(RuntimeError, match="in a row"):  # every prompt too long: a setting, not bad samples
        api.generate(_message("bad"), [], "auto", GenerateConfig())


def test_model_args_refuse_an_unknown_backend_and_engine_args_without_vllm():
    from qzoom_swift.eval.model_api import QZoomAPI

    with pytest.raises(ValueError, match="backend 'sglang'"):
        QZoomAPI("/models/m", backend="sglang")
    with pytest.raises(ValueError, match="engine_args go with backend='vllm'"):
        QZoomAPI("/models/m", engine_args={"max_model_len": 8})


def test_one_engine_per_model_checkpoint_and_dtype_and_all_stop(monkeypatch):
    import qzoom_swift.vllm_plugin.engine as engine_module

    monkeypatch.setattr(engine_module, "QZoomVLLM", FakeEngine)
    monkeypatch.setattr(vllm_backend, "_ENGINES", {})
    a, batcher = vllm_backend.load_vllm_engine("/m", "/ck", "auto", "cpu", {"max_model_len": 512})
    assert vllm_backend.load_vllm_engine("/m", "/ck", "float32", "cpu", {"max_model_len": 512}) == (a, batcher)
    assert a.args == ("/m", "/ck")  # auto on the CPU is float32, for the router and the engine alike
    assert a.kwargs == {"dtype": "float32", "router_device": "cpu", "router_dtype": "float32", "max_model_len": 512}
    b, _ = vllm_backend.load_vllm_engine("/m", None, "float32", "cpu", {"max_model_len": 512})
    c, _ = vllm_backend.load_vllm_engine("/m", "/ck", "bfloat16", "cpu", {"max_model_len": 512})
    assert len({id(a), id(b), id(c)}) == 3 and b.args == ("/m", None) and c.kwargs["dtype"] == "bfloat16"
    assert vllm_backend.shutdown_engines() == 3 and a.stopped and b.stopped and c.stopped
    assert vllm_backend.shutdown_engines() == 0


def test_vllm_args_parse_as_json_and_refuse_what_qzoom_eval_sets():
    assert vllm_backend.engine_args(["max_model_len=8192", "enforce-eager=true", "gpu_memory_utilization=0.85",
                                     "hf_overrides={\"a\": 1}", "kv_cache_dtype=fp8", "max_model_len=4096"]) == {
        "max_model_len": 4096, "enforce_eager": True, "gpu_memory_utilization": 0.85, "hf_overrides": {"a": 1},
        "kv_cache_dtype": "fp8"}
    for bad in ("max_model_len", "=3", "dtype=float16", "checkpoint=/x", "bad key=1"):
        with pytest.raises(ValueError, match="--vllm-arg"):
            vllm_backend.parse_engine_arg(bad)


def test_run_specs_record_the_backend_only_for_vllm(tmp_path):
    from qzoom_swift import cli
    from qzoom_swift.eval.command import build_run_specs
    from qzoom_swift.testing.eval_data import write_eval_datasets

    write_eval_datasets(tmp_path / "data", ["docvqa"], n=1)
    base = ["eval", "--model", str(tmp_path / "m"), "--run", "zoom:64", "--benchmarks", "docvqa", "--data-root",
            str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    parser = cli.build_parser()
    [plain], _ = build_run_specs(parser.parse_args(base))
    [explicit], _ = build_run_specs(parser.parse_args([*base, "--backend", "transformers"]))
    [served], _ = build_run_specs(parser.parse_args([*base, "--backend", "vllm", "--vllm-arg", "max_model_len=2048"]))
    assert "backend" not in plain and plain == explicit  # results stored before --backend stay current
    assert (served["backend"], served["engine_args"]) == ("vllm", {"max_model_len": 2048})
    assert served["benchmarks"]["docvqa"]["fingerprint"] != plain["benchmarks"]["docvqa"]["fingerprint"]
    with pytest.raises(ValueError, match="--vllm-arg goes with --backend vllm"):
        build_run_specs(parser.parse_args([*base, "--vllm-arg", "max_model_len=2048"]))


def test_a_signalled_worker_stops_its_children_even_those_ignoring_sigterm(tmp_path):
    """What a stopped ``qzoom eval --backend vllm`` worker does: its engine's processes (and multiprocessing's
    resource tracker, which ignores SIGTERM) go with it, then it exits with 128 + the signal."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "worker.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from qzoom_swift.eval.vllm_backend import stop_engines_on_signal\n"
        "stop_engines_on_signal()\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)'], "
        "stdout=subprocess.PIPE)\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(worker.stdout.readline()))
        t0 = time.perf_counter()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 128 + signal.SIGTERM
        assert time.perf_counter() - t0 < 15  # within qzoom eval's grace (procs.STOP_GRACE_S)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if worker.poll() is None:
            worker.kill()

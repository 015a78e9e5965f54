"""``qzoom eval --devices``: parallel (run x benchmark) workers, one per device, same results as one at a time."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qzoom_swift.eval.devices import Job, cpu_threads, device_kind, parse_devices, run_on_devices
from qzoom_swift.procs import ChildStopped

# ------------------------------------------------------------------------------------------ the scheduler


def test_parse_devices_and_the_fingerprint_kind():
    assert parse_devices("cuda:0, cuda:1,cuda:2") == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    for bad in ("", "gpu0", "cuda:x", "cuda:0,,tpu"):
        with pytest.raises(ValueError, match="--devices"):
            parse_devices(bad)
    assert device_kind(["cuda:0", "cuda:3"]) == "cuda" and device_kind(["cpu", "cpu"]) == "cpu"
    assert cpu_threads(["cpu", "cpu"], cores=16) == 8 and cpu_threads(["cpu"], cores=16) is None
    assert cpu_threads(["cpu", "cpu", "cpu"], cores=2) == 1 and cpu_threads(["cuda:0", "cuda:1"]) is None


CHILD = """
import json, os, sys, time
start = time.time()
time.sleep(float(sys.argv[2]))
json.dump({"pid": os.getpid(), "start": start, "end": time.time()}, open(sys.argv[1], "w"))
sys.exit(int(sys.argv[3]))
"""


def _launcher(tmp_path: Path, sleep_s: float, fail: set[str]):
    def launch(job: Job, device: str, slot: int) -> subprocess.Popen:
        rc = 3 if job.benchmark in fail else 0
        return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / f"{job.benchmark}.json"), str(sleep_s),
                                 str(rc)])
    return launch


def test_jobs_run_one_per_device_at_a_time_and_a_failure_keeps_the_others(tmp_path):
    jobs = [Job("r", f"b{i}", tmp_path) for i in range(5)]
    polled, ended = [], []
    failed = run_on_devices(jobs, ["cpu", "cpu"], _launcher(tmp_path, 0.6, {"b1"}), poll_s=0.2,
                            on_poll=lambda j: polled.append(j.benchmark), on_exit=lambda j: ended.append(j.benchmark))
    assert failed == [jobs[1]] and jobs[1].returncode == 3
    assert [j.returncode for j in jobs if j is not jobs[1]] == [0, 0, 0, 0]
    runs = [json.loads((tmp_path / f"b{i}.json").read_text()) for i in range(5)]
    assert len({r["pid"] for r in runs}) == 5 and {j.slot for j in jobs} == {0, 1}
    events = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    active = peak = 0
    for _, step in events:
        active += step
        peak = max(peak, active)
    assert peak == 2  # two at once, never three
    assert sorted(ended) == [f"b{i}" for i in range(5)] and set(polled) <= {f"b{i}" for i in range(5)} and polled


def test_a_stop_signal_stops_every_worker(tmp_path):
    jobs = [Job("r", f"b{i}", tmp_path) for i in range(3)]
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(ChildStopped) as stopped:
        run_on_devices(jobs, ["cpu", "cpu"], _launcher(tmp_path, 60, set()), poll_s=0.2)
    assert stopped.value.code == 128 + signal.SIGTERM and time.monotonic() - t0 < 15
    assert jobs[2].pid is None  # the queued job never started
    for job in jobs[:2]:
        with pytest.raises(ProcessLookupError):
            os.kill(job.pid, 0)  # reaped, not left running


# ------------------------------------------------------------------------------------------ qzoom eval


def _eval(args: list[str], expect: int = 0) -> tuple[str, str]:
    from qzoom_swift import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(args)
    assert rc == expect, (out.getvalue()[-3000:], err.getvalue()[-3000:])
    return out.getvalue(), err.getvalue()


def _answers(out: Path, run: str, bench: str) -> dict[int, str]:
    rows = {}
    for f in (out / "runs" / run / "evalscope" / bench).glob("predictions/*/*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            rows[(f.name, row["index"])] = row["model_output"]["choices"][0]["message"]["content"]
    return rows


@pytest.mark.slow
def test_qzoom_eval_on_two_cpu_workers_matches_a_sequential_run(tmp_path, tiny_dir, monkeypatch):
    from qzoom_swift.testing.eval_data import write_eval_datasets

    benches, runs = ("docvqa", "vstar_bench"), ("baseline@64", "zoom@64")
    write_eval_datasets(tmp_path / "data", benches, n=2, hr_size=(448, 336))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    base = ["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "baseline:64", "--run", "zoom:64:tau_gate=0",
            "--benchmarks", ",".join(benches), "--data-root", str(tmp_path / "data"), "--max-new-tokens", "2",
            "--progress-interval", "0.5"]
    seq, par = tmp_path / "seq", tmp_path / "par"
    _eval([*base, "--out", str(seq), "--device", "cpu"])
    stdout, _ = _eval([*base, "--out", str(par), "--devices", "cpu,cpu"])
    workers = []
    for run in runs:
        for bench in benches:
            a = json.loads((seq / "runs" / run / "bench" / f"{bench}.json").read_text())
            b = json.loads((par / "runs" / run / "bench" / f"{bench}.json").read_text())
            assert a["fingerprint"] == b["fingerprint"]  # the same result key: either run resumes the other
            for k in ("score", "samples", "zoom_rate", "visual_tokens_mean"):
                assert a["result"][k] == b["result"][k], (run, bench, k)
            assert _answers(seq, run, bench) == _answers(par, run, bench) != {}
            workers.append(b["worker"])
            assert (par / "runs" / run / "jobs" / bench / "log.txt").is_file()
    assert len({w["pid"] for w in workers}) == 4 and {w["slot"] for w in workers} == {0, 1}
    assert {w["device"] for w in workers} == {"cpu"}
    assert any(w["started"] < v["finished"] and v["started"] < w["finished"]
               for i, w in enumerate(workers) for v in workers[i + 1:])  # two workers ran at the same time
    progress = [m for m in (re.search(r"^\[qzoom eval\] (\S+) on cpu#(\d): (\w+) \(1/1\) (\d+)/(\d+) samples", line)
                            for line in stdout.splitlines()) if m]
    assert {m.group(2) for m in progress} == {"0", "1"}, stdout  # per-worker samples done / total
    assert all(int(m.group(4)) <= int(m.group(5)) for m in progress)
    summary = json.loads((par / "summary.json").read_text())
    assert [r["run"] for r in summary["rows"]] == list(runs) and not list(par.glob(".summary*"))
    # the sequential command finds the parallel run's results current
    stdout, _ = _eval([*base, "--out", str(par), "--device", "cpu"])
    assert all(f"{run}: stored results are current, skipped" in stdout for run in runs)


@pytest.mark.slow
def test_a_failing_worker_keeps_the_other_results(tmp_path, tiny_dir, monkeypatch):
    from qzoom_swift.testing.eval_data import write_eval_datasets

    write_eval_datasets(tmp_path / "data", ("docvqa", "chartqa"), n=2)
    for f in (tmp_path / "data" / "chartqa").rglob("*.parquet"):
        f.write_bytes(b"not a parquet file")  # passes the layout check, fails in the worker
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "out"
    stdout, stderr = _eval(["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "baseline:64",
                            "--benchmarks", "chartqa,docvqa", "--data-root", str(tmp_path / "data"),
                            "--max-new-tokens", "2", "--out", str(out), "--devices", "cpu,cpu"], expect=1)
    assert "baseline@64/chartqa: FAILED" in stderr and "baseline@64/docvqa: done" in stdout
    assert (out / "runs" / "baseline@64" / "bench" / "docvqa.json").is_file()
    assert not (out / "runs" / "baseline@64" / "bench" / "chartqa.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"][0]["run"] == "baseline@64" and "docvqa" in (out / "summary.md").read_text().lower()

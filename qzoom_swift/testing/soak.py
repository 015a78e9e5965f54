"""Sustained load on a ``swift deploy`` of a ``qzoom_*`` model (issue 29 item 6), loopback only, bounded in count
and time: a seeded mixed stream of zoomed, direct, text-only, corrupt-image and over-long requests, several in
flight, each checked against what it must give.

- ``zoom`` / ``direct``: one fixed image request each, which the gate zooms / answers directly. The server
  loads a branch checkpoint recorded as trained (so mode ``zoom`` follows the gate), and ``tau_gate`` is put
  half-way between the two requests' gate probabilities as a first server measured them (``calibrate``).
- ``text``: no image (``direct(no_image)``).
- ``corrupt``: a truncated JPEG; must fail alone with HTTP 400 naming ``messages[0].content[1] (image)``.
- ``too_long``: a question past ``--max_length``; must fail alone with HTTP 400 naming ``max_length``.

An answered request must equal its kind's reference answer (asked alone before the load starts): batching
may not change an answer. Every other outcome (an error, a timeout, another answer) counts as unexpected.
The server's decisions (``qzoom:`` log lines) must match the kinds sent. Resident memory is the server's
process tree (launcher and model process), sampled after the references and after the last request.
"""

from __future__ import annotations

import base64
import io
import random
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qzoom_swift.testing.serving import (
    answer_text,
    chat_status,
    start_swift_deploy,
    stop_process_tree,
    wait_for_models,
)

KINDS = ("zoom", "direct", "text", "corrupt", "too_long")
WEIGHTS = (3, 3, 2, 1, 1)
"""Share of each kind in the stream."""
EXPECTED_ERRORS = {"corrupt": ("messages[0].content[1] (image)", "image file is truncated"),
                   "too_long": ("max_length",)}
"""The kinds that must fail, and what their HTTP 400 message must contain."""
DECISIONS = {"zoom": "zoom(gate)", "direct": "direct(below_gate)", "text": "direct(no_image)"}
"""The server's logged decision for each kind that is answered."""
MAX_LENGTH = 1024
"""``--max_length`` of the soak server; ``too_long`` questions are about twice that."""
CANDIDATES = [((200, 30, 30), (320, 240), "What colour is it?"),
              ((30, 160, 60), (240, 360), "Which colour is the shape?"),
              ((40, 40, 200), (400, 300), "Name the colour of the shape."),
              ((220, 200, 20), (300, 300), "Is there a shape? Answer yes or no."),
              ((120, 40, 160), (448, 336), "What is in the picture?"),
              ((20, 20, 20), (336, 224), "Describe the image in one word.")]
"""(colour, size, question) image requests among which ``calibrate`` picks the zoomed and the direct one."""


@dataclass
class SoakSpec:
    requests: int = 500
    """Requests to send at most."""
    max_seconds: float = 600.0
    """No request is sent after this many seconds of load (those in flight finish)."""
    concurrency: int = 6
    """Requests in flight."""
    seed: int = 0
    """Seeds the request mix and the fresh branches (hence the gate probabilities)."""
    max_new_tokens: int = 4
    request_timeout: float = 300.0


@dataclass
class SoakReport:
    spec: dict
    sent: int = 0
    answered: int = 0
    failed_as_expected: int = 0
    failed_unexpectedly: int = 0
    by_kind: dict = field(default_factory=dict)
    """kind -> {"sent", "ok" (as expected), "p50_s"}."""
    unexpected: list = field(default_factory=list)
    """Up to 20 (kind, what happened) pairs."""
    p50_s: float = 0.0
    p95_s: float = 0.0
    wall_s: float = 0.0
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_samples_mib: list = field(default_factory=list)
    """(requests done, server RSS) every 50 requests: growth that does not level off shows here."""
    decisions: dict = field(default_factory=dict)
    """Logged decision -> count during the load; must equal the answered kinds' counts."""
    batch_sizes: dict = field(default_factory=dict)
    """Samples per ``zoom_generate`` call -> number of calls during the load (the batches the engine formed)."""
    tau_gate: float = 0.0
    gate_probs: dict = field(default_factory=dict)
    """The calibration's gate probability of the zoomed and the direct request."""

    @property
    def ok(self) -> bool:
        return self.failed_unexpectedly == 0 and self.sent > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (320, 240)) -> bytes:
    from PIL import Image

    image = Image.new("RGB", size, (235, 235, 235))
    w, h = size
    image.paste(Image.new("RGB", (w // 3, h // 3), colour), (w // 4, h // 3))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _truncated_jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) * 6 // 10]


def _image_content(data: bytes, question: str, kind: str = "png") -> list:
    uri = f"data:image/{kind};base64," + base64.b64encode(data).decode()
    return [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": uri}}]


def _candidate_content(index: int) -> list:
    colour, size, question = CANDIDATES[index]
    return _image_content(png_bytes(colour, size), question)


def contents(zoom_index: int, direct_index: int) -> dict[str, list | str]:
    """The request content of each kind."""
    return {"zoom": _candidate_content(zoom_index), "direct": _candidate_content(direct_index),
            "text": "Say a colour.",
            "corrupt": _image_content(_truncated_jpeg(0), "What colour is it?", "jpeg"),
            "too_long": _image_content(png_bytes((200, 30, 30), (320, 240)),
                                       "What colour is it? " + "zoom " * (2 * MAX_LENGTH))}


def _calls(log: Path, skip_lines: int = 0) -> list[list[str]]:
    """The per-sample decisions (``zoom(gate) p=...``, ``direct(below_gate) ...``) of every logged
    ``zoom_generate`` call, one list per call."""
    lines = log.read_text(errors="replace").splitlines()[skip_lines:]
    return [line.split("qzoom: ", 1)[1].split("; ") for line in lines if "qzoom: " in line]


def _decisions(log: Path, skip_lines: int = 0) -> list[str]:
    return [d for call in _calls(log, skip_lines) for d in call]


def _log_lines(log: Path) -> int:
    return len(log.read_text(errors="replace").splitlines())


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants, MiB."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def write_checkpoint(model_dir: str | Path, out: Path, seed: int = 0) -> Path:
    """The tiny model's fresh branches saved as a checkpoint recorded as trained: mode ``zoom`` follows its gate.

    The gate head starts random: ``seed`` fixes it, so a rerun measures the same gate probabilities.
    """
    import torch

    from qzoom_swift.branches import mark_trained_branches
    from qzoom_swift.config import BRANCH_NAMES
    from qzoom_swift.model import QZoomModel

    torch.manual_seed(seed)
    qz = QZoomModel.from_pretrained(str(model_dir))
    mark_trained_branches(qz.model, BRANCH_NAMES)
    qz.save_branches(out)
    return out


def _deploy(model_dir, workdir: Path, checkpoint: Path, tau_gate: float, extra_env: dict | None = None):
    knobs = {"QZOOM_MODE": "zoom", "QZOOM_TAU_GATE": tau_gate, "QZOOM_TAU_ROI": 0.0,
             "QZOOM_LOW_MIN_TOKENS": 16, "QZOOM_LOW_MAX_TOKENS": 64,
             "QZOOM_ROI_MIN_TOKENS": 16, "QZOOM_ROI_MAX_TOKENS": 64}
    return start_swift_deploy(model_dir, workdir, knobs, "--adapters", str(checkpoint), "--max_batch_size", "8",
                              "--max_length", str(MAX_LENGTH), env_extra=extra_env)


def calibrate(model_dir, workdir: Path, checkpoint: Path, max_new_tokens: int) -> tuple[int, int, dict[int, float]]:
    """Gate probability of every candidate on a server that zooms at any probability (tau_gate 0); returns the
    (highest, lowest) candidate and the probabilities."""
    proc, base, log = _deploy(model_dir, workdir, checkpoint, 0.0)
    try:
        name = wait_for_models(base, proc)
        if not name:
            raise RuntimeError(f"calibration server did not start:\n{log.read_text(errors='replace')[-3000:]}")
        probs = {}
        for i in range(len(CANDIDATES)):
            skip = _log_lines(log)
            code, body = chat_status(base, name, _candidate_content(i), max_new_tokens)
            if code != 200:
                raise RuntimeError(f"calibration request {i} failed: {code} {body}")
            time.sleep(0.2)
            found = [re.search(r" p=([0-9.eE+-]+)", d) for d in _decisions(log, skip)]
            if len(found) != 1 or found[0] is None:
                raise RuntimeError(f"calibration request {i}: expected one qzoom decision with p=, got {found}")
            probs[i] = float(found[0].group(1))
    finally:
        stop_process_tree(proc)
    high, low = max(probs, key=probs.get), min(probs, key=probs.get)
    if probs[high] - probs[low] < 1e-3:
        raise RuntimeError(f"the candidates' gate probabilities are too close to split: {probs}")
    return high, low, probs


def _check(kind: str, code: int, body: dict, reference: dict[str, str]) -> str | None:
    """None when the outcome is the one ``kind`` must give, else what happened instead."""
    if kind in EXPECTED_ERRORS:
        message = str(body.get("message", body))
        if code == 400 and all(part in message for part in EXPECTED_ERRORS[kind]):
            return None
        return f"HTTP {code}: {message[:300]}"
    if code != 200:
        return f"HTTP {code}: {str(body)[:300]}"
    text = answer_text(body)
    return None if text == reference[kind] else f"answer {text!r} != reference {reference[kind]!r}"


def _tally(report: SoakReport, results: list[tuple[str, float, str | None]], decisions: list[str]) -> None:
    """Fill ``report`` from the (kind, seconds, problem) of every request and the server's logged decisions."""
    latencies = [s for _, s, _ in results]
    report.sent = len(results)
    if not results:
        return
    report.p50_s = statistics.median(latencies)
    report.p95_s = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]
    for kind in KINDS:
        mine = [(s, p) for k, s, p in results if k == kind]
        report.by_kind[kind] = {"sent": len(mine), "ok": sum(p is None for _, p in mine),
                                "p50_s": round(statistics.median([s for s, _ in mine]), 3) if mine else None}
    for kind, _, problem in results:
        if problem is not None:
            report.failed_unexpectedly += 1
            if len(report.unexpected) < 20:
                report.unexpected.append((kind, problem))
        elif kind in EXPECTED_ERRORS:
            report.failed_as_expected += 1
        else:
            report.answered += 1
    report.decisions = {d: decisions.count(d) for d in sorted(set(decisions))}
    wanted = {DECISIONS[k]: report.by_kind[k]["ok"] for k in DECISIONS if report.by_kind[k]["ok"]}
    if report.decisions != wanted:  # e.g. a corrupt request that reached the model, or a kind decided otherwise
        report.failed_unexpectedly += 1
        report.unexpected.append(("server decisions", f"logged {report.decisions}, expected {wanted}"))


def run_soak(model_dir: str | Path, workdir: Path, spec: SoakSpec, log=print) -> SoakReport:
    """Calibrate, start the soak server, send the stream, stop the server; the report says what happened."""
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint(model_dir, workdir / "branches", spec.seed)
    high, low, probs = calibrate(model_dir, workdir, checkpoint, spec.max_new_tokens)
    tau = (probs[high] + probs[low]) / 2
    log(f"calibration: zoom request p={probs[high]:.4f}, direct request p={probs[low]:.4f}, tau_gate={tau:.4f}")
    report = SoakReport(spec=asdict(spec), tau_gate=tau, gate_probs={"zoom": probs[high], "direct": probs[low]})
    content = contents(high, low)
    proc, base, server_log = _deploy(model_dir, workdir, checkpoint, tau)
    try:
        name = wait_for_models(base, proc)
        if not name:
            raise RuntimeError(f"soak server did not start:\n{server_log.read_text(errors='replace')[-3000:]}")
        reference = {}
        for kind in DECISIONS:  # asked alone: the answers batching must not change (and the warm-up)
            code, body = chat_status(base, name, content[kind], spec.max_new_tokens, spec.request_timeout)
            if code != 200:
                raise RuntimeError(f"reference request {kind!r} failed: {code} {body}")
            reference[kind] = answer_text(body)
        time.sleep(0.3)
        skip = _log_lines(server_log)
        report.rss_start_mib = tree_rss_mib(proc.pid)
        rng = random.Random(spec.seed)
        stream = rng.choices(KINDS, weights=WEIGHTS, k=spec.requests)
        lock = threading.Lock()
        results: list[tuple[str, float, str | None]] = []
        position = iter(range(spec.requests))
        t0 = time.monotonic()

        def worker() -> None:
            while True:
                with lock:
                    i = next(position, None)
                if i is None or time.monotonic() - t0 > spec.max_seconds:
                    return
                kind = stream[i]
                start = time.monotonic()
                try:
                    code, body = chat_status(base, name, content[kind], spec.max_new_tokens, spec.request_timeout)
                    problem = _check(kind, code, body, reference)
                except Exception as exc:  # a timeout or a dropped connection is an unexpected failure
                    problem = f"{type(exc).__name__}: {exc}"
                with lock:
                    results.append((kind, time.monotonic() - start, problem))
                    if len(results) % 50 == 0:
                        report.rss_samples_mib.append((len(results), round(tree_rss_mib(proc.pid))))
                        log(f"  {len(results)} requests, {time.monotonic() - t0:.0f} s, "
                            f"server RSS {report.rss_samples_mib[-1][1]} MiB")

        with ThreadPoolExecutor(spec.concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(spec.concurrency)]:
                future.result()
        report.wall_s = time.monotonic() - t0
        time.sleep(0.5)
        report.rss_end_mib = tree_rss_mib(proc.pid)
        calls = _calls(server_log, skip)
        decisions = [d.split(" ", 1)[0] for call in calls for d in call]
        sizes = [len(call) for call in calls]
        report.batch_sizes = {n: sizes.count(n) for n in sorted(set(sizes))}
    finally:
        stop_process_tree(proc)
    _tally(report, results, decisions)
    return report


def format_report(report: SoakReport) -> str:
    """The report's lines for a terminal."""
    lines = [f"sent {report.sent} requests in {report.wall_s:.1f} s ({report.spec['concurrency']} in flight): "
             f"answered {report.answered}, failed as expected {report.failed_as_expected}, "
             f"failed unexpectedly {report.failed_unexpectedly}",
             f"latency p50 {report.p50_s:.2f} s, p95 {report.p95_s:.2f} s",
             f"server RSS (launcher + model process) {report.rss_start_mib:.0f} MiB at start, "
             f"{report.rss_end_mib:.0f} MiB at end ({report.rss_end_mib - report.rss_start_mib:+.0f} MiB)",
             f"server RSS every 50 requests (done, MiB): {report.rss_samples_mib}",
             f"zoom_generate calls by batch size: {report.batch_sizes}",
             f"server decisions {report.decisions}; tau_gate {report.tau_gate:.4f} between p "
             f"{report.gate_probs['direct']:.4f} (direct) and {report.gate_probs['zoom']:.4f} (zoom)"]
    lines += [f"  {kind:9s} sent {v['sent']:4d}  as expected {v['ok']:4d}  p50 {v['p50_s']} s"
              for kind, v in report.by_kind.items()]
    lines += [f"  UNEXPECTED {kind}: {problem}" for kind, problem in report.unexpected]
    return "\n".join(lines)

"""Test helpers for the tests that start ``swift deploy`` on loopback: start and stop the server, a free port,
readiness, JSON posts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_models(base: str, proc: subprocess.Popen, timeout: float = 300, poll_s: float = 0.5) -> str | None:
    """The served model's name once ``BASE/v1/models`` answers; None when the server exited or timed out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as resp:
                return json.loads(resp.read())["data"][0]["id"]
        except OSError:
            time.sleep(poll_s)
    return None


def post_json(url: str, payload: dict, timeout: float = 120) -> dict:
    """POST ``payload`` as JSON and return the decoded answer (HTTP errors raise)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def chat_status(base: str, name: str, content: list | str, max_tokens: int = 3,
                timeout: float = 180) -> tuple[int, dict]:
    """One greedy ``/v1/chat/completions`` request; (HTTP status, decoded body) whatever the status (a body that is
    not JSON comes back as ``{"text": ...}``)."""
    import urllib.error

    payload = {"model": name, "max_tokens": max_tokens, "temperature": 0,
               "messages": [{"role": "user", "content": content}]}
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            return exc.code, json.loads(body)
        except json.JSONDecodeError:
            return exc.code, {"text": body}


def answer_text(body: dict) -> str:
    """The assistant's text of a chat completion body."""
    return body["choices"][0]["message"]["content"]


def start_swift_deploy(model_dir: str | Path, workdir: Path, model_kwargs: dict, *extra_args: str,
                       model_type: str = "qzoom_qwen2_5_vl",
                       env_extra: dict | None = None) -> tuple[subprocess.Popen, str, Path]:
    """``swift deploy`` with the plugin on loopback, output to ``workdir/deploy-<port>.log``; returns (launcher
    process, base url, log path). ``model_kwargs`` are the ``QZOOM_*`` settings (``--model_kwargs``)."""
    from qzoom_swift.bench.sft import swift_executable
    from qzoom_swift.swift_plugin import plugin_path

    port = free_port()
    log = workdir / f"deploy-{port}.log"
    env = dict(os.environ, MODELSCOPE_CACHE=str(workdir / "ms"), OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [str(swift_executable()), "deploy", "--external_plugins", plugin_path(), "--model", str(model_dir),
           "--model_type", model_type, "--host", "127.0.0.1", "--port", str(port),
           "--model_kwargs", json.dumps(model_kwargs), *extra_args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", log


def stop_process_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher, kill it after 30 s, then wait for (or kill) the children it had: a test leaves
    nothing running even when the shutdown under test fails."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for kid in kids:
        try:
            kid.wait(timeout=15)
        except psutil.TimeoutExpired:
            kid.kill()
        except psutil.NoSuchProcess:
            pass

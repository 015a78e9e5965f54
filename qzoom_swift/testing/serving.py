"""Test helpers for the tests that start ``swift deploy`` on loopback: a free port, readiness, JSON posts."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request


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

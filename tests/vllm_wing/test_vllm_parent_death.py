"""vLLM's engine processes stop with the process that started them, also when it is killed with SIGKILL (vLLM's
engine core would outlive it, and its workers with it; the entry point's ``register`` watches the parent)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_MAIN = """
import json, os, time
if __name__ == "__main__":
    import psutil
    from qzoom_swift.vllm_plugin.engine import QZoomVLLM
    engine = QZoomVLLM({model!r}, dtype="float32", enforce_eager=True, max_model_len=1024)
    print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
    time.sleep(600)
"""


def test_a_killed_parent_leaves_no_engine_process(tiny_dir, tmp_path):
    import psutil

    from qzoom_swift.vllm_plugin.engine import plugin_installed

    assert plugin_installed()  # else the engine runs in-process and there is nothing to watch
    script = tmp_path / "main.py"
    script.write_text(_MAIN.format(model=str(tiny_dir("qwen2_5_vl"))))
    log = tmp_path / "main.log"
    with open(log, "wb") as err:
        main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = main.stdout.readline()
        assert line.strip(), log.read_text(errors="replace")[-3000:]
        kids = [psutil.Process(pid) for pid in json.loads(line)]
        assert any("EngineCore" in p.name() for p in kids), [p.name() for p in kids]
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=30)
        gone, alive = psutil.wait_procs(kids, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        main.kill()
        for p in psutil.Process().children(recursive=True):
            p.kill()

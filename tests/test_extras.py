"""A missing optional dependency is an error naming the extra to install, raised where the command starts."""

from __future__ import annotations

import importlib.util

import pytest

from qzoom_swift.cli import main
from qzoom_swift.extras import EXTRAS, require_extra


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_every_extra_module_is_installed_in_the_locked_environment():
    for extra, modules in EXTRAS.items():
        if extra == "llamafactory":  # its own environment (.venv-lf): it cannot share one with ms-swift
            assert importlib.util.find_spec("llamafactory.cli") is None
            continue
        if extra == "vllm":  # its own environment (.venv-vllm): vLLM pins another torch
            continue
        require_extra(extra, f"the {extra} extra")  # raises if the lock lost one
        assert all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.parametrize("argv,module,extra", [
    (["export-onnx", "--checkpoint", "c", "--model", "m", "--out", "o"], "onnxscript", "onnx"),
    (["eval", "--model", "m", "--data-root", "d", "--run", "baseline:64", "--out", "o"], "evalscope", "eval"),
    (["demo", "--preset", "quick", "--out", "o"], "swift", "swift"),
    (["pseudo-labels", "--model", "m", "--dataset", "owner/name", "--out", "o"], "swift", "swift"),
])
def test_commands_name_the_extra_when_a_module_is_missing(monkeypatch, capsys, tmp_path, argv, module, extra):
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, module)
    assert main(argv) == 1  # the job stops at its start, with the one line that fixes it and no traceback
    err = capsys.readouterr().err
    assert f"{module}: pip install 'qzoom_swift[{extra}]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_onnx_router_names_the_extra(monkeypatch, tmp_path):
    from qzoom_swift.onnx.router import OnnxRouter

    _hide(monkeypatch, "onnxruntime")
    with pytest.raises(ImportError, match=r"QZOOM_ROUTER=onnx\) needs onnxruntime: pip install 'qzoom_swift\[onnx\]'"):
        OnnxRouter(tmp_path)


def test_qzoom_vllm_names_the_vllm_extra(monkeypatch):
    from qzoom_swift.extras import MissingExtraError
    from qzoom_swift.vllm_plugin import QZoomVLLM

    _hide(monkeypatch, "vllm")
    with pytest.raises(MissingExtraError, match=r"needs vllm: pip install 'qzoom_swift\[vllm\]'"):
        QZoomVLLM("any/model")  # before loading anything


def test_qzoom_eval_backend_vllm_says_what_to_install_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, "vllm")  # as in the main .venv, which has no vLLM (it pins another torch)
    argv = ["eval", "--backend", "vllm", "--model", "m", "--data-root", "d", "--run", "baseline:64", "--out", "o"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out, captured
    assert lines[0].startswith("qzoom eval: error: qzoom eval --backend vllm needs vllm: pip install "
                               "'qzoom_swift[vllm]'; in this checkout run it with .venv-vllm/bin/qzoom"), lines
    assert "make venv-vllm" in lines[0] and not (tmp_path / "o").exists()

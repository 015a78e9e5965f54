"""One model loader: every model-loading subcommand takes --device / --dtype / --attn-implementation with one
meaning, and the model it loads has the device, dtype and attention asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qzoom_swift import loading
from qzoom_swift.cli import build_parser, main
from qzoom_swift.loading import EAGER_TEXT, LoadSettings, ModelLoadError, resolve_load
from qzoom_swift.synthetic.images import write_shape_dataset

MODEL_COMMANDS = ("pseudo-labels", "gate-labels", "calibrate-gate", "mine-hard", "visualize", "export-onnx", "eval")


def _subparser(name: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


def _option(parser, flag: str):
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_every_model_command_has_the_three_flags_with_one_meaning(name):
    parser = _subparser(name)
    device, dtype, attn = (_option(parser, f) for f in ("--device", "--dtype", "--attn-implementation"))
    assert "cuda:N" in device.help and "bfloat16 on GPU, float32 on CPU" in dtype.help
    assert set(dtype.choices or ()) >= {"auto", "bfloat16", "float16", "float32"}
    assert set(attn.choices or ()) >= {"auto", "eager", "sdpa", "flash_attention_2"}
    expected = ("cpu", "float32") if name == "export-onnx" else ("auto", "auto")
    assert (device.default, dtype.default) == expected


def test_resolution_rules_on_this_cpu_machine():
    plain = resolve_load(LoadSettings("cpu"))  # auto dtype on the CPU: float32; auto attention: sdpa
    assert (plain.device, plain.dtype, plain.attn_implementation) == ("cpu", torch.float32, "sdpa")
    bf16 = resolve_load(LoadSettings("cpu", "bfloat16", "eager"))
    assert (bf16.dtype, bf16.attn_implementation) == (torch.bfloat16, "eager")
    forced = resolve_load(LoadSettings("cpu", attn_implementation="sdpa"), reads_attention=True)
    assert forced.attn_implementation == EAGER_TEXT and "reads attention weights" in forced.note
    assert forced.describe() == ("device cpu, dtype float32, attention text eager, vision sdpa (--attn-implementation "
                                 "sdpa ignored in the language model: this job reads attention weights)")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device.*--device cpu"):
            resolve_load(LoadSettings("cuda:1"))
    with pytest.raises(ModelLoadError, match="use auto, cpu, cuda or cuda:N"):
        resolve_load(LoadSettings("tpu"))
    with pytest.raises(ModelLoadError, match="flash"):
        resolve_load(LoadSettings(attn_implementation="flash_attention_2"))


class _Loaded(Exception):
    """Raised right after the real load, so each command is checked without running its whole job."""


@pytest.fixture
def record_loads(monkeypatch):
    seen: list[tuple[str, torch.dtype, object]] = []
    real = loading.load_model

    def recording(*args, **kwargs):
        model, processor = real(*args, **kwargs)
        text = model.config.get_text_config()
        seen.append((*loading.loaded_settings(model), text._attn_implementation))
        raise _Loaded

    monkeypatch.setattr(loading, "load_model", recording)
    return seen


@pytest.fixture(scope="module")
def workspace(tiny_dir, tmp_path_factory) -> dict[str, str]:
    """A tiny model, a dataset, a branch checkpoint and a pseudo-label shard: what the commands read."""
    from transformers import AutoModelForImageTextToText

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.checkpoint import save_branch_checkpoint

    root = tmp_path_factory.mktemp("loading")
    model_dir = str(tiny_dir("qwen2_5_vl"))
    data = write_shape_dataset(root / "data", n=2, size=(392, 280), seed=0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    attach_branches(model)
    ckpt = save_branch_checkpoint(model, root / "ckpt")
    shard = root / "pl" / "shard-00000.jsonl"
    shard.parent.mkdir()
    row = json.loads(data.read_text().splitlines()[0])
    shard.write_text(json.dumps({"qzoom_id": "0-x", "qzoom_status": "ok", **row, "qzoom_attn": [[0.0] * 14] * 10,
                                 "qzoom_attn_grid": [10, 14], "qzoom_answer": "a"}) + "\n")
    (root / "pl" / "job.json").write_text(json.dumps({"settings": {"model": model_dir, "dataset": str(data)}}))
    traj = root / "traj"
    traj.mkdir()
    (traj / "shard-00000.jsonl").write_text(json.dumps({"qzoom_id": "0-x", "qzoom_status": "ok", **row,
                                                        "qzoom_budgets": [16, 36], "qzoom_correct": [False, True]})
                                           + "\n")
    return {"model": model_dir, "data": str(data), "ckpt": str(ckpt), "shard": str(shard), "traj": str(traj),
            "root": str(root)}


def _argv(name: str, w: dict[str, str], out: Path) -> list[str]:
    m, d = ["--model", w["model"]], ["--dataset", w["data"]]
    return {
        "pseudo-labels": ["pseudo-labels", *m, *d, "--out", str(out), "--heads", "5:0", "--no-progress"],
        "gate-labels": ["gate-labels", *m, *d, "--out", str(out), "--budgets", "16,36", "--no-progress"],
        "calibrate-gate": ["calibrate-gate", *m, "--checkpoint", w["ckpt"], "--trajectories", w["traj"],
                           "--target-skip", "0.5"],
        "mine-hard": ["mine-hard", *m, "--checkpoint", w["ckpt"], *d, "--out", str(out), "--no-progress"],
        "visualize": ["visualize", "--shard", w["shard"], "--checkpoint", w["ckpt"], "--out", str(out / "v.png")],
        "export-onnx": ["export-onnx", *m, "--checkpoint", w["ckpt"], "--out", str(out)],
    }[name]


@pytest.mark.parametrize("name", [c for c in MODEL_COMMANDS if c != "eval"])
def test_each_command_loads_the_model_as_asked(name, workspace, record_loads, tmp_path):
    argv = [*_argv(name, workspace, tmp_path / "out"), "--device", "cpu", "--dtype", "bfloat16",
            "--attn-implementation", "eager"]
    with pytest.raises(_Loaded):
        main(argv)
    assert record_loads == [("cpu", torch.bfloat16, "eager")]
    # and the defaults: float32 on this CPU, sdpa (pseudo-labels reads attention weights: eager, said aloud)
    record_loads.clear()
    with pytest.raises(_Loaded):
        main(_argv(name, workspace, tmp_path / "out2"))
    assert record_loads == [("cpu", torch.float32, "eager" if name == "pseudo-labels" else "sdpa")]


def test_eval_loads_through_the_same_loader(workspace, record_loads):
    from qzoom_swift.eval.model_api import load_qzoom_model

    with pytest.raises(_Loaded):
        load_qzoom_model(workspace["model"], workspace["ckpt"], dtype="bfloat16", device="cpu",
                         attn_implementation="eager")
    assert record_loads == [("cpu", torch.bfloat16, "eager")]


def test_the_choice_is_logged_once(workspace, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="qzoom_swift.loading"):
        loading.load_model(workspace["model"], LoadSettings("cpu", "bfloat16"), processor=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "qzoom_swift.loading"]
    assert len(lines) == 1 and "device cpu, dtype bfloat16, attention sdpa" in lines[0]

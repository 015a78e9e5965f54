"""`qzoom demo --set trainer=llamafactory`: stages 1 and 3 of the zoom bench trained by LLaMA-Factory.

The quick preset end to end (slow): the RPN and the gate train under the real ``llamafactory-cli train`` in the
LLaMA-Factory environment (.venv-lf, built by ``make test``; missing, the demo fails naming ``make venv-lf``: this
test never skips), their outputs convert back to branch checkpoints that calibration and evaluation read, and the
report names the trainer. Without a run: the setting's validation, the environment's error, and the cache keys
(the trainer joins the keys of the two training stages only, so a swift run's bench, toy and labels are reused).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qzoom_swift.bench import demo
from qzoom_swift.bench.lf_train import lf_environment
from qzoom_swift.bench.settings import demo_config

TRAINING = {"rpn_train": ("stage1", ["rpn"]), "gate_train": ("stage3", ["rpn", "gate"])}


@pytest.fixture(scope="module")
def lf_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_lf") / "run"
    cmd = [sys.executable, "-m", "qzoom_swift.cli", "demo", "--preset", "quick", "--out", str(out),
           "--set", "trainer=llamafactory"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=1800, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_stages_1_and_3_ran_through_llamafactory_cli(lf_demo):
    out, res, summary = lf_demo
    assert summary["trainer"]["name"] == "llamafactory" and summary["trainer"]["command"] == "llamafactory-cli"
    assert summary["trainer"]["versions"]["llamafactory"] == "0.9.5"
    for name, (folder, _) in TRAINING.items():
        st = summary["stages"][name]
        o = st["outputs"]
        assert st["title"].endswith("(llamafactory-cli)") and st["line"].startswith("llamafactory-cli recipes/llamafactory/toy/")
        assert any(line.startswith(f"[{4 if name == 'rpn_train' else 6}/9] {st['title']}") for line in res.stdout.splitlines())
        assert o["trainer"] == "llamafactory" and o["log"] == str(out / folder / "lf" / "train.log")
        log = Path(o["log"]).read_text()
        assert "llamafactory" in log and "trainable params" in log  # LLaMA-Factory's own log lines
        logged = [json.loads(line) for line in Path(o["trainer_log"]).read_text().splitlines()]
        assert Path(o["trainer_log"]).parent == out / folder / "lf" / "train"
        assert logged[0]["current_steps"] == 1 and o["loss_first"] == logged[0]["loss"]  # logging_first_step
        assert o["loss_last"] is not None
        swift_rows = o["rows"] if name == "rpn_train" else len(Path(o["dataset"]).read_text().splitlines())
        assert o["exported_rows"] == swift_rows > 0 and o["rejected_rows"] == 0  # every row the swift path trains on
        # the stage records its trainer and LLaMA-Factory recipe in its cache key
        assert st["key"]["trainer"] == "llamafactory" and st["key"]["lf_recipe"]
    for name in ("bench", "toy_base", "pseudo_labels", "gate_labels"):
        assert "trainer" not in summary["stages"][name]["key"]


@pytest.mark.slow
def test_the_checkpoints_are_branch_checkpoints_read_downstream(lf_demo):
    out, _, summary = lf_demo
    ckpts = {}
    for name, (folder, trained) in TRAINING.items():
        o = summary["stages"][name]["outputs"]
        ckpt = Path(o["checkpoint"])
        assert ckpt == out / folder / "lf" / "branches" and o["trained_branches"] == trained
        assert (ckpt / "qzoom_branch.safetensors").is_file() and (ckpt / "args.json").is_file()
        ckpts[name] = ckpt
    config = json.loads((ckpts["rpn_train"] / "qzoom_config.json").read_text())
    # the swift recipe's ENV block and the demo's budget became the folder's Q-Zoom settings
    assert (config["branch_layer"], config["branch_depth"], config["blur_kernel"], config["tau_roi"]) == (2, 2, 1, 0.2)
    assert (config["low_min_tokens"], config["low_max_tokens"], config["roi_min_tokens"], config["roi_max_tokens"]) \
        == (16, 16, 16, 64)
    gate = summary["stages"]["gate_train"]["outputs"]
    assert gate["adapters"] == str(ckpts["rpn_train"])
    stage1, stage3 = (load_file(str(ckpts[n] / "qzoom_branch.safetensors")) for n in ("rpn_train", "gate_train"))
    assert all(torch.equal(stage3[k], stage1[k]) for k in stage1 if k.startswith("rpn."))
    assert any(not torch.equal(stage3[k], stage1[k]) for k in stage1 if k.startswith("gate."))
    cal = summary["stages"]["calibrate"]["outputs"]
    assert cal["checkpoint"] == str(ckpts["gate_train"]) == summary["checkpoint"]
    assert json.loads((ckpts["gate_train"] / "qzoom_config.json").read_text())["tau_gate"] == pytest.approx(cal["tau_gate"])
    assert set(summary["metrics"]["runs"]) == {"baseline@16", "baseline@64", "baseline@256", "qzoom", "always"}


@pytest.mark.slow
def test_the_report_names_the_trainer(lf_demo):
    out, _, _ = lf_demo
    report = (out / "report.md").read_text()
    assert "Branch training (stages 1 and 3): `llamafactory-cli` (trainer=llamafactory, in its own environment: " \
           "LLaMA-Factory 0.9.5, transformers 5.6.0" in report
    assert "| 4 | stage 1: RPN training (llamafactory-cli) | ran |" in report
    assert "| 6 | stage 3: gate training (llamafactory-cli) | ran |" in report


def test_the_trainer_setting_is_validated():
    assert demo_config("quick", []).trainer == "swift"
    assert demo_config("quick", ["trainer=llamafactory"]).trainer == "llamafactory"
    with pytest.raises(SystemExit, match="trainer='deepspeed': choose from 'swift', 'llamafactory'"):
        demo_config("quick", ["trainer=deepspeed"])


def test_a_missing_llamafactory_environment_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"lf_bin=.*has no python, llamafactory-cli, qzoom.*make venv-lf"):
        lf_environment(str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "qzoom_swift.cli", "demo", "--preset", "quick", "--out",
                          str(tmp_path / "run"), "--set", "trainer=llamafactory", "--set", f"lf_bin={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "make venv-lf" in res.stderr
    assert not (tmp_path / "run" / "stages").exists()  # refused before any stage ran


def test_the_trainer_is_part_of_the_training_stages_keys_only():
    """A swift run's keys are what they were before the setting existed; llamafactory changes stages 4 and 6 (and,
    through their run ids, every stage after them), nothing before."""
    records = {s.name: {"run_id": f"id-{s.name}"} for s in demo.STAGES}
    keys = {}
    for trainer in ("swift", "llamafactory"):
        ctx = demo.Context(argparse.Namespace(), demo_config("full", [f"trainer={trainer}"]), Path("/nonexistent"),
                           records=records)
        keys[trainer] = {s.name: demo._stage_key(ctx, s) for s in demo.STAGES}
    changed = {name for name in keys["swift"] if keys["swift"][name] != keys["llamafactory"][name]}
    assert changed == {"rpn_train", "gate_train"}
    assert all("trainer" not in k and "lf_recipe" not in k for k in keys["swift"].values())
    assert keys["swift"]["rpn_train"]["settings"] == {"rpn_steps": 1200, "low_tokens": 16, "tau_roi": 0.2, "seed": 0}

"""examples/ end to end on the tiny models, and every path the recipes, examples and README hand to a later step.

The examples run as a user runs them: `bash examples/<name>.sh` from a working directory, with their
default output paths (so each one reads exactly what the one before it wrote), the user inputs written at
their default places (data/stage1.jsonl, ...) and only the model, the recipe (`tiny`) and the CPU flags set
through their variables. A random tiny model answers noise, so two inputs are prepared from its own answers
(a probe run of the same command with the same settings): the stage-2 pool's ground truth is the
low-resolution answer (the RoI answer then regresses where it differs) and the stage-3 ground truth is the
top-budget answer (lower budgets that answer otherwise are clean transitions).

Order (independent scripts run concurrently): stage1 -> {stage2 -> stage2 LoRA, stage3 -> {infer, deploy,
eval, ONNX, Python API}, multi-GPU}.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from qzoom_swift.bench.sft import CPU_TRAIN_FLAGS
from qzoom_swift.testing.serving import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
RECIPES = REPO / "recipes"
BIN = Path(sys.executable).parent

SCRIPTS = ("stage1_sdrpn.sh", "stage2_post_sft.sh", "stage2_post_sft_lora.sh", "stage3_gate.sh", "infer.sh",
           "deploy.sh", "eval.sh", "export_onnx.sh", "multi_gpu.sh", "python_api.py")

# What each step writes (file names below its output directory). The static path checks use this table and
# the tiny runs below check it on disk, so a renamed output breaks one of them.
WRITES = {
    "pseudo-labels": ("shard-00000.jsonl", "shard-*.jsonl", "summary.json"),
    "gate-labels": ("shard-00000.jsonl", "gate_train.jsonl", "gate_trajectories.jsonl", "summary.json"),
    "mine-hard": ("shard-00000.jsonl", "post_sft.jsonl", "summary.json"),
    "swift sft": ("last-checkpoint",),  # ms-swift's link to the newest checkpoint-<step> (add_version: false)
    "swift export": ("",),  # the merged model directory itself
    "lf-model": ("config.json", "modeling_qzoom.py", "qzoom_branch.safetensors"),  # a LLaMA-Factory model folder
    "lf-branches": ("qzoom_branch.safetensors", "qzoom_config.json"),  # the plugin's branch checkpoint
    "lf-dataset": ("dataset_info.json", "tokenized"),  # ShareGPT + the pre-tokenized form
}
# What `qzoom demo` (default --out runs/demo) writes that the toy recipes name; tests/test_demo.py runs it.
DEMO_WRITES = ("runs/demo/stage1/rpn_train.jsonl", "runs/demo/stage1/train/last-checkpoint",
               "runs/demo/stage3/labels/gate_train.jsonl", "runs/demo/stages/toy_base.json")

SFT = [*CPU_TRAIN_FLAGS, "--max_steps", "2", "--save_steps", "2"]
LABELS_1 = ("--max-new-tokens 4 --batch-size 3 --calibration 3 --no-progress --tau-fg 0.9 --tau-bg 0.8 "
            "--max-box-fraction 0.9 --min-peak 1e-3")
LABELS_3 = "--budgets 16,36,64 --max-new-tokens 2 --batch-size 2 --no-progress"
MINE = "--matcher exact --max-new-tokens 2 --batch-size 2 --tau-roi 0.3 --no-progress"
S1 = "runs/stage1/qwen2_5_vl_7b"  # the examples' default output folders
S2 = "runs/stage2/qwen2_5_vl_7b"
S3 = "runs/stage3/qwen2_5_vl_7b"


# ------------------------------------------------------------------------------- paths, statically


def _logical_lines(text: str) -> list[str]:
    """Lines with shell continuations joined, also inside `#` comments (recipe headers)."""
    return re.sub(r"\\\n\s*#?\s*", " ", text).splitlines()


def _expand(text: str) -> str:
    """An example with its variables' defaults substituted (``X=${X:-default}``, in order) and quotes dropped."""
    values: dict[str, str] = {}
    out = []
    for line in text.splitlines():
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), line)
        m = re.match(r"^(?:export )?(\w+)=\$\{\1:-(.*)\}(?:\s+#.*)?$", line.strip()) or \
            re.match(r'^(\w+) = os\.environ\.get\("\1", "(.*)"\)', line.strip())
        if m:
            values[m.group(1)] = m.group(2).strip("'\"")
        out.append(line)
    return "\n".join(out).replace('"', "")


def _flag_values(line: str, flags: tuple[str, ...]) -> list[str]:
    values = []
    for flag in flags:
        pattern = rf"{flag}\s*:?\s+([^\s`'),;]+)" if flag.endswith(":") else rf"(?<![\w-]){flag}\s+([^\s`'),;]+)"
        values += [v.rstrip(".") for v in re.findall(pattern, line)]
    return values


def _paths(text: str) -> tuple[set[str], list[str]]:
    """(paths the commands in ``text`` write, paths they read that an earlier step must have written)."""
    written: set[str] = set()
    read: list[str] = []
    for line in _logical_lines(text):
        for job, files in WRITES.items():
            if f"qzoom {job}" in line:
                written |= {f"{d}/{f}" for d in _flag_values(line, ("--out",)) for f in files} | set(
                    _flag_values(line, ("--out",)))
        outs = _flag_values(line, ("--output_dir", "output_dir:"))
        if "swift export" in line:
            written |= set(outs)
        else:
            written |= {f"{d}/{f}" for d in outs for f in WRITES["swift sft"]}
        for m in re.finditer(r"qzoom build-tiny --family (\w+).*?--cache-dir (\S+)", line):
            written.add(f"{m.group(2)}/models/{m.group(1)}-tiny-s0-v2")
        read += [v for v in _flag_values(line, ("--dataset", "dataset:", "--adapters", "--checkpoint", "--trajectories",
                                               "--model", "model:", "--shard", "--resume_from_checkpoint", "--val_dataset"))
                 if v.startswith(("runs/", ".cache/"))]
        read += [m.group(2) for m in re.finditer(r'^(\w+) = os\.environ\.get\("\1", "(runs/[^"]+)"\)', line)]
    return written, read


def _documents() -> dict[str, str]:
    docs = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(RECIPES.rglob("*.yaml"))}
    docs |= {p.relative_to(REPO).as_posix(): _expand(p.read_text()) if p.suffix == ".sh" else p.read_text()
             for p in sorted(EXAMPLES.iterdir()) if p.suffix in (".sh", ".py")}
    docs["README.md"] = (REPO / "README.md").read_text()
    return docs


def test_every_path_handed_to_a_later_step_is_one_an_earlier_step_writes():
    docs = _documents()
    written = set(DEMO_WRITES)
    reads = []
    for name, text in docs.items():
        w, r = _paths(text)
        written |= w
        reads += [(name, path) for path in r]
    assert len(reads) > 40, reads  # the parser finds the hand-overs (a broken regex would pass vacuously)
    missing = sorted({f"{name}: {path}" for name, path in reads if path not in written})
    assert not missing, "paths no step writes:\n" + "\n".join(missing)


def test_the_tiny_recipes_model_is_what_build_tiny_writes(tiny_dir):
    assert tiny_dir("qwen2_5_vl").name == "qwen2_5_vl-tiny-s0-v2"  # the name the recipes and the parser use


def test_demo_writes_what_the_toy_recipes_name():
    source = (REPO / "qzoom_swift" / "bench" / "demo.py").read_text()
    assert 'ctx.path("stage1", "rpn_train.jsonl")' in source and 'ctx.path("stage1", "train")' in source
    assert 'ctx.path("stage3", "train")' in source and "gate_train" in source


def test_no_document_names_a_checkpoint_nothing_writes():
    pattern = re.compile(r"checkpoint-(final|N|M)\b")
    bad = [f"{name}:{i}: {line.strip()}" for name, text in _documents().items()
           for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not bad, "ms-swift writes checkpoint-<step> and last-checkpoint, nothing else:\n" + "\n".join(bad)


def test_full_size_recipes_default_to_one_gpu_and_say_how_to_use_more():
    import yaml

    for path in RECIPES.glob("*/stage*.yaml"):
        if path.parent.name in ("tiny", "toy"):
            continue
        text = path.read_text()
        env = yaml.safe_load(text)["ENV"]
        assert env["NPROC_PER_NODE"] == 1, path
        assert "NPROC_PER_NODE=8" in text, f"{path}: the header shows the multi-GPU override"
        assert "truncated" not in text and "nearest-resamples" not in text, path
        assert yaml.safe_load(text).get("truncation_strategy") == "delete", path


def test_examples_folder_holds_the_scripts_this_test_runs():
    present = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".py"))
    assert present == sorted(SCRIPTS)
    for name in SCRIPTS:
        text = (EXAMPLES / name).read_text()
        if name.endswith(".sh"):
            lines = text.splitlines()
            assert lines[0] == "#!/usr/bin/env bash" and lines[1].startswith("# "), name
            assert "set -euo pipefail" in text and os.access(EXAMPLES / name, os.X_OK), name
        # inputs come from variables whose defaults are the real model's
        assert re.search(r"MODEL\W+\$\{MODEL:-Qwen/|\"MODEL\", \"Qwen/", text), name


# ------------------------------------------------------------------------------ the tiny runs


@dataclass
class Run:
    returncode: int | None  # None: not run (an earlier step failed)
    seconds: float
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        return self.text()[-4000:] or "(no output: not run, an earlier step failed)"


class Runner:
    def __init__(self, work: Path, base_env: dict[str, str]):
        self.work, self.base_env = work, base_env
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def script(self, name: str, **env: str) -> Run:
        path = EXAMPLES / name
        cmd = [sys.executable, str(path)] if name.endswith(".py") else ["bash", str(path)]
        return self.command(name, cmd, env)

    def command(self, name: str, cmd: list[str], env: dict[str, str]) -> Run:
        log = self.work / "logs" / f"{name}.log"
        run_env = {**self.base_env, "MODELSCOPE_CACHE": str(self.work / "cache" / name), **env}
        t0 = time.perf_counter()
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, cwd=self.work, env=run_env, stdout=f, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        return Run(rc, time.perf_counter() - t0, log)

    def after(self, *deps: Future, then: Callable[[], Run], name: str) -> Run:
        """Run ``then`` once every dependency succeeded; otherwise record it as not run."""
        if any(d.result().returncode != 0 for d in deps):
            return Run(None, 0.0, self.work / "logs" / f"{name}.not-run")
        return then()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _with_answers(rows: list[dict], answers: list[str]) -> list[dict]:
    out = []
    for row, answer in zip(rows, answers, strict=True):
        messages = [dict(m) for m in row["messages"]]
        messages[-1]["content"] = answer
        out.append({**row, "messages": messages})
    return out


def _inputs(work: Path) -> list[dict]:
    """The user inputs at the examples' default places; returns the shape rows."""
    from PIL import Image

    from qzoom_swift.synthetic.images import write_shape_dataset
    from qzoom_swift.testing.eval_data import write_eval_datasets

    data = work / "data"
    rows = _rows(write_shape_dataset(data / "shapes", n=6, size=(392, 280), seed=0))
    for name in ("stage1.jsonl", "test.jsonl"):
        _write_rows(data / name, rows)
    (data / "images").mkdir()
    Image.open(rows[0]["images"][0]).convert("RGB").save(data / "images" / "example.jpg", quality=95)
    write_eval_datasets(work / "evaldata", ["docvqa", "textvqa"], n=2, hr_size=(448, 336))
    return rows


@pytest.fixture(scope="module")
def examples(tiny_dir, tmp_path_factory) -> tuple[Path, dict[str, Run], dict[str, str]]:
    work = tmp_path_factory.mktemp("examples")
    rows = _inputs(work)
    model = str(tiny_dir("qwen2_5_vl"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", MODEL=model, RECIPE="tiny",
               HF_DATASETS_CACHE=str(work / "cache" / "hf"),
               # small visual-token budgets: stage 1 stores them in its checkpoint, the later steps read them
               QZOOM_LOW_MIN_TOKENS="16", QZOOM_LOW_MAX_TOKENS="64", QZOOM_ROI_MIN_TOKENS="16",
               QZOOM_ROI_MAX_TOKENS="64")
    r = Runner(work, env)
    sft = shlex.join(SFT)
    port = free_port()
    extra = {"deploy_port": str(port)}

    def probe3() -> Run:  # the tiny model's answers along the stage-3 trajectory
        _write_rows(work / "probe" / "stage3.jsonl", rows)
        return r.command("probe-gate-labels", [str(BIN / "qzoom"), "gate-labels", "--model", model, "--dataset",
                                               "probe/stage3.jsonl", "--out", "probe/gate", *LABELS_3.split()], {})

    def stage3() -> Run:
        from qzoom_swift.labels.gate import release_normalize

        # the ground truth is the top answer as the released filter normalises it: it keeps a ground truth's
        # punctuation, and the tiny model's answers are filler tokens full of it ("<|qzoom_filler_17611|>")
        answers = [release_normalize(row["qzoom_answers"][-1])
                   for row in _rows(work / "probe" / "gate" / "shard-00000.jsonl")]
        _write_rows(work / "data" / "stage3.jsonl", _with_answers(rows, answers))
        _write_rows(work / "data" / "stage3_heldout.jsonl", _with_answers(rows, answers))
        return r.script("stage3_gate.sh", LABEL_ARGS=LABELS_3, CALIBRATE_ARGS="--max-accuracy-drop 0.5", SFT_ARGS=sft)

    def stage2() -> Run:  # the pool's ground truth = the low-resolution answer of a probe run
        _write_rows(work / "probe" / "pool.jsonl", rows)
        probe = r.command("probe-mine-hard", [str(BIN / "qzoom"), "mine-hard", "--model", model, "--checkpoint",
                                              f"{S1}/train/last-checkpoint", "--dataset", "probe/pool.jsonl", "--out",
                                              "probe/mined", *MINE.split()], {})
        if probe.returncode != 0:
            return probe
        answers = [row["qzoom_base_answer"] for row in _rows(work / "probe" / "mined" / "shard-00000.jsonl")]
        _write_rows(work / "data" / "stage2_pool.jsonl", _with_answers(rows, answers))
        return r.script("stage2_post_sft.sh", MINE_ARGS=MINE, SFT_ARGS=sft, MASTER_PORT=str(free_port()))

    downstream = {
        "infer.sh": dict(MODEL_KWARGS='{"QZOOM_TAU_GATE": 0}', INFER_ARGS="--max_new_tokens 2 --max_batch_size 2"),
        "deploy.sh": dict(PORT=str(port), MODEL_KWARGS='{"QZOOM_TAU_GATE": 0}', QUESTION="What colour is it?",
                          WAIT_S="600"),
        "eval.sh": dict(DATA_ROOT="evaldata", BENCHMARKS="docvqa,textvqa",
                        RUNS="--run baseline:64 --run zoom:64:tau_gate=0",
                        EVAL_ARGS="--limit 2 --max-new-tokens 2 --device cpu"),
        "export_onnx.sh": dict(EXPORT_ARGS="--precision fp32", INFER_ARGS="--max_new_tokens 2 --max_batch_size 2",
                               MODEL_KWARGS=json.dumps({"QZOOM_ROUTER": "onnx", "QZOOM_ONNX_PROVIDER": "cpu",
                                                        "QZOOM_ONNX_DIR": "runs/onnx/qwen2_5_vl_7b/onnx",
                                                        "QZOOM_TAU_GATE": 0})),
        "python_api.py": dict(DEVICE="cpu", DTYPE="float32", MAX_NEW_TOKENS="2", QUESTION="What colour is it?"),
    }
    with ThreadPoolExecutor(max_workers=16) as pool:
        s1 = pool.submit(r.script, "stage1_sdrpn.sh", LABEL_ARGS=LABELS_1, SFT_ARGS=sft)
        p3 = pool.submit(probe3)
        s2 = pool.submit(r.after, s1, then=stage2, name="stage2_post_sft.sh")
        lora = pool.submit(r.after, s2, name="stage2_post_sft_lora.sh", then=lambda: r.script(
            "stage2_post_sft_lora.sh", LORA_ARGS="--learning_rate 1e-3", SFT_ARGS=sft, MASTER_PORT=str(free_port())))
        s3 = pool.submit(r.after, s1, p3, then=stage3, name="stage3_gate.sh")
        multi = pool.submit(r.after, s1, name="multi_gpu.sh", then=lambda: r.script(
            "multi_gpu.sh", NPROC_PER_NODE="1", GLOBAL_BATCH="2", PER_DEVICE="2", OUT="runs/multi_gpu",
            LABELS=f"{S1}/labels", SFT_ARGS=sft, MASTER_PORT=str(free_port())))
        later = {name: pool.submit(r.after, s3, name=name, then=lambda n=name, e=kw: r.script(n, **e))
                 for name, kw in downstream.items()}
        runs = {"stage1_sdrpn.sh": s1.result(), "stage2_post_sft.sh": s2.result(), "stage3_gate.sh": s3.result(),
                "stage2_post_sft_lora.sh": lora.result(), "multi_gpu.sh": multi.result(),
                **{name: f.result() for name, f in later.items()}}
    durations = {name: round(run.seconds) for name, run in runs.items()}
    (work / "logs" / "durations.json").write_text(json.dumps(durations, indent=1))
    return work, runs, {**extra, "model": model}


def _ok(examples, name: str) -> tuple[Path, str]:
    work, runs, _ = examples
    run = runs[name]
    assert run.returncode == 0, f"examples/{name} exited {run.returncode}:\n{run.tail()}"
    return work, run.text()


@pytest.mark.slow
def test_stage1_example_writes_labels_and_a_branch_checkpoint(examples):
    work, log = _ok(examples, "stage1_sdrpn.sh")
    for name in WRITES["pseudo-labels"]:
        assert list((work / S1 / "labels").glob(name)), name
    ckpt = work / S1 / "train" / "last-checkpoint"
    assert (ckpt / "qzoom_branch.safetensors").is_file()
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert config["extra"]["trained_branches"] == ["rpn"] and config["low_max_tokens"] == 64
    assert f"stage-1 checkpoint: {S1}/train/last-checkpoint" in log


@pytest.mark.slow
def test_stage2_example_mines_regressions_and_post_sfts_with_deepspeed(examples):
    work, log = _ok(examples, "stage2_post_sft.sh")
    for name in WRITES["mine-hard"]:
        assert (work / S2 / "mined" / name).is_file(), name
    rows = _rows(work / S2 / "mined" / "post_sft.jsonl")
    assert rows and all(r["qzoom_roi"]["box"] for r in rows)
    assert (work / S2 / "train" / "last-checkpoint" / "model.safetensors").is_file()
    assert "torch.distributed.run" in log and "deepspeed" in log.lower()  # NPROC_PER_NODE=1 from the recipe


@pytest.mark.slow
def test_stage2_lora_example_trains_an_adapter_and_merges_it_without_branches(examples):
    from safetensors.torch import load_file

    work, log = _ok(examples, "stage2_post_sft_lora.sh")
    assert (work / S2 / "train_lora" / "last-checkpoint" / "adapter_model.safetensors").is_file()
    merged = load_file(str(work / S2 / "merged" / "model.safetensors"))
    base = load_file(str(Path(examples[2]["model"]) / "model.safetensors"))
    assert set(merged) == set(base), "the merged model must be a plain base model (no qzoom branch weights)"
    assert any(not (merged[k] == base[k]).all() for k in base), "the LoRA update was not merged"
    assert (work / S2 / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_stage3_example_labels_trains_the_gate_and_calibrates(examples):
    work, log = _ok(examples, "stage3_gate.sh")
    for name in WRITES["gate-labels"]:
        assert (work / S3 / "labels" / name).is_file(), name
    assert _rows(work / S3 / "labels" / "gate_train.jsonl"), "no gate labels: the probe's answers changed?"
    ckpt = work / S3 / "train" / "last-checkpoint"
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert "gate" in config["extra"]["trained_branches"] and "gate_calibration" in config["extra"]
    assert (ckpt / "gate_calibration.png").is_file() and "tau_gate=" in log


@pytest.mark.slow
def test_infer_example_answers_with_zoom(examples):
    work, log = _ok(examples, "infer.sh")
    assert len(_rows(work / "runs/infer/qwen2_5_vl_7b/result.jsonl")) == 6
    assert "qzoom: zoom(gate)" in log  # tau_gate 0: the gate runs and always says zoom


@pytest.mark.slow
def test_deploy_example_serves_an_image_request_and_stops_the_server(examples):
    work, log = _ok(examples, "deploy.sh")
    assert re.search(r"qwen2_5_vl-tiny-s0-v2: '.*' \(\d+ prompt tokens\)", log), log[-2000:]
    assert "qzoom: zoom(gate)" in (work / "runs/deploy/qwen2_5_vl_7b/deploy.log").read_text()
    port = int(examples[2]["deploy_port"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the trap stopped the server: nothing listens on the port any more
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"port {port} still open after deploy.sh exited")


@pytest.mark.slow
def test_eval_example_writes_the_summary(examples):
    work, log = _ok(examples, "eval.sh")
    out = work / "runs/eval/qwen2_5_vl_7b"
    assert (out / "pareto.png").is_file()
    runs = [row["run"] for row in json.loads((out / "summary.json").read_text())["rows"]]
    assert runs == ["baseline@64", "zoom@64"] and "| zoom@64 |" in log


@pytest.mark.slow
def test_onnx_example_exports_and_routes_with_onnxruntime(examples):
    work, log = _ok(examples, "export_onnx.sh")
    out = work / "runs/onnx/qwen2_5_vl_7b"
    assert (out / "onnx" / "gate.onnx").is_file() and (out / "onnx" / "rpn.onnx").is_file()
    assert json.loads((out / "onnx" / "parity_report.json").read_text())["precisions"]["fp32"]["passed"]
    assert "'QZOOM_ROUTER': 'onnx'" in log and "qzoom: zoom(gate)" in log  # the gate ran, through the router
    assert "qzoom export-onnx: warning" not in log  # e.g. a deprecated way of passing the checkpoint
    assert len(_rows(out / "result.jsonl")) == 6


@pytest.mark.slow
def test_multi_gpu_example_launches_torchrun(examples):
    work, log = _ok(examples, "multi_gpu.sh")
    assert "global batch 2 = 1 node(s) x 1 process(es) x 2 x 1 accumulation" in log
    assert "no GPU: running the single-process launch" in log and "torch.distributed.run --nproc_per_node 1" in log
    assert (work / "runs/multi_gpu/train/last-checkpoint/qzoom_branch.safetensors").is_file()


@pytest.mark.slow
def test_python_api_example_answers_three_ways(examples):
    _, log = _ok(examples, "python_api.py")
    lines = {line.split(":", 1)[0].strip(): line for line in log.splitlines() if re.match(r"^\s*(zoom|always|never):", line)}
    assert set(lines) == {"zoom", "always", "never"}, log[-2000:]
    assert "zoomed=True" in lines["always"] and "zoomed=False" in lines["never"]

"""Stages 1 and 3 of the zoom bench trained through LLaMA-Factory (``DemoConfig.trainer=llamafactory``).

LLaMA-Factory 0.9.5 and ms-swift 4.6 cannot share an environment, so the demo (which needs ms-swift for the toy
base) runs the LLaMA-Factory wing's own commands in the LLaMA-Factory environment (``DemoConfig.lf_bin``), each as
a subprocess with its log beside its output: ``qzoom lf-model`` (the model folder), ``qzoom lf-dataset`` (the rows
the ms-swift path trains on, their budgets included), ``llamafactory-cli train`` on ``recipes/llamafactory/toy/``
and ``qzoom lf-branches`` (back to the branch checkpoint that calibration and evaluation read unchanged). Those
subprocesses import the same qzoom_swift source as this process (a git worktree's too), never another copy.

Only the standard library is imported at module level (``qzoom --help`` stays fast).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qzoom_swift.bench.side_env import probe_environment, source_root
from qzoom_swift.recipes_command import RECIPES_DIR

LF_RECIPES = RECIPES_DIR / "llamafactory" / "toy"
LF_STAGE1_RECIPE = LF_RECIPES / "stage1_sdrpn.yaml"
LF_STAGE3_RECIPE = LF_RECIPES / "stage3_gate.yaml"
LF_TEMPLATE = "qwen2_vl"
"""LLaMA-Factory's chat template of the toy base (a Qwen2.5-VL)."""

_WRITE_FOLDER = ("import json, sys; from qzoom_swift.llamafactory_plugin.folder import write_model_folder; "
                 "print(write_model_folder(**json.loads(sys.argv[1])))")
"""``qzoom lf-model`` as a function call: the command has no option for Q-Zoom settings beyond B and R."""
@dataclass(frozen=True)
class LFEnvironment:
    """The LLaMA-Factory environment's ``bin/`` folder, the variables its commands run with, its versions."""

    bin: Path
    env: dict[str, str]
    versions: dict[str, str]

    def tool(self, name: str) -> Path:
        return self.bin / name


def lf_environment(lf_bin: str) -> LFEnvironment:
    """Find and check the LLaMA-Factory environment: ``lf_bin``, else the checkout's ``.venv-lf/bin``."""
    root = source_root()
    bin_dir = Path(lf_bin).expanduser() if lf_bin else (root or Path.cwd()) / ".venv-lf" / "bin"
    missing = [n for n in ("python", "llamafactory-cli", "qzoom") if not (bin_dir / n).is_file()]
    if missing:
        where = f"lf_bin={lf_bin}" if lf_bin else f"the default lf_bin {bin_dir}"
        raise FileNotFoundError(
            f"trainer=llamafactory: {where} has no {', '.join(missing)}: build the LLaMA-Factory environment with "
            "`make venv-lf` in the checkout, or pass --set lf_bin=DIR, the bin/ folder of a LLaMA-Factory 0.9.5 "
            "environment with qzoom_swift[llamafactory] installed")
    env = {k: v for k, v in os.environ.items() if k != "DISABLE_VERSION_CHECK"}  # LLaMA-Factory's pins hold
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", WANDB_DISABLED="true")
    versions = probe_environment(bin_dir / "python", env, imports="llamafactory",
                                 distributions={d: (d,) for d in ("llamafactory", "transformers", "torch")},
                                 subject="trainer=llamafactory",
                                 install_hint="install qzoom_swift[llamafactory] there, e.g. `make venv-lf`")
    return LFEnvironment(bin_dir, env, versions)


def recipe_qzoom_settings(recipe: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The Q-Zoom settings an ms-swift run of ``recipe`` saves into its checkpoint, as ``QZoomConfig`` overrides.

    ms-swift sets the demo's ``env`` first, then the recipe's ``ENV`` block fills only the unset keys, so the
    precedence is ``env`` > the shell's ``QZOOM_*`` > the recipe; ``read_env`` parses them as ms-swift's run does.
    """
    import yaml

    from qzoom_swift.config import read_env

    block = {k: str(v) for k, v in (yaml.safe_load(recipe.read_text()).get("ENV") or {}).items()}
    shell = {k: v for k, v in os.environ.items() if k.startswith("QZOOM_")}
    return read_env({**block, **shell, **(env or {})}).config_overrides


def _job_folder(job: Path, rows: list[dict], dest: Path) -> Path:
    """A copy of labelling job ``job`` whose training rows are ``rows`` (what ``qzoom lf-dataset`` reads): the
    demo's rows differ from the job's (stage 1 adds the low budget, stage 3 may fall back to ground truth)."""
    from qzoom_swift.fileio import write_jsonl_atomic
    from qzoom_swift.labels.gate_job import GATE_TRAIN_FILE
    from qzoom_swift.labels.jobs import JOB_FILE, SUMMARY_FILE

    dest.mkdir(parents=True, exist_ok=True)
    for name in (JOB_FILE, SUMMARY_FILE):  # the job's record, and the mark that it finished
        if (job / name).is_file():
            shutil.copyfile(job / name, dest / name)
    kind = json.loads((job / JOB_FILE).read_text()).get("kind")
    write_jsonl_atomic(dest / ("shard-00000.jsonl" if kind == "pseudo-labels" else GATE_TRAIN_FILE), rows)
    return dest


def _recipe_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def train_branch(lf: LFEnvironment, *, train: str, base: str, job: Path, rows: list[dict], workdir: Path,
                 recipe: Path, steps: int, seed: int, checkpoint: str | None = None,
                 qzoom_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train branch ``train`` (rpn or gate) of ``base`` on ``rows`` with ``llamafactory-cli train recipe``.

    ``checkpoint``: the branch checkpoint to start from (stage 3: stage 1's; its untrained gate is copied from
    ``base`` as ms-swift's tuner does). Returns the branch checkpoint (``workdir/branches``), the logged losses,
    the runtime and where each step's files and logs are.
    """
    from qzoom_swift.bench.sft import run_logged
    from qzoom_swift.llamafactory_plugin.data import MANIFEST_FILE

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    job_dir = _job_folder(job, rows, workdir / "job")
    folder, data, out, ckpt = (workdir / name for name in ("model", "data", "train", "branches"))
    spec = {"base_dir": base, "out_dir": str(folder), "checkpoint": checkpoint, "train": train,
            "qzoom_overrides": qzoom_overrides or None}
    run_logged([lf.tool("python"), "-c", _WRITE_FOLDER, json.dumps(spec)], workdir / "lf-model.log", lf.env)
    run_logged([lf.tool("qzoom"), "lf-dataset", job_dir, "--model", folder, "--template", LF_TEMPLATE, "--out", data,
                "--no-progress"], workdir / "lf-dataset.log", lf.env)
    manifest = json.loads((data / MANIFEST_FILE).read_text())
    keys = {**manifest["recipe"], "model_name_or_path": folder, "output_dir": out, "max_steps": steps, "seed": seed}
    log = run_logged([lf.tool("llamafactory-cli"), "train", recipe, *(f"{k}={_recipe_value(v)}" for k, v in keys.items())],
                     workdir / "train.log", lf.env, cwd=workdir).log
    run_logged([lf.tool("qzoom"), "lf-branches", out, "--out", ckpt], workdir / "lf-branches.log", lf.env)
    trainer_log = out / "trainer_log.jsonl"
    if not trainer_log.is_file():
        raise RuntimeError(f"llamafactory-cli train left no {trainer_log}; see {log}")
    logged = [json.loads(line) for line in trainer_log.read_text().splitlines() if line.strip()]
    results = out / "all_results.json"
    return {"checkpoint": ckpt, "log": log, "losses": [r["loss"] for r in logged if r.get("loss") is not None],
            "train_runtime": json.loads(results.read_text()).get("train_runtime") if results.is_file() else None,
            "trainer_log": str(trainer_log), "lf_output_dir": str(out), "lf_model": str(folder),
            "lf_dataset": str(data), "exported_rows": manifest["rows"], "rejected_rows": manifest["rejected"],
            "rejects": manifest["rejects"], "lf_versions": lf.versions}

"""Shared pieces of the LLaMA-Factory model and training tests (run in .venv-lf).

``tokenized_dataset`` builds a small pre-tokenized dataset the way ``qzoom lf-dataset`` lays one out (ShareGPT +
``dataset_info.json`` + ``tokenized/``), tokenized by LLaMA-Factory's own data code (``get_dataset``), plus the
contract's fixed-length ``qzoom_*`` columns written here by hand; ``run_lf`` runs the real ``llamafactory-cli``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from qzoom_swift.families.registry import FAMILY_NAMES, get_spec

REPO = Path(__file__).resolve().parents[2]
LF_CLI = Path(sys.executable).parent / "llamafactory-cli"
QZOOM = Path(sys.executable).parent / "qzoom"
# the recipes' templates: Qwen3-VL Instruct trains with qwen3_vl_nothink, LLaMA-Factory's mapping for it
TEMPLATES = {name: get_spec(name).llamafactory_template for name in FAMILY_NAMES} | {"qwen3_vl": "qwen3_vl_nothink"}
GRIDS = {name: (16, 16) if get_spec(name).fixed_resolution else (4, 6) for name in FAMILY_NAMES}
"""The merged token grid each family's tiny images train at (LLaVA: the processor's fixed 224 px square)."""


def image_side(family: str) -> int:
    return get_spec(family).patch_unit


def label_map(grid: tuple[int, int], i: int) -> list[list[int]]:
    """A tri-state map: a 2x2 foreground block that moves with the row, ignored cells around it, background."""
    rows, cols = grid
    r0, c0 = i % (rows - 1), (2 * i) % (cols - 1)
    out = [[0] * cols for _ in range(rows)]
    for r in range(max(0, r0 - 1), min(rows, r0 + 3)):
        for c in range(max(0, c0 - 1), min(cols, c0 + 3)):
            out[r][c] = -100
    for r in range(r0, min(rows, r0 + 2)):
        for c in range(c0, min(cols, c0 + 2)):
            out[r][c] = 1
    return out


def tokenized_dataset(root: Path, model_dir: Path, family: str, stage: int, n: int = 4,
                      rpn_cells: int | None = None) -> Path:
    """A pre-tokenized dataset under ``root`` (``root/tokenized``); returns ``root``."""
    from datasets import DatasetDict
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from PIL import Image
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    name = f"qzoom_stage{stage}"
    grid = GRIDS[family]
    unit = image_side(family)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i in range(n):
        img = Image.new("RGB", (grid[1] * unit, grid[0] * unit), (235, 235, 235))
        img.paste(colours[i % 4], (unit * (i % 3), unit, unit * (i % 3 + 2), unit * 3))
        path = root / "images" / f"{i}.png"
        img.save(path)
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                                  {"role": "assistant", "content": ["red", "green", "blue", "yellow"][i % 4]}],
                     "images": [str(path)]})
    (root / f"{name}.json").write_text(json.dumps(rows))
    (root / "dataset_info.json").write_text(json.dumps({name: {
        "file_name": f"{name}.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    parser = HfArgumentParser((ModelArguments, DataArguments))
    model_args, data_args = parser.parse_dict({
        "model_name_or_path": str(model_dir), "trust_remote_code": True, "template": TEMPLATES[family],
        "dataset": name, "dataset_dir": str(root), "cutoff_len": 4096, "image_max_pixels": 4096 * 4096,
        "preprocessing_num_workers": None})
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    training_args = Seq2SeqTrainingArguments(output_dir=str(root / "unused"), report_to="none")
    data = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]
    assert len(data) == n, "LLaMA-Factory dropped rows of the fixture"
    if stage == 1:
        maps = [label_map(grid, i) for i in range(n)]
        cells = rpn_cells or grid[0] * grid[1]
        flat = [[v for r in m for v in r] + [-100] * (cells - grid[0] * grid[1]) for m in maps]
        data = data.add_column("qzoom_rpn_labels", flat).add_column("qzoom_rpn_grid", [list(grid)] * n)
    else:
        data = data.add_column("qzoom_gate", [i % 2 for i in range(n)])
    DatasetDict({"train": data}).save_to_disk(str(root / "tokenized"))
    return root


def run_lf(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``llamafactory-cli ARGS`` in a subprocess (one CPU thread, offline); stdout and stderr together."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "WANDB_DISABLED": "true"}
    env.pop("DISABLE_VERSION_CHECK", None)
    return subprocess.run([str(LF_CLI), *args], cwd=cwd, env=env, capture_output=False, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def trainable_params(log: str) -> int:
    found = re.findall(r"trainable params: ([\d,]+)", log)
    assert found, "llamafactory-cli printed no 'trainable params' line:\n" + log[-3000:]
    return int(found[-1].replace(",", ""))


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor a model folder's weights hold, by name (index or single file)."""
    from qzoom_swift.llamafactory_plugin.folder import read_folder_tensors

    return read_folder_tensors(folder, "")

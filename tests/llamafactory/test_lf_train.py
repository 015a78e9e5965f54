"""Stages 1 and 3 under the real ``llamafactory-cli train`` on `qzoom lf-model` folders (tiny models, CPU, .venv-lf).

Each run trains on a pre-tokenized dataset whose four rows form one batch, so the first logged loss is the loss of
the folder's initial branch on the whole dataset: the tests recompute it here with the core
(``training.branch_training_step`` row by row), which pins that LLaMA-Factory hands the pre-tokenized ``qzoom_*``
columns to ``forward`` (without them the run fails, or would log a language-model loss). Then: only the trained
branch is trainable and changes, the loss drops, the checkpoint reloads through its remote code, and
``qzoom lf-branches`` converts it into a branch checkpoint ``QZoomModel`` reads to the same heatmaps.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from lf_train_fixtures import (
    QZOOM,
    REPO,
    TEMPLATES,
    folder_tensors,
    logged_losses,
    run_lf,
    tokenized_dataset,
    trainable_params,
)

from qzoom_swift.branches import branch_parameters
from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.llamafactory_plugin.folder import write_model_folder
from qzoom_swift.llamafactory_plugin.modeling import rpn_label_maps

RECIPES = REPO / "qzoom_swift" / "recipes" / "llamafactory" / "tiny"
STEPS = 8


def train(root: Path, recipe: str, model: Path, data: Path, family: str, out: str, **extra) -> tuple:
    args = ["train", str(RECIPES / recipe), f"model_name_or_path={model}", f"dataset_dir={data}",
            f"tokenized_path={data / 'tokenized'}", f"output_dir={root / out}", f"template={TEMPLATES[family]}",
            "per_device_train_batch_size=4", f"max_steps={STEPS}", *(f"{k}={v}" for k, v in extra.items())]
    proc = run_lf(args, cwd=root)
    return proc, root / out


def load_remote(folder: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True,
                                                       dtype=torch.float32).eval()


def reference_loss(model, folder: Path, data: Path, which: str) -> float:
    """The branch loss of ``model`` over the whole dataset, row by row with the core, combined as the batch mean.

    RPN: the selective BCE is a mean over every valid token of the batch (rows weighted by their valid cells);
    gate: a mean over samples.
    """
    from datasets import load_from_disk
    from PIL import Image
    from transformers import AutoProcessor

    from qzoom_swift.families import get_adapter
    from qzoom_swift.training import branch_training_step

    processor = AutoProcessor.from_pretrained(str(folder))
    adapter = get_adapter(model)
    total, weight = 0.0, 0
    for row in load_from_disk(str(data / "tokenized"))["train"]:
        inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "labels")}
        inputs.update(adapter.encode_images(processor, [Image.open(p).convert("RGB") for p in row["images"]]))
        with torch.no_grad():
            if which == "rpn":
                maps = rpn_label_maps(torch.tensor([row["qzoom_rpn_labels"]]), torch.tensor([row["qzoom_rpn_grid"]]))
                n = int((maps[0] != -100).sum())
                loss = branch_training_step(model, ("rpn",), qzoom_rpn_labels=maps, **inputs).loss
            else:
                n = 1
                loss = branch_training_step(model, ("gate",), qzoom_gate=[row["qzoom_gate"]], **inputs).loss
        total, weight = total + float(loss) * n, weight + n
    return total / weight


def changed(before: dict, after: dict) -> set[str]:
    shared = set(before) & set(after)
    return {k for k in shared if not torch.equal(before[k].float(), after[k].float())}


def check_run(proc, out: Path, folder: Path, which: str) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:]
    model = load_remote(folder)
    expected = sum(p.numel() for _, p in branch_parameters(model, which))
    assert trainable_params(proc.stdout) == expected
    losses = logged_losses(out)
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    # The first step's loss is the folder's branch loss on the dataset: the qzoom_* columns reached forward.
    data = folder.parent / ("data1" if which == "rpn" else "data3")
    assert losses[0] == pytest.approx(reference_loss(model, folder, data, which), rel=1e-4, abs=1e-5)
    before, after = folder_tensors(folder), folder_tensors(out)
    assert set(after) <= set(before) and len(after) >= len(before) - 2  # (a tied LM head may be saved once)
    moved = changed(before, after)
    own = {k for k in before if k.startswith(f"qzoom_branch.{which}.")}
    assert moved and moved <= own, sorted(moved - own)[:5]
    assert {k for k in own if k.endswith("q_proj.weight")} <= moved


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_dir):
    """Stage 1 for every family: {family: (root, folder, llamafactory-cli result, output_dir)}."""
    runs = {}

    def get(family: str):
        if family not in runs:
            root = tmp_path_factory.mktemp(f"lf1_{family}")
            folder = write_model_folder(tiny_dir(family), root / "model", train="rpn")
            data = tokenized_dataset(root / "data1", folder, family, 1)
            proc, out = train(root, "stage1_sdrpn.yaml", folder, data, family, "train1")
            runs[family] = (root, folder, proc, out)
        return runs[family]

    return get


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stage1_trains_only_the_rpn_under_llamafactory_cli(stage1, family):
    root, folder, proc, out = stage1(family)
    check_run(proc, out, folder, "rpn")


def test_stage1_checkpoint_keeps_its_remote_code_and_converts_to_a_branch_checkpoint(stage1, tiny_dir):
    """The saved folder reloads as the Q-Zoom class; `qzoom lf-branches` gives QZoomModel the same heatmaps."""
    from PIL import Image

    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.model import QZoomModel
    from qzoom_swift.prefill import prefill

    root, folder, proc, out = stage1("qwen2_5_vl")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (out / "modeling_qzoom.py").is_file()
    lf_model = load_remote(out)
    assert type(lf_model).__name__ == "QZoomQwen2_5_VLForConditionalGeneration"
    assert lf_model.config.qzoom_train == "rpn"
    trained = folder_tensors(out)
    for name, tensor in lf_model.qzoom_branch.state_dict().items():
        assert torch.equal(tensor, trained[f"qzoom_branch.{name}"])

    ckpt = root / "branches1"
    res = subprocess.run([str(QZOOM), "lf-branches", str(out), "--out", str(ckpt)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((ckpt / "qzoom_config.json").read_text())["extra"]["trained_branches"] == ["rpn"]
    assert json.loads((ckpt / "args.json").read_text())["model"] == str(tiny_dir("qwen2_5_vl"))

    qz = QZoomModel.from_pretrained(tiny_dir("qwen2_5_vl"), checkpoint=ckpt, dtype="float32", device="cpu")
    image = Image.open(root / "data1" / "images" / "1.png")
    inputs = chat_inputs(qz.processor, [[image]], ["Where is the square?"])
    ours = qz.prefill(branches=("rpn",), **inputs).heatmaps()
    with torch.no_grad():
        theirs = prefill(lf_model, branches=("rpn",), **inputs).heatmaps()
    fresh = QZoomModel.from_pretrained(tiny_dir("qwen2_5_vl"), dtype="float32", device="cpu")
    untrained = fresh.prefill(branches=("rpn",), **inputs).heatmaps()
    assert len(ours) == len(theirs) == 1 and ours[0].shape == theirs[0].shape
    assert torch.equal(ours[0], theirs[0])
    assert not torch.allclose(ours[0], untrained[0])  # the converted RPN is the trained one, not a fresh copy

    res = subprocess.run([str(QZOOM), "lf-branches", str(out), "--out", str(ckpt)], capture_output=True, text=True)
    assert res.returncode == 1 and "--force" in res.stderr
    res = subprocess.run([str(QZOOM), "lf-branches", str(folder.parent / "data1"), "--out", str(root / "x")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "config.json" in res.stderr


def test_stage3_trains_only_the_gate_from_the_stage1_branches(stage1, tiny_dir):
    """`qzoom lf-model --checkpoint STAGE1 --train gate`: the stage-1 RPN kept, the gate trained alone."""
    root, _, proc1, out1 = stage1("qwen2_5_vl")
    assert proc1.returncode == 0, proc1.stdout[-3000:]
    ckpt = root / "branches1_for_3"
    subprocess.run([str(QZOOM), "lf-branches", str(out1), "--out", str(ckpt)], check=True, capture_output=True)
    folder = root / "model3"
    res = subprocess.run([str(QZOOM), "lf-model", str(tiny_dir("qwen2_5_vl")), "--out", str(folder),
                          "--checkpoint", str(ckpt), "--train", "gate"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    data = tokenized_dataset(root / "data3", folder, "qwen2_5_vl", 3)
    proc, out = train(root, "stage3_gate.yaml", folder, data, "qwen2_5_vl", "train3")
    check_run(proc, out, folder, "gate")
    stage1_rpn = {k: v for k, v in folder_tensors(out1).items() if k.startswith("qzoom_branch.rpn.")}
    stage3 = folder_tensors(out)
    assert all(torch.equal(v, stage3[k]) for k, v in stage1_rpn.items())
    res = subprocess.run([str(QZOOM), "lf-branches", str(out), "--out", str(root / "branches3")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    config = json.loads((root / "branches3" / "qzoom_config.json").read_text())
    assert config["extra"]["trained_branches"] == ["rpn", "gate"]  # the record spans both stages


def test_a_ragged_column_stops_the_run_before_the_collator_naming_the_column_and_the_fix(tmp_path, tiny_dir):
    from datasets import DatasetDict, load_from_disk

    folder = write_model_folder(tiny_dir("qwen2_5_vl"), tmp_path / "model", train="rpn")
    data = tokenized_dataset(tmp_path / "data1", folder, "qwen2_5_vl", 1)
    rows = load_from_disk(str(data / "tokenized"))["train"]
    ragged = rows.remove_columns("qzoom_rpn_labels").add_column(
        "qzoom_rpn_labels", [r[:24 - i] for i, r in enumerate(rows["qzoom_rpn_labels"])])
    DatasetDict({"train": ragged}).save_to_disk(str(tmp_path / "ragged" / "tokenized"))
    proc, _ = train(tmp_path, "stage1_sdrpn.yaml", folder, tmp_path / "ragged", "qwen2_5_vl", "out")
    assert proc.returncode != 0
    assert "column qzoom_rpn_labels is not fixed-length" in proc.stdout and "qzoom lf-dataset" in proc.stdout
    assert "Unable to create tensor" not in proc.stdout  # the collator never ran

    DatasetDict({"train": rows.remove_columns(["qzoom_rpn_labels"])}).save_to_disk(str(tmp_path / "no_labels" / "tokenized"))
    proc, _ = train(tmp_path, "stage1_sdrpn.yaml", folder, tmp_path / "no_labels", "qwen2_5_vl", "out2")
    assert proc.returncode != 0
    assert "needs the column(s) ['qzoom_rpn_labels']" in proc.stdout and "qzoom lf-dataset" in proc.stdout


@pytest.mark.slow  # an export and a training run with a saved middle checkpoint: about 30 s on 2 busy cores
def test_stage1_end_to_end_from_a_pseudo_label_job_through_qzoom_lf_dataset(tmp_path, tiny_dir):
    """A pseudo-label job (rows of different label grids) -> `qzoom lf-dataset` -> `llamafactory-cli train`.

    The export pads qzoom_rpn_labels with -100 to one length; the batch mixes grids, so the model's rebuild of each
    map from qzoom_rpn_grid is what the first loss (recomputed here row by row) checks.
    """
    from lf_data_fixtures import chat, lf_dataset, picture, write_job
    from lf_train_fixtures import label_map

    grids = [(3, 4), (2, 5), (4, 4), (3, 3)]
    rows = [{"qzoom_id": str(i), "qzoom_status": "ok", "messages": chat(), "images": [str(picture(
        tmp_path / "src" / f"{i}.png", (300 + 40 * i, 200 + 30 * i), i))], "qzoom_rpn_labels": label_map(g, i),
        "qzoom_attn_grid": list(g)} for i, g in enumerate(grids)]
    job = write_job(tmp_path / "labels", "pseudo-labels", rows)
    folder = write_model_folder(tiny_dir("qwen2_5_vl"), tmp_path / "model", train="rpn")
    export = lf_dataset(job, folder, "qwen2_5_vl", tmp_path / "data1")
    assert export.returncode == 0, export.stdout[-3000:]
    proc, out = train(tmp_path, "stage1_sdrpn.yaml", folder, tmp_path / "data1", "qwen2_5_vl", "train1",
                      save_strategy="steps", save_steps=STEPS // 2)
    check_run(proc, out, folder, "rpn")
    # An intermediate checkpoint is a full save too: it keeps the remote code and converts like the final one.
    middle = out / f"checkpoint-{STEPS // 2}"
    assert (middle / "modeling_qzoom.py").is_file()
    res = subprocess.run([str(QZOOM), "lf-branches", str(middle), "--out", str(tmp_path / "b4")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    from qzoom_swift.checkpoint import read_branch_tensors

    tensors, meta = read_branch_tensors(tmp_path / "b4" / "qzoom_branch.safetensors")
    saved = folder_tensors(middle)
    assert meta["branches"] == "gate,rpn" and tensors
    assert all(torch.equal(v, saved[f"qzoom_branch.{k}"]) for k, v in tensors.items())


def test_a_llamafactory_output_can_be_the_base_of_a_new_folder(stage1, tmp_path):
    """Stage 3 after an LF stage 2 starts from a saved full model that already holds qzoom_branch.* tensors: the
    new folder copies its weights without them (no tensor twice), and the branches are the checkpoint's."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    root, _, proc, out1 = stage1("qwen2_5_vl")
    assert proc.returncode == 0, proc.stdout[-3000:]
    ckpt = root / "branches_for_rebase"
    subprocess.run([str(QZOOM), "lf-branches", str(out1), "--out", str(ckpt)], check=True, capture_output=True)
    folder = write_model_folder(out1, tmp_path / "rebased", checkpoint=ckpt, train="gate")
    copied = folder / "model-base.safetensors"
    assert not copied.is_symlink()
    with safe_open(str(copied), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("qzoom_branch.")]
    model, info = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True,
                                                              dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = folder_tensors(out1)
    for name, tensor in model.qzoom_branch.state_dict().items():
        if name.startswith("rpn."):
            assert torch.equal(tensor, trained[f"qzoom_branch.{name}"])
    assert json.loads((folder / "config.json").read_text())["qzoom_base_model"] == str(out1.resolve())

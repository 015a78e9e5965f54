"""`qzoom lf-model` folders: what is on disk, how they load (remote code), their branches, freezing and forward.

Run in .venv-lf (LLaMA-Factory 0.9.5, transformers 5.6.0). References are computed independently here: the
stock base model loaded by transformers, the core's ``build_branches`` on it, a branch checkpoint written by the
core's ``save_branch_checkpoint``.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from lf_train_fixtures import QZOOM, folder_tensors
from PIL import Image

from qzoom_swift.branches import attach_branches, branch_parameters, build_branches, mark_trained_branches
from qzoom_swift.checkpoint import save_branch_checkpoint
from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.llamafactory_plugin.folder import (
    FOLDER_BRANCH_FILE,
    WEIGHTS_INDEX,
    ModelFolderError,
    write_model_folder,
)
from qzoom_swift.llamafactory_plugin.modeling import check_launch_dataset, parse_train, rpn_label_maps

FAMILIES = FAMILY_NAMES


def load(folder, remote: bool = True):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=remote, dtype=torch.float32,
                                                       output_loading_info=True)


def sample_inputs(folder):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    image = Image.new("RGB", (224, 224), (240, 240, 240))
    image.paste((200, 20, 20), (56, 56, 112, 140))
    return chat_inputs(processor, [[image]], ["What colour is the square?"])


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_with_its_remote_code_and_leaves_the_stock_model_unchanged(tmp_path, tiny_dir, family):
    base = tiny_dir(family)
    folder = write_model_folder(base, tmp_path / "lf", train="rpn")
    config = json.loads((folder / "config.json").read_text())
    stock_config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == stock_config["model_type"]
    stock_name = stock_config["architectures"][0]
    assert config["auto_map"] == {"AutoModelForImageTextToText": f"modeling_qzoom.QZoom{stock_name}"}
    assert config["qzoom_train"] == "rpn" and config["qzoom_config"]["family"] == family
    assert (folder / "modeling_qzoom.py").is_file()
    linked = [p for p in folder.iterdir() if p.is_symlink()]
    assert (folder / "model-base.safetensors").resolve() == (base / "model.safetensors").resolve()
    assert {p.name for p in linked} >= {"model-base.safetensors", "tokenizer.json"}
    assert not (folder / "model.safetensors").exists()  # transformers would read it and skip the index
    weight_map = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
    branch_keys = {k for k, f in weight_map.items() if f == FOLDER_BRANCH_FILE}
    assert branch_keys and all(k.startswith("qzoom_branch.") for k in branch_keys)

    model, info = load(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    names = [c.__name__ for c in type(model).__mro__]
    assert names[:4] == [f"QZoom{stock_name}", "QZoomGenerationMixin", "QZoomLFModelMixin", stock_name]
    assert "GenerationMixin" in str(model.generate.__func__)  # what LLaMA-Factory's patch_model keeps

    reference, _ = load(base, remote=False)
    assert type(reference).__name__ == stock_name
    expected = build_branches(reference, model.qzoom_branch.qzoom_config).state_dict()
    got = model.qzoom_branch.state_dict()
    assert set(got) == set(expected)
    on_disk = folder_tensors(folder)
    for key, value in got.items():
        assert torch.equal(value, on_disk[f"qzoom_branch.{key}"])
        if not key.startswith("gate.head."):  # the head is a fresh Linear; the layers are copies of B..B+R-1
            assert torch.equal(value, expected[key]), key

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in branch_parameters(model, "rpn")}

    inputs = sample_inputs(folder)
    with torch.no_grad():
        ours = model.eval()(**inputs).logits
        stock = reference.eval()(**inputs).logits
    assert torch.equal(ours, stock)


def test_folder_without_a_branch_to_train_freezes_only_the_branches(tmp_path, tiny_dir):
    folder = write_model_folder(tiny_dir("qwen2_5_vl"), tmp_path / "lf")
    assert json.loads((folder / "config.json").read_text())["qzoom_train"] is None
    model, _ = load(folder)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in branch_parameters(model)}


@pytest.mark.parametrize("train", ["gate", "rpn"])
def test_folder_from_a_branch_checkpoint_starts_an_untrained_gate_from_its_base(tmp_path, tiny_dir, train):
    """As ``swift_plugin.tuner``: --train gate re-copies a never-trained gate from BASE; otherwise it is kept."""
    from transformers import AutoModelForImageTextToText

    base = tiny_dir("qwen2_5_vl")
    donor = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    branches = attach_branches(donor)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in branches.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a checkpoint whose every tensor differs from the base copies
    mark_trained_branches(donor, ("rpn",))
    ckpt = save_branch_checkpoint(donor, tmp_path / "ckpt")
    saved = {k: v.clone() for k, v in branches.state_dict().items()}

    folder = write_model_folder(base, tmp_path / "lf", checkpoint=ckpt, train=train)
    model, _ = load(folder)
    reference = build_branches(AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32),
                               model.qzoom_branch.qzoom_config).state_dict()
    got = model.qzoom_branch.state_dict()
    for key, value in got.items():
        if key.startswith("gate.layers.") and train == "gate":
            assert torch.equal(value, reference[key]), key
            assert not torch.equal(value, saved[key])
        else:
            assert torch.equal(value, saved[key]), key
    assert model.qzoom_branch.qzoom_config.extra["trained_branches"] == ["rpn"]


def test_lf_model_command_refuses_a_non_empty_out_and_replaces_it_atomically_with_force(tmp_path, tiny_dir):
    base = tiny_dir("llava")
    out = tmp_path / "lf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cmd = [str(QZOOM), "lf-model", str(base), "--out", str(out), "--train", "gate"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 1 and "not empty" in res.stderr and "--force" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"
    res = subprocess.run([*cmd, "--force", "--branch-layer", "3"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    assert not (out / "keep.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["qzoom_train"] == "gate" and config["qzoom_config"]["branch_layer"] == 3
    assert sorted(os.listdir(tmp_path)) == ["lf"]  # no temporary or old folder left beside it

    res = subprocess.run([str(QZOOM), "lf-model", str(base), "--out", str(tmp_path / "x"), "--checkpoint",
                          str(tmp_path / "nope")], capture_output=True, text=True)
    assert res.returncode == 1 and "--checkpoint" in res.stderr and not (tmp_path / "x").exists()
    res = subprocess.run([str(QZOOM), "lf-model", str(base), "--out", str(tmp_path / "y"), "--checkpoint",
                          str(out), "--branch-depth", "2"], capture_output=True, text=True)
    assert res.returncode == 2 and "--checkpoint brings its own" in res.stderr


def test_a_training_batch_without_the_branch_columns_is_refused_naming_the_fix(tmp_path, tiny_dir):
    folder = write_model_folder(tiny_dir("qwen2_5_vl"), tmp_path / "lf", train="rpn")
    model, _ = load(folder)
    inputs = sample_inputs(folder)
    labels = inputs["input_ids"].clone()
    labels[:, :-2] = -100
    model.train()
    with pytest.raises(ValueError, match=r"qzoom_rpn_labels.*qzoom lf-dataset"):
        model(**inputs, labels=labels)
    grid = inputs["image_grid_thw"][0, 1:].div(2).long()
    cells = int(grid.prod())
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['qzoom_rpn_grid'\]"):
        model(**inputs, labels=labels, qzoom_rpn_labels=torch.zeros(1, cells, dtype=torch.long))
    out = model(**inputs, labels=labels, qzoom_rpn_labels=torch.zeros(1, cells + 3, dtype=torch.long).index_fill_(
        1, torch.arange(cells, cells + 3), -100), qzoom_rpn_grid=grid[None])
    assert out.loss.requires_grad and out.rpn_token_logits is not None  # the branch loss, not the LM loss
    model.eval()
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == model.config.text_config.vocab_size  # no columns: stock path


def test_rpn_label_maps_drop_the_padding_and_refuse_a_grid_that_does_not_fit():
    labels = torch.tensor([[1, 0, -100, 0, 1, 0, -100, -100], [-100] * 8])
    maps = rpn_label_maps(labels, torch.tensor([[2, 3], [0, 0]]))
    assert maps[0].tolist() == [[1, 0, -100], [0, 1, 0]] and maps[1] is None
    with pytest.raises(ValueError, match="does not fit the 8 cells"):
        rpn_label_maps(labels, torch.tensor([[3, 3], [0, 0]]))
    with pytest.raises(ValueError, match="labels past the 4 cells"):
        rpn_label_maps(labels, torch.tensor([[2, 2], [0, 0]]))
    with pytest.raises(ValueError, match="qzoom_train='depth'"):
        parse_train("depth")
    assert parse_train("rpn,gate") == ("rpn", "gate") and parse_train(None) == ()


def test_the_launch_check_names_remove_unused_columns_and_a_missing_dataset(tmp_path):
    check_launch_dataset(("rpn",), {"do_train": False})  # chat / api: nothing to check
    with pytest.raises(ValueError, match="remove_unused_columns: false"):
        check_launch_dataset(("rpn",), {"do_train": True, "tokenized_path": str(tmp_path)})
    with pytest.raises(ValueError, match="does not exist.*qzoom lf-dataset"):
        check_launch_dataset(("gate",), {"do_train": True, "remove_unused_columns": False,
                                         "tokenized_path": str(tmp_path / "none")})


def test_write_model_folder_refuses_a_base_without_safetensors(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="safetensors"):
        write_model_folder(tmp_path / "base", tmp_path / "out")


def test_the_shipped_stage1_and_stage3_recipes_parse_with_llamafactorys_own_parser():
    """Every LLaMA-Factory recipe of stages 1 and 3 (the demo's toy ones too) is valid for 0.9.5 and trains a branch
    alone, and `qzoom recipes` lists the shipped ones."""
    import yaml
    from llamafactory.hparams.parser import _parse_train_args

    from qzoom_swift.recipes_command import RECIPES_DIR, list_recipes

    names = [n for n in list_recipes() if n.startswith("llamafactory/") and ("stage1" in n or "stage3" in n)]
    shipped = {f"llamafactory/{m}/{s}.yaml" for m in ("tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_4b")
               for s in ("stage1_sdrpn", "stage3_gate")} | {"llamafactory/llava1_5_7b/stage1_sdrpn.yaml"}
    assert shipped <= set(names)  # LLaVA has no stage 3 (no resolution trajectory), as in the ms-swift recipes
    for name in names:
        recipe = yaml.safe_load((RECIPES_DIR / name).read_text())
        recipe["bf16"] = False  # this CPU machine refuses bf16 at parse time
        model_args, data_args, training_args, finetuning_args, _ = _parse_train_args(recipe)
        assert model_args.trust_remote_code and training_args.do_train, name
        assert finetuning_args.finetuning_type == "full" and finetuning_args.freeze_vision_tower, name
        assert finetuning_args.freeze_multi_modal_projector and finetuning_args.freeze_language_model, name
        assert training_args.remove_unused_columns is False and data_args.tokenized_path, name
        assert data_args.template in ("qwen2_vl", "qwen3_vl_nothink", "llava"), name
        assert data_args.dataset == ["qzoom_stage1" if "stage1" in name else "qzoom_stage3"], name

"""Stage 1 end to end on tiny models: `qzoom pseudo-labels` -> `swift sft recipes/tiny/stage1_sdrpn.yaml`.

Three concurrent `swift sft` runs (CLI overrides of model/dataset/output on top of the tiny recipe):
Qwen2.5-VL and LLaVA overfit a handful of pseudo-labelled samples (the RPN loss must fall and only RPN
weights may change; the reloaded checkpoint must reproduce what training saw), and Qwen3-VL trains on
samples that were all ignored at labelling time (null label maps: exact zero loss, never the LM loss).
Plus the recipes themselves: every key is a `swift sft` flag, the full-size ones carry the paper's setting.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qzoom_swift.bench.sft import run_swift_concurrently
from qzoom_swift.swift_plugin import MODEL_TYPES, plugin_path
from qzoom_swift.synthetic.images import write_shape_dataset

pytestmark = pytest.mark.slow  # runs the swift CLI or the demo: not in the quick loop (-m "not slow")

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny" / "stage1_sdrpn.yaml"
FULL_RECIPES = {name: REPO / "recipes" / name / "stage1_sdrpn.yaml"
                for name in ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_4b", "llava1_5_7b")}
FIT_ARGS = ["--tau-fg", "0.9", "--tau-bg", "0.8", "--max-box-fraction", "0.9", "--min-peak", "1e-3"]
OVERFIT = ("qwen2_5_vl", "llava")
NULLS = "qwen3_vl"


def _logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def labelled(tiny_dir, tmp_path_factory):
    """Pseudo-label shards made by the real CLI: 6 records per family (a mix of sizes, non-square)."""
    from qzoom_swift.cli import main

    root = tmp_path_factory.mktemp("stage1")
    data = write_shape_dataset(root / "data", n=6, seed=5, size=(392, 280))
    shards = {}
    for family in MODEL_TYPES:
        out = root / f"labels-{family}"
        extra = [] if family == NULLS else FIT_ARGS  # default thresholds: flat tiny maps are all ignored
        assert main(["pseudo-labels", "--model", str(tiny_dir(family)), "--dataset", str(data), "--out", str(out),
                     "--max-new-tokens", "4", "--batch-size", "3", "--calibration", "3", "--no-progress",
                     *extra]) == 0
        shards[family] = out / "shard-00000.jsonl"
    return root, shards


@pytest.fixture(scope="module")
def sft_runs(tiny_dir, labelled):
    root, shards = labelled
    work = root / "sft"
    commands = {}
    for family, model_type in MODEL_TYPES.items():
        args = ["sft", str(TINY_RECIPE), "--model", str(tiny_dir(family)), "--model_type", model_type,
                "--dataset", str(shards[family]), "--output_dir", str(work / family),
                "--external_plugins", plugin_path()]  # the recipe's relative path only works from the repo root
        if family == NULLS:
            args += ["--max_steps", "2", "--save_steps", "2"]
        commands[family] = args
    runs = run_swift_concurrently(commands, work)
    return {family: (runs[family], work / family) for family in MODEL_TYPES}


def test_labelling_made_usable_and_ignored_samples(labelled):
    _, shards = labelled
    for family, shard in shards.items():
        rows = [json.loads(line) for line in shard.read_text().splitlines()]
        assert len(rows) == 6
        if family == NULLS:
            assert all(r["qzoom_rpn_labels"] is None and r["qzoom_status"].startswith("ignored") for r in rows)
        else:
            assert all(r["qzoom_status"] == "ok" for r in rows)
            assert all(sum(v == 1 for row in r["qzoom_rpn_labels"] for v in row) > 0 for r in rows)


@pytest.mark.parametrize("family", OVERFIT)
def test_swift_sft_recipe_drives_the_rpn_loss_down(sft_runs, family):
    run, out = sft_runs[family]
    assert run.returncode == 0, run.tail()
    losses = [row["qzoom_rpn_loss"] for row in _logs(out) if "qzoom_rpn_loss" in row]
    assert len(losses) == 12  # max_steps 12, logging every step (from the recipe)
    assert losses[-1] < 0.25 * losses[0], losses
    assert not any("token_acc" in row for row in _logs(out))  # the LM loss never ran
    args = json.loads((out / "args.json").read_text())
    # CLI flags after the YAML override it; the rest comes from the recipe (and QZOOM_TRAIN from its ENV block)
    assert args["model_type"] == MODEL_TYPES[family] and Path(args["model"]).name.startswith(family)
    assert args["learning_rate"] == 2e-3 and args["adam_beta2"] == 0.98 and args["lr_scheduler_type"] == "constant"
    assert args["tuner_type"] == "qzoom"


@pytest.mark.parametrize("family", OVERFIT)
def test_only_rpn_weights_changed(sft_runs, tiny_dir, family):
    run, out = sft_runs[family]
    assert run.returncode == 0, run.tail()
    ckpt = out / "checkpoint-12"
    config = json.loads((ckpt / "qzoom_config.json").read_text())
    assert config["extra"]["trained_branches"] == ["rpn"]
    b, r = config["branch_layer"], config["branch_depth"]
    base = {}
    for path in tiny_dir(family).glob("model*.safetensors"):
        base.update(load_file(str(path)))
    branch = load_file(str(ckpt / "qzoom_branch.safetensors"))

    def base_tensor(layer: int, rest: str) -> torch.Tensor:
        matches = [k for k in base if k.endswith(f"layers.{layer}.{rest}") and "vision" not in k]
        assert len(matches) == 1, (layer, rest, matches)
        return base[matches[0]]

    gate_layers = [k for k in branch if k.startswith("gate.layers.")]
    rpn_keys = [k for k in branch if k.startswith("rpn.")]
    assert gate_layers and rpn_keys
    for key in gate_layers:  # untouched copies of base layers B..B+R-1
        i, rest = key.split(".", 3)[2:]
        assert torch.equal(branch[key], base_tensor(b + int(i), rest)), key
    for key in rpn_keys:  # every RPN tensor moved away from the base layer it was copied from
        if key.startswith("rpn.layers."):
            i, rest = key.split(".", 3)[2:]
            source = base_tensor(b + int(i), rest)
        else:
            rest = key.split(".", 2)[2]
            prefix = "" if rest.startswith("input_layernorm") else "self_attn."
            source = base_tensor(b + r - 1, prefix + rest)
        assert not torch.equal(branch[key], source), key


@pytest.mark.parametrize("family", OVERFIT)
def test_reloaded_checkpoint_reproduces_the_fit_and_labels_align_with_the_training_grid(
        sft_runs, labelled, tiny_dir, family):
    """The in-process reload (what `swift infer --adapters` does) classifies the training labels, on the grid
    the template gives the image, with the query token the trainer used."""
    from swift.model import get_model_processor
    from swift.template import get_template

    from qzoom_swift.swift_plugin import register
    from qzoom_swift.swift_plugin.tuner import QZoomTuner, prepare_branch_training

    register()
    run, out = sft_runs[family]
    assert run.returncode == 0, run.tail()
    model, processor = get_model_processor(str(tiny_dir(family)), model_type=MODEL_TYPES[family],
                                           torch_dtype=torch.float32)
    QZoomTuner.from_pretrained(model, str(out / "checkpoint-12"))
    prepare_branch_training(model, ("rpn",))
    model.eval()
    template = get_template(processor, template_type=MODEL_TYPES[family])
    template.set_mode("train")
    rows = [json.loads(line) for line in labelled[1][family].read_text().splitlines()]
    for row in rows:
        encoded = template.encode({k: row[k] for k in ("messages", "images", "qzoom_rpn_labels")})
        batch = template.data_collator([encoded])
        if "image_grid_thw" in batch:
            _, h, w = batch["image_grid_thw"][0].tolist()
            assert [h // 2, w // 2] == row["qzoom_attn_grid"]  # labelled on the training grid (non-square)
        else:
            assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 16 * 16
        with torch.no_grad():
            result = model(**batch)
        # a wrong query token at training time shows up here as inverted maps (accuracies near 0)
        assert result.metrics["qzoom_rpn_fg_acc"].item() >= 0.9 and result.metrics["qzoom_rpn_bg_acc"].item() >= 0.95
        assert result.loss.item() < 0.15


def test_null_label_maps_train_with_an_exact_zero_branch_loss(sft_runs):
    run, out = sft_runs[NULLS]
    assert run.returncode == 0, run.tail()
    steps = [row for row in _logs(out) if "qzoom_rpn_loss" in row]
    assert len(steps) == 2 and all(row["qzoom_rpn_loss"] == 0.0 and row["loss"] == 0.0 for row in steps)
    assert not any("token_acc" in row for row in _logs(out))


def test_visualize_with_a_trained_checkpoint(sft_runs, labelled, tmp_path):
    from PIL import Image

    from qzoom_swift.cli import main

    run, out = sft_runs["qwen2_5_vl"]
    assert run.returncode == 0, run.tail()
    png = tmp_path / "pred.png"
    assert main(["visualize", "--shard", str(labelled[1]["qwen2_5_vl"]), "--index", "2", "--out", str(png),
                 "--checkpoint", str(out / "checkpoint-12"), "--dpi", "40"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (640, 160)  # 4 panels of 4 x 4 inches at 40 dpi


# -------------------------------------------------------------------------------------------- recipes


def _sft_flags() -> set[str]:
    from swift.arguments import SftArguments

    return {f.name for f in dataclasses.fields(SftArguments)}


@pytest.mark.parametrize("path", [TINY_RECIPE, *FULL_RECIPES.values()], ids=lambda p: p.parent.name)
def test_recipe_keys_are_swift_sft_flags_and_the_header_says_how_to_launch(path):
    text = path.read_text()
    recipe = yaml.safe_load(text)
    env = recipe.pop("ENV")
    assert env["QZOOM_TRAIN"] == "rpn"
    unknown = set(recipe) - _sft_flags()
    assert not unknown, f"{path}: not swift sft flags: {unknown}"
    assert recipe["tuner_type"] == "qzoom" and recipe["model_type"] in MODEL_TYPES.values()
    assert (REPO / recipe["external_plugins"]).resolve() == Path(plugin_path())
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(f"swift sft recipes/{path.parent.name}/stage1_sdrpn.yaml" in line for line in header)
    assert any("qzoom pseudo-labels" in line for line in header)
    assert any("--external_plugins $(qzoom plugin-path)" in line for line in header)


@pytest.mark.parametrize("name", list(FULL_RECIPES))
def test_full_size_recipes_carry_the_papers_setting(name):
    recipe = yaml.safe_load(FULL_RECIPES[name].read_text())
    env = recipe["ENV"]
    assert float(recipe["learning_rate"]) == 1e-4 and float(recipe["adam_beta2"]) == 0.98
    assert float(recipe["weight_decay"]) == 0.0 and recipe["lr_scheduler_type"] == "cosine"
    assert float(recipe["warmup_ratio"]) == 0.03 and recipe["num_train_epochs"] == 1
    global_batch = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * env["NPROC_PER_NODE"]
    assert global_batch == 128
    from qzoom_swift.families.registry import FAMILIES

    spec = next(s for s in FAMILIES.values() if s.qzoom_model_type == recipe["model_type"])
    assert env["QZOOM_BRANCH_LAYER"] in set(spec.known_branch_layers.values())

"""Stage 2 (Post-SFT) under LLaMA-Factory (tiny models, CPU, .venv-lf).

The input_ids LLaMA-Factory builds from an exported stage-2 row (two images: source, crop), and the positions
``zoomed_position_ids`` makes of its collator's, must equal what the plugin's Post-SFT sequence builder
(``post_sft.roi_training_sequence``) makes of the same sample tokenized with one image. Then the real
``llamafactory-cli train``: its first logged loss is the stock model's loss on the builder's positions (not on
LLaMA-Factory's own), so the zoomed positions reached ``forward``; the LLM trains, the vision side does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lf_data_fixtures import LF_TEMPLATES, mined_rows, tokenized, write_job
from PIL import Image

from qzoom_swift.config import QZoomConfig
from qzoom_swift.families import get_adapter
from qzoom_swift.families.registry import FAMILY_NAMES
from qzoom_swift.llamafactory_plugin.data import LFExportOptions, export_lf_dataset
from qzoom_swift.llamafactory_plugin.post_sft import zoomed_position_ids
from qzoom_swift.post_sft import roi_training_sequence


def _export(tmp: Path, model: Path, family: str) -> tuple[list[dict], Path]:
    rows = mined_rows(tmp)
    job = write_job(tmp / "mined", "mine-hard", rows)
    out = tmp / "data2"
    export_lf_dataset(LFExportOptions(job=str(job), model=str(model), template=LF_TEMPLATES[family], out=str(out),
                                      progress=False))
    return rows, out


def _lf_pipeline(model_dir: Path, family: str, dataset_dir: Path, name: str):
    """LLaMA-Factory's tokenizer, processor and template, and its own tokenization of ``dataset_dir``'s ``name``."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    model_args, data_args = HfArgumentParser((ModelArguments, DataArguments)).parse_dict({
        "model_name_or_path": str(model_dir), "trust_remote_code": True, "template": LF_TEMPLATES[family],
        "dataset": name, "dataset_dir": str(dataset_dir), "cutoff_len": 8192, "image_max_pixels": 4096 * 4096,
        "image_min_pixels": 1024})
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    args = Seq2SeqTrainingArguments(output_dir=str(dataset_dir / "unused"), report_to="none")
    data = get_dataset(template, model_args, data_args, args, stage="sft", **module)["train_dataset"]
    return module, template, list(data)


def _one_image_rows(out: Path) -> Path:
    """The exported rows with the crop removed (one <image>, the source image): what ms-swift's template encodes."""
    rows = json.loads((out / "qzoom_stage2.json").read_text())
    one = [{"messages": [dict(m, content=m["content"].replace("<image><image>", "<image>")) for m in r["messages"]],
            "images": r["images"][:1]} for r in rows]
    root = out.parent / "one_image"
    root.mkdir()
    (root / "one.json").write_text(json.dumps(one))
    (root / "dataset_info.json").write_text(json.dumps({"one": {
        "file_name": "one.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    for r in rows:  # relative image paths resolve against the export
        (root / "images").mkdir(exist_ok=True)
        src = out / r["images"][0]
        (root / r["images"][0]).symlink_to(src)
    return root


def _collated(model, module, template, out: Path) -> dict:
    from llamafactory.data.collator import SFTDataCollatorWith4DAttentionMask

    collator = SFTDataCollatorWith4DAttentionMask(
        template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=-100, attn_implementation="sdpa",
        compute_dtype=torch.float32, **module)
    return collator(list(tokenized(out)))


def _references(model, module, family: str, rows: list[dict], out: Path) -> list[dict]:
    """``roi_training_sequence`` on each sample, tokenized by LLaMA-Factory with its source image only."""
    one_dir = _one_image_rows(out)
    _, _, one = _lf_pipeline(Path(model.name_or_path), family, one_dir, "one")
    adapter = get_adapter(family)
    refs = []
    for row, enc in zip(rows, one):
        source = Image.open(enc["images"][0]).convert("RGB")
        sample = {"input_ids": enc["input_ids"], "labels": enc["labels"],
                  **adapter.encode_images(module["processor"], [source])}
        original = Image.open(row["images"][0]).convert("RGB")
        refs.append(roi_training_sequence(model, module["processor"], family, sample, original, row["qzoom_roi"],
                                          QZoomConfig()))
    return refs


def _stock_model(path: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.slow  # LLaMA-Factory's loader runs three times per family
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_ids_and_positions_reaching_forward_equal_the_post_sft_builder(tiny_dir, tmp_path, family):
    rows, out = _export(tmp_path, tiny_dir(family), family)
    model = _stock_model(tiny_dir(family))
    module, template, _ = _lf_pipeline(tiny_dir(family), family, out, "qzoom_stage2")
    batch = _collated(model, module, template, out)
    assert batch["qzoom_roi"].shape == (2, 6)  # the column reached the batch through the collator
    refs = _references(model, module, family, rows, out)
    mask = batch["attention_mask"].bool()
    pos = zoomed_position_ids(model, batch["input_ids"], batch.get("image_grid_thw"), batch["qzoom_roi"],
                              batch.get("position_ids"), batch["attention_mask"])
    unmasked = zoomed_position_ids(model, batch["input_ids"], batch.get("image_grid_thw"), batch["qzoom_roi"],
                                   batch.get("position_ids"))
    for b, ref in enumerate(refs):
        assert batch["input_ids"][b][mask[b]].tolist() == ref["input_ids"]
        assert batch["labels"][b][mask[b]].tolist() == ref["labels"]
        if family == "llava":  # sequential positions: the two-image sequence's are the zoomed ones
            assert pos is None and batch.get("position_ids") is None and ref.get("position_ids") is None
            continue
        got = pos[-3:, b][:, mask[b]]
        assert torch.equal(got, ref["position_ids"].to(got.dtype))
        assert torch.equal(unmasked[-3:, b][:, mask[b]], got)  # right padding: the same without the mask
        stock = batch["position_ids"][-3:, b][:, mask[b]].float()
        assert not torch.equal(stock, got)  # LLaMA-Factory's own positions are not the zoomed ones
        if pos.shape[0] == 4:
            assert torch.equal(pos[0], batch["position_ids"][0].float())  # text positions kept
    if family != "llava":
        images = batch["image_grid_thw"].prod(-1).tolist()
        pixels = torch.split(batch["pixel_values"], images)
        for b, ref in enumerate(refs):
            assert torch.allclose(torch.cat(pixels[2 * b:2 * b + 2]), ref["pixel_values"], atol=1e-5)
            assert batch["image_grid_thw"][2 * b:2 * b + 2].tolist() == ref["image_grid_thw"].tolist()


def test_a_row_that_is_not_the_zoomed_layout_is_refused(tiny_dir, tmp_path):
    family = "qwen2_5_vl"
    rows, out = _export(tmp_path, tiny_dir(family), family)
    model = _stock_model(tiny_dir(family))
    module, template, _ = _lf_pipeline(tiny_dir(family), family, out, "qzoom_stage2")
    batch = _collated(model, module, template, out)
    args = (model, batch["input_ids"], batch["image_grid_thw"])
    wrong_grid = batch["qzoom_roi"].clone()
    wrong_grid[0, 4] += 1
    with pytest.raises(ValueError, match="row 0: qzoom_roi was made for a 4x5 source grid"):
        zoomed_position_ids(*args, wrong_grid, batch["position_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match="one row of 6 ints per sample"):
        zoomed_position_ids(*args, batch["qzoom_roi"][:1], batch["position_ids"])
    no_roi = batch["qzoom_roi"].clone()
    no_roi[:, 0] = -1  # rows without a RoI keep their positions
    same = zoomed_position_ids(*args, no_roi, batch["position_ids"], batch["attention_mask"])
    assert torch.equal(same, batch["position_ids"].float())


@pytest.mark.slow  # llamafactory-cli train, 3 steps
def test_llamafactory_cli_stage2_trains_the_llm_on_the_zoomed_positions(tiny_dir, tmp_path):
    from lf_train_fixtures import REPO, folder_tensors, logged_losses, run_lf, trainable_params

    from qzoom_swift.llamafactory_plugin.folder import write_model_folder

    family = "qwen2_5_vl"
    base = tiny_dir(family)
    folder = write_model_folder(base, tmp_path / "stage2_model")  # qzoom_train null: branches frozen
    rows, out = _export(tmp_path, folder, family)
    recipe = REPO / "qzoom_swift" / "recipes" / "llamafactory" / "tiny" / "stage2_post_sft.yaml"
    run = run_lf(["train", str(recipe), f"model_name_or_path={folder}", f"dataset_dir={out}",
                  f"tokenized_path={out / 'tokenized'}", f"output_dir={tmp_path / 'train'}"], cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]

    # the first logged loss is the stock model's on the Post-SFT builder's positions
    torch.set_num_threads(1)
    model = _stock_model(base)
    module, template, _ = _lf_pipeline(base, family, out, "qzoom_stage2")
    batch = _collated(model, module, template, out)
    refs = _references(model, module, family, rows, out)
    zoomed = batch["position_ids"].float().clone()
    for b, ref in enumerate(refs):
        zoomed[-3:, b, batch["attention_mask"][b].bool()] = ref["position_ids"].float()
    inputs = {k: v for k, v in batch.items() if k != "qzoom_roi"}
    with torch.no_grad():
        stock_loss = model(**inputs).loss.item()
        ref_loss = model(**{**inputs, "position_ids": zoomed}).loss.item()
    first = logged_losses(tmp_path / "train")[0]
    assert abs(first - ref_loss) < 1e-5, (first, ref_loss, stock_loss)
    assert abs(stock_loss - ref_loss) > 10 * abs(first - ref_loss) + 1e-6

    # the LLM trains; the vision tower, projector and branches do not
    expected = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual."))
    assert trainable_params(run.stdout) == expected
    before, after = folder_tensors(folder), folder_tensors(tmp_path / "train")
    vision = [k for k in before if k.startswith(("visual.", "model.visual."))]  # checkpoint names, either layout
    llm = [k for k in before if k.startswith(("model.layers.", "model.language_model.layers."))]
    branch = [k for k in before if k.startswith("qzoom_branch.")]
    assert vision and llm and branch and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in vision + branch)
    assert sum(not torch.equal(before[k], after[k]) for k in llm) > len(llm) // 2


@pytest.mark.parametrize("slug", ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_4b", "llava1_5_7b"])
def test_full_size_stage2_recipes_parse_and_repeat_the_ms_swift_hyper_parameters(slug):
    import yaml
    from lf_train_fixtures import REPO
    from llamafactory.hparams.parser import _parse_train_args

    recipe = yaml.safe_load((REPO / "qzoom_swift" / "recipes" / "llamafactory" / slug / "stage2_post_sft.yaml").read_text())
    _, data_args, train_args, finetune_args, _ = _parse_train_args({**recipe, "bf16": False})  # CPU: no bf16 check
    assert (finetune_args.finetuning_type, finetune_args.freeze_vision_tower, finetune_args.freeze_multi_modal_projector,
            finetune_args.freeze_language_model) == ("full", True, True, False)
    assert not train_args.remove_unused_columns and data_args.tokenized_path.endswith("data2/tokenized")
    swift = yaml.safe_load((REPO / "qzoom_swift" / "recipes" / (slug if slug != "llava1_5_7b" else "qwen2_5_vl_7b")
                            / "stage2_post_sft.yaml").read_text())
    for key in ("learning_rate", "adam_beta2", "weight_decay", "lr_scheduler_type", "warmup_ratio", "num_train_epochs",
                "max_grad_norm"):
        ours, theirs = recipe[key], swift[key]  # YAML reads 1e-6 as a string, 1.0e-6 as a float
        assert (ours == theirs if isinstance(theirs, str) and not theirs[0].isdigit() else
                float(ours) == float(theirs)), key
    assert recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] == \
        swift["per_device_train_batch_size"] * swift["gradient_accumulation_steps"] == 64

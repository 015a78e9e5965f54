"""Stage-1 rows reach the model on their labels' grid, and LLaVA's RPN sees one geometry everywhere (issue 26, 1 and 3).

Everything goes through the real ``qzoom_*`` template in ms-swift's training mode, i.e. the encode ``swift sft``
runs for every row, with the environment's default ``IMAGE_*_TOKEN_NUM`` (which alone would encode a 500 px
square at 18 x 18 tokens). The expected grids are computed here with ``qwen_vl_utils.smart_resize``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image


def _row(path, grid: tuple[int, int] | None, **extra) -> dict:
    row = {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "a"}],
           "images": [str(path)], **extra}
    if grid is not None:
        row["qzoom_rpn_labels"] = [[0] * grid[1] for _ in range(grid[0])]
    return row


def _template(tiny_dir, family: str, mode: str = "train"):
    from swift.model import get_model_processor
    from swift.template import get_template

    from qzoom_swift.swift_plugin import MODEL_TYPES, register

    register()
    model, processor = get_model_processor(str(tiny_dir(family)), model_type=MODEL_TYPES[family],
                                           torch_dtype=torch.float32)
    template = get_template(processor, template_type=MODEL_TYPES[family])
    template.set_mode(mode)
    template.model = model
    return template, model, processor


def _merged_grid(encoded: dict) -> tuple[int, int]:
    _, h, w = encoded["image_grid_thw"][0].tolist()
    return h // 2, w // 2


@pytest.fixture
def wide_image(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (500, 375), (200, 40, 40)).save(path)
    return path


@pytest.mark.parametrize("family,unit", [("qwen2_5_vl", 28), ("qwen3_vl", 32)])
def test_a_padded_500x375_row_trains_at_exactly_24x24(tiny_dir, wide_image, family, unit):
    from qwen_vl_utils import smart_resize

    template, _, _ = _template(tiny_dir, family)
    # what ms-swift's defaults alone give the 500 px padded square: a coarser grid (the bug)
    h, w = smart_resize(500, 500, factor=unit)
    assert (h // unit, w // unit) != (24, 24)
    encoded = template.encode(_row(wide_image, (24, 24), qzoom_pad_square=True))
    assert _merged_grid(encoded) == (24, 24)
    assert [m.shape for m in encoded["qzoom_rpn_labels"]] == [torch.Size([24, 24])]
    # a null map (sample ignored at labelling) still trains on the grid it was labelled on
    null = _row(wide_image, None, qzoom_pad_square=True, qzoom_rpn_labels=None, qzoom_attn_grid=[24, 24])
    assert _merged_grid(template.encode(null)) == (24, 24)


@pytest.mark.slow  # runs swift sft (one step)
def test_swift_sft_trains_a_padded_500x375_row_at_24x24_whatever_the_token_env(tiny_dir, wide_image, tmp_path):
    """The CLI itself: ms-swift logs the first encoded row, whose image placeholder is 24 x 24 = 576 tokens even
    with IMAGE_MAX_TOKEN_NUM=256 and IMAGE_MIN_TOKEN_NUM=4 in the environment."""
    import json
    from pathlib import Path

    from qzoom_swift.bench.sft import run_swift_concurrently
    from qzoom_swift.swift_plugin import plugin_path

    model = tiny_dir("qwen2_5_vl")
    image_token = json.loads((model / "config.json").read_text())["image_token_id"]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(_row(wide_image, (24, 24), qzoom_pad_square=True, qzoom_attn_grid=[24, 24])) + "\n")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "stage1_sdrpn.yaml"
    args = ["sft", str(recipe), "--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--save_steps", "1", "--external_plugins", plugin_path()]
    run = run_swift_concurrently({"sft": args}, tmp_path / "work",
                                 env={"IMAGE_MAX_TOKEN_NUM": "256", "IMAGE_MIN_TOKEN_NUM": "4"})["sft"]
    assert run.returncode == 0, run.tail()
    log = run.log.read_text(errors="replace")
    assert f"[{image_token} * 576]" in log, [line for line in log.splitlines() if "[INPUT]" in line]


def test_native_grid_rows_train_at_their_labelling_grid(tiny_dir, wide_image):
    from qwen_vl_utils import smart_resize

    template, _, _ = _template(tiny_dir, "qwen2_5_vl")
    natural = smart_resize(375, 500, factor=28)
    assert (natural[0] // 28, natural[1] // 28) != (9, 12)
    assert _merged_grid(template.encode(_row(wide_image, (9, 12)))) == (9, 12)  # aspect kept, grid exact
    # a row asking for its own budget keeps it (the zoom bench trains 16x16 labels at 4x4; they are pooled)
    own = _row(wide_image, (9, 12), chat_template_kwargs={"min_pixels": 16 * 784, "max_pixels": 16 * 784})
    assert _merged_grid(template.encode(own)) != (9, 12)
    # rows without labels (gate, base SFT) are untouched
    plain = _row(wide_image, None)
    assert _merged_grid(template.encode(plain)) == (natural[0] // 28, natural[1] // 28)


def test_a_label_grid_for_several_images_is_refused(tiny_dir, wide_image):
    template, _, _ = _template(tiny_dir, "qwen2_5_vl")
    row = _row(wide_image, None, qzoom_attn_grid=[24, 24])
    row["images"] = [str(wide_image)] * 2
    row["messages"][0]["content"] = "<image><image>What is it?"
    with pytest.raises(ValueError, match="qzoom_attn_grid"):
        template.encode(row)


# --------------------------------------------------------------------------------------- LLaVA geometry


def _rgb(pixel_values: torch.Tensor, processor) -> torch.Tensor:
    ip = processor.image_processor
    return pixel_values * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]


def test_llava_labels_training_and_inference_share_the_padded_square(tiny_dir, tmp_path):
    """A tall image with a red mark at its top end (which llava-hf's centre crop would cut off): the cell the
    labelling view puts the mark in is the cell training and inference encode it in, and the cell the zoom maps
    back onto the mark in the original image."""
    from qzoom_swift.families import get_adapter
    from qzoom_swift.families.llava import mean_colour
    from qzoom_swift.labels.pseudo import released_grid_image
    from qzoom_swift.roi import GridBox, crop_image, region_pixel_box

    path = tmp_path / "tall.png"
    image = Image.new("RGB", (200, 400), (0, 160, 0))
    image.paste((255, 0, 0), (80, 10, 120, 50))  # the mark: x 80-120, y 10-50 (top end)
    image.save(path)
    adapter = get_adapter("llava")
    train, model, processor = _template(tiny_dir, "llava")
    side = adapter.encoded_grid(model, {})[0]  # 16 cells on the tiny model's 224 px CLIP
    fill = mean_colour(processor)

    # labelling view (qzoom pseudo-labels): the padded square, at the grid; the mark's cell, found independently
    labelled = released_grid_image(image, adapter.patch_unit, side, fill)
    cell_px = labelled.width / side
    row, col = int(30 / 400 * side), int((100 + 100) / 400 * side)  # mark centre (100, 30), 100 px left padding
    assert labelled.getpixel((int((col + 0.5) * cell_px), int((row + 0.5) * cell_px)))[0] > 200

    # training (swift sft's encode) and inference (swift infer's) see exactly that square
    row_ = _row(path, (side, side), qzoom_pad_square=True)
    trained = train.encode(row_)["pixel_values"][0]
    infer, _, _ = _template(tiny_dir, "llava", mode="pt")
    served = infer.encode({"messages": row_["messages"][:1], "images": [str(path)]})["pixel_values"][0]
    assert torch.allclose(trained, served)
    api = adapter.encode_images(processor, [adapter.resize_for_budget(image, 0, 0)])["pixel_values"][0]
    assert torch.allclose(api, served)  # QZoomModel / gate-labels: the same square
    labelling = adapter.encode_images(processor, [labelled])["pixel_values"][0]
    assert (labelling - served).abs().mean() < 0.05  # the same view (resampled once more by PIL)
    rgb = _rgb(served, processor)
    scale = rgb.shape[-1] / side
    y, x = int((row + 0.5) * scale), int((col + 0.5) * scale)
    assert rgb[0, y, x] > 0.8 and rgb[1, y, x] < 0.3  # the mark is in the label's cell
    assert abs(rgb[0, y, 2] - fill[0] / 255) < 0.05  # left padding in the mean colour, not cropped away
    # the old view (llava-hf's centre crop of the original) lost the top end, mark included
    cropped = _rgb(adapter.encode_images(processor, [image])["pixel_values"][0], processor)
    assert cropped[0].max() < 0.5

    # the zoom maps that cell back onto the mark in the original image
    box = region_pixel_box(GridBox(col, row, col + 1, row + 1), (side, side), image.size,
                           adapter.source_region(image.size, processor), min_side=1)
    assert box.left <= 100 < box.right and box.top <= 30 < box.bottom
    assert crop_image(image, box).getpixel((100 - box.left, 30 - box.top)) == (255, 0, 0)


def test_a_box_in_llava_padding_is_clipped_into_the_image():
    from qzoom_swift.roi import GridBox, padded_region, region_pixel_box

    region = padded_region((200, 400))
    assert region == (-100.0, 0.0, 300.0, 400.0)
    box = region_pixel_box(GridBox(0, 0, 2, 2), (24, 24), (200, 400), region, min_side=28)  # all padding
    assert (box.left, box.right) == (0, 28) and box.top == 0 and box.bottom >= 28
    box = region_pixel_box(GridBox(20, 5, 24, 8), (24, 24), (200, 400), region, min_side=28)
    assert box.right == 200 and 0 <= box.left < 200 and box.right - box.left >= 28


def test_llava_pseudo_labels_are_made_on_the_padded_square(tiny_dir, tmp_path):
    import json

    from qzoom_swift.labels.pseudo import JobError, PseudoLabelOptions, run_pseudo_labels

    path = tmp_path / "wide.png"
    Image.new("RGB", (400, 200), (40, 120, 200)).save(path)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(_row(path, None)) + "\n")
    opts = dict(model=str(tiny_dir("llava")), dataset=str(data), max_new_tokens=4, calibration=1, tau_fg=0.9,
                tau_bg=0.8, max_box_fraction=1.0, min_peak=0.0, progress=False)
    with pytest.raises(JobError, match="--grid native"):
        run_pseudo_labels(PseudoLabelOptions(out=str(tmp_path / "native"), grid="native", **opts))
    out = tmp_path / "labels"
    run_pseudo_labels(PseudoLabelOptions(out=str(out), **opts))  # --grid auto
    rec = json.loads((out / "shard-00000.jsonl").read_text().splitlines()[0])
    assert rec["qzoom_pad_square"] is True and rec["qzoom_attn_grid"] == [16, 16]
    labels = torch.tensor(rec["qzoom_rpn_labels"])
    assert (labels[:4] == 0).all() and (labels[12:] == 0).all()  # the padding rows are known background

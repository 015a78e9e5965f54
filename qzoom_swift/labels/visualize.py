"""``qzoom visualize``: one PNG per pseudo-label record, to debug localisation by looking.

Panels, left to right: the image (with the part the visual tokens cover outlined), the raw attention map,
the tri-state pseudo label (green = foreground, blue = background, grey = ignored; the ignore box in
yellow) and, with a checkpoint, the RPN's predicted heatmap (sigmoid) with the box inference would crop.
Maps are drawn over the region of the image the token grid covers: the whole image for Qwen-VL (which
resizes), the padded square of a square-grid record (every LLaVA-1.5 record: it sees images so), the centre
square of an older LLaVA record labelled on llava-hf's centre crop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qzoom_swift.fileio import atomic_path
from qzoom_swift.roi import grid_region


def read_shard_record(shard: str | Path, index: int = 0, record_id: str | None = None) -> dict:
    """Line ``index`` of a shard, or the record whose ``qzoom_id`` is ``record_id``."""
    shard = Path(shard)
    if not shard.is_file():
        raise FileNotFoundError(f"shard {shard} not found")
    with open(shard, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.endswith("\n"):
                break  # partial last line of a running/killed job
            if (record_id is None and i == index) or (record_id is not None and f'"qzoom_id": "{record_id}"' in line):
                return json.loads(line)
    what = f"record {record_id!r}" if record_id is not None else f"line {index}"
    raise ValueError(f"{shard}: no {what}")


def _job_of(shard: Path) -> dict:
    path = shard.parent / "job.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def predict_heatmap(model_dir: str, checkpoint: str, record: dict, base_dir: Path, max_tokens: int,
                    tau_roi: float | None = None, load: Any = None):
    """(sigmoid heatmap [h, w] numpy, grid box or None, tau_roi) of a trained RPN on the record's question."""
    import torch

    from qzoom_swift.checkpoint import load_branch_checkpoint
    from qzoom_swift.labels.pseudo import Prepared, prepare_record, set_max_visual_tokens
    from qzoom_swift.loading import load_model
    from qzoom_swift.prefill import prefill
    from qzoom_swift.roi import roi_box_from_heatmap

    model, processor = load_model(model_dir, load)
    cfg = load_branch_checkpoint(model, checkpoint)
    set_max_visual_tokens(processor, max_tokens)
    prepared = prepare_record({k: v for k, v in record.items() if not k.startswith("qzoom_")}, base_dir, False)
    if not isinstance(prepared, Prepared):
        raise ValueError(f"record cannot be shown to the model: {prepared.reason}: {prepared.detail}")
    text = processor.apply_chat_template(prepared.messages, add_generation_prompt=True)
    from qzoom_swift.families import get_adapter

    adapter = get_adapter(model)
    image = adapter.source_image(prepared.image, processor)  # LLaVA: the mean-colour square, as at inference
    if record.get("qzoom_pad_square"):  # labelled on the released grid: shown padded, as in training
        from qzoom_swift.roi import pad_to_square

        image = pad_to_square(image, adapter.square_fill(processor))
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(model.device)
    with torch.inference_mode():
        state = prefill(model, branches=("rpn",), **inputs)
    logits = state.heatmaps()[0].float()
    tau = cfg.tau_roi if tau_roi is None else tau_roi
    from qzoom_swift.zoom import sink_keep_mask

    box = roi_box_from_heatmap(logits, tau, cfg.blur_kernel, cfg.blur_sigma, sink_keep_mask(cfg, state, 0))
    return torch.sigmoid(logits).cpu().numpy(), box, tau


def _record_image(record: dict, job: dict, shard: Path):
    """(the record's image, the directory its relative paths start from: the job's dataset, else the shard's)."""
    from PIL import Image

    images = record.get("images") or []
    if not images:
        raise ValueError("the record has no image")
    image_path = Path(images[0] if isinstance(images[0], str) else images[0]["path"])
    dataset = job.get("settings", {}).get("dataset")
    base_dir = Path(dataset).parent if dataset else shard.parent
    if not image_path.is_absolute():
        image_path = base_dir / image_path
    return Image.open(image_path).convert("RGB"), base_dir


def _processor_of(model_dir: str | None):
    """The model's processor when its directory is here (it decides the covered region), else None."""
    if not (model_dir and Path(model_dir).is_dir()):
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def _grid_rect(region: tuple[float, float, float, float], grid: tuple[int, int], box, color: str):
    """The outline of a token-grid box [x0, y0, x1, y1] in image pixels."""
    from matplotlib.patches import Rectangle

    left, top, right, bottom = region
    h, w = grid
    cell_w, cell_h = (right - left) / w, (bottom - top) / h
    x0, y0, x1, y1 = box
    return Rectangle((left + x0 * cell_w, top + y0 * cell_h), (x1 - x0) * cell_w, (y1 - y0) * cell_h,
                     fill=False, edgecolor=color, linewidth=2)


def _draw_label_panels(axes, image, region, record: dict, attn: np.ndarray) -> None:
    """The image, attention and pseudo-label panels (every panel gets the image underneath)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    left, top, right, bottom = region
    extent = (left, right, bottom, top)
    labels = record.get("qzoom_rpn_labels")
    label_map = (np.full(attn.shape, -100) if labels is None else np.asarray(labels)).astype(np.int64)
    h, w = attn.shape
    for ax in axes:
        ax.imshow(image)
        ax.set_axis_off()
    axes[0].add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white",
                                linestyle="--", linewidth=1))
    axes[0].set_title(f"image {image.width}x{image.height}, grid {h}x{w}", fontsize=9)
    axes[1].imshow(attn / max(float(attn.max()), 1e-12), cmap="jet", alpha=0.55, extent=extent,
                   interpolation="nearest")
    axes[1].set_title(f"attention (peak {record.get('qzoom_peak', float(attn.max())):.3g})", fontsize=9)
    codes = np.where(label_map == 1, 2, np.where(label_map == 0, 1, 0))
    cmap = ListedColormap([(0.5, 0.5, 0.5, 0.35), (0.1, 0.3, 0.95, 0.45), (0.1, 0.85, 0.2, 0.7)])
    axes[2].imshow(codes, cmap=cmap, vmin=0, vmax=2, extent=extent, interpolation="nearest")
    if record.get("qzoom_box"):
        axes[2].add_patch(_grid_rect(region, (h, w), record["qzoom_box"], "yellow"))
    axes[2].set_title(f"pseudo label: {record.get('qzoom_status', '?')} "
                      f"(fg {int((label_map == 1).sum())}, bg {int((label_map == 0).sum())})", fontsize=9)


def _draw_prediction(ax, region, grid: tuple[int, int], heat: np.ndarray, box, tau: float) -> None:
    """The RPN heatmap panel, with the box inference would crop (rescaled to the label grid)."""
    left, top, right, bottom = region
    h, w = grid
    ph, pw = heat.shape
    ax.imshow(heat, cmap="magma", alpha=0.6, vmin=0.0, vmax=1.0, extent=(left, right, bottom, top),
              interpolation="nearest")
    if box is not None:
        sx, sy = w / pw, h / ph
        ax.add_patch(_grid_rect(region, grid, (box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy), "cyan"))
    ax.set_title(f"predicted heatmap (tau_roi {tau:g}): {'box' if box else 'no box'}", fontsize=9)


def render_record_png(shard: str | Path, out: str | Path, *, index: int = 0, record_id: str | None = None,
                      checkpoint: str | None = None, model: str | None = None, tau_roi: float | None = None,
                      dpi: int = 100, load: Any = None) -> tuple[Path, tuple[int, int]]:
    """Write the PNG of one shard record; returns (path, (width, height) in pixels).

    ``load`` (``loading.LoadSettings``) places the model that predicts the heatmap (default: auto).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    shard = Path(shard)
    record = read_shard_record(shard, index, record_id)
    job = _job_of(shard)
    model_dir = model or job.get("settings", {}).get("model")
    if checkpoint is not None and not model_dir:
        raise ValueError("--checkpoint needs the base model: pass --model (no job.json next to the shard)")
    image, base_dir = _record_image(record, job, shard)
    processor = _processor_of(model_dir)
    if record.get("qzoom_pad_square"):  # the released grid covers the padded square (LLaVA: its mean colour)
        from qzoom_swift.families import get_adapter
        from qzoom_swift.families.registry import RELEASED_PAD_FILL
        from qzoom_swift.roi import pad_to_square

        fill = get_adapter(job["family"]).square_fill(processor) if job.get("family") else RELEASED_PAD_FILL
        image = pad_to_square(image, fill)
    region = grid_region(image.size, processor)
    attn = np.asarray(record["qzoom_attn"], dtype=np.float32)
    panels = 4 if checkpoint else 3
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4), dpi=dpi)
    _draw_label_panels(axes, image, region, record, attn)
    if checkpoint:
        heat, box, tau = predict_heatmap(model_dir, checkpoint, record, base_dir,
                                         int(job.get("settings", {}).get("max_tokens", 576)), tau_roi, load)
        _draw_prediction(axes[3], region, attn.shape, heat, box, tau)
    fig.suptitle(f"{record.get('qzoom_id', '')}  answer: {str(record.get('qzoom_answer', ''))[:60]!r}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    with Image.open(out) as png:
        size = png.size
    return out, size

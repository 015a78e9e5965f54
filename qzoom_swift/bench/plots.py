"""Zoom-bench figures (matplotlib, Agg): accuracy-vs-throughput Pareto and RPN heatmap overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(summary: dict[str, Any], path: Path, labels: dict[str, str]) -> Path:
    """Overall accuracy against throughput relative to the reference baseline, one point per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    runs = summary["runs"]
    base = sorted((r for r in runs.values() if r["mode"] == "never"), key=lambda r: r["tokens"])
    ax.plot([r["relative_throughput"] for r in base], [100 * r["accuracy"] for r in base], "-o", color="tab:gray",
            label="baseline (budget sweep)")
    for r in base:
        ax.annotate(f"{r['tokens']} tok", (r["relative_throughput"], 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=8)
    for name, r in runs.items():
        if r["mode"] == "never":
            continue
        ax.plot([r["relative_throughput"]], [100 * r["accuracy"]], "*" if r["mode"] == "zoom" else "s", markersize=12
                if r["mode"] == "zoom" else 7, label=labels.get(name, name))
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.2g}x"))
    ax.set_xlabel(f"throughput relative to {summary['reference']} (end to end, batch 1)")
    ax.set_ylabel("accuracy, all questions (%)")
    ax.set_title("Zoom bench: accuracy vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_overlays(items: list[dict[str, Any]], path: Path) -> Path:
    """Per test question: the image with the GT box (green) and the RPN box (red), and the low-res heatmap."""
    import numpy as np
    from PIL import Image

    plt = _plt()
    n = max(1, len(items))
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), dpi=100, squeeze=False)
    for k, item in enumerate(items):
        with Image.open(item["image"]) as im:
            image = np.asarray(im.convert("RGB"))
        h, w = image.shape[:2]
        top, bottom = axes[0][k], axes[1][k]
        top.imshow(image)
        x0, y0, x1, y1 = item["gt_box"]
        top.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=2))
        if item.get("box"):
            b = [item["box"][0] * w, item["box"][1] * h, item["box"][2] * w, item["box"][3] * h]
            top.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color="red", linewidth=2))
        top.set_title(f"{item['kind']}: {item['answer']} -> {item['model_answer']}, gate {item['gate_prob']:.2g}",
                      fontsize=8)
        bottom.imshow(image)
        bottom.imshow(np.asarray(item["heatmap"]), cmap="magma", alpha=0.6, extent=(0, w, h, 0), vmin=0, vmax=1,
                      interpolation="nearest")
        bottom.set_title("RPN sigmoid heatmap (low res)", fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

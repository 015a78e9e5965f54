"""``QZoomConfig``: every Q-Zoom knob in one documented dataclass, saved as ``qzoom_config.json``.

The branch layer B and depth R decide where the gate and the region proposal head read the frozen LLM;
the thresholds and budgets decide when and how far inference zooms. Defaults follow the paper and the
official release (see ``shared/reference/qzoom-reference.md``); model-specific B comes from
``default_branch_layer``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "qzoom_config.json"
BRANCH_WEIGHTS_NAME = "qzoom_branch.safetensors"

SUPPORTED_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")
ZOOM_MODES = ("zoom", "always", "never")

# Branch layer B of the released checkpoints: (family, number of decoder layers, hidden size) -> B.
# Qwen2.5-VL-3B and Qwen3-VL-4B both have 36 layers; 7B has 28; LLaVA-1.5-7B has 32, 13B has 40.
KNOWN_BRANCH_LAYERS: dict[tuple[str, int, int], int] = {
    ("qwen2_5_vl", 36, 2048): 24,  # Qwen2.5-VL-3B
    ("qwen2_5_vl", 28, 3584): 18,  # Qwen2.5-VL-7B
    ("qwen3_vl", 36, 2560): 24,  # Qwen3-VL-4B
    ("llava", 32, 4096): 15,  # LLaVA-1.5-7B
    ("llava", 40, 5120): 15,  # LLaVA-1.5-13B
}
BRANCH_DEPTH_FRACTION = 0.65  # B / L for unknown sizes: the known checkpoints sit at 0.47-0.67 of depth


def default_branch_layer(family: str, num_layers: int, hidden_size: int, depth: int = 3) -> int:
    """B for a model: the paper's value for known checkpoints, else about 0.65 of the depth.

    The result always leaves room for the R copied layers (B + R <= L) and for at least one base layer
    below the branch (B >= 1).
    """
    known = KNOWN_BRANCH_LAYERS.get((family, num_layers, hidden_size))
    b = known if known is not None else int(round(BRANCH_DEPTH_FRACTION * num_layers))
    return max(1, min(b, num_layers - depth))


@dataclass
class QZoomConfig:
    """Q-Zoom hyper-parameters. ``None`` for ``branch_layer`` means "pick from the model"."""

    family: str = ""
    """Model family of the base model: qwen2_5_vl, qwen3_vl or llava (filled in when attaching)."""
    branch_layer: int | None = None
    """B: the branches read the hidden state after base layers [0, B). Deeper is more accurate, costlier."""
    branch_depth: int = 3
    """R: gate = R copied layers + Linear; RPN = R-1 copied layers + q/k of layer B+R-1."""
    num_hidden_layers: int = 0
    hidden_size: int = 0
    """Shape of the base LLM the branches were made for (checked when loading a checkpoint)."""

    # Inference: gate and region.
    mode: str = "zoom"
    """zoom: gated (zoom when the gate fires); always: RoI for every sample; never: low-resolution only."""
    tau_gate: float = 0.1
    """Zoom when the gate probability is >= tau_gate. 0 = always zoom, > 1 = never."""
    tau_roi: float = 0.1
    """Cells whose blurred sigmoid heatmap exceeds tau_roi form the region. Lower = larger boxes."""
    blur_kernel: int = 3
    blur_sigma: float = 1.0
    """Gaussian blur of the sigmoid heatmap before thresholding (kernel size, sigma in cells)."""
    min_box_side: int = 28
    """Minimum side of the crop, in pixels of the original image."""
    low_max_tokens: int = 576
    low_min_tokens: int = 256
    """Visual-token budget of the first (low-resolution) pass."""
    roi_max_tokens: int = 576
    roi_min_tokens: int = 256
    """Visual-token budget of the re-encoded crop; small crops are up-sampled to at least roi_min_tokens."""

    # Stage 1 pseudo labels.
    tau_fg: float = 0.2
    """Foreground: attention > tau_fg * max. The paper's best; the official scripts use 0.25."""
    tau_bg: float = 0.05
    """Background: outside the box and attention < tau_bg * max."""
    max_box_fraction: float = 0.5
    """Ignore a sample whose foreground box covers at least this fraction of the grid."""
    min_peak: float = 5e-3
    """Ignore a sample whose attention peak is below this (nothing to distil)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values (e.g. per-task overrides) that travel with the checkpoint."""

    def __post_init__(self) -> None:
        if self.family and self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"QZoomConfig.family={self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.mode not in ZOOM_MODES:
            raise ValueError(f"QZoomConfig.mode={self.mode!r}; choose from {', '.join(ZOOM_MODES)}")
        if self.branch_depth < 2:
            raise ValueError(f"QZoomConfig.branch_depth={self.branch_depth}: R must be >= 2 (RPN uses R-1 layers)")
        for name in ("tau_roi", "tau_fg", "tau_bg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"QZoomConfig.{name}={value}: expected a number in [0, 1]")

    def resolved_for(self, family: str, num_layers: int, hidden_size: int) -> QZoomConfig:
        """A copy with family, shape and B filled in for a concrete base model; validates B + R <= L."""
        b = self.branch_layer
        if b is None:
            b = default_branch_layer(family, num_layers, hidden_size, self.branch_depth)
        if not (1 <= b and b + self.branch_depth <= num_layers):
            raise ValueError(
                f"branch_layer B={b} with branch_depth R={self.branch_depth} does not fit a model with "
                f"{num_layers} decoder layers: need 1 <= B and B + R <= {num_layers}"
            )
        return dataclasses.replace(
            self, family=family, branch_layer=b, num_hidden_layers=num_layers, hidden_size=hidden_size
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QZoomConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QZoomConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> QZoomConfig:
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a Q-Zoom checkpoint directory holds {CONFIG_NAME} and {BRANCH_WEIGHTS_NAME}"
            )
        return cls.from_dict(json.loads(path.read_text()))


ENV_PREFIX = "QZOOM_"


def config_from_env(base: QZoomConfig | None = None, environ: dict[str, str] | None = None) -> QZoomConfig:
    """``base`` with every field overridden by a ``QZOOM_<FIELD>`` environment variable that is set.

    ms-swift turns ``--model_kwargs '{"QZOOM_TAU_GATE": 0.05}'`` into such variables, which is how
    Q-Zoom knobs reach ``swift sft/infer/deploy`` without new CLI flags.
    """
    env = os.environ if environ is None else environ
    values = (base or QZoomConfig()).to_dict()
    for f in dataclasses.fields(QZoomConfig):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None or f.name == "extra":
            continue
        current = values[f.name]
        try:
            if f.name == "branch_layer":
                values[f.name] = None if raw.strip().lower() in ("", "none", "auto") else int(raw)
            elif isinstance(current, bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes")
            elif isinstance(current, int):
                values[f.name] = int(raw)
            elif isinstance(current, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = raw
        except ValueError as exc:
            raise ValueError(f"environment variable {ENV_PREFIX}{f.name.upper()}={raw!r}: {exc}") from exc
    return QZoomConfig.from_dict(values)

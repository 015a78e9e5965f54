"""Configuration, read once at the boundary: ``QZoomConfig`` and every ``QZOOM_*`` environment variable.

``QZoomConfig`` is every Q-Zoom knob in one documented dataclass, saved as ``qzoom_config.json``. The
branch layer B and depth R decide where the gate and the region proposal head read the frozen LLM; the
thresholds and budgets decide when and how far inference zooms. Defaults follow the paper and the
official release (see ``shared/reference/qzoom-reference.md``); model-specific B comes from
``default_branch_layer``. Stage-1 labelling thresholds are their own dataclass (``LabelThresholds``),
carried in the config for provenance.

The environment is read here and nowhere else in the library (``read_env``): one truthiness rule, a
clear error for a value that does not parse. The inference config that a run uses is built by
``effective_config`` with one precedence, lowest first:

1. the checkpoint's ``qzoom_config.json`` (or the defaults when there is none);
2. ``QZOOM_<FIELD>`` environment variables (ms-swift's ``--model_kwargs`` become such variables);
3. per-call overrides (``config_overrides=``, evalscope ``model_args``, ``qzoom eval`` run settings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.families.registry import FAMILY_NAMES, get_spec
from qzoom_swift.fileio import write_json_atomic

CONFIG_NAME = "qzoom_config.json"
BRANCH_WEIGHTS_NAME = "qzoom_branch.safetensors"

ZOOM_MODES = ("zoom", "always", "never")
BRANCH_NAMES = ("gate", "rpn")
"""The two branches; ``QZOOM_TRAIN`` and checkpoints name them."""
ROUTERS = ("torch", "onnx")
"""Where the branch heads run at inference (``QZOOM_ROUTER``)."""

BRANCH_DEPTH_FRACTION = 0.65  # B / L for unknown sizes: the known checkpoints sit at 0.47-0.67 of depth


def default_branch_layer(family: str, num_layers: int, hidden_size: int, depth: int = 3) -> int:
    """B for a model: the paper's value for known checkpoints (family registry), else about 0.65 of the depth.

    The result always leaves room for the R copied layers (B + R <= L) and for at least one base layer
    below the branch (B >= 1).
    """
    known = get_spec(family).known_branch_layers.get((num_layers, hidden_size))
    b = known if known is not None else int(round(BRANCH_DEPTH_FRACTION * num_layers))
    return max(1, min(b, num_layers - depth))


@dataclass
class LabelThresholds:
    """Stage-1 tri-state pseudo-label thresholds (``qzoom pseudo-labels``); inference never reads them."""

    tau_fg: float = 0.2
    """Foreground: attention > tau_fg * max. The paper's best; the official scripts use 0.25."""
    tau_bg: float = 0.05
    """Background: outside the box and attention < tau_bg * max."""
    max_box_fraction: float = 0.5
    """Ignore a sample whose foreground box covers at least this fraction of the grid."""
    min_peak: float = 5e-3
    """Ignore a sample whose attention peak is below this (nothing to distil)."""

    def __post_init__(self) -> None:
        for name in ("tau_fg", "tau_bg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"LabelThresholds.{name}={value}: expected a number in [0, 1]")


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

    labelling: LabelThresholds = field(default_factory=LabelThresholds)
    """Stage-1 pseudo-label thresholds (recorded with each checkpoint for provenance)."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form values (e.g. per-task overrides) that travel with the checkpoint."""

    def __post_init__(self) -> None:
        if self.family and self.family not in FAMILY_NAMES:
            raise ValueError(f"QZoomConfig.family={self.family!r}; supported: {', '.join(FAMILY_NAMES)}")
        if isinstance(self.labelling, Mapping):
            self.labelling = LabelThresholds(**self.labelling)
        if self.mode not in ZOOM_MODES:
            raise ValueError(f"QZoomConfig.mode={self.mode!r}; choose from {', '.join(ZOOM_MODES)}")
        if self.branch_depth < 2:
            raise ValueError(f"QZoomConfig.branch_depth={self.branch_depth}: R must be >= 2 (RPN uses R-1 layers)")
        for name in ("tau_roi",):
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
    def from_dict(cls, data: Mapping[str, Any]) -> QZoomConfig:
        data = dict(data)
        legacy = {k: data.pop(k) for k in _LABEL_FIELDS if k in data}  # configs saved before LabelThresholds
        if legacy:
            data["labelling"] = {**dict(data.get("labelling") or {}), **legacy}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QZoomConfig keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> QZoomConfig:
        """A copy with ``overrides`` (field -> value) applied and validated; ``self`` when there are none."""
        if not overrides:
            return self
        return QZoomConfig.from_dict({**self.to_dict(), **overrides})

    def save(self, directory: str | Path) -> Path:
        return write_json_atomic(Path(directory) / CONFIG_NAME, self.to_dict(), sort_keys=True)

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


_LABEL_FIELDS = tuple(f.name for f in dataclasses.fields(LabelThresholds))

# ------------------------------------------------------------------------------------------ environment

ENV_PREFIX = "QZOOM_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(name: str, raw: str) -> bool:
    """One truthiness rule for every boolean variable; anything else is an error naming the variable."""
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name}={raw!r}: expected true or false ({', '.join(TRUE_WORDS + FALSE_WORDS)})")


@dataclass(frozen=True)
class EnvSettings:
    """Every ``QZOOM_*`` environment variable, parsed and validated (``read_env``)."""

    config_overrides: dict[str, Any] = field(default_factory=dict)
    """``QZOOM_<FIELD>`` values for ``QZoomConfig`` fields (e.g. ``QZOOM_TAU_GATE``)."""
    attach: bool = True
    """``QZOOM_ATTACH``: the ``qzoom_*`` model types attach the branches after loading (0 for Post-SFT)."""
    train: tuple[str, ...] = ()
    """``QZOOM_TRAIN``: which branches ``--tuner_type qzoom`` trains (``rpn``, ``gate`` or ``rpn,gate``)."""
    roi_noise: float = 0.0
    """``QZOOM_ROI_NOISE``: Post-SFT probability of replacing a stored RoI by a random one (released Qwen3: 0.8)."""
    router: str = "torch"
    """``QZOOM_ROUTER``: ``torch`` (the branches in the model) or ``onnx`` (onnxruntime, ``QZOOM_ONNX_*``)."""
    onnx_dir: str = ""
    onnx_provider: str = "auto"
    onnx_precision: str = "fp32"
    """``QZOOM_ONNX_DIR`` / ``_PROVIDER`` / ``_PRECISION``: the exported heads the onnx router runs."""
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "qzoom_swift")
    """``QZOOM_CACHE``: locally built model dirs and the demo's trained toy models."""


_ENV_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(QZoomConfig) if f.name not in ("extra", "labelling")}


def _config_value(name: str, raw: str, current: Any) -> Any:
    if name == "branch_layer":
        return None if raw.strip().lower() in ("", "none", "auto") else int(raw)
    if isinstance(current, bool):
        return parse_bool(ENV_PREFIX + name.upper(), raw)
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    return raw


def read_env(environ: Mapping[str, str] | None = None) -> EnvSettings:
    """Parse every ``QZOOM_*`` variable of ``environ`` (default: the process environment) at once."""
    env = os.environ if environ is None else environ
    defaults = QZoomConfig()
    overrides: dict[str, Any] = {}
    for name in _ENV_CONFIG_FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        try:
            overrides[name] = _config_value(name, raw, getattr(defaults, name))
        except ValueError as exc:
            raise ValueError(f"environment variable {ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from exc
    train_raw = env.get("QZOOM_TRAIN", "")
    train = tuple(w.strip() for w in train_raw.replace("+", ",").split(",") if w.strip())
    if [w for w in train if w not in BRANCH_NAMES]:
        raise ValueError(f"QZOOM_TRAIN={train_raw!r}: choose from {', '.join(BRANCH_NAMES)} (comma-separated)")
    router = env.get("QZOOM_ROUTER", "torch").strip().lower() or "torch"
    if router not in ROUTERS:
        raise ValueError(f"QZOOM_ROUTER={router!r}; choose from {', '.join(ROUTERS)}")
    noise_raw = env.get("QZOOM_ROI_NOISE", "0").strip() or "0"
    try:
        roi_noise = float(noise_raw)
    except ValueError as exc:
        raise ValueError(f"QZOOM_ROI_NOISE={noise_raw!r}: expected a probability in [0, 1]") from exc
    if not 0.0 <= roi_noise <= 1.0:
        raise ValueError(f"QZOOM_ROI_NOISE={noise_raw!r}: expected a probability in [0, 1]")
    cache = env.get("QZOOM_CACHE")
    return EnvSettings(
        config_overrides=overrides,
        attach=parse_bool("QZOOM_ATTACH", env["QZOOM_ATTACH"]) if env.get("QZOOM_ATTACH") else True,
        train=train,
        roi_noise=roi_noise,
        router=router,
        onnx_dir=env.get("QZOOM_ONNX_DIR", "").strip(),
        onnx_provider=env.get("QZOOM_ONNX_PROVIDER", "auto").strip() or "auto",
        onnx_precision=env.get("QZOOM_ONNX_PRECISION", "fp32").strip() or "fp32",
        **({"cache_dir": Path(cache)} if cache else {}),
    )


def effective_config(base: QZoomConfig | None = None, overrides: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None) -> QZoomConfig:
    """The inference config a run uses: ``base`` (checkpoint) < ``QZOOM_<FIELD>`` environment < ``overrides``."""
    env = read_env(environ).config_overrides
    return (base or QZoomConfig()).with_overrides({**env, **(overrides or {})})


def config_from_env(base: QZoomConfig | None = None, environ: Mapping[str, str] | None = None) -> QZoomConfig:
    """``base`` with every ``QZOOM_<FIELD>`` environment variable applied (``effective_config`` without overrides).

    ms-swift turns ``--model_kwargs '{"QZOOM_TAU_GATE": 0.05}'`` into such variables, which is how
    Q-Zoom knobs reach ``swift sft/infer/deploy`` without new CLI flags.
    """
    return effective_config(base, None, environ)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The process environment plus ``extra``: what a child process (a worker, ``swift sft``) should get."""
    return {**os.environ, **extra}

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
import difflib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qzoom_swift.families.registry import FAMILY_NAMES, get_spec
from qzoom_swift.fileio import write_json_atomic

CONFIG_NAME = "qzoom_config.json"
BRANCH_WEIGHTS_NAME = "qzoom_branch.safetensors"

ZOOM_MODES = ("zoom", "always", "never")
ROI_FALLBACKS = ("none", "peak")
"""What a gated zoom does when no heatmap cell passes ``tau_roi`` (``QZoomConfig.roi_fallback``)."""
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


Rule = tuple[str, float | None, float | None, str]
"""(kind: int | odd | float | positive, lowest allowed, highest allowed, what the value means)."""


def check_field(owner: str, name: str, value: Any, rule: Rule) -> Any:
    """``value`` checked against ``rule`` (type, range, finiteness); the error names the field and the range.

    Integral floats (``576.0`` from a hand-edited json) become ints; bools and strings are refused.
    """
    kind, low, high, note = rule
    integer = kind in ("int", "odd")
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if integer:
        expected = f"an odd integer >= {low}" if kind == "odd" else f"an integer >= {low}"
    elif kind == "positive":
        expected = "a finite number > 0"
    else:
        expected = f"a finite number in [{low:g}, {high:g}]" if high is not None else f"a finite number >= {low:g}"
    expected += f" ({note})" if note else ""
    bad = isinstance(value, bool) or not ok_type
    if not bad:
        bad = (not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high)
               or (kind == "positive" and value <= 0) or (kind == "odd" and value % 2 == 0))
    if bad:
        raise ValueError(f"{owner}.{name}={value!r}: expected {expected}")
    return value


_LABEL_RULES: dict[str, Rule] = {
    "tau_fg": ("float", 0.0, 1.0, ""),
    "tau_bg": ("float", 0.0, 1.0, ""),
    "max_box_fraction": ("positive", None, 1.0, "a fraction of the grid, at most 1"),
    "min_peak": ("float", 0.0, None, ""),
}


@dataclass
class LabelThresholds:
    """Stage-1 tri-state pseudo-label thresholds (``qzoom pseudo-labels``); inference never reads them."""

    tau_fg: float = 0.25
    """Foreground: attention > tau_fg * max. Every released training script passes 0.25 (``roi_binary_coeff``);
    the paper's ablation found 0.2 best (README, differences from the released code)."""
    tau_bg: float = 0.05
    """Background: outside the box and attention < tau_bg * max."""
    max_box_fraction: float = 0.5
    """Ignore a sample whose foreground box covers at least this fraction of the grid."""
    min_peak: float = 5e-3
    """Ignore a sample whose attention peak is below this (nothing to distil)."""

    def __post_init__(self) -> None:
        for name in ("tau_fg", "tau_bg", "max_box_fraction", "min_peak"):
            setattr(self, name, check_field("LabelThresholds", name, getattr(self, name), _LABEL_RULES[name]))


GATE_SCORINGS = ("released", "consensus", "exact", "vqa", "anls", "relaxed", "stored", "auto")
"""How a stage-3 trajectory's answers become right/wrong. ``released`` is the release's filter, rule for rule
(``labels.gate.released_score``): answers lower-cased, stripped and stripped of punctuation, the top two must be
identical, their answer must contain or be contained in the one ground truth (lower-cased, punctuation kept),
each budget is right when it and that answer contain one another. ``consensus`` is the same shape, more lenient
(top answers need only contain each other, ground truths normalised like answers, several allowed).
``exact``/``vqa``/``anls``/``relaxed`` compare each answer with the ground truth (``labels.matchers``);
``stored`` uses the ``qzoom_correct`` a job wrote (an LLM judge); ``auto`` (the ms-swift preprocessor's
default) follows each trajectory's ``qzoom_scoring``, else ``released``."""

_GATE_RULES: dict[str, Rule] = {
    "correct_threshold": ("float", 0.0, 1.0, "a matcher score counted as right"),
    "stable_top": ("int", 1, None, "top budgets that must agree"),
    "positive_prob": ("float", 0.0, 1.0, "a probability"),
    "seed": ("int", 0, None, ""),
}


@dataclass(frozen=True)
class GateSampling:
    """Stage-3 trajectories -> gate training rows: the one rule ``qzoom gate-labels`` (its ``gate_train.jsonl``
    export) and the ms-swift preprocessor (``swift sft`` on trajectory records) share. Defaults are the
    released ones; the preprocessor reads them from ``QZOOM_GATE_<FIELD>`` (``read_env``)."""

    scoring: str = "auto"
    correct_threshold: float = 0.5
    stable_top: int = 2
    """The top budgets whose answers form the reference (released: 2); the top two are never training inputs."""
    positive_prob: float = 0.9
    """Transition samples: chance of a zoom (1) example at one of the last two wrong budgets."""
    easy_per_transition: float = 1.0
    """Easy samples kept per transition sample (released 1:1); negative keeps all."""
    seed: int = 0
    """Seeds the per-sample draws and the easy subset: every rank and rerun draws the same rows."""

    def __post_init__(self) -> None:
        if self.scoring not in GATE_SCORINGS:
            raise ValueError(f"GateSampling.scoring={self.scoring!r}; choose from {', '.join(GATE_SCORINGS)}")
        for name, rule in _GATE_RULES.items():
            object.__setattr__(self, name, check_field("GateSampling", name, getattr(self, name), rule))
        value = self.easy_per_transition
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"GateSampling.easy_per_transition={value!r}: expected a finite number")


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
    sink_mask: bool = True
    """Zero the family's attention-sink cells of the heatmap before the blur, as released (reference §5.2 C.2,
    §5.5): Qwen2.5-VL the top-left corner strips of grids above 256 cells, Qwen3-VL the cells the first token
    scores at sigmoid >= 0.75. LLaVA has no released rule (nothing is masked). False keeps every cell."""
    min_box_side: int = 28
    """Minimum side of the crop, in pixels of the original image."""
    roi_fallback: str = "none"
    """When the gate (or mode always) says zoom but no cell passes tau_roi: none answers from the low-resolution
    pass (as released, ``ZoomStats.reason`` no_roi); peak zooms on the region around the heatmap's peak (cells
    at >= half the peak connected to it, grown to min_box_side; ``ZoomStats.fallback`` roi_peak)."""
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
        """Every field is checked here, so a bad value fails when it is set, naming the field and its range."""
        if not isinstance(self.family, str) or (self.family and self.family not in FAMILY_NAMES):
            raise ValueError(f"QZoomConfig.family={self.family!r}; supported: {', '.join(FAMILY_NAMES)}")
        if isinstance(self.labelling, Mapping):
            self.labelling = LabelThresholds(**self.labelling)
        if not isinstance(self.labelling, LabelThresholds):
            raise ValueError(f"QZoomConfig.labelling={self.labelling!r}: expected LabelThresholds or a mapping")
        if self.mode not in ZOOM_MODES:
            raise ValueError(f"QZoomConfig.mode={self.mode!r}; choose from {', '.join(ZOOM_MODES)}")
        if self.roi_fallback not in ROI_FALLBACKS:
            raise ValueError(f"QZoomConfig.roi_fallback={self.roi_fallback!r}; choose from {', '.join(ROI_FALLBACKS)}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"QZoomConfig.extra={self.extra!r}: expected a mapping")
        if self.branch_layer is not None:
            self.branch_layer = check_field("QZoomConfig", "branch_layer", self.branch_layer, ("int", 1, None, ""))
        for name, rule in _CONFIG_RULES.items():
            setattr(self, name, check_field("QZoomConfig", name, getattr(self, name), rule))
        for low, high in (("low_min_tokens", "low_max_tokens"), ("roi_min_tokens", "roi_max_tokens")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"QZoomConfig.{low}={getattr(self, low)} > {high}={getattr(self, high)}: the "
                                 f"minimum visual-token budget must be <= the maximum (set both)")

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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a valid Q-Zoom config json ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a json object of QZoomConfig fields, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc


_LABEL_FIELDS = tuple(f.name for f in dataclasses.fields(LabelThresholds))
_CONFIG_RULES: dict[str, Rule] = {
    "branch_depth": ("int", 2, None, "R must be >= 2, the RPN uses R-1 layers"),
    "num_hidden_layers": ("int", 0, None, "0 = not yet attached"),
    "hidden_size": ("int", 0, None, "0 = not yet attached"),
    "tau_gate": ("float", 0.0, None, "0 = always zoom, > 1 = never"),
    "tau_roi": ("float", 0.0, 1.0, ""),
    "blur_kernel": ("odd", 1, None, "1 = no blur"),
    "blur_sigma": ("positive", None, None, ""),
    "min_box_side": ("int", 1, None, "pixels"),
    "low_max_tokens": ("int", 1, None, ""),
    "low_min_tokens": ("int", 1, None, ""),
    "roi_max_tokens": ("int", 1, None, ""),
    "roi_min_tokens": ("int", 1, None, ""),
}
"""The range of every numeric ``QZoomConfig`` field (checked by ``__post_init__``)."""

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
    gate_sampling: GateSampling = field(default_factory=GateSampling)
    """``QZOOM_GATE_<FIELD>`` (e.g. ``QZOOM_GATE_SEED``): the stage-3 preprocessor's sampling of gate rows."""
    allowed_local_media_path: Path | None = None
    """``QZOOM_ALLOWED_LOCAL_MEDIA_PATH``: the one folder whose files a ``swift deploy`` of a ``qzoom_*`` template
    reads when a request names a server-side path (vLLM's ``--allowed-local-media-path``); unset: none."""
    allow_media_urls: bool = False
    """``QZOOM_ALLOW_MEDIA_URLS``: such a server fetches http(s) image URLs for its clients (default: refused)."""


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


def _gate_sampling(env: Mapping[str, str]) -> GateSampling:
    """``GateSampling`` from ``QZOOM_GATE_<FIELD>`` variables (unset fields keep the released defaults)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(GateSampling):
        name = f"{ENV_PREFIX}GATE_{f.name.upper()}"
        raw = env.get(name)
        if raw is None or not raw.strip():
            continue
        try:
            values[f.name] = raw.strip().lower() if f.name == "scoring" else type(f.default)(raw.strip())
        except ValueError as exc:
            raise ValueError(f"environment variable {name}={raw!r}: expected a {type(f.default).__name__}") from exc
    try:
        return GateSampling(**values)
    except ValueError as exc:
        raise ValueError(f"environment variables QZOOM_GATE_*: {exc}") from exc


_OTHER_ENV_NAMES = ("ATTACH", "TRAIN", "ROI_NOISE", "ROUTER", "ONNX_DIR", "ONNX_PROVIDER", "ONNX_PRECISION", "CACHE",
                    "ALLOWED_LOCAL_MEDIA_PATH", "ALLOW_MEDIA_URLS")
"""``QZOOM_*`` variables that are not a ``QZoomConfig`` or ``GateSampling`` field (each parsed in ``read_env``)."""


class UnknownEnvWarning(UserWarning):
    """A ``QZOOM_*`` environment variable that nothing reads (most likely a typo)."""


def known_env_names() -> tuple[str, ...]:
    """Every ``QZOOM_*`` variable the library reads, sorted: config fields, ``QZOOM_GATE_*`` and the others."""
    names = [ENV_PREFIX + n.upper() for n in _ENV_CONFIG_FIELDS]
    names += [f"{ENV_PREFIX}GATE_{f.name.upper()}" for f in dataclasses.fields(GateSampling)]
    names += [ENV_PREFIX + n for n in _OTHER_ENV_NAMES]
    return tuple(sorted(names))


_WARNED_ENV: set[str] = set()


def warn_unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warn once per process for each ``QZOOM_*`` name that nothing reads; returns the unknown names.

    A typo (``QZOOM_TAU_GAIT``) would otherwise leave the default in force without a word. ``read_env`` and
    the ``qzoom`` command call it (default: the process environment).
    """
    environ = os.environ if environ is None else environ
    known = known_env_names()
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
    for name in unknown:
        if name in _WARNED_ENV:
            continue
        _WARNED_ENV.add(name)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        warnings.warn(f"environment variable {name} is not a Q-Zoom setting and is ignored; {hint}"
                      f"known: {', '.join(known)}", UnknownEnvWarning, stacklevel=3)
    return unknown


def read_env(environ: Mapping[str, str] | None = None) -> EnvSettings:
    """Parse every ``QZOOM_*`` variable of ``environ`` (default: the process environment) at once.

    An unknown ``QZOOM_*`` name is warned about once (``warn_unknown_env``), not refused: a variable
    meant for another version of the plugin should not stop a run.
    """
    env = os.environ if environ is None else environ
    warn_unknown_env(env)
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
    media_dir = env.get("QZOOM_ALLOWED_LOCAL_MEDIA_PATH", "").strip()
    urls_raw = env.get("QZOOM_ALLOW_MEDIA_URLS", "")
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
        gate_sampling=_gate_sampling(env),
        allowed_local_media_path=Path(media_dir) if media_dir else None,
        allow_media_urls=parse_bool("QZOOM_ALLOW_MEDIA_URLS", urls_raw) if urls_raw.strip() else False,
    )


def effective_config(base: QZoomConfig | None = None, overrides: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None) -> QZoomConfig:
    """The inference config a run uses: ``base`` (checkpoint) < ``QZOOM_<FIELD>`` environment < ``overrides``."""
    env = read_env(environ).config_overrides
    try:
        return (base or QZoomConfig()).with_overrides({**env, **(overrides or {})})
    except ValueError as exc:
        from_env = [f"{ENV_PREFIX}{k.upper()}={env[k]!r}" for k in env if k not in (overrides or {})]
        raise ValueError(f"{exc}" + (f" (environment: {', '.join(from_env)})" if from_env else "")) from exc


def config_from_env(base: QZoomConfig | None = None, environ: Mapping[str, str] | None = None) -> QZoomConfig:
    """``base`` with every ``QZOOM_<FIELD>`` environment variable applied (``effective_config`` without overrides).

    ms-swift turns ``--model_kwargs '{"QZOOM_TAU_GATE": 0.05}'`` into such variables, which is how
    Q-Zoom knobs reach ``swift sft/infer/deploy`` without new CLI flags.
    """
    return effective_config(base, None, environ)


def set_process_env(**values: str) -> None:
    """Set variables a library reads from this process's environment (vLLM's engine settings, before it starts)."""
    os.environ.update(values)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The process environment plus ``extra``: what a child process (a worker, ``swift sft``) should get."""
    return {**os.environ, **extra}


@dataclass(frozen=True)
class LaunchRank:
    """Where this process sits in a torchrun / ``NPROC_PER_NODE`` launch (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int


def read_launch_rank(environ: Mapping[str, str] | None = None) -> LaunchRank | None:
    """The torchrun rank of this process, or None when it was not started by a multi-process launcher.

    Read here (the one home of environment parsing) so the labelling jobs split their records over the
    processes that ``torchrun --nproc_per_node N`` (or ms-swift's ``NPROC_PER_NODE=N``) starts.
    """
    env = os.environ if environ is None else environ
    raw = {k: env.get(k, "").strip() for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if not raw["WORLD_SIZE"]:
        return None
    try:
        world = int(raw["WORLD_SIZE"])
        rank = int(raw["RANK"] or 0)
        local = int(raw["LOCAL_RANK"] or rank)
    except ValueError as exc:
        raise ValueError(f"RANK={raw['RANK']!r} WORLD_SIZE={raw['WORLD_SIZE']!r} LOCAL_RANK={raw['LOCAL_RANK']!r}: "
                         "expected integers (as torchrun sets them)") from exc
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return LaunchRank(rank, world, local) if world > 1 else None


def read_nproc_per_node(environ: Mapping[str, str] | None = None) -> int:
    """ms-swift's ``NPROC_PER_NODE``: how many processes a data-parallel command starts (1 when unset)."""
    env = os.environ if environ is None else environ
    raw = env.get("NPROC_PER_NODE", "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"NPROC_PER_NODE={raw!r}: expected a positive integer (processes per node, one per GPU)")
    return int(raw)

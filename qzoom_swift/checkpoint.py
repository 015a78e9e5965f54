"""Branch checkpoints: ``qzoom_branch.safetensors`` + ``qzoom_config.json``, nothing of the base model.

A checkpoint is only meaningful on the base model it was trained on, so loading checks family, depth,
width and every tensor shape, and says which checkpoint and which model disagree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qzoom_swift.branches import BRANCH_ATTR, BRANCH_NAMES, build_branches, get_branches
from qzoom_swift.config import BRANCH_WEIGHTS_NAME, CONFIG_NAME, QZoomConfig
from qzoom_swift.families import get_adapter
from qzoom_swift.fileio import atomic_path


class BranchCheckpointError(ValueError):
    """A Q-Zoom checkpoint that does not fit the model it is loaded into."""


def is_branch_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / BRANCH_WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file()


def branch_state_dict(model: nn.Module, which: tuple[str, ...] = BRANCH_NAMES,
                      state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the selected branches keyed relative to ``qzoom_branch`` (e.g. ``gate.head.weight``).

    ``state_dict`` may be a full model state dict (ZeRO-3 gathers one at save time); its
    ``qzoom_branch.*`` entries are used instead of the live parameters.
    """
    prefixes = tuple(f"{name}." for name in which)
    if state_dict is not None:
        out = {}
        for key, value in state_dict.items():
            rel = key.split("qzoom_branch.", 1)[1] if "qzoom_branch." in key else None
            if rel is not None and rel.startswith(prefixes):
                out[rel] = value
        return out
    branches = get_branches(model)
    if branches is None:
        raise BranchCheckpointError("the model has no Q-Zoom branches to save")
    return {k: v for k, v in branches.state_dict().items() if k.startswith(prefixes)}


def save_branch_checkpoint(model: nn.Module, directory: str | os.PathLike, which: tuple[str, ...] = BRANCH_NAMES,
                           state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the selected branches and the config atomically into ``directory``."""
    from safetensors.torch import save_file

    branches = get_branches(model)
    if branches is None:
        raise BranchCheckpointError("the model has no Q-Zoom branches to save")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in branch_state_dict(model, which, state_dict).items()}
    cfg = branches.qzoom_config
    meta = {"format": "pt", "family": cfg.family, "branches": ",".join(which), **_layout_meta(cfg)}
    with atomic_path(out / BRANCH_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    cfg.save(out)
    write_model_card(out, cfg, which, getattr(getattr(model, "config", None), "_name_or_path", None) or None)
    return out


MODEL_CARD_NAME = "README.md"
MODEL_CARD_MARK = "<!-- qzoom_swift branch checkpoint card -->"
"""First line of the cards written here: a README.md without it (someone else's) is never replaced."""


def write_model_card(directory: str | os.PathLike, cfg: QZoomConfig, which: tuple[str, ...] = BRANCH_NAMES,
                     base_model: str | None = None) -> Path | None:
    """A short ``README.md``: what the folder is, what trained, and the settings it serves with.

    A checkpoint that travels (a hub upload, another machine) otherwise says nothing about its base model,
    stages or thresholds without opening the json. Rewritten whenever the config changes (calibration).
    """
    from qzoom_swift.fileio import write_text_atomic

    path = Path(directory) / MODEL_CARD_NAME
    if path.is_file() and not path.read_text(errors="replace").startswith(MODEL_CARD_MARK):
        return None
    if base_model is None:
        try:
            base_model = json.loads((Path(directory) / "args.json").read_text()).get("model")
        except (OSError, ValueError):
            base_model = None
    trained = cfg.extra.get("trained_branches")
    stages = {"rpn": "stage 1 (SD-RPN)", "gate": "stage 3 (gate)"}
    calib = cfg.extra.get("gate_calibration")
    samples = cfg.extra.get("train_samples") or {}
    lines = [MODEL_CARD_MARK, "# Q-Zoom branch checkpoint", "",
             "Gate + region proposal head for a frozen vision-language model, written by qzoom_swift; load it with",
             "`swift infer --model BASE --adapters THIS_DIR` or `QZoomModel.from_pretrained(BASE, checkpoint=THIS_DIR)`.",
             "", f"- base model: {base_model or 'not recorded'} (family {cfg.family}, {cfg.num_hidden_layers} layers, "
             f"hidden {cfg.hidden_size})",
             f"- branches saved: {', '.join(which)}",
             "- trained: " + ("not recorded" if trained is None else
                              ", ".join(stages.get(b, b) for b in trained) or "nothing (fresh copies of base layers)"),
             f"- B (branch layer): {cfg.branch_layer}, R (branch depth): {cfg.branch_depth}",
             f"- mode {cfg.mode}, tau_gate {cfg.tau_gate}, tau_roi {cfg.tau_roi}; low budget {cfg.low_min_tokens}-"
             f"{cfg.low_max_tokens} tokens, RoI budget {cfg.roi_min_tokens}-{cfg.roi_max_tokens}",
             "- gate calibration: " + (json.dumps(calib, sort_keys=True) if calib else "none (tau_gate as set)"),
             "- training data: " + (", ".join(f"{b} {n} samples" for b, n in samples.items()) or "not recorded"),
             "", f"Every setting is in `{CONFIG_NAME}`; the tensors in `{BRANCH_WEIGHTS_NAME}`.", ""]
    return write_text_atomic(path, "\n".join(lines))


LAYOUT_KEYS = ("branch_layer", "branch_depth", "num_hidden_layers", "hidden_size")
"""Config fields that decide the tensors' meaning: saved in the file's metadata, checked against the json."""


def _layout_meta(cfg: QZoomConfig) -> dict[str, str]:
    return {k: str(getattr(cfg, k)) for k in LAYOUT_KEYS if getattr(cfg, k) is not None}


def read_branch_tensors(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of a branch file; a corrupt file or a non-finite tensor names itself."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types (and OSError) for damaged files
        raise BranchCheckpointError(f"cannot read {weights}: {type(exc).__name__}: {exc}") from exc
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BranchCheckpointError(f"{weights}: tensor {key!r} holds {bad} non-finite value(s) (NaN/inf); "
                                        "the checkpoint is damaged or its training diverged")
    return tensors, meta


def _check_layout(cfg: QZoomConfig, meta: dict[str, str], ckpt_desc: str) -> None:
    """The json's B, R and shape against what the tensors were saved for (files written since 0.2 record it)."""
    for key in LAYOUT_KEYS:
        saved, now = meta.get(key), getattr(cfg, key)
        if saved is not None and str(now) != saved:
            raise BranchCheckpointError(
                f"{ckpt_desc}: {CONFIG_NAME} says {key}={now} but {BRANCH_WEIGHTS_NAME} was saved with "
                f"{key}={saved}; the config was edited after saving: restore {key}={saved}")


def load_branch_checkpoint(model: nn.Module, directory: str | os.PathLike,
                           config_overrides: dict | None = None) -> QZoomConfig:
    """Attach branches to ``model`` as saved in ``directory`` and load their weights.

    Everything (config, family, depth, width, tensor names, shapes, finiteness) is checked on branches
    built aside; they replace the model's only when all checks pass, so on any error the model is exactly
    as before. Branches absent from the file keep their copy-of-base-layer initialisation; but the ``qzoom``
    tuner saves both branches in every checkpoint, so a stage-1 checkpoint does hold a gate: untrained copies
    of the layers of the model stage 1 ran on. Loading restores those; stage-3 training re-copies the gate from
    the model it trains on (``swift_plugin.tuner``, ``branches.copy_gate_layers``), since that model (after
    Post-SFT) has other layers. ``config_overrides`` changes inference knobs, not shapes.
    """
    ckpt = Path(directory)
    weights = ckpt / BRANCH_WEIGHTS_NAME
    if not weights.is_file():
        raise BranchCheckpointError(
            f"{ckpt} has no {BRANCH_WEIGHTS_NAME}: pass the directory of a Q-Zoom checkpoint (written by "
            "`swift sft --tuner_type qzoom` or qzoom_swift.save_branch_checkpoint)"
        )
    try:
        cfg = QZoomConfig.load(ckpt)
    except ValueError as exc:
        raise BranchCheckpointError(str(exc)) from exc
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    hidden = int(adapter.text_config(model).hidden_size)
    model_desc = f"{type(model).__name__} (family {adapter.name}, {len(layers)} layers, hidden {hidden})"
    ckpt_desc = f"checkpoint {ckpt} (family {cfg.family}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})"
    if cfg.family and cfg.family != adapter.name:
        raise BranchCheckpointError(f"{ckpt_desc} was trained for another model family than {model_desc}")
    if (cfg.num_hidden_layers and cfg.num_hidden_layers != len(layers)) or (cfg.hidden_size and cfg.hidden_size != hidden):
        raise BranchCheckpointError(f"{ckpt_desc} does not fit {model_desc}")
    tensors, meta = read_branch_tensors(weights)
    _check_layout(cfg, meta, ckpt_desc)
    shape_keys = sorted(k for k in (config_overrides or {}) if k in ("family", *LAYOUT_KEYS)
                        and config_overrides[k] != getattr(cfg, k))
    if shape_keys:
        raise BranchCheckpointError(f"{ckpt_desc}: config_overrides may change inference knobs, not {shape_keys}")
    try:
        cfg = cfg.with_overrides(config_overrides)
        branches = build_branches(model, cfg)  # aside: the model keeps its branches until every check passed
    except ValueError as exc:
        raise BranchCheckpointError(f"{ckpt_desc}: {exc}") from exc
    own = branches.state_dict()
    for key, tensor in tensors.items():
        if key not in own:
            raise BranchCheckpointError(f"{ckpt_desc}: tensor {key!r} has no place in the branches of {model_desc} "
                                        f"(branch_depth {cfg.branch_depth})")
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise BranchCheckpointError(
                f"{ckpt_desc}: tensor {key!r} has shape {tuple(tensor.shape)}, the branches of {model_desc} "
                f"need {tuple(own[key].shape)}"
            )
    for name in BRANCH_NAMES:
        present = [k for k in own if k.startswith(f"{name}.")]
        got = [k for k in present if k in tensors]
        if got and len(got) != len(present):
            missing = sorted(set(present) - set(got))[:5]
            raise BranchCheckpointError(f"{ckpt_desc}: branch {name!r} is incomplete, missing e.g. {missing}")
    branches.load_state_dict(tensors, strict=False)
    setattr(model, BRANCH_ATTR, branches)
    return branches.qzoom_config


def saved_branches(directory: str | os.PathLike) -> tuple[str, ...]:
    """Which branches a checkpoint file holds (from its metadata)."""
    from safetensors import safe_open

    path = Path(directory) / BRANCH_WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' own error types carry no file name
        raise BranchCheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    return tuple(x for x in meta.get("branches", "").split(",") if x)


def describe_checkpoint(directory: str | os.PathLike) -> dict:
    cfg = QZoomConfig.load(directory)
    return {"config": json.loads(json.dumps(cfg.to_dict())), "branches": saved_branches(directory)}

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

from qzoom_swift.branches import BRANCH_NAMES, attach_branches, get_branches
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
    meta = {"format": "pt", "family": cfg.family, "branches": ",".join(which)}
    with atomic_path(out / BRANCH_WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    cfg.save(out)
    return out


def load_branch_checkpoint(model: nn.Module, directory: str | os.PathLike,
                           config_overrides: dict | None = None) -> QZoomConfig:
    """Attach branches to ``model`` as saved in ``directory`` and load their weights.

    Branches absent from the file (e.g. the gate of a stage-1 checkpoint) keep their copy-of-base-layer
    initialisation. ``config_overrides`` changes inference knobs (thresholds, budgets), not shapes.
    """
    from safetensors import safe_open

    ckpt = Path(directory)
    weights = ckpt / BRANCH_WEIGHTS_NAME
    if not weights.is_file():
        raise BranchCheckpointError(
            f"{ckpt} has no {BRANCH_WEIGHTS_NAME}: pass the directory of a Q-Zoom checkpoint (written by "
            "`swift sft --tuner_type qzoom` or qzoom_swift.save_branch_checkpoint)"
        )
    cfg = QZoomConfig.load(ckpt)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    hidden = int(adapter.text_config(model).hidden_size)
    model_desc = f"{type(model).__name__} (family {adapter.name}, {len(layers)} layers, hidden {hidden})"
    ckpt_desc = f"checkpoint {ckpt} (family {cfg.family}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})"
    if cfg.family and cfg.family != adapter.name:
        raise BranchCheckpointError(f"{ckpt_desc} was trained for another model family than {model_desc}")
    if (cfg.num_hidden_layers and cfg.num_hidden_layers != len(layers)) or (cfg.hidden_size and cfg.hidden_size != hidden):
        raise BranchCheckpointError(f"{ckpt_desc} does not fit {model_desc}")
    cfg = cfg.with_overrides(config_overrides)
    branches = attach_branches(model, cfg, replace=True)
    own = branches.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key not in own:
                raise BranchCheckpointError(f"{ckpt_desc}: tensor {key!r} has no place in the branches of {model_desc}")
            tensor = f.get_tensor(key)
            if tuple(tensor.shape) != tuple(own[key].shape):
                raise BranchCheckpointError(
                    f"{ckpt_desc}: tensor {key!r} has shape {tuple(tensor.shape)}, the branches of {model_desc} "
                    f"need {tuple(own[key].shape)}"
                )
            loaded[key] = tensor
    for name in BRANCH_NAMES:
        present = [k for k in own if k.startswith(f"{name}.")]
        got = [k for k in present if k in loaded]
        if got and len(got) != len(present):
            missing = sorted(set(present) - set(got))[:5]
            raise BranchCheckpointError(f"{ckpt_desc}: branch {name!r} is incomplete, missing e.g. {missing}")
    branches.load_state_dict(loaded, strict=False)
    return cfg


def saved_branches(directory: str | os.PathLike) -> tuple[str, ...]:
    """Which branches a checkpoint file holds (from its metadata)."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / BRANCH_WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata() or {}
    return tuple(x for x in meta.get("branches", "").split(",") if x)


def describe_checkpoint(directory: str | os.PathLike) -> dict:
    cfg = QZoomConfig.load(directory)
    return {"config": json.loads(json.dumps(cfg.to_dict())), "branches": saved_branches(directory)}

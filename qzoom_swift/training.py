"""Training the branches: layers [0, B) of the frozen model, then only the branch being trained.

Layers [B, L) and the LM head never run here (the released code runs them and throws the result
away), so a branch step costs about (B + R) / L of a forward pass, without backward through the trunk.
``install_branch_training_forward`` routes ``model(**batch)`` to this path while a branch is being
trained, so trainers (HF/ms-swift, DDP, DeepSpeed) keep calling the model as usual.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from qzoom_swift.config import BRANCH_NAMES
from qzoom_swift.losses import IGNORE_INDEX, binary_accuracy, gate_bce_loss, selective_bce_loss
from qzoom_swift.prefill import gate_logits, prefill_to_branch, rpn_token_logits

TRAIN_ATTR = "qzoom_train_branches"
TARGET_KEYS = ("qzoom_gate", "qzoom_rpn_labels")


@dataclass
class QZoomBranchOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    gate_logits: torch.Tensor | None = None
    rpn_token_logits: torch.Tensor | None = None
    metrics: dict | None = None


def resample_label_map(labels: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resample a tri-state label map to the grid the image has at training time, keeping labels discrete.

    To a coarser grid (no axis grows) each target cell pools the source cells it covers: foreground if any
    of them is, background if all of them are, else ignored. Labels made at a high resolution thus keep a
    one-cell target when the RPN trains at a low one (nearest sampling would pick one sub-cell and mostly
    miss it). Otherwise (a finer or mixed grid) each target cell takes the source cell under its centre.
    """
    if tuple(labels.shape) == tuple(grid_hw):
        return labels
    if grid_hw[0] <= labels.shape[0] and grid_hw[1] <= labels.shape[1]:
        fg = F.adaptive_max_pool2d((labels == 1).float()[None, None], tuple(grid_hw))[0, 0] > 0
        not_bg = F.adaptive_max_pool2d((labels != 0).float()[None, None], tuple(grid_hw))[0, 0] > 0
        out = torch.full(tuple(grid_hw), IGNORE_INDEX, dtype=torch.long, device=labels.device)
        out[~not_bg] = 0
        out[fg] = 1
        return out
    src = labels.float()[None, None]
    out = F.interpolate(src, size=tuple(grid_hw), mode="nearest-exact")
    return out[0, 0].round().long()


def rpn_token_labels(visual_mask: torch.Tensor, grids: list[tuple[int, int]],
                     label_maps: list[torch.Tensor | None]) -> torch.Tensor:
    """[B, S] token labels from one label map per image (None = no supervision for that image)."""
    if len(label_maps) != len(grids):
        raise ValueError(f"{len(label_maps)} RPN label maps for {len(grids)} images in the batch")
    flat = []
    for grid, label_map in zip(grids, label_maps):
        if label_map is None:
            flat.append(torch.full((grid[0] * grid[1],), IGNORE_INDEX, dtype=torch.long))
        else:
            flat.append(resample_label_map(torch.as_tensor(label_map), grid).reshape(-1).long())
    out = torch.full(visual_mask.shape, IGNORE_INDEX, dtype=torch.long, device=visual_mask.device)
    if flat:
        out[visual_mask] = torch.cat(flat).to(visual_mask.device)
    return out


def restore_truncated_labels(labels: torch.Tensor | None, logits_to_keep, seq_len: int) -> torch.Tensor | None:
    """Full-length ``labels`` [B, seq_len] from the ones ms-swift's trainer hands the model.

    With ``use_logits_to_keep`` (ms-swift's default) ``Seq2SeqTrainer.prepare_logits_to_keep`` cuts the labels
    before the forward: to their last ``logits_to_keep`` positions (an int, batches > 1), or, for a batch of
    one, to the supervised tokens only behind one -100 (``logits_to_keep`` is then a bool mask whose entry
    j-1 says whether token j is supervised). The branches locate their query token (the one before the first
    supervised token) from the labels, so the cut must be undone or they would read a wrong token.
    """
    if labels is None or logits_to_keep is None or labels.shape[1] == seq_len:
        return labels
    full = torch.full((labels.shape[0], seq_len), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
        supervised = torch.zeros(seq_len, dtype=torch.bool, device=labels.device)
        supervised[1:] = logits_to_keep.to(labels.device)[:-1]
        if int(supervised.sum()) != labels.shape[1] - 1:
            raise ValueError(f"cannot restore labels: {labels.shape[1] - 1} kept labels for "
                             f"{int(supervised.sum())} kept positions")
        full[:, supervised] = labels[:, 1:]
        return full
    full[:, seq_len - labels.shape[1]:] = labels
    return full


def branch_training_step(model: nn.Module, which: tuple[str, ...], qzoom_gate=None, qzoom_rpn_labels=None,
                         **inputs) -> QZoomBranchOutput:
    """Loss of the selected branches on one batch (joint when both are selected)."""
    logits_to_keep = inputs.pop("logits_to_keep", None)
    if inputs.get("labels") is not None and inputs.get("input_ids") is not None:
        inputs["labels"] = restore_truncated_labels(inputs["labels"], logits_to_keep, inputs["input_ids"].shape[1])
    state = prefill_to_branch(model, use_cache=False, **inputs)
    losses: list[torch.Tensor] = []
    metrics: dict[str, torch.Tensor] = {}
    out = QZoomBranchOutput(metrics=metrics)
    if "gate" in which:
        if qzoom_gate is None:
            raise ValueError("training the gate needs a 'qzoom_gate' label (0/1) per sample in the dataset")
        logits = gate_logits(model, state)
        labels = torch.as_tensor(qzoom_gate, device=logits.device).long().view(-1)
        loss = gate_bce_loss(logits, labels)
        losses.append(loss)
        metrics["qzoom_gate_loss"] = loss.detach()
        acc = binary_accuracy(logits, labels)
        if acc is not None:
            metrics["qzoom_gate_acc"] = acc
        out.gate_logits = logits
    if "rpn" in which:
        if qzoom_rpn_labels is None:
            raise ValueError("training the RPN needs 'qzoom_rpn_labels' (a tri-state map per image) in the dataset")
        token_logits = rpn_token_logits(model, state)
        labels = rpn_token_labels(state.embedded.visual_mask, state.embedded.grids, list(qzoom_rpn_labels))
        loss = selective_bce_loss(token_logits, labels)
        losses.append(loss)
        metrics["qzoom_rpn_loss"] = loss.detach()
        for name, positive in (("qzoom_rpn_fg_acc", 1), ("qzoom_rpn_bg_acc", 0)):
            acc = binary_accuracy(token_logits, labels, positive)
            if acc is not None:
                metrics[name] = acc
        out.rpn_token_logits = token_logits
    out.loss = torch.stack(losses).sum() if len(losses) > 1 else losses[0]
    return out


def set_trained_branches(model: nn.Module, which: tuple[str, ...] | None) -> None:
    if which is not None:
        bad = [w for w in which if w not in BRANCH_NAMES]
        if bad or not which:
            raise ValueError(f"branches to train {which!r}: choose from {BRANCH_NAMES}")
    setattr(model, TRAIN_ATTR, tuple(which) if which else None)


def trained_branches(model: nn.Module) -> tuple[str, ...] | None:
    return getattr(model, TRAIN_ATTR, None)


def is_branch_batch(model: nn.Module, batch: dict) -> bool:
    """True when ``batch`` goes to the branch loss: a branch is being trained and the batch carries its targets.

    The one test the trainer forward, the template's pre-forward hook and its loss share; batches without
    targets (evaluation ``generate``, inference) keep the stock path.
    """
    return bool(trained_branches(model)) and any(batch.get(key) is not None for key in TARGET_KEYS)


def install_branch_training_forward(model: nn.Module) -> None:
    """Make ``model(**batch)`` compute the branch loss while ``trained_branches(model)`` is set.

    Routing needs branch targets in the batch (training and evaluation batches have them); the stock forward stays in place for everything else (evaluation generate, inference); the wrapper
    keeps its signature, which ms-swift and ``generate`` inspect.
    """
    if getattr(model.forward, "_qzoom_wrapped", False):
        return
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if not args and is_branch_batch(model, kwargs):
            kwargs.pop("use_cache", None)
            kwargs.pop("return_dict", None)
            return branch_training_step(model, trained_branches(model), **kwargs)
        for key in TARGET_KEYS:
            kwargs.pop(key, None)
        return original(*args, **kwargs)

    forward._qzoom_wrapped = True  # type: ignore[attr-defined]
    model.forward = forward

"""Branch losses: the gate's BCE and the RPN's selective (tri-state) BCE.

Both ignore entries labelled -100, and both return an exact zero that stays connected to the graph
when a batch has nothing to learn from, so distributed steps never diverge on an empty batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _zero_like_graph(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum() * 0.0


def gate_bce_loss(gate_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE over samples whose gate label is 0 or 1 (1 = the low-resolution view is not enough)."""
    labels = labels.to(gate_logits.device)
    valid = labels != IGNORE_INDEX
    if not bool(valid.any()):
        return _zero_like_graph(gate_logits)
    return F.binary_cross_entropy_with_logits(gate_logits[valid].float(), labels[valid].float())


def selective_bce_loss(token_logits: torch.Tensor, token_labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the valid (fg = 1 / bg = 0) visual tokens of the whole batch; -100 tokens are ignored.

    The mean runs over tokens, not samples, as in the released training code: a sample with more valid
    tokens weighs more.
    """
    token_labels = token_labels.to(token_logits.device)
    valid = token_labels != IGNORE_INDEX
    if not bool(valid.any()):
        return _zero_like_graph(token_logits)
    return F.binary_cross_entropy_with_logits(token_logits[valid].float(), token_labels[valid].float())


@torch.no_grad()
def binary_accuracy(logits: torch.Tensor, labels: torch.Tensor, positive: int | None = None) -> torch.Tensor | None:
    """Accuracy of ``logits > 0`` on valid labels (only on labels == ``positive`` when given); None if none."""
    labels = labels.to(logits.device)
    valid = labels != IGNORE_INDEX
    if positive is not None:
        valid &= labels == positive
    if not bool(valid.any()):
        return None
    return ((logits[valid] > 0).long() == labels[valid].long()).float().mean()

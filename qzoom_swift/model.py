"""``QZoomModel``: the plain-Python entry point (no ms-swift needed).

It holds a stock transformers model with the branches attached, its processor and the family adapter,
and exposes one prefill that yields the gate probability, the heatmaps and the KV cache together.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qzoom_swift.branches import attach_branches, require_branches
from qzoom_swift.checkpoint import is_branch_checkpoint, load_branch_checkpoint, save_branch_checkpoint
from qzoom_swift.config import BRANCH_WEIGHTS_NAME, QZoomConfig
from qzoom_swift.families import FamilyAdapter, get_adapter
from qzoom_swift.prefill import BranchPrefill, continue_prefill, prefill


class QZoomModel:
    """A base VLM with Q-Zoom branches. ``model`` stays a stock transformers model (its forward is untouched)."""

    def __init__(self, model: nn.Module, processor=None, config: QZoomConfig | None = None):
        self.model = model
        self.processor = processor
        self.adapter: FamilyAdapter = get_adapter(model)
        attach_branches(model, config)

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike | nn.Module, config: QZoomConfig | None = None, *,
                        checkpoint: str | os.PathLike | None = None, processor=None,
                        dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
                        device_map=None, config_overrides: dict | None = None) -> QZoomModel:
        """Load a base model (hub id or local dir, or an already loaded model) and attach the branches.

        ``checkpoint`` is a Q-Zoom branch checkpoint directory (``qzoom_branch.safetensors`` +
        ``qzoom_config.json``); without it the branches are fresh copies of the base layers.
        """
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            path = str(model_or_path)
            if is_branch_checkpoint(path):
                raise ValueError(
                    f"{path} is a Q-Zoom branch checkpoint, not a base model: pass the base model as the first "
                    "argument and this directory as checkpoint=..."
                )
            kwargs = {}
            if dtype is not None:
                kwargs["dtype"] = dtype
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            if device_map is not None:
                kwargs["device_map"] = device_map
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            if processor is None:
                processor = AutoProcessor.from_pretrained(path)
        model.eval()
        if checkpoint is not None:
            if not (Path(checkpoint) / BRANCH_WEIGHTS_NAME).is_file():
                raise FileNotFoundError(f"checkpoint {checkpoint} has no {BRANCH_WEIGHTS_NAME}")
            load_branch_checkpoint(model, checkpoint, config_overrides)
            return cls(model, processor)
        if config_overrides:
            config = QZoomConfig.from_dict({**(config or QZoomConfig()).to_dict(), **config_overrides})
        return cls(model, processor, config)

    @property
    def config(self) -> QZoomConfig:
        return require_branches(self.model).qzoom_config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefill(self, branches: tuple[str, ...] = ("gate", "rpn"), **inputs) -> BranchPrefill:
        """One prefill through layer B: gate logits, RPN token scores and the [0, B) KV cache."""
        with torch.no_grad():
            return prefill(self.model, branches=branches, **inputs)

    def continue_prefill(self, state: BranchPrefill, last_only: bool = False) -> torch.Tensor:
        """Layers [B, L) of the same prompt (direct answer); logits [B, S, vocab] (or [B, 1, vocab])."""
        return continue_prefill(self.model, state, last_only)

    def save_branches(self, directory: str | os.PathLike) -> Path:
        return save_branch_checkpoint(self.model, directory)

    def load_branches(self, directory: str | os.PathLike, config_overrides: dict | None = None) -> QZoomConfig:
        return load_branch_checkpoint(self.model, directory, config_overrides)

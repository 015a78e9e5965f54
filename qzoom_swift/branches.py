"""The gate and the SD-RPN: small branches grafted onto decoder layer B of a loaded, unmodified model.

Both branches start as copies of the model's own layers (so they begin as "the model, continued"), read
the same layer-B hidden state of one prefill and never touch the base model's weights or cache. They
live under one top-level module, ``model.qzoom_branch``, so that freezing rules keyed on the LLM prefix
never freeze them and their weights travel in a separate file.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qzoom_swift.config import BRANCH_NAMES, QZoomConfig
from qzoom_swift.families import FamilyAdapter, family_of, get_adapter

BRANCH_ATTR = "qzoom_branch"


GATE_HEAD_STD = 0.02
"""The gate head's init std when the model's config has no ``initializer_range`` (the release's fallback)."""


class QZoomGate(nn.Module):
    """R copied decoder layers, then Linear(d, 1) on the last prompt token (no final norm, as released).

    The head starts as the release's did (the model's ``_init_weights`` for a weight missing from the
    checkpoint): weight normal(0, ``initializer_range``), 0.02 for every Qwen-VL, and bias 0, instead of
    PyTorch's default uniform init, so stage 3 starts from the same distribution of gates.
    """

    def __init__(self, layers: list[nn.Module], hidden_size: int, init_std: float = GATE_HEAD_STD):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.head.bias)


class QZoomQKHead(nn.Module):
    """Only what the RPN's last layer needs: input norm, q/k projections and (Qwen3) q/k norms."""

    def __init__(self, input_layernorm: nn.Module, q_proj: nn.Module, k_proj: nn.Module,
                 q_norm: nn.Module | None, k_norm: nn.Module | None, head_dim: int, num_kv_groups: int,
                 scaling: float):
        super().__init__()
        self.input_layernorm = input_layernorm
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.q_norm = q_norm
        self.k_norm = k_norm
        self.head_dim = head_dim
        self.num_kv_groups = num_kv_groups
        self.scaling = scaling

    def query_key(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adapter: FamilyAdapter):
        """Rotated queries [B, H, S, d] and keys expanded to all heads [B, H, S, d]."""
        x = self.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x).view(shape)
        k = self.k_proj(x).view(shape)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q, k = adapter.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if self.num_kv_groups > 1:
            k = k.repeat_interleave(self.num_kv_groups, dim=1)
        return q, k


class QZoomRPN(nn.Module):
    """R-1 copied decoder layers, then the q/k head of layer B+R-1: heatmap = mean_h q_last . k_visual / sqrt(d)."""

    def __init__(self, layers: list[nn.Module], head: QZoomQKHead):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head


class QZoomBranches(nn.Module):
    """Container attached as ``model.qzoom_branch``; ``qzoom_config`` says where it branches."""

    def __init__(self, config: QZoomConfig, gate: QZoomGate, rpn: QZoomRPN):
        super().__init__()
        self.qzoom_config = config
        self.gate = gate
        self.rpn = rpn

    @property
    def first_layer(self) -> int:
        return int(self.qzoom_config.branch_layer)


def build_branches(model: nn.Module, config: QZoomConfig | None = None) -> QZoomBranches:
    """Branches initialised from the model's own layers B..B+R-1 (deep copies; the model is untouched)."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    text_config = adapter.text_config(model)
    cfg = (config or QZoomConfig()).resolved_for(adapter.name, len(layers), int(text_config.hidden_size))
    b, r = int(cfg.branch_layer), cfg.branch_depth
    gate = QZoomGate([copy.deepcopy(layers[b + i]) for i in range(r)], cfg.hidden_size,
                     float(getattr(text_config, "initializer_range", None) or GATE_HEAD_STD))
    last = layers[b + r - 1]
    parts = {name: copy.deepcopy(mod) if mod is not None else None for name, mod in adapter.qk_modules(last).items()}
    head = QZoomQKHead(**parts, **adapter.attention_shape(last))
    rpn = QZoomRPN([copy.deepcopy(layers[b + i]) for i in range(r - 1)], head)
    branches = QZoomBranches(cfg, gate, rpn)
    ref = next(layers[b].parameters())  # the branch sits beside layer B (device maps may split the model)
    return branches.to(device=ref.device, dtype=ref.dtype)


def attach_branches(model: nn.Module, config: QZoomConfig | None = None, *, replace: bool = False) -> QZoomBranches:
    """Attach freshly copied branches as ``model.qzoom_branch`` and return them.

    The base model's own modules and forward are not modified: its outputs are bit-identical with and
    without the branches.
    """
    existing = get_branches(model)
    if existing is not None and not replace:
        return existing
    branches = build_branches(model, config)
    setattr(model, BRANCH_ATTR, branches)
    return branches


def mark_trained_branches(model: nn.Module, which: tuple[str, ...] | list[str]) -> None:
    """Record which of ``model``'s branches have trained (``QZoomConfig.extra["trained_branches"]``).

    Mode ``zoom`` falls back when the record lacks the gate (``zoom.untrained_gate_mode`` states the rule);
    ``()`` marks fresh branches as untrained, ``BRANCH_NAMES`` vouches for branches set up by hand.
    """
    bad = [w for w in which if w not in BRANCH_NAMES]
    if bad:
        raise ValueError(f"trained branches {list(which)!r}: choose from {BRANCH_NAMES}")
    require_branches(model).qzoom_config.extra["trained_branches"] = list(which)


@torch.no_grad()
def copy_gate_layers(model: nn.Module) -> None:
    """Copy the model's own layers B..B+R-1 into the gate layers again (in place; the head is kept).

    A gate must start from the model it runs on: a checkpoint's untrained gate holds copies of the layers of
    the model that checkpoint was made on (stage 1, before Post-SFT changed them).
    """
    branches = require_branches(model)
    layers = get_adapter(model).decoder_layers(model)
    b = branches.first_layer
    for i, gate_layer in enumerate(branches.gate.layers):
        gate_layer.load_state_dict(layers[b + i].state_dict())


def detach_branches(model: nn.Module) -> QZoomBranches | None:
    branches = get_branches(model)
    if branches is not None:
        delattr(model, BRANCH_ATTR)
    return branches


def get_branches(model: nn.Module) -> QZoomBranches | None:
    return getattr(model, BRANCH_ATTR, None)


def require_branches(model: nn.Module) -> QZoomBranches:
    branches = get_branches(model)
    if branches is None:
        raise ValueError(
            f"{type(model).__name__} has no Q-Zoom branches: call qzoom_swift.attach_branches(model) or load a "
            "Q-Zoom checkpoint (qzoom_swift.load_branch_checkpoint) first"
        )
    return branches


def branch_parameters(model: nn.Module, which: str | tuple[str, ...] = BRANCH_NAMES):
    """Named parameters of the selected branch(es), with their full names on the model."""
    names = (which,) if isinstance(which, str) else tuple(which)
    for name in names:
        if name not in BRANCH_NAMES:
            raise ValueError(f"unknown Q-Zoom branch {name!r}; choose from {BRANCH_NAMES}")
    branches = require_branches(model)
    for name in names:
        for pname, param in getattr(branches, name).named_parameters():
            yield f"{BRANCH_ATTR}.{name}.{pname}", param


__all__ = [
    "BRANCH_ATTR", "BRANCH_NAMES", "QZoomBranches", "QZoomGate", "QZoomQKHead", "QZoomRPN", "attach_branches",
    "branch_parameters", "build_branches", "copy_gate_layers", "detach_branches", "family_of", "get_branches",
    "require_branches",
]

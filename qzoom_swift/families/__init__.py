"""Model families: the registry of plain facts (standard library) and the adapters that drive a loaded model.

``FAMILIES`` / ``get_spec`` / ``family_of`` need no torch; ``get_adapter`` imports the adapters on first use,
so code that only names families (the CLI, ``QZoomConfig``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qzoom_swift.families.registry import (
    FAMILIES,
    FAMILY_NAMES,
    FamilySpec,
    family_for_model_type,
    get_spec,
    supported_model_types,
)

if TYPE_CHECKING:
    from qzoom_swift.families.base import Embedded, FamilyAdapter

_adapters: dict[str, FamilyAdapter] = {}


def family_of(model_or_config: Any) -> str:
    """The Q-Zoom family name of a loaded model (or its config); a clear error for unsupported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    family = family_for_model_type(model_type)
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not supported by qzoom_swift; supported: "
                         f"{supported_model_types()}")
    return family


def get_adapter(model_or_family: Any) -> FamilyAdapter:
    """The adapter of a family name or of a loaded model (one shared, stateless instance per family)."""
    name = model_or_family if isinstance(model_or_family, str) else family_of(model_or_family)
    spec = get_spec(name)  # unknown names fail here with the supported list
    if name not in _adapters:
        module, cls = spec.adapter.split(":")
        _adapters[name] = getattr(importlib.import_module(module), cls)()
    return _adapters[name]


def __getattr__(name: str) -> Any:
    if name in ("Embedded", "FamilyAdapter"):
        return getattr(importlib.import_module("qzoom_swift.families.base"), name)
    raise AttributeError(f"module 'qzoom_swift.families' has no attribute {name!r}")


__all__ = ["FAMILIES", "FAMILY_NAMES", "Embedded", "FamilyAdapter", "FamilySpec", "family_for_model_type",
           "family_of", "get_adapter", "get_spec"]

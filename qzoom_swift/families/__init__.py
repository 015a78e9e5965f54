"""Family adapters, looked up from a loaded model's ``config.model_type``."""

from __future__ import annotations

from qzoom_swift.families.base import Embedded, FamilyAdapter
from qzoom_swift.families.llava import LlavaAdapter
from qzoom_swift.families.qwen import Qwen2_5VLAdapter, Qwen3VLAdapter

ADAPTERS: dict[str, FamilyAdapter] = {a.name: a for a in (Qwen2_5VLAdapter(), Qwen3VLAdapter(), LlavaAdapter())}


def family_of(model_or_config) -> str:
    """The Q-Zoom family name of a loaded model (or its config); a clear error for unsupported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter.name
    raise ValueError(
        f"model_type {model_type!r} is not supported by qzoom_swift; supported: "
        + ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ADAPTERS.values())
    )


def get_adapter(model_or_family) -> FamilyAdapter:
    name = model_or_family if isinstance(model_or_family, str) else family_of(model_or_family)
    if name not in ADAPTERS:
        raise ValueError(f"unknown Q-Zoom family {name!r}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


__all__ = ["ADAPTERS", "Embedded", "FamilyAdapter", "family_of", "get_adapter"]

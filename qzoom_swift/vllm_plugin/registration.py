"""Registering the Q-Zoom model classes with vLLM: the ``vllm.general_plugins`` entry point's work.

Its own module so that the package (which names it as the entry point) and the engine (which registers in its
own process when the entry point is not installed) share it without importing each other.
"""

from __future__ import annotations

from qzoom_swift.families.registry import FAMILIES

ARCHITECTURES: dict[str, str | None] = {name: spec.vllm_architecture for name, spec in FAMILIES.items()}
"""family -> registered architecture (``FamilySpec.vllm_architecture``); None: vLLM's stock model already gives
Q-Zoom's positions (LLaVA-1.5's are sequential, so the crop as a second image right after the first is the
zoomed sequence)."""


def register() -> None:
    """Register the Q-Zoom model classes with vLLM (lazily: vLLM imports them only when an engine uses them)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name is not None and name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"qzoom_swift.vllm_plugin.models:{name}")

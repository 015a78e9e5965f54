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


_watching = False


def register() -> None:
    """Register the Q-Zoom model classes with vLLM (lazily: vLLM imports them only when an engine uses them).

    In a process vLLM started (its engine core, where the entry point runs this too), also stop once the process
    that started it is gone: vLLM's engine core outlives a parent killed with SIGKILL, and its workers with it.
    """
    import multiprocessing

    from vllm import ModelRegistry

    global _watching
    for name in ARCHITECTURES.values():
        if name is not None and name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"qzoom_swift.vllm_plugin.models:{name}")
    if not _watching and multiprocessing.parent_process() is not None:
        from qzoom_swift.procs import exit_when_reparented

        exit_when_reparented()
        _watching = True

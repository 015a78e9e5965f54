"""ms-swift glue: model types, templates and the ``qzoom`` tuner, registered through swift's registries.

``register()`` is idempotent; ms-swift imports ``plugin.py`` (which calls it) in every process that
parses arguments, including DataLoader workers and torchrun ranks.
"""

from __future__ import annotations

from pathlib import Path

from qzoom_swift.families.registry import FAMILIES

PLUGIN_FILE = Path(__file__).with_name("plugin.py")

MODEL_TYPES = {name: spec.qzoom_model_type for name, spec in FAMILIES.items()}
"""Q-Zoom family -> ms-swift model_type (also the template name), from the family registry."""

_registered = False


def plugin_path() -> str:
    return str(PLUGIN_FILE.resolve())


def register() -> None:
    global _registered
    if _registered:
        return
    from qzoom_swift.swift_plugin import datasets, models, templates, trainer, tuner

    datasets.register_dataset_keys()
    datasets.register_gate_dataset()
    templates.register_templates()
    models.register_models()
    tuner.register_tuner()
    trainer.register_trainer()
    _registered = True


__all__ = ["MODEL_TYPES", "PLUGIN_FILE", "plugin_path", "register"]

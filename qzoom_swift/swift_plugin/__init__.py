"""ms-swift glue: model types, templates and the ``qzoom`` tuner, registered through swift's registries.

``register()`` is idempotent; ms-swift imports ``plugin.py`` (which calls it) in every process that
parses arguments, including DataLoader workers and torchrun ranks.
"""

from __future__ import annotations

from pathlib import Path

from qzoom_swift.families.registry import FAMILIES

PLUGIN_FILE = Path(__file__).with_name("plugin.py")
"""ms-swift puts this file's folder first on ``sys.path`` (``import_external_file``), in this process and in every
``spawn`` child (``swift eval``'s deploy server, DataLoader workers): no module here may share a top-level name
(``datasets.py`` here used to shadow Hugging Face ``datasets`` there; ``test_plugin_folder_shadows_nothing``)."""

MODEL_TYPES = {name: spec.qzoom_model_type for name, spec in FAMILIES.items()}
"""Q-Zoom family -> ms-swift model_type (also the template name), from the family registry."""

_registered = False


def plugin_path() -> str:
    return str(PLUGIN_FILE.resolve())


def register() -> None:
    global _registered
    if _registered:
        return
    from qzoom_swift.swift_plugin import (
        backends,
        data_registry,
        deploy_guard,
        models,
        templates,
        trainer,
        tuner,
    )

    data_registry.register_dataset_keys()
    data_registry.register_gate_dataset()
    templates.register_templates()
    models.register_models()
    tuner.register_tuner()
    trainer.register_trainer()
    backends.install_backend_guard()
    deploy_guard.install_deploy_guard()
    _registered = True


__all__ = ["MODEL_TYPES", "PLUGIN_FILE", "plugin_path", "register"]

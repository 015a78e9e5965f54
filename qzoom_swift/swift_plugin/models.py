"""``qzoom_*`` model types: the stock ms-swift loaders, plus the Q-Zoom branches attached after loading."""

from __future__ import annotations

import dataclasses

from qzoom_swift.families.registry import FAMILIES


def _qzoom_loader(base_loader: type) -> type:
    class QZoomLoader(base_loader):
        """Loads the stock model, then attaches the branches (configured by ``QZOOM_*`` variables)."""

        def get_model(self, model_dir, *args, **kwargs):
            from qzoom_swift.branches import attach_branches
            from qzoom_swift.config import effective_config, read_env

            env = read_env()
            model = super().get_model(model_dir, *args, **kwargs)
            # QZOOM_ATTACH=0: no branches (Post-SFT trains the LLM on stored RoIs and never runs them; under
            # ZeRO-3 the partitioned layers could not be copied anyway). Re-attach with --adapters later.
            if env.attach:
                attach_branches(model, effective_config())
            return model

    QZoomLoader.__name__ = QZoomLoader.__qualname__ = f"QZoom{base_loader.__name__}"
    return QZoomLoader


def register_models() -> None:
    from swift.model import MODEL_MAPPING, Model, ModelGroup, register_model

    for spec in FAMILIES.values():
        base = MODEL_MAPPING[spec.swift_model_type]
        meta = dataclasses.replace(
            base,
            model_type=spec.qzoom_model_type,
            model_groups=[ModelGroup([Model()])],
            loader=_qzoom_loader(base.loader),
            template=spec.qzoom_model_type,
            model_arch=spec.swift_model_arch,
            architectures=[],  # never auto-selected: Q-Zoom is asked for with --model_type
            is_multimodal=True,
        )
        register_model(meta, exist_ok=True)

"""``qzoom_*`` model types: the stock ms-swift loaders, plus the Q-Zoom branches attached after loading."""

from __future__ import annotations

import dataclasses

from qzoom_swift.swift_plugin import MODEL_TYPES

# Q-Zoom family -> (stock ms-swift model_type, ModelArch name)
_BASES = {"qwen2_5_vl": ("qwen2_5_vl", "qwen2_vl"), "qwen3_vl": ("qwen3_vl", "qwen3_vl"),
          "llava": ("llava1_5_hf", "llava_hf")}


def _qzoom_loader(base_loader: type) -> type:
    class QZoomLoader(base_loader):
        """Loads the stock model, then attaches the branches (configured by ``QZOOM_*`` variables)."""

        def get_model(self, model_dir, *args, **kwargs):
            import os

            from qzoom_swift.branches import attach_branches
            from qzoom_swift.config import config_from_env

            model = super().get_model(model_dir, *args, **kwargs)
            # QZOOM_ATTACH=0: no branches (Post-SFT trains the LLM on stored RoIs and never runs them; under
            # ZeRO-3 the partitioned layers could not be copied anyway). Re-attach with --adapters later.
            if os.environ.get("QZOOM_ATTACH", "1").strip().lower() not in ("0", "false", "no"):
                attach_branches(model, config_from_env())
            return model

    QZoomLoader.__name__ = QZoomLoader.__qualname__ = f"QZoom{base_loader.__name__}"
    return QZoomLoader


def register_models() -> None:
    from swift.model import MODEL_MAPPING, Model, ModelGroup, register_model

    for family, model_type in MODEL_TYPES.items():
        base_type, arch = _BASES[family]
        base = MODEL_MAPPING[base_type]
        meta = dataclasses.replace(
            base,
            model_type=model_type,
            model_groups=[ModelGroup([Model()])],
            loader=_qzoom_loader(base.loader),
            template=model_type,
            model_arch=arch,
            architectures=[],  # never auto-selected: Q-Zoom is asked for with --model_type
            is_multimodal=True,
        )
        register_model(meta, exist_ok=True)

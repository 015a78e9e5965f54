"""``qzoom_*`` templates: the stock chat templates plus Q-Zoom's training targets.

Branch targets arrive as dataset columns (``qzoom_gate``: 0/1 per sample; ``qzoom_rpn_labels``: a
tri-state map per image). The stock multimodal pre-forward hook would drop them (and, for Qwen2.5-VL,
``pixel_values``/``image_grid_thw`` too), so while a branch is trained the hook passes the batch through
untouched and the model's branch-training forward computes the loss.
"""

from __future__ import annotations

import dataclasses

import torch

from qzoom_swift.losses import IGNORE_INDEX
from qzoom_swift.swift_plugin import MODEL_TYPES
from qzoom_swift.training import TARGET_KEYS, trained_branches

_BASE_TEMPLATES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "llava": "llava1_5_hf"}


def _nesting_depth(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.dim()
    if isinstance(value, (list, tuple)):
        inner = next((v for v in value if v is not None), None)
        return 1 + (_nesting_depth(inner) if inner is not None else 0)
    return 0


def _rpn_maps(value) -> list[torch.Tensor | None]:
    """One label map per image: a 2-D list/tensor is one image's map, a list of them is one per image."""
    if _nesting_depth(value) == 2:
        return [torch.as_tensor(value).long()]
    return [None if m is None else torch.as_tensor(m).long() for m in value]


def _num_images(encoded: dict) -> int:
    for key in ("image_grid_thw", "pixel_values"):
        value = encoded.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


class QZoomTemplateMixin:
    """Adds Q-Zoom targets to encode/collate and the branch-training bypass of the pre-forward hook."""

    def _encode(self, inputs):
        encoded = super()._encode(inputs)
        if not self.is_training:  # targets are training data; generate() must never see them
            return encoded
        extra = getattr(inputs, "extra_kwargs", None) or {}
        if extra.get("qzoom_gate") is not None:
            encoded["qzoom_gate"] = int(extra["qzoom_gate"])
        if extra.get("qzoom_rpn_labels") is not None:
            maps = _rpn_maps(extra["qzoom_rpn_labels"])
            n_images = len(inputs.images or [])
            if len(maps) != n_images:
                raise ValueError(f"qzoom_rpn_labels has {len(maps)} maps for a record with {n_images} images")
            encoded["qzoom_rpn_labels"] = maps
        return encoded

    def _data_collator(self, batch, *, padding_to=None):
        res = super()._data_collator(batch, padding_to=padding_to)
        if any("qzoom_gate" in b for b in batch):
            res["qzoom_gate"] = torch.tensor([int(b.get("qzoom_gate", IGNORE_INDEX)) for b in batch])
        if any("qzoom_rpn_labels" in b for b in batch):
            maps: list[torch.Tensor | None] = []
            for b in batch:
                labels = b.get("qzoom_rpn_labels")
                # an unlabelled record contributes no RPN targets, whatever its images
                maps.extend([None] * _num_images(b) if labels is None else labels)
            res["qzoom_rpn_labels"] = maps
        return res

    def pre_forward_hook(self, model, args, kwargs):
        base = self.get_base_model(model)
        if trained_branches(base) and any(kwargs.get(k) is not None for k in TARGET_KEYS):
            from swift.utils import to_device

            return args, to_device(kwargs, model.device)
        return super().pre_forward_hook(model, args, kwargs)

    def compute_sft_loss(self, model, inputs, num_items_in_batch=None, trainer=None):
        base = self.get_base_model(model)
        while hasattr(base, "module"):
            base = base.module
        if not (trained_branches(base) and any(inputs.get(k) is not None for k in TARGET_KEYS)):
            return super().compute_sft_loss(model, inputs, num_items_in_batch=num_items_in_batch, trainer=trainer)
        outputs = model(**inputs)
        if trainer is not None and outputs.metrics:
            mode = "train" if model.training else "eval"
            for name, value in outputs.metrics.items():
                trainer.custom_metrics[mode][name].update(value.detach())
        return outputs


def _template_class(base_cls: type) -> type:
    cls = type(f"QZoom{base_cls.__name__}", (QZoomTemplateMixin, base_cls), {"__module__": __name__})
    return cls


def register_templates() -> None:
    from swift.template import TEMPLATE_MAPPING, register_template

    for family, template_type in MODEL_TYPES.items():
        base_meta = TEMPLATE_MAPPING[_BASE_TEMPLATES[family]]
        cls = _template_class(base_meta.template_cls)
        globals()[cls.__name__] = cls  # importable by name (pickling, spawn workers)
        meta = dataclasses.replace(base_meta, template_type=template_type, template_cls=cls)
        register_template(meta, exist_ok=True)

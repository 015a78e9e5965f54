"""``qzoom_*`` templates: the stock chat templates plus Q-Zoom's training targets.

Branch targets arrive as dataset columns (``qzoom_gate``: 0/1 per sample; ``qzoom_rpn_labels``: a
tri-state map per image). The stock multimodal pre-forward hook would drop them (and, for Qwen2.5-VL,
``pixel_values``/``image_grid_thw`` too), so while a branch is trained the hook passes the batch through
untouched and the model's branch-training forward computes the loss.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from qzoom_swift.families.registry import FAMILIES
from qzoom_swift.losses import IGNORE_INDEX
from qzoom_swift.training import is_branch_batch

UNSUPPORTED_BACKENDS = ("vllm", "lmdeploy", "sglang")
"""ms-swift inference engines that encode with the template but generate without it."""


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
    """Q-Zoom targets in encode/collate, the branch-training bypass of the pre-forward hook, and zoom generation.

    At inference the first pass is encoded at the Q-Zoom low budget (``QZOOM_LOW_MIN/MAX_TOKENS``), the
    original images travel beside the batch (``qzoom_src_images``) and ``generate`` runs the gated
    two-pass generation of ``qzoom_swift.zoom``.
    """

    qzoom_family: str = ""

    def set_mode(self, mode):
        """Refuse the engines that never call ``generate``: zoom would be silently off there.

        ms-swift's vLLM engine sets the mode before it builds the engine, so vLLM is stopped before any weights
        load; LMDeploy and SGLang set it per request, so they are stopped at the first request with this message
        instead of answering without Q-Zoom. Training and transformers inference pass through.
        """
        if mode in UNSUPPORTED_BACKENDS:
            raise ValueError(
                f"the Q-Zoom template {self.template_meta.template_type!r} needs --infer_backend transformers "
                f"(got {mode}): Q-Zoom decides and zooms inside the transformers engine's generate, which the {mode} "
                "engine never calls. Use --infer_backend transformers, or the stock model type and template "
                "without Q-Zoom.")
        return super().set_mode(mode)

    def _qzoom_config(self, model=None):
        from qzoom_swift.branches import get_branches
        from qzoom_swift.config import effective_config

        model = model if model is not None else getattr(self, "model", None)
        branches = get_branches(model) if model is not None else None
        return effective_config(branches.qzoom_config if branches is not None else None)

    def replace_tag(self, media_type, index, inputs):
        zoom_training = self.is_training and (inputs.extra_kwargs or {}).get("qzoom_roi") is not None
        if media_type == "image" and (not self.is_training or zoom_training):
            image = inputs.images[index]
            if isinstance(image, str):
                from swift.template import load_image

                image = load_image(image)
            inputs.extra_kwargs.setdefault("qzoom_src_images", {})[index] = image  # the original, for crops
        if media_type == "image" and not self.is_training:
            from qzoom_swift.families import get_adapter

            cfg = self._qzoom_config()
            budget = get_adapter(self.qzoom_family).budget_template_kwargs(cfg.low_min_tokens, cfg.low_max_tokens)
            for key, value in budget.items():
                inputs.chat_template_kwargs.setdefault(key, value)
        return super().replace_tag(media_type, index, inputs)

    def _encode(self, inputs):
        encoded = super()._encode(inputs)
        if not self.is_training:  # targets are training data; generate() must never see them
            originals = (getattr(inputs, "extra_kwargs", None) or {}).get("qzoom_src_images") or {}
            encoded["qzoom_src_images"] = [originals[i] for i in sorted(originals)]
            return encoded
        extra = getattr(inputs, "extra_kwargs", None) or {}
        if extra.get("qzoom_roi") is not None:
            originals = extra.get("qzoom_src_images") or {}
            self._insert_roi(encoded, [originals[i] for i in sorted(originals)], extra["qzoom_roi"])
        if extra.get("qzoom_gate") is not None:
            encoded["qzoom_gate"] = int(extra["qzoom_gate"])
        if extra.get("qzoom_rpn_labels") is not None:
            maps = _rpn_maps(extra["qzoom_rpn_labels"])
            n_images = len(inputs.images or [])
            if len(maps) != n_images:
                raise ValueError(f"qzoom_rpn_labels has {len(maps)} maps for a record with {n_images} images")
            encoded["qzoom_rpn_labels"] = maps
        elif "qzoom_rpn_labels" in extra:
            # A null map (a pseudo-label sample ignored at labelling time) is an RPN sample without valid
            # tokens: it must still take the branch loss (an exact zero), never the LM loss of the trunk.
            encoded["qzoom_rpn_labels"] = [None] * len(inputs.images or [])
        return encoded

    def _insert_roi(self, encoded: dict, originals: list, roi: dict) -> None:
        """Post-SFT: rebuild a training sample as the zoomed sequence inference would decode from.

        ``roi`` is what ``qzoom mine-hard`` stored: the crop as fractions of the original image (``box``)
        and, when the source grid is unchanged, the exact grid cells (``grid_box``, ``grid``) the
        positions interpolate over. Only the answer keeps its labels; the crop's tokens are never targets.
        """
        import random

        from qzoom_swift.config import read_env
        from qzoom_swift.post_sft import random_roi, roi_training_sequence

        if not originals:
            raise ValueError("a qzoom_roi record needs its image")
        noise = read_env().roi_noise  # the released Qwen3 recipe uses 0.8
        if noise > 0 and random.random() < noise:
            roi = random_roi(random)
        out = roi_training_sequence(self._get_model(), self.processor, self.qzoom_family, encoded, originals[-1],
                                    roi, self._qzoom_config())
        mm = (torch.as_tensor(out["input_ids"]) == out["image_token_id"]).tolist()
        if "mm_token_type_ids" in encoded:
            encoded["mm_token_type_ids"] = self.create_mm_token_type_ids(out["input_ids"], mm)
        for key in ("input_ids", "labels", "loss_scale", "pixel_values", "image_grid_thw"):
            if key in out:
                encoded[key] = out[key]
        if out.get("position_ids") is not None:
            encoded["qzoom_position_ids"] = out["position_ids"]

    def _data_collator(self, batch, *, padding_to=None):
        res = super()._data_collator(batch, padding_to=padding_to)
        if any(b.get("qzoom_position_ids") is not None for b in batch) and "position_ids" in res:
            # the continuous RoI positions replace the stock rope index (which knows only integer grids)
            pos = res["position_ids"].to(torch.float32)
            width = pos.shape[-1]
            for i, b in enumerate(batch):
                own = b.get("qzoom_position_ids")
                if own is None:
                    continue
                n = own.shape[-1]
                cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
                pos[:, i, cols] = own.to(pos.dtype)
            res["position_ids"] = pos
        if any("qzoom_src_images" in b for b in batch):
            res["qzoom_src_images"] = [b.get("qzoom_src_images") or [] for b in batch]
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
        if is_branch_batch(base, kwargs):
            from swift.utils import to_device

            return args, to_device(kwargs, model.device)
        return super().pre_forward_hook(model, args, kwargs)

    def generate(self, model, *args, **kwargs):
        """Gated two-pass generation; output sequences are the pass-1 prompt followed by the new tokens."""
        from qzoom_swift.branches import get_branches
        from qzoom_swift.onnx.router import router_from_env
        from qzoom_swift.zoom import zoom_generate

        sources = kwargs.pop("qzoom_src_images", None)
        base = self.get_base_model(model)
        if get_branches(base) is None or args or sources is None:
            return super().generate(model, *args, **kwargs)
        model_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        inputs = {k: kwargs.pop(k) for k in model_keys if kwargs.get(k) is not None}
        for key in ("position_ids", "text_position_ids", "pixel_values_videos", "video_grid_thw", "image_sizes"):
            kwargs.pop(key, None)
        signature = inspect.signature(base.generate)
        if "use_model_defaults" in signature.parameters and "use_model_defaults" not in kwargs:
            kwargs["use_model_defaults"] = False
        cfg = self._qzoom_config(base)
        from swift.utils import get_logger

        router = router_from_env(log=get_logger().info)  # QZOOM_ROUTER=onnx + QZOOM_ONNX_DIR; default: torch
        out = zoom_generate(base, self.processor, inputs, sources, cfg, router=router, **kwargs)
        base.qzoom_last_stats = [s.to_dict() for s in out.stats]  # for callers that want the decisions

        get_logger().info("qzoom: " + "; ".join(
            f"{'zoom' if s.zoomed else 'direct'}({s.reason}) p={s.gate_prob if s.gate_prob is None else round(s.gate_prob, 3)} "
            f"visual={s.visual_tokens_low}+{s.visual_tokens_roi}" for s in out.stats))
        pad = self.tokenizer.pad_token_id
        width = max((len(g) for g in out.generated), default=0)
        input_ids = inputs["input_ids"]
        tail = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for i, new in enumerate(out.generated):
            tail[i, :len(new)] = new
        return {"sequences": torch.cat([input_ids, tail], dim=1)}

    def compute_sft_loss(self, model, inputs, num_items_in_batch=None, trainer=None):
        base = self.get_base_model(model)
        while hasattr(base, "module"):
            base = base.module
        if not is_branch_batch(base, inputs):
            return super().compute_sft_loss(model, inputs, num_items_in_batch=num_items_in_batch, trainer=trainer)
        outputs = model(**inputs)
        if trainer is not None and outputs.metrics:
            mode = "train" if model.training else "eval"
            for name, value in outputs.metrics.items():
                trainer.custom_metrics[mode][name].update(value.detach())
        return outputs


def _template_class(base_cls: type, family: str) -> type:
    return type(f"QZoom{base_cls.__name__}", (QZoomTemplateMixin, base_cls),
                {"__module__": __name__, "qzoom_family": family})


def register_templates() -> None:
    from swift.template import TEMPLATE_MAPPING, register_template

    for family, spec in FAMILIES.items():
        base_meta = TEMPLATE_MAPPING[spec.swift_template]
        cls = _template_class(base_meta.template_cls, family)
        globals()[cls.__name__] = cls  # importable by name (pickling, spawn workers)
        meta = dataclasses.replace(base_meta, template_type=spec.qzoom_model_type, template_cls=cls)
        register_template(meta, exist_ok=True)

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
from qzoom_swift.swift_plugin.backends import UNSUPPORTED_BACKENDS, backend_refusal
from qzoom_swift.training import is_branch_batch


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


def _label_grid(extra: dict, n_images: int) -> tuple[int, int] | None:
    """The (rows, cols) a stage-1 row was labelled on: its label map's shape, else ``qzoom_attn_grid``."""
    labels = extra.get("qzoom_rpn_labels")
    maps = _rpn_maps(labels) if labels is not None else []
    if len(maps) == 1 and maps[0] is not None and maps[0].dim() == 2:
        return tuple(maps[0].shape)
    grid = extra.get("qzoom_attn_grid")
    if grid is None:
        return None
    if n_images != 1:
        raise ValueError(f"qzoom_attn_grid {grid} names one label grid for a record with {n_images} images: "
                         "stage-1 rows hold one image (qzoom pseudo-labels writes them so)")
    return int(grid[0]), int(grid[1])


def _show_training_image(inputs, index: int, family: str, processor) -> None:
    """Stage-1 rows reach the model exactly as labelling showed them: the same padding, the same token grid.

    ``qzoom_pad_square`` rows are padded to a square with the family's fill (the released grey; LLaVA-1.5's mean
    colour, which every LLaVA image gets anyway). A row with a label map is then resized to its grid and encoded
    with min = max pixels, so ms-swift's ``IMAGE_MIN/MAX_TOKEN_NUM`` cannot coarsen it (a 500 px square would
    otherwise train at 18 x 18 and max-pool its 24 x 24 labels). A row that asks for its own budget
    (``chat_template_kwargs`` min/max pixels, as the zoom bench's low-budget rows do) keeps it, and training
    resamples its labels (``training.resample_label_map``).
    """
    from qzoom_swift.families import get_adapter

    adapter = get_adapter(family)
    extra = inputs.extra_kwargs or {}
    image = inputs.images[index]
    if isinstance(image, str):
        from swift.template import load_image

        image = load_image(image)
    own_budget = {"min_pixels", "max_pixels"} & set(inputs.chat_template_kwargs or {})
    grid = None if own_budget else _label_grid(extra, len(inputs.images or []))
    image = adapter.stage1_image(image, processor, pad_square=bool(extra.get("qzoom_pad_square")), grid_hw=grid)
    if grid is not None:
        inputs.chat_template_kwargs.update(adapter.budget_template_kwargs(grid[0] * grid[1], grid[0] * grid[1]))
    inputs.images[index] = image


def _describe_media(item) -> str:
    if isinstance(item, str):
        if item.startswith("data:"):
            return f"data URI with {len(item.split(',', 1)[-1])} payload characters"
        return item if len(item) <= 200 else f"a string of {len(item)} characters"
    if isinstance(item, bytes | bytearray):
        return f"{len(item)} bytes"
    if isinstance(item, dict):
        return f"an object with keys {sorted(item)}"
    return type(item).__name__


class ImageEntryError(ValueError):
    """Image ``index`` of a request cannot be read; a server maps the index to the request's entry
    (``deploy_guard.image_entry``)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def check_request_media(inputs) -> None:
    """Videos and audio are refused (Q-Zoom zooms into images); every image must decode, or its entry is named.

    The image is decoded in full here (``load``): PIL opens lazily, so a truncated file would otherwise fail
    later, inside the batch's processor call, with no index and for every request batched with it.
    """
    from swift.template import load_image

    for kind in ("videos", "audios"):
        items = getattr(inputs, kind, None) or []
        if items:
            raise ValueError(f"the Q-Zoom template serves images and text only; this request has {len(items)} "
                             f"{kind[:-1]} entr{'y' if len(items) == 1 else 'ies'}")
    for i, image in enumerate(getattr(inputs, "images", None) or []):
        if image is None or (hasattr(image, "size") and not isinstance(image, str | bytes | dict)):
            continue  # already a decoded image
        try:
            source = image.get("bytes") or image.get("path") if isinstance(image, dict) else image
            if source in (b"", "") or (isinstance(source, str) and source.strip().endswith(",")):
                raise ValueError("it is empty")
            load_image(source).load()
        except Exception as exc:  # PIL and swift's loaders raise many types, some with no message
            detail = str(exc) or "empty or not an image"
            raise ImageEntryError(i, f"image {i} ({_describe_media(image)}) cannot be read: {type(exc).__name__}: "
                                     f"{detail}") from exc


QZOOM_MODEL_TYPES = frozenset(spec.qzoom_model_type for spec in FAMILIES.values())


def check_pairing(template_type: str, model_type: str | None) -> None:
    """Refuse a Q-Zoom model type with a stock template, or the reverse: either serves the model without Q-Zoom.

    A stock template decodes the ``qzoom_*`` model in one plain pass (the branches never run), and the
    Q-Zoom template on a stock model type finds no branches; both used to fall back silently.
    """
    if model_type in QZOOM_MODEL_TYPES and template_type not in QZOOM_MODEL_TYPES:
        raise ValueError(
            f"--model_type {model_type} is a Q-Zoom model type but --template {template_type} is a stock template, "
            f"which would serve it without Q-Zoom: pass --template {model_type} or leave --template out")
    if template_type in QZOOM_MODEL_TYPES and model_type is not None and model_type not in QZOOM_MODEL_TYPES:
        raise ValueError(
            f"--template {template_type} is a Q-Zoom template but --model_type {model_type} is a stock model type, "
            f"which loads no Q-Zoom branches: pass --model_type {template_type}")


def report_read_tokens(mask: torch.Tensor | None, read: list[int]) -> None:
    """Make ms-swift's ``usage.prompt_tokens`` count what each sample read: pass 1 plus the inserted crop.

    The transformers engine counts a request's prompt tokens as the row sum of this very attention-mask
    tensor once ``generate`` returns (nothing else reads it then), so a zoomed row gets the inserted tokens
    added to its last (real) position. Shape and storage are untouched. Streaming responses are counted
    before generation and still see pass 1 only.
    """
    if mask is None or mask.dim() != 2 or mask.shape[0] != len(read) or mask.dtype == torch.bool \
            or mask.is_floating_point():
        return
    for i, n in enumerate(read):
        extra = int(n) - int(mask[i].sum())
        if extra > 0:
            mask[i, -1] += extra


class PairingGuardMixin:
    """Checks the template / model-type pairing as soon as the template learns the model (``init_processor``)."""

    def init_processor(self, processor) -> None:
        if processor is not None:
            meta = getattr(processor, "model_meta", None)
            check_pairing(self.template_meta.template_type, getattr(meta, "model_type", None))
        super().init_processor(processor)


class QZoomTemplateMixin(PairingGuardMixin):
    """Q-Zoom targets in encode/collate, the branch-training bypass of the pre-forward hook, and zoom generation.

    At inference the first pass is encoded at the Q-Zoom low budget (``QZOOM_LOW_MIN/MAX_TOKENS``), the
    original images travel beside the batch (``qzoom_src_images``) and ``generate`` runs the gated
    two-pass generation of ``qzoom_swift.zoom``.
    """

    qzoom_family: str = ""

    def set_mode(self, mode):
        """Refuse the engines that neither call ``generate`` nor route (LMDeploy, SGLang): zoom would be silently off.

        The last line of defence: ``backends.install_backend_guard`` refuses them before any engine is built
        (LMDeploy and SGLang set the mode only per request, which this still stops when an engine is built around
        the guard, e.g. from Python). Training, transformers and vLLM (routed in ``encode``) pass through.
        """
        if mode in UNSUPPORTED_BACKENDS:
            raise backend_refusal(f"the Q-Zoom template {self.template_meta.template_type!r}", mode)
        return super().set_mode(mode)

    def prepare_engine_kwargs(self):
        """vLLM: the registered Q-Zoom model class, which places a crop at Q-Zoom's positions."""
        if self.mode == "vllm":
            from qzoom_swift.swift_plugin.vllm_serving import engine_kwargs

            return engine_kwargs(self.qzoom_family)
        return super().prepare_engine_kwargs()

    def encode(self, inputs, return_template_inputs: bool = False, return_length: bool = False):
        """vLLM: the request as vLLM's prompt, after the front router decided it (``vllm_serving.route_encoded``).

        ms-swift's ``vllm`` mode bypasses ``_encode`` (it calls ``Template._encode`` directly), hence here.
        """
        if self.mode != "vllm" or self.is_training:
            return super().encode(inputs, return_template_inputs=return_template_inputs, return_length=return_length)
        from qzoom_swift.swift_plugin.vllm_serving import route_encoded

        encoded = route_encoded(self, super().encode(inputs, return_template_inputs=True, return_length=return_length))
        if not return_template_inputs:
            encoded.pop("template_inputs", None)
        return encoded

    def _qzoom_config(self, model=None):
        from qzoom_swift.branches import get_branches
        from qzoom_swift.config import effective_config

        model = model if model is not None else getattr(self, "model", None)
        branches = get_branches(model) if model is not None else None
        return effective_config(branches.qzoom_config if branches is not None else None)

    def _preprocess_inputs(self, inputs) -> None:
        """At inference, refuse media Q-Zoom cannot serve, with a message naming the entry (not an empty error)."""
        if not self.is_training:
            check_request_media(inputs)
        super()._preprocess_inputs(inputs)

    def replace_tag(self, media_type, index, inputs):
        zoom_training = self.is_training and (inputs.extra_kwargs or {}).get("qzoom_roi") is not None
        if media_type == "image" and (not self.is_training or zoom_training):
            image = inputs.images[index]
            if isinstance(image, str):
                from swift.template import load_image

                image = load_image(image)
            inputs.extra_kwargs.setdefault("qzoom_src_images", {})[index] = image  # the original, for crops
        if media_type == "image" and self.is_training and not zoom_training:
            _show_training_image(inputs, index, self.qzoom_family, self.processor)  # as labelling showed it
        elif media_type == "image":
            from qzoom_swift.families import get_adapter

            adapter = get_adapter(self.qzoom_family)
            inputs.images[index] = adapter.source_image(inputs.extra_kwargs["qzoom_src_images"][index],
                                                        self.processor)
            if not self.is_training:
                cfg = self._qzoom_config()
                budget = adapter.budget_template_kwargs(cfg.low_min_tokens, cfg.low_max_tokens)
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
        from qzoom_swift.zoom import describe_decisions, zoom_generate

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
        report_read_tokens(inputs.get("attention_mask"), [s.prompt_tokens for s in out.stats])

        get_logger().info(describe_decisions(out.stats))
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


def _guarded_stock_class(base_cls: type) -> type:
    """The stock template class, refusing a Q-Zoom model type (nothing else changes)."""
    if issubclass(base_cls, PairingGuardMixin):
        return base_cls
    return type(f"QZoomGuarded{base_cls.__name__}", (PairingGuardMixin, base_cls), {"__module__": __name__})


def register_templates() -> None:
    """The ``qzoom_*`` templates, and the family's stock templates with the pairing guard (same registry names)."""
    from swift.template import TEMPLATE_MAPPING, register_template

    for family, spec in FAMILIES.items():
        base_meta = TEMPLATE_MAPPING[spec.swift_template]
        stock_cls = getattr(base_meta.template_cls, "__qzoom_stock__", base_meta.template_cls)
        cls = _template_class(stock_cls, family)
        globals()[cls.__name__] = cls  # importable by name (pickling, spawn workers)
        meta = dataclasses.replace(base_meta, template_type=spec.qzoom_model_type, template_cls=cls)
        register_template(meta, exist_ok=True)
        guarded = _guarded_stock_class(base_meta.template_cls)
        guarded.__qzoom_stock__ = stock_cls
        globals()[guarded.__name__] = guarded
        register_template(dataclasses.replace(base_meta, template_cls=guarded), exist_ok=True)


def __getattr__(name: str):
    """Template classes exist once ``register_templates`` ran; a spawned process may unpickle them before."""
    if name.startswith("QZoom"):
        register_templates()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

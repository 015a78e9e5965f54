"""Zoom inference for LLaMA-Factory's HF chat engine (``llamafactory-cli chat`` / ``api`` / web chat).

LLaMA-Factory's ``chat/hf_engine.py`` calls ``model.generate(inputs, attention_mask, generation_config,
pixel_values, image_grid_thw, [streamer])`` once per request, with the image already processed at
``image_max_pixels``; the image itself never reaches the model. ``QZoomGenerationMixin.generate``
therefore rebuilds that image from ``pixel_values`` (the processor's normalisation and patch layout
inverted: exact in float32 when nothing was resized), encodes the prompt again at the Q-Zoom low budget
and runs the core's two-pass ``zoom_generate`` with the rebuilt image as the one crops are cut from.

What this means for the answer (the tolerance the tests assert):

- tokens equal ``QZoomModel.generate``'s on the same image whenever LLaMA-Factory's view IS the image:
  its sides are multiples of the patch unit (28 px Qwen2.5-VL, 32 px Qwen3-VL) and its pixel count lies
  within ``image_min_pixels``..``image_max_pixels`` and the processor's own bounds, with float32 weights.
  Serve with a large ``image_max_pixels`` (e.g. 16777216): the model never encodes LLaMA-Factory's view
  (Q-Zoom re-encodes at its own budgets), so the bound costs only preprocessing. In bfloat16 a Qwen2.5-VL
  rebuild may differ by one grey level (Qwen3-VL's 0.5 mean/std rebuilds exactly);
- otherwise the low pass and the crop come from LLaMA-Factory's resized view: the same grid box within
  a cell (what the test measures), but the crop carries at most ``image_max_pixels`` of detail and the
  answer may differ;
- LLaVA-1.5 receives only the processor's fixed square (336 px; its CLIP processor centre-crops a
  non-square image, where Q-Zoom pads it): the first pass is LLaMA-Factory's own, and the crop is cut
  from that square, so zooming magnifies it without adding detail. Send square images (padded with the
  mean colour) of the processor's size to get ``QZoomModel``'s tokens.

``model/patcher.py::patch_model`` swaps any ``generate`` whose function's qualified name lacks
``GenerationMixin`` for transformers' own: the class name here is what keeps this one.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)
_ACTIVE = threading.local()
"""Set while ``zoom_generate`` runs in this thread: its own ``model.generate`` calls decode with the stock method."""


def _request_logger() -> logging.Logger:
    """A logger LLaMA-Factory's handler prints (its ``llamafactory`` namespace, ``LLAMAFACTORY_VERBOSITY``)."""
    try:
        from llamafactory.extras.logging import get_logger
    except ImportError:  # the mixin outside LLaMA-Factory (plain transformers)
        return logger
    return get_logger("llamafactory.qzoom")


class QZoomGenerationMixin:
    """``generate`` that answers with Q-Zoom (gated zoom) from the inputs LLaMA-Factory's HF engine passes.

    Mix it in first, before the stock model class. Requests without an image, models without branches and
    ``zoom_generate``'s own decoding calls take the stock ``generate``. Returns [1, prompt + new] ids like
    the stock method (the engine slices ``[:, prompt_length:]`` with its own prompt's length); the decision
    of the last request is in ``qzoom_last_stats`` and in one INFO log line per request.
    """

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        from qzoom_swift.branches import get_branches

        if getattr(_ACTIVE, "on", False) or get_branches(self) is None or kwargs.get("pixel_values") is None \
                or kwargs.get("past_key_values") is not None:
            return super().generate(inputs, **kwargs)
        streamer = kwargs.get("streamer")
        try:
            return self._qzoom_generate(inputs if inputs is not None else kwargs.pop("input_ids", None), kwargs)
        except BaseException:
            if streamer is not None:  # LLaMA-Factory's stream reader waits on the streamer: never leave it open
                streamer.end()
            raise

    def qzoom_processor(self):
        """The model folder's processor (only its image processor is used: encoding, crops), loaded once."""
        processor = getattr(self, "_qzoom_processor", None)
        if processor is None:
            from transformers import AutoProcessor

            path = self.config._name_or_path
            try:
                processor = AutoProcessor.from_pretrained(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"Q-Zoom generate needs the processor of the model folder {path!r} to re-encode "
                                 f"images and crops, and cannot load it ({exc}); keep the processor files in the "
                                 "folder (qzoom lf-model links them)") from exc
            self._qzoom_processor = processor
        return processor

    def _qzoom_generate(self, input_ids: torch.Tensor | None, kwargs: dict) -> torch.Tensor:
        from qzoom_swift.branches import require_branches
        from qzoom_swift.config import effective_config
        from qzoom_swift.families import get_adapter
        from qzoom_swift.inputs import resize_image_runs
        from qzoom_swift.onnx.router import router_from_env
        from qzoom_swift.zoom import describe_decisions, zoom_generate

        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"Q-Zoom generate takes one prompt per call (LLaMA-Factory's HF engine sends one), got "
                             f"input ids of shape {shape}; batch several with QZoomModel.generate")
        mask = kwargs.pop("attention_mask", None)
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError("Q-Zoom generate takes an unpadded prompt (its attention_mask has zeros)")
        config = kwargs.get("generation_config")
        n_return = int(kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1)
        if n_return != 1:
            raise ValueError(f"num_return_sequences={n_return}: Q-Zoom generate returns one answer per request "
                             "(send the request n times)")
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            if kwargs.get(key) is not None:
                raise ValueError("Q-Zoom generate serves images and text only; this request carries a video")
        pixel_values = kwargs.pop("pixel_values")
        grid_thw = kwargs.pop("image_grid_thw", None)
        kwargs.pop("mm_token_type_ids", None)
        kwargs.pop("image_sizes", None)

        processor = self.qzoom_processor()
        adapter = get_adapter(self)
        cfg = effective_config(require_branches(self).qzoom_config)  # branches' config < QZOOM_* environment
        views = adapter.decode_pixels(pixel_values, grid_thw, processor.image_processor)  # LF's view: crop source
        device = input_ids.device
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if adapter.spec.fixed_resolution:  # LLaVA: the first pass is LF's own fixed-size view
            inputs["pixel_values"] = pixel_values
        else:
            low = [adapter.resize_for_budget(v, cfg.low_min_tokens, cfg.low_max_tokens, what="input image")
                   for v in views]
            encoded = adapter.encode_images(processor, low)
            counts = [adapter.encoded_grid(self, {"image_grid_thw": g[None]}) for g in encoded["image_grid_thw"]]
            shown = [adapter.encoded_grid(self, {"image_grid_thw": g[None]}) for g in grid_thw]  # LF's own view
            ids = resize_image_runs(input_ids[0].tolist(), adapter.image_token_id(self), [h * w for h, w in shown],
                                    [h * w for h, w in counts])
            ids = torch.tensor([ids], dtype=input_ids.dtype, device=input_ids.device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "pixel_values": encoded["pixel_values"].to(device, pixel_values.dtype),
                      "image_grid_thw": encoded["image_grid_thw"].to(device)}
        router = router_from_env(log=_request_logger().info)  # QZOOM_ROUTER=onnx + QZOOM_ONNX_DIR; default torch
        _ACTIVE.on = True
        try:
            out = zoom_generate(self, processor, inputs, [views], cfg, router=router, **kwargs)
        finally:
            _ACTIVE.on = False
        self.qzoom_last_stats = [s.to_dict() for s in out.stats]
        _request_logger().info(describe_decisions(out.stats))
        new = out.generated[0].to(device=device, dtype=input_ids.dtype)
        return torch.cat([input_ids, new[None]], dim=1)

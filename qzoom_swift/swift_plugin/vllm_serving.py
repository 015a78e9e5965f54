"""``swift infer`` / ``swift deploy --infer_backend vllm`` with a ``qzoom_*`` template: the router decides, vLLM serves.

ms-swift's vLLM engine encodes each request with the template (``encode`` in ``vllm`` mode: one image placeholder
per image, the images at the Q-Zoom low budget) and forwards ``input_ids``, ``images`` and
``mm_processor_kwargs`` to vLLM unchanged. The Q-Zoom template routes there (``route_encoded``): the front router
(``vllm_plugin.router.VLLMRouter``: pass 1, gate, RPN, the core's rules) turns the request into the direct prompt
or the low-resolution image plus the crop with its box, and logs the decision (the ``qzoom:`` line of the
transformers engine). The engine is told the Q-Zoom model class through ``Template.prepare_engine_kwargs``.

``--adapters``: ms-swift hands them to vLLM as a LoRA. A Q-Zoom branch checkpoint is no LoRA: it is taken out of
the engine's arguments and loaded by the router instead (``prepare``), and the adapter request ms-swift still
sends with every request for it is dropped (``attach_engine``). A Post-SFT LoRA must be merged first.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

ROUTER_ATTR = "qzoom_vllm_router"
"""The template attribute holding the ``VLLMRouter`` (set by ``prepare``, read by ``route_encoded``)."""


def split_adapters(adapters: list[str] | None) -> str | None:
    """The one branch checkpoint among ``--adapters`` (None without one); a LoRA is refused with the fix."""
    from qzoom_swift.checkpoint import is_branch_checkpoint

    branches, others = [], []
    for path in adapters or []:
        (branches if is_branch_checkpoint(path) else others).append(str(path))
    if others:
        raise ValueError(
            f"--infer_backend vllm with a Q-Zoom template takes one branch checkpoint as --adapters, not {others}: "
            "the front router runs the base model's first layers, which a LoRA served by vLLM would not reach. "
            "Merge the LoRA first (swift export --adapters LORA_DIR --merge_lora true) and serve the merged model "
            "with --adapters BRANCH_CKPT.")
    if len(branches) > 1:
        raise ValueError(f"--adapters names {len(branches)} Q-Zoom branch checkpoints ({branches}); pass one")
    return branches[0] if branches else None


def prepare(args, template) -> str | None:
    """Load the router for ``template`` (before the engine, so a mismatched checkpoint fails first) and take the
    branch checkpoint out of ``args.adapters``; returns it (the caller puts it back once the engine is built)."""
    from qzoom_swift.extras import require_extra
    from qzoom_swift.vllm_plugin.registration import register
    from qzoom_swift.vllm_plugin.router import VLLMRouter, load_router

    require_extra("vllm", "--infer_backend vllm with a Q-Zoom template")
    register()  # the Q-Zoom model classes, in this process (vLLM's other processes load the entry point)
    checkpoint = split_adapters(getattr(args, "adapters", None))
    model_dir = getattr(args, "model_dir", None) or template.model_info.model_dir
    if checkpoint is None:
        logger.warning("Q-Zoom on vLLM without --adapters: the branches are untrained copies, so mode zoom answers "
                       "every request directly (pass the stage-3 branch checkpoint as --adapters)")
    model = load_router(model_dir, checkpoint, processor=template.processor, dtype=getattr(args, "torch_dtype", None))
    setattr(template, ROUTER_ATTR, VLLMRouter(model))
    kept, loaded = model.router_parameters
    logger.info("qzoom: vLLM front router from %s (branches: %s) on %s: %.1f M of %.1f M parameters (vision, "
                "layers [0, B), branches)", model_dir, checkpoint, model.device, kept / 1e6, loaded / 1e6)
    return checkpoint


def attach_engine(engine, checkpoint: str | None) -> None:
    """Once ms-swift built the engine: the router learns its ``max_model_len``, and the adapter request ms-swift
    sends with every request for ``--adapters[0]`` (as a LoRA) is dropped when it is the router's checkpoint."""
    router = getattr(engine.template, ROUTER_ATTR, None)
    if router is not None:
        router.max_model_len = getattr(engine, "max_model_len", None)
    if checkpoint is None:
        return
    add_request = engine._add_request
    target = Path(checkpoint).resolve()

    @functools.wraps(add_request)
    def _add_request(inputs, generation_config, request_id, adapter_request=None):
        if adapter_request is not None and Path(adapter_request.path).resolve() == target:
            adapter_request = None
        if adapter_request is None and getattr(engine, "default_adapter_request", None) is not None:
            engine.default_adapter_request = None
        return add_request(inputs, generation_config, request_id, adapter_request=adapter_request)

    engine._add_request = _add_request


def engine_kwargs(family: str) -> dict:
    """What the template adds to vLLM's engine arguments: the Q-Zoom model class (as ms-swift's own templates do
    for theirs; it replaces ms-swift's ``hf_overrides``, which only carry changed rope/vocab settings)."""
    from qzoom_swift.vllm_plugin.registration import ARCHITECTURES

    arch = ARCHITECTURES[family]
    return {} if arch is None else {"hf_overrides": {"architectures": [arch]}}


def route_encoded(template, encoded: dict) -> dict:
    """A request encoded in ``vllm`` mode, routed: the direct prompt or the zoomed one, and its decision logged."""
    from swift.utils import get_logger

    from qzoom_swift.zoom import describe_decisions

    router = getattr(template, ROUTER_ATTR, None)
    if router is None:
        raise RuntimeError(
            "the Q-Zoom template in vllm mode has no front router: build the engine through ms-swift "
            "(swift infer/deploy --infer_backend vllm, or swift.pipelines.infer.SwiftInfer.get_infer_engine), which "
            "loads it, or use qzoom_swift.vllm_plugin.QZoomVLLM from Python")
    chosen = encoded["template_inputs"]
    originals = (chosen.extra_kwargs or {}).get("qzoom_src_images") or {}
    sources = [originals[i] for i in sorted(originals)]
    lows = list(encoded.get("images") or [])
    req = router.route_prompt(encoded["input_ids"], sources, lows, what="the request")
    if req.error is not None:
        raise ValueError(req.error)
    prompt = req.prompt
    encoded["input_ids"] = prompt["prompt_token_ids"]
    images = (prompt.get("multi_modal_data") or {}).get("image") or []
    if images:
        encoded["images"] = images
    if prompt.get("mm_processor_kwargs"):
        encoded["mm_processor_kwargs"] = {**(encoded.get("mm_processor_kwargs") or {}),
                                          **prompt["mm_processor_kwargs"]}
    encoded["qzoom_stats"] = req.stats.to_dict()
    get_logger().info(describe_decisions([req.stats]))
    return encoded

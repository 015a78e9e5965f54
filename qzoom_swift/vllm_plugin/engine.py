"""``QZoomVLLM``: Q-Zoom served by vLLM, decided per sample by a front router before each request.

The router (``router.VLLMRouter``: the core's pass 1, gate, RPN and rules) turns each sample into one vLLM
request: the plain low-resolution prompt when it is answered directly, or the low-resolution image followed by
the crop with the crop's box as a per-image field, from which the registered model places Q-Zoom's positions
(``models.py``). Prefix caching shares the unchanged prefix between them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from qzoom_swift.extras import require_extra
from qzoom_swift.model import QZoomModel, ZoomAnswer
from qzoom_swift.vllm_plugin.registration import ARCHITECTURES, register
from qzoom_swift.vllm_plugin.router import PlannedRequest, VLLMRouter, load_router

logger = logging.getLogger(__name__)
ENTRY_POINT = "qzoom_swift.vllm_plugin:register"
ENTRY_POINT_HINT = (f"the vllm.general_plugins entry point {ENTRY_POINT} is not installed (reinstall qzoom_swift: "
                    "pip install -e '.[vllm]')")


def plugin_installed() -> bool:
    """Whether vLLM loads ``register`` in every process it starts (the package's ``vllm.general_plugins`` entry)."""
    from importlib.metadata import entry_points

    return any(ep.value == ENTRY_POINT for ep in entry_points(group="vllm.general_plugins"))


@dataclass
class VLLMAnswer(ZoomAnswer):
    """``ZoomAnswer`` plus what vLLM reports; ``error`` names a sample that got no answer (the others still do)."""

    error: str | None = None
    failure: str | None = None
    """``unreadable_image`` or ``prompt_too_long`` when ``error`` is about the sample's input (``PlannedRequest``)."""
    cached_tokens: int = 0
    """Prompt tokens served from vLLM's prefix cache (``RequestOutput.num_cached_tokens``)."""
    prompt_token_ids: list[int] | None = None


def _child_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_for(pids: set[int], timeout: float = 60.0) -> None:
    """Wait until the engine's processes have exited (shutdown signals them; multiprocessing's resource tracker,
    started with them, lives as long as this process and is left alone)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if "resource_tracker" not in " ".join(proc.cmdline()):
                procs.append(proc)
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=timeout)


class QZoomVLLM:
    """Q-Zoom generation on a vLLM engine: ``generate`` returns a ``VLLMAnswer`` (text, ``ZoomStats``) per sample.

    ``model`` is the base model folder (vLLM loads it; the router loads it too, with the branches of
    ``checkpoint``, or ``router``: a ready ``QZoomModel``, e.g. fresh branches in tests). Engine arguments:
    ``dtype``, ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``, ``kv_cache_space_gb``
    (the CPU build's KV memory), anything else through ``engine_kwargs`` (``vllm.LLM``'s arguments).
    ``pass_embeddings`` (Qwen2.5-VL): send the router's image features instead of the images, so vLLM skips the
    vision tower (the router encodes the crop instead).
    """

    def __init__(self, model: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
                 router: QZoomModel | None = None, config_overrides: dict | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, kv_cache_space_gb: int | None = None,
                 router_device: str | None = None, router_dtype: str | None = None,
                 router_batch_size: int = 8, pass_embeddings: bool = False, **engine_kwargs):
        require_extra("vllm", "QZoomVLLM (Q-Zoom on vLLM)")
        if router is None:  # a checkpoint that does not fit the model is refused here, before any engine starts
            router = load_router(model, checkpoint, device=router_device, dtype=router_dtype,
                                 config_overrides=config_overrides)
        self.router = router
        self.family = router.adapter.name
        self.planner = VLLMRouter(router, batch_size=router_batch_size, pass_embeddings=pass_embeddings)
        if pass_embeddings:  # vLLM takes the router's image features instead of re-encoding the images
            engine_kwargs.setdefault("enable_mm_embeds", True)
        from vllm import LLM

        from qzoom_swift.config import set_process_env

        register()
        if not plugin_installed():  # vLLM's other processes would not know the Q-Zoom models: keep them in this one
            if tensor_parallel_size != 1:
                raise RuntimeError(f"{ENTRY_POINT_HINT}; without it only tensor_parallel_size=1 runs (in-process)")
            logger.warning("Q-Zoom: %s; running the vLLM engine in this process", ENTRY_POINT_HINT)
            set_process_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
            engine_kwargs.setdefault("distributed_executor_backend", "uni")
        if kv_cache_space_gb is not None:
            if kv_cache_space_gb != int(kv_cache_space_gb) or kv_cache_space_gb < 1:
                raise ValueError(f"kv_cache_space_gb={kv_cache_space_gb}: the CPU build reads whole GiB "
                                 "(VLLM_CPU_KVCACHE_SPACE is an integer); pass 1 or more")
            set_process_env(VLLM_CPU_KVCACHE_SPACE=str(int(kv_cache_space_gb)))
        kwargs = {"dtype": dtype, "tensor_parallel_size": tensor_parallel_size, "max_model_len": max_model_len,
                  "limit_mm_per_prompt": {"image": 2}, "enable_prefix_caching": True, **engine_kwargs}
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        arch = ARCHITECTURES[self.family]
        if arch is not None:
            kwargs["hf_overrides"] = {**kwargs.get("hf_overrides", {}), "architectures": [arch]}
        before = _child_pids()
        self.llm = LLM(model=str(Path(model)), **{k: v for k, v in kwargs.items() if v is not None})
        self._engine_pids = _child_pids() - before
        self.planner.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the engine's processes, waiting at most ``timeout`` seconds for them (they also stop with this
        process, even one killed outright: ``registration.register`` watches the parent)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            llm.llm_engine.engine_core.shutdown()
            _wait_for(self._engine_pids, timeout)

    def plan(self, images, questions: str | list[str], config_overrides: dict | None = None) -> list[PlannedRequest]:
        """Route every sample and build its vLLM prompt (``VLLMRouter.plan``); bad samples get ``error``."""
        return self.planner.plan(images, questions, config_overrides)

    def generate(self, images, questions: str | list[str], *, config_overrides: dict | None = None,
                 max_new_tokens: int = 64, sampling_params=None) -> list[VLLMAnswer]:
        """Answer image questions with Q-Zoom on vLLM (greedy unless ``sampling_params``); one answer per question.

        ``images``/``questions`` as ``QZoomModel.generate`` (an entry may be None or [] for a text-only
        question). A sample whose image cannot be opened, or whose prompt is too long, gets ``error`` set.
        Times: ``time_pass1_s`` the router's pass-1 share, ``time_pass2_s`` the crop's encoding, ``time_decode_s``
        the sample's 1/n share of the engine call (vLLM's whole prefill and decode, batched continuously).
        """
        return self.answer(self.plan(images, questions, config_overrides), max_new_tokens=max_new_tokens,
                           sampling_params=sampling_params)

    def answer(self, planned: list[PlannedRequest], *, max_new_tokens: int = 64,
               sampling_params=None) -> list[VLLMAnswer]:
        """The engine's half of ``generate``: send the routed requests (``plan``'s, or any ``PlannedRequest`` with
        a vLLM prompt, e.g. a plain one) as one continuous batch; a request with ``error`` is not sent."""
        import time

        from vllm import SamplingParams

        params = sampling_params or SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        sent = [i for i, p in enumerate(planned) if p.error is None]
        t0 = time.perf_counter()
        outputs = self.llm.generate([planned[i].prompt for i in sent], params, use_tqdm=False) if sent else []
        share = (time.perf_counter() - t0) / max(1, len(sent))
        answers = [VLLMAnswer("", p.stats, None, error=p.error, failure=p.failure) for p in planned]
        for i, out in zip(sent, outputs):
            tokens = list(out.outputs[0].token_ids)
            planned[i].stats.time_decode_s = share
            text = self.router.processor.batch_decode([tokens], skip_special_tokens=True)[0]
            answers[i] = VLLMAnswer(text, planned[i].stats, tokens, cached_tokens=int(out.num_cached_tokens or 0),
                                    prompt_token_ids=list(out.prompt_token_ids))
        return answers

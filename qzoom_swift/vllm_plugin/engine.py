"""``QZoomVLLM``: Q-Zoom served by vLLM, decided per sample by a front router before each request.

vLLM cannot change a running request's prompt, so the decision comes first: the router is the core's pass 1
(``prefill_to_branch`` on the low-resolution prompt: vision, layers [0, B)), gate and RPN, and the core's
decision and box rules (``zoom.route_and_plan``). Each sample then becomes one vLLM request: the plain
low-resolution prompt when it is answered directly, or the low-resolution image followed by the crop (the token
layout of ``zoom.roi_augmented_sequence``) with the crop's box as a per-image field, from which the registered
model places Q-Zoom's positions (``models.py``). Prefix caching shares the unchanged prefix between them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qzoom_swift.extras import require_extra
from qzoom_swift.model import QZoomModel, ZoomAnswer
from qzoom_swift.vllm_plugin.registration import ARCHITECTURES, register
from qzoom_swift.zoom import ZoomPlan, ZoomStats

logger = logging.getLogger(__name__)
ROI_FIELD = "qzoom_roi"  # models.ROI_FIELD (models.py imports vLLM at import; this module must not)
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
    cached_tokens: int = 0
    """Prompt tokens served from vLLM's prefix cache (``RequestOutput.num_cached_tokens``)."""
    prompt_token_ids: list[int] | None = None


@dataclass
class PlannedRequest:
    """One sample after the router: the vLLM prompt and the stats so far; ``error`` when it cannot be sent."""

    stats: ZoomStats
    prompt: dict | None = None
    """vLLM prompt (``prompt_token_ids``, ``multi_modal_data``, ``mm_processor_kwargs``)."""
    token_ids: list[int] = field(default_factory=list)
    """The prompt the model sees once vLLM expands the image placeholders (``roi_augmented_sequence``'s ids when
    zoomed); checked against vLLM's own expansion by the tests."""
    positions: torch.Tensor | None = None
    """Q-Zoom's positions of ``token_ids`` (float for a Qwen crop: vLLM rounds them)."""
    prefix_end: int = 0
    """Tokens before the inserted crop (unchanged from the direct prompt, so their KV blocks are shareable)."""
    error: str | None = None


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


def collapse_image_runs(ids: list[int], image_token: int, counts: list[int]) -> list[int]:
    """Each image's ``counts[k]`` image tokens as one: vLLM expands every image placeholder itself, from its own
    grid. Counted, not by runs: LLaVA's crop tokens directly follow the source image's."""
    out: list[int] = []
    k = skip = 0
    for t in ids:
        if skip:
            skip -= 1
            continue
        out.append(t)
        if t == image_token:
            if k >= len(counts):
                raise ValueError(f"more images in the prompt than the {len(counts)} given")
            skip, k = counts[k] - 1, k + 1
    if k != len(counts) or skip:
        raise ValueError(f"the prompt holds {k} of {len(counts)} images' tokens")
    return out


class QZoomVLLM:
    """Q-Zoom generation on a vLLM engine: ``generate`` returns a ``VLLMAnswer`` (text, ``ZoomStats``) per sample.

    ``model`` is the base model folder (vLLM loads it; the router loads it too, with the branches of
    ``checkpoint``, or ``router``: a ready ``QZoomModel``, e.g. fresh branches in tests). Engine arguments:
    ``dtype``, ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``, ``kv_cache_space_gb``
    (the CPU build's KV memory), anything else through ``engine_kwargs`` (``vllm.LLM``'s arguments).
    """

    def __init__(self, model: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
                 router: QZoomModel | None = None, config_overrides: dict | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, kv_cache_space_gb: float | None = None,
                 router_device: str | None = None, router_dtype: str | None = None,
                 router_batch_size: int = 8, **engine_kwargs):
        require_extra("vllm", "QZoomVLLM (Q-Zoom on vLLM)")
        if router is None:  # a checkpoint that does not fit the model is refused here, before any engine starts
            from qzoom_swift.checkpoint import BranchCheckpointError

            try:
                router = QZoomModel.from_pretrained(model, checkpoint=checkpoint, config_overrides=config_overrides,
                                                    device=router_device, dtype=router_dtype)
            except BranchCheckpointError as exc:
                raise BranchCheckpointError(f"base model {model}: {exc}") from exc
        self.router = router
        self.family = router.adapter.name
        self.router_batch_size = max(1, int(router_batch_size))
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
            set_process_env(VLLM_CPU_KVCACHE_SPACE=str(kv_cache_space_gb))
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
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def shutdown(self) -> None:
        """Stop the engine's processes (they also stop with this process)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            llm.llm_engine.engine_core.shutdown()
            _wait_for(self._engine_pids)

    def plan(self, images, questions: str | list[str], config_overrides: dict | None = None) -> list[PlannedRequest]:
        """Route every sample (router pass 1, gate, RPN, box) and build its vLLM prompt; bad samples get ``error``."""
        from qzoom_swift.config import effective_config
        from qzoom_swift.inputs import load_image

        if isinstance(questions, str):
            questions, images = [questions], [images]
        if not isinstance(images, list | tuple) or len(images) != len(questions):
            raise ValueError(f"images: expected one entry per question ({len(questions)})")
        cfg = effective_config(self.router.config, config_overrides)
        planned: list[PlannedRequest | None] = [None] * len(questions)
        ready: list[tuple[int, list, list]] = []
        for i, item in enumerate(images):
            items = [] if item is None else list(item) if isinstance(item, list | tuple) else [item]
            try:
                src = [load_image(x, f"sample {i} image {j}") for j, x in enumerate(items)]
                low = [self.router._low_image(img, cfg, i, j) for j, img in enumerate(src)]
            except (ValueError, TypeError) as exc:
                planned[i] = PlannedRequest(ZoomStats(reason="error"), error=str(exc))
                continue
            ready.append((i, src, low))
        for lo in range(0, len(ready), self.router_batch_size):
            chunk = ready[lo:lo + self.router_batch_size]
            for (i, _, _), req in zip(chunk, self._route_chunk(chunk, [questions[i] for i, _, _ in chunk], cfg)):
                planned[i] = req
        for i, req in enumerate(planned):
            if req.error is None and len(req.token_ids) > self.max_model_len:
                req.error = (f"sample {i}: its prompt has {len(req.token_ids)} tokens, more than the engine's "
                             f"max_model_len={self.max_model_len}; raise max_model_len or lower the token budgets")
                req.prompt = None
        return planned

    @torch.no_grad()
    def _route_chunk(self, chunk, questions: list[str], cfg) -> list[PlannedRequest]:
        import time

        from qzoom_swift.inputs import chat_inputs
        from qzoom_swift.prefill import prefill_to_branch
        from qzoom_swift.zoom import route_and_plan

        router = self.router
        inputs = chat_inputs(router.processor, [low for _, _, low in chunk], questions)
        inputs = {k: v.to(router.device) for k, v in inputs.items()}
        t0 = time.perf_counter()
        state = prefill_to_branch(router.model, **inputs, use_cache=False)
        stats, plans = route_and_plan(router.model, router.processor, state, cfg, [src for _, src, _ in chunk],
                                      started=t0)
        return [self._request(state, b, low, stats[b], plans[b]) for b, (_, _, low) in enumerate(chunk)]

    def _request(self, state, b: int, low: list, st: ZoomStats, plan: ZoomPlan | None) -> PlannedRequest:
        from qzoom_swift.zoom import roi_augmented_sequence

        model, adapter = self.router.model, self.router.adapter
        start = int(state.attention_mask[b].nonzero()[0])
        ids, positions = state.input_ids[b, start:], state.position_ids[..., b:b + 1, start:]
        images, boxes, prefix_end = list(low), [None] * len(low), int(ids.numel())
        counts = [r * c for (r, c), owner in zip(state.embedded.grids, state.image_samples()) if owner == b]
        if plan is not None:
            roi_grid = adapter.encoded_grid(model, plan.encoded)
            ids, positions, prefix_end = roi_augmented_sequence(model, adapter, ids, positions, plan.visual_index,
                                                                plan.grid, plan.box, roi_grid)
            images.append(plan.crop)
            counts.append(roi_grid[0] * roi_grid[1])
            boxes.append(list(plan.grid_box))
            st.zoomed, st.box, st.grid_box, st.grid = True, plan.box_norm, plan.grid_box, plan.grid
            st.visual_tokens_roi = roi_grid[0] * roi_grid[1]
        token_ids = ids.tolist()
        prompt: dict = {"prompt_token_ids": collapse_image_runs(token_ids, adapter.image_token_id(model), counts)}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        if plan is not None and ARCHITECTURES[self.family] is not None:  # a Q-Zoom model class reads the box
            prompt["mm_processor_kwargs"] = {ROI_FIELD: boxes}
        st.prompt_tokens = len(token_ids)
        return PlannedRequest(st, prompt, token_ids, positions, prefix_end)

    def generate(self, images, questions: str | list[str], *, config_overrides: dict | None = None,
                 max_new_tokens: int = 64, sampling_params=None) -> list[VLLMAnswer]:
        """Answer image questions with Q-Zoom on vLLM (greedy unless ``sampling_params``); one answer per question.

        ``images``/``questions`` as ``QZoomModel.generate`` (an entry may be None or [] for a text-only
        question). A sample whose image cannot be opened, or whose prompt is too long, gets ``error`` set.
        """
        from vllm import SamplingParams

        planned = self.plan(images, questions, config_overrides)
        params = sampling_params or SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        sent = [i for i, p in enumerate(planned) if p.error is None]
        outputs = self.llm.generate([planned[i].prompt for i in sent], params, use_tqdm=False) if sent else []
        answers = [VLLMAnswer("", p.stats, None, error=p.error) for p in planned]
        for i, out in zip(sent, outputs):
            tokens = list(out.outputs[0].token_ids)
            text = self.router.processor.batch_decode([tokens], skip_special_tokens=True)[0]
            answers[i] = VLLMAnswer(text, planned[i].stats, tokens, cached_tokens=int(out.num_cached_tokens or 0),
                                    prompt_token_ids=list(out.prompt_token_ids))
        return answers

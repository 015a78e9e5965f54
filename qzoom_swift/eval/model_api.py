"""evalscope model API ``qzoom``: a base VLM (+ optional Q-Zoom checkpoint) answering benchmark samples.

Importing this module registers the model API ``qzoom`` (and the plugin benchmarks of
``qzoom_swift.eval.benchmarks``) with evalscope; re-imports are no-ops. Use it from Python::

    import qzoom_swift.eval.model_api  # registers
    from evalscope import TaskConfig, run_task
    run_task(TaskConfig(eval_type="qzoom", model="/models/Qwen2.5-VL-7B-Instruct", model_id="qzoom@576",
                        model_args={"checkpoint": "/ckpt/qzoom-stage3", "mode": "zoom", "low_max_tokens": 576,
                                    "tau_roi": 0.125, "tau_gate": 0.05, "dtype": "bfloat16", "device": "cuda"},
                        datasets=["docvqa"], dataset_args={"docvqa": {"dataset_id": "/data/docvqa"}},
                        generation_config={"max_tokens": 128}, eval_batch_size=1))

or through ``qzoom eval`` (several runs and benchmarks, summary table, Pareto plot). evalscope's own
``evalscope eval`` CLI cannot select a plugin model type.

Per sample: the data-URI images evalscope sends are decoded from their bytes (the MIME label is often
wrong and is ignored), the text parts are joined into the question, and ``QZoomModel.generate`` answers
(images first, then the text, as in the paper's prompts). ``perf_metrics.latency`` is the model time of
the sample (vision encoding, layers [0, B), gate/RPN, crop re-encode, second prefill, decode: the paper's
"wall clock around model.generate"), ``ttft`` the part before decoding. Gate probability, the zoom
decision, the box and the visual tokens go to ``ModelOutput.metadata["qzoom"]``, which evalscope keeps in
``predictions/<model_id>/<benchmark>_<subset>.jsonl``.

Loaded models are shared per process (keyed by path, checkpoint, dtype, device): the per-benchmark
instances that differ only in thresholds or budgets reuse one set of weights, and one batcher
(``qzoom_swift.eval.batcher``) per model. evalscope's concurrent calls (``eval_batch_size`` > 1) are
grouped into one ``QZoomModel.generate`` batch of up to ``max_batch_size`` samples (model_args; set it to
``eval_batch_size``, as ``qzoom eval --eval-batch-size`` does), collected for at most ``batch_window_s``;
one batch runs at a time, and a batch that fails is retried sample by sample. ``latency`` is then the
sample's share of its batch (the sum over a benchmark is the model time, so throughput counts the
batching gain); ``max_batch_size=1`` (the default) answers one sample at a time, for per-sample latency.

``backend="vllm"`` (``qzoom eval --backend vllm``) answers through ``QZoomVLLM`` instead
(``qzoom_swift.eval.vllm_backend``): one engine per model, checkpoint and dtype per process, the same batcher in
front of it, the same per-sample metadata; ``latency`` is then the router's pass-1 share, the crop's encoding
and the sample's share of the engine call (vLLM prefills and decodes in one call, so no ``ttft``), and
``metadata["qzoom"]["backend"]`` says which backend answered.

A sample that cannot be answered (an unreadable image: ``unreadable_image``; a failure inside the model:
``out_of_memory`` or ``model_error``, also a vLLM answer's ``error``) is answered with empty text, so the
benchmark scores it as failed and counts it, and the run goes on: its ``ModelOutput.error`` and
``metadata["qzoom"]`` (``failed``, ``failure``, ``error``) record why in the predictions. More than
``MAX_CONSECUTIVE_FAILURES`` model failures in a row is a broken model or setup, not bad samples: that raises,
and the benchmark stops.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalscope.api.messages import ChatMessage, ChatMessageSystem, ChatMessageUser, ContentImage, ContentText
from evalscope.api.messages.perf_metrics import PerformanceMetrics
from evalscope.api.model import GenerateConfig, ModelAPI, ModelOutput, ModelUsage
from evalscope.api.registry import MODEL_APIS, register_model_api
from evalscope.api.tool import ToolChoice, ToolInfo
from PIL import Image

import qzoom_swift.eval.benchmarks  # noqa: F401  (registers textvqa, hr_bench_*, mme_realworld_lite)
from qzoom_swift.config import effective_config
from qzoom_swift.eval.batcher import Batcher
from qzoom_swift.failures import (
    MAX_CONSECUTIVE_FAILURES,
    is_out_of_memory,
    model_failure_reason,
    release_memory,
)

logger = logging.getLogger(__name__)

MODEL_API_NAME = "qzoom"
# QZoomConfig fields that may be set per evalscope task (inference knobs).
CONFIG_KEYS = ("mode", "tau_gate", "tau_roi", "blur_kernel", "blur_sigma", "min_box_side", "low_max_tokens",
               "low_min_tokens", "roi_max_tokens", "roi_min_tokens", "roi_fallback")

DEFAULT_MAX_BATCH_SIZE = 1
"""Samples per ``QZoomModel.generate`` call (model_args ``max_batch_size``); 1 = one sample at a time."""
DEFAULT_BATCH_WINDOW_S = 0.05
"""Seconds a call waits for companions before its batch runs anyway (model_args ``batch_window_s``)."""
UNREADABLE_IMAGE = "unreadable_image"
"""Failure reason of a sample whose image does not decode (the labelling jobs' reject reason of the same name)."""

_MODELS: dict[tuple, Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass
class _Request:
    """One sample for the batcher; calls with equal ``key`` (generation settings) may share a batch."""

    images: list[Image.Image]
    question: str
    overrides: dict[str, Any]
    max_new_tokens: int
    kwargs: dict[str, Any]

    @property
    def key(self) -> str:
        return json.dumps([self.overrides, self.max_new_tokens, self.kwargs], sort_keys=True, default=str)


def _batch_runner(qz):
    """``run_batch`` for the batcher of ``qz``: one ``generate`` over the batch, timed; (answer, size, wall) each."""
    def run_batch(_key: str, requests: list[_Request]) -> list[tuple[Any, int, float]]:
        first = requests[0]
        t0 = time.perf_counter()
        try:
            answers = qz.generate([r.images for r in requests], [r.question for r in requests],
                                  config_overrides=first.overrides, max_new_tokens=first.max_new_tokens,
                                  **first.kwargs)
            _sync(qz)
        except Exception:
            release_memory()  # what the failed forward held, before the batcher retries its samples one by one
            raise
        wall = time.perf_counter() - t0
        return [(answer, len(requests), wall) for answer in answers]

    return run_batch


def decode_image(uri: str) -> Image.Image:
    """A PIL image (RGB) from what evalscope puts in ``ContentImage.image``.

    Data URIs are decoded from their base64 payload whatever their MIME label says (evalscope labels
    every DocVQA/ChartQA image ``png`` and every V*/OCRBench image ``jpeg``); bare base64 strings and local
    file paths work too. Remote URLs are refused: evaluation is offline.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError("empty image reference")
    if uri.startswith("data:"):
        header, sep, payload = uri.partition(",")
        if not sep:
            raise ValueError(f"malformed data URI (no comma): {uri[:40]!r}...")
        if ";base64" in header:
            data = _b64(payload)
        else:
            from urllib.parse import unquote_to_bytes

            data = unquote_to_bytes(payload)
    elif uri.startswith(("http://", "https://")):
        raise ValueError(f"image URL {uri[:80]!r}: qzoom evaluates offline; give the image bytes or a local path")
    elif len(uri) < 4096 and Path(uri).is_file():
        data = Path(uri).read_bytes()
    else:
        data = _b64(uri)
    img = None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as exc:
        if is_out_of_memory(exc):  # a sound image too large for the free memory: say so, not "unreadable"
            size = "x".join(map(str, img.size)) if img is not None else "an"
            raise MemoryError(f"decoding {size} image: out of memory ({type(exc).__name__} {exc})") from exc
        raise ValueError(f"image bytes are not a readable image ({exc})") from exc


def _b64(payload: str) -> bytes:
    payload = "".join(payload.split())
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64 image payload ({exc})") from exc


def split_messages(messages: list[ChatMessage]) -> tuple[list[Image.Image], str]:
    """Images (in order) and the question text of an evalscope chat input.

    System text comes first, then each user message's text parts, joined by newlines. Images keep their
    order; the model sees them all before the text (Q-Zoom crops the last one).
    """
    images: list[Image.Image] = []
    system: list[str] = []
    texts: list[str] = []
    for msg in messages:
        if not isinstance(msg, (ChatMessageSystem, ChatMessageUser)):
            continue  # no assistant/tool turns in these benchmarks
        content = msg.content
        parts = [ContentText(text=content)] if isinstance(content, str) else list(content)
        for part in parts:
            if isinstance(part, ContentImage):
                images.append(decode_image(part.image))
            elif isinstance(part, ContentText) and part.text.strip():
                (system if isinstance(msg, ChatMessageSystem) else texts).append(part.text.strip())
    return images, "\n".join(system + texts)


def load_qzoom_model(model_path: str, checkpoint: str | None = None, dtype: str | None = "auto",
                     device: str | None = "auto", attn_implementation: str | None = None):
    """``QZoomModel.from_pretrained`` once per (path, checkpoint, dtype, device, attention) in this process.

    Returns (model, its batcher): every task on these weights batches through the same queue.
    """
    from qzoom_swift.loading import LoadSettings, resolve_load
    from qzoom_swift.model import QZoomModel

    resolved = resolve_load(LoadSettings(device or "auto", dtype or "auto", attn_implementation or "auto"))
    key = (str(model_path), str(checkpoint) if checkpoint else None, str(resolved.dtype), resolved.device,
           str(resolved.attn_implementation))
    with _MODELS_LOCK:
        if key not in _MODELS:
            qz = QZoomModel.from_pretrained(model_path, checkpoint=checkpoint or None, dtype=resolved.dtype,
                                            attn_implementation=resolved.attn_implementation,
                                            device=resolved.device)
            _MODELS[key] = (qz, Batcher(_batch_runner(qz), name=f"qzoom-batcher:{Path(str(model_path)).name}"))
        return _MODELS[key]


class QZoomAPI(ModelAPI):
    """evalscope ``ModelAPI`` over ``QZoomModel``; ``model_args`` are the constructor's keyword arguments.

    Args (``model_args``):
        checkpoint: Q-Zoom branch checkpoint dir (``qzoom_branch.safetensors`` + ``qzoom_config.json``);
            None = fresh, untrained branches (enough for ``mode='never'``, the plain-model baseline).
        mode: ``zoom`` (gated), ``always`` or ``never`` (low-resolution only: the baseline).
        tau_gate, tau_roi, low_max_tokens, low_min_tokens, roi_max_tokens, roi_min_tokens, blur_kernel,
            blur_sigma, min_box_side, roi_fallback: QZoomConfig overrides for this task.
        max_new_tokens: default answer length when the generation config sets no ``max_tokens``.
        dtype: auto | bfloat16 | float16 | float32. device: auto | cuda | cuda:N | cpu.
        attn_implementation: e.g. sdpa (the paper's throughput runs) or flash_attention_2.
        max_batch_size: most concurrent samples answered in one ``generate`` batch (default 1; set it to
            evalscope's ``eval_batch_size``). batch_window_s: longest wait for companions (default 0.05 s).
        backend: ``transformers`` (``QZoomModel.generate``) or ``vllm`` (``QZoomVLLM.generate``; needs vLLM).
        engine_args: ``QZoomVLLM`` keyword arguments for the vllm backend (max_model_len, kv_cache_space_gb,
            enforce_eager, gpu_memory_utilization, tensor_parallel_size, any ``vllm.LLM`` argument).
    """

    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig | None = None, *, checkpoint: str | None = None,
                 max_new_tokens: int = 128, dtype: str | None = "auto", device: str | None = "auto",
                 attn_implementation: str | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_window_s: float = DEFAULT_BATCH_WINDOW_S, backend: str = "transformers",
                 engine_args: dict[str, Any] | None = None, **model_args: Any) -> None:
        super().__init__(model_name, base_url, api_key, config if config is not None else GenerateConfig())
        unknown = sorted(k for k in model_args if k not in CONFIG_KEYS)
        if unknown:
            raise ValueError(f"qzoom model_args: unknown keys {unknown}; known: checkpoint, max_new_tokens, dtype, "
                             f"device, attn_implementation, max_batch_size, batch_window_s, backend, engine_args, "
                             f"{', '.join(CONFIG_KEYS)}")
        from qzoom_swift.eval.vllm_backend import BACKENDS

        if backend not in BACKENDS or (engine_args and backend != "vllm"):
            raise ValueError(f"qzoom model_args: backend {backend!r} must be one of {', '.join(BACKENDS)}; "
                             "engine_args go with backend='vllm' only")
        if int(max_batch_size) < 1 or float(batch_window_s) < 0:
            raise ValueError(f"qzoom model_args: max_batch_size {max_batch_size} must be >= 1 and batch_window_s "
                             f"{batch_window_s} >= 0")
        self.max_batch_size, self.batch_window_s = int(max_batch_size), float(batch_window_s)
        self.backend = backend
        self.engine = None
        if backend == "vllm":  # the router (a QZoomModel) holds the config; the engine answers
            from qzoom_swift.eval.vllm_backend import load_vllm_engine

            self.engine, self._batcher = load_vllm_engine(model_name, checkpoint, dtype, device, engine_args)
            self.qz = self.engine.router
        else:
            self.qz, self._batcher = load_qzoom_model(model_name, checkpoint, dtype, device, attn_implementation)
        self.overrides = dict(model_args)
        # what QZoomModel.generate will use: checkpoint < QZOOM_* environment < this task's model_args
        self.effective_config = effective_config(self.qz.config, self.overrides)
        self.default_max_new_tokens = int(max_new_tokens)
        self.checkpoint = checkpoint
        self._failures_in_a_row = 0
        self._failures_lock = threading.Lock()

    def max_tokens(self) -> int | None:
        return self.default_max_new_tokens

    def generate(self, input: list[ChatMessage], tools: list[ToolInfo], tool_choice: ToolChoice,
                 config: GenerateConfig) -> ModelOutput:
        try:
            images, question = split_messages(input)  # decoding is not part of the timed model work
        except Exception as exc:  # the sample's own data: it fails alone, the benchmark goes on
            reason = model_failure_reason(exc) if is_out_of_memory(exc) else UNREADABLE_IMAGE
            return self._failed(reason, exc, input)
        max_new = int(config.max_tokens or self.default_max_new_tokens)
        kwargs: dict[str, Any] = {}
        if config.do_sample:
            kwargs["do_sample"] = True
            for name in ("temperature", "top_p", "top_k"):
                if getattr(config, name, None) is not None:
                    kwargs[name] = getattr(config, name)
        if config.repetition_penalty is not None:
            kwargs["repetition_penalty"] = config.repetition_penalty
        request = _Request(images, question, dict(self.overrides), max_new, kwargs)
        try:
            answer, batch_size, batch_wall = self._batcher.submit(request, request.key,
                                                                  max_batch=self.max_batch_size,
                                                                  window_s=self.batch_window_s)
        except Exception as exc:  # the batcher already retried a failed batch one sample at a time
            self._count_model_failure(exc)
            return self._failed(model_failure_reason(exc), exc, input)
        error = getattr(answer, "error", None)  # a vLLM answer names a sample the engine could not answer
        if error:
            exc = RuntimeError(error)
            failure = getattr(answer, "failure", None)
            if failure == UNREADABLE_IMAGE:  # the sample's own data, as on the transformers backend
                return self._failed(failure, exc, input)
            self._count_model_failure(exc)  # prompt_too_long every time is a setting (max_model_len): it stops
            return self._failed(failure or model_failure_reason(exc), exc, input)
        with self._failures_lock:
            self._failures_in_a_row = 0
        wall = batch_wall / batch_size  # this sample's share of its batch
        st = answer.stats
        text = answer.text
        out_tokens = len(answer.token_ids or [])  # the generated tokens themselves (incl. a final end token)
        model_time = st.time_pass1_s + st.time_pass2_s + st.time_decode_s
        latency = model_time if model_time > 0 else wall
        # on vLLM prefill and decode are one engine call (time_decode_s): no time to first token is measured
        ttft = st.time_pass1_s + st.time_pass2_s if model_time > 0 and self.engine is None else None
        output = ModelOutput.from_content(model=self.model_name, content=text,
                                          stop_reason="max_tokens" if out_tokens >= max_new else "stop")
        output.usage = ModelUsage(input_tokens=st.prompt_tokens, output_tokens=out_tokens,
                                  total_tokens=st.prompt_tokens + out_tokens)
        output.time = latency
        output.message.perf_metrics = PerformanceMetrics(latency=latency, ttft=ttft, input_tokens=st.prompt_tokens,
                                                         output_tokens=out_tokens)
        cfg = self.effective_config
        output.metadata = {"qzoom": {
            **st.to_dict(),
            "latency_s": latency, "wall_s": wall, "output_tokens": out_tokens, "batch_size": batch_size,
            "batch_wall_s": batch_wall, "backend": self.backend,
            **({"cached_tokens": answer.cached_tokens} if self.engine is not None else {}),
            "mode": cfg.mode, "tau_gate": cfg.tau_gate, "tau_roi": cfg.tau_roi,
            "low_tokens": [cfg.low_min_tokens, cfg.low_max_tokens],
            "roi_tokens": [cfg.roi_min_tokens, cfg.roi_max_tokens],
            "num_images": len(images), "image_size": list(images[-1].size) if images else None,
        }}
        return output

    def _count_model_failure(self, exc: Exception) -> None:
        """A model that fails sample after sample is broken: stop rather than score a whole benchmark 0."""
        with self._failures_lock:
            self._failures_in_a_row += 1
            count = self._failures_in_a_row
        if count > MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"qzoom: the model failed on {count} samples in a row (last: {type(exc).__name__}: "
                               f"{str(exc)[:300]}); this is not one bad sample, stopping") from exc

    def _failed(self, reason: str, exc: Exception, input: list[ChatMessage]) -> ModelOutput:
        """The answer of a sample that could not be answered: empty text (scored as failed) and why."""
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
        logger.warning("qzoom: a sample failed (%s, %s); it is scored as failed and the run goes on. Question: %r",
                       reason, error, _question_hint(input))
        output = ModelOutput.from_content(model=self.model_name, content="", stop_reason="unknown")
        output.error = f"{reason}: {error}"
        output.usage = ModelUsage(input_tokens=0, output_tokens=0, total_tokens=0)
        output.time = 0.0
        cfg = self.effective_config
        output.metadata = {"qzoom": {"failed": True, "failure": reason, "error": error, "backend": self.backend,
                                     "mode": cfg.mode, "tau_gate": cfg.tau_gate, "tau_roi": cfg.tau_roi}}
        return output


def _question_hint(messages: list[ChatMessage]) -> str:
    """The first words of a sample's text (its index is only known to evalscope, which records it)."""
    for msg in messages:
        content = getattr(msg, "content", "")
        parts = [content] if isinstance(content, str) else [getattr(p, "text", "") for p in content
                                                               if isinstance(p, ContentText)]
        text = " ".join(t for t in parts if t).strip()
        if text:
            return text[:80]
    return ""


def _sync(qz) -> None:
    import torch

    if qz.device.type == "cuda":
        torch.cuda.synchronize(qz.device)


def register() -> None:
    """Register ``qzoom`` with evalscope (idempotent: importing this module already did)."""
    if not MODEL_APIS.is_registered(MODEL_API_NAME):
        register_model_api(MODEL_API_NAME)(QZoomAPI)


register()

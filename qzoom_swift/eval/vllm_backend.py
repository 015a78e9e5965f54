"""``qzoom eval --backend vllm``: the ``qzoom`` model API answering through ``QZoomVLLM`` instead of transformers.

A vLLM engine is a set of processes that hold the model and its KV cache, and starting one takes a minute on a
CPU, so a worker process keeps one engine per (model, checkpoint, dtype, router device, engine arguments) for
all its benchmarks: they differ only in thresholds and budgets, which ``QZoomVLLM.generate`` takes per call
(``config_overrides``). evalscope's concurrent calls go through the same ``Batcher`` as the transformers
backend, so ``--eval-batch-size N`` sends up to N samples as one ``generate`` (vLLM schedules them together).
``shutdown_engines`` stops them when the worker ends (also on SIGTERM: ``stop_engines_on_signal``), so a run
leaves no engine process behind.

Standard library only at import: ``qzoom eval --help`` and the parent process import this module for the
``--vllm-arg`` rules; vLLM and torch load when an engine starts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from qzoom_swift.eval.batcher import Batcher

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")
VLLM_INSTALL_HINT = ("in this checkout run it with .venv-vllm/bin/qzoom (`make venv-vllm` builds that environment: "
                     "vLLM needs its own torch)")
RESERVED_ENGINE_ARGS = ("model", "checkpoint", "router", "config_overrides", "dtype", "router_device",
                        "router_dtype")
"""``QZoomVLLM`` arguments ``qzoom eval`` sets from its own flags (--model, --checkpoint, --dtype, --device)."""

_ENGINES: dict[str, tuple[Any, Batcher]] = {}
_ENGINES_LOCK = threading.Lock()


def parse_engine_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--vllm-arg``: VALUE as JSON when it parses (numbers, true/false, objects), else text."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise ValueError(f"--vllm-arg {text!r}: expected KEY=VALUE, e.g. max_model_len=8192")
    if key in RESERVED_ENGINE_ARGS:
        raise ValueError(f"--vllm-arg {key}: qzoom eval sets it itself (--model, --checkpoint, --dtype, --device)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def engine_args(items: list[str]) -> dict[str, Any]:
    """All ``--vllm-arg`` items as ``QZoomVLLM`` keyword arguments (a later KEY wins)."""
    return dict(parse_engine_arg(item) for item in items)


def load_vllm_engine(model_path: str, checkpoint: str | None, dtype: str | None = "auto",
                     device: str | None = "auto", engine_kwargs: dict[str, Any] | None = None) -> tuple[Any, Batcher]:
    """The process's ``QZoomVLLM`` for these settings (started on first use) and the batcher in front of it.

    ``dtype`` / ``device`` are resolved as the transformers backend resolves them (auto: bfloat16 on a GPU,
    float32 on the CPU), and the same dtype serves the router and the engine: both halves of a decision then
    compute in one precision, as ``QZoomModel.generate`` does.
    """
    from qzoom_swift.loading import LoadSettings, resolve_load

    resolved = resolve_load(LoadSettings(device or "auto", dtype or "auto", "auto"))
    dtype_name = str(resolved.dtype).removeprefix("torch.")
    kwargs = dict(engine_kwargs or {})
    key = json.dumps([str(model_path), str(checkpoint) if checkpoint else None, dtype_name, resolved.device, kwargs],
                     sort_keys=True, default=str)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            from qzoom_swift.vllm_plugin.engine import QZoomVLLM

            t0 = time.perf_counter()
            engine = QZoomVLLM(model_path, checkpoint or None, dtype=dtype_name, router_device=resolved.device,
                               router_dtype=dtype_name, **kwargs)
            logger.info("qzoom eval: vLLM engine for %s started in %.0f s", model_path, time.perf_counter() - t0)
            _ENGINES[key] = (engine, Batcher(_batch_runner(engine), name=f"qzoom-vllm:{Path(str(model_path)).name}"))
        return _ENGINES[key]


def sampling_params(max_new_tokens: int, kwargs: dict[str, Any]):
    """vLLM ``SamplingParams`` for what the model API derived from evalscope's generation config; None = greedy
    (``QZoomVLLM.generate``'s default, the one the transformers backend matches)."""
    if not kwargs:
        return None
    from vllm import SamplingParams

    params: dict[str, Any] = {"max_tokens": max_new_tokens,
                              "temperature": float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0}
    for name in ("top_p", "top_k", "repetition_penalty"):
        if kwargs.get(name) is not None:
            params[name] = kwargs[name]
    return SamplingParams(**params)


def _batch_runner(engine):
    """``run_batch`` for the engine's batcher: one ``QZoomVLLM.generate`` over the batch; (answer, size, wall) each.

    A sample the engine could not answer comes back with ``error`` set; the model API scores it as failed.
    """
    def run_batch(_key: str, requests: list) -> list[tuple[Any, int, float]]:
        first = requests[0]
        t0 = time.perf_counter()
        answers = engine.generate([r.images for r in requests], [r.question for r in requests],
                                  config_overrides=first.overrides, max_new_tokens=first.max_new_tokens,
                                  sampling_params=sampling_params(first.max_new_tokens, first.kwargs))
        wall = time.perf_counter() - t0
        return [(answer, len(requests), wall) for answer in answers]

    return run_batch


def shutdown_engines() -> int:
    """Stop every engine this process started (their processes exit); how many were running."""
    with _ENGINES_LOCK:
        engines = [engine for engine, _ in _ENGINES.values()]
        _ENGINES.clear()
    for engine in engines:
        try:
            engine.shutdown()
        except Exception as exc:  # one engine that fails to stop must not keep the others running
            logger.warning("qzoom eval: stopping a vLLM engine failed (%s: %s)", type(exc).__name__, exc)
    return len(engines)


def stop_engines_on_signal(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> None:
    """On these signals stop this process's children (the engines' processes, also of an engine still starting),
    then exit with 128 + the signal: the default action would end this process at once and leave the engine's
    processes running (they do not watch their parent).

    Not ``shutdown_engines``: the signal may arrive while this thread holds the registry's lock to start an
    engine, and ``QZoomVLLM.shutdown`` may wait longer than ``qzoom eval`` gives a stopped worker.
    """
    def handler(signum, _frame):
        try:
            _stop_children()
        finally:
            os._exit(128 + signum)

    for sig in signals:
        signal.signal(sig, handler)


def _stop_children(timeout: float = 8.0) -> None:
    """Terminate what this process started and is still running, then kill what outlives ``timeout`` (within
    ``qzoom eval``'s grace before it kills this worker; multiprocessing's resource tracker ignores SIGTERM)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            continue


__all__ = ["BACKENDS", "engine_args", "load_vllm_engine", "shutdown_engines", "stop_engines_on_signal"]

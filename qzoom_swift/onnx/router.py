"""``OnnxRouter``: the gate and the RPN run by onnxruntime on the layer-B state of the same prefill.

It implements the router seam of ``qzoom_swift.zoom`` (``gate_logits(model, state)`` and
``rpn_token_logits(model, state)``, like ``TorchRouter``), so ``zoom_generate(..., router=OnnxRouter(dir))``
makes the same decisions and boxes with the graphs of ``qzoom export-onnx``. In ms-swift the template's
``generate`` picks it from the environment (``router_from_env``): ``QZOOM_ROUTER=onnx`` and
``QZOOM_ONNX_DIR=...`` (``QZOOM_ONNX_PROVIDER`` auto/cpu/cuda, ``QZOOM_ONNX_PRECISION`` fp32/fp16), e.g. via
``swift infer --model_kwargs '{"QZOOM_ROUTER": "onnx", "QZOOM_ONNX_DIR": "/path/onnx"}'``.

The execution provider is chosen explicitly and logged: ``cuda`` needs CUDAExecutionProvider to load
(error otherwise), ``cpu`` uses CPUExecutionProvider, ``auto`` takes CUDA when onnxruntime has it and
torch sees a GPU, else the CPU. Sessions never spin their intra-op threads after a run
(``session.intra_op.allow_spinning=0``), so they do not steal the CPU from torch between calls.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from qzoom_swift.config import read_env
from qzoom_swift.onnx.export import (
    BRANCHES,
    GATE_OUTPUTS,
    MIN_OPSET,
    PRECISIONS,
    RPN_OUTPUTS,
    onnx_filename,
    ort_max_opset,
    read_metadata,
)

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class OnnxRouterError(ValueError):
    """The ONNX router cannot serve this model or run as asked (wrong graphs, provider, opset)."""


def _describe(meta: Mapping[str, str]) -> str:
    return (f"family {meta.get('family')}, B={meta.get('branch_layer')}, R={meta.get('branch_depth')}, "
            f"hidden {meta.get('hidden_size')}, {meta.get('num_hidden_layers')} layers")


def model_signature(model: nn.Module) -> dict[str, str]:
    """What a graph must match in ``model``: family, B, R, hidden size and depth (strings, as in the metadata)."""
    from qzoom_swift.branches import get_branches
    from qzoom_swift.families import get_adapter

    adapter = get_adapter(model)
    out = {"family": adapter.name, "hidden_size": str(int(adapter.text_config(model).hidden_size)),
           "num_hidden_layers": str(len(adapter.decoder_layers(model)))}
    branches = get_branches(model)
    if branches is not None:
        out["branch_layer"] = str(branches.qzoom_config.branch_layer)
        out["branch_depth"] = str(branches.qzoom_config.branch_depth)
    return out


def _read_graph_metadata(path: Path) -> dict[str, str]:
    """``read_metadata`` with the file named when it is not a readable ONNX graph (protobuf errors do not)."""
    try:
        return read_metadata(path)
    except Exception as exc:  # onnx raises protobuf DecodeError and others for damaged files
        raise OnnxRouterError(f"cannot read the ONNX graph {path}: {type(exc).__name__}: {exc}; re-export it with "
                              "`qzoom export-onnx`") from exc


class OnnxRouter:
    """Gate logits and RPN token logits from the exported graphs in ``onnx_dir``.

    ``provider``: ``auto`` (default), ``cpu`` or ``cuda`` (or a full onnxruntime provider name).
    ``precision``: ``fp32`` (default) or ``fp16`` graphs. ``model``: check the graphs against it now (they are
    always checked against the model of the first call). ``intra_op_threads``: onnxruntime's intra-op pool
    (default: onnxruntime's choice).
    """

    name = "onnx"

    def __init__(self, onnx_dir: str | os.PathLike, *, provider: str = "auto", precision: str = "fp32",
                 model: nn.Module | None = None, intra_op_threads: int | None = None, device_id: int = 0):
        from qzoom_swift.extras import require_extra

        require_extra("onnx", "the onnxruntime router (QZOOM_ROUTER=onnx)", ("onnxruntime",))
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise OnnxRouterError(f"unknown precision {precision!r}; choose from {tuple(PRECISIONS)}")
        self.onnx_dir = Path(onnx_dir)
        self.precision = precision
        self.paths = {b: self.onnx_dir / onnx_filename(b, precision) for b in BRANCHES}
        missing = [str(p) for p in self.paths.values() if not p.is_file()]
        if missing:
            raise OnnxRouterError(f"no exported {precision} graph at {', '.join(missing)}: run `qzoom export-onnx "
                                  f"CKPT --model BASE --out {self.onnx_dir}` first")
        self.metadata = {b: _read_graph_metadata(p) for b, p in self.paths.items()}
        self._check_graphs()
        self.provider = self._pick_provider(provider, ort)
        self.device_id = int(device_id)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
        try:
            self.sessions = self._sessions(ort, options)
        except OnnxRouterError as exc:
            if provider.lower() != "auto" or self.provider == PROVIDERS["cpu"]:
                raise
            logger.warning("Q-Zoom ONNX router: provider auto -> CPUExecutionProvider (%s)", exc)
            self.provider = PROVIDERS["cpu"]
            self.sessions = self._sessions(ort, options)
        self.input_dtype = _NUMPY_TYPES[self.sessions["gate"].get_inputs()[0].type]
        known = {"gate": GATE_OUTPUTS, "rpn": RPN_OUTPUTS}
        self.output_names = {b: [o.name for o in s.get_outputs() if o.name in known[b]]
                             for b, s in self.sessions.items()}
        """Outputs each graph has (graphs exported before ``sink_logits`` existed lack it)."""
        logger.info("Q-Zoom ONNX router: %s graphs from %s on %s", precision, self.onnx_dir, self.provider)
        if model is not None:
            self.check_model(model)

    def _sessions(self, ort, options) -> dict:
        providers = [PROVIDERS["cpu"]]
        if self.provider == PROVIDERS["cuda"]:
            providers.insert(0, (self.provider, {"device_id": self.device_id}))
        sessions = {}
        for branch, path in self.paths.items():
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:
                raise OnnxRouterError(f"onnxruntime {ort.__version__} cannot load {path}: {exc}") from exc
            if session.get_providers()[0] != self.provider:
                raise OnnxRouterError(
                    f"{self.provider} was requested for {path} but onnxruntime fell back to "
                    f"{session.get_providers()[0]} (no usable GPU or CUDA libraries); use provider='cpu'")
            sessions[branch] = session
        return sessions

    # ---- validation ----
    def _check_graphs(self) -> None:
        top = ort_max_opset()
        for branch, meta in self.metadata.items():
            path = self.paths[branch]
            if meta.get("branch") != branch:
                raise OnnxRouterError(f"{path} is not a Q-Zoom {branch} graph (metadata qzoom.branch="
                                      f"{meta.get('branch')!r}); export it with `qzoom export-onnx`")
            opset = int(meta["_opset"])
            if not (MIN_OPSET <= opset <= top):
                import onnxruntime as ort

                raise OnnxRouterError(
                    f"{path} uses opset {opset}, which is not supported: onnxruntime {ort.__version__} loads "
                    f"opsets up to {top} and the Q-Zoom graphs need at least {MIN_OPSET}; re-export with "
                    f"`qzoom export-onnx ... --opset N` for N in [{MIN_OPSET}, {top}]")
        gate, rpn = self.metadata["gate"], self.metadata["rpn"]
        keys = ("family", "branch_layer", "branch_depth", "hidden_size", "num_hidden_layers")
        if any(gate.get(k) != rpn.get(k) for k in keys):
            raise OnnxRouterError(f"{self.paths['gate']} ({_describe(gate)}) and {self.paths['rpn']} "
                                  f"({_describe(rpn)}) were exported from different models")

    def check_model(self, model: nn.Module) -> None:
        """A clear error when the graphs were exported from another model (family, B, R, hidden size, depth)."""
        have = model_signature(model)
        meta = self.metadata["gate"]
        wrong = [k for k, v in have.items() if meta.get(k) != v]
        if wrong:
            raise OnnxRouterError(
                f"ONNX router graphs in {self.onnx_dir} ({_describe(meta)}) were exported from another model than "
                f"{type(model).__name__} ({_describe(have)}): mismatch in {', '.join(wrong)}; export the router "
                "from this model's Q-Zoom checkpoint (`qzoom export-onnx CKPT --model BASE --out DIR`)")

    @staticmethod
    def _pick_provider(provider: str, ort) -> str:
        available = ort.get_available_providers()
        key = provider.lower().removesuffix("executionprovider")
        if key == "auto":
            if PROVIDERS["cuda"] in available and torch.cuda.is_available():
                return PROVIDERS["cuda"]
            why = ("onnxruntime has no CUDAExecutionProvider" if PROVIDERS["cuda"] not in available
                   else "torch sees no CUDA device")
            logger.info("Q-Zoom ONNX router: provider auto -> CPUExecutionProvider (%s)", why)
            return PROVIDERS["cpu"]
        if key not in PROVIDERS:
            raise OnnxRouterError(f"unknown onnxruntime provider {provider!r}; choose auto, cpu or cuda")
        name = PROVIDERS[key]
        if name not in available:
            raise OnnxRouterError(
                f"onnxruntime provider {name} was requested but onnxruntime {ort.__version__} only has "
                f"{', '.join(available)}; install onnxruntime-gpu for CUDA, or use provider='cpu'")
        if name == PROVIDERS["cuda"] and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the nvidia-* wheels torch brought along
                ort.preload_dlls()
            except Exception as exc:  # noqa: BLE001 - the session creation below reports what is missing
                logger.debug("onnxruntime.preload_dlls failed: %s", exc)
        return name

    # ---- running ----
    def run(self, branch: str, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cos: torch.Tensor,
            sin: torch.Tensor, query_index: torch.Tensor) -> list[torch.Tensor]:
        """Run one graph on torch tensors; outputs are float32 tensors on ``hidden_states``' device."""
        batch, seq = hidden_states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.long, device=hidden_states.device)
        hidden_size = int(self.metadata[branch]["hidden_size"])
        if hidden_states.shape[-1] != hidden_size:
            raise OnnxRouterError(f"{self.paths[branch]} takes hidden states of width {hidden_size}, got "
                                  f"{tuple(hidden_states.shape)} ({_describe(self.metadata[branch])})")
        if cos.shape[0] != batch:
            cos, sin = cos.expand(batch, *cos.shape[1:]), sin.expand(batch, *sin.shape[1:])
        feeds = {"hidden_states": hidden_states.to(self.input_dtype), "attention_mask": attention_mask.long(),
                 "cos": cos.to(self.input_dtype), "sin": sin.to(self.input_dtype),
                 "query_index": query_index.long().expand(batch)}
        names = self.output_names[branch]
        session = self.sessions[branch]
        device = hidden_states.device
        on_device = device.type == "cuda" and (device.index or 0) == self.device_id
        if self.provider == PROVIDERS["cuda"] and on_device:
            return self._run_bound(session, feeds, names, batch, seq, device)
        outputs = session.run(names, {k: v.detach().contiguous().cpu().numpy() for k, v in feeds.items()})
        return [torch.from_numpy(o).to(device) for o in outputs]

    def _run_bound(self, session, feeds, names, batch, seq, device) -> list[torch.Tensor]:
        """CUDA: bind torch's device buffers as inputs and outputs (no host round trip)."""
        import numpy as np

        binding = session.io_binding()
        np_types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
        kept = []
        for name, value in feeds.items():
            value = value.detach().to(device).contiguous()
            kept.append(value)
            binding.bind_input(name, "cuda", self.device_id, np_types[value.dtype], list(value.shape),
                               value.data_ptr())
        outputs = []
        for name in names:
            out = torch.empty((batch,) if name in GATE_OUTPUTS else (batch, seq), dtype=torch.float32, device=device)
            binding.bind_output(name, "cuda", self.device_id, np.float32, list(out.shape), out.data_ptr())
            outputs.append(out)
        torch.cuda.synchronize(device)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs

    def _state_inputs(self, model: nn.Module, state) -> tuple:
        self.check_model(model)
        deepstack = getattr(state.embedded, "deepstack", None)
        b = int(self.metadata["gate"]["branch_layer"])
        if deepstack is not None and len(deepstack) > b:
            raise OnnxRouterError(f"the model injects visual features after layer {b} (DeepStack level "
                                  f"{len(deepstack) - 1}); the ONNX graphs cannot route such a branch layer")
        cos, sin = state.extras["rope"]
        return state.hidden, state.attention_mask, cos, sin, state.query_index

    # ---- the router seam (same as TorchRouter) ----
    def gate_logits(self, model: nn.Module, state) -> torch.Tensor:
        """[B] gate logits; also stored on ``state.gate_logit``."""
        logit, _ = self.run("gate", *self._state_inputs(model, state))
        state.gate_logit = logit
        return logit

    def rpn_token_logits(self, model: nn.Module, state) -> torch.Tensor:
        """[B, S] RPN token scores; also stored on ``state.rpn_token_logits`` (and the first-token sink scores
        on ``state.rpn_sink_logits``, None for graphs exported without them)."""
        outputs = self.run("rpn", *self._state_inputs(model, state))
        state.rpn_token_logits = outputs[0]
        state.rpn_sink_logits = outputs[1] if len(outputs) > 1 else None
        return outputs[0]

    def __repr__(self) -> str:
        return f"OnnxRouter({str(self.onnx_dir)!r}, provider={self.provider!r}, precision={self.precision!r})"


_CACHE: dict[tuple[str, str, str], OnnxRouter] = {}
_LOCK = threading.Lock()


def router_from_env(environ: Mapping[str, str] | None = None, log: Callable[[str], None] | None = None):
    """The router chosen by ``QZOOM_ROUTER`` (``torch``: None, i.e. zoom_generate's default; ``onnx``: a cached
    ``OnnxRouter`` for ``QZOOM_ONNX_DIR``, ``QZOOM_ONNX_PROVIDER``, ``QZOOM_ONNX_PRECISION``).

    ``log`` receives one line when a router is created (the ms-swift template passes swift's logger).
    """
    try:
        env = read_env(environ)
    except ValueError as exc:
        raise OnnxRouterError(str(exc)) from exc
    if env.router == "torch":
        return None
    if not env.onnx_dir:
        raise OnnxRouterError("QZOOM_ROUTER=onnx needs QZOOM_ONNX_DIR (the output dir of `qzoom export-onnx`)")
    key = (str(Path(env.onnx_dir).resolve()), env.onnx_provider, env.onnx_precision)
    with _LOCK:
        router = _CACHE.get(key)
        if router is None:
            router = _CACHE[key] = OnnxRouter(key[0], provider=key[1], precision=key[2])
            if log is not None:
                log(f"qzoom router: onnx ({router.precision}) from {router.onnx_dir} on {router.provider}")
    return router

"""Export the gate and the RPN of a loaded Q-Zoom model as two ONNX graphs, check them, measure parity.

``export_onnx(model, out_dir)`` writes, per precision (fp32, fp16):

- ``gate.onnx`` / ``gate.fp16.onnx``: (hidden_states, attention_mask, cos, sin, query_index) -> gate_logit [B],
  gate_prob [B];
- ``rpn.onnx`` / ``rpn.fp16.onnx``: same inputs -> token_logits [B, S] (mean over heads of q_query . k * scale;
  selecting the visual tokens and shaping heatmaps stays outside the graph) and sink_logits [B, S] (the first
  real token's head-0 query against every head's keys: what Qwen3-VL's released sink mask thresholds);
- ``qzoom_config.json`` (the branches' config) and ``parity_report.json`` (onnxruntime vs torch on random and
  real prompts, several batch sizes and sequence lengths, including lengths not seen at export).

Graphs come from ``torch.onnx.export(..., dynamo=True)`` with dynamic batch and sequence axes, are checked
with ``onnx.checker`` and carry B, R, family, thresholds, hidden size, opset and the qzoom version in
``metadata_props`` (the router checks them against the model it serves). See ``export/README.md``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qzoom_swift.branches import require_branches
from qzoom_swift.families import Embedded, get_adapter
from qzoom_swift.onnx.graphs import GATE_OUTPUTS, INPUT_NAMES, RPN_OUTPUTS, GateGraph, RPNGraph

logger = logging.getLogger(__name__)

BRANCHES = ("gate", "rpn")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
MIN_OPSET = 18
"""The dynamo exporter emits opset 18 or newer."""
DEFAULT_OPSET = 18
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
"""Max abs difference to torch (fp32) allowed in the parity report: gate probability; token logits are
compared relative to their largest magnitude for fp16 (see ``parity_report``)."""
REPORT_NAME = "parity_report.json"
METADATA_PREFIX = "qzoom."
EXPORT_BATCH, EXPORT_SEQ = 2, 37
"""Shape of the example inputs traced at export (batch and sequence stay dynamic in the graph)."""


class OnnxExportError(ValueError):
    """The branches cannot be exported as asked (opset, precision, a family hook the graph cannot express)."""


def onnx_filename(branch: str, precision: str = "fp32") -> str:
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; choose from {BRANCHES}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {tuple(PRECISIONS)}")
    return f"{branch}.onnx" if precision == "fp32" else f"{branch}.{precision}.onnx"


@lru_cache(maxsize=1)
def ort_max_opset() -> int:
    """Newest default-domain opset the installed onnxruntime loads (probed once with a one-node graph)."""
    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    graph = oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "probe",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    for version in range(onnx.defs.onnx_opset_version(), MIN_OPSET - 1, -1):
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", version)])
        model.ir_version = min(model.ir_version, 10)
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return version
        except Exception:  # noqa: BLE001 - an unsupported opset is exactly what is probed
            continue
    return MIN_OPSET


def check_opset(opset: int) -> int:
    """``opset`` if both the dynamo exporter and the installed onnxruntime support it, else a clear error."""
    import onnxruntime as ort

    top = ort_max_opset()
    if not (MIN_OPSET <= int(opset) <= top):
        raise OnnxExportError(
            f"opset {opset} is not supported: the torch dynamo exporter needs opset >= {MIN_OPSET} and "
            f"onnxruntime {ort.__version__} loads opsets up to {top}; choose one in [{MIN_OPSET}, {top}]"
        )
    return int(opset)


def _check_no_after_layer_hook(model: nn.Module, first: int, count: int) -> None:
    """Refuse branches whose layers the family adapter touches between layers (e.g. Qwen3-VL DeepStack at B < 3).

    The probe hands the hook one visual token and as many injected feature levels as the vision config
    declares (``deepstack_visual_indexes``; 64 when it declares none); a hook that changes the hidden state
    at a branch layer index would need inputs the graphs do not take.
    """
    adapter = get_adapter(model)
    d = int(adapter.text_config(model).hidden_size)
    vision = getattr(model.config, "vision_config", None)
    levels = getattr(vision, "deepstack_visual_indexes", None)
    hidden = torch.zeros(1, 1, d)
    visual = torch.ones(1, 1, dtype=torch.bool)
    embedded = Embedded(hidden, visual, [(1, 1)], [torch.ones(1, d) for _ in range(64 if levels is None else len(levels))])
    for index in range(first, first + count):
        try:
            out = adapter.after_layer(model, index, hidden.clone(), embedded, visual)
        except Exception:  # noqa: BLE001 - a hook that cannot even run on the probe is one we cannot export
            out = None
        if out is None or not torch.equal(out, hidden):
            raise OnnxExportError(
                f"{adapter.name}: the model adds features after decoder layer {index}, which is a branch layer "
                f"(B={first}); the ONNX graphs take only the layer-B hidden state. Use a deeper branch layer."
            )


def branch_graph(model: nn.Module, branch: str) -> nn.Module:
    """The export-friendly module of ``branch`` (sharing the branch's parameters; eval mode)."""
    branches = require_branches(model)
    adapter = get_adapter(model)
    module = branches.gate if branch == "gate" else branches.rpn
    _check_no_after_layer_hook(model, branches.first_layer, len(module.layers))
    graph = GateGraph(module, adapter) if branch == "gate" else RPNGraph(module, adapter)
    return graph.eval()


def router_inputs(model: nn.Module, batch: int, seq: int, *, left_pad: list[int] | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.float32, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random graph inputs with real rotary tables: hidden ~ N(0, scale^2), left padding ``left_pad[b]``.

    Positions come from the adapter (text-only prompts: sequential, skipping padding), the rotary tables from
    the model's own rotary embedding; the query index is the last token of every sample.
    """
    adapter = get_adapter(model)
    d = int(adapter.text_config(model).hidden_size)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, d, generator=gen) * scale
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b, pad in enumerate(left_pad or []):
        mask[b, :pad] = 0
    device = next(model.parameters()).device
    with torch.no_grad():
        ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
        positions = adapter.position_ids(model, ids, mask.to(device))
        cos, sin = adapter.rotary(model, hidden.to(device), positions)
    query = torch.full((batch,), seq - 1, dtype=torch.long)
    return {"hidden_states": hidden.to(dtype), "attention_mask": mask, "cos": cos.cpu().to(dtype),
            "sin": sin.cpu().to(dtype), "query_index": query}


def torch_reference(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gate logits/probabilities and RPN token logits from the torch branches (``qzoom_swift.prefill``)."""
    from qzoom_swift.prefill import BranchPrefill, gate_logits, rpn_token_logits

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    hidden = inputs["hidden_states"].to(device, dtype)
    state = BranchPrefill(hidden=hidden, input_ids=None,
                          embedded=Embedded(hidden, torch.zeros(hidden.shape[:2], dtype=torch.bool), []),
                          position_ids=None, attention_mask=inputs["attention_mask"].to(device),
                          query_index=inputs["query_index"].to(device), branch_layer=require_branches(model).first_layer,
                          adapter=get_adapter(model),
                          extras={"rope": (inputs["cos"].to(device, dtype), inputs["sin"].to(device, dtype))})
    with torch.no_grad():
        logit = gate_logits(model, state).float().cpu()
        tokens = rpn_token_logits(model, state).float().cpu()
    return {"gate_logit": logit, "gate_prob": torch.sigmoid(logit), "token_logits": tokens,
            "sink_logits": state.rpn_sink_logits.float().cpu()}


def export_metadata(model: nn.Module, branch: str, precision: str, opset: int) -> dict[str, str]:
    """``metadata_props`` of one graph: where it branches, for which model, and how it was made."""
    import qzoom_swift

    branches = require_branches(model)
    cfg = branches.qzoom_config
    adapter = get_adapter(model)
    text = adapter.text_config(model)
    head = branches.rpn.head
    values = {
        "branch": branch, "family": adapter.name, "branch_layer": cfg.branch_layer, "branch_depth": cfg.branch_depth,
        "hidden_size": int(text.hidden_size), "num_hidden_layers": len(adapter.decoder_layers(model)),
        "num_attention_heads": int(text.num_attention_heads), "head_dim": int(head.head_dim),
        "tau_gate": cfg.tau_gate, "tau_roi": cfg.tau_roi, "opset": opset, "precision": precision,
        "qzoom_version": qzoom_swift.__version__, "torch_version": torch.__version__,
        "base_model": str(getattr(model.config, "_name_or_path", "") or ""),
        "inputs": ",".join(INPUT_NAMES), "outputs": ",".join(GATE_OUTPUTS if branch == "gate" else RPN_OUTPUTS),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    return {METADATA_PREFIX + k: str(v) for k, v in values.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``qzoom.*`` metadata of an exported graph, without the prefix (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}
    out["_opset"] = str(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))
    return out


def export_branch(model: nn.Module, branch: str, path: str | os.PathLike, precision: str = "fp32",
                  opset: int = DEFAULT_OPSET) -> Path:
    """Export one branch to ``path`` (dynamic batch and sequence), set its metadata, run ``onnx.checker``."""
    import onnx
    from torch.export import Dim

    check_opset(opset)
    dtype = PRECISIONS[precision]
    graph = copy.deepcopy(branch_graph(model, branch)).to("cpu", dtype)
    example = router_inputs(model, EXPORT_BATCH, EXPORT_SEQ, left_pad=[0, 3], dtype=dtype)
    batch, seq = Dim("batch"), Dim("seq")
    dynamic = {"hidden_states": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "cos": {0: batch, 1: seq},
               "sin": {0: batch, 1: seq}, "query_index": {0: batch}}
    outputs = list(GATE_OUTPUTS if branch == "gate" else RPN_OUTPUTS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(graph, tuple(example[name] for name in INPUT_NAMES), dynamic_shapes=dynamic,
                                       strict=False)
        # apply_rotary rotates q and k together; where only one of them is used the other half is dead code,
        # and dropping it before the exporter's decomposition makes the export faster.
        exported.graph.eliminate_dead_code()
        exported.graph_module.recompile()
        program = torch.onnx.export(exported, dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
                                    output_names=outputs, verbose=False)
    program.model.metadata_props.update(export_metadata(model, branch, precision, opset))
    program.model.doc_string = (f"Q-Zoom {branch} branch ({precision}): inputs {', '.join(INPUT_NAMES)}; "
                                f"outputs {', '.join(outputs)}")
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    logger.info("exported %s (%s) to %s in %.1f s", branch, precision, path, time.perf_counter() - t0)
    return path


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _real_inputs(model: nn.Module, processor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Layer-B state of a real left-padded batch (two synthetic images, two questions) and its visual mask."""
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.prefill import prefill_to_branch
    from qzoom_swift.synthetic.images import make_shape_image, sample_shapes

    sizes = ((392, 280), (280, 336))
    images = [make_shape_image(sample_shapes(1, size=size, seed=i + 1)[0], size=size) for i, size in enumerate(sizes)]
    batch = chat_inputs(processor, [[images[0]], [images[1]]],
                        ["What colour is the shape?", "Describe the object in the picture in a few words."])
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    state = prefill_to_branch(model, **batch, use_cache=False)
    cos, sin = state.extras["rope"]
    inputs = {"hidden_states": state.hidden.float().cpu(), "attention_mask": state.attention_mask.long().cpu(),
              "cos": cos.float().cpu(), "sin": sin.float().cpu(), "query_index": state.query_index.long().cpu()}
    return inputs, state.embedded.visual_mask.cpu()


def _compare(sessions: dict, precision: str, model: nn.Module, inputs: dict[str, torch.Tensor],
             visual_mask: torch.Tensor | None = None) -> dict:
    import numpy as np

    ref = torch_reference(model, inputs)
    dtype = PRECISIONS[precision]
    feeds = {k: (v.to(dtype) if v.is_floating_point() else v).numpy() for k, v in inputs.items()}
    logit, prob = sessions["gate"].run(list(GATE_OUTPUTS), feeds)
    tokens, sink = (torch.from_numpy(np.asarray(o)).float() for o in sessions["rpn"].run(list(RPN_OUTPUTS), feeds))
    valid = inputs["attention_mask"].bool()
    token_diff = (tokens - ref["token_logits"])[valid].abs().max().item()
    scale = ref["token_logits"][valid].abs().max().item()
    sink_diff = (sink - ref["sink_logits"])[valid].abs().max().item()
    row = {
        "batch": int(valid.shape[0]), "seq": int(valid.shape[1]), "left_pad": (~valid).sum(1).tolist(),
        "gate_prob": float((torch.from_numpy(np.asarray(prob)).float() - ref["gate_prob"]).abs().max()),
        "gate_logit": float((torch.from_numpy(np.asarray(logit)).float() - ref["gate_logit"]).abs().max()),
        "token_logits": token_diff, "token_logits_rel": token_diff / max(scale, 1e-12),
        "sink_logits": sink_diff,
        "sink_logits_rel": sink_diff / max(ref["sink_logits"][valid].abs().max().item(), 1e-12),
    }
    if visual_mask is not None and bool(visual_mask.any()):
        row["heatmap"] = (tokens - ref["token_logits"])[visual_mask].abs().max().item()
    return row


PARITY_CASES = ((1, 5, None), (1, EXPORT_SEQ, None), (2, 29, [0, 4]), (3, 64, [0, 10, 30]), (2, 130, [7, 0]))
"""(batch, sequence length, left padding) of the random parity cases; only one length equals the export's."""


def parity_report(model: nn.Module, files: dict[tuple[str, str], Path], processor=None,
                  cases=PARITY_CASES) -> dict:
    """Max abs differences onnxruntime (CPU) vs torch for every precision exported; ``passed`` per precision.

    fp32 must stay within ``TOLERANCE['fp32']`` for the gate probability, the gate logit, the token and the sink
    logits; fp16 within ``TOLERANCE['fp16']`` for the gate probability and relative to the largest token (sink)
    logit.
    """
    precisions = sorted({p for _, p in files}, key=list(PRECISIONS).index)
    real = _real_inputs(model, processor) if processor is not None else None
    report: dict = {"cases": [list(c) for c in cases], "export_shape": [EXPORT_BATCH, EXPORT_SEQ], "precisions": {}}
    for precision in precisions:
        sessions = {b: _session(files[(b, precision)]) for b in BRANCHES}
        rows = []
        for i, (batch, seq, pad) in enumerate(cases):
            rows.append({"kind": "random", **_compare(sessions, precision, model,
                                                      router_inputs(model, batch, seq, left_pad=pad, seed=100 + i))})
        if real is not None:
            rows.append({"kind": "real", **_compare(sessions, precision, model, real[0], real[1])})
        tol = TOLERANCE[precision]
        keys = ("gate_prob", "gate_logit", "token_logits", "token_logits_rel", "sink_logits", "sink_logits_rel",
                "heatmap")
        worst = {k: max(r[k] for r in rows if k in r) for k in keys if any(k in r for r in rows)}
        if precision == "fp32":
            passed = all(worst[k] <= tol for k in ("gate_prob", "gate_logit", "token_logits", "sink_logits", "heatmap")
                         if k in worst)
        else:
            passed = worst["gate_prob"] <= tol and worst["token_logits_rel"] <= tol and worst["sink_logits_rel"] <= tol
        report["precisions"][precision] = {"tolerance": tol, "max_abs_diff": worst, "passed": passed, "rows": rows}
    return report


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    """(branch, precision) -> path of the graph."""
    report: dict | None = None
    seconds: float = 0.0


def export_onnx(model: nn.Module, out_dir: str | os.PathLike, *, precisions: tuple[str, ...] = ("fp32", "fp16"),
                opset: int = DEFAULT_OPSET, processor=None, parity: bool = True) -> ExportResult:
    """Export both branches of ``model`` (branches attached) into ``out_dir`` for each precision.

    With ``parity`` the graphs are run with onnxruntime against the torch branches (random inputs, plus a
    real two-image batch when ``processor`` is given) and ``parity_report.json`` is written.
    """
    from qzoom_swift.fileio import write_json_atomic

    for precision in precisions:
        if precision not in PRECISIONS:
            raise OnnxExportError(f"unknown precision {precision!r}; choose from {tuple(PRECISIONS)}")
    check_opset(opset)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out)
    for precision in precisions:
        for branch in BRANCHES:
            result.files[(branch, precision)] = export_branch(model, branch, out / onnx_filename(branch, precision),
                                                              precision, opset)
    require_branches(model).qzoom_config.save(out)
    if parity:
        report = parity_report(model, result.files, processor)
        report["files"] = {f"{b}/{p}": path.name for (b, p), path in result.files.items()}
        report["metadata"] = read_metadata(result.files[("gate", precisions[0])])
        write_json_atomic(out / REPORT_NAME, report)
        result.report = report
    result.seconds = time.perf_counter() - t0
    return result


def export_checkpoint(checkpoint: str | os.PathLike, base_model: str | os.PathLike, out_dir: str | os.PathLike,
                      load: Any = None, **kwargs) -> ExportResult:
    """Load ``base_model`` with the branch checkpoint ``checkpoint`` and export (``export_onnx``).

    ``load`` (``loading.LoadSettings``) defaults to the CPU in float32: the graphs are cast from these weights.
    """
    from qzoom_swift.checkpoint import load_branch_checkpoint
    from qzoom_swift.loading import LoadSettings, load_model

    model, processor = load_model(str(base_model), load or LoadSettings("cpu", "float32"),
                                  processor=kwargs.get("processor") is None)
    load_branch_checkpoint(model, checkpoint)
    processor = kwargs.pop("processor", None) or processor
    return export_onnx(model, out_dir, processor=processor, **kwargs)

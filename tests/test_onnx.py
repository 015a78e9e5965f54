"""ONNX export of the gate and the RPN, and the onnxruntime router, on the tiny models of all three families.

Each family's branches (R=2, saved as a branch checkpoint) are exported once: Qwen2.5-VL and Qwen3-VL
through the library (fp32), LLaVA through `qzoom export-onnx` (fp32 + fp16). Then: metadata and dynamic
axes, parity with the torch branches (batch sizes and sequence lengths never traced, a left-padded batch,
real prompts), identical decisions/boxes/tokens in ``zoom_generate``, the mismatch errors, and `swift infer`
with ``QZOOM_ROUTER=onnx`` answering like the torch router.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from qzoom_swift.branches import attach_branches, detach_branches
from qzoom_swift.checkpoint import load_branch_checkpoint, save_branch_checkpoint
from qzoom_swift.config import QZoomConfig
from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES
from qzoom_swift.inputs import chat_inputs
from qzoom_swift.onnx.export import (
    EXPORT_BATCH,
    EXPORT_SEQ,
    OnnxExportError,
    export_onnx,
    onnx_filename,
    read_metadata,
    router_inputs,
    torch_reference,
)
from qzoom_swift.onnx.router import OnnxRouter, OnnxRouterError, router_from_env
from qzoom_swift.prefill import gate_logits, prefill, prefill_to_branch, rpn_token_logits
from qzoom_swift.synthetic.images import rectangles_image
from qzoom_swift.zoom import zoom_generate

DEPTH = 2  # R: gate = 2 layers + Linear, RPN = 1 layer + q/k head (keeps the exports short)
TOL = 1e-4


class Exported:
    def __init__(self, family, model, processor, ckpt: Path, out: Path, report: dict):
        self.family, self.model, self.processor, self.ckpt, self.out, self.report = (family, model, processor, ckpt,
                                                                                     out, report)
        self._routers = {}
        self.cli_output = ""

    def router(self, precision: str = "fp32") -> OnnxRouter:
        if precision not in self._routers:
            self._routers[precision] = OnnxRouter(self.out, provider="cpu", precision=precision)
        return self._routers[precision]

    def reset(self):
        """Put this family's checkpoint branches back (a test may have attached others)."""
        load_branch_checkpoint(self.model, self.ckpt)
        return self.model


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    """Per family: the tiny model with R=2 branches saved as a checkpoint, exported by `qzoom export-onnx`.

    The three exports run as concurrent CLI processes (the dynamo exporter is single-threaded Python);
    LLaVA's also writes the fp16 graphs.
    """
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText, AutoProcessor

    work = tmp_path_factory.mktemp("onnx")
    loaded, procs = {}, {}
    for family in FAMILIES:
        path = tiny_dir(family)
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        torch.manual_seed(0)
        attach_branches(model, QZoomConfig(branch_depth=DEPTH))
        ckpt = save_branch_checkpoint(model, work / family / "ckpt")
        loaded[family] = (model, AutoProcessor.from_pretrained(path), ckpt)
        cmd = [sys.executable, "-m", "qzoom_swift.cli", "export-onnx", "--checkpoint", str(ckpt), "--model", str(path), "--out",
               str(work / family / "onnx"), *([] if family == "llava" else ["--precision", "fp32"])]
        log = open(work / f"{family}.log", "wb")  # noqa: SIM115 - closed below
        procs[family] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}), log)
    out: dict[str, Exported] = {}
    for family, (proc, log) in procs.items():
        rc = proc.wait(timeout=900)
        log.close()
        assert rc == 0, (work / f"{family}.log").read_text(errors="replace")[-3000:]
        model, processor, ckpt = loaded[family]
        onnx_dir = work / family / "onnx"
        report = json.loads((onnx_dir / "parity_report.json").read_text())
        out[family] = Exported(family, model, processor, ckpt, onnx_dir, report)
        out[family].cli_output = (work / f"{family}.log").read_text(errors="replace")
    return out.__getitem__


# ------------------------------------------------------------------------------------------ export artefacts


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_checked_graphs_with_metadata_and_dynamic_axes(exported, family):
    import onnx

    import qzoom_swift

    ex = exported(family)
    precisions = ("fp32", "fp16") if family == "llava" else ("fp32",)
    for precision in precisions:
        for branch, outputs in (("gate", ["gate_logit", "gate_prob"]), ("rpn", ["token_logits", "sink_logits"])):
            path = ex.out / onnx_filename(branch, precision)
            onnx.checker.check_model(str(path), full_check=True)
            meta = read_metadata(path)
            assert meta["branch"] == branch and meta["family"] == family and meta["precision"] == precision
            assert meta["branch_layer"] == str(ex.model.qzoom_branch.first_layer) and meta["branch_depth"] == "2"
            assert meta["hidden_size"] == "128" and meta["num_hidden_layers"] == "8"
            assert meta["opset"] == meta["_opset"] == "18" and meta["qzoom_version"] == qzoom_swift.__version__
            assert float(meta["tau_gate"]) == 0.1 and float(meta["tau_roi"]) == 0.1
            assert json.loads(meta["config"])["branch_depth"] == 2
            graph = onnx.load(str(path)).graph
            assert [i.name for i in graph.input] == ["hidden_states", "attention_mask", "cos", "sin", "query_index"]
            assert [o.name for o in graph.output] == outputs
            dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
            batch, seq = dims["hidden_states"][:2]
            assert isinstance(batch, str) and isinstance(seq, str) and dims["hidden_states"][2] == 128
            assert dims["attention_mask"] == [batch, seq] and dims["query_index"] == [batch]
            assert dims["cos"][:2] == [batch, seq]
    assert json.loads((ex.out / "qzoom_config.json").read_text())["branch_depth"] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_report_passes(exported, family):
    report = exported(family).report
    assert "parity vs torch" in exported(family).cli_output and "wrote" in exported(family).cli_output
    fp32 = report["precisions"]["fp32"]
    assert fp32["passed"]
    kinds = [r["kind"] for r in fp32["rows"]]
    assert kinds.count("real") == 1 and kinds.count("random") >= 4
    assert {r["seq"] for r in fp32["rows"]} - {EXPORT_SEQ}, "no sequence length unseen at export"
    assert all(r[k] <= TOL for r in fp32["rows"] for k in ("gate_prob", "gate_logit", "token_logits", "sink_logits"))
    assert next(r for r in fp32["rows"] if r["kind"] == "real")["heatmap"] <= TOL
    if family == "llava":  # fp16: a looser tolerance, reported
        fp16 = report["precisions"]["fp16"]
        assert fp16["passed"] and 0 < fp16["max_abs_diff"]["gate_prob"] <= 2e-2
        assert fp16["max_abs_diff"]["token_logits_rel"] <= 2e-2


# ------------------------------------------------------------------------------------------------- parity


CASES = [(1, 5, None), (3, 19, None), (2, 61, [0, 13]), (4, 150, [0, 40, 3, 99])]
"""(batch, length, left padding): none equals the export shape (2, 37)."""


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}s{c[1]}")
def test_onnx_matches_torch_on_unseen_shapes(exported, family, case):
    ex = exported(family)
    model = ex.reset()
    batch, seq, pad = case
    assert (batch, seq) != (EXPORT_BATCH, EXPORT_SEQ)
    inputs = router_inputs(model, batch, seq, left_pad=pad, seed=seq)
    ref = torch_reference(model, inputs)
    logit, prob = ex.router().run("gate", *(inputs[k] for k in ("hidden_states", "attention_mask", "cos", "sin",
                                                                 "query_index")))
    tokens, sink = ex.router().run("rpn", *(inputs[k] for k in ("hidden_states", "attention_mask", "cos", "sin",
                                                                 "query_index")))
    assert logit.shape == (batch,) and tokens.shape == (batch, seq) and sink.shape == (batch, seq)
    assert (prob - ref["gate_prob"]).abs().max() <= TOL
    assert (logit - ref["gate_logit"]).abs().max() <= TOL
    valid = inputs["attention_mask"].bool()
    assert (tokens - ref["token_logits"])[valid].abs().max() <= TOL
    assert (sink - ref["sink_logits"])[valid].abs().max() <= TOL  # first real token found under left padding


@pytest.mark.parametrize("family", FAMILIES)
def test_router_on_a_real_left_padded_batch(exported, family):
    """Gate probabilities and heatmaps (RPN logits at the visual tokens) of a real two-image prefill."""
    ex = exported(family)
    model = ex.reset()
    batch = chat_inputs(ex.processor, [[rectangles_image(seed=1)], [rectangles_image((480, 640), seed=2)]],
                        ["Which colour is the box on the left?", "Colour?"])
    assert bool((batch["attention_mask"][:, 0] == 0).any()), "expected a left-padded batch"
    state = prefill_to_branch(model, **batch, use_cache=False)
    with torch.no_grad():
        torch_gate = torch.sigmoid(gate_logits(model, state))
        rpn_token_logits(model, state)
        torch_maps = state.heatmaps()
    onnx_gate = torch.sigmoid(ex.router().gate_logits(model, state))
    ex.router().rpn_token_logits(model, state)
    onnx_maps = state.heatmaps()
    assert (onnx_gate - torch_gate).abs().max() <= TOL
    assert len(onnx_maps) == len(torch_maps) == 2
    for a, b in zip(onnx_maps, torch_maps):
        assert a.shape == b.shape and (a - b).abs().max() <= TOL


def test_fp16_router_is_close(exported):
    ex = exported("llava")
    model = ex.reset()
    inputs = router_inputs(model, 2, 45, left_pad=[0, 6], seed=3)
    ref = torch_reference(model, inputs)
    router = ex.router("fp16")
    assert router.input_dtype == torch.float16
    _, prob = router.run("gate", *(inputs[k] for k in ("hidden_states", "attention_mask", "cos", "sin",
                                                        "query_index")))
    assert prob.dtype == torch.float32 and (prob - ref["gate_prob"]).abs().max() <= 2e-2


# ------------------------------------------------------------------------------------------- in zoom_generate


@pytest.mark.parametrize("family", FAMILIES)
def test_zoom_generate_decisions_and_boxes_equal_the_torch_router(exported, family):
    ex = exported(family)
    model = ex.reset()
    imgs = [rectangles_image(seed=4), rectangles_image((480, 640), seed=5)]
    questions = ["What colour is the box on the left?", "Colour?"]
    batch = chat_inputs(ex.processor, [[imgs[0]], [imgs[1]]], questions)
    with torch.no_grad():
        state = prefill(model, **batch)
    probs = torch.sigmoid(state.gate_logit).tolist()
    assert abs(probs[0] - probs[1]) > 2e-4  # far above the ONNX/torch difference
    heat = torch.sigmoid(torch.cat([h.flatten() for h in state.heatmaps()]))
    cfg = QZoomConfig(mode="zoom", tau_gate=sum(probs) / 2, tau_roi=float(heat.median()), roi_min_tokens=16,
                      roi_max_tokens=64, branch_depth=DEPTH).resolved_for(family, 8, 128)
    kwargs = dict(max_new_tokens=2, do_sample=False)
    by_torch = zoom_generate(model, ex.processor, batch, [[imgs[0]], [imgs[1]]], cfg, **kwargs)
    by_onnx = zoom_generate(model, ex.processor, batch, [[imgs[0]], [imgs[1]]], cfg, router=ex.router(), **kwargs)
    assert sorted(s.zoomed for s in by_torch.stats) == [False, True]  # one sample zooms, one does not
    for t, o in zip(by_torch.stats, by_onnx.stats):
        assert (o.zoomed, o.reason, o.grid_box, o.box, o.visual_tokens_roi) == (t.zoomed, t.reason, t.grid_box, t.box,
                                                                                 t.visual_tokens_roi)
        assert abs(o.gate_prob - t.gate_prob) <= TOL
    assert [g.tolist() for g in by_onnx.generated] == [g.tolist() for g in by_torch.generated]
    forced = dataclasses.replace(cfg, mode="always")  # every sample through the RPN and a box
    a = zoom_generate(model, ex.processor, batch, [[imgs[0]], [imgs[1]]], forced, **kwargs)
    b = zoom_generate(model, ex.processor, batch, [[imgs[0]], [imgs[1]]], forced, router=ex.router(), **kwargs)
    assert [s.grid_box for s in a.stats] == [s.grid_box for s in b.stats]
    assert any(s.zoomed for s in a.stats)
    assert [g.tolist() for g in a.generated] == [g.tolist() for g in b.generated]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_sink_masks_and_boxes_equal_the_torch_router(exported, family, monkeypatch):
    """The released sink masks from the ONNX router's outputs equal the torch router's, and so do the boxes.

    Qwen2.5-VL's corner rule needs only the grid (> 256 cells here); Qwen3-VL's reads the graph's sink_logits.
    Its cut-off is lowered into the middle of the first-token probabilities so that the random tiny model has sinks.
    """
    from qzoom_swift.families.qwen import Qwen3VLAdapter
    from qzoom_swift.zoom import ZoomStats, _plan_zoom, sink_keep_mask

    ex = exported(family)
    model = ex.reset()
    imgs = [rectangles_image(seed=6), rectangles_image((480, 640), seed=7)]
    batch = chat_inputs(ex.processor, [[imgs[0]], [imgs[1]]], ["What colour is the box on the left?", "Colour?"])
    with torch.no_grad():
        state = prefill(model, **batch)
    assert all(r * c > 256 for r, c in state.embedded.grids)
    if family == "qwen3_vl":
        probs = torch.sigmoid(torch.cat([m.flatten() for m in state.sink_maps()])).sort().values
        middle = probs[len(probs) // 4: 3 * len(probs) // 4]
        gap = int((middle[1:] - middle[:-1]).argmax())  # a cut-off far from every value: no flip by rounding
        assert float(middle[gap + 1] - middle[gap]) > 10 * TOL
        monkeypatch.setattr(Qwen3VLAdapter, "sink_prob", float(middle[gap] + middle[gap + 1]) / 2)
    heat = torch.sigmoid(torch.cat([h.flatten() for h in state.heatmaps()]))
    cfg = QZoomConfig(mode="always", tau_roi=float(heat.quantile(0.8)), roi_min_tokens=16, roi_max_tokens=64,
                      branch_depth=DEPTH).resolved_for(family, 8, 128)
    by = {}
    for name, router in (("torch", None), ("onnx", ex.router())):
        if router is not None:
            router.rpn_token_logits(model, state)
        keeps = [sink_keep_mask(cfg, state, i) for i in range(2)]
        stats = [ZoomStats(), ZoomStats()]
        boxes = [_plan_zoom(ex.processor, cfg, state, b, imgs[b], stats[b]) for b in range(2)]
        by[name] = (keeps, [None if p is None else p.grid_box for p in boxes], [s.sink_cells for s in stats],
                    [m.clone() for m in state.sink_maps()])
    (tk, tb, tc, tm), (ok, ob, oc, om) = by["torch"], by["onnx"]
    assert all((a - b).abs().max() <= TOL for a, b in zip(tm, om))  # the graph's first-token scores
    assert all(torch.equal(a, b) for a, b in zip(tk, ok)) and tc == oc and all(c > 0 for c in tc)
    assert tb == ob and any(box is not None for box in tb)


# ------------------------------------------------------------------------------------------------- errors


def test_graphs_from_another_model_are_refused(exported):
    llava, qwen = exported("llava"), exported("qwen2_5_vl")
    router = llava.router()
    model = qwen.reset()
    state = prefill_to_branch(model, **chat_inputs(qwen.processor, [rectangles_image()], "Colour?"), use_cache=False)
    with pytest.raises(OnnxRouterError) as err:
        router.gate_logits(model, state)
    msg = str(err.value)
    assert "family llava" in msg and "family qwen2_5_vl" in msg and "family" in msg.split("mismatch in")[1]
    with pytest.raises(OnnxRouterError, match="family llava.*family qwen2_5_vl"):
        OnnxRouter(llava.out, provider="cpu", model=model)
    # same family, other branch layer / depth: B and R are named
    other = llava.model
    detach_branches(other)
    attach_branches(other, QZoomConfig(branch_layer=2, branch_depth=3))
    try:
        with pytest.raises(OnnxRouterError) as err:
            router.check_model(other)
        assert "branch_layer" in str(err.value) and "branch_depth" in str(err.value)
        assert "B=2, R=3" in str(err.value) and f"R={DEPTH}" in str(err.value)
    finally:
        llava.reset()
    # hidden size of the input itself
    with pytest.raises(OnnxRouterError, match="width 128"):
        router.run("gate", torch.zeros(1, 4, 64), None, torch.zeros(1, 4, 32), torch.zeros(1, 4, 32),
                   torch.tensor([3]))


def test_mixed_graph_dirs_are_refused(exported, tmp_path):
    import shutil

    llava, qwen = exported("llava"), exported("qwen3_vl")
    shutil.copy(llava.out / "gate.onnx", tmp_path / "gate.onnx")
    shutil.copy(qwen.out / "rpn.onnx", tmp_path / "rpn.onnx")
    with pytest.raises(OnnxRouterError, match="different models"):
        OnnxRouter(tmp_path, provider="cpu")
    with pytest.raises(OnnxRouterError, match="no exported fp16 graph"):
        OnnxRouter(qwen.out, provider="cpu", precision="fp16")


def test_missing_provider_is_a_clear_error(exported, monkeypatch):
    import onnxruntime as ort

    out = exported("llava").out
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(OnnxRouterError, match="CUDAExecutionProvider was requested.*only has CPUExecutionProvider"):
        OnnxRouter(out, provider="cuda")
    with pytest.raises(OnnxRouterError, match="unknown onnxruntime provider"):
        OnnxRouter(out, provider="tpu")
    router = OnnxRouter(out, provider="auto")  # auto falls back to the CPU, explicitly
    assert router.provider == "CPUExecutionProvider"
    assert all(s.get_providers() == ["CPUExecutionProvider"] for s in router.sessions.values())


def test_cuda_provider_is_used_or_refused(exported, monkeypatch):
    """Explicit cuda: used where a GPU and CUDA libraries exist, else a clear error; auto then takes the CPU."""
    out = exported("llava").out
    if torch.cuda.is_available():
        router = OnnxRouter(out, provider="cuda")
        assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in router.sessions.values())
        inputs = router_inputs(exported("llava").reset(), 2, 21, left_pad=[0, 5])
        ref = torch_reference(exported("llava").model, inputs)
        args = [inputs[k].cuda() for k in ("hidden_states", "attention_mask", "cos", "sin", "query_index")]
        _, prob = router.run("gate", *args)
        assert prob.is_cuda and (prob.cpu() - ref["gate_prob"]).abs().max() <= TOL
    else:
        with pytest.raises(OnnxRouterError, match="CUDAExecutionProvider was requested"):
            OnnxRouter(out, provider="cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto tries CUDA, falls back, says so
        assert OnnxRouter(out, provider="auto").provider == "CPUExecutionProvider"


def test_unsupported_opset_is_a_clear_error(exported, tmp_path):
    import onnx

    from qzoom_swift.onnx.export import ort_max_opset

    src = exported("llava").out
    top = ort_max_opset()
    assert top >= 18
    for branch in ("gate", "rpn"):
        model = onnx.load(str(src / f"{branch}.onnx"))
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = top + 2
        onnx.save(model, str(tmp_path / f"{branch}.onnx"))
    with pytest.raises(OnnxRouterError, match=f"opset {top + 2}, which is not supported.*up to {top}"):
        OnnxRouter(tmp_path, provider="cpu")
    with pytest.raises(OnnxExportError, match="opset 17 is not supported"):
        export_onnx(exported("llava").reset(), tmp_path / "x", opset=17)


def test_router_from_env(exported):
    out = exported("llava").out
    assert router_from_env({}) is None and router_from_env({"QZOOM_ROUTER": "torch"}) is None
    with pytest.raises(OnnxRouterError, match="needs QZOOM_ONNX_DIR"):
        router_from_env({"QZOOM_ROUTER": "onnx"})
    with pytest.raises(OnnxRouterError, match="choose from torch, onnx"):
        router_from_env({"QZOOM_ROUTER": "tensorrt"})
    lines = []
    env = {"QZOOM_ROUTER": "onnx", "QZOOM_ONNX_DIR": str(out), "QZOOM_ONNX_PROVIDER": "cpu"}
    first = router_from_env(env, log=lines.append)
    assert isinstance(first, OnnxRouter) and router_from_env(env, log=lines.append) is first  # cached
    assert lines == [f"qzoom router: onnx (fp32) from {out.resolve()} on CPUExecutionProvider"]
    fp16 = router_from_env({**env, "QZOOM_ONNX_PRECISION": "fp16"})
    assert fp16 is not first and fp16.precision == "fp16"


# -------------------------------------------------------------------------------------------- swift infer


@pytest.mark.slow
def test_swift_infer_with_the_onnx_router_answers_like_torch(exported, tiny_dir, shape_dataset, tmp_path):
    from qzoom_swift.bench.sft import run_swift_concurrently
    from qzoom_swift.swift_plugin import MODEL_TYPES, plugin_path

    family = "qwen2_5_vl"
    ex = exported(family)
    knobs = {"QZOOM_MODE": "zoom", "QZOOM_TAU_GATE": 0.0, "QZOOM_ROI_MIN_TOKENS": 16, "QZOOM_ROI_MAX_TOKENS": 64}
    commands = {}
    for name, extra in (("torch", {}), ("onnx", {"QZOOM_ROUTER": "onnx", "QZOOM_ONNX_DIR": str(ex.out),
                                                 "QZOOM_ONNX_PROVIDER": "cpu"})):
        commands[name] = [
            "infer", "--external_plugins", plugin_path(), "--model", str(tiny_dir(family)), "--model_type",
            MODEL_TYPES[family], "--adapters", str(ex.ckpt), "--tuner_type", "qzoom", "--torch_dtype", "float32",
            "--val_dataset", str(shape_dataset), "--max_new_tokens", "4", "--max_batch_size", "2", "--temperature",
            "0", "--result_path", str(tmp_path / f"{name}.jsonl"), "--model_kwargs", json.dumps({**knobs, **extra}),
        ]
    runs = run_swift_concurrently(commands, tmp_path)
    for run in runs.values():
        assert run.returncode == 0, run.tail()
    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines() if line.strip()]
            for name in runs}
    assert len(rows["torch"]) == len(shape_dataset.read_text().splitlines()) == len(rows["onnx"])
    assert [r["response"] for r in rows["onnx"]] == [r["response"] for r in rows["torch"]]
    logs = {name: run.log.read_text(errors="replace") for name, run in runs.items()}
    assert "qzoom router: onnx (fp32)" in logs["onnx"] and "on CPUExecutionProvider" in logs["onnx"]
    assert "qzoom router: onnx" not in logs["torch"]
    decisions = {name: [line.split("qzoom: ", 1)[1] for line in log.splitlines() if "qzoom: " in line]
                 for name, log in logs.items()}
    assert decisions["onnx"] == decisions["torch"] and decisions["torch"]  # same p (3 decimals), reasons, tokens
    assert any(d.startswith("zoom(gate)") for line in decisions["torch"] for d in line.split("; "))

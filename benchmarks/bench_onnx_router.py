#!/usr/bin/env python
"""What does the ONNX router cost against the torch branches? Head and decision latency on CPU.

For each model family this loads a locally built model (``bench`` size by default: width 512, 12 decoder
layers), attaches seeded gate/RPN branches (default ``QZoomConfig``: R=3), exports them with
``qzoom_swift.onnx.export_onnx`` (fp32, the dynamo exporter) and times, on the layer-B state of one real
image question (synthetic image through the processor's chat template):

- ``gate``: the gate head alone (R layers + Linear on the query token);
- ``rpn``: the RPN head alone (R-1 layers + q/k head, token logits over the whole prompt);
- ``decision``: end-to-end routing decision = pass 1 (vision + layers [0, B) with the KV cache) + gate + RPN +
  heatmap -> box (what ``zoom_generate`` does before it continues).

Each is timed with three routers: the torch branches (``TorchRouter``, what ``zoom_generate`` uses by default),
the export wrappers run eagerly in torch (``torch-graph``: ``GateGraph``/``RPNGraph``, the exact computation of the
graphs, e.g. only the query row after the last full layer) and onnxruntime (``OnnxRouter``, CPU provider,
``session.intra_op.allow_spinning=0``). Torch is timed twice: first alone, before any onnxruntime session exists
(``torch alone``), then interleaved round by round with onnxruntime, so the ratios come from the same rounds; the
two torch columns show whether the live sessions disturbed torch. onnxruntime's timings include the router's
torch <-> numpy conversion. onnx/torch compares runtimes *and* the graph's shortcut; onnx/graph the runtimes alone.

Run ``python benchmarks/bench_onnx_router.py --help``. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import _bench_env  # noqa: F401  (environment before torch)

from qzoom_swift.families.registry import FAMILY_NAMES as FAMILIES

# torch's OpenMP threads sleep when idle, as onnxruntime's do with allow_spinning=0 (fair on a shared machine)

QUESTION = "What is written on the small sign in the lower right corner?"
PARTS = ("gate", "rpn", "decision")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python benchmarks/bench_onnx_router.py --family all --repeats 20")
    p.add_argument("--family", default="all", choices=(*FAMILIES, "all"), help="model family (default: all)")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"),
                   help="locally built model size (default: bench = width 512, 12 layers)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    p.add_argument("--image-size", default="448x448", help="synthetic image WIDTHxHEIGHT (default: 448x448)")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default: 2)")
    p.add_argument("--branch-depth", type=int, default=3, help="R (default: 3)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="ONNX graphs to time (default fp32)")
    p.add_argument("--onnx-dir", default=None, help="where to export (default: a temporary dir)")
    p.add_argument("--out", default=None, help="optional JSON results path")
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        p.error(f"--image-size {args.image_size!r}: expected WIDTHxHEIGHT, e.g. 448x448")
    args.image_wh = (w, h)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def synthetic_image(size: tuple[int, int]):
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (230, 230, 230))
    draw = ImageDraw.Draw(img)
    draw.ellipse((w // 10, h // 8, w // 2, h // 2), fill=(220, 40, 40))
    draw.rectangle((w // 2, h // 5, 9 * w // 10, h // 2), fill=(40, 160, 60))
    draw.rectangle((3 * w // 4, 3 * h // 4, 3 * w // 4 + w // 8, 3 * h // 4 + h // 12), fill=(255, 255, 255),
                   outline=(0, 0, 0))
    draw.text((3 * w // 4 + 3, 3 * h // 4 + 2), "Q7", fill=(0, 0, 0))
    return img


def median_iqr(values: list[float]) -> dict:
    import numpy as np

    q25, q50, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median_s": float(q50), "q25_s": float(q25), "q75_s": float(q75), "min_s": float(min(values)),
            "n": len(values)}


def bench_family(family: str, args: argparse.Namespace, work: Path) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qzoom_swift.branches import attach_branches
    from qzoom_swift.config import QZoomConfig
    from qzoom_swift.inputs import chat_inputs
    from qzoom_swift.onnx.export import branch_graph, export_onnx
    from qzoom_swift.prefill import prefill_to_branch
    from qzoom_swift.roi import roi_box_from_heatmap
    from qzoom_swift.synthetic.models import build_model_dir
    from qzoom_swift.zoom import TorchRouter

    model_dir = build_model_dir(family, args.size)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    cfg = attach_branches(model, QZoomConfig(branch_depth=args.branch_depth)).qzoom_config
    inputs = dict(chat_inputs(processor, [synthetic_image(args.image_wh)], QUESTION))

    with torch.inference_mode():
        fixed = prefill_to_branch(model, **inputs, use_cache=False)  # layer-B state the head timings read
    seq_len = int(inputs["input_ids"].shape[1])
    n_visual = int(fixed.embedded.visual_mask.sum())

    class GraphRouter:  # the export wrappers, eagerly in torch
        def __init__(self):
            self.gate, self.rpn = branch_graph(model, "gate"), branch_graph(model, "rpn")

        def _args(self, state):
            cos, sin = state.extras["rope"]
            return state.hidden, state.attention_mask, cos, sin, state.query_index

        def gate_logits(self, model, state):
            state.gate_logit = self.gate(*self._args(state))[0]
            return state.gate_logit

        def rpn_token_logits(self, model, state):
            state.rpn_token_logits = self.rpn(*self._args(state))
            return state.rpn_token_logits

    def runs_for(router) -> dict:
        def head(name):
            fn = router.gate_logits if name == "gate" else router.rpn_token_logits

            def go() -> float:
                t = time.perf_counter()
                fn(model, fixed)
                return time.perf_counter() - t
            return go

        def decision() -> float:
            t = time.perf_counter()
            state = prefill_to_branch(model, **inputs, use_cache=True)
            router.gate_logits(model, state)
            router.rpn_token_logits(model, state)
            roi_box_from_heatmap(state.heatmaps()[-1].float(), cfg.tau_roi, cfg.blur_kernel, cfg.blur_sigma)
            return time.perf_counter() - t

        return {"gate": head("gate"), "rpn": head("rpn"), "decision": decision}

    def timed(routers: dict, rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
        samples = {name: {part: [] for part in PARTS} for name in routers}
        fns = {name: runs_for(r) for name, r in routers.items()}
        for rnd in range(warmup + rounds):
            for part in PARTS:
                for name in routers:  # same round, same part: torch then onnx
                    with torch.inference_mode():
                        value = fns[name][part]()
                    if rnd >= warmup:
                        samples[name][part].append(value)
        return samples

    # 1) torch alone, before any onnxruntime session exists
    alone = timed({"torch": TorchRouter(), "graph": GraphRouter()}, args.repeats, args.warmup)

    # 2) export (timed), then interleaved torch / onnxruntime with spinning off
    t0 = time.perf_counter()
    onnx_dir = work / family
    export = export_onnx(model, onnx_dir, precisions=(args.precision,), processor=processor, parity=True)
    export_s = time.perf_counter() - t0
    from qzoom_swift.onnx.router import OnnxRouter

    router = OnnxRouter(onnx_dir, provider="cpu", precision=args.precision, model=model,
                        intra_op_threads=args.threads)
    both = timed({"torch": TorchRouter(), "graph": GraphRouter(), "onnx": router}, args.repeats, args.warmup)
    parity = export.report["precisions"][args.precision]["max_abs_diff"]

    stats = {}
    for part in PARTS:
        row = {"torch_alone": median_iqr(alone["torch"][part]), "graph_alone": median_iqr(alone["graph"][part]),
               "torch": median_iqr(both["torch"][part]), "graph": median_iqr(both["graph"][part]),
               "onnx": median_iqr(both["onnx"][part])}
        paired = [o / t for o, t in zip(both["onnx"][part], both["torch"][part])]
        paired_graph = [o / t for o, t in zip(both["onnx"][part], both["graph"][part])]
        row["onnx_over_torch"] = row["onnx"]["median_s"] / row["torch"]["median_s"]
        row["onnx_over_graph"] = row["onnx"]["median_s"] / row["graph"]["median_s"]
        row["onnx_over_torch_alone"] = row["onnx"]["median_s"] / row["torch_alone"]["median_s"]
        row["paired_median_ratio"] = median_iqr(paired)["median_s"]
        row["paired_median_ratio_graph"] = median_iqr(paired_graph)["median_s"]
        stats[part] = row
    return {"family": family, "model_dir": str(model_dir), "B": int(cfg.branch_layer), "R": int(cfg.branch_depth),
            "L": int(cfg.num_hidden_layers), "hidden_size": int(cfg.hidden_size), "seq_len": seq_len,
            "visual_tokens": n_visual, "precision": args.precision, "export_s": export_s,
            "provider": router.provider, "parity_max_abs_diff": parity, "stats": stats,
            "loadavg_after": list(os.getloadavg())}


def fmt_ms(s: float) -> str:
    return f"{1000 * s:9.2f}"


def print_table(results: list[dict]) -> None:
    head = (f"{'family':<11} {'part':<9} {'torch alone':>11} {'graph alone':>11} {'torch':>9} {'graph':>9} "
            f"{'onnx':>9} {'onnx/torch':>10} {'paired':>7} {'onnx/graph':>10} {'paired':>7}")
    print("\n=== medians in ms ('alone': before any ORT session; torch/graph/onnx: interleaved per round, ORT "
          "spinning off; graph = export wrappers eagerly in torch; paired = median of per-round ratios)")
    print(head)
    print("-" * len(head))
    for res in results:
        for part in PARTS:
            st = res["stats"][part]
            print(f"{res['family']:<11} {part:<9} {fmt_ms(st['torch_alone']['median_s']):>11} "
                  f"{fmt_ms(st['graph_alone']['median_s']):>11} {fmt_ms(st['torch']['median_s']):>9} "
                  f"{fmt_ms(st['graph']['median_s']):>9} {fmt_ms(st['onnx']['median_s']):>9} "
                  f"{st['onnx_over_torch']:>10.3f} {st['paired_median_ratio']:>7.3f} "
                  f"{st['onnx_over_graph']:>10.3f} {st['paired_median_ratio_graph']:>7.3f}")
    print()
    for res in results:
        p = res["parity_max_abs_diff"]
        print(f"{res['family']}: B={res['B']} R={res['R']} L={res['L']} d={res['hidden_size']} seq_len={res['seq_len']} "
              f"visual={res['visual_tokens']}; {res['precision']} export {res['export_s']:.1f} s on {res['provider']}; "
              f"parity max|diff| gate_prob {p['gate_prob']:.1e} tokens {p['token_logits']:.1e}; "
              f"load average after {'/'.join(f'{x:.2f}' for x in res['loadavg_after'])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime
    import torch
    import transformers

    from qzoom_swift.fileio import quiet_transformers, write_json_atomic

    quiet_transformers()
    torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None else \
        " ".join(shlex.quote(a) for a in ["bench_onnx_router.py", *argv])
    print(f"command: {command}")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}, onnxruntime {onnxruntime.__version__} "
          f"intra_op_threads={args.threads}, transformers {transformers.__version__}, python "
          f"{platform.python_version()}, cpus={os.cpu_count()}; size={args.size}, image={args.image_size}, "
          f"repeats={args.repeats}, warmup={args.warmup}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"load average at start "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    families = FAMILIES if args.family == "all" else (args.family,)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qzoom_onnx_bench_") as tmp:
        work = Path(args.onnx_dir) if args.onnx_dir else Path(tmp)
        results = []
        for family in families:
            results.append(bench_family(family, args, work))
            print_table(results[-1:])
    print_table(results)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.1f} s")
    if args.out:
        write_json_atomic(args.out, {"command": command, "torch": torch.__version__,
                                     "onnxruntime": onnxruntime.__version__, "wall_s": wall,
                                     "args": {k: v for k, v in vars(args).items() if k != "image_wh"},
                                     "results": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""evalscope integration: the ``qzoom`` model API, plugin benchmarks, ``qzoom eval`` (offline, tiny model)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
import time

import pytest
from PIL import Image

from qzoom_swift import cli
from qzoom_swift.eval.suite import BENCHMARKS, PRESETS, parse_run, resolve_run

E2E_BENCHMARKS = ("docvqa", "chartqa", "vstar_bench", "textvqa")


def _image_bytes(fmt: str, colour=(200, 30, 30), size=(40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ pure units


def test_decode_image_reads_the_bytes_whatever_the_mime_label(tmp_path):
    from qzoom_swift.eval.model_api import decode_image

    png, jpeg = _image_bytes("PNG"), _image_bytes("JPEG", colour=(30, 60, 220), size=(32, 48))
    cases = {
        "png labelled jpeg": ("data:image/jpeg;base64," + base64.b64encode(png).decode(), (40, 24), (200, 30, 30)),
        "jpeg labelled png": ("data:image/png;base64," + base64.b64encode(jpeg).decode(), (32, 48), (30, 60, 220)),
        "bogus label": ("data:application/octet-stream;base64," + base64.b64encode(png).decode(), (40, 24),
                        (200, 30, 30)),
        "bare base64": (base64.b64encode(png).decode(), (40, 24), (200, 30, 30)),
    }
    for what, (uri, size, colour) in cases.items():
        img = decode_image(uri)
        assert img.mode == "RGB" and img.size == size, what
        px = img.getpixel((size[0] // 2, size[1] // 2))
        assert all(abs(a - b) <= 6 for a, b in zip(px, colour)), (what, px)
    b64 = base64.b64encode(png).decode().rstrip("=")  # line-wrapped, padding dropped, wrong label
    wrapped = "data:image/gif;base64," + "\n".join(b64[i:i + 60] for i in range(0, len(b64), 60))
    assert decode_image(wrapped).getpixel((5, 5)) == (200, 30, 30)
    path = tmp_path / "x.img"
    path.write_bytes(jpeg)
    assert decode_image(str(path)).size == (32, 48)
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image("data:image/png;base64," + base64.b64encode(b"not an image at all").decode())
    with pytest.raises(ValueError, match="offline"):
        decode_image("https://example.com/a.png")


def test_split_messages_keeps_image_order_and_joins_text():
    from evalscope.api.messages import ChatMessageSystem, ChatMessageUser, ContentImage, ContentText

    from qzoom_swift.eval.model_api import split_messages

    red = "data:image/jpeg;base64," + base64.b64encode(_image_bytes("PNG", (250, 0, 0), (8, 8))).decode()
    blue = "data:image/png;base64," + base64.b64encode(_image_bytes("JPEG", (0, 0, 250), (16, 8))).decode()
    msgs = [ChatMessageSystem(content="Be brief."),
            ChatMessageUser(content=[ContentText(text="Question?"), ContentImage(image=red), ContentImage(image=blue),
                                     ContentText(text="  ANSWER: x ")])]
    images, text = split_messages(msgs)
    assert [im.size for im in images] == [(8, 8), (16, 8)]
    assert text == "Be brief.\nQuestion?\nANSWER: x"


def test_model_api_serialises_concurrent_calls_and_shares_weights(tiny_dir, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from evalscope.api.messages import ChatMessageUser, ContentImage, ContentText
    from evalscope.api.model import GenerateConfig

    from qzoom_swift.eval.model_api import QZoomAPI
    from qzoom_swift.synthetic.images import make_shape_image, sample_shapes

    model = str(tiny_dir("qwen2_5_vl"))
    knobs = dict(low_max_tokens=32, low_min_tokens=16, roi_max_tokens=32, roi_min_tokens=16, device="cpu",
                 max_new_tokens=1)
    api = QZoomAPI(model, mode="zoom", tau_gate=0.0, **knobs)
    assert QZoomAPI(model, mode="never", **knobs).qz is api.qz  # one set of weights per process
    with pytest.raises(ValueError, match="unknown keys"):
        QZoomAPI(model, tau_gat=0.1, **knobs)
    assert api.effective_config.roi_fallback == "none"
    assert QZoomAPI(model, mode="zoom", roi_fallback="peak", **knobs).effective_config.roi_fallback == "peak"

    def message(i):
        buf = io.BytesIO()
        make_shape_image(sample_shapes(2, (224, 168), seed=i)[i], (224, 168)).save(buf, format="PNG")
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()  # wrong label on purpose
        return [ChatMessageUser(content=[ContentText(text=f"Which colour? {i}"), ContentImage(image=uri)])]

    msgs = [message(i) for i in range(2)]
    run = lambda m: api.generate(m, [], "auto", GenerateConfig())  # noqa: E731
    sequential = [run(m) for m in msgs]
    active, peak, lock = [0], [0], threading.Lock()
    original = api.qz.generate

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(api.qz, "generate", counting)
    with ThreadPoolExecutor(2) as pool:
        parallel = list(pool.map(run, msgs))
    assert peak[0] == 1  # never two generations at once
    for a, b in zip(sequential, parallel):
        assert a.completion == b.completion
        qa, qb = a.metadata["qzoom"], b.metadata["qzoom"]
        assert qa["box"] == qb["box"] and qa["gate_prob"] == pytest.approx(qb["gate_prob"])
        assert qa["zoomed"] and qa["reason"] == "gate" and qa["image_size"] == [224, 168]
        assert b.message.perf_metrics.latency > 0 and b.usage.input_tokens == qa["prompt_tokens"] > 0


def test_run_specs_follow_the_paper_settings():
    q25 = PRESETS["qwen2_5_vl"]
    base = parse_run("baseline:576")
    assert (base.name, base.mode, base.budget, base.uses_checkpoint) == ("baseline@576", "baseline", 576, False)
    assert resolve_run(base, "docvqa", q25) == {"mode": "never", "low_max_tokens": 576, "low_min_tokens": 256,
                                                "roi_max_tokens": 576, "roi_min_tokens": 256}
    zoom = parse_run("zoom:paper")
    assert resolve_run(zoom, "docvqa", q25) == {"mode": "zoom", "low_max_tokens": 576, "low_min_tokens": 256,
                                                "roi_max_tokens": 576, "roi_min_tokens": 256, "tau_roi": 0.125,
                                                "tau_gate": 0.05}
    assert resolve_run(zoom, "ocr_bench", q25)["low_min_tokens"] == 128
    hr = resolve_run(zoom, "hr_bench_8k", q25)
    assert (hr["low_max_tokens"], hr["low_min_tokens"], hr["tau_roi"], hr["tau_gate"]) == (4096, 512, 0.04, 0.02)
    assert resolve_run(parse_run("baseline:paper"), "vstar_bench", q25)["low_max_tokens"] == 4096
    assert resolve_run(parse_run("baseline:paper"), "vstar_bench", q25)["low_min_tokens"] == 256
    q3 = resolve_run(zoom, "vstar_bench", PRESETS["qwen3_vl"])
    assert (q3["tau_roi"], q3["tau_gate"]) == (0.10, 0.025)
    assert resolve_run(parse_run("zoom:256"), "textvqa", q25)["low_min_tokens"] == 128  # max 256 uses min 128
    custom = parse_run("always:1024:tau_roi=0.2:low_min_tokens=300:name=wide:checkpoint=/ck")
    assert (custom.name, custom.checkpoint) == ("wide", "/ck")
    r = resolve_run(custom, "chartqa", {})
    assert (r["mode"], r["low_max_tokens"], r["low_min_tokens"], r["roi_min_tokens"], r["tau_roi"]) == \
        ("always", 1024, 300, 256, 0.2)
    assert "tau_gate" not in r  # no preset: the checkpoint's own threshold
    assert resolve_run(parse_run("zoom:256:roi_fallback=peak"), "chartqa", {})["roi_fallback"] == "peak"
    for bad in ("zoom", "warp:576", "zoom:big", "zoom:576:tau_x=1", "zoom:576:tau_roi", "zoom:576:name=a b",
                "zoom:576:roi_fallback=nearest"):
        with pytest.raises(ValueError):
            parse_run(bad)


def test_summary_numbers_rectified_throughput_and_files(tmp_path):
    from qzoom_swift.eval.report import summarize, to_csv, write_summary

    def bench(score, n, lat, vt, zr):
        return {"score": score, "samples": n, "throughput_sps": n / lat, "visual_tokens_mean": vt, "zoom_rate": zr}

    runs = [
        {"name": "b576", "mode": "baseline", "budget": 576, "benchmarks": {
            "docvqa": bench(0.90, 10, 10.0, 500, 0.0), "vstar_bench": bench(0.50, 4, 8.0, 500, 0.0)}},
        {"name": "qz576", "mode": "zoom", "budget": 576, "benchmarks": {
            "docvqa": bench(0.94, 10, 5.0, 700, 0.5), "vstar_bench": bench(0.75, 4, 16.0, 900, 1.0)}},
    ]
    s = summarize(runs, ["docvqa", "vstar_bench"])
    assert s["reference"] == "b576"
    b, q = s["rows"]
    w_doc, w_v = BENCHMARKS["docvqa"].full_size, BENCHMARKS["vstar_bench"].full_size
    assert b["throughput_sps"] == pytest.approx((w_doc + w_v) / (w_doc / 1.0 + w_v / 0.5))
    assert q["throughput_sps"] == pytest.approx((w_doc + w_v) / (w_doc / 2.0 + w_v / 0.25))
    assert b["rel_throughput"] == pytest.approx(1.0)
    assert q["rel_throughput"] == pytest.approx(q["throughput_sps"] / b["throughput_sps"])
    assert q["avg_accuracy"] == pytest.approx(0.845) and b["avg_accuracy"] == pytest.approx(0.70)
    assert q["mean_visual_tokens"] == pytest.approx(800) and q["zoom_rate"] == pytest.approx(0.75)
    assert q["groups"]["doc"]["rel_throughput"] == pytest.approx(2.0)
    assert q["groups"]["hr"]["rel_throughput"] == pytest.approx(0.5)
    rows = list(csv.DictReader(io.StringIO(to_csv(s))))
    assert [r["run"] for r in rows] == ["b576", "qz576"] and float(rows[1]["docvqa"]) == pytest.approx(0.94)
    paths = write_summary(s, tmp_path)
    assert "| qz576 | zoom | 576 | 94.0 | 75.0 | 84.5 |" in paths["markdown"].read_text()
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 400
    with pytest.raises(ValueError, match="reference"):
        summarize(runs, ["docvqa"], reference="nope")


def test_missing_dataset_is_a_clear_error_before_anything_runs(tmp_path, capsys, tiny_dir):
    from qzoom_swift.testing.eval_data import write_eval_datasets

    write_eval_datasets(tmp_path / "data", ["docvqa"], n=1)
    (tmp_path / "data" / "vstar_bench").mkdir()  # present but empty
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = cli.main(["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "baseline:64",
                   "--benchmarks", "docvqa,chartqa,vstar_bench", "--data-root", str(tmp_path / "data"),
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 10
    assert f"benchmark 'chartqa' (ChartQA): expected its dataset at {tmp_path / 'data' / 'chartqa'}, which does " \
           "not exist" in err
    assert "data/test-*.parquet" in err and "lmms-lab/ChartQA" in err
    assert f"{tmp_path / 'data' / 'vstar_bench'}, which holds no data files" in err
    assert "docvqa" not in err.split("missing local datasets")[1]  # the present one is not reported
    assert not out.exists()
    rc = cli.main(["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "baseline:64", "--benchmarks", "docvqa"])
    assert rc == 2 and "pass --data-root DIR (with DIR/docvqa/)" in capsys.readouterr().err


def test_tiny_datasets_load_through_each_evalscope_adapter(tmp_path):
    """Every benchmark's tiny copy has the files/configs/columns its evalscope adapter reads.

    Loaded as ``qzoom eval`` loads them (a datasets cache keyed by the folder's files), so entries of the same
    names in this machine's global Hugging Face cache cannot stand in for them.
    """
    from evalscope.api.messages import ContentImage, ContentText

    from qzoom_swift.eval.local_data import load_benchmark_samples
    from qzoom_swift.eval.model_api import decode_image
    from qzoom_swift.testing.eval_data import write_eval_datasets

    folders = write_eval_datasets(tmp_path / "data", n=2)
    expected_targets = {"docvqa": '["red"]', "infovqa": '["red"]', "chartqa": "red", "ocr_bench": '["red"]',
                        "textvqa": json.dumps(["red"] * 10), "mm_star": "A", "vstar_bench": "A",
                        "hr_bench_4k": "A", "hr_bench_8k": "A", "mme_realworld_lite": "A"}
    assert set(folders) == set(BENCHMARKS) - {"qzoom_bench"}  # the zoom bench writes its own copy (below)
    for name, folder in folders.items():
        samples = load_benchmark_samples(name, folder, tmp_path / "hf")
        assert len(samples) == 2, name
        first = min(samples, key=lambda s: s.target != expected_targets[name])
        assert first.target == expected_targets[name], name
        parts = first.input[0].content
        images = [p for p in parts if isinstance(p, ContentImage)]
        assert len(images) == 1 and any(isinstance(p, ContentText) and "colour" in p.text for p in parts), name
        size = decode_image(images[0].image).size
        assert size == ((672, 448) if BENCHMARKS[name].group == "hr" else (336, 224)), name
        if name in ("mm_star", "vstar_bench", "hr_bench_4k", "hr_bench_8k"):
            assert first.choices == ["A", "B", "C", "D"], name
    from qzoom_swift.bench.dataset import read_split, write_bench, write_evalscope_split

    write_bench(tmp_path / "bench", {"test": 2}, seed=5)
    bench_root = write_evalscope_split(tmp_path / "bench", "test")
    samples = load_benchmark_samples("qzoom_bench", bench_root / "qzoom_bench", tmp_path / "hf")
    records = read_split(tmp_path / "bench", "test")
    assert [json.loads(s.target) for s in samples] == [[r.answer] for r in records]
    for sample, rec in zip(samples, records):
        parts = sample.input[0].content
        assert isinstance(parts[0], ContentImage) and parts[1].text == rec.question  # the bare question, image first
        assert decode_image(parts[0].image).size == (448, 448)
        assert sample.metadata["kind"] == rec.kind and sample.metadata["box"] == list(rec.box)
    assert [s.target for s in load_benchmark_samples("mme_realworld_lite", folders["mme_realworld_lite"],
                                                     tmp_path / "hf")] == ["A", "B"]


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny_dir):
    """``qzoom eval`` with a baseline and a (forced-gate) zoom run on 4 tiny benchmarks; returns (out, stdout)."""
    import os

    from qzoom_swift.testing.eval_data import write_eval_datasets

    root = tmp_path_factory.mktemp("qzoom_eval")
    write_eval_datasets(root / "data", E2E_BENCHMARKS, n=2, hr_size=(448, 336))
    old = os.environ.get("HF_DATASETS_CACHE")
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf")  # inherited by the run processes
    args = ["eval", "--model", str(tiny_dir("qwen2_5_vl")), "--run", "baseline:64", "--run", "zoom:64:tau_gate=0",
            "--benchmarks", ",".join(E2E_BENCHMARKS), "--data-root", str(root / "data"), "--out", str(root / "out"),
            "--limit", "1", "--max-new-tokens", "2", "--device", "cpu", "--progress-interval", "0.5"]
    buf = io.StringIO()
    import contextlib

    try:
        with contextlib.redirect_stdout(buf):
            rc = cli.main(args)
        logs = {p.parent.name: p.read_text()[-3000:] for p in (root / "out").glob("runs/*/log.txt")}
        assert rc == 0, logs
    finally:
        if old is None:
            os.environ.pop("HF_DATASETS_CACHE", None)
        else:
            os.environ["HF_DATASETS_CACHE"] = old
    return root / "out", buf.getvalue(), args


@pytest.mark.slow
def test_qzoom_eval_prints_worker_progress_and_log_path(e2e):
    out, stdout, _ = e2e
    n = len(E2E_BENCHMARKS)
    for run in ("baseline@64", "zoom@64"):
        log = out / "runs" / run / "log.txt"
        lines = [line for line in stdout.splitlines() if line.startswith(f"[qzoom eval] {run}: ")]
        counts = [re.search(rf": (\w+) \((\d+)/{n}\) (\d+)/(\d+) samples, (\d+) s elapsed, ETA (\d+ s|unknown) "
                            rf"\(log: {re.escape(str(log))}\)$", line) for line in lines]
        counts = [m for m in counts if m]
        assert counts, lines  # progress lines while the worker ran, each naming the worker's log
        for m in counts:
            assert m.group(1) in E2E_BENCHMARKS and 0 <= int(m.group(3)) <= int(m.group(4))
        assert any(int(m.group(3)) >= 1 and m.group(6) != "unknown" for m in counts), lines  # a sample done: an ETA
    progress = json.loads((out / "runs" / "zoom@64" / "progress.json").read_text())
    assert (progress["benchmark"], progress["index"], progress["count"]) == (E2E_BENCHMARKS[-1], n, n)
    assert progress["done"] == progress["total"] >= 1


@pytest.mark.slow
def test_qzoom_eval_summary_table_and_plot(e2e):
    out, stdout, _ = e2e
    assert "[qzoom eval] baseline@64: done" in stdout and "[qzoom eval] zoom@64: done" in stdout
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["run"] for r in rows] == ["baseline@64", "zoom@64"]
    assert [r["mode"] for r in rows] == ["baseline", "zoom"] and [r["budget"] for r in rows] == ["64", "64"]
    assert list(rows[0]) == ["run", "mode", "budget", *E2E_BENCHMARKS, "avg_accuracy", "throughput_sps",
                             "rel_throughput", "mean_visual_tokens", "zoom_rate", "samples", "failed"]
    for r in rows:
        accs = [float(r[b]) for b in E2E_BENCHMARKS]
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert float(r["avg_accuracy"]) == pytest.approx(sum(accs) / len(accs), abs=1e-5)
        assert float(r["throughput_sps"]) > 0 and float(r["rel_throughput"]) > 0
        assert int(r["samples"]) == 5  # limit 1 per subset; chartqa has two subsets
    base, zoom = rows
    assert float(base["rel_throughput"]) == pytest.approx(1.0)
    assert float(base["zoom_rate"]) == 0.0 and float(zoom["zoom_rate"]) == 1.0  # tau_gate=0: the gate always fires
    # Same low budget: the zoom run sees the baseline's low-resolution tokens plus a crop.
    assert float(zoom["mean_visual_tokens"]) > float(base["mean_visual_tokens"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"] == "baseline@64" and summary["benchmarks"] == list(E2E_BENCHMARKS)
    # what the numbers come from: each benchmark's resolved folder and the samples each run read there
    data = out.parent / "data"
    assert {n: d["path"] for n, d in summary["datasets"].items()} == {n: str((data / n).resolve())
                                                                       for n in E2E_BENCHMARKS}
    assert summary["datasets"]["chartqa"]["samples"] == {"baseline@64": 2, "zoom@64": 2}  # two subsets, limit 1
    md = (out / "summary.md").read_text()
    assert "| baseline@64 | baseline | 64 |" in md and "| zoom@64 | zoom | 64 |" in md and "1.00x" in md
    with Image.open(out / "pareto.png") as im:
        im.verify()
    with Image.open(out / "pareto.png") as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300


@pytest.mark.slow
def test_qzoom_eval_predictions_carry_per_sample_metadata(e2e):
    out, _, _ = e2e
    for run, zoomed in (("baseline@64", False), ("zoom@64", True)):
        pred_dir = out / "runs" / run / "evalscope"
        files = sorted(pred_dir.glob("*/predictions/*/*.jsonl"))
        assert {f.name.split("_")[0] for f in files} == {"docvqa", "chartqa", "vstar", "textvqa"}
        n = 0
        for f in files:
            for line in f.read_text().splitlines():
                row = json.loads(line)
                meta = row["model_output"]["metadata"]["qzoom"]
                n += 1
                assert meta["zoomed"] is zoomed
                assert meta["visual_tokens"] == meta["visual_tokens_low"] + meta["visual_tokens_roi"] > 0
                assert meta["low_tokens"] == [32, 64] and meta["latency_s"] > 0
                perf = row["model_output"]["perf_metrics"]
                assert perf["latency"] == pytest.approx(meta["latency_s"]) and perf["input_tokens"] > 0
                assert 0 <= row["model_output"]["usage"]["output_tokens"] <= 2
                if zoomed:
                    assert meta["reason"] == "gate" and 0.0 <= meta["gate_prob"] <= 1.0 and meta["mode"] == "zoom"
                    assert meta["visual_tokens_roi"] > 0 and len(meta["box"]) == 4
                    x0, y0, x1, y1 = meta["box"]
                    assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
                else:
                    assert meta["reason"] == "never" and meta["gate_prob"] is None and meta["box"] is None
                    assert meta["visual_tokens_roi"] == 0 and meta["mode"] == "never"
        assert n == 5
        stored = json.loads((out / "runs" / run / "bench" / "vstar_bench.json").read_text())["result"]
        assert stored["samples"] == 1 and stored["zoom_rate"] == (1.0 if zoomed else 0.0)
        assert (stored["gate_prob_mean"] is None) is (not zoomed)
        assert math.isclose(stored["throughput_sps"], 1 / stored["latency_total_s"])


@pytest.mark.slow
def test_qzoom_eval_restart_reuses_stored_runs(e2e, capsys):
    out, _, args = e2e
    bench_files = sorted((out / "runs").glob("*/bench/*.json"))
    assert len(bench_files) == 8
    mtimes = [p.stat().st_mtime_ns for p in bench_files]
    t0 = time.perf_counter()
    assert cli.main(args) == 0
    stdout = capsys.readouterr().out
    assert time.perf_counter() - t0 < 20  # no run process started
    assert "baseline@64: stored results are current, skipped" in stdout and "zoom@64: stored results" in stdout
    assert [p.stat().st_mtime_ns for p in bench_files] == mtimes
    # --summary-only with another reference: same stored numbers, throughput now relative to the zoom run.
    assert cli.main([*args, "--summary-only", "--reference", "zoom@64"]) == 0
    text = capsys.readouterr().out
    assert "done in" not in text and "skipped" not in text and "| zoom@64 | zoom | 64 |" in text
    rows = {r["run"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert float(rows["zoom@64"]["rel_throughput"]) == pytest.approx(1.0)
    assert float(rows["baseline@64"]["rel_throughput"]) == pytest.approx(
        float(rows["baseline@64"]["throughput_sps"]) / float(rows["zoom@64"]["throughput_sps"]), rel=1e-4)
    assert [p.stat().st_mtime_ns for p in bench_files] == mtimes
    assert cli.main([*args, "--summary-only"]) == 0  # back to the default reference for the other tests
    # Changed settings invalidate the stored results (they would be redone).
    from qzoom_swift.eval.command import _pending, build_run_specs

    parser = cli.build_parser()
    same, _ = build_run_specs(parser.parse_args(args))
    assert [_pending(s) for s in same] == [[], []]
    changed, _ = build_run_specs(parser.parse_args([*args, "--max-new-tokens", "3"]))
    assert [_pending(s) for s in changed] == [list(E2E_BENCHMARKS)] * 2

"""Zoom bench: scene rendering and ground truth, splits on disk, the toy model's training rows, and the metrics."""

from __future__ import annotations

import hashlib
import json
import random
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qzoom_swift.bench.dataset import SPLITS, BenchRecord, questions_path, read_split, write_bench
from qzoom_swift.bench.evaluate import (
    EvalRun,
    box_contains,
    box_iou,
    low_res_cell,
    pseudo_label_quality,
    roc_auc,
    run_metrics,
    summarise,
)
from qzoom_swift.bench.render import (
    BENCH_COLOURS,
    COARSE_QUESTION,
    FINE_QUESTION,
    TARGET_RED,
    BenchSpec,
    aligned_crop_around,
    render_scene,
)
from qzoom_swift.bench.toy_model import GROUND_QUESTION, PATCH_UNIT, roi_cells_around, toy_sft_rows

SIZES = {"train": 6, "val": 4, "test": 4}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    write_bench(root, SIZES, seed=3)
    return root


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_scene_ground_truth_matches_the_pixels():
    spec = BenchSpec()
    for seed in range(20):
        img, scene = render_scene(random.Random(seed), spec)
        a = np.asarray(img).astype(int)
        x0, y0, x1, y1 = scene.target_box
        assert (x1 - x0, y1 - y0) == spec.box_size and 0 <= x0 and x1 <= spec.canvas and y1 <= spec.canvas
        assert spec.box_offset[0] <= x0 % spec.cell <= spec.box_offset[1]  # on the grid, at the fixed phase
        assert spec.box_offset[0] <= y0 % spec.cell <= spec.box_offset[1]
        assert tuple(a[y0, x0 + 5]) == TARGET_RED and tuple(a[y1 - 1, x1 - 6]) == TARGET_RED  # the red outline
        inside = a[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
        assert (inside.sum(axis=2) < 200).sum() >= 8  # dark glyph pixels inside the white box
        assert (inside.sum(axis=2) > 700).sum() >= 100
        sx0, sy0, sx1, sy1 = scene.shape_box
        cx, cy = (sx0 + sx1) // 2, (sy0 + sy1) // 2 + (sy1 - sy0) // 6  # below the centre: inside a triangle too
        assert np.abs(a[cy, cx] - np.array(BENCH_COLOURS[scene.colour])).max() <= 2
        assert x1 + 4 <= sx0 or sx1 + 4 <= x0 or y1 + 4 <= sy0 or sy1 + 4 <= y0  # the box never touches the shape


def test_free_placement_and_distractors_are_options():
    img, scene = render_scene(random.Random(1), BenchSpec(free_placement=True, distractors=3))
    a = np.asarray(img).astype(int)
    grey_outline = ((a == 120).all(axis=2)).sum()
    assert grey_outline >= 3 * 60  # three grey-outlined distractor boxes
    assert len(scene.distractors) == 3 and all(0 <= digit <= 9 for _, digit in scene.distractors)
    for (x0, y0, x1, y1), _ in scene.distractors:  # the recorded boxes are the grey ones drawn
        assert (a[y0, x0:x1] == 120).all() and (a[y0:y1, x0] == 120).all()
    assert render_scene(random.Random(1), BenchSpec(free_placement=True))[1].distractors == ()
    offsets = {render_scene(random.Random(s), BenchSpec(free_placement=True))[1].target_box[0] % 28 for s in range(40)}
    assert len(offsets) > 5


def test_low_resolution_hides_the_digit_and_native_crop_keeps_it():
    """At the 16-token budget (112 px) the 10 px glyph is a smudge; a grid-aligned 112 px crop is the original."""
    img, scene = render_scene(random.Random(7))
    low = img.resize((112, 112), Image.BICUBIC)
    x0, y0, x1, y1 = [v // 4 for v in scene.target_box]
    smudge = np.asarray(low).astype(int)[y0:y1 + 1, x0:x1 + 1].sum(axis=2)
    assert (smudge < 200).sum() <= 2  # no clearly dark glyph stroke survives
    box = aligned_crop_around(scene.target_box, 112, 448, random.Random(0))
    assert all(v % PATCH_UNIT == 0 for v in box) and box_contains(box, scene.target_box)
    crop = np.asarray(img.crop(box))
    assert crop.shape == (112, 112, 3)


def test_write_bench_is_deterministic_complete_and_reused(bench, tmp_path):
    meta = json.loads((bench / "bench.json").read_text())
    assert meta["sizes"] == SIZES and meta["seed"] == 3
    assert meta["questions"]["train"] == {"fine": 6, "coarse": 6}
    assert meta["questions"]["test"] == {"fine": 2, "coarse": 2}
    for split in SPLITS:
        rows = [json.loads(line) for line in questions_path(bench, split).read_text().splitlines()]
        records = read_split(bench, split)
        assert len(rows) == len(records)
        for row, rec in zip(rows, records):
            assert set(row) == {"messages", "images"} and row["images"] == [rec.image]
            assert row["messages"][0]["content"] == f"<image>{rec.question}"
            assert row["messages"][1]["content"] == rec.answer
            assert rec.question == (FINE_QUESTION if rec.kind == "fine" else COARSE_QUESTION)
            assert Path(rec.image).is_file() and Image.open(rec.image).size == (448, 448)
            if rec.kind == "fine":
                assert rec.answer.isdigit() and rec.box == rec.target_box
            else:
                assert rec.answer in BENCH_COLOURS
    other = tmp_path / "again"
    write_bench(other, SIZES, seed=3)
    same = {p.relative_to(other) for p in other.rglob("*.png")}
    assert same == {p.relative_to(bench) for p in bench.rglob("*.png")}
    assert all((bench / p).read_bytes() == (other / p).read_bytes() for p in same)
    before = _digest(other)
    mtime = (other / "bench.json").stat().st_mtime_ns
    write_bench(other, SIZES, seed=3)  # identical settings: reused, not rewritten
    assert (other / "bench.json").stat().st_mtime_ns == mtime and _digest(other) == before
    write_bench(other, SIZES, seed=4)
    assert _digest(other) != before


def test_half_written_bench_is_replaced(tmp_path):
    write_bench(tmp_path, {"test": 2}, seed=0)
    (tmp_path / "bench.json").unlink()  # as if killed before the marker was written
    (tmp_path / "test" / "gt.jsonl").write_text("{broken")
    write_bench(tmp_path, {"test": 2}, seed=0)
    assert len(read_split(tmp_path, "test")) == 2


def test_unknown_split_and_missing_bench_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown bench splits"):
        write_bench(tmp_path, {"dev": 2})
    with pytest.raises(FileNotFoundError, match="write the bench first"):
        read_split(tmp_path, "test")


@pytest.mark.parametrize("cells", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_roi_cells_always_contain_the_target_cell(cells):
    rng = random.Random(0)
    for seed in range(30):
        _, scene = render_scene(random.Random(seed))
        grid_box, norm = roi_cells_around(scene.target_box, cells, 4, 448, rng)
        assert (grid_box[2] - grid_box[0], grid_box[3] - grid_box[1]) == cells
        assert 0 <= grid_box[0] and grid_box[2] <= 4 and 0 <= grid_box[1] and grid_box[3] <= 4
        assert box_contains([v * 448 for v in norm], scene.target_box)


def test_toy_rows_come_in_single_layout_blocks_with_native_budgets(bench, tmp_path):
    records = read_split(bench, "train")
    rows = toy_sft_rows(records, tmp_path / "crops", steps=60, batch=4, seed=1, curriculum=0.25)
    assert len(rows) == 240
    by_image = {r.image: r for r in records if r.kind == "fine"}
    layouts = []
    for b in range(60):
        block = rows[4 * b:4 * b + 4]
        pixels = {r["chat_template_kwargs"]["max_pixels"] for r in block}
        kinds = {"zoom" if "qzoom_roi" in r else "crop" if "/crops/" in r["images"][0] else "image" for r in block}
        assert len(kinds) == 1, b
        layouts.append(kinds.pop())
        for r in block:
            assert r["chat_template_kwargs"]["min_pixels"] == r["chat_template_kwargs"]["max_pixels"]
            side = int(r["chat_template_kwargs"]["max_pixels"] ** 0.5)
            if layouts[-1] == "crop":  # a native crop: its budget is its own size, on the grid
                assert Image.open(r["images"][0]).size == (side, side) and side % PATCH_UNIT == 0
                assert r["messages"][0]["content"].endswith(FINE_QUESTION)
            if layouts[-1] == "zoom":
                assert side == 112 and len(pixels) == 1
                roi = r["qzoom_roi"]
                assert roi["grid"] == [4, 4]
                if r["messages"][0]["content"].endswith(FINE_QUESTION):
                    assert box_contains([v * 448 for v in roi["box"]], by_image[r["images"][0]].target_box)
    curriculum = [r for b in range(15) if layouts[b] == "image" for r in rows[4 * b:4 * b + 4]]
    assert curriculum  # the curriculum: crops, zoom layouts and low-res coarse rows only ...
    assert all(r["messages"][0]["content"].endswith((COARSE_QUESTION, GROUND_QUESTION)) for r in curriculum)
    for r in rows:
        if r["messages"][0]["content"].endswith(GROUND_QUESTION):  # the index of the box's low-res token
            x0, y0, x1, y1 = by_image[r["images"][0]].target_box
            assert r["messages"][1]["content"] == str(((y0 + y1) // 2 // 112) * 4 + (x0 + x1) // 2 // 112)
    assert all(r["chat_template_kwargs"]["max_pixels"] == 112 * 112 for r in curriculum)
    later = [r for b in range(15, 60) if layouts[b] == "image" for r in rows[4 * b:4 * b + 4]]
    assert any(r["chat_template_kwargs"]["max_pixels"] > 112 * 112 for r in later)  # ... then the mixture
    assert {"crop", "zoom"} <= set(layouts)


def test_box_geometry_helpers():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0
    assert box_contains((0, 0, 112, 112), (30, 30, 50, 50)) and not box_contains((0, 0, 40, 40), (30, 30, 50, 50))
    assert low_res_cell((230, 5, 248, 25), 448, 4) == (224.0, 0.0, 336.0, 112.0)


def test_roc_auc_equals_the_pairwise_definition():
    rng = random.Random(0)
    for _ in range(20):
        scores = [round(rng.random(), 1) for _ in range(15)]  # ties included
        labels = [rng.random() < 0.4 for _ in range(15)]
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if not pos or not neg:
            assert roc_auc(scores, labels) is None
            continue
        pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
        assert roc_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


def _rec(i: int, kind: str) -> BenchRecord:
    target = (33 + 112 * (i % 4), 61, 51 + 112 * (i % 4), 81)
    return BenchRecord(f"test-{i}-{kind}", f"/img{i}.png", kind, "q", "7" if kind == "fine" else "blue",
                       target if kind == "fine" else (0, 200, 150, 350), target, 448)


def _row(run: str, rec: BenchRecord, correct: bool, latency: float, zoomed: bool, box=None, prob=None, tokens=16):
    return {"run": run, "id": rec.id, "kind": rec.kind, "correct": correct, "latency_s": latency, "zoomed": zoomed,
            "box": box, "gate_prob": prob, "visual_tokens": tokens, "reason": "gate" if zoomed else "below_gate",
            "time_pass1_s": latency / 2, "time_pass2_s": latency / 4, "time_decode_s": latency / 4}


def test_run_metrics_and_relative_throughput():
    recs = [_rec(i, k) for i in range(4) for k in ("fine", "coarse")]
    rows = []
    for r in recs:
        col = int(r.id.split("-")[1]) % 4
        good_box = [col / 4, 0.0, (col + 1) / 4, 0.25]
        zoom = r.kind == "fine"
        rows.append(_row("qzoom", r, True, 0.01, zoom, good_box if zoom else None, 0.9 if zoom else 0.1,
                         32 if zoom else 16))
        rows.append(_row("big", r, r.kind == "coarse" or col < 2, 0.04, False, tokens=256))
    runs = [EvalRun("big", "never", 256), EvalRun("qzoom", "zoom", 16)]
    s = summarise(rows, recs, runs, "big", 4)
    q, big = s["runs"]["qzoom"], s["runs"]["big"]
    assert q["accuracy"] == 1.0 and big["accuracy"] == pytest.approx(0.75) and big["accuracy_fine"] == 0.5
    assert q["relative_throughput"] == pytest.approx(4.0) and big["relative_throughput"] == 1.0
    assert q["mean_prefill_ms"] == pytest.approx(7.5) and q["relative_prefill_throughput"] == pytest.approx(4.0)
    assert q["zoom_rate_fine"] == 1.0 and q["zoom_rate_coarse"] == 0.0 and q["mean_visual_tokens"] == 24
    assert q["box"]["contains_target"] == 1.0 and q["box"]["median_cell_iou"] == pytest.approx(1.0)
    assert q["box"]["median_iou"] == pytest.approx(18 * 20 / (112 * 112))
    assert q["gate_auc_fine_vs_coarse"] == 1.0
    wrong_box = _row("x", recs[0], False, 0.01, True, [0.75, 0.75, 1.0, 1.0], 0.5)
    no_box = {**_row("x", recs[2], False, 0.01, False, None, 0.5), "reason": "no_roi"}
    miss = run_metrics([wrong_box, no_box], {r.id: r for r in recs}, 4)["box"]
    assert miss["contains_target"] == 0.0 and miss["median_iou"] == 0.0 and miss["fine_asked"] == 2
    good = _row("x", recs[4], True, 0.01, True, [0.5, 0.0, 0.75, 0.25], 0.5)  # its digit is in column 2
    both = run_metrics([good, no_box], {r.id: r for r in recs}, 4)["box"]
    assert both["contains_target"] == 0.5 and both["contains_target_when_boxed"] == 1.0  # a missing box is a miss
    assert run_metrics([_row("x", recs[0], True, 0.01, False)], {recs[0].id: recs[0]}, 4).get("box") is None


def test_pseudo_label_quality_against_gt_boxes():
    rec = BenchRecord("train-0-fine", "/a.png", "fine", FINE_QUESTION, "3", (33, 61, 51, 81), (33, 61, 51, 81), 448)
    labels = [[0] * 16 for _ in range(16)]
    labels[2][1] = 1  # the cell of (33..51, 61..81): rows 56-84, cols 28-56
    labels[10][10] = 1  # a stray foreground cell
    rows = [{"messages": [{"role": "user", "content": f"<image>{FINE_QUESTION}"}], "images": ["/a.png"],
             "qzoom_rpn_labels": labels},
            {"messages": [{"role": "user", "content": f"<image>{FINE_QUESTION}"}], "images": ["/a.png"],
             "qzoom_rpn_labels": None}]
    q = pseudo_label_quality(rows, {("/a.png", FINE_QUESTION): rec})["fine"]
    assert q == {"samples": 2, "ignored_rate": 0.5, "fg_precision": 0.5, "hit_rate": 1.0}


def test_pairs_of_splits_share_no_image_content(bench):
    digests = {s: {hashlib.sha256(Path(r.image).read_bytes()).hexdigest() for r in read_split(bench, s)}
               for s in SPLITS}
    for a, b in combinations(SPLITS, 2):
        assert not digests[a] & digests[b]


def test_warmup_mark_target_is_the_low_res_token_holding_the_box():
    from qzoom_swift.bench.toy_model import _low_res_scene

    for seed in range(30):
        image, cell = _low_res_scene(random.Random(seed), BenchSpec(), 112)
        _, scene = render_scene(random.Random(seed))  # same draws: same scene
        x0, y0, x1, y1 = scene.target_box
        assert image.size == (112, 112)
        assert cell == ((y0 + y1) // 2 // 112) * 4 + (x0 + x1) // 2 // 112
        a = np.asarray(image).astype(int)
        reds = np.argwhere(a[..., 0] - np.maximum(a[..., 1], a[..., 2]) > 40)
        if scene.colour != "orange":  # an orange shape is reddish too
            rows, cols = set(reds[:, 0] // 28), set(reds[:, 1] // 28)
            assert cell // 4 in rows and cell % 4 in cols  # the red mark is visible in that token at low res

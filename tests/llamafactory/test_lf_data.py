"""``qzoom lf-dataset`` (the real command) on each labelling job's output, and the labelling jobs reading a
LLaMA-Factory ``dataset_info.json`` entry (tiny models, CPU, .venv-lf).

Expected grids are computed here with ``qwen_vl_utils.smart_resize`` and by hand; the exported ShareGPT file is
re-tokenized by LLaMA-Factory's own loader (``get_dataset``) and must give the pre-tokenized rows' tokens.
"""

from __future__ import annotations

import json
import math
import subprocess

import pytest
from lf_data_fixtures import (
    LF_TEMPLATES,
    QZOOM,
    UNIT,
    chat,
    exported_rows,
    lf_dataset,
    manifest,
    mined_rows,
    picture,
    tokenized,
    write_job,
)
from PIL import Image

IGNORE = -100


def _labels(rows: int, cols: int, seed: int = 0) -> list[list[int]]:
    return [[(1, 0, IGNORE)[(r * cols + c + seed) % 3] for c in range(cols)] for r in range(rows)]


def _image_token(model) -> int:
    config = json.loads((model / "config.json").read_text())
    return int(config.get("image_token_id", config.get("image_token_index", -1)))


def _lf_loader_rows(out, model, family) -> list[dict]:
    """The ShareGPT export read and tokenized by LLaMA-Factory's own data pipeline (not the pre-tokenized copy)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    m = manifest(out)
    model_args, data_args = HfArgumentParser((ModelArguments, DataArguments)).parse_dict({
        "model_name_or_path": str(model), "trust_remote_code": True, "template": LF_TEMPLATES[family],
        "dataset": m["name"], "dataset_dir": str(out), "cutoff_len": m["cutoff_len"],
        "image_max_pixels": m["image_max_pixels"], "image_min_pixels": m["image_min_pixels"]})
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    args = Seq2SeqTrainingArguments(output_dir=str(out.parent / "unused"), report_to="none")
    return list(get_dataset(template, model_args, data_args, args, stage="sft", **module)["train_dataset"])


def _stage1_rows(tmp, family):
    a = picture(tmp / "src" / "a.png", (500, 375), 1)
    b = picture(tmp / "src" / "b.png", (300, 100), 2)
    return [
        {"qzoom_id": "0-a", "qzoom_status": "ok", "messages": chat(), "images": [str(a)],
         "qzoom_rpn_labels": _labels(3, 4), "qzoom_attn_grid": [3, 4]},
        {"qzoom_id": "1-b", "qzoom_status": "ok", "messages": chat("Which box?"), "images": [str(b)],
         "qzoom_rpn_labels": _labels(2, 5, 1), "qzoom_attn_grid": [2, 5], "qzoom_pad_square": True},
        {"qzoom_id": "2-c", "qzoom_status": "ignored_box", "messages": chat(answer=None), "images": [str(a)],
         "qzoom_answer": "blue", "qzoom_rpn_labels": None, "qzoom_attn_grid": [4, 4]},
        {"qzoom_id": "3-d", "qzoom_status": "ok", "messages": chat(), "images": [str(tmp / "src" / "gone.png")],
         "qzoom_rpn_labels": _labels(1, 1), "qzoom_attn_grid": [1, 1]},
        {"qzoom_id": "4-e", "qzoom_status": "ok", "messages": chat(), "images": [str(a)],
         "chat_template_kwargs": {"min_pixels": 16 * 784, "max_pixels": 16 * 784},
         "qzoom_rpn_labels": _labels(6, 6, 2), "qzoom_attn_grid": [6, 6]},
    ]


@pytest.mark.slow  # two exports (LLaMA-Factory's loader runs twice) per family
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_stage1_export_grids_columns_rejects_and_lf_loader(tiny_dir, tmp_path, family):
    from qwen_vl_utils import smart_resize

    model = tiny_dir(family)
    rows = _stage1_rows(tmp_path, family)
    job = write_job(tmp_path / "labels", "pseudo-labels", rows)
    out = tmp_path / "data1"
    run = lf_dataset(job, model, family, out)
    assert run.returncode == 0, run.stdout[-3000:]
    m = manifest(out)
    assert (m["stage"], m["qzoom_train"], m["rows"], m["rejects"]) == (1, "rpn", 4, {"missing_image": 1})
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["rid"], r["reason"]) for r in rejects] == [(3, "3-d", "missing_image")]
    assert m["columns"] == {"qzoom_rpn_labels": 36, "qzoom_rpn_grid": 2}

    data = tokenized(out)
    assert len(data) == 4 and data.features["qzoom_rpn_labels"].length == 36
    kept = [rows[i] for i in (0, 1, 2, 4)]
    for row, src in zip(data, kept):
        labels = src["qzoom_rpn_labels"]
        grid = [len(labels), len(labels[0])] if labels else src["qzoom_attn_grid"]
        flat = [v for r in labels for v in r] if labels else [IGNORE] * (grid[0] * grid[1])
        assert row["qzoom_rpn_grid"] == grid
        assert row["qzoom_rpn_labels"] == flat + [IGNORE] * (36 - len(flat))
    sizes = [Image.open(p).size for p in (r["images"][0] for r in data)]
    if family == "llava":
        assert sizes == [(224, 224)] * 4  # the tiny processor's fixed square
        side = 16
        want_tokens = [side * side] * 4
    else:
        budget = smart_resize(375, 500, factor=28, min_pixels=16 * 784, max_pixels=16 * 784)
        assert sizes == [(4 * 28, 3 * 28), (5 * 28, 2 * 28), (4 * 28, 4 * 28), (budget[1], budget[0])]
        want_tokens = [w * h // 28 ** 2 for w, h in sizes]
    image_token = _image_token(model)
    assert [row["input_ids"].count(image_token) for row in data] == want_tokens
    padded = Image.open(data[1]["images"][0]).convert("RGB")  # 300x100 padded to a square before the grid
    assert max(abs(a - b) for a, b in zip(padded.getpixel((padded.width // 2, 0)),
                                          (127, 127, 127) if family != "llava" else (122, 116, 104))) <= 3
    # the ShareGPT export through LLaMA-Factory's own loader gives exactly the pre-tokenized tokens
    loaded = _lf_loader_rows(out, model, family)
    assert [r["input_ids"] for r in loaded] == [r["input_ids"] for r in data]
    assert [r["labels"] for r in loaded] == [r["labels"] for r in data]
    assert exported_rows(out)[2]["messages"][-1] == {"role": "assistant", "content": "blue"}  # qzoom_answer


def test_gate_export_budgets_and_labels(tiny_dir, tmp_path):
    from qwen_vl_utils import smart_resize

    family, unit = "qwen3_vl", UNIT["qwen3_vl"]
    a = picture(tmp_path / "src" / "a.png", (500, 375), 3)
    rows = [{"messages": chat(), "images": [str(a)], "qzoom_gate": g,
             "chat_template_kwargs": {"min_pixels": t * unit * unit, "max_pixels": t * unit * unit},
             "qzoom_gate_meta": {"id": f"{i}-x", "kind": "easy", "budget": t}}
            for i, (g, t) in enumerate([(1, 16), (0, 30)])]
    out = tmp_path / "data3"
    run = lf_dataset(write_job(tmp_path / "gate", "gate-labels", rows), tiny_dir(family), family, out)
    assert run.returncode == 0, run.stdout[-3000:]
    data = tokenized(out)
    assert manifest(out)["qzoom_train"] == "gate" and data["qzoom_gate"] == [1, 0]
    assert data.features["qzoom_gate"].dtype == "int32"  # one int per row
    for row, t in zip(data, (16, 30)):
        h, w = smart_resize(375, 500, factor=unit, min_pixels=t * unit * unit, max_pixels=t * unit * unit)
        assert Image.open(row["images"][0]).size == (w, h)
        assert row["input_ids"].count(_image_token(tiny_dir(family))) == (h // unit) * (w // unit)


def test_stage2_export_two_images_and_roi(tiny_dir, tmp_path):
    from qwen_vl_utils import smart_resize

    from qzoom_swift.config import QZoomConfig

    family = "qwen2_5_vl"
    rows = mined_rows(tmp_path)
    out = tmp_path / "data2"
    run = lf_dataset(write_job(tmp_path / "mined", "mine-hard", rows), tiny_dir(family), family, out)
    assert run.returncode == 0, run.stdout[-3000:]
    cfg = QZoomConfig()
    shared, data = exported_rows(out), tokenized(out)
    assert shared[0]["messages"][0]["content"] == "<image><image>What colour is the box?"
    assert shared[1]["messages"][0]["content"] == "Where is the box?<image><image>"
    assert manifest(out)["qzoom_train"] is None and data.features["qzoom_roi"].length == 6
    for src, row in zip(rows, data):
        original = Image.open(src["images"][0])
        pixels = src["chat_template_kwargs"]["min_pixels"]
        h, w = smart_resize(original.height, original.width, factor=28, min_pixels=pixels, max_pixels=pixels)
        source, crop = (Image.open(p) for p in row["images"])
        assert source.size == (w, h)
        roi = src["qzoom_roi"]
        grid = [h // 28, w // 28]
        if roi["grid"] == grid:
            box = roi["grid_box"]
        else:
            left, top, right, bottom = roi["box"]
            box = [math.floor(left * grid[1]), math.floor(top * grid[0]), math.ceil(right * grid[1]),
                   math.ceil(bottom * grid[0])]
        assert row["qzoom_roi"] == box + grid
        cw = math.ceil(roi["box"][2] * original.width) - math.floor(roi["box"][0] * original.width)
        ch = math.ceil(roi["box"][3] * original.height) - math.floor(roi["box"][1] * original.height)
        assert crop.size[::-1] == smart_resize(ch, cw, factor=28, min_pixels=cfg.roi_min_tokens * 784,
                                               max_pixels=cfg.roi_max_tokens * 784)
    assert rows[0]["qzoom_roi"]["grid"] == data[0]["qzoom_roi"][4:]  # the exact stored cells were used once


@pytest.mark.slow  # four exports
def test_rerun_refused_force_replaces_and_a_failed_export_leaves_the_old_one(tiny_dir, tmp_path, monkeypatch):
    from qzoom_swift.llamafactory_plugin import data as lf_data

    family = "qwen2_5_vl"
    job = write_job(tmp_path / "mined", "mine-hard", mined_rows(tmp_path))
    out = tmp_path / "data2"
    assert lf_dataset(job, tiny_dir(family), family, out).returncode == 0
    again = lf_dataset(job, tiny_dir(family), family, out)
    assert again.returncode == 1 and "--force" in again.stdout
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    refused = lf_dataset(job, tiny_dir(family), family, foreign, "--force")
    assert refused.returncode == 1 and "not empty" in refused.stdout and (foreign / "keep.txt").is_file()
    before = manifest(out)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lf_data, "fixed_length_columns", boom)
    opts = lf_data.LFExportOptions(job=str(job), model=str(tiny_dir(family)), template="qwen2_vl", out=str(out),
                                   force=True, progress=False)
    with pytest.raises(RuntimeError, match="disk full"):
        lf_data.export_lf_dataset(opts)
    assert manifest(out) == before and len(tokenized(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data2", "mined", "notes", "src"]  # no staging left
    monkeypatch.undo()
    forced = lf_dataset(job, tiny_dir(family), family, out, "--force", "--name", "renamed")
    assert forced.returncode == 0, forced.stdout[-2000:]
    assert manifest(out)["name"] == "renamed" and json.loads((out / "dataset_info.json").read_text()).keys() == {
        "renamed"}


def test_an_unfinished_or_unknown_job_is_refused(tmp_path):
    from qzoom_swift.llamafactory_plugin.data import ExportError, read_job

    job = write_job(tmp_path / "labels", "pseudo-labels", [{"messages": chat(), "images": []}])
    (job / "summary.json").unlink()
    with pytest.raises(ExportError, match="has not finished"):
        read_job(job)
    with pytest.raises(ExportError, match="holds no job.json"):
        read_job(tmp_path)
    (job / "job.json").write_text(json.dumps({"kind": "labelling"}))
    with pytest.raises(ExportError, match="job kind 'labelling' has no LLaMA-Factory export"):
        read_job(job)
    mined = write_job(tmp_path / "mined", "mine-hard", [])
    (mined / "post_sft.jsonl").unlink()
    with pytest.raises(ExportError, match="has no post_sft.jsonl"):
        read_job(mined)


@pytest.mark.slow  # two exports
def test_too_long_rows_are_rejected_and_the_rest_exported(tiny_dir, tmp_path):
    family = "qwen2_5_vl"
    job = write_job(tmp_path / "labels", "pseudo-labels", _stage1_rows(tmp_path, family)[:3])
    first = tmp_path / "all"
    assert lf_dataset(job, tiny_dir(family), family, first).returncode == 0
    lengths = [len(r["input_ids"]) for r in tokenized(first)]
    out = tmp_path / "cut"
    run = lf_dataset(job, tiny_dir(family), family, out, "--cutoff-len", str(max(lengths) - 1))
    assert run.returncode == 0, run.stdout[-2000:]
    longest = lengths.index(max(lengths))
    assert manifest(out)["rejects"] == {"too_long": 1} and manifest(out)["rows"] == 2
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert reject["index"] == longest and f"{max(lengths)} tokens > cutoff_len" in reject["detail"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000-0.png", "000001-0.png"]  # none orphaned


def test_a_variable_length_column_gets_a_clear_error(tiny_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    from qzoom_swift.llamafactory_plugin.data import check_tokenized, fixed_length_columns

    family = "qwen2_5_vl"
    job = write_job(tmp_path / "labels", "pseudo-labels", _stage1_rows(tmp_path, family))
    run = lf_dataset(job, tiny_dir(family), family, tmp_path / "small", "--rpn-cells", "20")
    assert run.returncode == 1 and "qzoom_rpn_labels" in run.stdout and "--rpn-cells to at least 36" in run.stdout
    assert not (tmp_path / "small").exists()
    ragged = tmp_path / "ragged"
    DatasetDict({"train": Dataset.from_list([{"input_ids": [1, 2], "qzoom_roi": [0, 0, 1, 1, 2, 2]},
                                             {"input_ids": [1], "qzoom_roi": [0, 0, 1, 1]}])}).save_to_disk(str(ragged))
    with pytest.raises(ValueError, match=r"column qzoom_roi is not fixed-length \(row 0: 6, row 1: 4\)"):
        check_tokenized(ragged)
    holes = tmp_path / "holes"
    DatasetDict({"train": Dataset.from_list([{"qzoom_gate": 1, "qzoom_roi": [0, 0, 1, 1, 2, 2]},
                                             {"qzoom_gate": 0, "qzoom_roi": None}])}).save_to_disk(str(holes))
    with pytest.raises(ValueError, match="column qzoom_roi is empty at row 1"):
        check_tokenized(holes)
    exported = tmp_path / "exported"
    assert lf_dataset(job, tiny_dir(family), family, exported).returncode == 0
    assert check_tokenized(exported / "tokenized") == {"qzoom_rpn_labels": 36, "qzoom_rpn_grid": 2}
    with pytest.raises(ValueError, match="column qzoom_rpn_grid: row 1 has length 3, not 2"):
        fixed_length_columns([{"qzoom_rpn_labels": [1], "qzoom_rpn_grid": [1, 1]},
                              {"qzoom_rpn_labels": [1], "qzoom_rpn_grid": [1, 1, 1]}])


@pytest.mark.slow  # a pseudo-label job and an export
def test_pseudo_labels_read_a_lf_dataset_and_export_back(tiny_dir, tmp_path):
    family = "qwen2_5_vl"
    src = tmp_path / "lf"
    rows = [{"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "<image>What colour is the box?"},
                               {"from": "gpt", "value": c}], "pics": [f"img/{i}.png"]}
            for i, c in enumerate(["red", "green", "blue"])]
    for i in range(3):
        picture(src / "img" / f"{i}.png", (392, 280), i)
    (src / "shapes.json").write_text(json.dumps(rows))
    (src / "alp.jsonl").write_text(json.dumps({"instruction": "<image>Name the colour.", "input": "briefly",
                                               "output": "blue", "images": ["img/2.png"]}) + "\n")
    (src / "dataset_info.json").write_text(json.dumps({
        "shapes": {"file_name": "shapes.json", "formatting": "sharegpt",
                   "columns": {"messages": "conversations", "images": "pics"}},
        "alp": {"file_name": "alp.jsonl", "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                                      "images": "images"}}}))

    def label(spec: str, out: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(QZOOM), "pseudo-labels", "--model", str(tiny_dir(family)), "--dataset", spec,
                               "--out", str(tmp_path / out), "--max-new-tokens", "2", "--batch-size", "2",
                               "--calibration", "2", "--no-progress", "--tau-fg", "0.9", "--tau-bg", "0.8",
                               "--max-box-fraction", "0.9", "--min-peak", "1e-3"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                              cwd=tmp_path)

    run = label("lf/dataset_info.json:shapes", "labels")
    assert run.returncode == 0, run.stdout[-3000:]
    shard = [json.loads(line) for line in (tmp_path / "labels" / "shard-00000.jsonl").read_text().splitlines()]
    assert [r["messages"] for r in shard] == [[{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "<image>What colour is the box?"},
                                               {"role": "assistant", "content": c}] for c in ("red", "green", "blue")]
    assert [r["images"] for r in shard] == [[str(src / "img" / f"{i}.png")] for i in range(3)]
    assert all(r["qzoom_attn_grid"] == [10, 14] for r in shard)  # 280x392 px at 28 px per merged token
    alp = label("lf/dataset_info.json:alp", "labels_alp")
    assert alp.returncode == 0, alp.stdout[-3000:]
    row = json.loads((tmp_path / "labels_alp" / "shard-00000.jsonl").read_text())
    assert row["messages"][0] == {"role": "user", "content": "<image>Name the colour.\nbriefly"}
    missing = label("lf/dataset_info.json:nope", "labels_nope")
    assert missing.returncode == 1 and "Undefined dataset nope" in missing.stdout and "'alp', 'shapes'" in missing.stdout
    out = tmp_path / "data1"
    run = lf_dataset(tmp_path / "labels", tiny_dir(family), family, out)
    assert run.returncode == 0, run.stdout[-3000:]
    assert manifest(out)["rows"] == 3 and tokenized(out).features["qzoom_rpn_labels"].length == 140

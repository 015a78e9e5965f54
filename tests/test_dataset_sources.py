"""``--dataset`` as ms-swift reads it: a dataset folder, ``path#N`` and a hub id, next to the plain jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qzoom_swift.labels.gate_job import GateLabelOptions, run_gate_labels
from qzoom_swift.labels.jobs import JobError
from qzoom_swift.labels.sources import IMAGE_CACHE_DIR, load_records


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(root.glob("shard-*.jsonl")) for line in shard.read_text().splitlines()]


def _run(tiny_dir, out: Path, dataset: str) -> list[dict]:
    opts = GateLabelOptions(model=str(tiny_dir("qwen2_5_vl")), dataset=dataset, out=str(out), budgets=(16, 36),
                            max_new_tokens=2, batch_size=2, progress=False)
    run_gate_labels(opts)
    return _rows(out)


def _as_plain_jsonl(rows: list[dict], path: Path) -> Path:
    """The records the job read, as a plain ms-swift jsonl (the reference run)."""
    path.write_text("".join(json.dumps({"messages": r["messages"], "images": r["images"]}) + "\n" for r in rows))
    return path


def test_dataset_folder_with_embedded_images(tiny_dir, shape_dataset, tmp_path):
    import datasets

    rows = [json.loads(line) for line in shape_dataset.read_text().splitlines()]
    embedded = [{"messages": r["messages"], "images": [{"bytes": Path(p).read_bytes(), "path": Path(p).name}
                                                       for p in r["images"]]} for r in rows]
    folder = tmp_path / "folder"
    folder.mkdir()
    datasets.Dataset.from_list(embedded).to_parquet(str(folder / "train.parquet"))
    got = _run(tiny_dir, tmp_path / "out_folder", str(folder))
    assert len(got) == 4
    cached = sorted((tmp_path / "out_folder" / IMAGE_CACHE_DIR).iterdir())
    assert len(cached) == 4 and all(Path(r["images"][0]).parent == cached[0].parent for r in got)
    plain = _run(tiny_dir, tmp_path / "out_plain", str(shape_dataset))
    assert [r["qzoom_answers"] for r in got] == [r["qzoom_answers"] for r in plain]
    assert [r["messages"] for r in got] == [r["messages"] for r in plain]


def test_sub_sampling_syntax_is_seeded_and_matches_a_plain_jsonl(tiny_dir, shape_dataset, tmp_path):
    spec = f"{shape_dataset}#2"
    first = [identity for _, identity in load_records(spec, tmp_path / "cache")]
    assert first == [identity for _, identity in load_records(spec, tmp_path / "cache")]  # the same draw
    got = _run(tiny_dir, tmp_path / "out_sampled", spec)
    assert len(got) == 2 and [r["images"] for r in got] == [r["images"] for r in first]
    job = json.loads((tmp_path / "out_sampled" / "job.json").read_text())
    assert job["settings"]["dataset"] == spec
    plain = _run(tiny_dir, tmp_path / "out_plain", str(_as_plain_jsonl(got, tmp_path / "two.jsonl")))
    assert [r["qzoom_answers"] for r in got] == [r["qzoom_answers"] for r in plain]
    assert _run(tiny_dir, tmp_path / "out_sampled", spec) == got  # a rerun resumes: nothing new, same ids


def test_offline_hub_id_fails_naming_it(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("USE_HF", "1")  # the Hugging Face hub, offline in the tests (HF_HUB_OFFLINE=1): fails at once
    with pytest.raises(JobError, match="someone/no-such-dataset"):
        _run(tiny_dir, tmp_path / "out", "someone/no-such-dataset")
    assert not (tmp_path / "out" / "job.json").exists()
    with pytest.raises(JobError, match="not found"):
        _run(tiny_dir, tmp_path / "out", str(tmp_path / "missing_folder"))


# ------------------------------------------------------------------- issue 29 item 3: #0 refused, #N > size clamped


@pytest.mark.parametrize("tail,match", [("#0", "#0 draws no record; #N must be at least 1"),
                                        ("#-3", "#-3 draws no record"),
                                        ("#some", "must be a whole number of records")])
def test_sub_sample_of_no_record_is_refused_before_the_model(tiny_dir, shape_dataset, tmp_path, tail, match):
    from qzoom_swift import cli

    with pytest.raises(JobError, match=match) as info:
        _run(tiny_dir, tmp_path / "out", f"{shape_dataset}{tail}")
    assert "network" not in str(info.value) and str(shape_dataset) in str(info.value)
    assert not (tmp_path / "out" / "job.json").exists()
    rc = cli.main(["gate-labels", "--model", str(tiny_dir("qwen2_5_vl")), "--dataset", f"{shape_dataset}{tail}",
                   "--out", str(tmp_path / "cli"), "--budgets", "16,36", "--no-progress"])
    assert rc != 0 and not (tmp_path / "cli" / "job.json").exists()


def test_sub_sample_larger_than_the_dataset_labels_each_record_once(shape_dataset, tmp_path, caplog):
    """``#100`` of 4 rows: the 4 rows once each (the draw of ``#4``), and a warning that says so."""
    import logging

    every = [identity for _, identity in load_records(f"{shape_dataset}#4", tmp_path / "cache")]
    with caplog.at_level(logging.WARNING, logger="qzoom_swift.labels.sources"):
        clamped = [identity for _, identity in load_records(f"{shape_dataset}#100", tmp_path / "cache")]
    assert clamped == every and len(clamped) == 4
    assert len({json.dumps(r, sort_keys=True) for r in clamped}) == 4  # no row twice (ms-swift repeats them)
    plain = [json.loads(line) for line in shape_dataset.read_text().splitlines()]
    assert sorted(r["images"][0] for r in clamped) == sorted(r["images"][0] for r in plain)
    assert "#100 asks for more records than the 4 it holds" in caplog.text and f"{shape_dataset}#4" in caplog.text
    two = [identity for _, identity in load_records(f"{shape_dataset}#2", tmp_path / "cache")]
    assert len(two) == 2 and all(r in every for r in two)  # below the size: ms-swift's draw, unchanged

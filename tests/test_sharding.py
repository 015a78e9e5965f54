"""Data-parallel labelling: a job split over processes (--num-shards / torchrun) writes exactly the records of a
single-process run, merges one summary, and a killed shard resumes without loss or duplicates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qzoom_swift.cli import main
from qzoom_swift.labels.gate_job import GateLabelOptions, run_gate_labels
from qzoom_swift.labels.jobs import JobError, Part, resolve_part
from qzoom_swift.labels.pseudo import PseudoLabelJob, PseudoLabelOptions, run_pseudo_labels
from qzoom_swift.synthetic.images import write_shape_dataset

REPO = Path(__file__).resolve().parents[1]
PSEUDO = dict(max_new_tokens=4, progress=False, heads="5:0,1;6", tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9,
              batch_size=2)
GATE = dict(budgets=(16, 36), max_new_tokens=2, batch_size=2, progress=False)


def _records(out: Path) -> dict[str, dict]:
    """qzoom_id -> output line, over every shard file of every part (fails on a duplicate id)."""
    rows: dict[str, dict] = {}
    for shard in sorted(out.glob("shard-*.jsonl")):
        for line in shard.read_text().splitlines():
            row = json.loads(line)
            assert row["qzoom_id"] not in rows, f"duplicate {row['qzoom_id']} in {shard.name}"
            rows[row["qzoom_id"]] = row
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_shape_dataset(tmp_path_factory.mktemp("shard_data"), n=7, size=(392, 280), seed=5)


@pytest.fixture(scope="module")
def single(tiny_dir, data, tmp_path_factory) -> dict[str, Path]:
    """The reference: each job run once as one process."""
    root = tmp_path_factory.mktemp("single")
    model = str(tiny_dir("qwen2_5_vl"))
    run_pseudo_labels(PseudoLabelOptions(model=model, dataset=str(data), out=str(root / "pseudo"), **PSEUDO))
    run_gate_labels(GateLabelOptions(model=model, dataset=str(data), out=str(root / "gate"), **GATE))
    return {"pseudo": root / "pseudo", "gate": root / "gate"}


def test_parts_take_whole_blocks_round_robin_and_flags_are_checked(monkeypatch):
    part = Part(1, 3)
    assert [n for n in range(8) if part.owns(n)] == [1, 4, 7] and part.tag == "p1of3"

    class Opts:
        num_shards, shard_index = None, None

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_part(Opts()) == (None, None)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_part(Opts()) == (Part(2, 4), 0)  # torchrun: rank 2 of 4, its GPU is cuda:LOCAL_RANK
    Opts.num_shards, Opts.shard_index = 2, 1  # explicit flags win over the launcher's variables
    assert resolve_part(Opts()) == (Part(1, 2), 0)
    Opts.shard_index = 2
    with pytest.raises(JobError, match="0 <= shard index < number of shards"):
        resolve_part(Opts())
    Opts.shard_index = None
    with pytest.raises(JobError, match="go together"):
        resolve_part(Opts())


def test_two_shards_of_pseudo_labels_equal_one_process(tiny_dir, data, single, tmp_path, capsys):
    model, out = str(tiny_dir("qwen2_5_vl")), tmp_path / "out"
    first = run_pseudo_labels(PseudoLabelOptions(model=model, dataset=str(data), out=str(out), num_shards=2,
                                                 shard_index=0, **PSEUDO))
    assert first["complete"] is False and not (out / "summary.json").exists()  # the other half is missing
    assert first["records"] == 4  # blocks 0 and 2 of 2 records each (7 records: blocks 0..3)
    capsys.readouterr()
    assert main(["merge-shards", str(out)]) == 1  # refuses: records missing, and says whose
    assert "3 of 7 records are not done yet (shards [1] of [2])" in capsys.readouterr().err
    last = run_pseudo_labels(PseudoLabelOptions(model=model, dataset=str(data), out=str(out), num_shards=2,
                                                shard_index=1, **PSEUDO))
    assert last["complete"] and last["records_done"] == 7 and len(last["parts"]) == 2
    reference = json.loads((single["pseudo"] / "summary.json").read_text())
    assert last["outcomes"] == reference["outcomes"]
    assert sorted(p.name for p in out.glob("shard-*.jsonl")) == ["shard-p0of2-00000.jsonl", "shard-p1of2-00000.jsonl"]
    assert _records(out) == _records(single["pseudo"])  # record for record, every field
    (out / "summary.json").unlink()
    assert main(["merge-shards", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["outcomes"] == reference["outcomes"]


def test_sharded_auto_heads_need_the_choice_first(tiny_dir, data, tmp_path):
    opts = {**PSEUDO, "heads": "auto"}
    with pytest.raises(JobError, match="--heads auto chooses the layers"):
        run_pseudo_labels(PseudoLabelOptions(model=str(tiny_dir("qwen2_5_vl")), dataset=str(data),
                                             out=str(tmp_path / "o"), num_shards=2, shard_index=0, **opts))


def test_overwrite_is_refused_for_a_shard(tiny_dir, data, tmp_path):
    with pytest.raises(JobError, match="--overwrite with several shards"):
        run_pseudo_labels(PseudoLabelOptions(model=str(tiny_dir("qwen2_5_vl")), dataset=str(data),
                                             out=str(tmp_path / "o"), num_shards=2, shard_index=0, overwrite=True,
                                             **PSEUDO))


def test_killed_gate_labels_shard_resumes_without_loss_or_duplicates(tiny_dir, data, single, tmp_path,
                                                                     monkeypatch):
    from qzoom_swift.labels.gate_job import GateLabelJob

    model, out = str(tiny_dir("qwen2_5_vl")), tmp_path / "out"
    opts = dict(model=model, dataset=str(data), out=str(out), num_shards=2, **GATE)
    run_gate_labels(GateLabelOptions(shard_index=1, **opts))
    original = GateLabelJob.process_block
    calls = {"n": 0}

    def dies_in_the_second_block(self, block):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is stopped between two blocks
        return original(self, block)

    monkeypatch.setattr(GateLabelJob, "process_block", dies_in_the_second_block)
    with pytest.raises(KeyboardInterrupt):
        run_gate_labels(GateLabelOptions(shard_index=0, **opts))
    own = out / "shard-p0of2-00000.jsonl"
    with own.open("a") as f:  # and a line half-written when it died
        f.write('{"qzoom_id": "4-')
    assert not (out / "summary.json").exists()
    monkeypatch.setattr(GateLabelJob, "process_block", original)
    resumed = run_gate_labels(GateLabelOptions(shard_index=0, **opts))
    assert resumed["answered"] == 7 and len(resumed["parts"]) == 2
    ours, theirs = _records(out), _records(single["gate"])
    assert set(ours) == set(theirs)
    assert {k: r["qzoom_answers"] for k, r in ours.items()} == {k: r["qzoom_answers"] for k, r in theirs.items()}
    for name in ("gate_trajectories.jsonl", "gate_train.jsonl"):  # merged outputs equal the single run's
        assert (out / name).read_text() == (single["gate"] / name).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "NPROC_PER_NODE"])
def test_two_launched_processes_label_like_one(launch, tiny_dir, data, single, tmp_path):
    """``torchrun --nproc_per_node 2`` (CPU, its gloo-era c10d rendezvous), or ms-swift's ``NPROC_PER_NODE=2``
    in front of the plain command, splits pseudo-labels by RANK / WORLD_SIZE."""
    out = tmp_path / "out"
    job = ["pseudo-labels", "--model", str(tiny_dir("qwen2_5_vl")), "--dataset", str(data), "--out", str(out),
           "--max-new-tokens", "4", "--heads", "5:0,1;6", "--tau-fg", "0.9", "--tau-bg", "0.8",
           "--max-box-fraction", "0.9", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC_PER_NODE"):
        env.pop(key, None)
    if launch == "torchrun":
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
               "-m", "qzoom_swift.cli", *job]
    else:
        cmd, env["NPROC_PER_NODE"] = [sys.executable, "-m", "qzoom_swift.cli", *job], "2"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("shard-*.jsonl")) == ["shard-p0of2-00000.jsonl", "shard-p1of2-00000.jsonl"]
    assert _records(out) == _records(single["pseudo"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and {p["part"] for p in summary["parts"]} == {"p0of2", "p1of2"}


def test_merge_shards_rebuilds_a_job_without_its_model(tiny_dir, data, single, tmp_path):
    """merge-shards reads job.json's options: the summary it writes matches the job's own."""
    job = PseudoLabelJob(PseudoLabelOptions(model=str(tiny_dir("qwen2_5_vl")), dataset=str(data),
                                            out=str(single["pseudo"]), **PSEUDO))
    merged = job.merge()
    reference = json.loads((single["pseudo"] / "summary.json").read_text())
    assert merged["outcomes"] == reference["outcomes"] and merged["records_done"] == 7


def test_batch_size_does_not_change_gate_labels_or_mined_answers(tiny_dir, data, single, tmp_path):
    """--batch-size is a speed knob: batches of 3 (left-padded together) answer as batch 1 under greedy decoding."""
    from qzoom_swift.labels.mining import MineOptions, run_mine_hard

    model = str(tiny_dir("qwen2_5_vl"))
    answers = {}
    for bs in (1, 3):
        run_gate_labels(GateLabelOptions(model=model, dataset=str(data), out=str(tmp_path / f"gate{bs}"),
                                         **{**GATE, "batch_size": bs}))
        answers[bs] = {k: r["qzoom_answers"] for k, r in _records(tmp_path / f"gate{bs}").items()}
    assert answers[1] == answers[3] and len(answers[1]) == 7
    mined = {}
    for bs in (1, 3):
        run_mine_hard(MineOptions(model=model, checkpoint=None, dataset=str(data), out=str(tmp_path / f"mine{bs}"),
                                  max_new_tokens=2, batch_size=bs, progress=False,
                                  config_overrides={"low_min_tokens": 16, "low_max_tokens": 64,
                                                    "roi_min_tokens": 16, "roi_max_tokens": 64,
                                                    "tau_roi": 0.0}))
        mined[bs] = {k: (r["qzoom_base_answer"], r["qzoom_roi_answer"], r["qzoom_status"])
                     for k, r in _records(tmp_path / f"mine{bs}").items()}
    assert mined[1] == mined[3] and len(mined[1]) == 7

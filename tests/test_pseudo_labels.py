"""``qzoom pseudo-labels``: record checks, resumable shards, rejects, summary, kill-and-resume, visualize."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from qzoom_swift.labels.jobs import JobError, Prepared, Reject, _scan_jsonl, read_dataset
from qzoom_swift.labels.pseudo import (
    GROUNDING_INSTRUCTION,
    PseudoLabelOptions,
    prepare_record,
    run_pseudo_labels,
)
from qzoom_swift.labels.tristate import combine_sink_masks, tristate_labels
from qzoom_swift.synthetic.images import write_shape_dataset

# Tiny random models attend almost uniformly: raised thresholds give non-ignored labels.
FIT = dict(tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9)
FIT_ARGS = ["--tau-fg", "0.9", "--tau-bg", "0.8", "--max-box-fraction", "0.9"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _shard_records(out: Path) -> list[dict]:
    return [r for shard in sorted(out.glob("shard-*.jsonl")) for r in _rows(shard)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("pl_images")
    data = write_shape_dataset(root, n=12, seed=1)
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return root, _rows(data), broken


# ---------------------------------------------------------------------------------------- record checks


def test_prepare_record_rejects_each_bad_record_with_a_reason(images, tmp_path):
    root, rows, broken = images
    good = rows[0]
    user = {"role": "user", "content": "<image>What?"}
    cases = {
        "bad_json": None,
        "bad_messages": {"query": "hi", "images": good["images"]},
        "no_question": {"messages": [{"role": "assistant", "content": "x"}], "images": good["images"]},
        "no_image": {"messages": [user]},
        "multi_image": {"messages": [user], "images": good["images"] * 2},
        "image_tag_mismatch": {"messages": [{"role": "user", "content": "<image><image>?"}], "images": good["images"]},
        "unsupported_image": {"messages": [user], "images": ["https://example.com/a.png"]},
        "missing_image": {"messages": [user], "images": [str(root / "nope.png")]},
        "unreadable_image": {"messages": [user], "images": [str(broken)]},
    }
    for reason, record in cases.items():
        result = prepare_record(record, root, grounding_prompt=False)
        assert isinstance(result, Reject) and result.reason == reason, (reason, result)
        assert result.detail
    assert "nope.png" in prepare_record(cases["missing_image"], root, False).detail


def test_prepare_record_builds_the_prompt_around_the_image(images, tmp_path):
    root, rows, _ = images
    rel = Path(rows[0]["images"][0]).name  # relative to the dataset's directory
    record = {"messages": [{"role": "system", "content": "Be terse."},
                           {"role": "user", "content": "Look: <image> Which colour? " +
                            "Answer the question using a single word or phrase."},
                           {"role": "assistant", "content": "red"}], "images": [rel]}
    plain = prepare_record(record, root, grounding_prompt=False)
    assert isinstance(plain, Prepared) and plain.image.size == (392, 280)
    assert plain.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be terse."}]}
    content = plain.messages[1]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text"]
    assert content[0]["text"] == "Look: " and content[2]["text"].startswith(" Which colour?")
    grounded = prepare_record(record, root, grounding_prompt=True)
    assert grounded.messages[1]["content"][2]["text"].endswith(GROUNDING_INSTRUCTION)
    assert "single word" not in grounded.messages[1]["content"][2]["text"]
    untagged = prepare_record({"messages": [{"role": "user", "content": "Colour?"}], "images": [{"path": rel}]},
                              root, grounding_prompt=False)
    assert [c["type"] for c in untagged.messages[0]["content"]] == ["image", "text"]


def test_record_ids_are_line_index_plus_content_hash(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"a": 1}, "", {"a": 1}, "{broken"])
    records = read_dataset(path)
    assert [i for i, _, _ in records] == [0, 2, 3]
    assert records[0][1].split("-")[1] == records[1][1].split("-")[1]  # same content, same hash
    assert records[0][1] != records[1][1] and records[2][2] is None
    assert read_dataset(_write_jsonl(tmp_path / "e.jsonl", [{"a": 2}]))[0][1] != records[0][1]


def test_scan_cuts_a_partial_last_line_and_refuses_a_corrupted_middle(tmp_path):
    path = tmp_path / "shard-00000.jsonl"
    lines = [json.dumps({"qzoom_id": f"{i}-abc", "qzoom_status": "ok", "x": [1, 2]}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n" + lines[0][:17])
    assert [e[0] for e in _scan_jsonl(path)] == ["0-abc", "1-abc", "2-abc"]
    assert path.read_text() == "\n".join(lines) + "\n"  # the torn line is gone
    path.write_text(lines[0] + "\n" + lines[1][:-5] + "\n")  # a complete-looking but truncated last line
    assert [e[0] for e in _scan_jsonl(path)] == ["0-abc"]
    path.write_text(lines[0] + "\n" + "garbage\n" + lines[2] + "\n")
    with pytest.raises(JobError, match="corrupted line"):
        _scan_jsonl(path)


# ------------------------------------------------------------------------------------------------ job


def _options(model, dataset, out, **kw) -> PseudoLabelOptions:
    base = dict(model=str(model), dataset=str(dataset), out=str(out), max_new_tokens=6, progress=False,
                calibration=4, **FIT)
    base.update(kw)
    return PseudoLabelOptions(**base)


@pytest.fixture(scope="module")
def mixed_job(images, tiny_dir, tmp_path_factory):
    root, rows, broken = images
    user = {"role": "user", "content": "<image>What colour is the shape?"}
    bad = [
        {"messages": [user], "images": [str(root / "missing.png")]},
        {"messages": [user]},
        {"messages": [user], "images": rows[0]["images"] * 2},
        {"messages": [user], "images": [str(broken)]},
        "{not json",
    ]
    dataset = _write_jsonl(root / "mixed.jsonl", rows[:5] + bad[:3] + rows[5:7] + bad[3:])
    out = tmp_path_factory.mktemp("pl_mixed") / "out"
    t0 = time.perf_counter()
    summary = run_pseudo_labels(_options(tiny_dir("qwen2_5_vl"), dataset, out, batch_size=3))
    return dataset, out, summary, time.perf_counter() - t0


def test_job_writes_labelled_shards_rejects_and_a_summary(mixed_job):
    dataset, out, summary, _ = mixed_job
    records = _shard_records(out)
    rejects = _rows(out / "rejects.jsonl")
    assert len(records) == 7 and len(rejects) == 5
    assert sorted(r["reason"] for r in rejects) == sorted(
        ["missing_image", "no_image", "multi_image", "unreadable_image", "bad_json"])
    assert all(r["detail"] and r["qzoom_status"] == "rejected" for r in rejects)
    assert summary["records_total"] == 12 and summary["records_done"] == 12 and summary["complete"]
    assert summary["outcomes"]["rejected"] == 5
    assert summary["outcomes"]["labelled"] + summary["ignored"] == 7
    assert summary["rejects_by_reason"] == {"bad_json": 1, "missing_image": 1, "multi_image": 1, "no_image": 1,
                                            "unreadable_image": 1}
    assert summary["this_run"]["processed"] == 12 and summary["this_run"]["samples_per_s"] > 0
    assert summary["this_run"]["timing_s"]["generate_s"] > 0
    assert json.loads((out / "summary.json").read_text()) == summary
    # input order is kept and every input field survives
    inputs = {i: r for i, _, r in read_dataset(dataset)}
    assert [int(r["qzoom_id"].split("-")[0]) for r in records] == [0, 1, 2, 3, 4, 8, 9]
    for r in records:
        src = inputs[int(r["qzoom_id"].split("-")[0])]
        assert {k: r[k] for k in src} == src


def test_labels_are_consistent_with_the_stored_maps_and_grid(mixed_job):
    _, out, summary, _ = mixed_job
    job = json.loads((out / "job.json").read_text())
    assert job["head_selection"]["source"] == "auto" and len(job["head_selection"]["grounding"]) == 2
    assert set(map(int, job["head_selection"]["grounding"])) <= set(job["auto_candidates"])
    assert len(job["auto_ranking"]) == len(job["auto_candidates"]) and job["sink_filter"] == "norm"
    assert summary["outcomes"]["labelled"] >= 1
    for r in _shard_records(out):
        h, w = r["qzoom_attn_grid"]
        assert (h, w) == (10, 14)  # 392 x 280 image, 28-px tokens: labelled at the image's own aspect
        attn = torch.tensor(r["qzoom_attn"])
        assert attn.shape == (h, w) and torch.tensor(r["qzoom_vis_norm"]).shape == (h, w)
        assert r["qzoom_sink_attn"] is None and isinstance(r["qzoom_answer"], str) and r["qzoom_answer"]
        mask = combine_sink_masks("norm", (h, w), norms=torch.tensor(r["qzoom_vis_norm"]), tau_norm=5.0)
        assert int(mask.sum()) == r["qzoom_sink_tokens"]
        again = tristate_labels(attn, mask, min_peak=5e-3, tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9)
        assert again.status == r["qzoom_status"]
        assert again.as_list() == r["qzoom_rpn_labels"]
        if r["qzoom_status"] == "ok":
            assert torch.tensor(r["qzoom_rpn_labels"]).shape == (h, w)
            assert r["qzoom_box"] == [again.box.x0, again.box.y0, again.box.x1, again.box.y1]


def test_rerun_of_a_finished_job_does_nothing_and_settings_must_match(mixed_job, tiny_dir):
    dataset, out, summary, _ = mixed_job
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    again = run_pseudo_labels(_options(tiny_dir("qwen2_5_vl"), dataset, out, batch_size=3))
    assert again["this_run"]["processed"] == 0 and again["this_run"]["resumed_from"] == 12
    assert again["outcomes"] == summary["outcomes"]
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    with pytest.raises(JobError, match=r"different settings \(tau_fg: earlier 0.9, now 0.5\).*--overwrite"):
        run_pseudo_labels(_options(tiny_dir("qwen2_5_vl"), dataset, out, batch_size=3, tau_fg=0.5))


def test_non_empty_foreign_output_dir_needs_overwrite(mixed_job, tiny_dir, tmp_path, capsys):
    from qzoom_swift.cli import main

    dataset = mixed_job[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["pseudo-labels", "--model", str(tiny_dir("qwen2_5_vl")), "--dataset", str(dataset), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "3", "--no-progress"]
    assert main(argv) == 1  # the job failed (2 is for usage errors)
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert main(argv + ["--overwrite"]) == 1  # --overwrite never deletes files that are not the job's
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert main(argv) == 0
    first = (out / "shard-00000.jsonl").read_text()
    assert len(first.splitlines()) == 2
    assert main(argv + ["--overwrite"]) == 0  # restart: same content, nothing duplicated
    assert (out / "shard-00000.jsonl").read_text() == first


def test_unsupported_model_family_is_a_whole_job_error(tmp_path, images, capsys):
    from qzoom_swift.cli import main

    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    dataset = _write_jsonl(tmp_path / "d.jsonl", images[1][:1])
    code = main(["pseudo-labels", "--model", str(model), "--dataset", str(dataset), "--out", str(tmp_path / "o"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "unsupported model" in err and "gpt2" in err and "qwen2_5_vl" in err
    assert not list((tmp_path / "o").glob("shard-*"))


def test_empty_answers_and_single_token_answers_are_rejected(images, tiny_dir, tmp_path, monkeypatch):
    import qzoom_swift.labels.attention as attention

    dataset = _write_jsonl(tmp_path / "d.jsonl", images[1][:2])
    short = run_pseudo_labels(_options(tiny_dir("llava"), dataset, tmp_path / "short", max_new_tokens=1))
    assert short["rejects_by_reason"] == {"no_decode_step": 2}
    assert "--max-new-tokens" in _rows(tmp_path / "short" / "rejects.jsonl")[0]["detail"]

    real = attention.generate_with_attention

    def eos_first(model, inputs, layers, norm_layers, eos_ids, max_new_tokens=128, **kw):
        new, samples = real(model, inputs, layers, norm_layers, eos_ids, max_new_tokens, **kw)
        new[0] = eos_ids[0]  # the first record answers nothing
        return new, samples

    monkeypatch.setattr(attention, "generate_with_attention", eos_first)
    summary = run_pseudo_labels(_options(tiny_dir("llava"), dataset, tmp_path / "empty", batch_size=2))
    assert summary["rejects_by_reason"] == {"empty_answer": 1}
    assert summary["outcomes"]["labelled"] + summary["ignored"] == 1


def test_known_head_table_and_sink_heads_are_used_when_given(images, tiny_dir, tmp_path):
    dataset = _write_jsonl(tmp_path / "d.jsonl", images[1][:2])
    out = tmp_path / "o"
    summary = run_pseudo_labels(_options(tiny_dir("qwen3_vl"), dataset, out, heads="4:0,2;5", sink_heads="1:3",
                                         sink="heads", sink_threshold=1e-3))
    job = json.loads((out / "job.json").read_text())
    assert job["head_selection"] == {"grounding": {"4": [0, 2], "5": None}, "sink": {"1": [3]},
                                     "sink_threshold": 0.001, "source": "custom"}
    assert summary["sink_filter"] == "heads"
    for r in _shard_records(out):
        sink = torch.tensor(r["qzoom_sink_attn"])
        assert sink.shape == tuple(r["qzoom_attn_grid"]) and r["qzoom_sink_tokens"] == int((sink >= 1e-3).sum())
    with pytest.raises(JobError, match="decoder layers"):
        run_pseudo_labels(_options(tiny_dir("qwen3_vl"), dataset, tmp_path / "bad", heads="40:1"))
    with pytest.raises(JobError, match="--queries 'prompt': choose from answer, answer\\+prompt"):
        run_pseudo_labels(_options(tiny_dir("qwen3_vl"), dataset, tmp_path / "bad", queries="prompt"))


def test_visualize_writes_a_png_of_the_expected_size(mixed_job, tmp_path):
    from qzoom_swift.cli import main

    _, out, _, _ = mixed_job
    png = tmp_path / "viz" / "rec.png"
    assert main(["visualize", "--shard", str(out / "shard-00000.jsonl"), "--index", "1", "--out", str(png),
                 "--dpi", "50"]) == 0
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (600, 200)  # 3 panels of 4 x 4 inches at 50 dpi
        assert len(set(im.convert("RGB").getdata())) > 50  # an image was drawn, not a blank canvas


# ------------------------------------------------------------------------------------- kill and resume


def _complete_lines(out: Path) -> int:
    n = 0
    for path in list(out.glob("shard-*.jsonl")) + [out / "rejects.jsonl"]:
        if path.is_file():
            n += path.read_bytes().count(b"\n")
    return n


def test_kill_and_resume_gives_every_record_exactly_once_and_the_same_content(images, tiny_dir, tmp_path):
    root, rows, _ = images
    records = rows[:6] + [{"messages": rows[0]["messages"], "images": [str(root / "gone.png")]}] + rows[6:11]
    dataset = _write_jsonl(tmp_path / "data.jsonl", records)  # 12 records, one of them rejected
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "qzoom_swift.cli", "pseudo-labels", "--model", str(tiny_dir("qwen2_5_vl")),
                "--dataset", str(dataset), "--out", str(out), "--max-new-tokens", "16", "--batch-size", "2",
                "--shard-size", "5", "--calibration", "3", "--no-progress", *FIT_ARGS]

    killed, reference = tmp_path / "killed", tmp_path / "reference"
    ref_proc = subprocess.Popen(cmd(reference), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and _complete_lines(killed) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job finished before it could be killed"
    done_at_kill = _complete_lines(killed)
    assert 3 <= done_at_kill < 12
    # a crash in mid-write leaves a torn line: simulate one on top of the kill
    shards = sorted(killed.glob("shard-*.jsonl"))
    with open(shards[-1], "a") as f:
        f.write('{"qzoom_id": "99-deadbeef", "qzoom_status": "ok", "messa')

    resumed = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert ref_proc.wait(timeout=300) == 0, ref_proc.stdout.read().decode(errors="replace")[-3000:]

    summary = json.loads((killed / "summary.json").read_text())
    assert summary["this_run"]["resumed_from"] == done_at_kill
    assert summary["this_run"]["processed"] == 12 - done_at_kill
    got, want = _shard_records(killed), _shard_records(reference)
    ids = [r["qzoom_id"] for r in got]
    assert len(ids) == len(set(ids)) == 11  # no duplicates
    assert ids == [r["qzoom_id"] for r in want]  # no gaps, same order
    assert got == want  # same content as the uninterrupted run
    assert _rows(killed / "rejects.jsonl") == _rows(reference / "rejects.jsonl")
    assert len(_rows(killed / "rejects.jsonl")) == 1
    assert all(len(_rows(p)) <= 5 for p in killed.glob("shard-*.jsonl"))
    assert summary["outcomes"] == json.loads((reference / "summary.json").read_text())["outcomes"]

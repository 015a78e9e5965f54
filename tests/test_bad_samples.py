"""Issue 29: one bad sample fails alone — CPU allocation failures are ``out_of_memory`` (item 4), a corrupt
benchmark sample is scored as failed while the run goes on (item 2), and under a real memory limit
(``ulimit -v``) a sample too large to fit is rejected, the others kept, and a resume does not retry it (item 9).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from qzoom_swift.failures import OOM_REASON, is_out_of_memory


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the real exception is the point
        return exc
    raise AssertionError("expected the allocation to fail")


# ------------------------------------------------------------------- item 4: CPU allocation failure = out_of_memory


def test_real_cpu_allocation_failures_are_out_of_memory():
    torch_cpu = _raised(lambda: torch.empty(2**42, dtype=torch.uint8))  # 4 TiB: torch's CPU allocator refuses
    assert type(torch_cpu) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(torch_cpu)
    numpy_cpu = _raised(lambda: np.empty(2**46, dtype=np.uint8))
    assert isinstance(numpy_cpu, MemoryError)
    for exc in (torch_cpu, numpy_cpu, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB"),
                MemoryError(), RuntimeError("not enough memory: you tried to allocate 1 GB")):
        assert is_out_of_memory(exc), exc
    for exc in (ValueError("image bytes are not a readable image"), RuntimeError("shape mismatch [3, 4] vs [4]"),
                KeyError("memory")):
        assert not is_out_of_memory(exc), exc


def test_labelling_records_a_cpu_allocation_failure_as_out_of_memory(tiny_dir, tmp_path, monkeypatch):
    """The model's forward on one record hits torch's real CPU allocator failure: rejected as out_of_memory."""
    import qzoom_swift.labels.attention as attention
    from qzoom_swift.labels.pseudo import PseudoLabelOptions, run_pseudo_labels
    from qzoom_swift.synthetic.images import write_shape_dataset

    rows = [json.loads(line) for line in write_shape_dataset(tmp_path / "img", n=3, seed=3).read_text().splitlines()]
    rows[1] = {**rows[1], "messages": [{"role": "user", "content": "<image>Which colour? " + "please " * 300},
                                       *rows[1]["messages"][1:]]}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = attention.generate_with_attention

    def allocating(model, inputs, *args, **kwargs):
        if inputs["input_ids"].shape[1] > 250:  # the long record: its activations do not fit this "machine"
            torch.empty(2**42, dtype=torch.uint8)
        return real(model, inputs, *args, **kwargs)

    monkeypatch.setattr(attention, "generate_with_attention", allocating)
    out = tmp_path / "out"
    summary = run_pseudo_labels(PseudoLabelOptions(
        model=str(tiny_dir("qwen2_5_vl")), dataset=str(data), out=str(out), max_new_tokens=4, progress=False,
        calibration=2, max_tokens=64, tau_fg=0.9, tau_bg=0.8, max_box_fraction=0.9, batch_size=2))
    rejects = _lines(out / "rejects.jsonl")
    assert [(r["index"], r["reason"]) for r in rejects] == [(1, OOM_REASON)]
    assert "DefaultCPUAllocator" in rejects[0]["detail"]
    labelled = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in _lines(shard)]
    assert sorted(int(r["qzoom_id"].split("-")[0]) for r in labelled) == [0, 2]
    assert summary["complete"]

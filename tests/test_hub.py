"""``--checkpoint`` as a hub id: downloaded through ms-swift's helper, and a clear error naming it offline."""

from __future__ import annotations

import pytest

from qzoom_swift.cli import main
from qzoom_swift.hub import CheckpointNotFoundError, looks_like_hub_id, resolve_checkpoint


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id("someone/qzoom-qwen2_5_vl-7b") and looks_like_hub_id("Org.x/name.v1")
    for local in ("runs/stage1", "runs/stage1/train/last-checkpoint", "./a/b", "/abs/path", "plain", "~/x/y"):
        assert not looks_like_hub_id(local), local
    assert resolve_checkpoint(tmp_path / "runs") == tmp_path / "runs"  # an existing folder is itself
    with pytest.raises(CheckpointNotFoundError, match="runs/typo does not exist"):
        resolve_checkpoint("runs/typo")  # a path typo is not sent to the hub


def test_hub_id_goes_through_swift_download_helper(tiny_dir, tmp_path, monkeypatch):
    import swift.utils
    from transformers import AutoModelForImageTextToText

    from qzoom_swift import QZoomModel
    from qzoom_swift.branches import attach_branches
    from qzoom_swift.checkpoint import save_branch_checkpoint
    from qzoom_swift.config import QZoomConfig

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir("qwen2_5_vl"))
    attach_branches(model, QZoomConfig(tau_gate=0.42))
    snapshot = save_branch_checkpoint(model, tmp_path / "hub-snapshot")
    asked = []
    monkeypatch.setattr(swift.utils, "safe_snapshot_download", lambda model_id: asked.append(model_id) or str(snapshot))
    qz = QZoomModel.from_pretrained(tiny_dir("qwen2_5_vl"), checkpoint="someone/qzoom-tiny")
    assert asked == ["someone/qzoom-tiny"] and qz.config.tau_gate == 0.42


def test_offline_hub_id_fails_with_a_message_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("USE_HF", "1")  # the Hugging Face hub, offline in the tests (HF_HUB_OFFLINE=1): fails at once
    rc = main(["export-onnx", "--checkpoint", "nobody-qzoom/missing-ckpt", "--model", str(tmp_path / "m"),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "checkpoint 'nobody-qzoom/missing-ckpt' is not a local folder and could not be downloaded" in err
    assert "--checkpoint DIR" in err and not (tmp_path / "out").exists()

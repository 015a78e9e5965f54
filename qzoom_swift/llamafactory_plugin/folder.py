"""LLaMA-Factory model folders with the Q-Zoom branches, and the branch conversion both ways.

``write_model_folder`` turns a base model folder into one ``llamafactory-cli`` loads as is: the base config with
``auto_map`` naming a small remote-code class (``modeling_qzoom.py``, see ``modeling.py``), ``qzoom_config`` and
``qzoom_train``; the base weights linked, not copied; the branch tensors in ``qzoom_branch.safetensors`` under
their full names, listed with the base tensors in the weight index. The branches are fresh copies of the base
layers B..B+R-1, or a branch checkpoint's (``--checkpoint``: the plugin's format -> LLaMA-Factory).

``branches_from_lf_checkpoint`` goes back: a LLaMA-Factory checkpoint (the full model) -> the plugin's branch
checkpoint (``qzoom_branch.safetensors`` relative names + ``qzoom_config.json`` + ``args.json``), which
``swift infer --adapters``, ``qzoom export-onnx`` and ``QZoomModel`` take.

Only the standard library is imported at module level: the ``qzoom`` CLI imports this for its arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

AUTO_CLASS = "AutoModelForImageTextToText"
MODULE_NAME = "modeling_qzoom"
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
LINKED_SINGLE = "model-base.safetensors"
"""The name a single-file base's weights are linked under: transformers reads ``model.safetensors`` before the
index, so the base file must not keep that name in a folder whose index also lists the branch file."""
FOLDER_BRANCH_FILE = "qzoom_branch.safetensors"
BRANCH_PREFIX = "qzoom_branch."
SKIPPED = {"config.json", WEIGHTS_INDEX, f"{MODULE_NAME}.py", "README.md", "trainer_state.json", "training_args.bin",
           "all_results.json", "train_results.json", "optimizer.pt", "scheduler.pt"}
"""Files of a base (or of a LLaMA-Factory checkpoint used as a base) never linked into a new folder."""

MODULE_TEMPLATE = '''"""Q-Zoom for LLaMA-Factory: {stock} with the gate and the SD-RPN (written by `qzoom lf-model`).

The class lives in qzoom_swift (pip install qzoom_swift[llamafactory]); this file only names it for
`trust_remote_code`, and register_for_auto_class makes every checkpoint LLaMA-Factory saves keep this file.
"""

from transformers import {stock}

from qzoom_swift.llamafactory_plugin.generation import QZoomGenerationMixin
from qzoom_swift.llamafactory_plugin.modeling import QZoomLFModelMixin


class {cls}(QZoomGenerationMixin, QZoomLFModelMixin, {stock}):
    pass


{cls}.register_for_auto_class("{auto}")
'''


class ModelFolderError(ValueError):
    """A base, checkpoint or output folder that cannot make a LLaMA-Factory Q-Zoom folder."""


def class_name(stock: str) -> str:
    return f"QZoom{stock}"


def module_source(stock: str) -> str:
    """``modeling_qzoom.py`` for the stock class ``stock`` (e.g. ``Qwen2_5_VLForConditionalGeneration``)."""
    return MODULE_TEMPLATE.format(stock=stock, cls=class_name(stock), auto=AUTO_CLASS)


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no config.json: pass a Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def weight_files(folder: Path) -> dict[str, str]:
    """tensor name -> file name (relative to ``folder``) of a safetensors model folder."""
    index = folder / WEIGHTS_INDEX
    if (folder / SINGLE_WEIGHTS).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE_WEIGHTS), framework="pt") as f:
            return {key: SINGLE_WEIGHTS for key in f.keys()}
    if index.is_file():
        return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    raise ModelFolderError(f"{folder} has neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX}: qzoom lf-model needs "
                           "safetensors weights (convert .bin weights by loading and save_pretrained first)")


def read_folder_tensors(folder: Path, prefix: str) -> dict[str, Any]:
    """Every tensor of a model folder whose name starts with ``prefix`` (read from the files, no model built)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for key, name in weight_files(folder).items():
        if key.startswith(prefix):
            by_file.setdefault(name, []).append(key)
    out = {}
    for name, keys in by_file.items():
        with safe_open(str(folder / name), framework="pt") as f:
            out.update({key: f.get_tensor(key) for key in keys})
    return out


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ModelFolderError(f"--out {out} exists and is not empty: choose another folder or pass --force to "
                               "replace it")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished temporary folder to ``out`` (replacing an old one only now, when all is written)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _load_base(base: Path):
    """The stock model of ``base`` at its own dtype (the branches are saved in it), on the CPU."""
    from transformers import AutoModelForImageTextToText

    from qzoom_swift.fileio import quiet_transformers

    quiet_transformers()
    try:
        return AutoModelForImageTextToText.from_pretrained(str(base), dtype="auto", trust_remote_code=False).eval()
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"cannot load the base model {base}: {exc}") from exc


def _branches_for(model, checkpoint: Path | None, train: tuple[str, ...], overrides: dict | None):
    from qzoom_swift.branches import attach_branches, copy_gate_layers, mark_trained_branches
    from qzoom_swift.checkpoint import load_branch_checkpoint
    from qzoom_swift.config import QZoomConfig

    if checkpoint is None:
        branches = attach_branches(model, QZoomConfig().with_overrides(overrides))
        mark_trained_branches(model, ())
        return branches
    cfg = load_branch_checkpoint(model, checkpoint, overrides)
    if "gate" in train and "gate" not in cfg.extra.get("trained_branches", []):
        # As the ms-swift tuner does: an untrained gate starts from the model it trains on (stage 3 may run on a
        # Post-SFT model whose layers differ from the ones the checkpoint's gate was copied from).
        copy_gate_layers(model)
    return model.qzoom_branch


def write_model_folder(base_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       checkpoint: str | os.PathLike | None = None, train: str | None = None,
                       qzoom_overrides: dict | None = None, force: bool = False) -> Path:
    """Write the LLaMA-Factory Q-Zoom folder of ``base_dir`` into ``out_dir`` (atomically) and return it.

    ``checkpoint``: a branch checkpoint to take the branches from (else fresh copies of layers B..B+R-1);
    ``train``: "rpn" (stage 1), "gate" (stage 3), "rpn,gate" or None (stage 2 / inference);
    ``qzoom_overrides``: QZoomConfig fields (shape fields such as branch_layer only without a checkpoint).
    """
    from safetensors.torch import save_file

    from qzoom_swift.llamafactory_plugin.modeling import (
        QZOOM_BASE_KEY,
        QZOOM_CONFIG_KEY,
        QZOOM_TRAIN_KEY,
        parse_train,
    )

    base, out = Path(base_dir).resolve(), Path(out_dir).absolute()
    which = parse_train(train)
    _prepare_out(out, force)
    config = read_config(base)
    files = weight_files(base)
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise ModelFolderError(f"--checkpoint {checkpoint} is not a folder: pass a Q-Zoom branch checkpoint "
                               "(qzoom_branch.safetensors + qzoom_config.json; `qzoom lf-branches` writes one)")
    model = _load_base(base)
    try:
        branches = _branches_for(model, Path(checkpoint) if checkpoint is not None else None, which, qzoom_overrides)
    except ValueError as exc:
        raise ModelFolderError(str(exc)) from exc
    stock = type(model).__name__
    tensors = {BRANCH_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in branches.state_dict().items()}
    cfg_dict = json.loads(json.dumps(branches.qzoom_config.to_dict()))
    own = {k for k in files if k.startswith(BRANCH_PREFIX)}  # a Q-Zoom folder used as a base (e.g. after stage 2)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map: dict[str, str] = {}
        for name in sorted(set(files.values())):
            keys = [k for k, f in files.items() if f == name and k not in own]
            if not keys:  # a Q-Zoom base's own branch file
                continue
            target = LINKED_SINGLE if name == SINGLE_WEIGHTS else name
            if any(f == name for k, f in files.items() if k in own):
                _copy_without(base / name, tmp / target, keys)  # drop the old branch tensors, keep the rest
            else:
                os.symlink(base / name, tmp / target)
            weight_map.update({k: target for k in keys})
        save_file(tensors, str(tmp / FOLDER_BRANCH_FILE), metadata={"format": "pt"})
        weight_map.update({k: FOLDER_BRANCH_FILE for k in tensors})
        size = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": size},
                                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        for src in sorted(base.iterdir()):
            if src.is_file() and src.name not in SKIPPED and src.name not in files.values() \
                    and not src.name.startswith(("rng_state", "model.safetensors")) and src.suffix not in (".bin", ".pt"):
                os.symlink(src.resolve(), tmp / src.name)
        for key in ("auto_map", QZOOM_CONFIG_KEY, QZOOM_TRAIN_KEY, QZOOM_BASE_KEY):
            config.pop(key, None)
        config["auto_map"] = {AUTO_CLASS: f"{MODULE_NAME}.{class_name(stock)}"}
        config[QZOOM_CONFIG_KEY] = cfg_dict
        config[QZOOM_TRAIN_KEY] = ",".join(which) or None
        config[QZOOM_BASE_KEY] = str(base)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / f"{MODULE_NAME}.py").write_text(module_source(stock))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_without(src: Path, dst: Path, keys: list[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata() or {"format": "pt"}
        save_file({k: f.get_tensor(k) for k in keys}, str(dst), metadata=meta)


def branches_from_lf_checkpoint(lf_checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                                base_model: str | None = None, force: bool = False) -> Path:
    """A LLaMA-Factory checkpoint of a Q-Zoom folder -> the plugin's branch checkpoint in ``out_dir``.

    Reads only the ``qzoom_branch.*`` tensors and ``config.json`` (no model is built, so a 7B checkpoint converts in
    seconds). The branch named by ``qzoom_train`` is added to the config's record of trained branches.
    """
    from types import SimpleNamespace

    from qzoom_swift.checkpoint import read_branch_tensors, save_branch_checkpoint
    from qzoom_swift.config import BRANCH_NAMES, BRANCH_WEIGHTS_NAME, QZoomConfig
    from qzoom_swift.llamafactory_plugin.modeling import (
        QZOOM_BASE_KEY,
        QZOOM_CONFIG_KEY,
        QZOOM_TRAIN_KEY,
        parse_train,
    )
    from qzoom_swift.model import write_swift_adapter_args

    src, out = Path(lf_checkpoint), Path(out_dir).absolute()
    config = read_config(src)
    if not isinstance(config.get(QZOOM_CONFIG_KEY), dict):
        raise ModelFolderError(f"{src}/config.json has no {QZOOM_CONFIG_KEY}: pass a checkpoint LLaMA-Factory saved "
                               "while training a `qzoom lf-model` folder")
    _prepare_out(out, force)
    cfg = QZoomConfig.from_dict(config[QZOOM_CONFIG_KEY])
    history = list(cfg.extra.get("trained_branches", []))
    cfg.extra["trained_branches"] = history + [b for b in parse_train(config.get(QZOOM_TRAIN_KEY)) if b not in history]
    state = read_folder_tensors(src, BRANCH_PREFIX)
    if not state:
        raise ModelFolderError(f"{src} holds no {BRANCH_PREFIX}* tensors: not a checkpoint of a Q-Zoom folder")
    base = base_model or config.get(QZOOM_BASE_KEY)
    # save_branch_checkpoint reads the branches' config and name from a model; a stand-in avoids building one.
    view = SimpleNamespace(qzoom_branch=SimpleNamespace(qzoom_config=cfg), config=SimpleNamespace(_name_or_path=base))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_branch_checkpoint(view, tmp, BRANCH_NAMES, state_dict=state)
        read_branch_tensors(tmp / BRANCH_WEIGHTS_NAME)  # every tensor finite, the file readable
        write_swift_adapter_args(tmp, cfg.family, base)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------------- commands

LF_MODEL_HELP = "write a LLaMA-Factory model folder: a base model with the Q-Zoom branches (llamafactory-cli loads it)"
LF_MODEL_DESCRIPTION = (
    "Write DIR, a model folder `llamafactory-cli train/chat/api` loads with `trust_remote_code: true`: BASE's config "
    "with auto_map naming a Q-Zoom class (modeling_qzoom.py), the branch settings (qzoom_config) and the branch to "
    "train (qzoom_train); BASE's weights linked, the branches in qzoom_branch.safetensors. The branches are fresh "
    "copies of BASE's layers B..B+R-1, or --checkpoint's (a branch checkpoint from `swift sft --tuner_type qzoom` "
    "or `qzoom lf-branches`). --train gate with a checkpoint whose gate never trained copies the gate from BASE "
    "(stage 3 starts from the model it trains on). Train with finetuning_type full and the three freeze_* flags: "
    "the folder's class freezes all but the --train branch (recipes: `qzoom recipes llamafactory`)."
)
LF_BRANCHES_HELP = "convert a LLaMA-Factory checkpoint of a Q-Zoom folder into a branch checkpoint (swift, ONNX, QZoomModel)"
LF_BRANCHES_DESCRIPTION = (
    "LLaMA-Factory saves the full model; this writes its branches as the plugin's branch checkpoint into DIR "
    "(qzoom_branch.safetensors, qzoom_config.json, args.json), which `swift infer --adapters DIR`, `qzoom export-onnx "
    "--checkpoint DIR`, `QZoomModel.from_pretrained(BASE, checkpoint=DIR)` and `qzoom lf-model BASE --checkpoint DIR` "
    "take. No model is loaded."
)


def lf_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="the base model folder (a Hugging Face folder with safetensors weights)")
    p.add_argument("--out", required=True, type=Path, help="the model folder to write (must be empty unless --force)")
    p.add_argument("--checkpoint", default=None,
                   help="a branch checkpoint to take the branches from (default: fresh copies of the base layers)")
    p.add_argument("--train", choices=("rpn", "gate", "rpn,gate"), default=None, metavar="BRANCH",
                   help="the branch llamafactory-cli trains: rpn (stage 1), gate (stage 3) or rpn,gate; omit for "
                        "stage 2 and inference (every branch frozen)")
    p.add_argument("--branch-layer", type=int, default=None, help="B (fresh branches only; default: the model's)")
    p.add_argument("--branch-depth", type=int, default=None, help="R (fresh branches only; default 3)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def lf_model_run(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("branch_layer", args.branch_layer), ("branch_depth", args.branch_depth))
                 if v is not None}
    if overrides and args.checkpoint:
        print("qzoom lf-model: error: --branch-layer/--branch-depth set the shape of fresh branches; a --checkpoint "
              "brings its own", file=sys.stderr)
        return 2
    try:
        out = write_model_folder(args.base, args.out, checkpoint=args.checkpoint, train=args.train,
                                 qzoom_overrides=overrides or None, force=args.force)
    except (ModelFolderError, ValueError) as exc:
        print(f"qzoom lf-model: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def lf_branches_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("lf_checkpoint", help="a folder LLaMA-Factory saved (output_dir or output_dir/checkpoint-N)")
    p.add_argument("--out", required=True, type=Path, help="the branch checkpoint folder to write")
    p.add_argument("--base", default=None,
                   help="the base model to record in args.json (default: the one the Q-Zoom folder was written from)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def lf_branches_run(args: argparse.Namespace) -> int:
    try:
        out = branches_from_lf_checkpoint(args.lf_checkpoint, args.out, base_model=args.base, force=args.force)
    except (ModelFolderError, ValueError) as exc:
        print(f"qzoom lf-branches: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0

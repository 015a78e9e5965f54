"""``--tuner_type qzoom``: train one branch, freeze everything else, save only the branch file.

Which branch comes from ``QZOOM_TRAIN`` (``rpn`` for stage 1, ``gate`` for stage 3, ``rpn,gate`` for
both), set in a recipe's ``ENV:`` block or with ``--model_kwargs '{"QZOOM_TRAIN": "gate"}'``.
"""

from __future__ import annotations

from pathlib import Path

from swift.tuner_plugin import Tuner, tuners_map

from qzoom_swift.branches import BRANCH_NAMES, branch_parameters, copy_gate_layers, require_branches
from qzoom_swift.checkpoint import is_branch_checkpoint, load_branch_checkpoint, save_branch_checkpoint
from qzoom_swift.config import read_env
from qzoom_swift.families.registry import FAMILIES
from qzoom_swift.swift_plugin.models import check_router
from qzoom_swift.training import install_branch_training_forward, set_trained_branches, trained_branches

TUNER_NAME = "qzoom"


def branches_to_train(environ=None) -> tuple[str, ...]:
    """The branches ``QZOOM_TRAIN`` names (parsed by ``config.read_env``); an error naming the fix when unset."""
    which = read_env(environ).train
    if not which:
        raise ValueError(
            "--tuner_type qzoom needs QZOOM_TRAIN: 'rpn' (stage 1), 'gate' (stage 3) or 'rpn,gate'; set it in the "
            "recipe's ENV block, the environment, or --model_kwargs '{\"QZOOM_TRAIN\": \"gate\"}'"
        )
    return which


def prepare_branch_training(model, which: tuple[str, ...]):
    """Freeze the model, unfreeze the selected branch(es) and route ``model(**batch)`` to the branch loss."""
    require_branches(model)
    model.requires_grad_(False)
    for _, param in branch_parameters(model, which):
        param.requires_grad_(True)
    set_trained_branches(model, which)
    install_branch_training_forward(model)
    # The branch loss is a per-batch mean: let the trainer average it over accumulation steps.
    model.accepts_loss_kwargs = False
    return model


class QZoomTuner(Tuner):
    @staticmethod
    def prepare_model(args, model):
        if getattr(model, "qzoom_branch", None) is None:
            model_types = ", ".join(spec.qzoom_model_type for spec in FAMILIES.values())
            raise ValueError(
                f"--tuner_type qzoom needs a Q-Zoom model type (one of {model_types}), "
                f"got model_type {getattr(args, 'model_type', None)!r}"
            )
        return prepare_branch_training(model, branches_to_train())

    @staticmethod
    def save_pretrained(model, save_directory, state_dict=None, safe_serialization=True, **kwargs):
        config = require_branches(model).qzoom_config
        history = list(config.extra.get("trained_branches", []))
        history += [name for name in trained_branches(model) or () if name not in history]
        config.extra["trained_branches"] = history  # what has been trained, across stages
        save_branch_checkpoint(model, save_directory, BRANCH_NAMES, state_dict=state_dict)

    @staticmethod
    def from_pretrained(model, model_id, **kwargs):
        """Load a branch checkpoint (``--adapters`` / resume); training the gate, start it from this model.

        A checkpoint whose gate never trained (stage 1) holds copies of the layers of the model stage 1 ran on;
        stage 3 runs on the Post-SFT model, so its gate is copied from this model's layers instead, whatever
        checkpoint supplies the RPN. A gate that has trained (a resumed stage 3) is kept.

        ms-swift loads every ``--adapters`` entry with the tuner of the first one, so a PEFT (LoRA) adapter
        listed after a branch checkpoint arrives here: it is handed to ms-swift's own loader, which makes
        ``--adapters BRANCH_CKPT LORA_DIR`` serve an unmerged Post-SFT LoRA with the branches.
        """
        if is_peft_adapter(model_id):
            return load_peft_adapter(model, model_id, **kwargs)
        config = load_branch_checkpoint(model, model_id)
        if kwargs.get("is_trainable"):
            which = branches_to_train()
            if "gate" in which and "gate" not in config.extra.get("trained_branches", []):
                copy_gate_layers(model)
            prepare_branch_training(model, which)
        else:
            check_router(model)  # inference (--adapters): the router must fit these branches before serving
        return model


def is_peft_adapter(path) -> bool:
    """A PEFT adapter folder (LoRA from ``swift sft --tuner_type lora``), not a Q-Zoom branch checkpoint."""
    return (Path(path) / "adapter_config.json").is_file() and not is_branch_checkpoint(path)


def load_peft_adapter(model, adapter_dir, **kwargs):
    """Apply a LoRA on top of a model whose branches are loaded; the branches stay outside the adapter.

    Training with ``--tuner_type qzoom`` freezes every base weight, so a LoRA here can only serve inference.
    """
    from swift.tuners import Swift

    if kwargs.get("is_trainable"):
        raise ValueError(f"{adapter_dir} is a LoRA adapter: --tuner_type qzoom trains branches only; merge the LoRA "
                         "first (swift export --adapters LORA_DIR --merge_lora true) and train on the merged model")
    return Swift.from_pretrained(model, str(adapter_dir))


def register_tuner() -> None:
    tuners_map[TUNER_NAME] = QZoomTuner

"""The causal-LM trainer, aware that a Q-Zoom branch checkpoint holds no model weights.

On ``--resume_from_checkpoint`` ms-swift first lets the ``qzoom`` tuner load the branches, then the HF
Trainer looks for model weights in the same directory and refuses a directory without them. For a
branch checkpoint that second load has nothing to do; everything else is the stock trainer.
"""

from __future__ import annotations

from swift.trainers import Seq2SeqTrainer

from qzoom_swift.checkpoint import is_branch_checkpoint

STOCK_TRAINER = "swift.trainers.Seq2SeqTrainer"


class QZoomSeq2SeqTrainer(Seq2SeqTrainer):
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_branch_checkpoint(resume_from_checkpoint):
            return  # already loaded by the qzoom tuner (QZoomTuner.from_pretrained)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save(self, output_dir=None, state_dict=None):
        record_train_samples(self.accelerator.unwrap_model(self.model), self.train_dataset)
        return super()._save(output_dir, state_dict)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and is_branch_checkpoint(best):
            from qzoom_swift.checkpoint import load_branch_checkpoint

            load_branch_checkpoint(self.accelerator.unwrap_model(self.model), best)
            return
        return super()._load_best_model()


def record_train_samples(model, dataset) -> None:
    """``extra["train_samples"][branch]``: the rows each branch trained on, for the checkpoint's model card.

    Kept across stages like ``trained_branches``; unknown for a streaming dataset (no length), then unset.
    """
    from qzoom_swift.branches import get_branches
    from qzoom_swift.training import trained_branches

    branches, which = get_branches(model), trained_branches(model)
    if branches is None or not which or dataset is None:
        return
    try:
        n = len(dataset)
    except TypeError:
        return
    samples = dict(branches.qzoom_config.extra.get("train_samples") or {})
    samples.update({name: int(n) for name in which})
    branches.qzoom_config.extra["train_samples"] = samples


def register_trainer() -> None:
    from swift.trainers.trainer_factory import TrainerFactory

    current = TrainerFactory.TRAINER_MAPPING.get("causal_lm")
    if current in (STOCK_TRAINER, f"{__name__}.QZoomSeq2SeqTrainer"):
        TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{__name__}.QZoomSeq2SeqTrainer"

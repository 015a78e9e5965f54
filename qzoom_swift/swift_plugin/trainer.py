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

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if best and is_branch_checkpoint(best):
            from qzoom_swift.checkpoint import load_branch_checkpoint

            load_branch_checkpoint(self.accelerator.unwrap_model(self.model), best)
            return
        return super()._load_best_model()


def register_trainer() -> None:
    from swift.trainers.trainer_factory import TrainerFactory

    current = TrainerFactory.TRAINER_MAPPING.get("causal_lm")
    if current in (STOCK_TRAINER, f"{__name__}.QZoomSeq2SeqTrainer"):
        TrainerFactory.TRAINER_MAPPING["causal_lm"] = f"{__name__}.QZoomSeq2SeqTrainer"

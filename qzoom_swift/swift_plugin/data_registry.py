"""ms-swift dataset glue: the ``qzoom_*`` columns that must survive preprocessing, and the stage-3 preprocessor.

``swift sft --dataset .../gate_trajectories.jsonl`` (what ``qzoom gate-labels`` writes: answers per budget and
the ground truth) goes through :class:`GateTrajectoryPreprocessor`, registered for that file name: it applies
the released stage-3 filter, 1:1 easy/transition balance and positive-budget draw at load time, seeded and
configured by ``QZOOM_GATE_*`` (``config.GateSampling``), with the same rule code as the labelling job
(``labels.gate.gate_training_rows``), so the rows equal the job's ``gate_train.jsonl`` export for the same seed.
"""

from __future__ import annotations

QZOOM_COLUMNS = ("qzoom_gate", "qzoom_rpn_labels", "qzoom_roi", "qzoom_pad_square", "qzoom_attn_grid")
"""gate label (0/1); tri-state RPN label map(s) per image; RoI box normalised to the source image; labels made
on the released grid (the template pads the image to a grey square, as labelling did); the labelling grid
[rows, cols] (the template encodes the image at exactly that grid)."""


def register_dataset_keys() -> None:
    from swift.dataset.preprocessor.core import RowPreprocessor

    for key in QZOOM_COLUMNS:
        if key not in RowPreprocessor.standard_keys:
            RowPreprocessor.standard_keys.append(key)


TRAJECTORY_DATASET = "qzoom_gate_trajectories"
"""The registered dataset name; any ``--dataset`` file named ``gate_trajectories.jsonl`` uses it."""


class GateTrajectoryPreprocessor:
    """Trajectory records -> gate training rows (one labelled budget each), when ms-swift loads the dataset.

    The draw is a whole-dataset rule (the 1:1 balance counts every sample), so it runs once over the loaded
    records, not row by row; the rows then go through ms-swift's own ``AutoPreprocessor``, as a
    ``gate_train.jsonl`` file would. Every rank draws the same rows (seeded). Streaming is not supported.
    """

    def __call__(self, dataset, *, num_proc: int = 1, load_from_cache_file: bool = True, strict: bool = False,
                 **kwargs):
        from datasets import Dataset as HfDataset
        from swift.dataset.preprocessor import AutoPreprocessor
        from swift.utils import get_logger

        from qzoom_swift.config import read_env
        from qzoom_swift.labels.gate import gate_training_rows

        if not isinstance(dataset, HfDataset):
            raise ValueError("the Q-Zoom stage-3 preprocessor draws over the whole dataset: use --streaming false")
        sampling = read_env().gate_sampling
        rows, summary = gate_training_rows(dataset.to_list(), sampling)
        get_logger().info(f"qzoom gate trajectories ({sampling}): {summary['kinds']} -> {summary['kept']} rows "
                          f"{summary['labels']}")
        if not rows:
            raise ValueError(f"no gate training rows from {summary['answered']} trajectories {summary['kinds']}: "
                             "every sample was discarded (see QZOOM_GATE_SCORING, the answers and the ground truth)")
        return AutoPreprocessor()(HfDataset.from_list(rows), num_proc=num_proc,
                                  load_from_cache_file=load_from_cache_file, strict=strict, **kwargs)


def register_gate_dataset() -> None:
    """Register the stage-3 preprocessor for files named ``gate_trajectories.jsonl`` (ms-swift's name match)."""
    from swift.dataset import DatasetMeta, register_dataset

    from qzoom_swift.labels.gate_job import TRAJECTORIES_FILE

    register_dataset(DatasetMeta(dataset_name=TRAJECTORY_DATASET, dataset_path=TRAJECTORIES_FILE,
                                 preprocess_func=GateTrajectoryPreprocessor(), tags=["qzoom", "stage3"]),
                     exist_ok=True)

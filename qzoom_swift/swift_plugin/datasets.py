"""Dataset columns that must survive ms-swift's preprocessing to reach the ``qzoom_*`` templates."""

from __future__ import annotations

QZOOM_COLUMNS = ("qzoom_gate", "qzoom_rpn_labels", "qzoom_roi")
"""gate label (0/1); tri-state RPN label map(s) per image; RoI box normalised to the source image."""


def register_dataset_keys() -> None:
    from swift.dataset.preprocessor.core import RowPreprocessor

    for key in QZOOM_COLUMNS:
        if key not in RowPreprocessor.standard_keys:
            RowPreprocessor.standard_keys.append(key)

"""The branch training forward must see the full-length labels even after ms-swift's trainer cut them.

ms-swift's ``prepare_logits_to_keep`` (on by default in ``swift sft``) truncates ``labels`` before the
forward; the branches locate their query token from the labels, so a wrong query token would silently
train the RPN/gate on the wrong token. These tests run ms-swift's own function and undo it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qzoom_swift.training import restore_truncated_labels

X = -100


def _swift_cut(labels: torch.Tensor) -> dict:
    from swift.trainers.mixin import SwiftMixin

    trainer = SimpleNamespace(template=SimpleNamespace(sequence_parallel_size=1),
                              args=SimpleNamespace(tuner_backend="peft"))
    inputs = {"labels": labels.clone()}
    SwiftMixin.prepare_logits_to_keep(trainer, inputs)
    return inputs


def test_restore_after_swift_cut_batch_of_two():
    labels = torch.tensor([[X, X, X, X, X, 7, 8, 9, X, X],
                           [X, X, X, X, X, X, X, 5, 6, X]])
    inputs = _swift_cut(labels)
    assert isinstance(inputs["logits_to_keep"], int) and inputs["labels"].shape == (2, 6)  # really cut
    restored = restore_truncated_labels(inputs["labels"], inputs["logits_to_keep"], labels.shape[1])
    assert torch.equal(restored, labels)


def test_restore_after_swift_cut_batch_of_one_with_gaps():
    labels = torch.tensor([[X, X, X, 4, 5, X, X, 8, X, 10]])  # two assistant turns
    inputs = _swift_cut(labels)
    assert inputs["logits_to_keep"].dtype == torch.bool and inputs["labels"].shape == (1, 5)
    restored = restore_truncated_labels(inputs["labels"], inputs["logits_to_keep"], labels.shape[1])
    assert torch.equal(restored, labels)


def test_restore_is_identity_without_a_cut():
    labels = torch.tensor([[X, 1, 2]])
    assert restore_truncated_labels(labels, None, 3) is labels
    assert restore_truncated_labels(labels, 2, 3) is labels  # already full length
    assert restore_truncated_labels(None, 2, 3) is None


def test_restore_rejects_inconsistent_mask():
    with pytest.raises(ValueError, match="cannot restore labels"):
        restore_truncated_labels(torch.tensor([[X, 1, 2]]), torch.tensor([True, False, False, True]), 4)


def test_query_token_is_the_same_before_and_after_the_cut():
    from qzoom_swift.prefill import query_token_index

    labels = torch.tensor([[X, X, X, X, 3, 4, X], [X, X, X, X, X, 5, 6]])
    inputs = _swift_cut(labels)
    restored = restore_truncated_labels(inputs["labels"], inputs["logits_to_keep"], 7)
    expected = query_token_index(torch.ones(2, 7, dtype=torch.long), labels)
    assert expected.tolist() == [3, 4]
    assert torch.equal(query_token_index(torch.ones(2, 7, dtype=torch.long), restored), expected)

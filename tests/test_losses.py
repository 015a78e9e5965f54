"""The RPN's selective (tri-state) BCE: valid tokens only, one mean over the batch's valid tokens, exact zero."""

from __future__ import annotations

import math

import pytest
import torch

from qzoom_swift.losses import IGNORE_INDEX, binary_accuracy, selective_bce_loss

X = IGNORE_INDEX


def _bce(logit: float, label: int) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -math.log(p) if label == 1 else -math.log(1.0 - p)


def test_only_valid_tokens_count():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]], requires_grad=True)
    labels = torch.tensor([[1, X, 0, X]])
    loss = selective_bce_loss(logits, labels)
    assert loss.item() == pytest_approx((_bce(2.0, 1) + _bce(0.5, 0)) / 2)
    # changing an ignored logit changes nothing, and it gets no gradient
    other = logits.detach().clone()
    other[0, 1], other[0, 3] = 100.0, -100.0
    assert selective_bce_loss(other, labels).item() == loss.item()
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[0, 3] == 0
    assert logits.grad[0, 0] < 0 < logits.grad[0, 2]  # fg pushed up, bg pushed down


def test_mean_is_over_the_valid_tokens_of_the_whole_batch_not_per_sample():
    logits = torch.tensor([[1.0, X, X, X], [0.0, -2.0, 1.5, 0.3]])
    labels = torch.tensor([[1, X, X, X], [0, 1, 1, 0]])
    terms = [_bce(1.0, 1), _bce(0.0, 0), _bce(-2.0, 1), _bce(1.5, 1), _bce(0.3, 0)]
    token_mean = sum(terms) / 5
    sample_mean = (terms[0] + sum(terms[1:]) / 4) / 2
    loss = selective_bce_loss(logits, labels).item()
    assert loss == pytest_approx(token_mean)
    assert abs(loss - sample_mean) > 1e-3  # the two definitions really differ here


def test_empty_batch_gives_an_exact_zero_that_keeps_the_graph():
    logits = torch.tensor([[0.3, -0.7], [1.2, 5.0]], requires_grad=True)
    loss = selective_bce_loss(logits, torch.full((2, 2), X))
    assert loss.item() == 0.0 and loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 2))


def test_labels_on_another_device_dtype_are_accepted_and_loss_is_float32():
    logits = torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)
    loss = selective_bce_loss(logits, torch.tensor([[1, 0]], dtype=torch.int32))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest_approx((_bce(0.0, 1) + _bce(1.0, 0)) / 2)


def test_fg_and_bg_accuracy():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 9.0]])
    labels = torch.tensor([[1, 1, 0, 0, X]])
    assert binary_accuracy(logits, labels, 1).item() == 0.5
    assert binary_accuracy(logits, labels, 0).item() == 0.5
    assert binary_accuracy(logits, labels).item() == 0.5
    assert binary_accuracy(logits, torch.full((1, 5), X)) is None


def pytest_approx(value: float):
    return pytest.approx(value, rel=1e-5, abs=1e-6)

"""The Task objects against hand-computed values: loss, counts, predictions, metrics, scores."""

import math

import pytest
import torch

from swalab.lab.task import TASKS, task_of


def test_classification_by_hand():
    task = task_of("classification")
    logits, y = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]), torch.tensor([1, 0])
    probs = task.outputs(logits)
    assert torch.allclose(probs, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    # mean of -log 0.75 and -log 0.5
    assert task.loss(logits, y).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    assert task.count(y).item() == 2
    result = task.metrics(probs, y)
    assert result["accuracy"] == 100.0 and task.score(result) == 100.0
    assert task.error(probs, torch.tensor([0, 0])) == 50.0
    assert task.probabilistic and task.reliability and task.primary == "accuracy"


def test_node_classification_ignores_padding():
    task = task_of("node_classification")
    logits = torch.tensor(
        [[[0.0, math.log(3.0)], [5.0, -5.0]]]
    )  # one graph, the second node padded
    y = torch.tensor([[1, -1]])
    assert task.loss(logits, y).item() == pytest.approx(math.log(4 / 3))
    assert task.count(y).item() == 1
    assert task.metrics(task.outputs(logits), y)["loss"] == pytest.approx(math.log(4 / 3))
    assert not task.reliability


def test_regression_by_hand():
    task = task_of("regression")
    out, y = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    assert torch.equal(task.outputs(out), out)
    assert task.loss(out, y).item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert task.loss(out, y, reduction="sum").item() == pytest.approx(5.0)
    result = task.metrics(out, y)
    assert result["mse"] == pytest.approx(2.5) and task.score(result) == pytest.approx(-2.5)
    assert task.error(out, y) == pytest.approx(2.5)
    assert not task.probabilistic and task.primary == "mse"


def test_unknown_task_names_the_known_ones():
    assert set(TASKS) == {"classification", "node_classification", "regression"}
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        task_of("ranking")

"""Snapshots written while training: AveragedModel(snapshots=...) and both callbacks' posthoc=."""

from __future__ import annotations

import pytest
import torch
from integration_helpers import assert_all_close, mean, params
from torch import nn

from swalab import AveragedModel
from swalab.posthoc import Snapshots, swa_window


def test_averaged_model_writes_snapshots_at_every_call(tmp_path):
    """The snapshots see every call (the gating is the average's); the window from update_after
    to the end is the average itself."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    averaged = AveragedModel(model, update_after=4, snapshots=Snapshots(tmp_path))
    for step in range(10):
        with torch.no_grad():
            model.weight.add_(torch.randn(2, 3))
        averaged.update_parameters(model, step=step)
    assert [s["step"] for s in averaged.snapshots.index()] == list(range(10))
    window = swa_window(tmp_path, 4, 9)
    torch.testing.assert_close(window["weight"], averaged.module.weight.detach())
    copy = __import__("copy").deepcopy(averaged)  # a copy never writes into the same directory
    assert copy.snapshots is None
    with pytest.raises(ValueError, match=r"^snapshots must be a swalab.posthoc.Snapshots, got 3"):
        AveragedModel(model, snapshots=3)


def test_lightning_callback_posthoc(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from test_integration_lightning import Net, Recorder, _loader, _trainer

    from swalab.integrations.lightning import AveragingCallback

    torch.manual_seed(0)
    recorder = Recorder()
    callback = AveragingCallback(update_after=2, update_bn=False, posthoc=Snapshots(tmp_path))
    _trainer([recorder, callback], epochs=3).fit(Net(), _loader())
    assert len(recorder.steps) == 12
    # any window, e.g. steps 5..9, is the mean of those steps' weights
    state = swa_window(tmp_path, 5, 9)
    net = Net()
    net.load_state_dict(state)
    assert_all_close(params(net), mean(recorder.steps[5:10]))
    net.load_state_dict(swa_window(tmp_path, 2, 11))  # the callback's own average
    assert_all_close(params(net), params(callback.averaged.module))


def test_transformers_callback_posthoc(tmp_path):
    pytest.importorskip("transformers")
    from test_integration_transformers import STEPS, Recorder, _model, _train

    from swalab.integrations.transformers import AveragingCallback

    recorder = Recorder()
    callback = AveragingCallback(posthoc=Snapshots(tmp_path / "snapshots"))
    _train(tmp_path / "out", callback, recorder)
    assert len(recorder.steps) == STEPS
    model = _model()
    model.load_state_dict(swa_window(tmp_path / "snapshots", 3, STEPS - 1))
    assert_all_close(params(model), mean(recorder.steps[3:]))

"""A user's own model and dataset builders: common signatures adapted (torchvision's
``num_classes``), wrong ones refused in one line at config load, before ``--out`` is written."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from swalab.data import load
from swalab.lab.config import ConfigError, load_config
from swalab.models import create, default_options


@pytest.fixture
def mylab(tmp_path, monkeypatch):
    (tmp_path / "mylab_i24.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def no_outputs(in_shape, width=3):
                return nn.Linear(in_shape[0], width)

            def needs_depth(in_shape, num_outputs, depth):
                return nn.Linear(in_shape[0], num_outputs)

            def not_a_module(in_shape, num_outputs):
                return 3

            def pairs(*, root="data", download=False, seed=0):
                x = torch.randn(10, 2)
                return (x, x)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mylab_i24"
    sys.modules.pop("mylab_i24", None)


def test_torchvision_builders_plug_in_as_they_are():
    pytest.importorskip("torchvision")
    model = create("torchvision.models:resnet18", (3, 32, 32), 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert default_options("torchvision.models:resnet18") == {"weights": None, "progress": True}
    cfg = load_config(
        "mnist1d", ["model.name=torchvision.models:resnet18", "model.options={progress: false}"]
    )
    assert cfg.model.name == "torchvision.models:resnet18"


def test_wrong_model_builders_are_one_line_config_errors(mylab, tmp_path):
    for builder, message in [
        ("no_outputs", r"takes neither num_outputs nor num_classes \(its parameters: "),
        ("needs_depth", r"needs \['depth'\] \(no default\)"),
    ]:
        with pytest.raises(ConfigError, match=f"model.name: model '{mylab}:{builder}' {message}"):
            load_config("mnist1d", [f"model.name={mylab}:{builder}"])
    with pytest.raises(ValueError, match="returned a int, not a torch.nn.Module"):
        create(f"{mylab}:not_a_module", (2,), 3)


def test_a_dataset_returning_a_tuple_is_a_one_line_error(mylab):
    with pytest.raises(
        ValueError, match=r"dataset 'mylab_i24:pairs' returned a tuple, not a swalab"
    ):
        load(f"{mylab}:pairs", seed=0)


def test_a_run_of_a_tuple_dataset_stops_before_writing_out(mylab, tmp_path):
    from swalab.lab.runner import run_experiment

    cfg = load_config("mnist1d", [f"data.name={mylab}:pairs", "data.options={}", "seeds=[0]"])
    with pytest.raises(ValueError, match="returned a tuple"):
        run_experiment(cfg, tmp_path / "out", log=lambda _: None, progress=False)
    assert not (tmp_path / "out").exists()

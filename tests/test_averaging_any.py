"""Issue 20, "any module, any subset": models deepcopy cannot copy, subsets of the weights,
EMA half-life, updates from the optimizer's step hook and the exported average."""

import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import swalab


class Symmetric(nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


class WithLock(nn.Module):
    """A module deepcopy refuses (a lock among its attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        with self.lock:
            return self.linear(x)


def reparametrized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm/spectral_norm are deprecated
        if kind == "parametrize":
            parametrize.register_parametrization(model[0], "weight", Symmetric())
        elif kind == "weight_norm (old)":
            torch.nn.utils.weight_norm(model[0])
        elif kind == "weight_norm":
            parametrizations.weight_norm(model[0])
        elif kind == "spectral_norm (old)":
            torch.nn.utils.spectral_norm(model[0])
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(model[0])
        else:
            model[1] = WithLock()
    model(torch.randn(4, 3))  # the old hooks keep the computed weight as an attribute (not a leaf)
    return model


KINDS = [
    "parametrize",
    "weight_norm (old)",
    "weight_norm",
    "spectral_norm (old)",
    "spectral_norm",
    "lock",
]


@pytest.mark.parametrize("kind", KINDS)
def test_models_deepcopy_cannot_copy_are_averaged(kind):
    model = reparametrized(kind)
    averaged = swalab.AveragedModel(model)
    snapshots = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        model.train()
        model(torch.randn(4, 3))  # spectral_norm's power iteration moves its u, v buffers
        averaged.update_parameters(model)
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for name, a in averaged.module.named_parameters():
        expected = sum(s[name] for s in snapshots) / 3
        torch.testing.assert_close(a.detach(), expected, msg=name)
    # The average computes like the model holding the averaged parameters and the same buffers.
    reference = reparametrized(kind)
    reference.load_state_dict(averaged.module.state_dict())
    x = torch.randn(5, 3)
    averaged.eval(), reference.eval()
    torch.testing.assert_close(averaged(x), reference(x))
    assert all(
        a.data_ptr() != p.data_ptr() for a, p in zip(averaged.parameters(), model.parameters())
    )

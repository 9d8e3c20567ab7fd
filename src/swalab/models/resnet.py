"""ResNet-50 (He et al. 2016) from torchvision, for fine-tuning from local ImageNet weights.

Elkoubi & Ein Dor's reimplementation study trains a head on MNIST on top of an ImageNet ResNet-50 and then fine-tunes it;
the SWA paper runs SWA from pretrained torchvision ImageNet models. Nothing is ever downloaded:
``weights`` is the path of a ``state_dict`` saved from ``torchvision.models.resnet50``.

For inputs of at most 64 px the stem is a 3x3 stride-1 convolution with no max-pool (CIFAR style);
the stem takes ``C`` channels from ``in_shape``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from swalab.models.base import MODELS, image_shape

__all__ = ["load_pretrained", "resnet50"]

SMALL_INPUT = 64
"""Inputs with both sides at most this many pixels get the 3x3 stride-1 stem and no max-pool."""

REPLACEABLE = {"conv1.weight", "fc.weight", "fc.bias"}
"""Entries that may differ in shape from the ImageNet weights (new stem, new head)."""


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load the ImageNet ``state_dict`` at ``path`` into ``model``; return the names loaded.

    Every entry must match by name; ``conv1.weight`` and ``fc.*`` are skipped where their shapes
    differ (a replaced stem or head), any other mismatch is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resnet50 weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a torch file, or one holding more than tensors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a torchvision resnet50 state_dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a torchvision resnet50 state_dict (not a dict of tensors)")
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a torchvision resnet50 state_dict: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    loaded = {k: v for k, v in state.items() if v.shape == own[k].shape}
    wrong = sorted(state.keys() - loaded.keys() - REPLACEABLE)
    if wrong:
        raise ValueError(f"{path}: shapes of {wrong[:3]} do not match resnet50")
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded)


@MODELS.register("resnet50")
def resnet50(
    in_shape: tuple[int, ...],
    num_outputs: int,
    weights: str | None = None,
    freeze_backbone: bool = False,
) -> nn.Module:
    """torchvision ResNet-50, small-image stem for <= 64 px, optional local ImageNet weights file.

    Args:
        weights: path of a ``torchvision.models.resnet50`` ``state_dict``; the stem and head are
            loaded only where their shapes match.
        freeze_backbone: train only the head ``fc`` and, where it was replaced, the stem ``conv1``;
            all else is frozen (BatchNorm running statistics still update in train mode).
    """
    from torchvision.models import resnet50 as tv_resnet50

    c, h, w = image_shape("resnet50", in_shape)
    small = max(h, w) <= SMALL_INPUT
    replace_stem = small or c != 3
    model = tv_resnet50(weights=None, num_classes=num_outputs)
    if replace_stem:
        kernel, stride, padding = (3, 1, 1) if small else (7, 2, 3)
        model.conv1 = nn.Conv2d(c, 64, kernel, stride=stride, padding=padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small:
        model.maxpool = nn.Identity()
    if weights is not None:
        load_pretrained(model, weights)
    if freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc.") or (replace_stem and name == "conv1.weight"))
    return model

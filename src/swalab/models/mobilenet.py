"""MobileNetV2 (Sandler et al. 2018) from torchvision, adapted to small images.

For inputs of at most 64 px the stem convolution has stride 1 and the second stage (24 channels)
stride 1, the usual CIFAR adaptation (e.g. kuangliu/pytorch-cifar): total stride 8 instead of 32,
so a 32x32 image reaches the head as 4x4. The stem takes ``C`` channels from ``in_shape``.

The source documents trained a reduced MobileNetV2 on CIFAR-10/100 (their own truncated copy:
32-channel stem, five stages, 216-channel last layer); ``width_mult`` is torchvision's width
multiplier.
"""

from __future__ import annotations

from torch import nn

from swalab.models.base import MODELS, check_positive, image_shape

__all__ = ["mobilenet_v2"]

SMALL_INPUT = 64
"""Inputs with both sides at most this many pixels get the CIFAR strides."""

# torchvision's inverted-residual setting (expansion t, channels c, repeats n, stride s), with the
# second stage at stride 1 for small inputs.
CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


@MODELS.register("mobilenet_v2")
def mobilenet_v2(in_shape: tuple[int, ...], num_outputs: int, width_mult: float = 1.0) -> nn.Module:
    """torchvision MobileNetV2 with CIFAR strides for inputs <= 64 px; option width_mult."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    check_positive("width_mult", width_mult)
    c, h, w = image_shape("mobilenet_v2", in_shape)
    small = max(h, w) <= SMALL_INPUT
    model = tv_mobilenet_v2(
        weights=None,
        num_classes=num_outputs,
        width_mult=float(width_mult),
        inverted_residual_setting=CIFAR_SETTING if small else None,
    )
    stem = model.features[0][0]
    if small or c != 3:
        model.features[0][0] = nn.Conv2d(
            c, stem.out_channels, 3, stride=1 if small else 2, padding=1, bias=False
        )
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model

"""CIFAR VGG-16 as used by the SWA paper (timgaripov/swa ``models/vgg.py``, after torchvision).

Configuration D (13 conv 3x3 + 5 max-pools), then ``Dropout-Linear(512, 512)-ReLU-Dropout-
Linear(512, 512)-ReLU-Linear(512, num_outputs)``. Convolutions are initialised
``N(0, 2 / (k * k * out_channels))`` with zero bias; linear layers keep PyTorch's default.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from swalab.models.base import MODELS, image_shape

__all__ = ["VGG", "vgg16", "vgg16_bn"]

CFG_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                          512, 512, 512, "M", 512, 512, 512, "M"]  # fmt: skip


class VGG(nn.Module):
    """VGG-16 for ``in_shape (C, H, W)``; the head sees ``512 * (H // 32) * (W // 32)`` features."""

    def __init__(
        self, in_shape: tuple[int, int, int], num_outputs: int, batch_norm: bool = False
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for v in CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(c, int(v), kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(512 * (h // 32) * (w // 32), 512),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_outputs),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, num_outputs]``."""
        return self.classifier(self.features(x).flatten(1))


@MODELS.register("vgg16")
def vgg16(in_shape: tuple[int, ...], num_outputs: int) -> VGG:
    """CIFAR VGG-16 of the SWA paper, no BatchNorm (timgaripov/swa); inputs >= 32 px."""
    return VGG(image_shape("vgg16", in_shape, min_size=32), num_outputs)


@MODELS.register("vgg16_bn")
def vgg16_bn(in_shape: tuple[int, ...], num_outputs: int) -> VGG:
    """CIFAR VGG-16 with BatchNorm after each conv (timgaripov/swa VGG16BN); inputs >= 32 px."""
    return VGG(image_shape("vgg16_bn", in_shape, min_size=32), num_outputs, batch_norm=True)

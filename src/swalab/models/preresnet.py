"""CIFAR pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks").

As in timgaripov/swa ``models/preresnet.py``: a 3x3 stem with 16 channels, three stages of
16/32/64 planes (stride 1/2/2), basic blocks for depth 6n+2 < 44 and bottleneck blocks (expansion 4)
for depth 9n+2 >= 44, a final BN-ReLU, global average pooling and a linear head. Shortcuts are 1x1
convolutions where the shape changes. Convolutions are initialised ``N(0, 2 / (k*k*out_channels))``.

Note that by this rule the SWA paper's PreResNet-110 is a bottleneck network (12 blocks per stage,
1.15M parameters), not He et al.'s basic-block ResNet-110 (18 blocks per stage, 1.7M parameters);
``preresnet(depth=110, block="basic")`` builds the latter.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from swalab.models.base import MODELS, check_choice, image_shape

__all__ = ["PreResNet", "preresnet", "preresnet110", "preresnet164"]


class BasicBlock(nn.Module):
    """``BN-ReLU-Conv3x3-BN-ReLU-Conv3x3`` plus the shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class Bottleneck(nn.Module):
    """``BN-ReLU-Conv1x1-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1`` (4x planes out) plus the shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + self.shortcut(x)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class PreResNet(nn.Module):
    """PreResNet-``depth`` for CIFAR-sized images (any size works: the pooling is global)."""

    def __init__(
        self, in_channels: int, num_outputs: int, depth: int = 110, bottleneck: bool = True
    ) -> None:
        super().__init__()
        block: type[BasicBlock] | type[Bottleneck]
        if bottleneck:
            block, n = Bottleneck, (depth - 2) // 9
        else:
            block, n = BasicBlock, (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        stages = []
        for planes, stride in [(16, 1), (32, 2), (64, 2)]:
            blocks = []
            for i in range(n):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, num_outputs]``."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("preresnet")
def preresnet(
    in_shape: tuple[int, ...], num_outputs: int, depth: int = 110, block: str = "auto"
) -> PreResNet:
    """CIFAR PreResNet of any depth: basic blocks (6n+2) or bottlenecks (9n+2; "auto": if >= 44)."""
    check_choice("block", block, ["auto", "basic", "bottleneck"])
    if not isinstance(depth, int) or depth < 8:
        raise ValueError(f"depth must be an int >= 8, got {depth!r}")
    bottleneck = block == "bottleneck" or (block == "auto" and depth >= 44)
    if (depth - 2) % (9 if bottleneck else 6):
        kind = "9n+2 for bottleneck" if bottleneck else "6n+2 for basic"
        raise ValueError(f"depth must be {kind} blocks, got {depth}")
    c, _, _ = image_shape("preresnet", in_shape)
    return PreResNet(c, num_outputs, depth, bottleneck)


@MODELS.register("preresnet110")
def preresnet110(in_shape: tuple[int, ...], num_outputs: int) -> PreResNet:
    """PreResNet-110 of the SWA paper's code: bottleneck blocks, 12 per stage, ~1.15M params."""
    return preresnet(in_shape, num_outputs, depth=110)


@MODELS.register("preresnet164")
def preresnet164(in_shape: tuple[int, ...], num_outputs: int) -> PreResNet:
    """PreResNet-164 of the SWA paper: bottleneck blocks, 18 per stage, ~1.7M params."""
    return preresnet(in_shape, num_outputs, depth=164)

"""Wide ResNet (Zagoruyko & Komodakis 2016) as used by the SWA paper (timgaripov/swa).

Depth 6n+4: a 3x3 stem with 16 channels, three stages of ``n`` pre-activation blocks with
16k/32k/64k channels (stride 1/2/2), each ``BN-ReLU-Conv3x3-Dropout-BN-ReLU-Conv3x3`` (the second
convolution strides) plus a 1x1 shortcut where the shape changes, a final BN-ReLU, global average
pooling and a linear head. As in the reference: convolutions carry biases, PyTorch's default
initialisation, and the final BatchNorm has ``momentum=0.9`` (its running statistics mostly follow
the last batch).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from swalab.models.base import MODELS, check_positive, image_shape

__all__ = ["WideResNet", "wideresnet", "wrn28_10"]


class WideBasic(nn.Module):
    """``BN-ReLU-Conv3x3-Dropout-BN-ReLU-Conv3x3(stride)`` plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for CIFAR-sized images (any size: the pooling is global)."""

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        in_planes = 16
        stages = []
        for width, stride in [(16, 1), (32, 2), (64, 2)]:
            planes = width * widen_factor
            blocks = []
            for i in range(n):
                blocks.append(WideBasic(in_planes, planes, dropout, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn1 = nn.BatchNorm2d(in_planes, momentum=0.9)
        self.linear = nn.Linear(in_planes, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, num_outputs]``."""
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn1(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("wideresnet")
def wideresnet(
    in_shape: tuple[int, ...],
    num_outputs: int,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet of depth 6n+4 and any width (Zagoruyko & Komodakis 2016)."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6n+4 with n >= 1, got {depth!r}")
    check_positive("widen_factor", widen_factor, integer=True)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    c, _, _ = image_shape("wideresnet", in_shape)
    return WideResNet(c, num_outputs, depth, widen_factor, dropout)


@MODELS.register("wrn28_10")
def wrn28_10(in_shape: tuple[int, ...], num_outputs: int, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 of the SWA paper (no dropout there), ~36.5M params."""
    return wideresnet(in_shape, num_outputs, depth=28, widen_factor=10, dropout=dropout)

"""Small convolutional networks: the MNIST-1D reference CNN and the source documents' image CNN."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from swalab.models.base import MODELS, check_positive, image_shape

__all__ = ["MNIST1DCNN", "SmallCNN", "mnist1d_cnn", "small_cnn"]


def _conv1d_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class MNIST1DCNN(nn.Module):
    """MNIST-1D reference CNN (Greydanus 2020, ``ConvBase``): 3 strided Conv1d-ReLU, then Linear.

    ``Conv1d(C->25, k5, s2, p1)``, ``Conv1d(25->25, k3, s2, p1)`` twice, ReLU after each, flatten,
    ``Linear(25 * L', num_outputs)``; for ``(1, 40)`` and 10 classes: L' = 5, 5,210 parameters.
    ``bn`` adds ``BatchNorm1d`` after each convolution (not in the reference).
    """

    def __init__(
        self, in_channels: int, length: int, num_outputs: int, channels: int = 25, bn: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for kernel, c_in in [(5, in_channels), (3, channels), (3, channels)]:
            layers.append(nn.Conv1d(c_in, channels, kernel, stride=2, padding=1))
            if bn:
                layers.append(nn.BatchNorm1d(channels))
            layers.append(nn.ReLU())
            length = _conv1d_length(length, kernel, stride=2, padding=1)
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(channels * length, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, L]`` (or ``[B, L]`` for one channel) -> ``[B, num_outputs]``."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.linear(self.features(x).flatten(1))


@MODELS.register("mnist1d_cnn")
def mnist1d_cnn(in_shape: tuple[int, ...], num_outputs: int, bn: bool = False) -> MNIST1DCNN:
    """MNIST-1D reference CNN, 3 strided Conv1d + Linear, 5,210 params (optional BatchNorm)."""
    if len(in_shape) == 1:
        in_shape = (1, *in_shape)
    if len(in_shape) != 2 or in_shape[1] < 3:
        raise ValueError(f"mnist1d_cnn expects in_shape (C, L) or (L,) with L >= 3, got {in_shape}")
    return MNIST1DCNN(in_shape[0], in_shape[1], num_outputs, bn=bool(bn))


class SmallCNN(nn.Module):
    """The source documents' CNN for MNIST and CIFAR-10 (BayesianML-SWA ``models/cnn.py``).

    ``blocks`` blocks of ``Conv3x3-ReLU-Conv3x3-ReLU-MaxPool2``, each convolution doubling the
    channels (C -> 2C -> 4C -> ... -> C * 4**blocks), a global max-pool, then
    ``Linear(C * 4**blocks, hidden)-ReLU-Linear(hidden, num_outputs)``. The documents used
    ``blocks=3, hidden=32`` on MNIST (1 channel) and CIFAR-10 (3 channels). ``bn`` adds
    ``BatchNorm2d`` after each convolution (not in the documents).
    """

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        blocks: int = 3,
        hidden: int = 32,
        bn: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(blocks):
            for _ in range(2):
                layers.append(nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1))
                if bn:
                    layers.append(nn.BatchNorm2d(2 * channels))
                layers.append(nn.ReLU())
                channels *= 2
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, num_outputs]``."""
        h = F.adaptive_max_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(h)


@MODELS.register("small_cnn")
def small_cnn(
    in_shape: tuple[int, ...], num_outputs: int, blocks: int = 3, hidden: int = 32, bn: bool = False
) -> SmallCNN:
    """Documents' small CNN for MNIST/CIFAR-10: channel-doubling conv blocks, max-pool, MLP head."""
    check_positive("blocks", blocks, integer=True)
    check_positive("hidden", hidden, integer=True)
    c, _, _ = image_shape("small_cnn", in_shape, min_size=2**blocks)
    return SmallCNN(c, num_outputs, blocks, hidden, bool(bn))

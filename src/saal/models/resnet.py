"""The CIFAR-style ResNet-18 of the paper's protocol: 3x3 stem, no max-pool, any input channels."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from saal.models.base import Classifier


class ResNet18(Classifier):
    """torchvision's ResNet-18 with a 3x3 stride-1 first convolution and no max-pool."""

    feature_layers = ("backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4")

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        net = resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.backbone = net

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

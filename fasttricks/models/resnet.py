"""ResNet-18/34/50 with the Bag-of-Tricks tweaks (He et al., section 4; docs/sources.md), torchvision-free.

Variants are cumulative, as in Bag of Tricks, Figure 2:
    "A": the original ResNet (7x7 stem, stride-2 1x1 convs at downsampling);
    "B": A, with the stride of the bottleneck's downsampling moved from its
         first 1x1 conv to the 3x3 conv (path A sees every input position);
    "C": B, with the 7x7 stem replaced by three 3x3 convs (32, 32, 64 channels,
         the first with stride 2);
    "D": C, with the downsampling shortcut (path B) an average pool 2x2/2
         followed by a stride-1 1x1 conv.
`small_input=True` is the CIFAR-style stem for small images: one 3x3
stride-1 conv and no max pool (the C stem keeps its three convs, all stride 1).
`zero_gamma=True` initialises the last BN of every residual block to 0
(Bag of Tricks, section 3.1), so each block starts as the identity.
`dims=1` builds the same network from 1-D convolutions, norms and pools, for
sequences shaped (batch, channels, length) such as MNIST-1D.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "VARIANTS"]

VARIANTS = ("A", "B", "C", "D")


# The layers of a network over 1-D sequences or 2-D images.
_LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d, nn.AvgPool1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
           2: (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d)}


def _layers(dims: int):
    if dims not in _LAYERS:
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    return _LAYERS[dims]


def _shortcut(in_ch: int, out_ch: int, stride: int, variant: str, dims: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    conv, bn, avg_pool, _, _ = _layers(dims)
    if variant == "D" and stride != 1:
        return nn.Sequential(avg_pool(2, stride, ceil_mode=True, count_include_pad=False),
                             conv(in_ch, out_ch, 1, bias=False), bn(out_ch))
    return nn.Sequential(conv(in_ch, out_ch, 1, stride, bias=False), bn(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs; `last_norm` is the BN that zero gamma sets to 0."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, variant: str = "A", dims: int = 2):
        super().__init__()
        conv, bn = _layers(dims)[:2]
        out_ch = width * self.expansion
        self.conv1 = conv(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = bn(width)
        self.conv2 = conv(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, variant, dims)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    @property
    def branch_convs(self) -> list[nn.Module]:
        return [self.conv1, self.conv2]

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1; variant A strides the first 1x1, B/C/D the 3x3."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, variant: str = "A", dims: int = 2):
        super().__init__()
        conv, bn = _layers(dims)[:2]
        out_ch = width * self.expansion
        s1, s3 = (stride, 1) if variant == "A" else (1, stride)
        self.conv1 = conv(in_ch, width, 1, s1, bias=False)
        self.bn1 = bn(width)
        self.conv2 = conv(width, width, 3, s3, 1, bias=False)
        self.bn2 = bn(width)
        self.conv3 = conv(width, out_ch, 1, bias=False)
        self.bn3 = bn(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, variant, dims)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    @property
    def branch_convs(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3]

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes: int = 1000, variant: str = "A", zero_gamma: bool = False,
                 small_input: bool = False, in_channels: int = 3, base_width: int = 64, dims: int = 2):
        super().__init__()
        conv, bn, _, max_pool, adaptive_pool = _layers(dims)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.variant = variant
        stem_stride = 1 if small_input else 2
        if variant in ("C", "D"):
            half = base_width // 2
            stem = [conv(in_channels, half, 3, stem_stride, 1, bias=False), bn(half), nn.ReLU(inplace=True),
                    conv(half, half, 3, 1, 1, bias=False), bn(half), nn.ReLU(inplace=True),
                    conv(half, base_width, 3, 1, 1, bias=False), bn(base_width), nn.ReLU(inplace=True)]
        elif small_input:
            stem = [conv(in_channels, base_width, 3, 1, 1, bias=False), bn(base_width), nn.ReLU(inplace=True)]
        else:
            stem = [conv(in_channels, base_width, 7, 2, 3, bias=False), bn(base_width), nn.ReLU(inplace=True)]
        if not small_input:
            stem.append(max_pool(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        stages, in_ch = [], base_width
        for i, blocks in enumerate(layers):
            width = base_width * 2**i
            stage = []
            for j in range(blocks):
                stage.append(block(in_ch, width, 2 if (j == 0 and i > 0) else 1, variant, dims))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = adaptive_pool(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, bn):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_gamma:
            from fasttricks.tricks import zero_gamma_

            zero_gamma_(self)

    def residual_blocks(self):
        return [m for m in self.modules() if isinstance(m, (BasicBlock, Bottleneck))]

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 1000, variant: str = "A", zero_gamma: bool = False, small_input: bool = False,
             **kw) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, variant, zero_gamma, small_input, **kw)


def resnet34(num_classes: int = 1000, variant: str = "A", zero_gamma: bool = False, small_input: bool = False,
             **kw) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, variant, zero_gamma, small_input, **kw)


def resnet50(num_classes: int = 1000, variant: str = "A", zero_gamma: bool = False, small_input: bool = False,
             **kw) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, variant, zero_gamma, small_input, **kw)

"""Load a slimmed vpns_jax model in PyTorch (needs torch and safetensors, not JAX or torchvision).

    from vpns_jax.structured.torch_slim import load_slim
    model = load_slim("exported_dir")          # torch.nn.Module in eval mode
    logits = model(images_nchw)                # normalized images, [B, 3, H, W] float32

`exported_dir` is what `vpns_jax.structured.slim.export_slim` writes: `widths.json` (architecture,
width multiplier, stem, and the output channels of every conv by torchvision module name, e.g.
{"conv1": 12, "layer1.0.conv1": 9, "layer2.0.downsample.0": 20}) and `slim.safetensors` (a
torchvision-named state dict). The modules are torchvision's ResNet (v1.5) / VGG with those widths:
the same state-dict names, a conv's input width is its producer's output width, the fc/classifier
input follows the last conv. Downsample shortcuts stay exactly where the unpruned network has them.
The state dict loads strictly (every key, every shape).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import nn

_STAGES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3))}
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class _Block(nn.Module):
    """BasicBlock (3×3, 3×3) or v1.5 Bottleneck (1×1, 3×3 with the stride, 1×1) with given widths."""

    def __init__(self, kind: str, cin: int, outs: list[int], stride: int,
                 downsample: int | None):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        kernels = (3, 3) if kind == "basic" else (1, 3, 1)
        strides = (stride, 1) if kind == "basic" else (1, stride, 1)
        self.n = len(kernels)
        prev = cin
        for i, (k, s, c) in enumerate(zip(kernels, strides, outs, strict=True), start=1):
            setattr(self, f"conv{i}", nn.Conv2d(prev, c, k, s, k // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
            prev = c
        self.downsample = None if downsample is None else nn.Sequential(
            nn.Conv2d(cin, downsample, 1, stride, bias=False), nn.BatchNorm2d(downsample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.n + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.n:
                out = self.relu(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SlimResNet(nn.Module):
    """torchvision ResNet-18/34/50 with per-conv widths ({torch module name: channels})."""

    def __init__(self, arch: str, widths: Mapping[str, int], num_classes: int, width: float = 1.0,
                 small_input: bool = False):
        super().__init__()
        kind, stages = _STAGES[arch]
        expansion = 1 if kind == "basic" else 4
        stem = widths.get("conv1", _scaled(64, width))
        self.conv1 = (nn.Conv2d(3, stem, 3, 1, 1, bias=False) if small_input
                      else nn.Conv2d(3, stem, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        cin, default_in = stem, _scaled(64, width)
        for i, blocks in enumerate(stages):
            planes = _scaled(64 * 2**i, width)
            mods = []
            for j in range(blocks):
                name, stride = f"layer{i + 1}.{j}", (2 if i > 0 and j == 0 else 1)
                defaults = [planes, planes] + ([] if kind == "basic" else [planes * 4])
                outs = [widths.get(f"{name}.conv{k + 1}", d) for k, d in enumerate(defaults)]
                project = stride != 1 or default_in != planes * expansion
                down = widths.get(f"{name}.downsample.0", outs[-1]) if project else None
                mods.append(_Block(kind, cin, outs, stride, down))
                cin, default_in = outs[-1], planes * expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SlimVGG(nn.Module):
    """torchvision VGG-16 / VGG-16-BN with per-conv widths ({'features.<i>': channels})."""

    def __init__(self, batch_norm: bool, widths: Mapping[str, int], num_classes: int,
                 width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            cout = widths.get(f"features.{len(layers)}", _scaled(int(v), width))
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = _scaled(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(cin * 49, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_slim(arch: str, widths: Mapping[str, int], num_classes: int, width: float = 1.0,
               small_input: bool = False) -> nn.Module:
    """The slimmed architecture with random weights (`load_slim` fills them in)."""
    if arch in _STAGES:
        return SlimResNet(arch, widths, num_classes, width, small_input)
    if arch in ("vgg16", "vgg16_bn"):
        return SlimVGG(arch == "vgg16_bn", widths, num_classes, width)
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join([*_STAGES, 'vgg16', 'vgg16_bn'])}")


def load_slim(path: str) -> nn.Module:
    """The exported slimmed model in `path` (a folder with widths.json and slim.safetensors) as a
    torch module in eval mode, weights loaded strictly."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "widths.json")) as f:
        info = json.load(f)
    model = build_slim(info["arch"], info["widths"], int(info["num_classes"]),
                       float(info.get("width", 1.0)), bool(info.get("small_input", False)))
    state = load_file(os.path.join(path, "slim.safetensors"))
    model.load_state_dict(state, strict=True)
    return model.eval()

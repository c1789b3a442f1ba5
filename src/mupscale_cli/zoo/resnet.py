"""μP ResNet-18 (CIFAR-style stem) with torchvision parameter names.

BasicBlock, 4 stages of 2 blocks with channels w, 2w, 4w, 8w (w = model_args["width"]); a 3×3 stride-1
stem without maxpool so tiny images (e.g. 3×8×8) work; convs without bias; `fc` is `mup.MuReadout`
(it divides by the width multiplier, so the readout is vector-like and only duplicated on widening).
Every stage grows by the same factor: the spec `configs/resnet18-mup.yaml` has one width axis `channels`.
"""
import mup
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DEFAULT_ARGS = {"num_classes": 10, "in_channels": 3, "image_size": 8}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    def __init__(self, width: int, num_classes: int, in_channels: int):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        chans = [w, 2 * w, 4 * w, 8 * w]
        c_in = w
        for s, c in enumerate(chans):
            stride = 1 if s == 0 else 2
            setattr(self, f"layer{s + 1}", nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c, 1)))
            c_in = c
        self.fc = mup.MuReadout(8 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w, H, W)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w, H/8, W/8)
        return self.fc(x.mean(dim=(2, 3)))  # (B, num_classes)


def _make(args: dict) -> ResNet18:
    return ResNet18(args["width"], args["num_classes"], args["in_channels"])


def build(model_args: dict, base_args: dict | None = None) -> nn.Module:
    """ResNet-18 for model_args with μP base shapes taken from base_args (default: model_args).

    A delta model of twice the base width marks the width dimensions, so they are width dimensions
    (multiplier 1) even in the base model itself.
    """
    args = {**DEFAULT_ARGS, **model_args}
    b = {**args, **(base_args or {})}
    model = _make(args)
    with torch.device("meta"):  # only shapes are needed
        base, delta = _make(b), _make({**b, "width": 2 * b["width"]})
    return mup.set_base_shapes(model, base, rescale_params=True, delta=delta)


def batch(model_args: dict, batch_size: int, generator: torch.Generator,
          dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Random images (B, C, S, S) and class labels (B,); independent of the width."""
    a = {**DEFAULT_ARGS, **model_args}
    s = a["image_size"]
    x = torch.randn(batch_size, a["in_channels"], s, s, generator=generator, dtype=dtype)
    y = torch.randint(a["num_classes"], (batch_size,), generator=generator)
    return x, y


def loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(model(inputs), targets)


def output(model: nn.Module, inputs: Tensor) -> Tensor:
    return model(inputs)  # logits (B, num_classes)

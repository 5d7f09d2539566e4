"""Shared fixtures: tiny multi-exit models (fast on a shared 2-core CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from egt_core.models import MultiExitNet, build_model

TINY_GRAY = dict(input_size=28, widths=(4, 8, 8, 8), head_widths=(4, 8))
TINY_RGB = dict(input_size=32, widths=(4, 8, 8, 8), head_widths=(4, 8))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters.

    Fresh BNs are (almost) the identity in eval mode, which would hide bugs in BN folding and
    in eval/train handling.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def make_tiny_gray(seed: int = 0, num_classes: int = 10) -> MultiExitNet:
    torch.manual_seed(seed)
    return randomize_bn(build_model("small", 1, num_classes, **TINY_GRAY), seed).eval()


def make_tiny_rgb(seed: int = 0, num_classes: int = 5) -> MultiExitNet:
    torch.manual_seed(seed)
    return randomize_bn(build_model("small", 3, num_classes, **TINY_RGB), seed).eval()


@pytest.fixture
def tiny_gray() -> MultiExitNet:
    """1-channel 28 px, 10 classes, eval mode, random weights."""
    return make_tiny_gray()


@pytest.fixture
def tiny_rgb() -> MultiExitNet:
    """3-channel 32 px, 5 classes, eval mode, random weights."""
    return make_tiny_rgb()


@pytest.fixture
def gray_batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 1, 28, 28)


@pytest.fixture
def rgb_batch() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread (tiny tensors; the 2 cores are shared) and restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

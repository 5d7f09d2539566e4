"""Multi-exit CNNs in which every exit has a class activation map (CAM).

A `MultiExitNet` is a chain of *segments* (the backbone cut at the exits) and one head per
segment. Every head is ``[pool] -> conv -> BN -> ReLU -> global average pool -> linear`` (the final
head skips the conv: it is the plain classifier on the backbone's last feature map). For such a head
the class-c CAM, ``sum_j w[c, j] * H_j`` over the map ``H`` entering the global pool, equals
Grad-CAM on ``H`` up to a positive factor, so the map we train is the map grad-cam shows users.
"""

from __future__ import annotations

import copy
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass
class ExitOutput:
    """What one exit produced: logits plus the two tensors its CAM is made of."""

    logits: Tensor  # (B, num_classes)
    features: Tensor  # (B, K, h, w): the map entering the head's global pool (the CAM layer)
    weight: Tensor  # (num_classes, K): the head's linear weights


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class ExitHead(nn.Module):
    """``[avg-pool] -> conv-BN-ReLU -> GAP -> linear``; ``features`` is the CAM layer.

    With ``width=None`` the head has no conv: ``features`` is an identity and the head is the
    network's final classifier over the backbone's last map.
    """

    def __init__(
        self,
        c_in: int,
        num_classes: int,
        width: int | None = None,
        pool: int = 1,
        kernel: int = 3,
    ) -> None:
        super().__init__()
        self.pool: nn.Module = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.features: nn.Module = (
            ConvBNReLU(c_in, width, kernel=kernel) if width else nn.Identity()
        )
        self.fc = nn.Linear(width or c_in, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(self.pool(x))
        return self.fc(f.mean((2, 3))), f


class MultiExitNet(nn.Module):
    """Backbone segments with an exit head after each; the last head is the final classifier."""

    def __init__(
        self,
        segments: Sequence[nn.Module],
        heads: Sequence[ExitHead],
        arch: str,
        config: dict,
    ) -> None:
        super().__init__()
        if len(segments) != len(heads) or len(heads) < 2:
            raise ValueError("need one head per segment and at least two exits")
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.arch = arch
        self.config = dict(config)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    @property
    def num_classes(self) -> int:
        return self.heads[-1].fc.out_features

    def cam_layers(self) -> list[nn.Module]:
        """The module whose output is each exit's CAM feature map (grad-cam target layers)."""
        return [head.features for head in self.heads]

    def forward(self, x: Tensor) -> list[ExitOutput]:
        outputs = []
        for segment, head in zip(self.segments, self.heads, strict=True):
            x = segment(x)
            logits, feats = head(x)
            outputs.append(ExitOutput(logits, feats, head.fc.weight))
        return outputs

    def exit_logits(self, x: Tensor, k: int) -> Tensor:
        """Logits of exit ``k`` alone: segments ``0..k`` then head ``k`` (no other heads)."""
        for segment in self.segments[: k + 1]:
            x = segment(x)
        return self.heads[k](x)[0]

    def full_path(self, x: Tensor) -> Tensor:
        """The no-early-exit baseline: the backbone and the final classifier only."""
        return self.exit_logits(x, self.num_exits - 1)


class ExitSelector(nn.Module):
    """Wraps one exit so that tools expecting ``model(x) -> logits`` (grad-cam) see just it."""

    def __init__(self, model: MultiExitNet, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        return self.model.exit_logits(x, self.k)


# --------------------------------------------------------------------------- families


def _small(
    in_channels: int,
    num_classes: int,
    input_size: int = 28,
    widths: Sequence[int] = (32, 64, 128, 160),
    head_widths: Sequence[int] = (48, 128),
) -> tuple[list[nn.Module], list[ExitHead]]:
    """Three segments for 28-64 px inputs with exits placed by compute, not by layer count.

    The first segment ends after a stride-2 conv and one more conv at half resolution, so the first
    exit sits at about a quarter of the full path's FLOPs while running only three convs. Inputs of
    48 px and more get a stride-2 stem. The first head pools 2x before its 3x3 conv and the second
    uses a 1x1 conv, keeping each head at a few percent of the full path and every exit's map on
    the final map's grid.
    """
    w0, w1, w2, w3 = widths
    stem_stride = 2 if input_size >= 48 else 1
    segments: list[nn.Module] = [
        nn.Sequential(
            ConvBNReLU(in_channels, w0, stem_stride), ConvBNReLU(w0, w1, 2), ConvBNReLU(w1, w1)
        ),
        nn.Sequential(ConvBNReLU(w1, w2, 2), ConvBNReLU(w2, w2)),
        nn.Sequential(ConvBNReLU(w2, w3), ConvBNReLU(w3, w3)),
    ]
    heads = [
        ExitHead(w1, num_classes, head_widths[0], pool=2),
        ExitHead(w2, num_classes, head_widths[1], kernel=1),
        ExitHead(w3, num_classes),
    ]
    return segments, heads


FAMILIES: dict[str, Callable[..., tuple[list[nn.Module], list[ExitHead]]]] = {"small": _small}


def build_model(arch: str, in_channels: int, num_classes: int, **options) -> MultiExitNet:
    """Build any model family by name, so the CLI, checkpoints and app construct models one way."""
    if arch not in FAMILIES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(FAMILIES))}")
    if in_channels < 1 or num_classes < 2:
        raise ValueError("need in_channels >= 1 and num_classes >= 2")
    segments, heads = FAMILIES[arch](in_channels, num_classes, **options)
    config = {"in_channels": in_channels, "num_classes": num_classes, **options}
    return MultiExitNet(segments, heads, arch, config)


@dataclass
class ExitCosts:
    """FLOPs of each backbone segment and each head, for one input."""

    segments: list[int]
    heads: list[int]

    def answer_at(self, k: int) -> int:
        """FLOPs of a sample answered at exit ``k`` in early-exit mode (all heads on the way)."""
        return sum(self.segments[: k + 1]) + sum(self.heads[: k + 1])

    @property
    def full_path(self) -> int:
        """The no-early-exit baseline: backbone plus final classifier, no early heads."""
        return sum(self.segments) + self.heads[-1]


def exit_costs(model: MultiExitNet, input_size: Sequence[int]) -> ExitCosts:
    """Count each segment's and head's FLOPs for a ``(C, H, W)`` input (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn: Callable[[], object]) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size)
    costs = ExitCosts([], [])
    with torch.no_grad():
        for segment, head in zip(model.segments, model.heads, strict=True):
            costs.segments.append(count(lambda s=segment, t=x: s(t)))
            x = segment(x)
            costs.heads.append(count(lambda h=head, t=x: h(t)))
    model.train(was_training)
    return costs


def flops_per_exit(model: MultiExitNet, input_size: Sequence[int]) -> list[int]:
    """Cumulative FLOPs of answering at each exit, every head on the way included.

    ``input_size`` is ``(C, H, W)``. The last entry is the full path (backbone and final head only,
    no early heads): the baseline every speedup is measured against.
    """
    costs = exit_costs(model, input_size)
    return [costs.answer_at(k) for k in range(model.num_exits - 1)] + [costs.full_path]


def fuse_for_inference(model: MultiExitNet) -> MultiExitNet:
    """A copy with every BatchNorm folded into its conv (eval only): fewer ops at batch 1."""
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, ConvBNReLU) and isinstance(module[1], nn.BatchNorm2d):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = nn.Identity()
    return fused


def feature_grid(model: MultiExitNet, input_size: Sequence[int]) -> list[tuple[int, int]]:
    """Spatial size of each exit's CAM map for a ``(C, H, W)`` input."""
    was_training = model.training
    try:
        with torch.no_grad():
            outs = model.eval()(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    return [tuple(o.features.shape[-2:]) for o in outs]


def common_map_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The largest map among the exits: every map is resized to it before comparing."""
    return max(sizes, key=lambda s: math.prod(s))


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock every forward pass on a shared ``model`` takes (created on first use).

    grad-cam's hooks record *any* forward pass through the model, so explanations and plain
    predictions on a model shared by several sessions must not interleave. Re-entrant, so a caller
    holding it can still call `predict` or `explain`; keyed weakly, so a model dropped from a cache
    takes its lock with it.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock

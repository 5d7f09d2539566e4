"""The EGT objective: per-exit cross-entropy plus an attention-consistency penalty.

``L = sum_k w_k * CE(exit_k) + lambda * sum_{k<K} D(A_k, A_K)`` where ``A_k`` is exit k's map and
``A_K`` the final exit's. ``lambda = 0`` is the baseline and computes no maps at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import ATTENTION_KINDS, attention_maps
from .models import ExitOutput

DISTANCES = ("cosine", "mse", "pearson")


@dataclass
class EGTLossConfig:
    lam: float = 1.0  # weight of the consistency term; 0 gives the baseline
    attention: str = "cam"  # one of ATTENTION_KINDS
    distance: str = "cosine"  # 1 - cos | MSE of L2-normalised maps | 1 - Pearson (mean-centred)
    exit_weights: Sequence[float] | None = None  # per-exit CE weights; None = all 1.0
    detach_final: bool = True  # treat the final exit's map as a fixed teacher

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.attention!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown distance {self.distance!r}; choose one of {DISTANCES}")


@dataclass
class LossTerms:
    total: Tensor
    ce: list[Tensor] = field(default_factory=list)  # per exit, unweighted
    consistency: list[Tensor] = field(default_factory=list)  # per early exit (empty if lam == 0)


def map_distance(a: Tensor, b: Tensor, distance: str = "cosine") -> Tensor:
    """Mean distance between two batches of maps ``(B, H, W)``.

    ``pearson`` is ``1 - cosine`` of the mean-centred maps: it ignores the map's constant part,
    which for non-negative maps keeps plain cosine near 1 and its gradient small.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}")
    a, b = a.flatten(1), b.flatten(1)
    if distance == "pearson":
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
    a = F.normalize(a, dim=1, eps=1e-8)
    b = F.normalize(b, dim=1, eps=1e-8)
    if distance == "mse":
        return F.mse_loss(a, b)
    return (1 - (a * b).sum(1)).mean()


def egt_loss(outputs: Sequence[ExitOutput], targets: Tensor, config: EGTLossConfig) -> LossTerms:
    """Total loss and each term (for logging)."""
    weights = (
        [1.0] * len(outputs)
        if config.exit_weights is None
        else [float(w) for w in config.exit_weights]
    )
    if len(weights) != len(outputs):
        raise ValueError(f"{len(weights)} exit weights given for {len(outputs)} exits")
    ce = [F.cross_entropy(o.logits, targets) for o in outputs]
    total = sum(w * c for w, c in zip(weights, ce, strict=True))
    terms = LossTerms(total=total, ce=ce)
    if config.lam > 0:
        maps = attention_maps(outputs, config.attention, classes=targets)
        final = maps[:, -1].detach() if config.detach_final else maps[:, -1]
        terms.consistency = [
            map_distance(maps[:, k], final, config.distance) for k in range(len(outputs) - 1)
        ]
        terms.total = total + config.lam * torch.stack(terms.consistency).sum()
    return terms

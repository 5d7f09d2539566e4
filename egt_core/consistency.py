"""How much two attention maps agree: batched scores for maps of the same images.

Every score takes maps ``a, b`` of shape ``(B, H, W)`` (or ``(B, N)``) and returns ``(B,)``. All
are symmetric, give 1 for identical maps and are unchanged when a map is multiplied by a positive
factor. Cosine and top-k IoU lie in [0, 1] for the non-negative maps we compare; Pearson and
Spearman in [-1, 1].

Degenerate maps: a map that is constant (all zero, typically, after the ReLU) has no direction, so
no agreement can be claimed. Such a pair scores 0 (never NaN) and `degenerate` flags it so reports
can count it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

METRICS = ("cosine", "pearson", "spearman", "iou")
EPS = 1e-12


def _flat(x: Tensor) -> Tensor:
    return x.flatten(1).double()


def degenerate(a: Tensor, b: Tensor) -> Tensor:
    """True where either map is constant (no direction, no ranking)."""
    fa, fb = _flat(a), _flat(b)
    return (fa.amax(1) - fa.amin(1) <= EPS) | (fb.amax(1) - fb.amin(1) <= EPS)


def _cos(fa: Tensor, fb: Tensor) -> Tensor:
    na, nb = fa.norm(dim=1), fb.norm(dim=1)
    ok = (na > EPS) & (nb > EPS)
    return torch.where(ok, (fa * fb).sum(1) / (na * nb).clamp_min(EPS), 0.0).clamp(-1, 1)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    fa, fb = _flat(a), _flat(b)
    return torch.where(degenerate(a, b), 0.0, _cos(fa, fb)).float()


def pearson(a: Tensor, b: Tensor) -> Tensor:
    fa, fb = _flat(a), _flat(b)
    fa = fa - fa.mean(1, keepdim=True)
    fb = fb - fb.mean(1, keepdim=True)
    return torch.where(degenerate(a, b), 0.0, _cos(fa, fb)).float()


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks with ties sharing their average rank (as scipy's rankdata)."""
    s = x.sort(1).values.contiguous()
    below = torch.searchsorted(s, x.contiguous(), right=False)
    upto = torch.searchsorted(s, x.contiguous(), right=True)
    return (below + upto - 1).double() / 2


def spearman(a: Tensor, b: Tensor) -> Tensor:
    return pearson(_average_ranks(_flat(a)), _average_ranks(_flat(b))).where(
        ~degenerate(a, b), torch.tensor(0.0)
    )


def topk_iou(a: Tensor, b: Tensor, k: float = 0.2) -> Tensor:
    """IoU of the top ``k`` fraction of pixels of each map (ties broken by position)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    fa, fb = _flat(a), _flat(b)
    n = fa.shape[1]
    m = max(1, math.ceil(k * n))
    top_a = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, fa.topk(m, 1).indices, True)
    top_b = torch.zeros_like(fb, dtype=torch.bool).scatter_(1, fb.topk(m, 1).indices, True)
    inter = (top_a & top_b).sum(1).double()
    union = (top_a | top_b).sum(1).double()
    return torch.where(degenerate(a, b), 0.0, inter / union).float()


def consistency_scores(
    a: Tensor, b: Tensor, metrics: tuple[str, ...] = METRICS, k: float = 0.2
) -> dict[str, Tensor]:
    """Each requested score ``(B,)`` plus ``degenerate`` (bool ``(B,)``)."""
    table = {"cosine": cosine, "pearson": pearson, "spearman": spearman}
    out: dict[str, Tensor] = {}
    for name in metrics:
        if name == "iou":
            out["iou"] = topk_iou(a, b, k)
        elif name in table:
            out[name] = table[name](a, b)
        else:
            raise ValueError(f"unknown metric {name!r}; choose from {METRICS}")
    out["degenerate"] = degenerate(a, b)
    return out


def exit_consistency(maps: Tensor, k: float = 0.2) -> list[dict[str, Tensor]]:
    """Scores of every early exit's map against the final exit's, for maps ``(B, E, H, W)``."""
    return [consistency_scores(maps[:, e], maps[:, -1], k=k) for e in range(maps.shape[1] - 1)]

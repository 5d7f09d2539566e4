"""Differentiable, batched attention maps for every exit (used by the EGT loss and the app).

All kinds return ``(B, E, H, W)``: one ReLU'd map per exit, resized (bilinear) to a common grid so
that maps from exits of different resolution can be compared pixel by pixel.

- ``cam``: class activation map ``sum_j w[c, j] * F_j`` of the head's last conv output; class
  specific, no second backward pass, equal to Grad-CAM up to a positive scale for our heads.
- ``activation``: attention transfer (Zagoruyko & Komodakis): channel mean of ``|F|^p``; class
  agnostic, forward only.
- ``gradcam``: Grad-CAM through ``torch.autograd.grad(create_graph=True)``; needs double backprop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import ExitOutput

ATTENTION_KINDS = ("cam", "activation", "gradcam")


def _cam(out: ExitOutput, classes: Tensor) -> Tensor:
    return torch.einsum("bkhw,bk->bhw", out.features, out.weight[classes])


def _activation(out: ExitOutput, p: float) -> Tensor:
    return out.features.abs().pow(p).mean(1)


def _gradcam(out: ExitOutput, classes: Tensor, create_graph: bool) -> Tensor:
    score = out.logits.gather(1, classes[:, None]).sum()
    (grads,) = torch.autograd.grad(score, out.features, create_graph=create_graph)
    weights = grads.mean((2, 3), keepdim=True)
    return (weights * out.features).sum(1)


def attention_maps(
    outputs: Sequence[ExitOutput],
    kind: str = "cam",
    classes: Tensor | None = None,
    size: tuple[int, int] | None = None,
    p: float = 2.0,
    create_graph: bool = True,
) -> Tensor:
    """Every exit's map as ``(B, E, H, W)``, ReLU'd and resized to ``size``.

    ``classes`` (``(B,)``) picks the class for ``cam`` and ``gradcam``: the label when training,
    by default the final exit's prediction, so that all exits explain the same class.
    ``size`` defaults to the largest map among the exits.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose one of {ATTENTION_KINDS}")
    if classes is None and kind != "activation":
        classes = outputs[-1].logits.argmax(1)
    if size is None:
        size = max((tuple(o.features.shape[-2:]) for o in outputs), key=lambda s: s[0] * s[1])
    maps = []
    for out in outputs:
        if kind == "cam":
            m = _cam(out, classes)
        elif kind == "activation":
            m = _activation(out, p)
        else:
            m = _gradcam(out, classes, create_graph)
        m = F.relu(m)
        if tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        maps.append(m)
    return torch.stack(maps, 1)


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Min-max each map to [0, 1] for display; an all-constant map becomes all zeros."""
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)

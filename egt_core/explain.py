"""Per-exit explanation maps for display and evaluation, with one API for every method.

``explain(model, x, method)`` returns every exit's map for a batch. ``"cam"`` is the trained CAM
(the map the EGT loss shapes; one no-grad forward pass). The gradient methods (Grad-CAM,
Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM) share one forward pass of the full model: each exit's
gradient comes from one ``torch.autograd.grad`` of its class logit to its CAM layer, and the
`pytorch_grad_cam` package's own method code then weights, ReLUs, scales and resizes it, so the
maps equal the package's per-exit output. Score-CAM and Eigen-CAM run the package once per exit.

grad-cam is made safe for a shared model here (see REFERENCE.md, "grad-cam with a multi-exit
model"): each exit is wrapped in `ExitSelector` so the package sees one logits tensor, one CAM
object per exit, one target per image, and everything it changes on the model (eval mode, zeroed
gradients, hooks) is undone by `preserved_state`. Its hooks would also see forward passes made by
other threads, so all work on a model is serialised by a per-model lock.

Maps are for display and scoring only: nothing here is differentiable or used by the training loss.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from .attention import attention_maps, normalize_maps
from .consistency import exit_consistency
from .models import ExitSelector, MultiExitNet, common_map_size, model_lock

EXPLAINERS: dict[str, type | None] = {
    "cam": None,  # the trained CAM, computed by `attention.attention_maps` without grad-cam
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "hirescam": HiResCAM,
    "scorecam": ScoreCAM,
}

EXPLAINER_LABELS: dict[str, str] = {
    "cam": "Trained CAM (one forward pass)",
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM (class-agnostic)",
    "hirescam": "HiResCAM",
    "scorecam": "Score-CAM (slow: one forward pass per channel)",
}

COLORMAPS: tuple[str, ...] = ("jet", "viridis", "inferno", "magma", "turbo", "hot")
_CV2_COLORMAPS = {name: getattr(cv2, f"COLORMAP_{name.upper()}") for name in COLORMAPS}

# Methods whose map is a function of one layer's activations and gradients only: explain() gets
# those for every exit from one shared forward pass and hands them to the package's method code.
_SHARED_FORWARD = frozenset({"gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"})

SCORECAM_BATCH_SIZE = 32  # masked inputs per forward pass: bounds Score-CAM's memory

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@dataclass
class Explanation:
    """Every exit's map for one batch, all on the CPU.

    ``maps`` are for display (input resolution, each map min-max scaled to [0, 1], a constant map
    becomes zeros). ``raw_maps`` are for consistency scores: ReLU'd maps on the exits' common
    feature grid. For grad-cam methods the package only returns normalised, upsampled maps, so
    their ``raw_maps`` are those maps area-downsampled to the grid; the scores are invariant to a
    positive scale, so only the package's min shift (usually zero after its ReLU) differs.
    """

    maps: Tensor  # (B, E, H, W) float in [0, 1]
    raw_maps: Tensor  # (B, E, h, w) ReLU'd, un-normalised, common feature grid
    probs: Tensor  # (B, E, C) softmax of every exit
    target_classes: Tensor  # (B,) the class every exit explains


# --------------------------------------------------------------------------- state and locks


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Undo on exit what explaining changes: train flags, ``requires_grad``, ``.grad``, hooks.

    grad-cam calls ``model.eval()`` and ``model.zero_grad()`` and registers hooks; a model shared
    with a training loop or another session must come back exactly as it was. Gradients are
    restored as the same tensor objects with their old values. Hooks added inside the block and
    still present on exit are removed (grad-cam releases its own; this is the safety net).
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    grads = [(p.grad, None if p.grad is None else p.grad.detach().clone()) for p in params]
    hooks = [{name: set(getattr(m, name, {})) for name in _HOOK_DICTS} for m in modules]
    full_backward = [getattr(m, "_is_full_backward_hook", None) for m in modules]
    try:
        yield model
    finally:
        for m, flag, before, full in zip(modules, training, hooks, full_backward, strict=True):
            m.training = flag
            for name, keys in before.items():
                table = getattr(m, name, None)
                if table is not None:
                    for key in set(table) - keys:
                        del table[key]
            if hasattr(m, "_is_full_backward_hook"):
                m._is_full_backward_hook = full
        with torch.no_grad():
            for p, flag, (grad, values) in zip(params, requires_grad, grads, strict=True):
                p.requires_grad_(flag)
                if grad is not None:
                    grad.copy_(values)
                p.grad = grad


# --------------------------------------------------------------------------- explaining


def _check_inputs(
    model: MultiExitNet, x: Tensor, method: str, target_classes: Tensor | None
) -> Tensor | None:
    if method not in EXPLAINERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(EXPLAINERS)}")
    channels = model.config["in_channels"]
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[0] < 1 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (B, {channels}, H, W) tensor with B >= 1, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if target_classes is None:
        return None
    classes = torch.as_tensor(target_classes)
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ValueError(f"target_classes must be integers, got {classes.dtype}")
    if tuple(classes.shape) != (x.shape[0],):
        raise ValueError(
            f"target_classes must have shape ({x.shape[0]},), got {tuple(classes.shape)}"
        )
    bad = (classes < 0) | (classes >= model.num_classes)
    if bad.any():
        raise ValueError(
            f"target classes {classes[bad].tolist()} out of range [0, {model.num_classes})"
        )
    return classes.long()


def _forward(model: MultiExitNet, x: Tensor, classes: Tensor | None):
    """One no-grad forward pass (of a model in eval mode): exit outputs, probabilities and the
    classes to explain."""
    with torch.no_grad():
        outputs = model(x)
    probs = torch.stack([o.logits for o in outputs], 1).softmax(-1)
    if classes is None:
        classes = outputs[-1].logits.argmax(1)
    return outputs, probs, classes.to(x.device)


def _trained_cams(model: MultiExitNet, x: Tensor, classes: Tensor | None, size: tuple[int, int]):
    """The ``"cam"`` path (called under the lock): one no-grad forward, then one einsum per exit.

    Nothing on the model changes here (no hooks, no gradients), so a model already in eval mode
    is used as is, without the cost of `preserved_state`; one with any module in train mode is
    switched to eval and restored.
    """
    if any(m.training for m in model.modules()):
        with preserved_state(model):
            return _trained_cams(model.eval(), x, classes, size)
    with torch.no_grad():
        outputs, probs, classes = _forward(model, x, classes)
        grid = common_map_size([tuple(o.features.shape[-2:]) for o in outputs])
        raw = attention_maps(outputs, "cam", classes, size=grid)  # ReLU'd, on the common grid
        # bilinear weights are convex, so the upsampled ReLU'd maps need no second ReLU
        maps = F.interpolate(raw, size=size, mode="bilinear", align_corners=False)
        maps = normalize_maps(maps).clamp_(0, 1)
    return maps, raw, probs, classes


def _cam_object(method: str, model: nn.Module, layers: list[nn.Module]):
    cam = EXPLAINERS[method](model=model, target_layers=layers)
    if method == "scorecam":
        cam.batch_size = SCORECAM_BATCH_SIZE
    return cam


def _shared_forward_maps(model: MultiExitNet, x: Tensor, method: str, classes: Tensor | None):
    """A gradient method's ``(B, E, H, W)`` maps from ONE forward pass (called under the lock,
    inside `preserved_state` and with grad enabled).

    `ExitOutput.features` are the outputs of `model.cam_layers()`, the layers grad-cam targets,
    and each exit's logits are those `ExitSelector` gives grad-cam (the same modules on the same
    input). ``torch.autograd.grad`` of exit k's summed target logits (what `ClassifierOutputTarget`
    sums) w.r.t. its features is the gradient grad-cam's tensor hook records, and it only runs
    back through head k. Parameters are frozen and the input requires grad instead, so no weight
    gradient is computed. The package's own code then does the rest exactly as
    `BaseCAM.forward` does after its backward: the method's ``get_cam_image`` on numpy activations
    and gradients, ReLU, `scale_cam_image` to the input size and ``aggregate_multi_layers``.
    The CAM object is built with no target layers, so it registers no hooks at all.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x_in = x.detach().requires_grad_(True)  # explain() passes its own copy of the input
    outputs = model(x_in)
    probs = torch.stack([o.logits.detach() for o in outputs], 1).softmax(-1)
    if classes is None:
        classes = outputs[-1].logits.detach().argmax(1)
    classes = classes.to(x.device)
    index = classes[:, None]
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    layers = model.cam_layers()
    maps = []
    with _cam_object(method, model, []) as cam:
        target_size = cam.get_target_width_height(x_in)
        for k, out in enumerate(outputs):
            score = out.logits.gather(1, index).sum()
            (grads,) = torch.autograd.grad(score, out.features, retain_graph=True)
            activations = out.features.detach().cpu().numpy()
            image = cam.get_cam_image(
                x_in, layers[k], targets, activations, grads.cpu().numpy(), False
            )
            scaled = scale_cam_image(np.maximum(image, 0), target_size)
            maps.append(cam.aggregate_multi_layers([scaled[:, None, :]]))
    if len(maps) != len(outputs):  # grad-cam's __exit__ swallows IndexError: no garbage
        raise RuntimeError(f"{EXPLAINER_LABELS[method]} failed on exit {len(maps)}")
    maps = torch.from_numpy(np.stack(maps, 1).astype(np.float32, copy=False)).to(x.device)
    return outputs, maps, probs, classes


def _grad_cam_maps(model: MultiExitNet, x: Tensor, method: str, classes: Tensor) -> Tensor:
    """grad-cam's ``(B, E, H, W)`` maps, one CAM object per exit (called under the lock).

    The parameters are frozen and the input made to require grad instead: the target layers'
    outputs still get gradients, and no weight gradients are computed or accumulated.
    """
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    for p in model.parameters():
        p.requires_grad_(False)
    x_in = x.detach().clone().requires_grad_(True)
    layers = model.cam_layers()
    maps = []
    for k in range(model.num_exits):
        result = None
        with _cam_object(method, ExitSelector(model, k), [layers[k]]) as cam:
            result = cam(input_tensor=x_in, targets=targets)
        if result is None:  # grad-cam's __exit__ swallows IndexError: do not return garbage
            raise RuntimeError(f"{EXPLAINER_LABELS[method]} failed on exit {k}")
        maps.append(torch.from_numpy(np.asarray(result, dtype=np.float32)))
    return torch.stack(maps, 1)


def explain(
    model: MultiExitNet,
    x: Tensor,
    method: str = "cam",
    target_classes: Tensor | None = None,
    lock: threading.RLock | None = None,
) -> Explanation:
    """Every exit's explanation of one class per image, for a batch ``x`` of ``(B, C, H, W)``.

    ``target_classes`` defaults to the final exit's prediction, and every exit explains that same
    class so that its map can be compared with the final exit's. The model is evaluated in eval
    mode and left exactly as it was found.

    ``lock`` (default: `model_lock(model)`) is held for the whole call. grad-cam's hooks fire on
    any forward pass through the model, so even the hook-free ``"cam"`` path takes it: its
    forward pass would otherwise be recorded by another thread's grad-cam run, and it could see
    (or its state snapshot capture and later restore) grad-cam's temporary eval mode and frozen
    parameters.
    """
    classes = _check_inputs(model, x, method, target_classes)
    device = next(model.parameters()).device
    x = x.detach().to(device)
    size = tuple(x.shape[-2:])
    lock = model_lock(model) if lock is None else lock
    # Results must be ordinary tensors, and grad-cam needs autograd, even if the caller runs
    # under no_grad or inference_mode.
    with lock, torch.inference_mode(False):
        if method == "cam":
            maps, raw, probs, classes = _trained_cams(model, x, classes, size)
            return Explanation(
                maps=maps.float().cpu(),
                raw_maps=raw.float().cpu(),
                probs=probs.float().cpu(),
                target_classes=classes.cpu(),
            )
        with preserved_state(model), torch.enable_grad():
            x = x.clone()  # an inference-mode tensor cannot enter autograd; a clone of it can
            if method in _SHARED_FORWARD:
                outputs, maps, probs, classes = _shared_forward_maps(model, x, method, classes)
            else:
                outputs, probs, classes = _forward(model.eval(), x, classes)
                maps = _grad_cam_maps(model, x, method, classes).to(device)
            grid = common_map_size([tuple(o.features.shape[-2:]) for o in outputs])
            del outputs  # frees the shared forward's graph
        with torch.no_grad():
            raw = F.relu(F.interpolate(maps, size=grid, mode="area"))
            maps = normalize_maps(F.relu(maps)).clamp_(0, 1)
        return Explanation(
            maps=maps.float().cpu(),
            raw_maps=raw.float().cpu(),
            probs=probs.detach().float().cpu(),
            target_classes=classes.detach().cpu(),
        )


def explain_consistency(expl: Explanation, k: float = 0.2) -> list[dict[str, Tensor]]:
    """Each early exit's agreement with the final exit, scored on ``raw_maps`` (see `Explanation`).

    One dict per early exit with ``cosine``, ``pearson``, ``spearman``, ``iou`` (top ``k``) and
    ``degenerate``, each of shape ``(B,)``.
    """
    return exit_consistency(expl.raw_maps, k=k)


# --------------------------------------------------------------------------- display


def overlay(
    image_rgb01: np.ndarray, heatmap01: np.ndarray, alpha: float = 0.5, colormap: str = "jet"
) -> np.ndarray:
    """Blend a colour-mapped heatmap over an image: ``(1 - alpha) * image + alpha * heat``.

    ``image_rgb01`` is ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` in [0, 1] (grey is repeated to
    RGB); ``heatmap01`` is ``(h, w)`` in [0, 1] and is resized to the image if needed. Returns an
    ``(H, W, 3)`` float32 RGB image in [0, 1], ready for panels and PNG export.
    """
    if colormap not in _CV2_COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose one of {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = np.asarray(image_rgb01, dtype=np.float32)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    heat = np.asarray(heatmap01, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be (H, W), got {heat.shape}")
    height, width = image.shape[:2]
    if heat.shape != (height, width):
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = np.nan_to_num(heat, nan=0.0).clip(0, 1)
    coloured = cv2.applyColorMap(np.uint8(np.round(heat * 255)), _CV2_COLORMAPS[colormap])
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    out = (1 - alpha) * image.clip(0, 1) + alpha * coloured
    return out.clip(0, 1).astype(np.float32)

"""Attention maps: shapes, kinds, differentiability, and agreement with pytorch_grad_cam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from egt_core.attention import ATTENTION_KINDS, attention_maps, normalize_maps
from egt_core.models import ExitSelector

pytestmark = pytest.mark.usefixtures("single_thread")


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_shape_and_non_negative(tiny_gray, gray_batch, kind):
    maps = attention_maps(tiny_gray(gray_batch), kind)
    assert maps.shape == (gray_batch.shape[0], tiny_gray.num_exits, 7, 7)
    assert torch.isfinite(maps).all()
    assert (maps >= 0).all()


def test_size_argument_resizes(tiny_rgb, rgb_batch):
    outs = tiny_rgb(rgb_batch)
    maps = attention_maps(outs, "cam", size=(32, 32))
    assert maps.shape == (4, 3, 32, 32)
    assert (maps >= 0).all()
    # Default size: the largest exit map (all 8x8 here).
    assert attention_maps(outs, "activation").shape == (4, 3, 8, 8)


def test_unknown_kind_raises(tiny_gray, gray_batch):
    with pytest.raises(ValueError, match="unknown attention kind"):
        attention_maps(tiny_gray(gray_batch), "saliency")


def test_cam_matches_definition(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    classes = torch.tensor([0, 1, 2, 3, 4, 5])
    maps = attention_maps(outs, "cam", classes=classes)
    for k, o in enumerate(outs):
        for i, c in enumerate(classes.tolist()):
            ref = torch.relu((o.weight[c][:, None, None] * o.features[i]).sum(0))
            torch.testing.assert_close(maps[i, k], ref)


def test_activation_matches_definition(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    maps = attention_maps(outs, "activation", p=2.0)
    for k, o in enumerate(outs):
        torch.testing.assert_close(maps[:, k], o.features.pow(2).mean(1))
    # Class-agnostic: the class argument is ignored.
    other = attention_maps(outs, "activation", classes=torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(other, maps)


def test_cam_is_differentiable(tiny_gray, gray_batch):
    tiny_gray.train()
    outs = tiny_gray(gray_batch)
    maps = attention_maps(outs, "cam", classes=torch.arange(6) % 10)
    tiny_gray.zero_grad()
    maps[:, 0].sum().backward()
    first_head = tiny_gray.heads[0]
    assert first_head.fc.weight.grad is not None and first_head.fc.weight.grad.abs().sum() > 0
    conv = tiny_gray.segments[0][0][0].weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0


def test_gradcam_is_differentiable(tiny_gray, gray_batch):
    tiny_gray.train()
    outs = tiny_gray(gray_batch)
    maps = attention_maps(outs, "gradcam", classes=torch.arange(6) % 10, create_graph=True)
    tiny_gray.zero_grad()
    maps[:, 1].sum().backward()
    w = tiny_gray.heads[1].fc.weight
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_class_argument_changes_cam(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    a = attention_maps(outs, "cam", classes=torch.zeros(6, dtype=torch.long))
    b = attention_maps(outs, "cam", classes=torch.ones(6, dtype=torch.long))
    assert not torch.allclose(a, b)


def test_default_classes_are_final_prediction(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    pred = outs[-1].logits.argmax(1)
    for kind in ("cam", "gradcam"):
        torch.testing.assert_close(
            attention_maps(outs, kind), attention_maps(outs, kind, classes=pred)
        )
    # and differs from explaining some other class
    other = (pred + 1) % tiny_gray.num_classes
    assert not torch.allclose(attention_maps(outs, "cam"), attention_maps(outs, "cam", other))


def test_gradcam_kind_matches_cam(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    classes = torch.arange(6) % 10
    cam = attention_maps(outs, "cam", classes=classes).detach()
    grad = attention_maps(outs, "gradcam", classes=classes, create_graph=False).detach()
    checked = 0
    for i in range(cam.shape[0]):
        for k in range(cam.shape[1]):
            a, b = cam[i, k].numpy(), grad[i, k].numpy()
            if a.max() <= 1e-8 or b.max() <= 1e-8 or a.std() == 0:
                assert np.allclose(a, 0, atol=1e-6) and np.allclose(b, 0, atol=1e-6)
                continue
            assert _pearson_rows(a[None], b[None])[0] > 0.99
            # For a conv -> GAP -> linear head Grad-CAM is CAM divided by h * w.
            h, w = outs[k].features.shape[-2:]
            np.testing.assert_allclose(b * h * w, a, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize(
    "model_name, batch_name", [("tiny_gray", "gray_batch"), ("tiny_rgb", "rgb_batch")]
)
def test_cam_equals_pytorch_grad_cam(model_name, batch_name, request):
    """Our CAM of each exit is the map grad-cam shows for that exit (up to scale)."""
    model = request.getfixturevalue(model_name)
    x = request.getfixturevalue(batch_name)
    model.eval()
    size = tuple(x.shape[-2:])
    with torch.no_grad():
        outs = model(x)
    n = x.shape[0]
    checked = 0
    for k in range(model.num_exits):
        # Explain each exit's own prediction (its CAM is then rarely all negative), plus a fixed
        # class per image.
        for classes in (outs[k].logits.argmax(1), torch.arange(n) % model.num_classes):
            ours = attention_maps(outs, "cam", classes=classes)[:, k : k + 1]
            ours = F.interpolate(ours, size=size, mode="bilinear", align_corners=False)
            mine = normalize_maps(ours)[:, 0].detach().numpy()
            result = None
            with GradCAM(
                model=ExitSelector(model, k), target_layers=[model.cam_layers()[k]]
            ) as cam:
                result = cam(
                    input_tensor=x.clone(),
                    targets=[ClassifierOutputTarget(int(c)) for c in classes],
                )
            assert result is not None  # grad-cam's __exit__ swallows IndexError: be sure it ran
            assert result.shape == (n, *size)
            for i in range(n):
                if np.ptp(result[i]) < 1e-6 or np.ptp(mine[i]) < 1e-6:
                    # degenerate (all-zero after ReLU): both must be
                    assert np.ptp(result[i]) < 1e-6 and np.ptp(mine[i]) < 1e-6, (k, i)
                    continue
                r = _pearson_rows(mine[i][None], result[i][None])[0]
                assert r > 0.99, f"exit {k} image {i}: correlation {r:.4f}"
                checked += 1
    assert checked >= model.num_exits * n // 2  # enough non-degenerate pairs were compared
    assert not model.training


def test_normalize_maps():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 5, 5) * 7 + 1
    maps[1, 2] = 3.0  # constant map -> zeros
    out = normalize_maps(maps)
    assert out.shape == maps.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1, 2], torch.zeros(5, 5))
    for i, j in [(0, 0), (0, 1), (1, 0)]:
        assert out[i, j].min() == 0 and torch.isclose(out[i, j].max(), torch.tensor(1.0))

"""Tests for `egt_core.explain`: shapes, agreement with grad-cam, state restoration, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import make_tiny_gray, make_tiny_rgb
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import egt_core.explain as explain_module
from egt_core.explain import (
    _SHARED_FORWARD,
    COLORMAPS,
    EXPLAINER_LABELS,
    EXPLAINERS,
    Explanation,
    explain,
    explain_consistency,
    model_lock,
    overlay,
    preserved_state,
)
from egt_core.models import ExitSelector, build_model

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def tiny_gray():
    torch.manual_seed(0)
    return build_model("small", 1, 10, input_size=28, widths=(4, 8, 8, 8), head_widths=(4, 8))


def tiny_rgb():
    torch.manual_seed(1)
    return build_model("small", 3, 5, input_size=32, widths=(4, 8, 8, 8), head_widths=(4, 8))


def randomize_bn(model: torch.nn.Module) -> None:
    """Give BatchNorm non-trivial running statistics so eval and train mode differ."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def gray():
    model = tiny_gray()
    randomize_bn(model)
    return model.eval()


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(getattr(m, name)) for m in model.modules() for name in HOOK_DICTS)


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_registry_names():
    assert set(EXPLAINERS) == {
        "cam",
        "gradcam",
        "gradcam++",
        "xgradcam",
        "layercam",
        "eigencam",
        "hirescam",
        "scorecam",
    }
    assert EXPLAINERS["cam"] is None
    assert set(EXPLAINER_LABELS) == set(EXPLAINERS)
    assert set(COLORMAPS) >= {"jet", "viridis", "inferno", "magma", "turbo", "hot"}


@pytest.mark.parametrize("method", list(EXPLAINERS))
@pytest.mark.parametrize("factory,size", [(tiny_gray, 28), (tiny_rgb, 32)])
def test_every_method_shapes_and_range(method, factory, size):
    model = factory().eval()
    torch.manual_seed(2)
    x = torch.randn(3, model.config["in_channels"], size, size)
    expl = explain(model, x, method)
    assert isinstance(expl, Explanation)
    grid = size // 4  # the small family's exits all sit on the final map's grid
    e, c = model.num_exits, model.num_classes
    assert expl.maps.shape == (3, e, size, size)
    assert expl.raw_maps.shape == (3, e, grid, grid)
    assert expl.probs.shape == (3, e, c)
    assert expl.target_classes.shape == (3,)
    for t in (expl.maps, expl.raw_maps, expl.probs):
        assert torch.isfinite(t).all()
    assert expl.maps.min() >= 0 and expl.maps.max() <= 1
    assert expl.raw_maps.min() >= 0
    torch.testing.assert_close(expl.probs.sum(-1), torch.ones(3, e))
    # default target: the final exit's prediction, the same class for every exit
    assert torch.equal(expl.target_classes, expl.probs[:, -1].argmax(1))
    # each map is min-max scaled: its max is 1 unless the map is all zero
    peak = expl.maps.flatten(2).amax(-1)
    assert torch.all(((peak - 1).abs() < 1e-5) | (peak == 0))


def test_cam_matches_gradcam_up_to_scale(gray):
    torch.manual_seed(3)
    x = torch.randn(6, 1, 28, 28)
    cam = explain(gray, x, "cam")
    grad = explain(gray, x, "gradcam", target_classes=cam.target_classes)
    a, b = cam.maps.flatten(0, 1), grad.maps.flatten(0, 1)
    ok = (a.flatten(1).std(1) > 1e-6) & (b.flatten(1).std(1) > 1e-6)
    assert ok.sum() >= 6, "too many degenerate maps to compare"
    r = pearson_rows(a[ok], b[ok])
    assert r.min() > 0.99, r
    # and the scores computed on raw maps agree closely too
    for sc, sg in zip(explain_consistency(cam), explain_consistency(grad), strict=True):
        keep = ~(sc["degenerate"] | sg["degenerate"])
        assert torch.allclose(sc["pearson"][keep], sg["pearson"][keep], atol=0.05)


def package_maps(model, x: torch.Tensor, method: str, classes: torch.Tensor) -> torch.Tensor:
    """What a grad-cam user gets: one package object and call per exit, ``(B, E, H, W)``."""
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    layers = model.cam_layers()
    maps = []
    for k in range(model.num_exits):
        with EXPLAINERS[method](model=ExitSelector(model, k), target_layers=[layers[k]]) as cam:
            maps.append(cam(input_tensor=x, targets=targets))
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.stack(maps, 1))


@pytest.mark.parametrize("method", sorted(_SHARED_FORWARD))
@pytest.mark.parametrize(
    "factory,shape", [(make_tiny_gray, (6, 1, 28, 28)), (make_tiny_rgb, (4, 3, 32, 32))]
)
def test_shared_forward_equals_package_per_exit(method, factory, shape, single_thread):
    model = factory()
    torch.manual_seed(3)
    x = torch.randn(*shape)
    other = (torch.arange(shape[0]) * 3 + 1) % model.num_classes
    for classes in (None, other):
        expl = explain(model, x, method, target_classes=classes)
        want = package_maps(model, x, method, expl.target_classes)
        assert expl.maps.shape == want.shape
        assert (want.flatten(2).amax(-1) > 0.5).sum() >= shape[0], "too few non-trivial maps"
        assert (expl.maps - want).abs().max() < 1e-4
        # before explain()'s own display scaling, the maps are the package's, bit for bit
        with explain_module.preserved_state(model), torch.enable_grad():
            _, maps, _, _ = explain_module._shared_forward_maps(
                model, x, method, expl.target_classes
            )
        torch.testing.assert_close(maps, want, rtol=0, atol=1e-6)
        assert hook_count(model) == 0


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_shared_forward_runs_one_forward_and_registers_no_hooks(gray, method, monkeypatch):
    calls = []
    handle = gray.segments[0].register_forward_hook(lambda *a: calls.append(1))
    registered = []
    original = torch.nn.Module.register_forward_hook

    def spy(self, *args, **kwargs):
        registered.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", spy)
    try:
        explain(gray, torch.randn(2, 1, 28, 28), method)
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward pass for all exits and the prediction
    assert registered == []
    assert hook_count(gray) == 0


def test_cam_on_eval_model_leaves_it_untouched(gray):
    params = list(gray.parameters())
    params[1].requires_grad_(False)
    p = params[0]
    p.grad = torch.ones_like(p)
    grad = p.grad
    try:
        expl = explain(gray, torch.randn(2, 1, 28, 28), "cam")
        assert not any(m.training for m in gray.modules())
        assert p.grad is grad and torch.equal(grad, torch.ones_like(p))
        assert [q.requires_grad for q in params] == [i != 1 for i in range(len(params))]
        assert not expl.maps.requires_grad and hook_count(gray) == 0
    finally:
        p.grad = None
        params[1].requires_grad_(True)


@pytest.mark.parametrize("method", ["cam", "gradcam", "layercam", "eigencam", "scorecam"])
def test_model_state_restored(method):
    model = tiny_gray()
    randomize_bn(model)
    model.train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[3].requires_grad_(False)
    torch.manual_seed(4)
    grads = {}
    for i, p in enumerate(params):
        if i % 2 == 0:
            p.grad = torch.randn_like(p)
            grads[i] = (p.grad, p.grad.clone())
    requires = [p.requires_grad for p in params]
    user_calls = []
    handle = model.heads[0].register_forward_hook(lambda *a: user_calls.append(1))
    hooks_before = hook_count(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    x = torch.randn(2, 1, 28, 28)
    expl = explain(model, x, method)

    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in params] == requires
    for i, p in enumerate(params):
        if i in grads:
            assert p.grad is grads[i][0]
            assert torch.equal(p.grad, grads[i][1])
        else:
            assert p.grad is None
    assert hook_count(model) == hooks_before  # the user's hook stays, grad-cam's are gone
    for m in model.modules():
        for name in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            assert not getattr(m, name) or m is model.heads[0]
    assert len(user_calls) >= 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # eval mode: BN running stats untouched
    handle.remove()
    assert hook_count(model) == 0

    # explanations are computed in eval mode whatever the caller's mode
    again = explain(model.eval(), x, method)
    torch.testing.assert_close(expl.maps, again.maps)


def test_preserved_state_removes_leaked_hooks_and_restores_grads():
    model = tiny_gray()
    p = next(model.parameters())
    p.grad = torch.ones_like(p)
    original = p.grad
    with preserved_state(model):
        model.eval()
        model.zero_grad()
        model.heads[1].register_forward_hook(lambda *a: None)
        model.heads[1].register_forward_pre_hook(lambda *a: None)
        model.heads[2].register_full_backward_hook(lambda *a: None)
        p.requires_grad_(False)
    assert model.training and p.requires_grad
    assert p.grad is original and torch.equal(p.grad, torch.ones_like(p))
    assert hook_count(model) == 0
    assert model.heads[2]._is_full_backward_hook is None


def test_explicit_target_classes(gray):
    torch.manual_seed(5)
    x = torch.randn(2, 1, 28, 28)
    a = explain(gray, x, "cam", target_classes=torch.tensor([1, 2]))
    b = explain(gray, x, "cam", target_classes=torch.tensor([3, 4]))
    assert a.target_classes.tolist() == [1, 2]
    assert b.target_classes.tolist() == [3, 4]
    assert not torch.allclose(a.raw_maps, b.raw_maps)
    torch.testing.assert_close(a.probs, b.probs)  # the class does not change the prediction
    g = explain(gray, x, "gradcam", target_classes=torch.tensor([1, 2]))
    assert g.target_classes.tolist() == [1, 2]


def test_validation_errors(gray):
    x = torch.randn(2, 1, 28, 28)
    with pytest.raises(ValueError, match="gradcam"):
        explain(gray, x, "nope")
    with pytest.raises(ValueError):
        explain(gray, torch.randn(2, 3, 28, 28))  # wrong channel count
    with pytest.raises(ValueError):
        explain(gray, torch.randn(1, 28, 28))  # missing batch dimension
    with pytest.raises(ValueError):
        explain(gray, torch.zeros(2, 1, 28, 28, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        explain(gray, x, target_classes=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="out of range"):
        explain(gray, x, "gradcam", target_classes=torch.tensor([-1, 0]))
    with pytest.raises(ValueError):
        explain(gray, x, target_classes=torch.tensor([0, 1, 2]))  # one class per image
    with pytest.raises(ValueError):
        explain(gray, x, target_classes=torch.tensor([0.0, 1.0]))
    assert hook_count(gray) == 0


def test_concurrent_calls_match_sequential(gray):
    torch.manual_seed(6)
    images = [torch.randn(2, 1, 28, 28) for _ in range(4)]
    methods = ["gradcam", "cam", "gradcam++", "cam"]
    expected = [explain(gray, x, m) for x, m in zip(images, methods, strict=True)]
    results: dict[tuple[int, int], Explanation] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(5):
                results[t, i] = explain(gray, images[t], methods[t])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 20
    for (t, _), got in results.items():
        want = expected[t]
        torch.testing.assert_close(got.maps, want.maps)
        torch.testing.assert_close(got.raw_maps, want.raw_maps)
        torch.testing.assert_close(got.probs, want.probs)
        assert torch.equal(got.target_classes, want.target_classes)
    assert hook_count(gray) == 0


def test_model_lock_is_per_model(gray):
    assert model_lock(gray) is model_lock(gray)
    assert model_lock(gray) is not model_lock(tiny_gray())


@pytest.mark.parametrize("method", ["cam", "gradcam", "eigencam"])
def test_works_under_inference_mode(gray, method):
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        expl = explain(gray, x, method)
    again = explain(gray, x, method)
    for got, want in zip(
        (expl.maps, expl.raw_maps, expl.probs),
        (again.maps, again.raw_maps, again.probs),
        strict=True,
    ):
        assert not got.is_inference()  # ordinary tensors, usable outside inference mode
        torch.testing.assert_close(got, want)


def test_explain_consistency(gray):
    torch.manual_seed(7)
    expl = explain(gray, torch.randn(3, 1, 28, 28), "cam")
    scores = explain_consistency(expl, k=0.3)
    assert len(scores) == gray.num_exits - 1
    for s in scores:
        assert set(s) == {"cosine", "pearson", "spearman", "iou", "degenerate"}
        for v in s.values():
            assert v.shape == (3,)
        assert s["degenerate"].dtype == torch.bool
        assert torch.isfinite(s["cosine"]).all()
    # the final exit against itself would be perfectly consistent
    same = Explanation(expl.maps, expl.raw_maps[:, [-1, -1]], expl.probs, expl.target_classes)
    s = explain_consistency(same)[0]
    keep = ~s["degenerate"]
    assert torch.allclose(s["pearson"][keep], torch.ones(int(keep.sum())), atol=1e-5)


@pytest.mark.parametrize("colormap", COLORMAPS)
def test_overlay(colormap):
    rng = np.random.default_rng(0)
    image = rng.random((28, 28, 3))
    heat = rng.random((28, 28))
    out = overlay(image, heat, alpha=0.4, colormap=colormap)
    assert out.shape == (28, 28, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert overlay(image[..., 0], rng.random((7, 7)), colormap=colormap).shape == (28, 28, 3)
    np.testing.assert_allclose(overlay(image, heat, alpha=0.0), image, atol=1e-6)


def test_overlay_rejects_bad_arguments():
    with pytest.raises(ValueError):
        overlay(np.zeros((4, 4, 3)), np.zeros((4, 4)), colormap="rainbow-ish")
    with pytest.raises(ValueError):
        overlay(np.zeros((4, 4, 3)), np.zeros((4, 4)), alpha=1.5)

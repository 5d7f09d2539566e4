"""Multi-exit models: output structure, exit selection, BN folding, FLOPs, map grids."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GRAY, make_tiny_gray, randomize_bn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from egt_core.models import (
    ExitCosts,
    ExitOutput,
    ExitSelector,
    MultiExitNet,
    build_model,
    common_map_size,
    exit_costs,
    feature_grid,
    flops_per_exit,
    fuse_for_inference,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- structure


def test_build_model_output_structure(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    assert isinstance(tiny_gray, MultiExitNet)
    assert tiny_gray.num_exits == 3 and tiny_gray.num_classes == 10
    assert isinstance(outs, list) and len(outs) == tiny_gray.num_exits
    assert all(isinstance(o, ExitOutput) for o in outs)
    b = gray_batch.shape[0]
    # widths (4, 8, 8, 8), head widths (4, 8): CAM channels 4, 8, then the backbone's 8.
    for o, k in zip(outs, (4, 8, 8), strict=True):
        assert o.logits.shape == (b, 10)
        assert o.features.shape == (b, k, 7, 7)
        assert o.weight.shape == (10, k)
    for o, head in zip(outs, tiny_gray.heads, strict=True):
        assert o.weight is head.fc.weight
    # The features are the CAM layers' outputs (what grad-cam hooks see).
    seen = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out))
        for m in tiny_gray.cam_layers()
    ]
    try:
        outs = tiny_gray(gray_batch)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 3
    for o, s in zip(outs, seen, strict=True):
        torch.testing.assert_close(o.features, s)


def test_build_model_rgb_shapes(tiny_rgb, rgb_batch):
    outs = tiny_rgb(rgb_batch)
    assert [tuple(o.features.shape) for o in outs] == [(4, 4, 8, 8), (4, 8, 8, 8), (4, 8, 8, 8)]
    assert all(o.logits.shape == (4, 5) for o in outs)


def test_default_small_model_shapes():
    torch.manual_seed(0)
    model = build_model("small", 1, 10).eval()
    outs = model(torch.randn(2, 1, 28, 28))
    assert [tuple(o.features.shape[1:]) for o in outs] == [(48, 7, 7), (128, 7, 7), (160, 7, 7)]
    assert [tuple(o.weight.shape) for o in outs] == [(10, 48), (10, 128), (10, 160)]


def test_model_config_is_recorded():
    model = build_model("small", 1, 10, **TINY_GRAY)
    assert model.arch == "small"
    assert model.config == {"in_channels": 1, "num_classes": 10, **TINY_GRAY}


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet9000", 1, 10)


@pytest.mark.parametrize("in_channels, num_classes", [(0, 10), (1, 1)])
def test_bad_channels_or_classes_raise(in_channels, num_classes):
    with pytest.raises(ValueError):
        build_model("small", in_channels, num_classes, **TINY_GRAY)


def test_mismatched_segments_and_heads_raise():
    torch.manual_seed(0)
    model = build_model("small", 1, 10, **TINY_GRAY)
    with pytest.raises(ValueError):
        MultiExitNet(list(model.segments), list(model.heads)[:2], "small", {})
    with pytest.raises(ValueError):
        MultiExitNet(list(model.segments)[:1], list(model.heads)[:1], "small", {})


# --------------------------------------------------------------------------- exit selection


def test_exit_logits_match_forward(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    for k in range(tiny_gray.num_exits):
        torch.testing.assert_close(tiny_gray.exit_logits(gray_batch, k), outs[k].logits)


def test_exit_logits_runs_no_other_head(tiny_gray, gray_batch):
    called = []
    hooks = [
        head.register_forward_hook(lambda *_a, i=i: called.append(i))
        for i, head in enumerate(tiny_gray.heads)
    ]
    try:
        tiny_gray.exit_logits(gray_batch, 1)
        assert called == [1]
        called.clear()
        tiny_gray.full_path(gray_batch)
        assert called == [2]
    finally:
        for h in hooks:
            h.remove()


def test_full_path_equals_last_exit(tiny_gray, gray_batch):
    torch.testing.assert_close(tiny_gray.full_path(gray_batch), tiny_gray(gray_batch)[-1].logits)


def test_exit_selector(tiny_gray, gray_batch):
    outs = tiny_gray(gray_batch)
    for k in range(tiny_gray.num_exits):
        sel = ExitSelector(tiny_gray, k)
        y = sel(gray_batch)
        assert isinstance(y, torch.Tensor)
        torch.testing.assert_close(y, outs[k].logits)
    # It shares (does not copy) the model's parameters, so grad-cam sees the real model.
    sel = ExitSelector(tiny_gray, 0)
    assert {id(p) for p in sel.parameters()} == {id(p) for p in tiny_gray.parameters()}


# --------------------------------------------------------------------------- BN folding


def test_fuse_for_inference_matches_eval_model(tiny_gray, gray_batch):
    tiny_gray.train()  # fusing must not depend on (or change) the source model's mode
    fused = fuse_for_inference(tiny_gray)
    assert tiny_gray.training
    assert not fused.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny_gray.modules())
    tiny_gray.eval()
    with torch.no_grad():
        ref = tiny_gray(gray_batch)
        got = fused(gray_batch)
        for r, g in zip(ref, got, strict=True):
            torch.testing.assert_close(g.logits, r.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g.features, r.features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            fused.full_path(gray_batch), ref[-1].logits, atol=1e-5, rtol=1e-5
        )


def test_fuse_for_inference_rgb(tiny_rgb, rgb_batch):
    fused = fuse_for_inference(tiny_rgb)
    with torch.no_grad():
        for r, g in zip(tiny_rgb(rgb_batch), fused(rgb_batch), strict=True):
            torch.testing.assert_close(g.logits, r.logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- FLOPs


@pytest.fixture(scope="module")
def default_costs() -> tuple[list[int], ExitCosts]:
    torch.manual_seed(0)
    model = build_model("small", 1, 10)
    return flops_per_exit(model, (1, 28, 28)), exit_costs(model, (1, 28, 28))


def test_flops_exits_placed_by_compute(default_costs):
    flops, _ = default_costs
    assert len(flops) == 3
    full = flops[-1]
    assert 0.20 <= flops[0] / full <= 0.30
    assert 0.45 <= flops[1] / full <= 0.60
    assert flops[0] < flops[1] < flops[2]


def test_flops_heads_are_cheap(default_costs):
    flops, costs = default_costs
    assert len(costs.heads) == len(costs.segments) == 3
    for h in costs.heads:
        assert 0 < h <= 0.05 * flops[-1]


def test_flops_last_is_full_path(default_costs):
    flops, costs = default_costs
    assert flops[-1] == costs.full_path == sum(costs.segments) + costs.heads[-1]
    for k in range(2):
        assert flops[k] == costs.answer_at(k)
    # Independent counts: the full path alone, and every exit run in one forward.
    torch.manual_seed(0)
    model = build_model("small", 1, 10).eval()
    x = torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        assert _flops(lambda: model.full_path(x)) == costs.full_path
        assert _flops(lambda: model(x)) == costs.answer_at(2)


def test_exit_costs_restores_mode(tiny_gray):
    tiny_gray.train()
    exit_costs(tiny_gray, (1, 28, 28))
    assert tiny_gray.training
    tiny_gray.eval()
    exit_costs(tiny_gray, (1, 28, 28))
    assert not tiny_gray.training


# --------------------------------------------------------------------------- map grids


def test_feature_grid(tiny_gray, tiny_rgb):
    assert feature_grid(tiny_gray, (1, 28, 28)) == [(7, 7)] * 3
    assert feature_grid(tiny_rgb, (3, 32, 32)) == [(8, 8)] * 3
    torch.manual_seed(0)
    big = build_model("small", 3, 4, input_size=64, widths=(4, 8, 8, 8), head_widths=(4, 8))
    assert feature_grid(big, (3, 64, 64)) == [(8, 8)] * 3  # stride-2 stem from 48 px
    grid = feature_grid(big, (3, 40, 40))
    assert all(isinstance(s, tuple) and len(s) == 2 for s in grid)


def test_feature_grid_keeps_training_mode():
    model = randomize_bn(make_tiny_gray().train())
    feature_grid(model, (1, 28, 28))
    assert model.training
    assert all(m.training for m in model.modules())


def test_common_map_size():
    assert common_map_size([(7, 7), (14, 14), (7, 7)]) == (14, 14)
    assert common_map_size([(4, 4)]) == (4, 4)
    assert common_map_size([(2, 9), (4, 4)]) == (2, 9)  # by area

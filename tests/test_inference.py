"""Early-exit inference: batched compaction equals one-at-a-time; cost accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_gray, make_tiny_rgb

from egt_core.inference import (
    EarlyExitResult,
    exit_mix,
    expected_flops,
    flop_ideal_speedup,
    predict,
)
from egt_core.models import ExitCosts, MultiExitNet, exit_costs

pytestmark = pytest.mark.usefixtures("single_thread")

THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0, 1.5]


def _varied_inputs(b: int, c: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random patterns plus noise: inputs a random network tells apart."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(b, c, 4, 4, generator=g) * 2
    smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return smooth + 0.5 * torch.randn(b, c, size, size, generator=g)


def _calibrate(model: MultiExitNet, x: torch.Tensor, spread: float = 2.0) -> MultiExitNet:
    """Rescale every head so its logits vary across images (std ``spread``), centred per class.

    A random network's logits are nearly the same for every input (the fc bias dominates), so
    every image would leave at the same exit; after this, confidences spread over (0.1, 1) and
    the thresholds below exercise every exit.
    """
    with torch.no_grad():
        for head in model.heads:
            head.fc.bias.zero_()
        for head, out in zip(model.heads, model(x), strict=True):
            scale = spread / (out.logits - out.logits.mean(0)).std()
            head.fc.weight.mul_(scale)
            head.fc.bias.copy_(-out.logits.mean(0) * scale)
    return model


@pytest.fixture(scope="module")
def cases():
    out = []
    for make, c, size, n, seed in [(make_tiny_gray, 1, 28, 10, 0), (make_tiny_rgb, 3, 32, 8, 1)]:
        model = _calibrate(make(seed=4), _varied_inputs(16, c, size, seed))
        out.append((model, _varied_inputs(n, c, size, seed + 100)))  # fresh inputs
    return out


def reference(model: MultiExitNet, x: torch.Tensor, threshold: float):
    """Hand-written rule: run every exit, answer at the first with max softmax >= threshold."""
    with torch.no_grad():
        probs = [o.logits.softmax(1) for o in model(x)]
    last = model.num_exits - 1
    pred, idx, conf = [], [], []
    for i in range(x.shape[0]):
        for k in range(model.num_exits):
            c, p = probs[k][i].max(0)
            if k == last or (threshold <= 1 and c >= threshold):
                pred.append(int(p))
                idx.append(k)
                conf.append(float(c))
                break
    return torch.tensor(pred), torch.tensor(idx), torch.tensor(conf), probs


def _nan_rows(p: torch.Tensor) -> torch.Tensor:
    return torch.isnan(p).all(1)


def test_predict_matches_references(cases):
    seen_exits = set()
    for model, x in cases:
        for t in THRESHOLDS:
            r = predict(model, x, t)
            assert isinstance(r, EarlyExitResult)
            pred, idx, conf, probs = reference(model, x, t)
            assert torch.equal(r.exit_index, idx), t
            assert torch.equal(r.prediction, pred), t
            torch.testing.assert_close(r.confidence, conf, atol=1e-4, rtol=1e-4)
            assert r.prediction.dtype == torch.long and r.exit_index.dtype == torch.long
            seen_exits |= set(idx.tolist())
            # exit_probs: computed rows equal the forward pass, NaN exactly elsewhere
            assert len(r.exit_probs) == model.num_exits
            for k, p in enumerate(r.exit_probs):
                assert p.shape == (x.shape[0], model.num_classes)
                computed = idx >= k if t <= 1 else torch.full_like(idx, k == 2, dtype=torch.bool)
                nan = _nan_rows(p)
                assert torch.equal(nan, ~computed), (t, k)
                assert not torch.isnan(p[computed]).any()
                torch.testing.assert_close(p[computed], probs[k][computed], atol=1e-4, rtol=1e-4)
            # one sample at a time (the n == 1 path) gives the same decisions
            for i in range(x.shape[0]):
                one = predict(model, x[i : i + 1], t)
                assert one.exit_index.item() == r.exit_index[i].item(), (t, i)
                assert one.prediction.item() == r.prediction[i].item(), (t, i)
                assert abs(one.confidence.item() - r.confidence[i].item()) < 1e-4
                for k in range(model.num_exits):
                    assert bool(_nan_rows(one.exit_probs[k])[0]) == bool(
                        _nan_rows(r.exit_probs[k])[i]
                    )
    assert seen_exits == {0, 1, 2}  # the thresholds exercised every exit


def test_threshold_is_inclusive(cases):
    """max softmax == threshold exits (>=), in the batched and the batch-of-one path."""
    model, x = cases[0]
    first = predict(model, x, 0.0).confidence  # exit 0's max softmax for every row
    i = int(first.argmax())
    got = predict(model, x, float(first[i]))
    assert got.exit_index[i] == 0
    assert torch.equal(got.exit_index == 0, first >= first[i])
    one = x[i : i + 1]
    t = float(predict(model, one, 0.0).confidence[0])  # computed at batch size 1
    assert predict(model, one, t).exit_index[0] == 0


def test_mixed_thresholds_use_every_exit(cases):
    model, x = cases[0]
    mixes = [exit_mix(predict(model, x, t), model.num_exits) for t in (0.5, 0.7, 0.9)]
    assert any(m[0] > 0 and m[1] + m[2] > 0 for m in mixes)


def test_threshold_zero_all_exit_zero(cases):
    for model, x in cases:
        r = predict(model, x, 0.0)
        assert (r.exit_index == 0).all()
        for k in (1, 2):
            assert _nan_rows(r.exit_probs[k]).all()
        assert not torch.isnan(r.exit_probs[0]).any()


def test_threshold_above_one_runs_full_path_only(cases):
    model, x = cases[0]
    calls = {k: 0 for k in range(model.num_exits)}
    hooks = [
        head.register_forward_hook(lambda *_a, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, head in enumerate(model.heads)
    ]
    try:
        r = predict(model, x, 1.5)
        assert calls == {0: 0, 1: 0, 2: 1}
        predict(model, x[:1], 2.0)
        assert calls == {0: 0, 1: 0, 2: 2}
    finally:
        for h in hooks:
            h.remove()
    assert (r.exit_index == 2).all()
    assert _nan_rows(r.exit_probs[0]).all() and _nan_rows(r.exit_probs[1]).all()
    with torch.no_grad():
        full = model.full_path(x).softmax(1)
    torch.testing.assert_close(r.exit_probs[2], full)
    torch.testing.assert_close(r.prediction, full.argmax(1))
    torch.testing.assert_close(r.confidence, full.max(1).values)


def test_compaction_runs_later_segments_on_remaining_rows(cases):
    model, x = cases[0]
    sizes = {k: [] for k in range(model.num_exits)}
    hooks = [
        seg.register_forward_hook(lambda _m, inp, _o, k=k: sizes[k].append(inp[0].shape[0]))
        for k, seg in enumerate(model.segments)
    ]
    try:
        for t in (0.5, 0.7, 0.9):
            for v in sizes.values():
                v.clear()
            r = predict(model, x, t)
            mix = exit_mix(r, model.num_exits)
            remaining = [x.shape[0], x.shape[0] - mix[0], x.shape[0] - mix[0] - mix[1]]
            for k in range(model.num_exits):
                assert sizes[k] == ([remaining[k]] if remaining[k] else []), (t, k)
    finally:
        for h in hooks:
            h.remove()


def test_predict_does_not_track_grad(cases):
    model, x = cases[1]
    r = predict(model, x, 0.6)
    assert not r.confidence.requires_grad and not r.exit_probs[-1].requires_grad


# --------------------------------------------------------------------------- cost accounting


def _result(indices: list[int]) -> EarlyExitResult:
    n = len(indices)
    return EarlyExitResult(
        torch.zeros(n, dtype=torch.long), torch.tensor(indices), torch.zeros(n), []
    )


def test_exit_mix():
    assert exit_mix(_result([0, 2, 2, 1, 0, 2]), 3) == [2, 1, 3]
    assert exit_mix(_result([2, 2]), 3) == [0, 0, 2]
    assert exit_mix(_result([0]), 4) == [1, 0, 0, 0]


@pytest.fixture(scope="module")
def costs() -> ExitCosts:
    return exit_costs(make_tiny_gray(), (1, 28, 28))


def test_expected_flops(costs):
    assert expected_flops([0, 0, 7], costs) == costs.answer_at(2)
    assert expected_flops([5, 0, 0], costs) == costs.answer_at(0)
    assert expected_flops([0, 3, 0], costs) == costs.answer_at(1)
    mix = [2, 1, 1]
    ref = (2 * costs.answer_at(0) + costs.answer_at(1) + costs.answer_at(2)) / 4
    assert math.isclose(expected_flops(mix, costs), ref)
    assert expected_flops([0, 0, 0], costs) == 0.0
    # answer_at includes every head on the way
    assert costs.answer_at(2) == sum(costs.segments) + sum(costs.heads)
    assert costs.answer_at(2) > costs.full_path


def test_flop_ideal_speedup(costs):
    assert math.isclose(flop_ideal_speedup([4, 0, 0], costs), costs.full_path / costs.answer_at(0))
    assert flop_ideal_speedup([4, 0, 0], costs) > 1
    # all at the final exit in early-exit mode: the early heads are pure overhead
    assert flop_ideal_speedup([0, 0, 4], costs) < 1
    mix = [1, 2, 1]
    assert math.isclose(
        flop_ideal_speedup(mix, costs), costs.full_path / expected_flops(mix, costs)
    )


def test_threshold_above_one_costs_the_plain_full_path(costs):
    # predict runs no early head when threshold > 1, so the mix [0, 0, n] costs the full path
    assert expected_flops([0, 0, 4], costs, threshold=1.01) == costs.full_path
    assert flop_ideal_speedup([0, 0, 4], costs, threshold=1.01) == 1.0
    assert expected_flops([0, 0, 4], costs, threshold=0.9) == costs.answer_at(2)
    assert expected_flops([0, 0, 0], costs, threshold=1.01) == 0.0


def test_mix_from_predict_matches_costs(cases):
    model, x = cases[0]
    c = exit_costs(model, (1, 28, 28))
    r = predict(model, x, 0.0)
    assert math.isclose(flop_ideal_speedup(exit_mix(r, 3), c), c.full_path / c.answer_at(0))

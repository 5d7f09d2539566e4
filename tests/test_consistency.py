"""Map-agreement scores: identities, symmetry, scale, ranges, degenerate maps, references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import spearmanr

from egt_core.consistency import (
    METRICS,
    consistency_scores,
    cosine,
    degenerate,
    exit_consistency,
    pearson,
    spearman,
    topk_iou,
)

pytestmark = pytest.mark.usefixtures("single_thread")

FUNCS = {"cosine": cosine, "pearson": pearson, "spearman": spearman, "iou": topk_iou}
RANGES = {"cosine": (0, 1), "iou": (0, 1), "pearson": (-1, 1), "spearman": (-1, 1)}


def _rand_maps(seed: int, b: int = 5, h: int = 6, w: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(b, h, w, generator=g))


# --------------------------------------------------------------------------- basic properties


@pytest.mark.parametrize("name", METRICS)
def test_identity_is_one(name):
    a = _rand_maps(0)
    torch.testing.assert_close(FUNCS[name](a, a), torch.ones(5))


@pytest.mark.parametrize("name", METRICS)
def test_symmetric(name):
    a, b = _rand_maps(0), _rand_maps(1)
    torch.testing.assert_close(FUNCS[name](a, b), FUNCS[name](b, a))


@pytest.mark.parametrize("name", METRICS)
def test_positive_scale_invariant(name):
    a, b = _rand_maps(0), _rand_maps(1)
    ref = FUNCS[name](a, b)
    for s in (0.5, 2.0, 1024.0):  # powers of two: exact, so ranks and top-k sets are unchanged
        torch.testing.assert_close(FUNCS[name](s * a, b), ref)
        torch.testing.assert_close(FUNCS[name](a, s * b), ref)
    if name in ("cosine", "pearson"):
        torch.testing.assert_close(FUNCS[name](3.7 * a, 0.013 * b), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", METRICS)
def test_range(name):
    lo, hi = RANGES[name]
    for seed in range(4):
        s = FUNCS[name](_rand_maps(seed), _rand_maps(seed + 10))
        assert ((s >= lo) & (s <= hi)).all()
    if name in ("pearson", "spearman"):
        a = torch.arange(16.0).view(1, 4, 4)
        torch.testing.assert_close(FUNCS[name](a, 15 - a), torch.tensor([-1.0]))


@pytest.mark.parametrize("name", METRICS)
def test_all_zero_map_scores_zero_and_is_flagged(name):
    a = _rand_maps(0, b=3)
    z = a.clone()
    z[1] = 0.0
    s = FUNCS[name](a, z)
    assert not torch.isnan(s).any()
    assert s[1] == 0.0
    assert s[0] == 1.0 and s[2] == 1.0
    assert FUNCS[name](z, z)[1] == 0.0  # even against itself
    assert degenerate(a, z).tolist() == [False, True, False]
    assert degenerate(z, a).tolist() == [False, True, False]
    # a constant non-zero map is degenerate too (no ranking, no spatial direction)
    c = a.clone()
    c[2] = 0.3
    assert degenerate(a, c).tolist() == [False, False, True]
    assert FUNCS[name](a, c)[2] == 0.0


def test_flat_input_accepted():
    a, b = _rand_maps(0).flatten(1), _rand_maps(1).flatten(1)
    for name, f in FUNCS.items():
        torch.testing.assert_close(f(a, b), f(a.view(5, 6, 6), b.view(5, 6, 6)), msg=name)


# --------------------------------------------------------------------------- references


def test_pearson_equals_numpy():
    a, b = _rand_maps(3, b=6), _rand_maps(4, b=6)
    got = pearson(a, b)
    for i in range(6):
        ref = np.corrcoef(a[i].flatten().numpy(), b[i].flatten().numpy())[0, 1]
        assert abs(got[i].item() - ref) < 1e-6


def test_cosine_equals_numpy():
    a, b = _rand_maps(3), _rand_maps(4)
    got = cosine(a, b)
    for i in range(5):
        va, vb = a[i].flatten().double().numpy(), b[i].flatten().double().numpy()
        ref = va @ vb / np.linalg.norm(va) / np.linalg.norm(vb)
        assert abs(got[i].item() - ref) < 1e-6


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(5)
    # small integers: many ties (ReLU'd maps are full of zeros, the extreme case of ties)
    a = torch.randint(0, 4, (8, 5, 5), generator=g).float()
    b = torch.randint(0, 4, (8, 5, 5), generator=g).float()
    b[0] = a[0]  # identical with ties
    b[1] = 3 - a[1]  # perfectly anti-monotone with ties
    got = spearman(a, b)
    for i in range(8):
        ref = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert abs(got[i].item() - ref) < 1e-6, (i, got[i].item(), ref)
    torch.testing.assert_close(got[0], torch.tensor(1.0))
    torch.testing.assert_close(got[1], torch.tensor(-1.0))
    # ReLU'd continuous maps (ties only at zero)
    a, b = _rand_maps(6), _rand_maps(7)
    got = spearman(a, b)
    for i in range(5):
        ref = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert abs(got[i].item() - ref) < 1e-6


def test_topk_iou_known_example():
    a = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5]])
    b = torch.tensor([[9.0, 0.1, 8.0, 7.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]])
    # top 30% = 3 pixels: a -> {0, 1, 2}, b -> {0, 2, 3}; IoU = 2 / 4
    torch.testing.assert_close(topk_iou(a, b, k=0.3), torch.tensor([0.5]))
    # top 10% = 1 pixel: both {0}
    torch.testing.assert_close(topk_iou(a, b, k=0.1), torch.tensor([1.0]))
    # top 20% = 2 pixels: a -> {0, 1}, b -> {0, 2}: 1 / 3
    torch.testing.assert_close(topk_iou(a, b, k=0.2), torch.tensor([1 / 3]))
    # k rounds up: 25% of 10 -> 3 pixels
    torch.testing.assert_close(topk_iou(a, b, k=0.25), torch.tensor([0.5]))
    # k = 1: all pixels
    torch.testing.assert_close(topk_iou(a, b, k=1.0), torch.tensor([1.0]))
    # disjoint
    c = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]])
    torch.testing.assert_close(topk_iou(a, c, k=0.3), torch.tensor([0.0]))


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5])
def test_topk_iou_bad_k(k):
    a = _rand_maps(0)
    with pytest.raises(ValueError):
        topk_iou(a, a, k)


def test_consistency_scores_and_exit_consistency():
    a, b = _rand_maps(0), _rand_maps(1)
    b[3] = 0
    out = consistency_scores(a, b, k=0.3)
    assert set(out) == set(METRICS) | {"degenerate"}
    torch.testing.assert_close(out["iou"], topk_iou(a, b, 0.3))
    torch.testing.assert_close(out["spearman"], spearman(a, b))
    assert out["degenerate"].tolist() == [False, False, False, True, False]
    with pytest.raises(ValueError, match="unknown metric"):
        consistency_scores(a, b, metrics=("ssim_typo",))
    maps = torch.stack([a, b, a], 1)  # (B, E=3, H, W)
    per_exit = exit_consistency(maps, k=0.3)
    assert len(per_exit) == 2
    torch.testing.assert_close(per_exit[0]["cosine"], torch.ones(5))
    torch.testing.assert_close(per_exit[1]["cosine"], cosine(b, a))


# --------------------------------------------------------------------------- property-based

_value = st.one_of(st.just(0.0), st.floats(0.0009765625, 1024.0, width=32))
_maps = st.integers(1, 3).flatmap(
    lambda b: st.integers(1, 20).flatmap(
        lambda n: st.tuples(
            arrays(np.float32, (b, n), elements=_value),
            arrays(np.float32, (b, n), elements=_value),
        )
    )
)


@settings(max_examples=60, deadline=None, database=None)
@given(_maps)
def test_no_nan_symmetric_in_range(pair):
    a, b = (torch.from_numpy(x) for x in pair)
    deg = degenerate(a, b)
    for name, f in FUNCS.items():
        s = f(a, b)
        assert s.shape == (a.shape[0],)
        assert torch.isfinite(s).all(), name
        lo, hi = RANGES[name]
        assert ((s >= lo - 1e-6) & (s <= hi + 1e-6)).all(), (name, s)
        torch.testing.assert_close(s, f(b, a), atol=1e-6, rtol=1e-6, msg=name)
        assert (s[deg] == 0).all(), name
        # against itself: 1 unless degenerate
        self_s = f(a, a)
        d_self = degenerate(a, a)
        assert torch.isfinite(self_s).all()
        torch.testing.assert_close(
            self_s[~d_self], torch.ones(int((~d_self).sum())), atol=1e-5, rtol=0, msg=name
        )
        assert (self_s[d_self] == 0).all()
        # exact positive scale: same score
        torch.testing.assert_close(f(4.0 * a, b), s, atol=1e-6, rtol=1e-6, msg=name)
    scores = consistency_scores(a, b)
    assert all(torch.isfinite(v.float()).all() for v in scores.values())


@settings(max_examples=40, deadline=None, database=None)
@given(
    arrays(np.float32, (12,), elements=st.integers(0, 3).map(float)),
    arrays(np.float32, (12,), elements=st.integers(0, 3).map(float)),
)
def test_spearman_matches_scipy_property(a, b):
    got = spearman(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].item()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        assert got == 0.0
    else:
        assert abs(got - spearmanr(a, b).statistic) < 1e-6

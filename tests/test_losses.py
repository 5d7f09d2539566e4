"""The EGT loss: CE terms, weights, consistency term, teacher detaching, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from egt_core.attention import attention_maps
from egt_core.losses import EGTLossConfig, LossTerms, egt_loss, map_distance

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def batch():
    torch.manual_seed(3)
    return torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])


def test_lambda_zero_is_weighted_ce_exactly(tiny_gray, batch):
    x, y = batch
    outs = tiny_gray(x)
    terms = egt_loss(outs, y, EGTLossConfig(lam=0.0))
    assert isinstance(terms, LossTerms)
    assert terms.consistency == []
    ce = [F.cross_entropy(o.logits, y) for o in outs]
    assert len(terms.ce) == 3
    for got, ref in zip(terms.ce, ce, strict=True):
        assert torch.equal(got, ref)
    assert torch.equal(terms.total, ce[0] + ce[1] + ce[2])


def test_lambda_zero_computes_no_maps(tiny_gray, batch, monkeypatch):
    import egt_core.losses as losses

    def boom(*_a, **_k):
        raise AssertionError("attention maps computed with lam == 0")

    monkeypatch.setattr(losses, "attention_maps", boom)
    x, y = batch
    egt_loss(tiny_gray(x), y, EGTLossConfig(lam=0.0, attention="gradcam"))


def test_exit_weights_respected(tiny_gray, batch):
    x, y = batch
    outs = tiny_gray(x)
    w = [1.0, 0.5, 0.25]
    terms = egt_loss(outs, y, EGTLossConfig(lam=0.0, exit_weights=w))
    ref = sum(wk * F.cross_entropy(o.logits, y) for wk, o in zip(w, outs, strict=True))
    torch.testing.assert_close(terms.total, ref, rtol=0, atol=1e-6)
    # A zero weight removes that exit's CE from the gradient entirely.
    tiny_gray.zero_grad()
    egt_loss(tiny_gray(x), y, EGTLossConfig(lam=0.0, exit_weights=[0.0, 1.0, 1.0])).total.backward()
    assert tiny_gray.heads[0].fc.weight.grad is None or not tiny_gray.heads[0].fc.weight.grad.any()
    assert tiny_gray.heads[1].fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 1.0, 1.0, 1.0], []])
def test_exit_weights_length_mismatch(tiny_gray, batch, weights):
    x, y = batch
    with pytest.raises(ValueError, match="exit weights"):
        egt_loss(tiny_gray(x), y, EGTLossConfig(lam=0.0, exit_weights=weights))


@pytest.mark.parametrize("attention", ["cam", "activation", "gradcam"])
@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_lambda_adds_consistency(tiny_gray, batch, attention, distance):
    x, y = batch
    tiny_gray.train()
    outs = tiny_gray(x)
    base = egt_loss(outs, y, EGTLossConfig(lam=0.0))
    lam = 0.7
    cfg = EGTLossConfig(lam=lam, attention=attention, distance=distance)
    terms = egt_loss(outs, y, cfg)
    assert len(terms.consistency) == 2
    maps = attention_maps(outs, attention, classes=y)
    for k, c in enumerate(terms.consistency):
        assert c.ndim == 0 and torch.isfinite(c) and c >= 0
        torch.testing.assert_close(c, map_distance(maps[:, k], maps[:, -1], distance))
    torch.testing.assert_close(
        terms.total, base.total + lam * (terms.consistency[0] + terms.consistency[1])
    )


def _consistency_grads(model, x, y, detach_final: bool, attention: str = "cam"):
    model.train()
    model.zero_grad()
    terms = egt_loss(
        model(x), y, EGTLossConfig(lam=1.0, attention=attention, detach_final=detach_final)
    )
    torch.stack(terms.consistency).sum().backward()  # the consistency term alone
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["cam", "gradcam"])
def test_detach_final_blocks_gradient_to_final_head(tiny_gray, batch, attention):
    x, y = batch
    grads = _consistency_grads(tiny_gray, x, y, True, attention)
    final = [n for n in grads if n.startswith("heads.2.")]
    assert final
    for n in final:
        assert grads[n] is None or not grads[n].any(), n
    # The early exits do get a gradient.
    assert grads["heads.0.fc.weight"] is not None and grads["heads.0.fc.weight"].abs().sum() > 0


def test_no_detach_final_trains_final_head(tiny_gray, batch):
    x, y = batch
    grads = _consistency_grads(tiny_gray, x, y, False)
    g = grads["heads.2.fc.weight"]
    assert g is not None and g.abs().sum() > 0
    # and the last backbone segment, which only the final map depends on
    g = grads["segments.2.1.0.weight"]
    assert g is not None and g.abs().sum() > 0


def test_detach_final_last_segment_gets_no_consistency_grad(tiny_gray, batch):
    x, y = batch
    grads = _consistency_grads(tiny_gray, x, y, True)
    g = grads["segments.2.1.0.weight"]
    assert g is None or not g.any()


def test_map_distance():
    torch.manual_seed(0)
    a = torch.rand(3, 5, 5)
    for d in ("cosine", "mse"):
        assert map_distance(a, a, d).abs() < 1e-6
        assert map_distance(a, 3.0 * a, d).abs() < 1e-6  # scale-free
    b = torch.rand(3, 5, 5)
    fa, fb = F.normalize(a.flatten(1), dim=1), F.normalize(b.flatten(1), dim=1)
    torch.testing.assert_close(map_distance(a, b, "cosine"), (1 - (fa * fb).sum(1)).mean())
    torch.testing.assert_close(map_distance(a, b, "mse"), ((fa - fb) ** 2).mean())
    # Orthogonal non-negative maps: cosine distance 1.
    c = torch.zeros(1, 2, 2)
    d = torch.zeros(1, 2, 2)
    c[0, 0, 0] = 1
    d[0, 1, 1] = 2
    torch.testing.assert_close(map_distance(c, d, "cosine"), torch.tensor(1.0))
    # All-zero maps give a finite distance and a finite gradient.
    z = torch.zeros(2, 4, 4, requires_grad=True)
    dist = map_distance(z, torch.rand(2, 4, 4))
    dist.backward()
    assert torch.isfinite(dist) and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError):
        map_distance(a, b, "kl")


def test_config_validation():
    with pytest.raises(ValueError, match="lambda"):
        EGTLossConfig(lam=-0.1)
    with pytest.raises(ValueError, match="distance"):
        EGTLossConfig(distance="l1")
    with pytest.raises(ValueError, match="attention"):
        EGTLossConfig(attention="saliency")
    EGTLossConfig(lam=0.0, distance="mse", attention="activation")  # valid

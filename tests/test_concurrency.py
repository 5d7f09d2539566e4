"""Explaining on one model shared by many sessions gives each caller its own, correct result.

The app caches one model per process (st.cache_resource) and several browser sessions explain
images on it at once; grad-cam registers hooks on that shared model. Every threaded result must
equal the sequential one, no hook may remain, and the model's state must be as before.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from conftest import make_tiny_gray

from egt_core.explain import explain
from egt_core.inference import predict

THREADS, CALLS = 8, 25
METHODS = ("cam", "gradcam", "gradcam++", "eigencam")


def _hooks(model: torch.nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, n)) for m in model.modules() for n in names)


def _state(model: torch.nn.Module) -> tuple:
    return (
        tuple(m.training for m in model.modules()),
        tuple(p.requires_grad for p in model.parameters()),
        tuple(p.grad is None for p in model.parameters()),
    )


def test_eight_threads_of_explanations_match_sequential_results(single_thread):
    """One intra-op thread per call, as the app runs: 8 callers x 2 OpenMP threads on 2 cores
    would measure oversubscription, not correctness."""
    model = make_tiny_gray(seed=3).eval()
    torch.manual_seed(0)
    images = torch.randn(THREADS * CALLS, 1, 1, 28, 28)
    jobs = [(i, METHODS[i % len(METHODS)]) for i in range(len(images))]
    before, hooks_before = _state(model), _hooks(model)

    def run(job: tuple[int, str]):
        i, method = job
        e = explain(model, images[i], method)
        p = predict(model, images[i], 0.5)
        return e.maps, e.raw_maps, e.probs, e.target_classes, p.exit_index, p.prediction

    sequential = [run(j) for j in jobs]
    start = threading.Barrier(THREADS)

    def worker(chunk: list[tuple[int, str]]):
        start.wait()
        return [run(j) for j in chunk]

    chunks = [jobs[t::THREADS] for t in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(worker, chunks))
    threaded = {}
    for chunk, res in zip(chunks, results, strict=True):
        threaded.update({i: r for (i, _), r in zip(chunk, res, strict=True)})

    assert len(threaded) == THREADS * CALLS
    for i, expected in enumerate(sequential):
        for a, b in zip(threaded[i], expected, strict=True):
            d = float((a.float() - b.float()).abs().max())
            assert torch.allclose(a.float(), b.float(), atol=1e-5), f"job {i} ({jobs[i][1]}) {d}"
    assert _hooks(model) == hooks_before == 0
    assert _state(model) == before

"""Evaluation reports: fields, sweep invariants, strict JSON, timing helpers, errors."""

from __future__ import annotations

import json

import pytest
import torch

from egt_core.checkpoints import load_checkpoint
from egt_core.evaluate import (
    DEFAULT_THRESHOLDS,
    EvaluationError,
    best_operating_point,
    component_latency,
    consistency_report,
    evaluate_checkpoint,
    json_safe,
    measured_speedup,
    threshold_sweep,
)
from egt_core.models import exit_costs, fuse_for_inference

pytestmark = pytest.mark.usefixtures("single_thread")

THRESHOLDS = (0.0, 0.5, 0.9, 1.01)


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tiny_fmnist_dir) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; the two cores are shared
    try:
        return evaluate_checkpoint(
            tiny_checkpoint,
            data_dir=str(tiny_fmnist_dir),
            limit=40,
            thresholds=THRESHOLDS,
            timing_images=8,
            repeats=3,
        )
    finally:
        torch.set_num_threads(threads)


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_report_fields(report, tiny_checkpoint):
    assert report["checkpoint"] == str(tiny_checkpoint)
    assert len(report["sha256"]) == 64 and report["n"] == 40 and report["limit"] == 40
    assert report["dataset"] == "fashion-mnist" and report["split"] == "test"
    assert len(report["accuracy"]) == 3 and all(0 <= a <= 1 for a in report["accuracy"])
    assert report["training"]["lam"] == 1.0
    for key, method in (("trained", "cam"), ("explainer", "gradcam")):
        block = report["consistency"][key]
        assert block["method"] == method and len(block["per_exit"]) == 2
        for row in block["per_exit"]:
            for m in ("cosine", "pearson", "spearman", "iou"):
                assert -1 <= row[m] <= 1
            assert 0 <= row["degenerate"] <= 40
            assert {k: len(v) for k, v in row["per_image"].items()} == {
                "pearson": 40,
                "cosine": 40,
                "iou": 40,
            }
        assert set(block["mean"]) == {"cosine", "pearson", "spearman", "iou"}
    flops = report["flops"]
    assert len(flops["segments"]) == 3 and len(flops["heads"]) == 3
    assert flops["full_path"] == sum(flops["segments"]) + flops["heads"][-1]
    assert flops["answer_at"][-1] > flops["full_path"] > flops["answer_at"][0] > 0
    lat = report["latency_batch1"]
    assert len(lat["segments_ms"]) == 3 and all(t > 0 for t in lat["heads_ms"])
    env = report["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["cpu_count"] >= 1
    assert report["timing"]["batch1_images"] == 8 and report["timing"]["repeats"] == 3
    assert [r["threshold"] for r in report["sweep"]] == list(THRESHOLDS)


def test_report_is_strict_json(report):
    assert strict_loads(json.dumps(report, allow_nan=False)) == report


def test_sweep_invariants(report):
    n, sweep = report["n"], report["sweep"]
    for row in sweep:
        assert sum(row["exit_mix"]) == n
        assert sum(row["exit_fraction"]) == pytest.approx(1.0)
        assert row["flop_ideal_speedup"] > 0
        for key in ("batch1", "batched"):
            assert row[key]["early_ms"] > 0 and row[key]["full_ms"] > 0
    zero, full = sweep[0], sweep[-1]
    assert zero["exit_mix"] == [n, 0, 0]  # threshold 0: the first exit always answers
    assert zero["flop_ideal_speedup"] > 1
    assert full["exit_mix"] == [0, 0, n]  # above 1: no early exit can fire
    assert full["flop_ideal_speedup"] == 1.0 and full["flop_fraction"] == 1.0
    assert full["expected_flops"] == report["flops"]["full_path"]
    assert full["accuracy"] == report["accuracy"][-1]
    assert zero["accuracy"] == report["accuracy"][0]
    # Early exit vs full path are the same computation at 1.01: only noise (shared machine).
    assert 0.5 < full["batch1"]["speedup"] < 2
    assert 0.5 < full["batched"]["speedup"] < 2


def test_full_path_row_is_exact_on_a_random_model(tiny_gray, gray_batch):
    """With untrained weights nothing is confident; thresholds in (0, 1] that let no sample
    exit still pay for the early heads, and only the > 1 row is the plain full path."""
    costs = exit_costs(tiny_gray, (1, 28, 28))
    labels = torch.arange(len(gray_batch)) % 10
    rows = threshold_sweep(tiny_gray, gray_batch, labels, costs, (1.0, 1.01), timing_images=0)
    assert rows[0]["exit_mix"] == rows[1]["exit_mix"] == [0, 0, len(labels)]
    assert rows[0]["flop_ideal_speedup"] < 1  # early heads computed for nothing
    assert rows[1]["flop_ideal_speedup"] == 1.0
    assert "batch1" not in rows[0]


def test_measured_speedup_is_close_to_one_for_identical_work(tiny_gray, gray_batch):
    fused = fuse_for_inference(tiny_gray)
    r = measured_speedup(fused, gray_batch, threshold=1.5, batch_size=2, repeats=2)
    assert set(r) >= {"early_ms", "full_ms", "speedup", "images"}
    assert r["images"] == len(gray_batch)
    assert 0.3 < r["speedup"] < 3
    assert r["speedup"] == pytest.approx(r["full_ms"] / r["early_ms"])
    with pytest.raises(ValueError):
        measured_speedup(fused, gray_batch, 0.5, batch_size=2, repeats=0)


def test_component_latency_has_every_segment_and_head(tiny_gray, gray_batch):
    lat = component_latency(fuse_for_inference(tiny_gray), gray_batch, repeats=3)
    assert len(lat["segments_ms"]) == len(lat["heads_ms"]) == tiny_gray.num_exits


def test_consistency_report_scores_and_degenerate_maps():
    torch.manual_seed(0)
    maps = torch.rand(5, 3, 4, 4)
    maps[:, 0] = maps[:, 2] * 3  # exit 1 agrees with the final exit up to scale
    maps[0, 1] = 0  # one all-zero map: degenerate, scored 0, not NaN
    ids = torch.arange(5)  # the "images" are indices into `maps`
    r = consistency_report(lambda b: maps[b], ids, "test", batch_size=2)
    first, second = r["per_exit"]
    for m in ("cosine", "pearson", "spearman", "iou"):
        assert first[m] == pytest.approx(1.0)
    assert first["degenerate"] == 0 and second["degenerate"] == 1
    assert second["per_image"]["pearson"][0] == 0.0
    assert r["mean"]["cosine"] == pytest.approx((first["cosine"] + second["cosine"]) / 2)


def test_best_operating_point():
    def row(t, acc, flop, b1=None):
        r = {"threshold": t, "accuracy": acc, "flop_ideal_speedup": flop}
        return r if b1 is None else {**r, "batch1": {"speedup": b1}}

    sweep = [
        row(0.5, 0.80, 2.5, 3.0),  # too inaccurate
        row(0.9, 0.898, 1.6, 1.8),
        row(0.99, 0.90, 1.1, 1.2),
        row(0.999, 0.90, 0.95, 2.5),  # nothing exits: a "speedup" here is timing noise
        row(1.01, 0.90, 1.0),
    ]
    assert best_operating_point(sweep, 0.90)["threshold"] == 0.9
    assert best_operating_point(sweep, 0.99) is None


def test_json_safe_replaces_non_finite_numbers():
    value = {"a": [1.0, float("nan")], "b": (float("inf"),), "c": {"d": 2, "e": "x"}}
    assert json_safe(value) == {"a": [1.0, None], "b": [None], "c": {"d": 2, "e": "x"}}


def test_default_thresholds_end_with_the_full_path_row():
    assert DEFAULT_THRESHOLDS[0] == 0.0 and DEFAULT_THRESHOLDS[-1] > 1
    assert list(DEFAULT_THRESHOLDS) == sorted(DEFAULT_THRESHOLDS)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(explainer="magic"), "unknown explainer"),
        (dict(thresholds=[0.5, float("nan")]), "thresholds"),
        (dict(limit=0), "--limit"),
        (dict(repeats=0), "--repeats"),
        (dict(dataset="shapes"), "does not fit"),
    ],
)
def test_evaluation_errors(tiny_checkpoint, tiny_fmnist_dir, kwargs, fragment):
    kwargs = {"data_dir": str(tiny_fmnist_dir), "timing_images": 0, **kwargs}
    with pytest.raises(EvaluationError, match=fragment):
        evaluate_checkpoint(tiny_checkpoint, **kwargs)


def test_missing_data_dir_is_an_error(tiny_checkpoint, tmp_path):
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_checkpoint(tiny_checkpoint, data_dir=str(tmp_path / "nope"), timing_images=0)


def test_checkpoint_model_is_left_usable(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    assert not model.training

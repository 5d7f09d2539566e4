"""Evaluation reports: per-exit accuracy, attention consistency, and early-exit cost vs benefit.

A report is plain JSON so that the app draws its dataset view from it without recomputation and a
reader can regenerate it: it records the checkpoint's hash, data, limit, seed, machine and versions.
Speedups are *measured*: early-exit and full-path inference alternate on the same images in one
run, and the median of several repeats is kept (this machine is shared and noisy).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .attention import attention_maps
from .checkpoints import library_versions, load_checkpoint
from .consistency import METRICS, exit_consistency
from .data import limit as limit_dataset
from .data import load_dataset
from .inference import exit_mix, expected_flops, flop_ideal_speedup, predict
from .models import MultiExitNet, exit_costs, fuse_for_inference

DEFAULT_THRESHOLDS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.01)
FULL_PATH_THRESHOLD = 1.01  # > 1: no early exit can fire; the invariant row (speedup ~ 1)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def environment(seed: int) -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "seed": seed,
        "versions": library_versions(),
    }


def _collect(loader: DataLoader) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*[(x, y) for x, y in loader], strict=True)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------ consistency


def trained_maps(model: MultiExitNet, kind: str) -> Callable[[Tensor], Tensor]:
    """Raw maps of the attention kind the model was trained with (final prediction's class)."""

    def maps(batch: Tensor) -> Tensor:
        with torch.enable_grad() if kind == "gradcam" else torch.no_grad():
            outputs = model(batch.requires_grad_(kind == "gradcam"))
            return attention_maps(outputs, kind, create_graph=False).detach()

    return maps


def explainer_maps(model: MultiExitNet, method: str) -> Callable[[Tensor], Tensor]:
    """Raw maps (common feature grid) from an explainer of `egt_core.explain`."""
    from .explain import explain

    return lambda batch: explain(model, batch, method).raw_maps


def consistency_report(
    maps_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    method: str,
    batch_size: int = 128,
    k: float = 0.2,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Mean consistency per early exit vs the final exit, plus per-image Pearson, cosine, IoU."""
    per_exit: list[dict[str, list[Tensor]]] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        for e, scores in enumerate(exit_consistency(maps_fn(batch), k=k)):
            if e == len(per_exit):
                per_exit.append({m: [] for m in scores})
            for m, v in scores.items():
                per_exit[e][m].append(v.detach().cpu())
        if progress:
            progress(len(batch))
    exits = []
    for scores in per_exit:
        cat = {m: torch.cat(v) for m, v in scores.items()}
        row: dict[str, Any] = {m: float(cat[m].float().mean()) for m in METRICS}
        row["degenerate"] = int(cat["degenerate"].sum())
        row["per_image"] = {
            m: [round(float(v), 4) for v in cat[m]] for m in ("pearson", "cosine", "iou")
        }
        exits.append(row)
    mean = {m: statistics.fmean(e[m] for e in exits) for m in METRICS}
    return {"method": method, "top_k": k, "per_exit": exits, "mean": mean}


# ------------------------------------------------------------------ timing


def measured_speedup(
    model: MultiExitNet, images: Tensor, threshold: float, batch_size: int, repeats: int = 3
) -> dict[str, float]:
    """Early exit vs full path on the same images, interleaved batch by batch.

    Both sides go through `predict` (the full path is ``threshold > 1``), on a BN-fused model.
    Every batch is timed ``repeats`` times on each side, the two sides alternating which goes
    first, and the fastest run of each batch is kept: a pause of this shared machine has to hit
    every repeat of a batch to count. The times are summed over batches, so samples that exit
    early and samples that do not are weighted as they occur.
    """
    if repeats < 1 or batch_size < 1 or len(images) == 0:
        raise ValueError("measured_speedup needs images, batch_size >= 1 and repeats >= 1")
    batches = list(images.split(batch_size))
    sides = (
        lambda b: predict(model, b, threshold),  # early exit
        lambda b: predict(model, b, 2.0),  # full path
    )
    for fn in sides:  # warm-up: first-call allocations and kernel selection
        fn(batches[0])
    best = [[math.inf] * len(batches), [math.inf] * len(batches)]
    for r in range(repeats):
        for i, b in enumerate(batches):
            order = (0, 1) if (r + i) % 2 == 0 else (1, 0)
            for side in order:
                t0 = time.perf_counter()
                sides[side](b)
                best[side][i] = min(best[side][i], time.perf_counter() - t0)
    n = len(images)
    e, f = sum(best[0]) / n, sum(best[1]) / n
    return {"early_ms": e * 1e3, "full_ms": f * 1e3, "speedup": f / e, "images": n}


def component_latency(model: MultiExitNet, x: Tensor, repeats: int = 200) -> dict[str, list]:
    """Batch-1 median latency (ms) of every segment and every head: at batch 1 these, not FLOPs,
    decide the speedup."""
    segs, heads = [], []
    h = x[:1]
    with torch.inference_mode():
        for segment, head in zip(model.segments, model.heads, strict=True):
            segs.append(_median_ms(lambda s=segment, t=h: s(t), repeats))
            h = segment(h)
            heads.append(_median_ms(lambda hd=head, t=h: hd(t), repeats))
    return {"segments_ms": segs, "heads_ms": heads}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(10):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


# ------------------------------------------------------------------ threshold sweep


def threshold_sweep(
    model: MultiExitNet,
    images: Tensor,
    labels: Tensor,
    costs,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    timing_images: int = 500,
    batched_size: int = 256,
    repeats: int = 3,
    progress: Callable[[int], None] | None = None,
    batched_timing_images: int = 2048,
    fused: MultiExitNet | None = None,
) -> list[dict[str, Any]]:
    """Accuracy, exit mix, FLOPs and measured speedup (batch 1 and batched) per threshold.

    Accuracy and exit mix use every image; batch-1 timing uses the first ``timing_images`` and
    batched timing the first ``batched_timing_images`` (timing every image at every threshold
    would dominate a 10k-image evaluation). A threshold above 1 runs the plain full path (no
    early heads), so its FLOPs are exactly the full path's and its FLOP-ideal speedup is 1.
    """
    fused = fuse_for_inference(model) if fused is None else fused
    rows = []
    timing = images[:timing_images]
    batched_timing = images[:batched_timing_images]
    for t in thresholds:
        result = predict(fused, images, t)
        mix = exit_mix(result, model.num_exits)
        flops = expected_flops(mix, costs, threshold=t)
        row = {
            "threshold": t,
            "accuracy": float((result.prediction == labels).float().mean()),
            "exit_mix": mix,
            "exit_fraction": [m / len(labels) for m in mix],
            "expected_flops": flops,
            "flop_fraction": flops / costs.full_path,
            "flop_ideal_speedup": flop_ideal_speedup(mix, costs, threshold=t),
        }
        if timing_images > 0 and len(timing) > 0:
            one = measured_speedup(fused, timing, t, batch_size=1, repeats=repeats)
            many = measured_speedup(
                fused, batched_timing, t, batch_size=batched_size, repeats=repeats
            )
            row["batch1"] = one
            row["batched"] = {**many, "batch_size": batched_size}
            row["batched_vs_flop_ideal"] = many["speedup"] / row["flop_ideal_speedup"]
        rows.append(row)
        if progress:
            progress(1)
    return rows


def best_operating_point(
    sweep: list[dict], final_accuracy: float, max_drop: float = 0.005
) -> dict[str, Any] | None:
    """The sweep row with the largest measured batch-1 speedup whose accuracy is at most
    ``max_drop`` below the final exit's, among rows whose exit mix saves FLOPs (elsewhere a
    measured "speedup" can only be timing noise)."""
    ok = [
        r
        for r in sweep
        if "batch1" in r
        and r["flop_ideal_speedup"] > 1  # rows that compute more than the full path are noise
        and r["accuracy"] >= final_accuracy - max_drop
    ]
    return max(ok, key=lambda r: r["batch1"]["speedup"]) if ok else None


# ------------------------------------------------------------------ one checkpoint


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message says why, in one line."""


def _validate_args(
    explainer: str,
    thresholds: Sequence[float],
    limit: int | None,
    timing_images: int,
    repeats: int,
    data_dir: str | None,
) -> None:
    from .explain import EXPLAINERS

    if explainer not in EXPLAINERS:
        raise EvaluationError(
            f"unknown explainer {explainer!r}; choose one of {', '.join(EXPLAINERS)}"
        )
    if not thresholds or any(not math.isfinite(t) or t < 0 for t in thresholds):
        raise EvaluationError(f"thresholds must be finite numbers >= 0, got {list(thresholds)}")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be a positive number of images, got {limit}")
    if timing_images < 0 or repeats < 1:
        raise EvaluationError("--timing-images must be >= 0 and --repeats >= 1")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise EvaluationError(f"--data-dir {data_dir} does not exist or is not a folder")


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    explainer: str = "gradcam",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    timing_images: int = 500,
    repeats: int = 3,
    seed: int = 0,
    progress: bool = False,
    batched_timing_images: int = 2048,
) -> dict[str, Any]:
    """Full report for one checkpoint on a dataset's test split (plain JSON, no NaN)."""
    _validate_args(explainer, thresholds, limit, timing_images, repeats, data_dir)
    model, meta = load_checkpoint(path)
    spec = dataset or meta.get("dataset")
    if not spec:
        raise EvaluationError(f"{path} does not name its dataset; pass --dataset")
    data = load_dataset(
        spec, data_dir=data_dir, seed=seed, augment=False, image_size=meta["input_size"]
    )
    if data.in_channels != meta["in_channels"] or len(data.classes) != len(meta["classes"]):
        raise EvaluationError(
            f"dataset {spec} ({data.in_channels} channels, {len(data.classes)} classes) does not "
            f"fit {path} ({meta['in_channels']} channels, {len(meta['classes'])} classes)"
        )
    test = limit_dataset(data.test, limit, what="test") if limit else data.test
    images, labels = _collect(DataLoader(test, batch_size=512))
    torch.manual_seed(seed)
    bar = _bar(progress, len(images) * 2 + len(thresholds), f"eval {Path(path).name}")
    tick = bar.update if bar else None

    # Accuracy per exit on the BN-fused model that the sweep uses, in the same batches, so that
    # the no-early-exit row of the sweep reproduces the final exit's accuracy exactly.
    fused = fuse_for_inference(model)
    batched_size = 256
    with torch.inference_mode():
        outs = [fused(b) for b in images.split(batched_size)]
    predictions = [torch.cat([o[k].logits.argmax(1) for o in outs]) for k in range(len(outs[0]))]
    accuracy = [float(p.eq(labels).float().mean()) for p in predictions]
    del outs
    kind = meta.get("train_config", {}).get("attention", "cam")
    trained = consistency_report(trained_maps(model, kind), images, kind, progress=tick)
    independent = consistency_report(
        explainer_maps(model, explainer), images, explainer, progress=tick
    )
    size = (meta["in_channels"], meta["input_size"], meta["input_size"])
    costs = exit_costs(model, size)
    sweep = threshold_sweep(
        model,
        images,
        labels,
        costs,
        thresholds,
        timing_images,
        batched_size=batched_size,
        repeats=repeats,
        progress=tick,
        batched_timing_images=batched_timing_images,
        fused=fused,
    )
    if bar:
        bar.close()
    cfg = meta.get("train_config", {})
    report = {
        "checkpoint": str(path),
        "sha256": file_sha256(path),
        "dataset": spec,
        "split": "test",
        "n": len(labels),
        "limit": limit,
        "classes": meta["classes"],
        "training": {k: cfg.get(k) for k in ("lam", "attention", "distance", "epochs", "seed")},
        "accuracy": accuracy,
        "predictions": [p.tolist() for p in predictions],  # per exit, per test image
        "consistency": {"trained": trained, "explainer": independent},
        "flops": {
            "segments": costs.segments,
            "heads": costs.heads,
            "answer_at": [costs.answer_at(k) for k in range(model.num_exits)],
            "full_path": costs.full_path,
        },
        "latency_batch1": component_latency(fused, images[:1]),
        "sweep": sweep,
        "best_operating_point": best_operating_point(sweep, accuracy[-1]),
        "timing": {
            "batch1_images": min(timing_images, len(labels)),
            "batched_images": min(batched_timing_images, len(labels)) if timing_images else 0,
            "batched_size": batched_size,
            "repeats": repeats,
        },
        "environment": environment(seed),
    }
    return json_safe(report)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None: strict JSON readers accept it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


__all__ = [
    "DEFAULT_THRESHOLDS",
    "EvaluationError",
    "json_safe",
    "evaluate_checkpoint",
    "threshold_sweep",
    "consistency_report",
    "measured_speedup",
    "component_latency",
    "best_operating_point",
]

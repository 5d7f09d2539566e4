"""Helpers shared by the benchmark scripts: model loading, thread control, alternating timing,
table printing and JSON output.

Timing rules used everywhere: the sides being compared run in the same process on the same inputs,
alternating (the order flips every repeat so that drift hits both sides alike), after a warm-up,
and the median over repeats is reported. Nothing here asserts on timing: on a shared machine the
numbers are only indicative.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from egt_core.evaluate import environment
from egt_core.models import MultiExitNet, build_model

DEFAULT_ARCH = "small"
DEFAULT_INPUT = (1, 28, 28)
DEFAULT_CLASSES = 10


def set_threads(threads: int | None) -> int:
    """Apply ``--threads`` (if given) and return the torch intra-op thread count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def default_model(
    arch: str = DEFAULT_ARCH,
    input_shape: Sequence[int] = DEFAULT_INPUT,
    classes: int = DEFAULT_CLASSES,
    seed: int = 0,
) -> MultiExitNet:
    """An untrained model like ``build_model("small", 1, 10, input_size=28)`` (seeded init)."""
    channels, height, width = input_shape
    if height != width:
        raise SystemExit(
            f"--input must be square (the model takes one input_size), got {height}x{width}"
        )
    torch.manual_seed(seed)
    return build_model(arch, channels, classes, input_size=height).eval()


def load_model(
    checkpoint: str | None,
    arch: str = DEFAULT_ARCH,
    input_shape: Sequence[int] = DEFAULT_INPUT,
    classes: int = DEFAULT_CLASSES,
) -> tuple[MultiExitNet, tuple[int, int, int], dict[str, Any]]:
    """The checkpoint's model (eval mode) or the default untrained one, with its ``(C, H, W)``."""
    if checkpoint:
        from egt_core.checkpoints import load_checkpoint

        model, meta = load_checkpoint(checkpoint)
        shape = (meta["in_channels"], meta["input_size"], meta["input_size"])
        return model, shape, meta
    model = default_model(arch, input_shape, classes)
    return model, tuple(input_shape), {}  # type: ignore[return-value]


def load_test_images(
    meta: dict[str, Any], dataset: str | None, n: int | None
) -> tuple[Tensor, Tensor, str]:
    """The first ``n`` test images and labels of the checkpoint's dataset (or ``dataset``)."""
    from torch.utils.data import DataLoader

    from egt_core.data import limit, load_dataset

    spec = dataset or meta.get("dataset")
    if not spec:
        raise SystemExit("the checkpoint does not name its dataset; pass --dataset")
    data = load_dataset(spec, seed=0, augment=False)
    test = data.test
    if n is not None:
        test = limit(test, min(n, len(test)), what="test")
    xs, ys = [], []
    for x, y in DataLoader(test, batch_size=512):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), spec


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def alternate(
    sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall seconds of each side per repeat; the sides alternate and the order flips each repeat.

    Every side runs ``warmup`` times first (not timed).
    """
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        first = row[0].ljust(widths[0])
        print("  ".join([first] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_environment(threads: int) -> None:
    print(f"torch {torch.__version__}, {threads} torch thread(s) (set with --threads)")


def write_json(path: str | None, payload: dict[str, Any], seed: int = 0) -> None:
    """Write ``payload`` plus the environment (machine, versions, threads) to ``path``."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**payload, "environment": environment(seed)}, indent=2) + "\n")
    print(f"wrote {out}")

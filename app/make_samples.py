"""Export a dozen real test images per dataset as tiny PNGs for the app's sample gallery.

The gallery must show images the models were *evaluated* on (test split), exactly as the dataset
stores them, so that a sample and an upload of the same PNG go through the same `load_image` path.
Run from the repo root: ``.venv/bin/python app/make_samples.py``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from egt_core.data import load_dataset

HERE = Path(__file__).resolve().parent
SAMPLES_DIR = HERE / "samples"
PER_DATASET = 12
DATASETS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "shapes": None}


def slug(text: str) -> str:
    """A file-name-safe version of a class name ("T-shirt/top" -> "t-shirt-top")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pick_indices(labels: list[int], n: int) -> list[int]:
    """Round-robin over classes (first image of each class, then the second, ...): a varied dozen."""
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in sorted(set(labels))}
    chosen: list[int] = []
    for rank in range(max(len(v) for v in by_class.values())):
        chosen += [v[rank] for v in by_class.values() if rank < len(v)]
    return chosen[:n]


def to_uint8(dataset, index: int, mean, std) -> np.ndarray:
    """The stored pixels: shapes renders them directly, others are un-normalised tensors."""
    if hasattr(dataset, "render"):
        return dataset.render(index)[0]
    x, _ = dataset[index]
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    arr = np.clip(np.rint((x.numpy() * s + m) * 255), 0, 255).astype(np.uint8)
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def export(name: str, data_dir: str | None, out: Path, n: int = PER_DATASET) -> list[dict]:
    bundle = load_dataset(name, data_dir=data_dir, augment=False)
    test = bundle.test
    scan = min(len(test), 400)
    labels = [_label(test, i) for i in range(scan)]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    index = []
    for rank, i in enumerate(pick_indices(labels, n)):
        label = labels[i]
        file = f"{rank:02d}_{slug(bundle.classes[label])}.png"
        pixels = to_uint8(test, i, bundle.mean, bundle.std)
        Image.fromarray(pixels).save(folder / file, optimize=True)
        index.append({"file": file, "label": bundle.classes[label], "test_index": i})
    (folder / "index.json").write_text(
        json.dumps({"dataset": name, "split": "test", "samples": index}, indent=1) + "\n"
    )
    return index


def _label(dataset, i: int) -> int:
    if hasattr(dataset, "render"):
        return int(dataset.render(i)[1])
    return int(dataset[i][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()
    for name in args.datasets:
        index = export(name, DATASETS.get(name), args.out)
        print(f"{name}: {len(index)} samples -> {args.out / name}")


if __name__ == "__main__":
    main()

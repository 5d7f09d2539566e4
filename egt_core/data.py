"""Datasets for EGT: one entry point, `load_dataset(spec)`, returning train/val/test plus metadata.

Every item is ``(image, label)`` with ``image`` a normalised float32 ``(C, H, W)`` tensor, so the
training loop, the explainers and the app never care where the pixels came from.

Specs: ``fashion-mnist``, ``shapes`` (synthetic, with ground-truth object masks),
``imagefolder:PATH`` and ``medmnist:PATH.npz``.
"""

import gzip
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Subset
from torchvision.datasets import FashionMNIST, ImageFolder

__all__ = [
    "FASHION_MNIST_CLASSES",
    "SHAPES_CLASSES",
    "DataError",
    "DatasetBundle",
    "ShapesDataset",
    "TensorImageDataset",
    "known_datasets",
    "limit",
    "load_dataset",
    "read_idx",
    "render_shape",
]


class DataError(Exception):
    """A dataset could not be loaded; the message says why and how to fix it, in one line."""


@dataclass
class DatasetBundle:
    """Everything a trainer needs to know about a dataset, resolved once."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    in_channels: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def known_datasets() -> list[str]:
    """The accepted spec forms, for --help texts and error messages."""
    return ["fashion-mnist", "shapes", "imagefolder:PATH", "medmnist:PATH.npz"]


def load_dataset(
    spec: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    augment: bool = True,
    image_size: int | None = None,
    download: bool = False,
) -> DatasetBundle:
    """Resolve a dataset spec into train (augmented if asked), val and test datasets.

    ``seed`` fixes the validation split (and the synthetic images for ``shapes``), so runs with the
    same seed see exactly the same data. ``image_size`` resizes to a square side; ``download`` is
    only consulted for fashion-mnist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty dataset spec; choose one of: {', '.join(known_datasets())}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size < 8:
        raise DataError(f"image_size must be at least 8 pixels, got {image_size}")
    text = spec.strip()
    key = text.lower()
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        bundle = _load_fashion_mnist(data_dir, seed, val_fraction, augment, image_size, download)
    elif key == "shapes":
        bundle = _load_shapes(seed, image_size)
    elif key.startswith("imagefolder:"):
        path = text.split(":", 1)[1]
        bundle = _load_imagefolder(path, seed, val_fraction, augment, image_size)
    elif key.startswith("medmnist:"):
        path = text.split(":", 1)[1]
        bundle = _load_medmnist(path, seed, augment, image_size)
    else:
        raise DataError(f"unknown dataset {spec!r}; choose one of: {', '.join(known_datasets())}")
    bundle.name = spec
    return bundle


def limit(dataset: Dataset, n: int, *, what: str = "training") -> Dataset:
    """The first ``n`` items, for quick runs; refuses rather than silently using fewer."""
    total = len(dataset)  # type: ignore[arg-type]
    if n <= 0:
        raise DataError(f"--limit must be a positive number of images, got {n}")
    if n > total:
        raise DataError(f"--limit {n} is larger than the {total} {what} images")
    return Subset(dataset, range(n))


# --------------------------------------------------------------------------------------------
# Shared pieces: tensor-backed dataset, cheap augmentation, normalisation, seeded splits.


class PadCropFlip:
    """Random shift (pad then crop back) and optional horizontal flip, on a (C, H, W) tensor.

    Written with plain tensor ops so it is cheap and uses torch's RNG, which DataLoader workers
    already seed properly.
    """

    def __init__(self, pad: int, flip: bool, mode: str = "constant") -> None:
        self.pad = pad
        self.flip = flip
        self.mode = mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad > 0:
            p = self.pad
            h, w = x.shape[-2:]
            x = F.pad(x[None], (p, p, p, p), mode=self.mode)[0]
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, i : i + h, j : j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean[:, None, None]) / std[:, None, None]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)
    return out[0]


class TensorImageDataset(Dataset):
    """Images held as one uint8 (N, C, H, W) tensor: compact, and indexing costs microseconds."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        image_size: int | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 (N, C, H, W) tensor")
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x)
        if self.image_size is not None:
            x = _resize(x, self.image_size)
        return _normalise(x, self.mean, self.std), int(self.labels[index])


def _split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (rest, carved) split of range(n); both sorted so the split is easy to inspect."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    k = round(n * fraction)
    if fraction > 0:
        k = min(max(k, 1), n - 1)
    return sorted(perm[k:]), sorted(perm[:k])


def _mean_std(
    batches: Callable[[], Iterable[torch.Tensor]], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std over all pixels of float images in [0, 1], accumulated in float64."""
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for batch in batches():
        b = batch.double().flatten(2)  # (N, C, P)
        total += b.sum(dim=(0, 2))
        total_sq += (b * b).sum(dim=(0, 2))
        count += b.shape[0] * b.shape[2]
    if count == 0:
        raise DataError("no images to compute normalisation statistics from")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # constant images: do not blow up
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST, read straight from the raw IDX files (the same files torchvision reads).

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# Where the Debian package dataset-fashion-mnist puts the files (read-only, flat layout).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# Where --download puts them when no data dir is given.
DEFAULT_CACHE_DIR = Path("~/.cache/egt")
_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): uint8 images (magic 2051) or labels (magic 2049)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (2049, 2051):
        raise DataError(f"{path} is not an IDX image/label file (magic {magic}, want 2051 or 2049)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).copy()  # writable for torch
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {tuple(dims)}, found {data.size} bytes")
    return data.reshape(tuple(dims))


def _fmnist_candidate_dirs(data_dir: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    user = data_dir if data_dir is not None else os.environ.get("EGT_DATA") or None
    for base in [user, FASHION_MNIST_SYSTEM_DIR, DEFAULT_CACHE_DIR]:
        if base is None:
            continue
        base = Path(base).expanduser()
        # Flat layout (Debian), a named subfolder, and torchvision's own layout.
        dirs += [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    return dirs


def _find_fmnist_files(dirs: list[Path]) -> dict[str, Path] | None:
    for d in dirs:
        found = {}
        for key, name in _FMNIST_FILES.items():
            for candidate in (d / name, d / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_FMNIST_FILES):
            return found
    return None


def _fmnist_arrays(
    data_dir: str | Path | None, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    dirs = _fmnist_candidate_dirs(data_dir)
    files = _find_fmnist_files(dirs)
    if files is not None:
        arrays = {key: read_idx(path) for key, path in files.items()}
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(
                    f"Fashion-MNIST {split} files in {files[f'{split}_images'].parent} do not "
                    f"match: images {images.shape}, labels {labels.shape}"
                )
            if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
                raise DataError(f"Fashion-MNIST {split} labels go up to {labels.max()}, want < 10")
        return (
            arrays["train_images"],
            arrays["train_labels"],
            arrays["test_images"],
            arrays["test_labels"],
        )
    if not download:
        looked = ", ".join(dict.fromkeys(str(d) for d in dirs))
        raise DataError(
            f"Fashion-MNIST files (train-images-idx3-ubyte.gz etc.) not found; looked in: {looked}. "
            "Fix: `apt-get install dataset-fashion-mnist`, or pass --data-dir DIR holding the "
            "IDX files, or pass --download to fetch them."
        )
    root = Path(data_dir or os.environ.get("EGT_DATA") or DEFAULT_CACHE_DIR).expanduser()
    try:
        train = FashionMNIST(str(root), train=True, download=True)
        test = FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # network, disk, checksum: all reported the same way
        raise DataError(f"downloading Fashion-MNIST into {root} failed: {exc}") from exc
    return train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()


def _load_fashion_mnist(
    data_dir: str | Path | None,
    seed: int,
    val_fraction: float,
    augment: bool,
    image_size: int | None,
    download: bool,
) -> DatasetBundle:
    train_x, train_y, test_x, test_y = _fmnist_arrays(data_dir, download)

    def as_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(x))[:, None], torch.from_numpy(
            y.astype(np.int64)
        )

    images, labels = as_tensors(train_x, train_y)
    aug = PadCropFlip(pad=2, flip=True) if augment else None
    common = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, image_size=image_size)
    train_full = TensorImageDataset(images, labels, augment=aug, **common)
    plain_full = TensorImageDataset(images, labels, **common)
    train_idx, val_idx = _split_indices(len(images), val_fraction, seed)
    test = TensorImageDataset(*as_tensors(test_x, test_y), **common)
    return DatasetBundle(
        name="fashion-mnist",
        train=Subset(train_full, train_idx),
        val=Subset(plain_full, val_idx),
        test=test,
        classes=list(FASHION_MNIST_CLASSES),
        in_channels=1,
        input_size=image_size or 28,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )


# --------------------------------------------------------------------------------------------
# Shapes: a synthetic 9-class dataset whose ground-truth object mask is known exactly, so that
# explanations can be scored against where the object really is.

SHAPES_CLASSES = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "hexagon",
    "arrow",
    "heart",
]
SHAPES_SPLIT_SIZES = {"train": 20000, "val": 2000, "test": 2000}
SHAPES_IMAGE_SIZE = 64
# Fixed values, measured on train images 0..4095 of seeds 0 and 1 at 64x64 (see
# tests/test_data.py, which re-measures them). Fixed rather than per seed so a checkpoint's
# normalisation does not depend on which seed generated its data.
SHAPES_MEAN = (0.5005, 0.4990, 0.4980)
SHAPES_STD = (0.2683, 0.2691, 0.2675)
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_SUPERSAMPLE = 2  # target drawn at 2x and box-filtered: smooth edges, mask = coverage >= 50%


def _ngon(n: int, radius: float = 1.0, start: float = np.pi / 2) -> np.ndarray:
    a = start + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _unit(points: np.ndarray) -> np.ndarray:
    """Centre on the bounding box and scale into the unit disc, so every class fills the same
    area budget and rotation never pushes it out of the image."""
    points = points - (points.min(0) + points.max(0)) / 2
    return points / np.linalg.norm(points, axis=1).max()


def _star() -> np.ndarray:
    outer, inner = _ngon(5), _ngon(5, 0.42, np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(w: float = 0.3) -> np.ndarray:
    arm = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1)]
    arm += [(-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    return np.array(arm, dtype=np.float64)


def _arrow() -> np.ndarray:
    pts = [(-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2), (-1, 0.2)]
    return np.array(pts, dtype=np.float64)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)  # image y axis points down


# Each class: (outline, hole or None), in unit-disc coordinates.
_OUTLINES: list[tuple[np.ndarray, np.ndarray | None]] = [
    (_ngon(48), None),  # circle
    (_unit(_ngon(4, start=np.pi / 4)), None),  # square
    (_unit(_ngon(3)), None),  # triangle
    (_unit(_star()), None),  # star
    (_unit(_cross()), None),  # cross
    (_ngon(48), _ngon(48, 0.55)),  # ring
    (_ngon(6), None),  # hexagon
    (_unit(_arrow()), None),  # arrow
    (_unit(_heart()), None),  # heart
]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx, yy


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A cluttered float (H, W, 3) background in [0, 1]: colour noise, stripes, plaid or blobs."""
    xx, yy = _grid(size)
    kind = rng.integers(4)
    base = rng.random(3, dtype=np.float32)
    if kind == 0:  # smooth colour noise: a tiny random grid blown up bilinearly
        k = int(rng.integers(3, 8))
        grid = (rng.random((k, k, 3)) * 255).astype(np.uint8)
        noise = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))
        amp = rng.uniform(0.4, 1.0)
        bg = base + amp * (noise.astype(np.float32) / 255 - 0.5)
    elif kind in (1, 2):  # stripes (1) or plaid (2) between two random colours
        other = rng.random(3, dtype=np.float32)
        t = None
        for _ in range(int(kind)):
            theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            freq = rng.uniform(2, 9) * 2 * np.pi / size
            s = np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
            s = 0.5 + 0.5 * (np.sign(s) if rng.random() < 0.4 else s)
            t = s if t is None else 0.5 * (t + s)
        bg = base + (other - base) * t[..., None]
    else:  # soft elliptical blobs of random colours on a base colour
        bg = np.broadcast_to(base, (size, size, 3)).copy()
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.uniform(0, size, 2)
            sx, sy = rng.uniform(0.06, 0.2, 2) * size
            a = rng.uniform(0, np.pi)
            dx, dy = xx - cx, yy - cy
            u = (dx * np.cos(a) + dy * np.sin(a)) / sx
            v = (-dx * np.sin(a) + dy * np.cos(a)) / sy
            w = np.exp(-0.5 * (u * u + v * v))[..., None]
            bg = bg + (rng.random(3, dtype=np.float32) - bg) * w
    return np.clip(bg, 0, 1).astype(np.float32)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _draw_distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """1-3 small items that are none of the nine classes: lines, zigzags, open arcs, dot trails."""
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(4)
        colour = _colour(rng)
        x0, y0 = rng.uniform(0, size, 2)
        if kind == 0:  # straight line
            length, a = rng.uniform(0.2, 0.45) * size, rng.uniform(0, 2 * np.pi)
            end = (x0 + length * np.cos(a), y0 + length * np.sin(a))
            draw.line([(x0, y0), end], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:  # zigzag
            n, step = int(rng.integers(3, 6)), rng.uniform(0.05, 0.09) * size
            a = rng.uniform(0, 2 * np.pi)
            pts = []
            for i in range(n):
                side = step * (0.6 if i % 2 else -0.6)
                pts.append(
                    (
                        x0 + i * step * np.cos(a) - side * np.sin(a),
                        y0 + i * step * np.sin(a) + side * np.cos(a),
                    )
                )
            draw.line(pts, fill=colour, width=2, joint="curve")
        elif kind == 2:  # open ellipse arc: never closed, so never a circle or ring
            rx, ry = rng.uniform(0.06, 0.15, 2) * size
            start = rng.uniform(0, 360)
            span = rng.uniform(60, 180)
            box = [x0 - rx, y0 - ry, x0 + rx, y0 + ry]
            draw.arc(box, start, start + span, fill=colour, width=2)
        else:  # a short trail of tiny dots
            a, gap = rng.uniform(0, 2 * np.pi), rng.uniform(0.04, 0.07) * size
            r = max(1.0, size / 64)
            for i in range(int(rng.integers(3, 7))):
                cx, cy = x0 + i * gap * np.cos(a), y0 + i * gap * np.sin(a)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def _target_alpha(
    rng: np.random.Generator, label: int, size: int
) -> tuple[np.ndarray, tuple[float, float]]:
    """Coverage (H, W) in [0, 1] of the target shape at a random position, scale and rotation,
    plus the shape's centre."""
    outline, hole = _OUTLINES[label]
    radius = rng.uniform(0.30, 0.60) * size / 2  # shape extent = 30-60% of the side
    cx, cy = rng.uniform(radius + 1, size - 1 - radius, 2)
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    big = size * _SUPERSAMPLE
    layer = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(layer)

    def place(points: np.ndarray) -> list[tuple[float, float]]:
        p = (points @ rot * radius + (cx, cy)) * _SUPERSAMPLE
        return [tuple(q) for q in p.tolist()]

    draw.polygon(place(outline), fill=255)
    if hole is not None:
        draw.polygon(place(hole), fill=0)
    small = layer.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255, (cx, cy)


def _pick_target_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background pixels it covers (so the label is
    always visible), chosen among a few random candidates."""
    cands = rng.random((8, 3), dtype=np.float32)
    if under.size == 0:
        return cands[0]
    under = under[:: max(1, len(under) // 256)]  # a subsample is plenty and keeps this cheap
    dist = np.linalg.norm(cands[:, None, :] - under[None, :, :], axis=2)  # (8, M)
    score = np.quantile(dist, 0.2, axis=1)
    good = np.flatnonzero(score > 0.35)
    i = int(rng.choice(good)) if good.size else int(score.argmax())
    return cands[i]


def render_shape(
    seed: int, split: str, index: int, size: int = SHAPES_IMAGE_SIZE
) -> tuple[np.ndarray, int, np.ndarray]:
    """Draw shapes sample ``index`` of ``split``: (uint8 (H, W, 3) image, label, bool (H, W) mask).

    Everything comes from an RNG seeded by (seed, split, index), so any sample can be redrawn on
    demand in any worker without storing the dataset.
    """
    key = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, _SPLIT_IDS[split], index]
    rng = np.random.default_rng(key)
    label = index % len(SHAPES_CLASSES)  # balanced classes, and any prefix covers all nine
    bg = _background(rng, size)
    canvas = Image.fromarray((bg * 255).astype(np.uint8))
    _draw_distractors(rng, ImageDraw.Draw(canvas), size)
    img = np.asarray(canvas, dtype=np.float32) / 255

    alpha, (cx, cy) = _target_alpha(rng, label, size)
    mask = alpha >= 0.5
    colour = _pick_target_colour(rng, img[mask])
    xx, yy = _grid(size)
    g = rng.uniform(0, 2 * np.pi)  # gentle shading across the shape so the fill is not flat
    ramp = ((xx - cx) * np.cos(g) + (yy - cy) * np.sin(g)) / size  # within +-0.3 on the shape
    shade = 1 + rng.uniform(0, 0.4) * ramp
    fill = np.clip(colour * shade[..., None], 0, 1)
    img = img + (fill - img) * alpha[..., None]
    sigma = rng.uniform(0.0, 0.06)
    if sigma > 0:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * sigma
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return out, label, mask


class ShapesDataset(Dataset):
    """Synthetic 9-class shapes on cluttered backgrounds, drawn lazily per item (< 1 ms each).

    Augmentation is deliberately absent: every sample is already a fresh random placement, and
    any augmentation would also have to move the ground-truth mask.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        size: int | None = None,
        image_size: int = SHAPES_IMAGE_SIZE,
        mean: Sequence[float] = SHAPES_MEAN,
        std: Sequence[float] = SHAPES_STD,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise DataError(f"unknown shapes split {split!r}; use train, val or test")
        self.split = split
        self.seed = seed
        self.size = SHAPES_SPLIT_SIZES[split] if size is None else size
        self.image_size = image_size
        self.classes = list(SHAPES_CLASSES)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __len__(self) -> int:
        return self.size

    def _check(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"shapes index {index} out of range for {self.size} items")
        return index

    def render(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """Raw uint8 (H, W, 3) image, label and bool mask, e.g. for display in the app."""
        return render_shape(self.seed, self.split, self._check(index), self.image_size)

    def item(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Normalised image, label and the target's bool (H, W) mask, all from one drawing."""
        raw, label, mask = self.render(index)
        x = torch.from_numpy(raw).permute(2, 0, 1).float().div_(255.0)
        return _normalise(x, self.mean, self.std), label, torch.from_numpy(mask)

    def mask(self, index: int) -> torch.Tensor:
        """True on the target shape's pixels (coverage >= 50%)."""
        return torch.from_numpy(self.render(index)[2])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, label, _ = self.item(index)
        return x, label


def _load_shapes(seed: int, image_size: int | None) -> DatasetBundle:
    size = image_size or SHAPES_IMAGE_SIZE
    splits = {s: ShapesDataset(s, seed=seed, image_size=size) for s in _SPLIT_IDS}
    return DatasetBundle(
        name="shapes",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        classes=list(SHAPES_CLASSES),
        in_channels=3,
        input_size=size,
        mean=SHAPES_MEAN,
        std=SHAPES_STD,
    )


# --------------------------------------------------------------------------------------------
# imagefolder:PATH — the user's own pictures, one folder per class.

IMAGEFOLDER_DEFAULT_SIZE = 64
IMAGEFOLDER_TEST_FRACTION = 0.1
IMAGEFOLDER_STATS_IMAGES = 512


class _ImageFolder(ImageFolder):
    """ImageFolder that can be pinned to the train split's class indices: a val folder may lack
    a class, and that must not shift the labels of the others."""

    def __init__(self, root: str, transform: Callable, classes: dict[str, int] | None) -> None:
        self._pinned = classes
        super().__init__(root, transform=transform, allow_empty=classes is not None)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._pinned is None:
            return super().find_classes(directory)
        present = sorted(e.name for e in os.scandir(directory) if e.is_dir())
        unknown = [c for c in present if c not in self._pinned]
        if unknown:
            raise DataError(f"{directory} has class folders not in train/: {', '.join(unknown)}")
        return sorted(self._pinned, key=self._pinned.__getitem__), dict(self._pinned)


def _imagefolder(
    root: Path, transform: Callable, classes: dict[str, int] | None = None
) -> _ImageFolder:
    try:
        return _ImageFolder(str(root), transform=transform, classes=classes)
    except FileNotFoundError as exc:
        raise DataError(f"no usable images in {root}: {exc}") from exc


class _ToTensorRGB:
    """PIL image -> float (3, S, S) in [0, 1], squashed to a square so nothing is cropped away."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255.0)


class _Pipeline:
    """Resize, optional augmentation, normalise: the whole per-image path for ImageFolder."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.to_tensor = _ToTensorRGB(size)
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.augment = augment

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = self.to_tensor(img)
        if self.augment is not None:
            x = self.augment(x)
        return _normalise(x, self.mean, self.std)


def _load_imagefolder(
    path: str, seed: int, val_fraction: float, augment: bool, image_size: int | None
) -> DatasetBundle:
    if not path.strip():
        raise DataError("imagefolder: needs a path, e.g. imagefolder:/data/my_pictures")
    root = Path(path.strip()).expanduser()
    if not root.is_dir():
        raise DataError(f"imagefolder path {root} does not exist or is not a directory")
    size = image_size or IMAGEFOLDER_DEFAULT_SIZE
    split_root = root / "train"
    has_splits = split_root.is_dir()
    train_root = split_root if has_splits else root

    # Scan once without normalisation: classes, the split, then statistics from train only.
    raw = _imagefolder(train_root, _ToTensorRGB(size))
    if len(raw) == 0:
        raise DataError(f"no images found under {train_root}")
    class_to_idx = raw.class_to_idx
    if len(class_to_idx) < 2:
        raise DataError(f"{train_root} has {len(class_to_idx)} class folder(s); need at least 2")

    rest = list(range(len(raw)))
    folders: dict[str, Path] = {}
    carved: dict[str, list[int]] = {}
    for split, names, fraction, offset in (
        ("test", ("test",), IMAGEFOLDER_TEST_FRACTION, 1),
        ("val", ("val", "valid", "validation"), val_fraction, 0),
    ):
        found = [root / n for n in names if has_splits and (root / n).is_dir()]
        if found:
            folders[split] = found[0]
            continue
        if len(rest) < 3:
            raise DataError(f"{train_root} has only {len(rest)} images; need at least 3 to split")
        keep, take = _split_indices(len(rest), fraction, seed + offset)
        carved[split] = [rest[i] for i in take]
        rest = [rest[i] for i in keep]

    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(rest), generator=gen)[:IMAGEFOLDER_STATS_IMAGES].tolist()

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(picks), 64):
            yield torch.stack([raw[rest[i]][0] for i in picks[start : start + 64]])

    mean, std = _mean_std(batches, 3)

    aug = PadCropFlip(pad=max(1, size // 16), flip=True, mode="reflect") if augment else None
    train_all = _imagefolder(train_root, _Pipeline(size, mean, std, aug), class_to_idx)
    plain = _Pipeline(size, mean, std, None)
    plain_all = _imagefolder(train_root, plain, class_to_idx)
    evals: dict[str, Dataset] = {}
    for split, folder in folders.items():
        evals[split] = _imagefolder(folder, plain, class_to_idx)
        if len(evals[split]) == 0:
            raise DataError(f"no images found under {folder}")
    for split, ids in carved.items():
        evals[split] = Subset(plain_all, ids)
    return DatasetBundle(
        name="imagefolder",
        train=Subset(train_all, rest),
        val=evals["val"],
        test=evals["test"],
        classes=list(raw.classes),
        in_channels=3,
        input_size=size,
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------------------------
# medmnist:PATH.npz — the MedMNIST file layout, read with numpy (never unpickling).

_MEDMNIST_SPLITS = ("train", "val", "test")
_NAME_KEYS = ("classes", "class_names", "label_names")


def _medmnist_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            need = [f"{s}_{kind}" for s in _MEDMNIST_SPLITS for kind in ("images", "labels")]
            missing = [k for k in need if k not in keys]
            if missing:
                raise DataError(f"{path} lacks key(s) {', '.join(missing)} (has: {sorted(keys)})")
            images = {s: np.asarray(npz[f"{s}_images"]) for s in _MEDMNIST_SPLITS}
            labels = {s: np.asarray(npz[f"{s}_labels"]) for s in _MEDMNIST_SPLITS}
            names = next((npz[k] for k in _NAME_KEYS if k in keys), None)
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # not a zip, or an object array
        raise DataError(f"cannot read {path} as a MedMNIST .npz: {exc}") from exc
    if names is not None:
        names = np.asarray(names)
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{path}: class names must be a 1-D array of strings")
        names = [str(n) for n in names.tolist()]
    return images, labels, names


def _load_medmnist(path: str, seed: int, augment: bool, image_size: int | None) -> DatasetBundle:
    del seed  # MedMNIST ships its own fixed val split
    if not path.strip():
        raise DataError("medmnist: needs a path, e.g. medmnist:/data/pathmnist.npz")
    file = Path(path.strip()).expanduser()
    if not file.is_file():
        raise DataError(f"MedMNIST file {file} does not exist")
    images, labels, names = _medmnist_arrays(file)

    shape = None
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in _MEDMNIST_SPLITS:
        x, y = images[split], labels[split]
        if x.dtype != np.uint8:
            raise DataError(f"{file}: {split}_images must be uint8, got {x.dtype}")
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
            raise DataError(
                f"{file}: {split}_images has shape {x.shape}; want (N, H, W) or (N, H, W, 3)"
            )
        if shape is None:
            shape = x.shape[1:]
        elif x.shape[1:] != shape:
            raise DataError(f"{file}: {split}_images is {x.shape[1:]} per image, train is {shape}")
        if y.ndim == 2 and y.shape[1] != 1:
            raise DataError(f"{file}: {split}_labels is {y.shape}; multi-label is not supported")
        if y.ndim not in (1, 2) or y.dtype.kind not in "iu":
            raise DataError(f"{file}: {split}_labels must be integer (N,) or (N, 1), got {y.shape}")
        y = y.reshape(-1)
        if len(y) != len(x):
            raise DataError(f"{file}: {len(x)} {split} images but {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{file}: the {split} split is empty")
        if y.min() < 0:
            raise DataError(f"{file}: {split}_labels contains negative labels")
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
        tensors[split] = (t, torch.from_numpy(y.astype(np.int64)))

    top = max(int(tensors[s][1].max()) for s in _MEDMNIST_SPLITS) + 1
    if names is not None:
        if top > len(names):
            raise DataError(f"{file}: labels go up to {top - 1} but only {len(names)} names")
        classes = names
    else:
        classes = [f"class {i}" for i in range(top)]

    train_x = tensors["train"][0]
    channels = train_x.shape[1]
    if train_x.shape[-1] != train_x.shape[-2] and image_size is None:
        raise DataError(f"{file}: images are {tuple(shape[:2])}, not square; pass an image size")

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(train_x), 1024):
            yield train_x[start : start + 1024].float() / 255

    mean, std = _mean_std(batches, channels)
    # Crop jitter only: MedMNIST has left/right classes (e.g. OrganMNIST), so flips would lie.
    side = int(train_x.shape[-1])
    aug = PadCropFlip(pad=max(1, side // 14), flip=False) if augment else None
    common = dict(mean=mean, std=std, image_size=image_size)
    return DatasetBundle(
        name="medmnist",
        train=TensorImageDataset(*tensors["train"], augment=aug, **common),
        val=TensorImageDataset(*tensors["val"], **common),
        test=TensorImageDataset(*tensors["test"], **common),
        classes=classes,
        in_channels=int(channels),
        input_size=image_size or side,
        mean=mean,
        std=std,
    )

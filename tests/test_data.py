"""Tests for egt_core.data on tiny generated files: no network, CPU only, a few seconds."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from egt_core import data
from egt_core.data import DataError, load_dataset

# --------------------------------------------------------------------------------------------
# helpers


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 images (N, H, W) or labels (N,) as an IDX file, gzipped if path ends in .gz."""
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_fmnist(folder: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> dict:
    rng = np.random.default_rng(123)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Hide the machine's Fashion-MNIST install, cache and $EGT_DATA from the loader."""
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-dir")
    monkeypatch.setattr(data, "DEFAULT_CACHE_DIR", tmp_path / "no-cache-dir")
    monkeypatch.delenv("EGT_DATA", raising=False)
    return tmp_path


# --------------------------------------------------------------------------------------------
# fashion-mnist


def test_fashion_mnist_from_gz_files(isolated: Path) -> None:
    arrays = make_fmnist(isolated / "fm")
    b = load_dataset("fashion-mnist", data_dir=isolated / "fm", augment=False)
    assert (len(b.train), len(b.val), len(b.test)) == (45, 5, 20)
    assert b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot"
    assert (b.in_channels, b.input_size, b.mean, b.std) == (1, 28, (0.2860,), (0.3530,))
    x, y = b.test[3]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and isinstance(y, int)
    raw = torch.from_numpy(arrays["t10k-images-idx3-ubyte"][3]).float() / 255
    assert torch.allclose(x[0], (raw - 0.2860) / 0.3530, atol=1e-5)
    assert y == 3
    i = b.val.indices[0]
    xv, yv = b.val[0]
    raw = torch.from_numpy(arrays["train-images-idx3-ubyte"][i]).float() / 255
    assert torch.allclose(xv[0], (raw - 0.2860) / 0.3530, atol=1e-5) and yv == i % 10


def test_fashion_mnist_val_split_is_seeded_and_disjoint(isolated: Path) -> None:
    make_fmnist(isolated / "fm")
    a = load_dataset("fashion-mnist", data_dir=isolated / "fm", seed=1)
    again = load_dataset("fashion-mnist", data_dir=isolated / "fm", seed=1)
    other = load_dataset("fashion-mnist", data_dir=isolated / "fm", seed=2)
    assert list(a.val.indices) == list(again.val.indices)
    assert list(a.val.indices) != list(other.val.indices)
    assert not set(a.train.indices) & set(a.val.indices)
    assert sorted([*a.train.indices, *a.val.indices]) == list(range(50))
    big = load_dataset("fashion-mnist", data_dir=isolated / "fm", val_fraction=0.2)
    assert len(big.val) == 10


def test_fashion_mnist_env_var_plain_files_and_torchvision_layout(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_fmnist(isolated / "env", gz=False)
    monkeypatch.setenv("EGT_DATA", str(isolated / "env"))
    assert len(load_dataset("fashion-mnist").test) == 20
    monkeypatch.delenv("EGT_DATA")
    make_fmnist(isolated / "tv" / "FashionMNIST" / "raw", n_test=7)
    assert len(load_dataset("fashion-mnist", data_dir=isolated / "tv").test) == 7


def test_fashion_mnist_augmentation_and_resize(isolated: Path) -> None:
    make_fmnist(isolated / "fm")
    b = load_dataset("fashion-mnist", data_dir=isolated / "fm", augment=True, image_size=32)
    torch.manual_seed(0)
    views = torch.stack([b.train[0][0] for _ in range(12)])
    assert views.shape == (12, 1, 32, 32) and b.input_size == 32
    assert not all(torch.equal(views[0], v) for v in views[1:]), "train should be augmented"
    assert torch.equal(b.val[0][0], b.val[0][0]), "val must not be augmented"


def test_fashion_mnist_missing_everywhere_explains_fix(isolated: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", data_dir=isolated / "empty")
    msg = str(err.value)
    assert "\n" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "--download" in msg
    assert str(isolated / "empty") in msg and "no-system-dir" in msg


def test_read_idx_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x05" + b"\x00" * 20)
    with pytest.raises(DataError, match="magic"):
        data.read_idx(bad)
    short = tmp_path / "short"
    write_idx(short, np.zeros((4, 28, 28), np.uint8))
    short.write_bytes(short.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(short)


@pytest.mark.skipif(
    not (data.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EGT_DATA", raising=False)
    b = load_dataset("fashion-mnist")
    assert len(b.train) + len(b.val) == 60000 and len(b.val) == 6000
    assert len(b.test) == 10000


# --------------------------------------------------------------------------------------------
# shapes


def test_shapes_bundle_and_determinism(monkeypatch: pytest.MonkeyPatch) -> None:
    b = load_dataset("shapes", seed=3)
    assert (len(b.train), len(b.val), len(b.test)) == (20000, 2000, 2000)
    assert b.classes == data.SHAPES_CLASSES and len(b.classes) == 9
    assert (b.in_channels, b.input_size) == (3, 64)
    x, y = b.train[5]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and isinstance(y, int)
    again = load_dataset("shapes", seed=3)
    other = load_dataset("shapes", seed=4)
    for i in (0, 7, 19999):
        assert torch.equal(b.train[i][0], again.train[i][0])
        assert not torch.equal(b.train[i][0], other.train[i][0])
    assert not torch.equal(b.train[0][0], b.val[0][0]), "splits must not share images"
    monkeypatch.setitem(data.SHAPES_SPLIT_SIZES, "train", 100)
    assert len(load_dataset("shapes").train) == 100


def test_shapes_classes_all_appear_and_index_checks() -> None:
    ds = data.ShapesDataset("val", size=30)
    assert sorted({ds[i][1] for i in range(18)}) == list(range(9))
    assert torch.equal(ds[-1][0], ds[29][0])
    with pytest.raises(IndexError):
        ds[30]


def test_shapes_mask_aligns_with_drawn_object() -> None:
    ds = data.ShapesDataset("train", seed=0, size=200)
    for i in range(0, 200, 7):
        raw, label, mask = ds.render(i)
        assert mask.shape == (64, 64) and mask.dtype == bool
        area = mask.mean()
        assert 0.01 < area < 0.5, f"item {i}: mask covers {area:.3f} of the image"
        rows, cols = np.nonzero(mask)
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < 63 and cols.max() < 63
        img = raw.astype(np.float32) / 255
        core, grown = mask.copy(), mask.copy()
        for axis in (0, 1):
            for shift in (-1, 1):
                core &= np.roll(mask, shift, axis=axis)  # edge pixels blend with the background
            for shift in (-2, -1, 1, 2):
                grown |= np.roll(mask, shift, axis=axis)
        inside = img[core]
        centre = np.median(inside, axis=0)
        # The object's colour dominates inside the mask ...
        near = np.linalg.norm(inside - centre, axis=1) < 0.3
        assert near.mean() > 0.9, f"item {i}: mask pixels are not one object colour"
        # ... and the pixels bordering the mask look clearly different from it.
        border = img[grown & ~mask]
        assert np.linalg.norm(border - centre, axis=1).mean() > 0.2, f"item {i}: weak contrast"
        x, y, m = ds.item(i)
        assert y == label and torch.equal(m, torch.from_numpy(mask))
        assert torch.equal(ds.mask(i), m) and torch.equal(ds[i][0], x)


def test_shapes_image_size_override_and_loader() -> None:
    b = load_dataset("shapes", image_size=32)
    assert b.input_size == 32 and b.train[0][0].shape == (3, 32, 32)
    assert b.train.mask(0).shape == (32, 32)
    xb, yb = next(iter(DataLoader(b.val, batch_size=8)))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64


def test_shapes_normalisation_constants_match_the_data() -> None:
    ds = data.ShapesDataset("train", seed=0, size=256, mean=(0, 0, 0), std=(1, 1, 1))
    xs = torch.stack([ds[i][0] for i in range(256)])
    mean = xs.mean(dim=(0, 2, 3))
    std = xs.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(data.SHAPES_MEAN), atol=0.04)
    assert torch.allclose(std, torch.tensor(data.SHAPES_STD), atol=0.04)


# --------------------------------------------------------------------------------------------
# imagefolder


def write_pngs(folder: Path, n: int, colour: tuple[int, int, int], size=(20, 14)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", size, tuple(min(255, c + 3 * i) for c in colour))
        if i % 3 == 0:
            img = img.convert("L")  # a grey image must come out as RGB as well
        img.save(folder / f"{i}.png")


def test_imagefolder_flat_carves_seeded_splits(tmp_path: Path) -> None:
    write_pngs(tmp_path / "pics" / "cat", 10, (200, 40, 40))
    write_pngs(tmp_path / "pics" / "dog", 10, (40, 40, 200))
    b = load_dataset(f"imagefolder:{tmp_path / 'pics'}", image_size=16, seed=5)
    assert b.classes == ["cat", "dog"] and (b.in_channels, b.input_size) == (3, 16)
    assert len(b.train) + len(b.val) + len(b.test) == 20 and len(b.val) >= 1 and len(b.test) >= 1
    ids = [set(b.train.indices), set(b.val.indices), set(b.test.indices)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    x, y = b.val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y in (0, 1)
    assert len(b.mean) == 3 and len(b.std) == 3 and all(s > 0 for s in b.std)
    again = load_dataset(f"imagefolder:{tmp_path / 'pics'}", image_size=16, seed=5)
    assert list(again.val.indices) == list(b.val.indices) and again.mean == b.mean
    pickle.dumps(b.train)  # DataLoader workers may need to pickle it


def test_imagefolder_uses_split_folders_with_pinned_labels(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for split, n in (("train", 4), ("test", 2)):
        write_pngs(root / split / "a", n, (250, 0, 0))
        write_pngs(root / split / "b", n, (0, 0, 250))
    write_pngs(root / "val" / "b", 3, (0, 0, 250))  # val lacks class "a"
    b = load_dataset(f"imagefolder:{root}", augment=False)
    assert (len(b.train), len(b.val), len(b.test)) == (8, 3, 4)
    assert {b.val[i][1] for i in range(3)} == {1}, "labels must follow train's class indices"
    assert b.input_size == 64 and b.train[0][0].shape == (3, 64, 64)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    with pytest.raises(DataError, match="no usable images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("imagefolder:")


# --------------------------------------------------------------------------------------------
# medmnist


def write_npz(path: Path, rgb: bool, n=(12, 4, 5), **extra: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, 28, 28, 3) if rgb else (count, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = (np.arange(count) % 3).astype(np.int64)
        arrays[f"{split}_labels"] = labels if rgb else labels[:, None]
    arrays.update(extra)
    np.savez(path, **arrays)


def test_medmnist_gray(tmp_path: Path) -> None:
    write_npz(tmp_path / "g.npz", rgb=False)
    b = load_dataset(f"medmnist:{tmp_path / 'g.npz'}", augment=False)
    assert (len(b.train), len(b.val), len(b.test)) == (12, 4, 5)
    assert b.classes == ["class 0", "class 1", "class 2"]
    assert (b.in_channels, b.input_size) == (1, 28)
    images = np.load(tmp_path / "g.npz")["train_images"] / 255
    assert b.mean[0] == pytest.approx(images.mean(), abs=1e-3)
    assert b.std[0] == pytest.approx(images.std(), abs=1e-3)
    x, y = b.train[4]
    expected = (torch.from_numpy(images[4]).float() - b.mean[0]) / b.std[0]
    assert x.shape == (1, 28, 28) and y == 1 and torch.allclose(x[0], expected, atol=1e-4)


def test_medmnist_rgb_with_names_and_resize(tmp_path: Path) -> None:
    names = np.array(["benign", "malignant", "normal"])
    write_npz(tmp_path / "c.npz", rgb=True, class_names=names)
    b = load_dataset(f"medmnist:{tmp_path / 'c.npz'}", image_size=32)
    assert b.classes == ["benign", "malignant", "normal"]
    assert (b.in_channels, b.input_size, len(b.mean)) == (3, 32, 3)
    x, y = b.train[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 2


def test_medmnist_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"medmnist:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "nokeys.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="val_images"):
        load_dataset(f"medmnist:{tmp_path / 'nokeys.npz'}")
    write_npz(tmp_path / "flat.npz", rgb=False)
    arrays = dict(np.load(tmp_path / "flat.npz"))
    arrays["train_images"] = arrays["train_images"].reshape(12, -1)
    np.savez(tmp_path / "flat.npz", **arrays)
    with pytest.raises(DataError, match="train_images has shape"):
        load_dataset(f"medmnist:{tmp_path / 'flat.npz'}")
    arrays = dict(np.load(tmp_path / "flat.npz"))
    arrays["train_images"] = arrays["train_images"].reshape(12, 28, 28)
    arrays["val_labels"] = np.zeros((4, 5), np.int64)
    np.savez(tmp_path / "multi.npz", **arrays)
    with pytest.raises(DataError, match="multi-label"):
        load_dataset(f"medmnist:{tmp_path / 'multi.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"medmnist:{tmp_path / 'junk.npz'}")
    arrays["val_labels"] = np.array([object()] * 4)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(f"medmnist:{tmp_path / 'pickled.npz'}")


# --------------------------------------------------------------------------------------------
# spec handling and limit


def test_unknown_spec_lists_known_datasets() -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar-10")
    assert "cifar-10" in str(err.value) and "fashion-mnist" in str(err.value)
    assert data.known_datasets() == [
        "fashion-mnist",
        "shapes",
        "imagefolder:PATH",
        "medmnist:PATH.npz",
    ]
    with pytest.raises(DataError):
        load_dataset("shapes", val_fraction=1.5)


def test_limit() -> None:
    ds = data.ShapesDataset("train", size=54000)
    small = data.limit(ds, 10)
    assert len(small) == 10 and torch.equal(small[3][0], ds[3][0])
    with pytest.raises(DataError) as err:
        data.limit(ds, 100000)
    assert str(err.value) == "--limit 100000 is larger than the 54000 training images"
    with pytest.raises(DataError):
        data.limit(ds, 0)

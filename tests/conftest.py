"""Shared fixtures: tiny multi-exit models (fast on a shared 2-core CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from egt_core.models import MultiExitNet, build_model

TINY_GRAY = dict(input_size=28, widths=(4, 8, 8, 8), head_widths=(4, 8))
TINY_RGB = dict(input_size=32, widths=(4, 8, 8, 8), head_widths=(4, 8))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters.

    Fresh BNs are (almost) the identity in eval mode, which would hide bugs in BN folding and
    in eval/train handling.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def make_tiny_gray(seed: int = 0, num_classes: int = 10) -> MultiExitNet:
    torch.manual_seed(seed)
    return randomize_bn(build_model("small", 1, num_classes, **TINY_GRAY), seed).eval()


def make_tiny_rgb(seed: int = 0, num_classes: int = 5) -> MultiExitNet:
    torch.manual_seed(seed)
    return randomize_bn(build_model("small", 3, num_classes, **TINY_RGB), seed).eval()


@pytest.fixture
def tiny_gray() -> MultiExitNet:
    """1-channel 28 px, 10 classes, eval mode, random weights."""
    return make_tiny_gray()


@pytest.fixture
def tiny_rgb() -> MultiExitNet:
    """3-channel 32 px, 5 classes, eval mode, random weights."""
    return make_tiny_rgb()


@pytest.fixture
def gray_batch() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 1, 28, 28)


@pytest.fixture
def rgb_batch() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread (tiny tensors; the 2 cores are shared) and restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- tiny training data

TINY_OPTIONS = {"widths": [4, 8, 8, 8], "head_widths": [4, 8]}


def write_idx(path, array) -> None:
    """An IDX file (gzipped if ``path`` ends in .gz), as Fashion-MNIST ships them."""
    import gzip

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def write_tiny_fmnist(folder, n_train: int = 160, n_test: int = 48, seed: int = 0):
    """Fashion-MNIST-shaped IDX .gz files with learnable classes (a bright bar per class)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def images(n: int) -> tuple:
        labels = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            x[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 230
        return x, labels

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = images(n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder


@pytest.fixture(scope="session")
def tiny_fmnist_dir(tmp_path_factory):
    """A folder of tiny Fashion-MNIST IDX files (160 train incl. 16 val, 48 test images)."""
    return write_tiny_fmnist(tmp_path_factory.mktemp("fmnist"))


def tiny_train_config(data_dir, out, **overrides):
    """A TrainConfig for a training run of about a second (2 steps per epoch)."""
    from egt_core.train import TrainConfig

    values = dict(
        dataset="fashion-mnist",
        data_dir=str(data_dir),
        model_options=dict(TINY_OPTIONS),
        epochs=2,
        batch_size=32,
        limit=64,
        lam=1.0,
        threads=1,
        out=str(out),
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_fmnist_dir, tmp_path_factory):
    """A checkpoint trained for one tiny epoch on `tiny_fmnist_dir` (its data_dir is needed)."""
    from egt_core.train import BEST, train

    out = tmp_path_factory.mktemp("tiny-run")
    train(tiny_train_config(tiny_fmnist_dir, out, epochs=1), progress=False)
    return out / BEST

"""Safe checkpoints: safetensors weights with JSON metadata in the same file; never unpickled.

A checkpoint is one ``.safetensors`` file. Its header's ``__metadata__`` holds one JSON document
under the key ``egt`` (architecture and config, classes, input size and channels, normalisation,
training config, metrics, library versions). Loading reads only that JSON and raw tensors, so a
checkpoint can carry numbers but never code. Files beside it (training log, evaluation report) are
named in the metadata by bare file name and must stay in the checkpoint's folder.
"""

from __future__ import annotations

import json
import math
import os
import platform
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models import MultiExitNet, build_model

META_KEY = "egt"
FORMAT_VERSION = 1
REQUIRED = ("arch", "model_config", "classes", "input_size", "in_channels", "mean", "std")
SIDECAR_FIELDS = ("report", "log")
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message a person can act on."""


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
    }


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write a safetensors file through a temp file and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever shares the file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str | Path, model: MultiExitNet, metadata: dict[str, Any]) -> Path:
    """Save weights and metadata atomically; fills in arch, model config and versions."""
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "model_config": model.config,
        "in_channels": model.config["in_channels"],
        "num_exits": model.num_exits,
        "versions": library_versions(),
        **metadata,
    }
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata lacks {missing}")
    atomic_save_tensors(path, model.state_dict(), {META_KEY: meta})
    return Path(path)


def _sniff(path: Path) -> None:
    """Refuse what is not safetensors by its first bytes, before any parser sees it."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 0:
        raise CheckpointError(f"{path} is empty.")
    bad_header = f"{path} is not a valid safetensors file (bad or truncated header)."
    # A safetensors file starts with its header length (u64 little-endian) and then "{". That
    # length's low byte can be 0x80 (the pickle opcode PROTO) or its first bytes spell "PK", so
    # recognise the safetensors shape first and only then look for pickle / zip signatures.
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER or n > path.stat().st_size - 8:
            raise CheckpointError(bad_header)
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a pickle / torch.save file. EGT only loads safetensors checkpoints "
            "because unpickling can run arbitrary code."
        )
    if len(head) < 9:
        raise CheckpointError(f"{path} is too short to be a safetensors checkpoint (truncated?).")
    raise CheckpointError(bad_header)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, validated, without building the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    _sniff(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if META_KEY not in raw:
        raise CheckpointError(f"{path} has no EGT metadata (was it saved by EGT Explorer?)")
    try:
        meta = json.loads(raw[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has invalid metadata JSON: {e}") from None
    _validate(meta, path)
    return meta


def _validate(meta: Any, path: Path) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    cfg = meta["model_config"]
    if not isinstance(cfg, dict) or not isinstance(meta["arch"], str):
        raise CheckpointError(f"{path}: metadata 'arch'/'model_config' malformed")
    if not isinstance(meta["classes"], list) or not all(
        isinstance(c, str) for c in meta["classes"]
    ):
        raise CheckpointError(f"{path}: metadata 'classes' must be a list of names")
    channels = meta["in_channels"]
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise CheckpointError(f"{path}: metadata 'in_channels' must be a positive integer")
    for key in ("mean", "std"):
        v = meta[key]
        if (
            not isinstance(v, list)
            or len(v) != channels
            or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in v
            )
        ):
            raise CheckpointError(f"{path}: metadata '{key}' must list {channels} finite numbers")
    if any(s <= 0 for s in meta["std"]):
        raise CheckpointError(f"{path}: metadata 'std' must be positive")
    if not isinstance(meta["input_size"], int) or not 8 <= meta["input_size"] <= 1024:
        raise CheckpointError(f"{path}: metadata 'input_size' must be an integer in 8..1024")
    for key in SIDECAR_FIELDS:
        if key in meta:
            sidecar_path(path, meta, key)


def sidecar_path(path: str | Path, meta: dict, key: str) -> Path | None:
    """A file named in the metadata (report, log), resolved inside the checkpoint's folder only."""
    name = meta.get(key)
    if name is None:
        return None
    folder = Path(path).resolve().parent
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{path}: metadata '{key}' must be a bare file name, got {name!r}")
    target = (folder / name).resolve()
    if target.parent != folder:
        raise CheckpointError(f"{path}: metadata '{key}' points outside the checkpoint's folder")
    return target


def _build(meta: dict[str, Any], path: Path, device: str | None = None) -> MultiExitNet:
    """The model the metadata describes (on ``device``; "meta" allocates no memory)."""
    cfg = dict(meta["model_config"])
    try:
        in_channels = int(cfg.pop("in_channels", meta["in_channels"]))
        num_classes = int(cfg.pop("num_classes", len(meta["classes"])))
        if device is None:
            model = build_model(meta["arch"], in_channels, num_classes, **cfg)
        else:
            with torch.device(device):
                model = build_model(meta["arch"], in_channels, num_classes, **cfg)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot build the model: {e}") from None
    if num_classes != len(meta["classes"]):
        raise CheckpointError(f"{path}: {num_classes} outputs but {len(meta['classes'])} classes")
    return model


def load_checkpoint(
    path: str | Path, map_location: str = "cpu"
) -> tuple[MultiExitNet, dict[str, Any]]:
    """A ready eval-mode model and its metadata; a `CheckpointError` for anything unusable."""
    path = Path(path)
    meta = read_metadata(path)
    # Check the architecture against the file's tensor shapes (read from the header) on a
    # memory-free skeleton first: metadata asking for a huge model cannot exhaust memory, since
    # the real model is only built once its weights are known to be in the file.
    expected = {k: tuple(v.shape) for k, v in _build(meta, path, "meta").state_dict().items()}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {e}") from None
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match {meta['arch']}: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
            f"{'...' if len(unexpected) > 3 else ''}"
        )
    wrong = [k for k, v in shapes.items() if v != expected[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{path}: shape mismatch for {k}: file has {shapes[k]}, "
            f"model needs {expected[k]} ({len(wrong)} tensors differ)"
        )
    model = _build(meta, path)
    try:
        state = load_file(str(path), device=map_location)
        model.load_state_dict(state)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {e}") from None
    model.eval()
    return model, meta

"""Checkpoints: round trip, atomic writes, and refusal of everything unsafe or unusable."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY_GRAY, make_tiny_gray
from safetensors.torch import save_file

from egt_core.checkpoints import (
    META_KEY,
    CheckpointError,
    atomic_save_tensors,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    sidecar_path,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = [f"class{i}" for i in range(10)]
BASE = {"classes": CLASSES, "input_size": 28, "mean": [0.5], "std": [0.25]}


def _saved(tmp_path: Path, **extra) -> tuple[Path, torch.nn.Module]:
    model = make_tiny_gray()
    path = save_checkpoint(tmp_path / "model.safetensors", model, {**BASE, **extra})
    return path, model


def _valid_meta(model) -> dict:
    return {
        "format_version": 1,
        "arch": model.arch,
        "model_config": model.config,
        "in_channels": 1,
        "num_exits": model.num_exits,
        **BASE,
    }


def write_raw(path: Path, tensors: dict[str, torch.Tensor], meta: dict | str | None) -> Path:
    """A safetensors file with arbitrary (possibly bad) tensors and EGT metadata."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if meta is None:
        save_file(tensors, str(path))
    else:
        text = meta if isinstance(meta, str) else json.dumps(meta)
        save_file(tensors, str(path), metadata={META_KEY: text})
    return path


def refused(path: Path, *fragments: str) -> str:
    """Both loaders refuse ``path`` with a CheckpointError naming ``fragments``."""
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    for frag in fragments:
        assert frag.lower() in msg.lower(), msg
    return msg


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path, gray_batch):
    path, model = _saved(tmp_path, metrics={"acc": 0.9}, training={"lam": 0.5})
    model.train()  # the saved model's mode must not leak into the loaded one
    loaded, meta = load_checkpoint(path)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    model.eval()
    with torch.no_grad():
        for a, b in zip(model(gray_batch), loaded(gray_batch), strict=True):
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert meta["classes"] == CLASSES
    assert meta["metrics"] == {"acc": 0.9} and meta["training"] == {"lam": 0.5}
    assert meta["arch"] == "small" and meta["num_exits"] == 3
    assert meta["model_config"]["widths"] == list(TINY_GRAY["widths"])
    assert meta["mean"] == [0.5] and meta["std"] == [0.25]
    assert "torch" in meta["versions"]
    assert read_metadata(path) == meta
    assert loaded.config["in_channels"] == 1 and loaded.num_classes == 10


def test_save_requires_metadata(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        save_checkpoint(tmp_path / "m.safetensors", make_tiny_gray(), {"input_size": 28})


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path, _ = _saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    # overwrite in place
    save_checkpoint(path, make_tiny_gray(seed=1), BASE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    load_checkpoint(path)


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path, _ = _saved(tmp_path)
    before = path.read_bytes()
    bad = {"a": torch.zeros(3), "b": object()}  # not a tensor: the save fails midway
    with pytest.raises(AttributeError):
        atomic_save_tensors(path, bad, {META_KEY: {}})  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_header_length_looking_like_pickle_is_loaded(tmp_path):
    """A safetensors header length whose low byte is 0x80 (pickle PROTO) is still safetensors."""
    model = make_tiny_gray()
    for pad in range(264):
        path = save_checkpoint(tmp_path / "m.safetensors", model, {**BASE, "note": "x" * pad})
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        if n % 256 == 0x80:
            break
    else:
        pytest.fail("could not craft the header length")
    assert path.read_bytes()[:1] == b"\x80"
    loaded, meta = load_checkpoint(path)
    assert meta["classes"] == CLASSES
    # Truncated inside the header, it is reported as truncated, not as a pickle.
    data = path.read_bytes()
    path.write_bytes(data[:40])
    msg = refused(path, "truncated")
    assert "pickle" not in msg


# --------------------------------------------------------------------------- refusals


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_with_payload_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    blob = pickle.dumps({"state_dict": _Payload(marker)}, protocol=protocol)
    # sanity: the payload really runs when unpickled (in a throwaway place)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe), protocol=protocol))
    assert probe.exists()
    probe.unlink()
    for name in ("evil.safetensors", "evil.pt", "evil.pkl"):
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(CheckpointError):
            read_metadata(path)
        refused(path, str(path.name))
    assert not marker.exists()


def test_pickle_message_is_clear(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    refused(path, "pickle", "safetensors")


def test_torch_save_file_is_refused(tmp_path):
    model = make_tiny_gray()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    refused(path, "pickle", "torch.save")
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    refused(legacy, "pickle")


def test_wrong_shapes_refused(tmp_path):
    model = make_tiny_gray()
    state = model.state_dict()
    state["heads.0.fc.weight"] = torch.zeros(10, 5)
    path = write_raw(tmp_path / "m.safetensors", state, _valid_meta(model))
    refused(path, "shape", "heads.0.fc.weight")


def test_missing_keys_refused(tmp_path):
    model = make_tiny_gray()
    state = model.state_dict()
    del state["heads.1.fc.bias"]
    path = write_raw(tmp_path / "m.safetensors", state, _valid_meta(model))
    refused(path, "missing", "heads.1.fc.bias")


def test_unexpected_keys_refused(tmp_path):
    model = make_tiny_gray()
    state = {**model.state_dict(), "extra.weight": torch.zeros(2)}
    path = write_raw(tmp_path / "m.safetensors", state, _valid_meta(model))
    refused(path, "unexpected", "extra.weight")


def test_missing_egt_metadata_refused(tmp_path):
    model = make_tiny_gray()
    path = write_raw(tmp_path / "m.safetensors", model.state_dict(), None)
    refused(path, "no EGT metadata")
    path = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    refused(path, "no EGT metadata")


def test_invalid_metadata_json_refused(tmp_path):
    model = make_tiny_gray()
    path = write_raw(tmp_path / "m.safetensors", model.state_dict(), "{not json")
    refused(path, "invalid metadata JSON")
    path = write_raw(tmp_path / "n.safetensors", model.state_dict(), "[1, 2]")
    refused(path, "JSON object")


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"classes": "cat,dog"}, "classes"),
        ({"classes": CLASSES[:3]}, "classes"),
        ({"mean": [0.1, 0.2]}, "mean"),
        ({"std": [0.0]}, "std"),
        ({"std": [float("nan")]}, "std"),
        ({"mean": [float("inf")]}, "mean"),
        ({"mean": [True]}, "mean"),
        ({"in_channels": "1"}, "in_channels"),
        ({"in_channels": 0}, "in_channels"),
        ({"input_size": 4}, "input_size"),
        ({"input_size": "28"}, "input_size"),
        ({"model_config": "small"}, "model_config"),
    ],
)
def test_bad_metadata_fields_refused(tmp_path, change, fragment):
    model = make_tiny_gray()
    path = write_raw(
        tmp_path / "m.safetensors", model.state_dict(), {**_valid_meta(model), **change}
    )
    refused(path, fragment)


@pytest.mark.parametrize("field", ["arch", "classes", "mean", "std", "input_size", "model_config"])
def test_missing_required_field_refused(tmp_path, field):
    model = make_tiny_gray()
    meta = _valid_meta(model)
    del meta[field]
    path = write_raw(tmp_path / "m.safetensors", model.state_dict(), meta)
    refused(path, "lacks", field)


def test_unknown_architecture_refused(tmp_path):
    model = make_tiny_gray()
    path = write_raw(
        tmp_path / "m.safetensors", model.state_dict(), {**_valid_meta(model), "arch": "resnet9000"}
    )
    refused(path, "cannot build", "resnet9000")


def test_bad_model_config_refused(tmp_path):
    model = make_tiny_gray()
    meta = _valid_meta(model)
    meta["model_config"] = {**meta["model_config"], "depth": 5}
    path = write_raw(tmp_path / "m.safetensors", model.state_dict(), meta)
    refused(path, "cannot build")


@pytest.mark.parametrize(
    "config",
    [
        {"widths": [-1, 8, 8, 8]},  # torch raises RuntimeError while building
        {"widths": [4, 8, 8]},
        {"head_widths": "ab"},
        {"input_size": "big"},
    ],
)
def test_unbuildable_model_config_refused(tmp_path, config):
    model = make_tiny_gray()
    meta = _valid_meta(model)
    meta["model_config"] = {**meta["model_config"], **config}
    path = write_raw(tmp_path / "m.safetensors", model.state_dict(), meta)
    refused(path, "cannot build")


def test_huge_model_config_refused_before_allocating(tmp_path):
    """Metadata asking for a ~10^12-parameter model is refused by shape, never allocated."""
    model = make_tiny_gray()
    meta = _valid_meta(model)
    meta["model_config"] = {**meta["model_config"], "widths": [4, 8, 8, 1_000_000]}
    path = write_raw(tmp_path / "m.safetensors", model.state_dict(), meta)
    refused(path, "shape mismatch")


def test_truncated_file_refused(tmp_path):
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refused(path)
    # cut inside the header, and just the last byte
    path.write_bytes(data[:20])
    refused(path, "truncated")
    path.write_bytes(data[:-1])
    refused(path)
    path.write_bytes(data[:5])
    refused(path)  # "too short" (or "pickle" if the header length's low byte is 0x80)
    path.write_bytes(b"{}")
    refused(path, "too short")


def test_empty_file_refused(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    refused(path, "empty")


def test_missing_file_refused(tmp_path):
    refused(tmp_path / "nope.safetensors", "no checkpoint file")
    refused(tmp_path, "no checkpoint file")  # a folder is not a checkpoint


def test_garbage_refused(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(4096))
    refused(path)
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    refused(path)


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/etc/passwd", "..", ".", "", "sub/report.json", "../report.json", 7],
)
@pytest.mark.parametrize("key", ["report", "log"])
def test_sidecar_outside_folder_refused(tmp_path, name, key):
    model = make_tiny_gray()
    path = write_raw(
        tmp_path / "m.safetensors", model.state_dict(), {**_valid_meta(model), key: name}
    )
    msg = refused(path, key)
    assert "bare file name" in msg or "outside" in msg


def test_sidecar_symlink_escape_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (tmp_path / "secret.json").write_text("{}")
    (folder / "report.json").symlink_to(tmp_path / "secret.json")
    meta = {"report": "report.json"}
    with pytest.raises(CheckpointError, match="outside"):
        sidecar_path(folder / "m.safetensors", meta, "report")


def test_sidecar_inside_folder_ok(tmp_path):
    path, _ = _saved(tmp_path, report="report.json", log="train.log")
    _, meta = load_checkpoint(path)
    assert sidecar_path(path, meta, "report") == (tmp_path / "report.json").resolve()
    assert sidecar_path(path, meta, "log") == (tmp_path / "train.log").resolve()
    assert sidecar_path(path, {}, "report") is None

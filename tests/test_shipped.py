"""The shipped checkpoints still load with the current code and still match their reports.

A fresh evaluation on a small slice of the test split must reproduce the per-image predictions and
consistency scores recorded in each checkpoint's `egt eval` report, so a code change that silently
breaks the checkpoints (or the report's numbers) fails CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from egt_core.checkpoints import load_checkpoint, read_metadata, sidecar_path
from egt_core.consistency import exit_consistency
from egt_core.data import DataError, load_dataset
from egt_core.evaluate import file_sha256, trained_maps
from egt_core.models import fuse_for_inference

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = sorted(ROOT.glob("*/*.safetensors"))
SLICE = 200


def test_the_four_checkpoints_are_shipped():
    names = {f"{p.parent.name}/{p.stem}" for p in SHIPPED}
    expected = {"fashion-mnist/baseline", "fashion-mnist/egt", "shapes/baseline", "shapes/egt"}
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_checkpoint_matches_its_report(path: Path):
    meta = read_metadata(path)
    model, meta = load_checkpoint(path)
    assert path.stat().st_size < 10e6, "shipped checkpoints stay small"
    report_path = sidecar_path(path, meta, "report")
    log_path = sidecar_path(path, meta, "log")
    assert report_path is not None and report_path.is_file()
    assert log_path is not None and log_path.is_file()
    report = json.loads(report_path.read_text())
    assert report["sha256"] == file_sha256(path), "report was made from another file"
    assert report["classes"] == meta["classes"]

    try:
        data = load_dataset(meta["dataset"], augment=False)
    except DataError as e:
        pytest.skip(f"test data for {meta['dataset']} not available here: {e}")
    xs, ys = zip(*(data.test[i] for i in range(SLICE)), strict=True)
    x, y = torch.stack(xs), torch.tensor(ys)

    with torch.inference_mode():
        outputs = fuse_for_inference(model)(x)
    for k, out in enumerate(outputs):
        fresh = out.logits.argmax(1)
        shipped = torch.tensor(report["predictions"][k][:SLICE])
        assert (fresh != shipped).sum() <= 1, f"exit {k + 1} predictions changed"

    kind = meta["train_config"]["attention"]
    scores = exit_consistency(trained_maps(model, kind)(x))
    for k, s in enumerate(scores):
        shipped = torch.tensor(
            report["consistency"]["trained"]["per_exit"][k]["per_image"]["pearson"][:SLICE]
        )
        assert torch.allclose(s["pearson"], shipped, atol=2e-3), f"exit {k + 1} consistency changed"
    full = report["accuracy"][-1]
    assert abs(float((outputs[-1].logits.argmax(1) == y).float().mean()) - full) < 0.1

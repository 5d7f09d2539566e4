"""Fault tolerance: `egt train` killed with SIGKILL mid-run resumes to the same result, and every
checkpoint file on disk is loadable at every moment (writes are atomic replaces)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_OPTIONS

from egt_core.checkpoints import load_checkpoint
from egt_core.train import BEST, LAST, LOG, STATE, TrainConfig, _read_state, train

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

EPOCHS = 4
SETTINGS = {
    "model_options": TINY_OPTIONS,
    "batch_size": 32,
    "threads": 1,
    "lam": 1.0,
    "val_limit": 64,
}


def egt_command() -> list[str]:
    script = Path(sys.executable).parent / "egt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "egt_core.cli"]


def train_command(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        *egt_command(),
        "train",
        "--config",
        str(config),
        "--dataset",
        "shapes",
        "--limit",
        "256",
        "--epochs",
        str(EPOCHS),
        "--out",
        str(out),
        *extra,
    ]


def log_epochs(out: Path) -> list[int]:
    try:
        text = (out / LOG).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["epoch"] for line in text.splitlines()]


def check_files(out: Path, checked: list[str]) -> None:
    """Every checkpoint-like file present now must load; temp files are never *.safetensors."""
    for path in out.glob("*.safetensors"):
        try:
            if path.name == STATE:
                _read_state(path)
            else:
                load_checkpoint(path)
        except FileNotFoundError:  # pragma: no cover - nothing here deletes them mid-run
            continue
        checked.append(path.name)


def watch(proc: subprocess.Popen, out: Path, checked: list[str], until=None, timeout=300.0):
    """Poll the run's files until ``until()`` holds or the process ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_files(out, checked)
        if until is not None and until():
            return
        if proc.poll() is not None:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("training did not finish in time")


def test_sigkill_mid_run_then_resume(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(SETTINGS))
    out = tmp_path / "run"
    checked: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    first = subprocess.Popen(
        train_command(config, out, "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watch(first, out, checked, until=lambda: len(log_epochs(out)) >= 1)
    if first.poll() is not None:
        _, err = first.communicate()
        pytest.fail(f"the run ended before it could be killed (rc {first.returncode}): {err}")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    done_at_kill = log_epochs(out)
    assert done_at_kill and done_at_kill == list(range(1, len(done_at_kill) + 1))
    assert len(done_at_kill) < EPOCHS, "killed too late to test anything"
    check_files(out, checked)

    second = subprocess.Popen(
        train_command(config, out, "--quiet", "--resume"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watch(second, out, checked)
    stdout, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    assert "Traceback" not in stderr

    # Each epoch is logged once; the resumed run redid at most the epoch that was cut short.
    assert log_epochs(out) == list(range(1, EPOCHS + 1))
    resumed = [
        int(line.split(":")[0].split()[1])
        for line in stdout.splitlines()
        if line.startswith("epoch ")
    ]
    assert resumed == list(range(resumed[0], EPOCHS + 1))
    assert len(done_at_kill) + 1 <= resumed[0] <= len(done_at_kill) + 2
    assert "streamlit run" in stdout

    # Files: all loadable at every poll, no temp leftovers, and the final ones are complete.
    assert {BEST, LAST, STATE} <= set(checked)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    _, meta = load_checkpoint(out / LAST)
    assert meta["epoch"] == EPOCHS

    # The killed-and-resumed run ends exactly where an unbroken run (in this process) ends.
    reference = tmp_path / "reference"
    cfg = TrainConfig.from_file(
        config, dataset="shapes", limit=256, epochs=EPOCHS, out=str(reference)
    )
    train(cfg, progress=False)
    a, b = (
        load_checkpoint(out / LAST)[0].state_dict(),
        load_checkpoint(reference / LAST)[0].state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

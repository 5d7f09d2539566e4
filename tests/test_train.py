"""Training: outputs, determinism, exact resume, configs, and the failure paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_OPTIONS, tiny_train_config
from safetensors import safe_open

import egt_core.train as train_mod
from egt_core.checkpoints import load_checkpoint, read_metadata
from egt_core.data import DataError
from egt_core.train import BEST, LAST, LOG, STATE, TrainConfig, TrainingError, train


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def log_of(out: Path, timing: bool = False) -> list[dict]:
    lines = [json.loads(x) for x in (out / LOG).read_text().splitlines()]
    if not timing:
        for line in lines:
            line.pop("seconds")
    return lines


class Stop(Exception):
    pass


def stop_after(epoch: int):
    def on_epoch(summary: dict) -> None:
        if summary["epoch"] == epoch:
            raise Stop

    return on_epoch


@pytest.fixture(scope="module")
def reference(tiny_fmnist_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (lambda 1, SGD with momentum)."""
    out = tmp_path_factory.mktemp("reference")
    train(tiny_train_config(tiny_fmnist_dir, out), progress=False)
    return out


# --------------------------------------------------------------------------- outputs


def test_run_writes_loadable_checkpoints_and_log(reference):
    for name in (BEST, LAST):
        model, meta = load_checkpoint(reference / name)
        assert meta["classes"][0] == "T-shirt/top" and len(meta["classes"]) == 10
        assert meta["input_size"] == 28 and meta["in_channels"] == 1
        assert meta["mean"] == [0.286] and meta["std"] == [0.353]
        assert meta["train_config"]["lam"] == 1.0
        assert meta["train_config"]["model_options"] == TINY_OPTIONS
        assert meta["log"] == LOG and (reference / meta["log"]).is_file()
        assert model.num_exits == 3
    assert read_metadata(reference / LAST)["epoch"] == 2
    log = log_of(reference, timing=True)
    assert [e["epoch"] for e in log] == [1, 2]
    for entry in log:
        assert len(entry["val_accuracy"]) == 3
        assert all(0 <= a <= 1 for a in entry["val_accuracy"])
        assert len(entry["val_consistency"]) == 2  # each early exit vs the final exit
        for c in entry["val_consistency"]:
            assert set(c) >= {"cosine", "pearson", "iou"}
        assert entry["train_consistency_loss"] > 0  # lambda > 0 computes the term
        assert entry["seconds"] >= 0 and entry["val_n"] == 16
    assert not list(reference.glob("*.tmp")) and not list(reference.glob(".*.tmp"))


def test_best_is_the_best_epoch(reference):
    log = log_of(reference)
    best_epoch = max(log, key=lambda e: e["val_accuracy"][-1])["epoch"]  # first of ties
    assert read_metadata(reference / BEST)["epoch"] == best_epoch


def test_seeded_runs_are_identical(reference, tiny_fmnist_dir, tmp_path):
    train(tiny_train_config(tiny_fmnist_dir, tmp_path), progress=False)
    assert_same_weights(reference / LAST, tmp_path / LAST)
    assert log_of(reference) == log_of(tmp_path)


def test_train_restores_global_torch_state(tiny_fmnist_dir, tmp_path):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(3)
    try:
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, epochs=1, threads=1), progress=False)
        assert torch.get_num_threads() == 3
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- resume


def test_resume_after_interruption_matches_unbroken_run(reference, tiny_fmnist_dir, tmp_path):
    cfg = tiny_train_config(tiny_fmnist_dir, tmp_path)
    with pytest.raises(Stop):
        train(cfg, progress=False, on_epoch=stop_after(1))
    assert [e["epoch"] for e in log_of(tmp_path)] == [1]
    seen = []
    summary = train(
        tiny_train_config(tiny_fmnist_dir, tmp_path, resume=True),
        progress=False,
        on_epoch=lambda s: seen.append(s["epoch"]),
    )
    assert seen == [2]  # only the missing epoch ran
    assert summary["epoch"] == 2
    assert_same_weights(reference / LAST, tmp_path / LAST)
    assert_same_weights(reference / BEST, tmp_path / BEST)
    assert log_of(reference) == log_of(tmp_path)


def test_resume_restores_adamw_state_exactly(tiny_fmnist_dir, tmp_path):
    """AdamW keeps per-parameter step counters and moments: they must round-trip too."""
    opts = dict(optimizer="adamw", lr=0.01, schedule="constant", lam=0.5)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train(tiny_train_config(tiny_fmnist_dir, whole, **opts), progress=False)
    with pytest.raises(Stop):
        train(tiny_train_config(tiny_fmnist_dir, broken, **opts), False, stop_after(1))
    train(tiny_train_config(tiny_fmnist_dir, broken, resume=True, **opts), progress=False)
    assert_same_weights(whole / LAST, broken / LAST)
    assert log_of(whole) == log_of(broken)


def test_resume_rewrites_a_log_the_state_does_not_cover(tiny_fmnist_dir, tmp_path):
    """A kill after the resume state was saved but before the log was rewritten (or in the
    middle of writing it): the resumed run's log still has every epoch exactly once."""
    cfg = tiny_train_config(tiny_fmnist_dir, tmp_path)
    with pytest.raises(Stop):
        train(cfg, progress=False, on_epoch=stop_after(1))
    (tmp_path / LOG).write_text('{"epoch": 1, "garbage": true}\n{"epoch": 2, "trunc')
    (tmp_path / f".{LAST}.x1y2.tmp").write_bytes(b"half a file")
    train(tiny_train_config(tiny_fmnist_dir, tmp_path, resume=True), progress=False)
    log = log_of(tmp_path)
    assert [e["epoch"] for e in log] == [1, 2] and "garbage" not in log[0]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_when_already_finished_returns_last_summary(reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    cfg = TrainConfig(**{**read_metadata(out / LAST)["train_config"], "out": str(out)})
    cfg.resume = True
    summary = train(cfg, progress=False)
    assert summary["epoch"] == 2
    assert len(log_of(out)) == 2


def test_resume_state_holds_optimizer_and_settings(reference):
    with safe_open(str(reference / STATE), framework="pt") as f:
        keys = list(f.keys())
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert any(k.startswith("opt.") and k.endswith("momentum_buffer") for k in keys)
    assert meta["info"]["epoch"] == 1 and meta["info"]["config"]["lam"] == 1.0
    assert [e["epoch"] for e in meta["info"]["log"]] == [1, 2]


def test_resume_without_state_is_an_error(tiny_fmnist_dir, tmp_path):
    with pytest.raises(TrainingError, match="no resume state"):
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, resume=True), progress=False)


def test_resume_with_other_settings_is_an_error(reference, tiny_fmnist_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    cfg = tiny_train_config(tiny_fmnist_dir, out, resume=True, lam=2.0, epochs=3)
    with pytest.raises(TrainingError, match=r"other settings: .*lam 1\.0 \(now 2\.0\)"):
        train(cfg, progress=False)


def test_damaged_resume_state_is_an_error(tiny_fmnist_dir, tmp_path):
    (tmp_path / STATE).write_bytes(b"\x00" * 20)
    with pytest.raises(TrainingError, match="cannot read the resume state"):
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, resume=True), progress=False)


def test_fresh_run_discards_an_old_log_and_state(reference, tiny_fmnist_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    with pytest.raises(Stop):
        train(tiny_train_config(tiny_fmnist_dir, out, lam=0.0), False, stop_after(1))
    assert [e["epoch"] for e in log_of(out)] == [1]
    assert read_metadata(out / LAST)["train_config"]["lam"] == 0.0


# --------------------------------------------------------------------------- failures


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_fmnist_dir, tmp_path, monkeypatch):
    real = train_mod.egt_loss
    calls = {"n": 0}

    def poisoned(outputs, targets, config):
        calls["n"] += 1
        terms = real(outputs, targets, config)
        if calls["n"] > 2:  # epoch 2 (2 steps per epoch)
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(train_mod, "egt_loss", poisoned)
    with pytest.raises(TrainingError) as e:
        train(tiny_train_config(tiny_fmnist_dir, tmp_path), progress=False)
    msg = str(e.value)
    assert "nan" in msg and "epoch 2, step 1" in msg and str(tmp_path / LAST) in msg
    assert "from epoch 1" in msg and "--lr" in msg
    model, meta = load_checkpoint(tmp_path / LAST)
    assert meta["epoch"] == 1
    assert all(
        torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()
    )
    assert [e["epoch"] for e in log_of(tmp_path)] == [1]


def test_diverging_lr_stops_without_a_checkpoint(tiny_fmnist_dir, tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, lr=1e30), progress=False)
    assert not (tmp_path / LAST).exists()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(lam=-1.0), "lambda must be >= 0"),
        (dict(arch="resnet9000"), "unknown architecture"),
        (dict(epochs=0), "must be positive"),
        (dict(epochs="2"), "'epochs' must be an integer"),
        (dict(limit=0), "--limit"),
        (dict(exit_weights=[1.0, -1.0, 1.0]), "exit weights"),
        (dict(attention="saliency"), "unknown attention"),
        (dict(val_fraction=1.5), "val_fraction"),
    ],
)
def test_invalid_settings_are_refused_before_anything_runs(overrides, fragment, tmp_path):
    cfg = tiny_train_config(tmp_path, tmp_path / "out", **overrides)
    with pytest.raises(TrainingError, match=fragment):
        train(cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_model_problems_are_training_errors(tiny_fmnist_dir, tmp_path):
    with pytest.raises(TrainingError, match="exit weights given for a model with 3 exits"):
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, exit_weights=[1, 1]), False)
    with pytest.raises(TrainingError, match="cannot build 'small'"):
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, model_options={"depth": 3}), False)


def test_limit_larger_than_the_data(tiny_fmnist_dir, tmp_path):
    with pytest.raises(DataError, match="--limit 10000 is larger than the 144 training images"):
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, limit=10_000), progress=False)
    with pytest.raises(DataError, match="larger than the 16 validation images"):
        train(tiny_train_config(tiny_fmnist_dir, tmp_path, val_limit=100), progress=False)


def test_missing_data_dir_is_an_error_not_a_fallback(tmp_path):
    cfg = tiny_train_config(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(TrainingError, match="does not exist"):
        train(cfg, progress=False)


def test_unwritable_output(tiny_fmnist_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="cannot write to the output folder"):
        train(tiny_train_config(tiny_fmnist_dir, blocker / "run"), progress=False)


# --------------------------------------------------------------------------- config files


def test_config_from_json_and_yaml_with_overrides(tmp_path):
    values = {"dataset": "shapes", "epochs": 3, "lambda": 2.0, "model_options": TINY_OPTIONS}
    (tmp_path / "c.json").write_text(json.dumps(values))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    for name in ("c.json", "c.yaml"):
        cfg = TrainConfig.from_file(tmp_path / name, epochs=5)
        assert cfg.dataset == "shapes" and cfg.lam == 2.0 and cfg.epochs == 5
        assert cfg.model_options == TINY_OPTIONS
        cfg.validate()
    (tmp_path / "empty.yml").write_text("")
    assert TrainConfig.from_file(tmp_path / "empty.yml", lr=0.1).lr == 0.1


@pytest.mark.parametrize(
    "text, name, fragment",
    [
        ('{"epochs": 2, "lerning_rate": 0.1}', "c.json", "unknown config keys.*lerning_rate"),
        ('{"epochs": 2,', "c.json", "cannot parse"),
        ("epochs: [1, 2", "c.yaml", "cannot parse"),
        ("[1, 2]", "c.yaml", "must hold a mapping"),
        ('{"lam": 1, "lambda": 2}', "c.json", "both"),
    ],
)
def test_bad_config_files(tmp_path, text, name, fragment):
    (tmp_path / name).write_text(text)
    with pytest.raises(TrainingError, match=fragment):
        TrainConfig.from_file(tmp_path / name)


def test_missing_config_file(tmp_path):
    with pytest.raises(TrainingError, match="cannot read the config file"):
        TrainConfig.from_file(tmp_path / "nope.yaml")


def test_learning_rate_schedule_is_a_pure_function_of_the_step():
    cfg = TrainConfig(lr=0.1, warmup_epochs=1)
    lrs = [train_mod.learning_rate(cfg, s, 40, 10) for s in range(40)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1) and lrs[-1] < 0.001
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert train_mod.learning_rate(TrainConfig(schedule="constant", lr=0.3), 7, 40, 10) == 0.3

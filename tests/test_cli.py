"""The `egt` command line: help texts, a tiny training run, eval/explain outputs, and one readable
error line (exit code 2, no traceback) for every expected failure."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY_OPTIONS
from PIL import Image

import egt_core.data as data_mod
from egt_core.checkpoints import load_checkpoint
from egt_core.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def visible_lines(err: str) -> list[str]:
    """What a terminal shows: a progress bar redraws (and finally clears) its line with \\r."""
    return [v for v in (ln.split("\r")[-1].strip() for ln in err.split("\n")) if v]


def assert_one_line_error(code: int, err: str, command: str, fragment: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = visible_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"egt {command}: error: "), lines[0]
    assert fragment.lower() in lines[0].lower(), lines[0]


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"model_options": TINY_OPTIONS, "batch_size": 32, "threads": 1}))
    return path


def train_args(config: Path, data_dir: Path, out: Path, *extra) -> list:
    return [
        "train",
        "--config",
        config,
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        data_dir,
        "--limit",
        64,
        "--epochs",
        1,
        "--out",
        out,
        *extra,
    ]


def png(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(path)
    return path


# --------------------------------------------------------------------------- help


def test_main_help_lists_commands_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("train", "eval", "explain", "examples:", "egt train --dataset"):
        assert word in out


@pytest.mark.parametrize(
    "command, defaults",
    [
        (
            "train",
            ["(default: fashion-mnist)", "(default: 0.05)", "(default: 10)", "(default: 0.0)"],
        ),
        ("eval", ["(default: gradcam)", "(default: 500)", "(default: 3)"]),
        ("explain", ["(default: 0.9)", "(default: cam)", "(default: explanations)"]),
    ],
)
def test_subcommand_help_shows_defaults_and_an_example(command, defaults, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "example" in out and f"egt {command} " in out
    for text in defaults:
        assert text in " ".join(out.split()), text


# --------------------------------------------------------------------------- train


def test_train_progress_summary_and_config_overrides(
    tiny_fmnist_dir, tiny_config, tmp_path, capsys
):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model_options": TINY_OPTIONS, "epochs": 3, "lambda": 0.5}))
    out = tmp_path / "run"
    code, stdout, stderr = run(train_args(cfg, tiny_fmnist_dir, out, "--lambda", 0.25), capsys)
    assert code == 0, stderr
    assert "epoch 1/1" in stderr  # the tqdm bar; --epochs 1 beat the file's 3
    assert "epoch 1: loss" in stdout
    assert str(out / "best.safetensors") in stdout
    assert f"EGT_CHECKPOINTS={out.resolve()} streamlit run" in stdout
    assert "streamlit_app.py" in stdout
    _, meta = load_checkpoint(out / "best.safetensors")
    tc = meta["train_config"]
    assert tc["epochs"] == 1 and tc["lam"] == 0.25 and tc["model_options"] == TINY_OPTIONS
    assert len((out / "train.jsonl").read_text().splitlines()) == 1


def test_train_quiet_has_no_progress_bar_and_model_options_flag(tiny_fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        tiny_fmnist_dir,
        "--limit",
        32,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--model-options",
        json.dumps(TINY_OPTIONS),
        "--out",
        out,
        "--quiet",
    ]
    code, _, stderr = run(args, capsys)
    assert code == 0 and "epoch 1/" not in stderr
    assert load_checkpoint(out / "last.safetensors")[1]["model_config"]["widths"] == [4, 8, 8, 8]


def _empty_fashion_mnist_everywhere(monkeypatch, tmp_path) -> Path:
    """No Fashion-MNIST files in the explicit folder, $EGT_DATA, the Debian path or the cache."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("EGT_DATA", raising=False)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(data_mod, "DEFAULT_CACHE_DIR", tmp_path / "no-cache")
    return empty


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("unknown dataset", "unknown dataset 'mnist-9000'"),
        ("unknown arch", "unknown architecture 'huge'"),
        ("nonexistent data dir", "does not exist"),
        ("empty data dir", "Fashion-MNIST files"),
        ("nan loss", "loss became"),
        ("unwritable out", "cannot write to the output folder"),
        ("negative lambda", "lambda must be >= 0"),
        ("limit too large", "--limit 100000 is larger than"),
        ("resume without state", "no resume state"),
        ("unknown config key", "unknown config keys"),
        ("bad model options", "--model-options is not valid JSON"),
    ],
)
def test_train_errors_are_one_line(
    case, fragment, tiny_fmnist_dir, tiny_config, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    data = tiny_fmnist_dir
    extra: list = []
    config = tiny_config
    if case == "unknown dataset":
        extra = ["--dataset", "mnist-9000"]
    elif case == "unknown arch":
        extra = ["--arch", "huge"]
    elif case == "nonexistent data dir":
        data = tmp_path / "no-such-dir"
    elif case == "empty data dir":
        data = _empty_fashion_mnist_everywhere(monkeypatch, tmp_path)
    elif case == "nan loss":
        extra = ["--lr", "1e30"]
    elif case == "unwritable out":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "run"
    elif case == "negative lambda":
        extra = ["--lambda", "-0.5"]
    elif case == "limit too large":
        extra = ["--limit", "100000"]
    elif case == "resume without state":
        extra = ["--resume"]
    elif case == "unknown config key":
        config = tmp_path / "bad.json"
        config.write_text(json.dumps({"epochz": 3}))
    elif case == "bad model options":
        extra = ["--model-options", "{widths: 3}"]
    code, _, err = run(train_args(config, data, out, *extra), capsys)
    assert_one_line_error(code, err, "train", fragment)


def test_console_script_error_has_no_traceback(tmp_path):
    """The real entry point, in a fresh process: exit status 2 and one line on stderr."""
    script = Path(sys.executable).parent / "egt"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "egt_core.cli"]
    proc = subprocess.run(
        [*cmd, "train", "--dataset", "nope", "--out", str(tmp_path / "o"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown dataset 'nope'" in proc.stderr


# --------------------------------------------------------------------------- eval


EVAL_FAST = ["--limit", 24, "--timing-images", 4, "--repeats", 1, "--quiet"]
EVAL_FAST += ["--thresholds", 0, 0.5, 1.01]


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_eval_writes_report_and_prints_table(tiny_checkpoint, tiny_fmnist_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["eval", "--checkpoint", tiny_checkpoint, "--data-dir", tiny_fmnist_dir, *EVAL_FAST]
    code, stdout, err = run([*args, "--out", out], capsys)
    assert code == 0, err
    assert "accuracy per exit" in stdout and "threshold" in stdout and "FLOP-ideal" in stdout
    assert f"report: {out}" in stdout
    report = strict_json(out)
    assert report["n"] == 24 and [r["threshold"] for r in report["sweep"]] == [0, 0.5, 1.01]


def test_eval_several_checkpoints_write_a_folder(
    tiny_checkpoint, tiny_fmnist_dir, tmp_path, capsys
):
    other = tmp_path / "other" / tiny_checkpoint.name  # same file name, another folder
    other.parent.mkdir()
    shutil.copy(tiny_checkpoint, other)
    folder = tmp_path / "reports"
    args = ["eval", "--checkpoint", tiny_checkpoint, "--checkpoint", other]
    args += ["--data-dir", tiny_fmnist_dir, *EVAL_FAST, "--timing-images", 0, "--out", folder]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    reports = sorted(folder.glob("*.report.json"))
    assert len(reports) == 2, reports
    assert {strict_json(p)["checkpoint"] for p in reports} == {str(tiny_checkpoint), str(other)}
    assert "batch1" not in strict_json(reports[0])["sweep"][0]  # --timing-images 0: no timing


def test_eval_errors_are_one_line(tiny_checkpoint, tiny_fmnist_dir, tmp_path, capsys):
    cases = []
    cases.append(([tmp_path / "missing.safetensors"], "no checkpoint file"))
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    cases.append(([pickled], "pickle"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    cases.append(([junk], "not a valid safetensors"))
    cases.append(([tiny_checkpoint, "--explainer", "magic"], "unknown explainer"))
    cases.append(([tiny_checkpoint, "--dataset", "shapes"], "does not fit"))
    cases.append(([tiny_checkpoint, "--data-dir", tmp_path / "nope"], "does not exist"))
    cases.append(([tiny_checkpoint, "--limit", 10_000], "larger than the 48 test images"))
    cases.append(
        (
            [tiny_checkpoint, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "x.json"],
            "one file",
        )
    )
    for extra, fragment in cases:
        args = ["eval", "--checkpoint", *extra]
        if "--data-dir" not in args:
            args += ["--data-dir", tiny_fmnist_dir]
        code, _, err = run([*args, "--timing-images", 0, "--quiet"], capsys)
        assert_one_line_error(code, err, "eval", fragment)


# --------------------------------------------------------------------------- explain


def test_explain_writes_png_and_json_per_image(tiny_checkpoint, tmp_path, capsys):
    a = png(tmp_path / "shoe.png", 1)
    b = png(tmp_path / "sub.png", 2)
    (tmp_path / "d").mkdir()
    c = png(tmp_path / "d" / "shoe.png", 3)  # same name as `a`: must not overwrite it
    out = tmp_path / "expl"
    args = ["explain", a, b, c, "--checkpoint", tiny_checkpoint, "--out", out, "--threshold", 0]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    pngs, jsons = sorted(out.glob("*.png")), sorted(out.glob("*.json"))
    assert len(pngs) == 3 and len(jsons) == 3
    for p in pngs:
        assert Image.open(io.BytesIO(p.read_bytes())).format == "PNG"
    record = strict_json(out / "sub.json")
    assert record["answering_exit"] == 1  # threshold 0: the first exit always answers
    assert len(record["exits"]) == 3
    for row in record["exits"]:
        assert set(row) >= {"exit", "prediction", "confidence"}
        assert 0 <= row["confidence"] <= 1
    for row in record["exits"][:2]:
        assert set(row["consistency_with_final"]) >= {"cosine", "pearson", "spearman", "iou"}
    assert "consistency_with_final" not in record["exits"][2]
    assert stdout.count("exit 1 answers") == 3


def test_explain_bad_image_is_one_line_and_others_still_explained(
    tiny_checkpoint, tmp_path, capsys
):
    good = png(tmp_path / "good.png")
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    out = tmp_path / "expl"
    code, stdout, err = run(
        ["explain", bad, good, "--checkpoint", tiny_checkpoint, "--out", out], capsys
    )
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"egt explain: {bad}: ")
    assert (out / "good.png").is_file() and (out / "good.json").is_file()
    assert not (out / "notes.png").exists()
    assert "good.png: exit" in stdout


def test_explain_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    good = png(tmp_path / "good.png")
    pickled = tmp_path / "m.safetensors"
    pickled.write_bytes(pickle.dumps([1]))
    for extra, fragment in [
        (["--checkpoint", pickled], "pickle"),
        (["--checkpoint", tiny_checkpoint, "--method", "magic"], "unknown method"),
        (["--checkpoint", tiny_checkpoint, "--target-class", "Spaceship"], "unknown class"),
    ]:
        code, _, err = run(["explain", good, *extra, "--out", tmp_path / "o"], capsys)
        assert_one_line_error(code, err, "explain", fragment)

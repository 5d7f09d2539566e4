"""The app: `app/logic.py` unit tests, then the whole page driven by Streamlit's AppTest.

Checkpoints are tiny random-weight models written in seconds (no training); reports carry the
structure of `egt eval` reports with made-up numbers. Random models are far from confident, so
threshold 0 makes exit 1 answer and threshold 1.0 the final exit.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from egt_core.checkpoints import save_checkpoint
from egt_core.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    SHAPES_CLASSES,
    SHAPES_MEAN,
    SHAPES_STD,
)
from egt_core.images import ImageLoadError
from egt_core.inference import predict
from egt_core.models import build_model

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app import charts, logic  # noqa: E402

APP = str(REPO / "app" / "streamlit_app.py")
SAMPLE = REPO / "app" / "samples" / "fashion-mnist" / "05_sandal.png"

# --------------------------------------------------------------------------- tiny checkpoints

TINY = dict(widths=(4, 8, 8, 8), head_widths=(4, 8))
FORMATS = {
    "fashion-mnist": dict(
        channels=1,
        size=28,
        classes=FASHION_MNIST_CLASSES,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    ),
    "shapes": dict(channels=3, size=32, classes=SHAPES_CLASSES, mean=SHAPES_MEAN, std=SHAPES_STD),
}


def tiny_model(dataset: str, seed: int) -> nn.Module:
    """Random weights, non-trivial BatchNorm statistics: confidences well below 1, maps not flat."""
    f = FORMATS[dataset]
    torch.manual_seed(seed)
    model = build_model("small", f["channels"], len(f["classes"]), input_size=f["size"], **TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):  # positive class weights: CAMs that are not flat
                m.weight.abs_()
    return model.eval()


def tiny_report(dataset: str, lam: float, n: int = 40, seed: int = 0) -> dict:
    """A report with the structure of `egt_core.evaluate.evaluate_checkpoint`, made-up numbers."""
    g = torch.Generator().manual_seed(seed)
    shift = 0.3 if lam > 0 else 0.0

    def per_image() -> dict:
        vals = (torch.rand(n, generator=g) * 0.8 + shift - 0.1).clamp(-1, 1)
        return {m: [round(float(v), 4) for v in vals] for m in ("pearson", "cosine", "iou")}

    def block(method: str) -> dict:
        exits = [
            {
                "cosine": 0.6 + shift / 2,
                "pearson": 0.3 + shift,
                "spearman": 0.3 + shift,
                "iou": 0.3 + shift / 2,
                "degenerate": 0,
                "per_image": per_image(),
            }
            for _ in range(2)
        ]
        mean = {m: sum(e[m] for e in exits) / 2 for m in ("cosine", "pearson", "spearman", "iou")}
        return {"method": method, "top_k": 0.2, "per_exit": exits, "mean": mean}

    thresholds = (0.0, 0.5, 0.9, 0.99, 1.01)
    sweep = []
    for t in thresholds:
        frac = [0.0, 0.0, 1.0] if t > 1 else [0.6 * (1 - t), 0.3 * (1 - t), 1 - 0.9 * (1 - t)]
        flops = 100 * frac[0] + 250 * frac[1] + 420 * frac[2]
        sweep.append(
            {
                "threshold": t,
                "accuracy": 0.7 + 0.2 * min(t, 1.0) - (0.02 if lam == 0 and t < 1 else 0),
                "exit_mix": [round(f * n) for f in frac],
                "exit_fraction": frac,
                "expected_flops": flops,
                "flop_fraction": flops / 400,
                "flop_ideal_speedup": 400 / flops,
                "batch1": {"early_ms": 1.0, "full_ms": 1.0 + (1 - min(t, 1)), "speedup": 2 - t},
                "batched": {"early_ms": 0.1, "full_ms": 0.15, "speedup": 1.5, "batch_size": 256},
            }
        )
    return {
        "checkpoint": "tiny.safetensors",
        "dataset": dataset,
        "split": "test",
        "n": n,
        "classes": FORMATS[dataset]["classes"],
        "training": {"lam": lam, "attention": "cam"},
        "accuracy": [0.7, 0.8, 0.9],
        "consistency": {"trained": block("cam"), "explainer": block("gradcam")},
        "flops": {
            "segments": [90, 140, 160],
            "heads": [10, 10, 10],
            "answer_at": [100, 250, 420],
            "full_path": 400,
        },
        "latency_batch1": {"segments_ms": [0.1, 0.1, 0.1], "heads_ms": [0.05, 0.05, 0.05]},
        "sweep": sweep,
        "best_operating_point": sweep[2],
    }


def write_pair(root: Path, dataset: str, seed: int = 0, report: bool = True) -> Path:
    """``root/<dataset>/{baseline,egt}.safetensors`` (+ ``.report.json``): a loadable pair."""
    f = FORMATS[dataset]
    folder = root / dataset
    for i, (name, lam) in enumerate((("baseline", 0.0), ("egt", 1.0))):
        meta = {
            "classes": list(f["classes"]),
            "input_size": f["size"],
            "in_channels": f["channels"],
            "mean": list(f["mean"]),
            "std": list(f["std"]),
            "dataset": dataset,
            "train_config": {"lam": lam, "attention": "cam", "epochs": 1},
            "metrics": {},
        }
        if report:
            meta["report"] = f"{name}.report.json"
        save_checkpoint(folder / f"{name}.safetensors", tiny_model(dataset, seed + i), meta)
        if report:
            (folder / f"{name}.report.json").write_text(json.dumps(tiny_report(dataset, lam)))
    return folder


def write_root(root: Path) -> Path:
    """A checkpoint root like the shipped one, plus one broken file to be skipped."""
    write_pair(root, "fashion-mnist")
    write_pair(root, "shapes", seed=10)
    (root / "fashion-mnist" / "broken.safetensors").write_bytes(b"\x80\x04 not a checkpoint")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_root(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def pair(root):
    """The fashion-mnist pair as ``[(entry, bundle), ...]``."""
    group = logic.discover(root).groups[0]
    return [(e, logic.load_bundle(e.path)) for e in group.models]


def png_bytes(size=(28, 28), mode="L", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = size[::-1] if mode == "L" else (*size[::-1], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- logic: checkpoints


def test_use_app_threads():
    before = torch.get_num_threads()
    try:
        assert logic.use_app_threads({}) == 1 == torch.get_num_threads()
        assert logic.use_app_threads({"EGT_APP_THREADS": "2"}) == 2
        assert logic.use_app_threads({"EGT_APP_THREADS": "many"}) == 1
    finally:
        torch.set_num_threads(before)


def test_checkpoint_root_from_env(tmp_path):
    assert logic.checkpoint_root({}) == logic.DEFAULT_ROOT
    assert logic.checkpoint_root({"EGT_CHECKPOINTS": str(tmp_path)}) == tmp_path
    assert logic.checkpoint_root({"EGT_CHECKPOINTS": "  "}) == logic.DEFAULT_ROOT


def test_discover_pairs_and_skipped(root):
    found = logic.discover(root)
    assert found.problem is None
    keys = [g.key for g in found.groups]
    assert keys == ["fashion-mnist:pair", "shapes:pair"]
    fm = found.groups[0]
    assert fm.is_pair and fm.label == "Fashion-MNIST: baseline vs EGT"
    assert [m.label for m in fm.models] == ["Baseline", "EGT (λ=1)"]
    assert fm.classes == FASHION_MNIST_CLASSES
    ((name, reason),) = found.skipped
    assert name == "fashion-mnist/broken.safetensors" and "pickle" in reason


def test_discover_singles_and_unpaired(tmp_path):
    write_pair(tmp_path, "fashion-mnist", report=False)
    folder = tmp_path / "fashion-mnist"
    shutil.copy(folder / "baseline.safetensors", folder / "extra.safetensors")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(folder / "baseline.safetensors", mixed / "baseline.safetensors")
    write_pair(tmp_path, "shapes", report=False)
    shutil.copy(tmp_path / "shapes" / "egt.safetensors", mixed / "egt.safetensors")
    found = logic.discover(tmp_path)
    keys = [g.key for g in found.groups]
    assert "fashion-mnist:extra" in keys and "fashion-mnist:pair" in keys
    assert "mixed:pair" not in keys and {"mixed:baseline", "mixed:egt"} <= set(keys)
    assert any("not a pair" in reason for _, reason in found.skipped)


def test_discover_problems(tmp_path):
    assert "does not exist" in logic.discover(tmp_path / "nope").problem
    assert "no .safetensors" in logic.discover(tmp_path).problem
    (tmp_path / "file").write_text("x")
    assert "not a folder" in logic.discover(tmp_path / "file").problem


def test_reports(root, tmp_path):
    entry = logic.discover(root).groups[0].models[1]
    path = logic.report_path(entry)
    assert path == root / "fashion-mnist" / "egt.report.json"
    report, problem = logic.load_report(path)
    assert problem is None and report["dataset"] == "fashion-mnist"
    assert [r["threshold"] for r in logic.sweep_rows(report)] == [0.0, 0.5, 0.9, 0.99]
    assert len(logic.sweep_rows(report, include_full_path=True)) == 5
    scores = logic.per_image_scores(report)
    assert len(scores) == 2 and len(scores[0]) == report["n"]
    base, _ = logic.load_report(logic.report_path(logic.discover(root).groups[0].models[0]))
    rows = {r["metric"]: r for r in logic.headline_table({"Baseline": base, "EGT": report})}
    assert rows["Accuracy, final exit"]["EGT"] == "90.00%"
    assert rows["Pearson r, Trained CAM maps"]["difference"] == "+0.300"
    assert rows["Pearson r, Grad-CAM maps"]["Baseline"] == "0.300"
    assert rows["Best threshold (accuracy within 0.5 pt)"]["EGT"] == "0.9"
    assert rows["Best threshold (accuracy within 0.5 pt)"]["difference"] == ""
    assert rows["Speedup at best threshold (batch 1)"]["EGT"] == "1.10x"
    single = logic.headline_table({"EGT": report})
    assert "difference" not in single[0] and len(single) == len(rows)
    assert logic.fmt_value("pct", 0.0123, signed=True) == "+1.23 pt"
    assert logic.fmt_value("x", None) == "–"
    assert "missing" in logic.load_report(tmp_path / "none.json")[1]
    (tmp_path / "bad.json").write_text("{")
    assert "not readable" in logic.load_report(tmp_path / "bad.json")[1]
    (tmp_path / "list.json").write_text("[]")
    assert "not an EGT" in logic.load_report(tmp_path / "list.json")[1]


def test_shipped_samples_are_real_test_images():
    for dataset, classes in (("fashion-mnist", FASHION_MNIST_CLASSES), ("shapes", SHAPES_CLASSES)):
        samples = logic.list_samples(dataset)
        assert len(samples) == 12
        assert {s.label for s in samples} <= set(classes)
        assert len({s.label for s in samples}) == len(classes)  # every class at least once
        assert all(s.path.stat().st_size < 20_000 for s in samples)
    assert logic.list_samples("no-such-dataset") == []


# --------------------------------------------------------------------------- logic: analysis


def test_analyse_image_maps_probs_scores(pair):
    data = SAMPLE.read_bytes()
    a = logic.analyse_image(data, pair, name="sandal.png", method="cam")
    assert [m.key for m in a.models] == ["baseline", "egt"]
    assert a.name == "sandal.png" and a.original_size == (28, 28)
    for m in a.models:
        assert m.maps.shape == (3, 28, 28) and m.display.shape == (28, 28, 3)
        assert 0 <= m.maps.min() and m.maps.max() <= 1
        np.testing.assert_allclose(m.probs.sum(1), 1, atol=1e-5)
        assert m.target == m.predictions[-1]  # default: the final exit's prediction
        assert len(m.consistency) == 2
        assert all(-1 <= c["pearson"] <= 1 and not c["degenerate"] for c in m.consistency)
    forced = logic.analyse_image(data, pair, name="x", method="gradcam", target=3)
    assert all(m.target == 3 for m in forced.models)


def test_invert_flips_what_the_model_sees(pair):
    data = SAMPLE.read_bytes()
    plain = logic.analyse_image(data, pair, name="x").models[0]
    flipped = logic.analyse_image(data, pair, name="x", invert=True).models[0]
    np.testing.assert_allclose(flipped.display, 1 - plain.display, atol=1e-6)


def test_analyse_image_bad_bytes(pair):
    with pytest.raises(ImageLoadError, match="not an image"):
        logic.analyse_image(b"hello, I am text", pair, name="x.png")


def test_decide_matches_predict_and_threshold_extremes(pair):
    a = logic.analyse_image(SAMPLE.read_bytes(), pair, name="x")
    for (_, bundle), m in zip(pair, a.models, strict=True):
        assert max(m.confidences) < 1.0
        low, high = logic.decide(bundle, m.tensor, 0.0), logic.decide(bundle, m.tensor, 1.0)
        assert low.exit_index == 0 and high.exit_index == m.num_exits - 1
        assert low.prediction == m.predictions[0] and high.prediction == m.predictions[-1]
        mid = logic.decide(bundle, m.tensor, 0.5)
        r = predict(bundle.model, m.tensor, 0.5)
        assert mid.exit_index == int(r.exit_index[0])
        assert low.flops == bundle.costs.answer_at(0) and low.full_path == bundle.costs.full_path
        assert low.saving == pytest.approx(1 - bundle.costs.answer_at(0) / bundle.costs.full_path)


def test_saving_text_and_states():
    d = logic.Decision(exit_index=1, prediction=0, confidence=0.9, flops=29, full_path=100)
    assert logic.saving_text(d) == "saves 71% of the full path's FLOPs"
    assert [logic.exit_state(k, d) for k in range(3)] == ["passed", "answers", "skipped"]
    more = logic.Decision(exit_index=2, prediction=0, confidence=0.9, flops=106, full_path=100)
    assert "costs 6% more" in logic.saving_text(more)
    assert logic.exit_name(2, 3) == "Exit 3 (final)" and logic.exit_name(0, 3) == "Exit 1"
    assert logic.score_line({"degenerate": True}) == "flat map: no score"
    assert logic.fmt_score(float("nan")) == "n/a"


def test_downloads_png_and_json(pair):
    a = logic.analyse_image(SAMPLE.read_bytes(), pair, name="../../etc/sandal.png")
    decisions = {
        m.key: logic.decide(b, m.tensor, 0.0) for (_, b), m in zip(pair, a.models, strict=True)
    }
    png = logic.compose_png(
        a, decisions, FASHION_MNIST_CLASSES, alpha=0.5, colormap="jet", threshold=0.0
    )
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 4 * 168 and img.height > 2 * 168
    numbers = logic.summary(
        a, decisions, FASHION_MNIST_CLASSES, threshold=0.0, checkpoints={"egt": "egt.safetensors"}
    )
    parsed = json.loads(json.dumps(numbers))
    egt = parsed["models"][1]
    assert egt["answering_exit"] == 1 and egt["exits"][0]["answers"]
    assert egt["checkpoint"] == "egt.safetensors"
    assert set(egt["exits"][0]["consistency_with_final"]) >= {"pearson", "cosine", "iou"}
    assert "consistency_with_final" not in egt["exits"][-1]
    assert logic.safe_stem("../../etc/sandal.png") == "sandal"
    assert logic.safe_stem("") == "image"


def test_tiles():
    display = np.zeros((28, 28, 3), np.float32)
    factor = logic.tile_scale(28)
    assert factor == 6 and logic.tile_scale(64) == 3
    tile = logic.overlay_tile(display, np.ones((28, 28)), 0.5, "jet", factor)
    assert tile.shape == (168, 168, 3)
    framed = logic.framed(tile, logic.ANSWER_COLOUR, width=5)
    assert framed.size == (178, 178) and framed.getpixel((0, 0)) == logic.ANSWER_COLOUR


# --------------------------------------------------------------------------- charts


def test_confidence_chart_marks_threshold_and_answer():
    fig = charts.confidence_chart([0.3, 0.95, 0.99], 0.9, 1, ["Exit 1", "Exit 2", "Exit 3"])
    (line,) = fig.layout.shapes
    assert line.y0 == line.y1 == 0.9
    colours = list(fig.data[0].marker.color)
    assert colours == [charts.PASSED, charts.ANSWER, charts.SKIPPED]


def test_dataset_charts_from_reports():
    reports = {"Baseline": tiny_report("shapes", 0.0), "EGT (λ=1)": tiny_report("shapes", 1.0)}
    acc = charts.accuracy_chart(reports)
    assert len(acc.data) == 2 and max(acc.data[0].x) <= 1.0
    assert acc.data[1].line.color == charts.MODEL_COLOURS["EGT"]
    assert len(charts.speedup_chart(reports).data) == 4
    mix = charts.exit_mix_chart(reports["Baseline"], "Baseline")
    assert len(mix.data) == 3 and fig_sum(mix) == pytest.approx(4.0)
    hist = charts.consistency_histogram(reports, 1, "explainer")
    assert len(hist.data) == 2 and len(hist.data[0].x) == 40


def fig_sum(fig) -> float:
    return float(sum(sum(t.y) for t in fig.data))


# --------------------------------------------------------------------------- the page (AppTest)


@pytest.fixture
def app(root, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("EGT_CHECKPOINTS", str(root))
    threads = torch.get_num_threads()  # the app sets its own; give other tests theirs back
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    yield at
    torch.set_num_threads(threads)


def texts(at) -> str:
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    parts += [m.label + " " + str(m.value) for m in at.metric]
    return "\n".join(parts)


def answering(at) -> list[str]:
    """Per model, the name of the exit tile that carries the "answers here" badge."""
    found, last = [], None
    for m in at.markdown:
        if m.value.startswith("**Exit"):
            last = m.value.split("**")[1]
        elif "answers here" in m.value:
            found.append(last)
    return found


def test_starts_and_renders_sample_for_both_models(app):
    assert not app.error
    assert app.selectbox(key="group").value == "fashion-mnist:pair"
    # input + 3 exits per model, plus the thumbnail strip
    assert len(app.image) == 1 + 2 * (1 + 3)
    body = texts(app)
    for exit_label in ("Exit 1", "Exit 2", "Exit 3 (final)"):
        assert body.count(f"**{exit_label}**") == 2
    assert body.count("reference map") == 2 and body.count("r ") >= 4
    assert len(answering(app)) == 2
    assert "computed in" in body and "true label **T-shirt/top**" in body
    assert "Baseline: mean Pearson r" in body and "EGT (λ=1): mean Pearson r" in body
    assert len(app.get("plotly_chart")) == 2
    assert len(app.download_button) == 2
    skipped = [e for e in app.sidebar.expander if "Skipped" in e.label]
    assert skipped and "broken.safetensors" in texts(skipped[0])


def test_threshold_moves_the_answering_exit(app):
    app.slider(key="threshold").set_value(0.0).run()
    assert answering(app) == ["Exit 1", "Exit 1"]
    assert "saves" in texts(app)
    app.slider(key="threshold").set_value(1.0).run()
    assert answering(app) == ["Exit 3 (final)", "Exit 3 (final)"]
    assert not app.exception


def test_pick_another_sample_and_target_class(app):
    app.selectbox(key="sample_fashion-mnist").set_value(5).run()
    assert "true label **Sandal**" in texts(app)
    app.selectbox(key="target_fashion-mnist:pair").set_value(2).run()
    assert "class **Pullover**" in texts(app)
    assert not app.exception and len(app.image) == 9


def test_upload_renders_maps(app):
    app.file_uploader(key="uploads").set_value(("mine.png", png_bytes((40, 30)), "image/png"))
    app.run()
    assert not app.exception and not app.error
    assert app.segmented_control(key="source").value == "My upload"
    body = texts(app)
    assert "`mine.png` (40×30 L)" in body
    assert len(answering(app)) == 2 and len(app.image) == 9


def test_several_uploads_pick_one(app):
    files = [("a.png", png_bytes(seed=1), "image/png"), ("b.png", png_bytes(seed=2), "image/png")]
    app.file_uploader(key="uploads").set_value(files).run()
    assert "`a.png`" in texts(app)
    app.selectbox(key="upload_pick").set_value(1).run()
    assert "`b.png`" in texts(app) and not app.exception


def test_bad_upload_shows_error_and_app_keeps_working(app):
    app.file_uploader(key="uploads").set_value(("notes.png", b"just text, no pixels", "image/png"))
    app.run()
    assert not app.exception
    (err,) = app.error
    assert "notes.png" in err.value and "not an image" in err.value
    app.segmented_control(key="source").set_value("Test image").run()
    assert not app.error and len(answering(app)) == 2


def test_switch_explainer_pair_and_view(app):
    app.selectbox(key="explainer").set_value("gradcam").run()
    assert not app.exception and len(answering(app)) == 2
    app.selectbox(key="group").set_value("shapes:pair").run()
    assert not app.exception and not app.error
    body = texts(app)
    assert "(64×64 RGB)" in body and body.count("**Exit 3 (final)**") == 2
    app.radio(key="view").set_value("EGT only").run()
    assert len(answering(app)) == 1 and "Baseline: mean" not in texts(app)


def test_dataset_tab_from_reports(app, root):
    app.session_state["tab"] = "Dataset results"
    app.run()
    assert not app.exception
    assert len(app.dataframe) == 1
    # accuracy, speedup, 2 exit mixes, 2 histograms
    assert len(app.get("plotly_chart")) == 6
    (root / "shapes" / "egt.report.json").rename(root / "shapes" / "egt.report.moved")
    try:
        app.selectbox(key="group").set_value("shapes:pair").run()
        assert not app.exception
        assert any("No evaluation report yet" in i.value for i in app.info)
        assert len(app.get("plotly_chart")) == 5
    finally:
        (root / "shapes" / "egt.report.moved").rename(root / "shapes" / "egt.report.json")


def test_missing_root_is_a_message(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("EGT_CHECKPOINTS", str(tmp_path / "absent"))
    threads = torch.get_num_threads()
    at = AppTest.from_file(APP, default_timeout=60).run()
    torch.set_num_threads(threads)
    assert not at.exception
    assert "does not exist" in at.error[0].value

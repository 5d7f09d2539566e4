"""What the app computes, with no Streamlit in sight, so that every number on the page is testable.

The page (`streamlit_app.py`, `views.py`) only lays out what these functions return: which
checkpoints exist, what each exit of each model sees in one image, which exit answers at a
threshold and what that saves, and the downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from egt_core.checkpoints import CheckpointError, load_checkpoint, read_metadata, sidecar_path
from egt_core.explain import EXPLAINER_LABELS, explain, explain_consistency, model_lock, overlay
from egt_core.images import load_image
from egt_core.inference import predict
from egt_core.models import ExitCosts, MultiExitNet, exit_costs

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
DEFAULT_ROOT = REPO_ROOT / "checkpoints"
PAIR = ("baseline", "egt")
DATASET_LABELS = {"fashion-mnist": "Fashion-MNIST", "shapes": "Shapes"}
DATASET_ORDER = ("fashion-mnist", "shapes")
# Datasets whose images are a light object on a dark background: photos need inverting.
INVERT_BY_DEFAULT = ("fashion-mnist",)
PREDICTED = None  # target class "predicted by the final exit"
SCORES = ("cosine", "pearson", "spearman", "iou")
COMPAT_KEYS = ("classes", "in_channels", "input_size", "mean", "std")


def use_app_threads(env: dict[str, str] | None = None) -> int:
    """One torch thread per process unless ``$EGT_APP_THREADS`` says otherwise.

    The app runs one small image at a time. On a busy 2-core machine two intra-op threads made
    the 28 px compute ~10x slower at the median (80 ms vs 8 ms) and far less predictable.
    """
    env = os.environ if env is None else env
    try:
        n = max(1, int(env.get("EGT_APP_THREADS", "1")))
    except ValueError:
        n = 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- checkpoints


@dataclass
class ModelEntry:
    """One loadable checkpoint file and its (validated) metadata."""

    key: str  # file stem: "baseline", "egt", ...
    path: Path
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        """ "Baseline", "EGT (λ=1)", or the stem: what the page calls this model."""
        lam = (self.meta.get("train_config") or {}).get("lam")
        base = {"baseline": "Baseline", "egt": "EGT"}.get(self.key, self.key)
        if self.key == "egt" and isinstance(lam, int | float):
            return f"{base} (λ={lam:g})"
        return base

    @property
    def mtime_ns(self) -> int:
        """Part of every cache key, so that a retrained checkpoint is never served stale."""
        return file_stamp(self.path)


@dataclass
class CheckpointGroup:
    """What the sidebar offers: a baseline/EGT pair of one folder, or a single model."""

    key: str
    label: str
    folder: str
    models: list[ModelEntry]

    @property
    def is_pair(self) -> bool:
        return len(self.models) == 2 and tuple(m.key for m in self.models) == PAIR

    @property
    def meta(self) -> dict[str, Any]:
        """Shared metadata (classes, input size, normalisation): the first model's."""
        return self.models[0].meta

    @property
    def dataset(self) -> str:
        return str(self.meta.get("dataset") or self.folder)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


@dataclass
class Discovery:
    root: Path
    groups: list[CheckpointGroup] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    problem: str | None = None  # the root itself is unusable: say why


def checkpoint_root(env: dict[str, str] | None = None) -> Path:
    """``$EGT_CHECKPOINTS`` if set, else the repo's ``checkpoints/``."""
    env = os.environ if env is None else env
    value = env.get("EGT_CHECKPOINTS", "").strip()
    return Path(value).expanduser() if value else DEFAULT_ROOT


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name.lower(), name)


def _folder_rank(name: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def discover(root: str | os.PathLike) -> Discovery:
    """Every loadable checkpoint under ``root`` (the folder and its direct subfolders).

    Only metadata is read (no weights), so listing stays fast. A folder with loadable
    ``baseline`` and ``egt`` files of the same data format becomes a pair; every other loadable
    file is offered on its own. Unloadable files are listed in ``skipped`` with the reason.
    """
    root = Path(root)
    found = Discovery(root=root)
    if not root.exists():
        found.problem = f"The checkpoint folder {root} does not exist."
        return found
    if not root.is_dir():
        found.problem = f"The checkpoint path {root} is not a folder."
        return found
    try:
        folders = [root] + sorted(
            (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: _folder_rank(p.name),
        )
    except OSError as e:
        found.problem = f"Cannot read the checkpoint folder {root}: {e.strerror or e}."
        return found
    pairs: list[CheckpointGroup] = []
    singles: list[CheckpointGroup] = []
    for folder in folders:
        rel = "." if folder == root else folder.name
        entries: dict[str, ModelEntry] = {}
        for path in sorted(folder.glob("*.safetensors")):
            if path.name.startswith("."):
                continue
            shown = path.name if folder == root else f"{folder.name}/{path.name}"
            try:
                entries[path.stem] = ModelEntry(path.stem, path, read_metadata(path))
            except CheckpointError as e:
                found.skipped.append((shown, str(e).replace(str(path), path.name)))
            except OSError as e:
                found.skipped.append((shown, f"cannot read: {e.strerror or e}"))
        nice = dataset_label(rel) if rel != "." else root.name
        paired = False
        if all(k in entries for k in PAIR):
            differ = [
                k for k in COMPAT_KEYS if entries["baseline"].meta[k] != entries["egt"].meta[k]
            ]
            if differ:
                found.skipped.append(
                    (f"{rel}/baseline + egt", f"not a pair: they differ in {', '.join(differ)}")
                )
            else:
                pairs.append(
                    CheckpointGroup(
                        key=f"{rel}:pair",
                        label=f"{nice}: baseline vs EGT",
                        folder=rel,
                        models=[entries["baseline"], entries["egt"]],
                    )
                )
                paired = True
        for stem, entry in entries.items():
            if paired and stem in PAIR:
                continue
            singles.append(
                CheckpointGroup(
                    key=f"{rel}:{stem}", label=f"{nice}: {stem}", folder=rel, models=[entry]
                )
            )
    found.groups = pairs + singles
    if not found.groups and not found.skipped:
        found.problem = f"The checkpoint folder {root} holds no .safetensors checkpoints."
    return found


@dataclass
class ModelBundle:
    """A loaded model plus what the page needs about its cost; loaded once per process."""

    model: MultiExitNet
    meta: dict[str, Any]
    costs: ExitCosts


def load_bundle(path: str | os.PathLike) -> ModelBundle:
    """Load, count FLOPs, and run once, so the first upload does not pay torch's warm-up."""
    model, meta = load_checkpoint(path)
    size = (meta["in_channels"], meta["input_size"], meta["input_size"])
    costs = exit_costs(model, size)
    x = torch.zeros(1, *size)
    explain(model, x)
    with model_lock(model):
        predict(model, x, 0.5)
    return ModelBundle(model, meta, costs)


# --------------------------------------------------------------------------- reports


def report_path(entry: ModelEntry) -> Path:
    """The evaluation report named in the metadata, else ``<name>.report.json`` beside it."""
    try:
        named = sidecar_path(entry.path, entry.meta, "report")
    except CheckpointError:
        named = None
    return named or entry.path.with_name(f"{entry.key}.report.json")


def file_stamp(path: str | os.PathLike) -> int:
    """Modification time (ns), 0 if missing: a cache key that changes when the file does."""
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0


def load_report(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """``(report, None)`` or ``(None, why not)``; never raises for a bad or missing file."""
    path = Path(path)
    if not path.is_file():
        return None, f"No evaluation report yet ({path.name} is missing)."
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name} is not readable JSON ({e})."
    if not isinstance(report, dict) or not isinstance(report.get("accuracy"), list):
        return None, f"{path.name} is not an EGT evaluation report."
    return report, None


def sweep_rows(report: dict[str, Any], include_full_path: bool = False) -> list[dict[str, Any]]:
    """The threshold sweep, sorted; the ``threshold > 1`` full-path row only if asked."""
    rows = [r for r in report.get("sweep") or [] if isinstance(r, dict) and "threshold" in r]
    if not include_full_path:
        rows = [r for r in rows if r["threshold"] <= 1.0]
    return sorted(rows, key=lambda r: r["threshold"])


def per_image_scores(
    report: dict[str, Any], source: str = "trained", metric: str = "pearson"
) -> list[list[float]]:
    """Per early exit, the per-image scores stored in the report (empty lists if absent)."""
    block = (report.get("consistency") or {}).get(source) or {}
    return [
        [float(v) for v in (e.get("per_image") or {}).get(metric, [])]
        for e in block.get("per_exit", [])
    ]


def headline_metrics(report: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """``(name, kind, value)`` of the numbers a reader wants first; kind picks the format."""
    out: list[tuple[str, str, float | None]] = []
    acc = report.get("accuracy") or []
    for k, a in enumerate(acc):
        out.append(
            (f"Accuracy, {'final exit' if k == len(acc) - 1 else f'exit {k + 1}'}", "pct", a)
        )
    cons = report.get("consistency") or {}
    for source in ("trained", "explainer"):
        block = cons.get(source) or {}
        method = EXPLAINER_LABELS.get(block.get("method"), block.get("method", source))
        method = method.split(" (")[0]
        for m, name in (("pearson", "Pearson r"), ("cosine", "Cosine"), ("iou", "Top-20% IoU")):
            v = (block.get("mean") or {}).get(m)
            if v is not None:
                out.append((f"{name}, {method} maps", "score", v))
    best = report.get("best_operating_point") or {}
    if best:
        out.append(("Best threshold (accuracy within 0.5 pt)", "threshold", best.get("threshold")))
        out.append(("Accuracy at best threshold", "pct", best.get("accuracy")))
        out.append(
            ("Speedup at best threshold (batch 1)", "x", (best.get("batch1") or {}).get("speedup"))
        )
        out.append(("FLOP-ideal speedup there", "x", best.get("flop_ideal_speedup")))
    return out


def fmt_value(kind: str, v: float | None, signed: bool = False) -> str:
    if v is None or not isinstance(v, int | float) or not math.isfinite(v):
        return "–"
    sign = "+" if signed else ""
    if kind == "pct":
        return f"{v * 100:{sign}.2f}" + (" pt" if signed else "%")
    if kind == "x":
        return f"{v:{sign}.2f}x"
    if kind == "threshold":
        return f"{v:{sign}g}"
    return f"{v:{sign}.3f}"


def headline_table(reports: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Metrics as rows, models as columns, and the EGT-minus-baseline difference for a pair."""
    per_model = {label: headline_metrics(rep) for label, rep in reports.items()}
    names: list[tuple[str, str]] = []
    for metrics in per_model.values():
        for name, kind, _ in metrics:
            if (name, kind) not in names:
                names.append((name, kind))
    labels = list(per_model)
    rows = []
    for name, kind in names:
        row = {"metric": name}
        values = {}
        for label in labels:
            values[label] = next((v for n, _, v in per_model[label] if n == name), None)
            row[label] = fmt_value(kind, values[label])
        if len(labels) == 2:
            a, b = values[labels[0]], values[labels[1]]
            diff = b - a if isinstance(a, int | float) and isinstance(b, int | float) else None
            row["difference"] = "" if kind == "threshold" else fmt_value(kind, diff, signed=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    path: Path
    label: str

    @property
    def title(self) -> str:
        return f"{self.label} ({self.path.stem.split('_', 1)[0]})"


def list_samples(dataset: str, root: Path = SAMPLES_DIR) -> list[Sample]:
    """The shipped test images of a dataset, with their true labels (from ``index.json``)."""
    folder = root / dataset
    if not folder.is_dir():
        return []
    try:
        index = json.loads((folder / "index.json").read_text())["samples"]
        labels = {s["file"]: s["label"] for s in index}
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        labels = {}
    out = []
    for path in sorted(folder.glob("*.png")):
        label = labels.get(path.name) or path.stem.split("_", 1)[-1]
        out.append(Sample(path, label))
    return out


# --------------------------------------------------------------------------- analysis


def digest(data: bytes) -> str:
    """Cache key of an image's bytes (the bytes themselves are never hashed by Streamlit)."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class ModelAnalysis:
    """One model's view of one image: every exit's map, probabilities and agreement."""

    key: str
    label: str
    tensor: torch.Tensor  # (1, C, S, S) normalised, for the early-exit decision
    display: np.ndarray  # (S, S, 3) float32 RGB in [0, 1]: the image as the model sees it
    maps: np.ndarray  # (E, S, S) float32 in [0, 1]
    probs: np.ndarray  # (E, C) softmax of every exit
    target: int  # the class every exit explains
    consistency: list[dict[str, float]]  # per early exit vs the final exit
    seconds: float

    @property
    def num_exits(self) -> int:
        return int(self.maps.shape[0])

    @property
    def predictions(self) -> list[int]:
        return [int(i) for i in self.probs.argmax(1)]

    @property
    def confidences(self) -> list[float]:
        return [float(v) for v in self.probs.max(1)]

    def mean_score(self, metric: str = "pearson") -> float:
        vals = [c[metric] for c in self.consistency]
        return float(np.mean(vals)) if vals else float("nan")


@dataclass
class ImageAnalysis:
    name: str
    original_size: tuple[int, int]
    original_mode: str
    method: str
    target: int | None
    invert: bool
    models: list[ModelAnalysis]
    seconds: float  # decode + explain + score, every model
    created: float = field(default_factory=time.time)  # wall clock: tells a cache hit apart


def analyse_image(
    data: bytes,
    models: Sequence[tuple[ModelEntry, ModelBundle]],
    *,
    name: str,
    method: str = "cam",
    target: int | None = PREDICTED,
    invert: bool = False,
) -> ImageAnalysis:
    """Decode ``data`` once per data format and explain it with every model.

    Raises `ImageLoadError` for a bad image. The models are shared between sessions: `explain`
    holds each model's lock and leaves the model as it found it.
    """
    t0 = time.perf_counter()
    loaded: dict[tuple, Any] = {}
    results = []
    info = None
    for entry, bundle in models:
        meta = bundle.meta
        fmt = (meta["in_channels"], meta["input_size"], tuple(meta["mean"]), tuple(meta["std"]))
        if fmt not in loaded:
            loaded[fmt] = load_image(
                data,
                in_channels=meta["in_channels"],
                size=meta["input_size"],
                mean=meta["mean"],
                std=meta["std"],
                name=name,
                invert=invert,
            )
        image = info = loaded[fmt]
        t1 = time.perf_counter()
        classes = None if target is None else torch.tensor([target])
        expl = explain(bundle.model, image.tensor, method=method, target_classes=classes)
        scores = [
            {m: float(d[m][0]) for m in SCORES} | {"degenerate": bool(d["degenerate"][0])}
            for d in explain_consistency(expl)
        ]
        results.append(
            ModelAnalysis(
                key=entry.key,
                label=entry.label,
                tensor=image.tensor,
                display=image.display,
                maps=expl.maps[0].numpy().astype(np.float32),
                probs=expl.probs[0].numpy().astype(np.float64),
                target=int(expl.target_classes[0]),
                consistency=scores,
                seconds=time.perf_counter() - t1,
            )
        )
    assert info is not None, "analyse_image needs at least one model"
    return ImageAnalysis(
        name=info.name,
        original_size=tuple(info.original_size),
        original_mode=info.original_mode,
        method=method,
        target=target,
        invert=invert,
        models=results,
        seconds=time.perf_counter() - t0,
    )


@dataclass
class Decision:
    """What early-exit inference does with this image at this threshold."""

    exit_index: int  # 0-based
    prediction: int
    confidence: float
    flops: int  # FLOPs spent answering at that exit (early heads included)
    full_path: int  # FLOPs of the plain network, no early heads

    @property
    def flop_fraction(self) -> float:
        return self.flops / self.full_path

    @property
    def saving(self) -> float:
        """Share of the full path's FLOPs not spent (negative: the early heads cost extra)."""
        return 1.0 - self.flop_fraction


def decide(bundle: ModelBundle, tensor: torch.Tensor, threshold: float) -> Decision:
    """`egt_core.inference.predict` under the model's lock (grad-cam hooks of another
    session's explanation would otherwise record this forward pass)."""
    with model_lock(bundle.model):
        r = predict(bundle.model, tensor, threshold)
    k = int(r.exit_index[0])
    return Decision(
        exit_index=k,
        prediction=int(r.prediction[0]),
        confidence=float(r.confidence[0]),
        flops=bundle.costs.answer_at(k),
        full_path=bundle.costs.full_path,
    )


def saving_text(d: Decision) -> str:
    """Plain words for the compute an exit saves (or costs) relative to the full path."""
    pct = round(abs(d.saving) * 100)
    if d.saving >= 0.005:
        return f"saves {pct}% of the full path's FLOPs"
    if d.saving <= -0.005:
        return f"costs {pct}% more FLOPs than the full path (the early heads ran too)"
    return "costs the same FLOPs as the full path"


def exit_name(k: int, num_exits: int) -> str:
    return f"Exit {k + 1}" + (" (final)" if k == num_exits - 1 else "")


def exit_state(k: int, decision: Decision) -> str:
    """``answers``, ``passed`` (ran, below the threshold) or ``skipped`` (never computed)."""
    if k == decision.exit_index:
        return "answers"
    return "passed" if k < decision.exit_index else "skipped"


def fmt_score(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"


def score_line(c: dict[str, Any]) -> str:
    """One early exit's agreement with the final exit, in the page's short form."""
    if c.get("degenerate"):
        return "flat map: no score"
    return (
        f"r {fmt_score(c['pearson'])} · cos {fmt_score(c['cosine'])}  \nIoU {fmt_score(c['iou'])}"
    )


# --------------------------------------------------------------------------- pictures


def tile_scale(size: int, target: int = 168) -> int:
    """Integer upscaling so small inputs (28 px) are visible without resampling the pixels."""
    return max(1, round(target / size))


def upscale(display: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling: the pixels the model sees, just bigger."""
    return display.repeat(factor, 0).repeat(factor, 1) if factor > 1 else display


def overlay_tile(
    display: np.ndarray, heat: np.ndarray, alpha: float, colormap: str, factor: int
) -> np.ndarray:
    """An exit's map over the image at display size; the map is upsampled smoothly."""
    return overlay(upscale(display, factor), heat, alpha=alpha, colormap=colormap)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def framed(img: np.ndarray, colour: tuple[int, int, int] | None, width: int = 5) -> Image.Image:
    """A uint8 PIL tile with a coloured frame (or a blank one, so tiles stay aligned)."""
    tile = Image.fromarray(to_uint8(img))
    fill = colour or (255, 255, 255)
    out = Image.new("RGB", (tile.width + 2 * width, tile.height + 2 * width), fill)
    out.paste(tile, (width, width))
    return out


ANSWER_COLOUR = (22, 163, 74)
QUIET_COLOUR = (226, 232, 240)


def _font(size: int) -> tuple[ImageFont.ImageFont, bool]:
    """DejaVu Sans when the system has it (it has "λ"), else Pillow's font; flag: has λ."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), False
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default(), False


def compose_png(
    analysis: ImageAnalysis,
    decisions: dict[str, Decision],
    classes: Sequence[str],
    *,
    alpha: float,
    colormap: str,
    threshold: float,
) -> bytes:
    """The panel as one PNG: a row per model, the input and every exit's overlay with scores."""
    first = analysis.models[0]
    factor = tile_scale(first.display.shape[0])
    side = first.display.shape[0] * factor + 10
    pad, label_w, title_h, text_h = 12, 150, 40, 56
    cols = 1 + max(m.num_exits for m in analysis.models)
    width = label_w + cols * (side + pad) + pad
    height = title_h + len(analysis.models) * (side + text_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    (big, greek), (small, _) = _font(14), _font(11)
    target = "predicted class" if analysis.target is None else classes[analysis.target]
    draw.text(
        (pad, 10),
        f"{analysis.name} · {EXPLAINER_LABELS.get(analysis.method, analysis.method)} · "
        f"explaining {target} · exit threshold {threshold:.2f}",
        fill="black",
        font=big,
    )
    for row, m in enumerate(analysis.models):
        y = title_h + row * (side + text_h + pad)
        d = decisions[m.key]
        label = m.label if greek else m.label.replace("λ", "lambda ")
        draw.text((pad, y + 4), label, fill="black", font=big)
        draw.text(
            (pad, y + 26),
            f"mean Pearson {fmt_score(m.mean_score())}\nanswers at exit {d.exit_index + 1}\n"
            f"{max(0, round(d.saving * 100))}% FLOPs saved",
            fill=(80, 80, 80),
            font=small,
        )
        tiles = [(framed(upscale(m.display, factor), QUIET_COLOUR), ["input", ""])]
        for k in range(m.num_exits):
            tile = overlay_tile(m.display, m.maps[k], alpha, colormap, factor)
            answers = k == d.exit_index
            lines = [
                f"{exit_name(k, m.num_exits)}{' ANSWERS' if answers else ''}",
                f"{classes[m.predictions[k]]} {m.confidences[k]:.0%}",
            ]
            if k < m.num_exits - 1:
                lines.append(" ".join(score_line(m.consistency[k]).replace(" · ", " ").split()))
            else:
                lines.append("reference map")
            tiles.append((framed(tile, ANSWER_COLOUR if answers else QUIET_COLOUR), lines))
        for col, (tile, lines) in enumerate(tiles):
            x = label_w + pad + col * (side + pad)
            canvas.paste(tile.resize((side, side), Image.Resampling.NEAREST), (x, y))
            for i, line in enumerate(lines):
                colour = ANSWER_COLOUR if "ANSWERS" in line else (40, 40, 40)
                draw.text((x, y + side + 3 + 15 * i), line, fill=colour, font=small)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- numbers


def summary(
    analysis: ImageAnalysis,
    decisions: dict[str, Decision],
    classes: Sequence[str],
    *,
    threshold: float,
    checkpoints: dict[str, str],
) -> dict[str, Any]:
    """Every number on the panel, as plain JSON (exits numbered from 1 as on the page)."""
    models = []
    for m in analysis.models:
        d = decisions[m.key]
        exits = []
        for k in range(m.num_exits):
            row: dict[str, Any] = {
                "exit": k + 1,
                "final": k == m.num_exits - 1,
                "prediction": classes[m.predictions[k]],
                "confidence": round(m.confidences[k], 6),
                "probabilities": {
                    c: round(float(p), 6) for c, p in zip(classes, m.probs[k], strict=True)
                },
                "answers": k == d.exit_index,
                "state": exit_state(k, d),
            }
            if k < m.num_exits - 1:
                row["consistency_with_final"] = {
                    key: (round(v, 6) if isinstance(v, float) else v)
                    for key, v in m.consistency[k].items()
                }
            exits.append(row)
        models.append(
            {
                "model": m.label,
                "checkpoint": checkpoints.get(m.key),
                "explained_class": classes[m.target],
                "answering_exit": d.exit_index + 1,
                "prediction": classes[d.prediction],
                "confidence": round(d.confidence, 6),
                "flops_answering": d.flops,
                "flops_full_path": d.full_path,
                "flop_fraction": round(d.flop_fraction, 6),
                "mean_pearson_early_exits": round(m.mean_score("pearson"), 6),
                "exits": exits,
            }
        )
    return {
        "image": {
            "name": analysis.name,
            "original_size": list(analysis.original_size),
            "original_mode": analysis.original_mode,
            "inverted": analysis.invert,
        },
        "settings": {
            "explainer": analysis.method,
            "target_class": None if analysis.target is None else classes[analysis.target],
            "threshold": threshold,
            "consistency_top_k": 0.2,
        },
        "models": models,
    }


def safe_stem(name: str) -> str:
    """A download file name from an uploaded file's name (never a path)."""
    stem = Path(name).stem or "image"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] or "image"

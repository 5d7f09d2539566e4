"""``egt eval`` and ``egt explain``: reports for checkpoints and panels for images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


class HELP(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help line (unless None/False or already stated)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default is argparse.SUPPRESS:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})".strip().replace("%", "%%")


EVAL_EXAMPLES = """examples:
  egt eval --checkpoint checkpoints/fashion-mnist/baseline.safetensors \\
      --checkpoint checkpoints/fashion-mnist/egt.safetensors --out checkpoints/fashion-mnist
  egt eval --checkpoint runs/fmnist-egt/best.safetensors --limit 2000 --out report.json"""

EXPLAIN_EXAMPLES = """examples:
  egt explain shoe.png --checkpoint checkpoints/fashion-mnist/egt.safetensors
  egt explain *.png --checkpoint runs/shapes-egt/best.safetensors --threshold 0.8 \\
      --method gradcam --out explanations/"""


def add_eval_and_explain(sub: argparse._SubParsersAction) -> None:
    from .evaluate import DEFAULT_THRESHOLDS

    p = sub.add_parser(
        "eval",
        help="evaluate checkpoints: accuracy, consistency, threshold sweep, measured speedup",
        description="Evaluate one or several checkpoints on a dataset's test split and write a\n"
        "JSON report per checkpoint (and print a short table).",
        epilog=EVAL_EXAMPLES,
        formatter_class=HELP,
    )
    p.add_argument(
        "--checkpoint", action="append", required=True, help="a .safetensors file; repeat it"
    )
    p.add_argument("--dataset", help="dataset spec (default: the checkpoint's own dataset)")
    p.add_argument("--data-dir", help="folder with the dataset's raw files (else $EGT_DATA)")
    p.add_argument("--limit", type=int, help="first N test images (default: all)")
    p.add_argument("--explainer", default="gradcam", help="grad-cam method for consistency")
    p.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="confidence thresholds of the sweep (above 1: no early exit)",
    )
    p.add_argument("--timing-images", type=int, default=500, help="images timed at batch 1")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (median kept)")
    p.add_argument("--seed", type=int, default=0, help="seed for data splits")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--out",
        help="report file (.json, one checkpoint) or folder (default: print only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    q = sub.add_parser(
        "explain",
        help="explain images: per-exit prediction, answering exit, maps and consistency",
        description="Explain image files with a checkpoint: prints each exit's prediction and\n"
        "confidence, which exit answers at the threshold and the consistency scores;\n"
        "writes a PNG panel and a JSON file per image.",
        epilog=EXPLAIN_EXAMPLES,
        formatter_class=HELP,
    )
    q.add_argument("images", nargs="+", help="image files (png, jpg, webp, bmp, gif, tiff...)")
    q.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint")
    q.add_argument(
        "--threshold", type=float, default=0.9, help="confidence at which an exit answers"
    )
    q.add_argument("--method", default="cam", help="cam (trained) or a grad-cam method")
    q.add_argument(
        "--target-class", help="class name or index to explain (default: final prediction)"
    )
    q.add_argument("--invert", action="store_true", help="invert intensities (dark objects)")
    q.add_argument("--out", default="explanations", help="output folder")
    q.set_defaults(func=_cmd_explain)


def _report_paths(out: Path, checkpoints: list[str]) -> list[Path]:
    """One JSON file (one checkpoint, ``--out x.json``) or one file per checkpoint in a folder,
    named after the checkpoint and made unique (``run1/best`` and ``run2/best`` both fit)."""
    from .cli import CLIError

    if out.suffix.lower() == ".json":
        if len(checkpoints) > 1:
            raise CLIError(
                f"--out {out} is one file, but {len(checkpoints)} checkpoints were given"
            )
        paths = [out]
    else:
        stems = [Path(c).stem for c in checkpoints]
        names = []
        for c, stem in zip(checkpoints, stems, strict=True):
            if stems.count(stem) > 1:
                parent = Path(c).resolve().parent.name or "root"
                stem = f"{parent}-{stem}"
            base, k = stem, 2
            while stem in names:
                stem, k = f"{base}-{k}", k + 1
            names.append(stem)
        paths = [out / f"{name}.report.json" for name in names]
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot write reports under {out}: {e.strerror or e}") from None
    return paths


def _cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoints import read_metadata
    from .cli import CLIError
    from .evaluate import evaluate_checkpoint

    for ckpt in args.checkpoint:  # fail before a long evaluation, not after it
        if not Path(ckpt).is_file():
            raise CLIError(f"no checkpoint file at {ckpt}")
        read_metadata(ckpt)
    paths = _report_paths(Path(args.out), args.checkpoint) if args.out else None
    if args.threads:
        torch.set_num_threads(args.threads)
    for i, ckpt in enumerate(args.checkpoint):
        report = evaluate_checkpoint(
            ckpt,
            dataset=args.dataset,
            data_dir=args.data_dir,
            limit=args.limit,
            explainer=args.explainer,
            thresholds=args.thresholds,
            timing_images=args.timing_images,
            repeats=args.repeats,
            seed=args.seed,
            progress=not args.quiet,
        )
        _print_report(report)
        if paths:  # written as soon as it is ready: a later failure does not lose it
            text = json.dumps(report, indent=1, allow_nan=False)
            paths[i].write_text(text + "\n")
            print(f"report: {paths[i]}")
    return 0


def _print_report(r: dict) -> None:
    name = Path(r["checkpoint"]).name
    print(f"\n{name}  ({r['dataset']} test, n={r['n']}, lambda={r['training'].get('lam')})")
    print("  accuracy per exit:  " + "  ".join(f"{a * 100:6.2f}" for a in r["accuracy"]))
    for key in ("trained", "explainer"):
        c = r["consistency"][key]
        rows = "  ".join(
            f"exit {e + 1}: cos {x['cosine']:.3f} r {x['pearson']:.3f} iou {x['iou']:.3f}"
            for e, x in enumerate(c["per_exit"])
        )
        print(f"  consistency ({c['method']}):  {rows}")
    print("  threshold  acc     exit mix            FLOP-ideal  batch-1  batched")
    for row in r["sweep"]:
        b1 = _times(row.get("batch1", {}).get("speedup"))
        bb = _times(row.get("batched", {}).get("speedup"))
        mix = "/".join(str(m) for m in row["exit_mix"])
        print(
            f"  {row['threshold']:9.3f}  {row['accuracy'] * 100:6.2f}  {mix:18s}  "
            f"{row['flop_ideal_speedup']:9.2f}x  {b1}  {bb}"
        )
    best = r.get("best_operating_point")
    if best:
        print(
            f"  best: threshold {best['threshold']} -> {best['batch1']['speedup']:.2f}x at batch 1,"
            f" accuracy {best['accuracy'] * 100:.2f}%"
        )


def _times(value: float | None) -> str:
    return "      -" if value is None else f"{value:6.2f}x"


def _parse_class(value: str | None, classes: list[str]) -> int | None:
    from .cli import CLIError

    if value is None:
        return None
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    raise CLIError(f"unknown class {value!r}; classes: {', '.join(classes)}")


def _unique_stem(path: Path, used: set[str]) -> str:
    """Output name for an image: its stem, or stem-ext / stem-N when two inputs share it."""
    stem = path.stem or "image"
    if stem in used:
        stem = f"{stem}-{path.suffix.lstrip('.')}" if path.suffix else stem
    base, k = stem, 2
    while stem in used:
        stem, k = f"{base}-{k}", k + 1
    used.add(stem)
    return stem


def _cmd_explain(args: argparse.Namespace) -> int:
    from .checkpoints import load_checkpoint
    from .cli import CLIError
    from .explain import EXPLAINERS, explain, explain_consistency
    from .images import ImageLoadError, load_image
    from .inference import predict
    from .panel import render_panel

    if args.method not in EXPLAINERS:
        raise CLIError(f"unknown method {args.method!r}; choose one of {', '.join(EXPLAINERS)}")
    if not 0 <= args.threshold:
        raise CLIError(f"--threshold must be >= 0, got {args.threshold}")
    model, meta = load_checkpoint(args.checkpoint)
    classes = meta["classes"]
    target = _parse_class(args.target_class, classes)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    failures = 0
    used: set[str] = set()
    for path in args.images:
        try:
            img = load_image(
                path,
                in_channels=meta["in_channels"],
                size=meta["input_size"],
                mean=meta["mean"],
                std=meta["std"],
                invert=args.invert,
            )
        except (ImageLoadError, OSError) as e:
            print(f"egt explain: {path}: {' '.join(str(e).split())}", file=sys.stderr)
            failures += 1
            continue
        targets = None if target is None else torch.tensor([target])
        expl = explain(model, img.tensor, args.method, target_classes=targets)
        answer = predict(model, img.tensor, args.threshold)
        k = int(answer.exit_index[0])
        scores = explain_consistency(expl)
        rows, labels = [], []
        for e in range(model.num_exits):
            p = expl.probs[0, e]
            conf, pred = float(p.max()), int(p.argmax())
            row = {"exit": e + 1, "prediction": classes[pred], "confidence": conf}
            label = f"exit {e + 1}{' (final)' if e == model.num_exits - 1 else ''}\n"
            label += f"{classes[pred]} {conf:.2f}"
            if e < model.num_exits - 1:
                s = {m: float(v[0]) for m, v in scores[e].items() if m != "degenerate"}
                row["consistency_with_final"] = {
                    **s,
                    "degenerate": bool(scores[e]["degenerate"][0]),
                }
                label += f"\ncos {s['cosine']:.2f} r {s['pearson']:.2f} iou {s['iou']:.2f}"
            rows.append(row)
            labels.append(label)
        stem = _unique_stem(Path(path), used)
        png = render_panel(
            img.display,
            expl.maps[0].numpy(),
            labels,
            title=f"{Path(path).name}: explained class {classes[int(expl.target_classes[0])]}",
            answering_exit=k,
        )
        (out / f"{stem}.png").write_bytes(png)
        record = {
            "image": str(path),
            "checkpoint": args.checkpoint,
            "method": args.method,
            "threshold": args.threshold,
            "answering_exit": k + 1,
            "answer": classes[int(answer.prediction[0])],
            "explained_class": classes[int(expl.target_classes[0])],
            "exits": rows,
        }
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{path}: exit {k + 1} answers {record['answer']!r}", end="")
        print(f" ({float(answer.confidence[0]):.2f});", end="")
        for row in rows:
            extra = row.get("consistency_with_final")
            cons = f", r={extra['pearson']:.2f}" if extra else ""
            print(
                f" exit {row['exit']}: {row['prediction']} {row['confidence']:.2f}{cons};", end=""
            )
        print(f" -> {out / stem}.png")
    return 2 if failures else 0

"""Print the README's results tables (Markdown) from the shipped evaluation reports.

Every number comes from ``checkpoints/<dataset>/{baseline,egt}.report.json``; regenerate those with
``egt eval`` (see README) and rerun this script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
PAPER = {  # arXiv 2601.08891, 9-class real-world image dataset (not ours)
    "accuracy": "98.97%",
    "pearson": "0.693 -> 0.821 (+18.5%)",
    "speedup": "1.97x (1.83 vs 3.6 ms/sample) at 97.8%",
}


def pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def gain(b: float, e: float) -> str:
    return f"{(e - b) / abs(b) * 100:+.1f}%" if b else "n/a"


def dataset_tables(ds: str, base: dict, egt: dict) -> list[str]:
    out = [f"### {ds} (test split, n = {base['n']})", ""]
    lam = egt["training"].get("lam")
    out.append(
        f"EGT: lambda = {lam}, attention = {egt['training'].get('attention')}, "
        f"distance = {egt['training'].get('distance')}; both trained "
        f"{base['training'].get('epochs')} epochs, seed {base['training'].get('seed')}."
    )
    out += ["", "| exit | baseline accuracy | EGT accuracy |", "|---|---|---|"]
    for k, (a, b) in enumerate(zip(base["accuracy"], egt["accuracy"], strict=True)):
        name = "final" if k == len(base["accuracy"]) - 1 else str(k + 1)
        out.append(f"| {name} | {pct(a)} | {pct(b)} |")
    out += [
        "",
        "Attention consistency of each early exit with the final exit (mean over test images):",
        "",
        "| maps | exit | metric | baseline | EGT | relative gain |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("explainer", "trained"):
        cb, ce = base["consistency"][key], egt["consistency"][key]
        label = {"gradcam": "Grad-CAM (grad-cam package)", "cam": "trained CAM"}.get(
            cb["method"], cb["method"]
        )
        for metric in ("pearson", "cosine", "iou"):
            for k, (xb, xe) in enumerate(zip(cb["per_exit"], ce["per_exit"], strict=True)):
                out.append(
                    f"| {label} | {k + 1} | {metric} | {xb[metric]:.3f} | {xe[metric]:.3f} | "
                    f"{gain(xb[metric], xe[metric])} |"
                )
            mb, me = cb["mean"][metric], ce["mean"][metric]
            out.append(
                f"| {label} | mean | **{metric}** | **{mb:.3f}** | **{me:.3f}** | "
                f"**{gain(mb, me)}** |"
            )
    for name, rep in (("EGT", egt), ("baseline", base)):
        out += [
            "",
            f"Early exit on the {name} checkpoint (final-exit accuracy {pct(rep['accuracy'][-1])}; "
            f"batch 1 timed on the first {rep['timing']['batch1_images']} test images, batch 256 on "
            f"the first {rep['timing']['batched_images']}, {rep['environment']['torch_threads']} "
            "torch thread):",
            "",
            "| threshold | accuracy | exit mix | FLOP-ideal speedup | measured batch 1 | "
            "measured batch 256 | batch 256 / FLOP-ideal |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rep["sweep"]:
            mix = " / ".join(f"{f * 100:.0f}%" for f in r["exit_fraction"])
            b1 = r.get("batch1", {})
            bb = r.get("batched", {})
            out.append(
                f"| {r['threshold']} | {pct(r['accuracy'])} | {mix} | "
                f"{r['flop_ideal_speedup']:.2f}x | {b1.get('speedup', float('nan')):.2f}x "
                f"({b1.get('early_ms', float('nan')):.3f} vs {b1.get('full_ms', float('nan')):.3f} ms)"
                f" | {bb.get('speedup', float('nan')):.2f}x | "
                f"{r.get('batched_vs_flop_ideal', float('nan')):.2f} |"
            )
    lat = egt["latency_batch1"]
    fl = egt["flops"]
    out += [
        "",
        "Batch-1 latency of each part (EGT checkpoint, BN folded) beside its FLOPs:",
        "",
        "| part | FLOPs (share of full path) | batch-1 latency |",
        "|---|---|---|",
    ]
    for k, (s, ms) in enumerate(zip(fl["segments"], lat["segments_ms"], strict=True)):
        out.append(f"| segment {k + 1} | {s / fl['full_path'] * 100:.1f}% | {ms:.3f} ms |")
    for k, (h, ms) in enumerate(zip(fl["heads"], lat["heads_ms"], strict=True)):
        name = "final classifier" if k == len(fl["heads"]) - 1 else f"head {k + 1}"
        out.append(f"| {name} | {h / fl['full_path'] * 100:.1f}% | {ms:.3f} ms |")
    out.append("")
    return out


README_THRESHOLDS = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01)


def summary_table(ds: str, base: dict, egt: dict, paper: bool) -> list[str]:
    """The README's compact view: baseline vs EGT, relative gain, the paper beside us."""
    cb, ce = base["consistency"], egt["consistency"]
    rows = [
        (
            "final-exit accuracy",
            pct(base["accuracy"][-1]),
            pct(egt["accuracy"][-1]),
            f"{(egt['accuracy'][-1] - base['accuracy'][-1]) * 100:+.2f} pt",
            "98.97% / 98.97%",
        )
    ]
    for k in range(len(base["accuracy"]) - 1):
        rows.append(
            (
                f"exit {k + 1} accuracy",
                pct(base["accuracy"][k]),
                pct(egt["accuracy"][k]),
                f"{(egt['accuracy'][k] - base['accuracy'][k]) * 100:+.2f} pt",
                "",
            )
        )
    for key, label in (("explainer", "Grad-CAM"), ("trained", "trained CAM")):
        for metric, name in (("pearson", "Pearson"), ("cosine", "cosine"), ("iou", "top-20% IoU")):
            b, e = cb[key]["mean"][metric], ce[key]["mean"][metric]
            ref = "0.693 -> 0.821 (+18.5%)" if (key, metric) == ("explainer", "pearson") else ""
            rows.append(
                (f"{label} {name}, mean of early exits", f"{b:.3f}", f"{e:.3f}", gain(b, e), ref)
            )
        for k, (xb, xe) in enumerate(zip(cb[key]["per_exit"], ce[key]["per_exit"], strict=True)):
            rows.append(
                (
                    f"{label} Pearson, exit {k + 1}",
                    f"{xb['pearson']:.3f}",
                    f"{xe['pearson']:.3f}",
                    gain(xb["pearson"], xe["pearson"]),
                    "",
                )
            )
    for name, rep in (("baseline", base), ("EGT", egt)):
        best = rep["best_operating_point"]
        if best:
            rows.append(
                (
                    f"best early exit, {name} (<= 0.5 pt below its final exit)",
                    f"threshold {best['threshold']}",
                    f"{best['batch1']['speedup']:.2f}x at batch 1, {pct(best['accuracy'])}",
                    "",
                    "1.97x (1.83 vs 3.6 ms) at 97.8%" if name == "EGT" else "",
                )
            )
    out = [
        f"**{ds}** (test split, n = {base['n']}; EGT lambda = {egt['training']['lam']}, "
        f"distance {egt['training']['distance']})",
        "",
        "| | baseline | EGT | EGT vs baseline | paper (other dataset) |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {' | '.join(r)} |" for r in rows]
    out += [
        "",
        f"Early exit on the {ds} EGT checkpoint (final exit {pct(egt['accuracy'][-1])}; "
        f"batch 1 on {egt['timing']['batch1_images']} images, batch 256 on "
        f"{egt['timing']['batched_images']}, 1 thread):",
        "",
        "| threshold | accuracy | exit mix (1 / 2 / final) | FLOP-ideal | batch 1 measured | "
        "batch 256 measured | batch 256 / FLOP-ideal |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in egt["sweep"]:
        if r["threshold"] in README_THRESHOLDS:
            mix = " / ".join(f"{f * 100:.0f}%" for f in r["exit_fraction"])
            out.append(
                f"| {r['threshold']} | {pct(r['accuracy'])} | {mix} | "
                f"{r['flop_ideal_speedup']:.2f}x | {r['batch1']['speedup']:.2f}x | "
                f"{r['batched']['speedup']:.2f}x | {r['batched_vs_flop_ideal']:.2f} |"
            )
    return out + [""]


def main() -> int:
    if "--readme" in sys.argv:
        lines = ["<!-- generated by `python scripts/results_table.py --readme` -->", ""]
        for folder in sorted(p for p in ROOT.iterdir() if p.is_dir()):
            b, e = folder / "baseline.report.json", folder / "egt.report.json"
            if b.exists() and e.exists():
                lines += summary_table(
                    folder.name, json.loads(b.read_text()), json.loads(e.read_text()), paper=True
                )
        print("\n".join(lines))
        return 0
    lines = ["<!-- generated by scripts/results_table.py from checkpoints/*/*.report.json -->", ""]
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        b, e = folder / "baseline.report.json", folder / "egt.report.json"
        if b.exists() and e.exists():
            lines += dataset_tables(
                folder.name, json.loads(b.read_text()), json.loads(e.read_text())
            )
    lines += [
        "Paper (arXiv 2601.08891, a different 9-class real-world dataset): accuracy "
        f"{PAPER['accuracy']}; consistency {PAPER['pearson']}; speedup {PAPER['speedup']}.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

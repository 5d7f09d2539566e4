"""Choose the consistency weight lambda on the validation split with short training runs.

Each candidate is trained with the same seed, data and schedule; the rule (documented in the README)
is: among the lambdas whose final-exit validation accuracy is within ``--tolerance`` points of the
lambda = 0 run, take the one with the highest mean validation Pearson consistency (early exits vs
final, trained attention). Results go to a JSON file so the choice can be audited.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from egt_core.checkpoints import read_metadata
from egt_core.train import BEST, TrainConfig, train


def _run_row(folder: Path) -> dict:
    """Validation metrics of a finished run's best checkpoint, in the sweep's row format."""
    meta = read_metadata(folder / BEST)
    val = meta["metrics"]["val"]
    pearson = [c["pearson"] for c in val["consistency"]]
    return {
        "lambda": meta["train_config"]["lam"],
        "run": str(folder),
        "epoch": meta["epoch"],
        "val_accuracy": val["accuracy"],
        "val_pearson": pearson,
        "mean_val_pearson": sum(pearson) / len(pearson),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=12000)
    p.add_argument("--tolerance", type=float, default=0.5, help="accuracy points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distance", default="cosine", help="consistency distance (see egt train)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--rechoose", help="re-apply the rule to the runs in this sweep JSON (no training)"
    )
    p.add_argument(
        "--from-runs",
        nargs="+",
        help="choose among finished full-length training folders (their best checkpoint's "
        "validation metrics) instead of training short runs",
    )
    args = p.parse_args(argv)
    lambdas = sorted(set([0.0, *args.lambdas]))
    results = json.loads(Path(args.rechoose).read_text())["runs"] if args.rechoose else []
    if args.from_runs:
        results = [_run_row(Path(d)) for d in args.from_runs]
    for lam in [] if args.rechoose or args.from_runs else lambdas:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                dataset=args.dataset,
                epochs=args.epochs,
                limit=args.limit,
                lam=lam,
                distance=args.distance,
                seed=args.seed,
                threads=args.threads,
                out=tmp,
            )
            s = train(cfg, progress=False)
        pearson = [c["pearson"] for c in s["val_consistency"]]
        row = {
            "lambda": lam,
            "val_accuracy": s["val_accuracy"],
            "val_pearson": pearson,
            "mean_val_pearson": sum(pearson) / len(pearson),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    base = next(r for r in results if r["lambda"] == 0.0)
    ok = [
        r
        for r in results
        if r["lambda"] > 0
        and r["val_accuracy"][-1] * 100 >= base["val_accuracy"][-1] * 100 - args.tolerance
    ]
    chosen = max(ok, key=lambda r: r["mean_val_pearson"]) if ok else None
    report = {
        "rule": f"highest mean val Pearson among lambdas within {args.tolerance} pt of lambda=0",
        "settings": vars(args),
        "runs": results,
        "chosen_lambda": chosen["lambda"] if chosen else None,
        "chosen_run": chosen.get("run") if chosen else None,
    }
    report["settings"]["lambdas"] = [r["lambda"] for r in results]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"chosen lambda: {report['chosen_lambda']}")
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(main())

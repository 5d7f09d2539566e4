"""The ``egt`` command line: ``egt train | eval | explain``.

Expected failures (bad data, bad checkpoint, bad image, bad flag) print one readable line and exit
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class CLIError(Exception):
    """An error whose message is the whole story for the user."""


def _friendly_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .data import DataError
    from .train import TrainingError

    errors: list[type[BaseException]] = [CLIError, CheckpointError, DataError, TrainingError]
    try:
        from .images import ImageLoadError

        errors.append(ImageLoadError)
    except ImportError:  # pragma: no cover - images module is optional for training
        pass
    return tuple(errors)


# ----------------------------------------------------------------------------- train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a baseline (lambda 0) or EGT model",
        description="Train a multi-exit network with per-exit cross-entropy plus lambda times the "
        "attention-consistency loss (lambda 0 = baseline).",
        epilog="example: egt train --dataset fashion-mnist --epochs 12 --lambda 1.0 "
        "--out runs/fmnist-egt",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="JSON or YAML file with TrainConfig fields; flags override it")
    p.add_argument("--dataset", help="fashion-mnist | shapes | imagefolder:PATH | medmnist:F.npz")
    p.add_argument("--data-dir", help="folder with the dataset's raw files (else $EGT_DATA)")
    p.add_argument("--download", action="store_true", default=None, help="allow downloading")
    p.add_argument("--arch", help="model family (small)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--seed", type=int)
    p.add_argument("--lambda", dest="lam", type=float, help="consistency weight (0 = baseline)")
    p.add_argument("--attention", choices=["cam", "activation", "gradcam"])
    p.add_argument("--distance", choices=["cosine", "mse"])
    p.add_argument("--exit-weights", type=float, nargs="+", help="cross-entropy weight per exit")
    p.add_argument(
        "--no-detach-final",
        dest="detach_final",
        action="store_false",
        default=None,
        help="let consistency gradients flow into the final exit's map",
    )
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None)
    p.add_argument("--limit", type=int, help="use only the first N training samples")
    p.add_argument("--val-limit", type=int, help="use only the first N validation samples")
    p.add_argument("--out", help="output folder (best/last checkpoints, train.jsonl)")
    p.add_argument("--resume", action="store_true", default=None, help="continue in --out")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    overrides = {
        k: v for k, v in vars(args).items() if k in fields and v is not None and k != "config"
    }
    cfg = (
        TrainConfig.from_file(args.config, **overrides) if args.config else TrainConfig(**overrides)
    )

    def report(s: dict) -> None:
        accs = " ".join(f"{a * 100:.2f}" for a in s["val_accuracy"])
        cons = " ".join(f"{c['pearson']:.3f}" for c in s["val_consistency"])
        print(
            f"epoch {s['epoch']}: loss {s['train_loss']:.4f}  val acc per exit [{accs}]  "
            f"pearson vs final [{cons}]  ({s['seconds']:.0f}s)",
            flush=True,
        )

    train(cfg, progress=not args.quiet, on_epoch=report)
    out = Path(cfg.out)
    print(f"checkpoints: {out / 'best.safetensors'} (best), {out / 'last.safetensors'} (last)")
    print(f"log: {out / 'train.jsonl'}")
    print(f"open it in the app: EGT_CHECKPOINTS={out} streamlit run app/streamlit_app.py")
    return 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egt",
        description="EGT Explorer: train, evaluate and explain early-exit networks with "
        "Explanation-Guided Training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,explain}")
    _add_train(sub)
    try:
        from .cli_eval import add_eval_and_explain
    except ImportError:
        pass
    else:
        add_eval_and_explain(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _friendly_errors() as e:
        print(f"egt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"egt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

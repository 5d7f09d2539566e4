"""The ``egt`` command line: ``egt train | eval | explain``.

Expected failures (bad data, bad checkpoint, bad image, bad flag) print one readable line and exit
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class CLIError(Exception):
    """An error whose message is the whole story for the user."""


def _friendly_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .data import DataError
    from .evaluate import EvaluationError
    from .train import TrainingError

    errors: list[type[BaseException]] = [
        CLIError,
        CheckpointError,
        DataError,
        TrainingError,
        EvaluationError,
    ]
    try:
        from .images import ImageLoadError

        errors.append(ImageLoadError)
    except ImportError:  # pragma: no cover - images module is optional for training
        pass
    return tuple(errors)


# ----------------------------------------------------------------------------- train

TRAIN_EXAMPLES = """examples:
  egt train --dataset fashion-mnist --epochs 12 --lambda 1.0 --out runs/fmnist-egt
  egt train --config run.yaml --lr 0.02          (flags override the file)
  egt train --out runs/fmnist-egt --lambda 1.0 --resume   (continue a killed run)
  egt train --dataset shapes --limit 256 --epochs 1 \\
      --model-options '{"widths": [4, 8, 8, 8], "head_widths": [4, 8]}'   (smoke run)"""


class _ConfigDefaults(argparse.RawDescriptionHelpFormatter):
    """Show `TrainConfig`'s defaults: the flags themselves default to None so that a --config
    file can fill in whatever the command line leaves out."""

    def _get_help_string(self, action: argparse.Action) -> str:
        from .train import TrainConfig

        text = action.help or ""
        field = TrainConfig.__dataclass_fields__.get(action.dest)
        if field is None or action.nargs == 0 or "default:" in text:
            return text
        if field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            value = field.default
        if value is None:
            return text
        shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        return f"{text} (default: {shown})".strip().replace("%", "%%")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a baseline (lambda 0) or EGT model",
        description="Train a multi-exit network with per-exit cross-entropy plus lambda times\n"
        "the attention-consistency loss (lambda 0 = baseline). Writes best.safetensors,\n"
        "last.safetensors, resume.safetensors and train.jsonl into --out.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=_ConfigDefaults,
    )
    p.add_argument("--config", help="JSON or YAML file with TrainConfig fields; flags override it")
    p.add_argument("--dataset", help="fashion-mnist | shapes | imagefolder:PATH | medmnist:F.npz")
    p.add_argument("--data-dir", help="folder with the dataset's raw files (else $EGT_DATA)")
    p.add_argument(
        "--download", action="store_true", default=None, help="allow downloading Fashion-MNIST"
    )
    p.add_argument("--arch", help="model family")
    p.add_argument(
        "--model-options",
        metavar="JSON",
        help="model family options as JSON, e.g. '{\"widths\": [16, 32, 64, 96]}'",
    )
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="optimizer")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--schedule", choices=["cosine", "constant"], help="learning-rate schedule")
    p.add_argument("--seed", type=int, help="seed for weights, data order and augmentation")
    p.add_argument(
        "--lambda",
        dest="lam",
        metavar="LAMBDA",
        type=float,
        help="consistency weight (0 = baseline)",
    )
    p.add_argument(
        "--attention", choices=["cam", "activation", "gradcam"], help="maps the loss compares"
    )
    p.add_argument(
        "--distance", choices=["cosine", "mse", "pearson"], help="map distance in the loss"
    )
    p.add_argument(
        "--exit-weights",
        type=float,
        nargs="+",
        help="cross-entropy weight per exit (default: 1 each)",
    )
    p.add_argument(
        "--no-detach-final",
        dest="detach_final",
        action="store_false",
        default=None,
        help="let consistency gradients flow into the final exit's map",
    )
    p.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=None,
        help="no random shift/flip augmentation",
    )
    p.add_argument("--limit", type=int, help="use only the first N training samples (default: all)")
    p.add_argument(
        "--val-limit", type=int, help="use only the first N validation samples (default: all)"
    )
    p.add_argument("--out", help="output folder (best/last checkpoints, train.jsonl)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the run in --out from its last finished epoch (same flags as before)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import BEST, LAST, LOG, TrainConfig, train

    fields = TrainConfig.__dataclass_fields__
    overrides = {
        k: v for k, v in vars(args).items() if k in fields and v is not None and k != "config"
    }
    if args.model_options is not None:
        try:
            options = json.loads(args.model_options)
        except json.JSONDecodeError as e:
            raise CLIError(f"--model-options is not valid JSON: {e}") from None
        if not isinstance(options, dict):
            raise CLIError("--model-options must be a JSON object, e.g. '{\"widths\": [8, 16]}'")
        overrides["model_options"] = options
    try:
        cfg = (
            TrainConfig.from_file(args.config, **overrides)
            if args.config
            else TrainConfig(**overrides)
        )
    except TypeError as e:  # pragma: no cover - flags and fields are kept in step
        raise CLIError(str(e)) from None

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
    app = Path(__file__).resolve().parent.parent / "app" / "streamlit_app.py"
    app_arg = app if app.is_file() else Path("app/streamlit_app.py")
    print(f"checkpoints: {out / BEST} (best), {out / LAST} (last)")
    print(f"log: {out / LOG}")
    print(f"open it in the app: EGT_CHECKPOINTS={out.resolve()} streamlit run {app_arg}")
    return 0


# ----------------------------------------------------------------------------- main


MAIN_EXAMPLES = """examples:
  egt train --dataset fashion-mnist --epochs 12 --lambda 1.0 --out runs/fmnist-egt
  egt eval --checkpoint runs/fmnist-egt/best.safetensors --limit 2000 --out report.json
  egt explain shoe.png --checkpoint runs/fmnist-egt/best.safetensors --out explanations/

Run `egt COMMAND --help` for each command's options and defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egt",
        description="EGT Explorer: train, evaluate and explain early-exit networks with "
        "Explanation-Guided Training.",
        epilog=MAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        print(f"egt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, permissions, a folder where a file should be...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"egt {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = " (continue with the same flags plus --resume)" if args.command == "train" else ""
        print(f"egt {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

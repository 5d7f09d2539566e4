"""Copy a training run's best checkpoint into checkpoints/ under a stable name.

The shipped file holds weights and metadata only (no optimizer state); its metadata names the
training log and the evaluation report that sit beside it (``<name>.train.jsonl``,
``<name>.report.json``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from egt_core.checkpoints import load_checkpoint, save_checkpoint
from egt_core.train import BEST, LOG


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", help="training output folder (has best.safetensors and train.jsonl)")
    p.add_argument("dest", help="e.g. checkpoints/fashion-mnist/egt.safetensors")
    args = p.parse_args(argv)
    run, dest = Path(args.run), Path(args.dest)
    model, meta = load_checkpoint(run / BEST)
    name = dest.name.removesuffix(".safetensors")
    meta["log"] = f"{name}.train.jsonl"
    meta["report"] = f"{name}.report.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / LOG, dest.parent / meta["log"])
    for key in ("arch", "model_config", "num_exits", "versions", "format_version"):
        meta.pop(key, None)
    save_checkpoint(dest, model, meta)
    print(f"shipped {run / BEST} -> {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FLOPs of every exit, segment and head, as fractions of the full path, with placement checks.

    python benchmarks/flops.py                       # build_model("small", 1, 10, input_size=28)
    python benchmarks/flops.py --input 3 64 64 --classes 8
    python benchmarks/flops.py --checkpoint runs/x/best.safetensors --json out/flops.json

The full path is the no-early-exit baseline: every segment plus the final head, no early heads.
"Answer at exit k" is what a sample answered at exit k costs in early-exit mode: segments 0..k plus
heads 0..k (every head on the way is paid). Counted with ``torch.utils.flop_counter`` (convs and
matmuls; BN, ReLU and pooling are not counted), batch 1.

Checks (SDN-style placement, see REFERENCE.md "Early-exit conventions"): the first early exit
costs at most 0.30 of the full path, and every head at most 0.05.
"""

from __future__ import annotations

import argparse

from _common import (
    DEFAULT_ARCH,
    DEFAULT_CLASSES,
    DEFAULT_INPUT,
    load_model,
    print_table,
    write_json,
)

from egt_core.models import exit_costs, flops_per_exit

FIRST_EXIT_MAX = 0.30
HEAD_MAX = 0.05


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default=DEFAULT_ARCH, help="model family (default: %(default)s)")
    p.add_argument(
        "--input",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        default=list(DEFAULT_INPUT),
        help="input shape (default: 1 28 28)",
    )
    p.add_argument("--classes", type=int, default=DEFAULT_CLASSES, help="number of classes")
    p.add_argument(
        "--checkpoint", help="count a checkpoint's model (overrides --arch/--input/--classes)"
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    model, shape, meta = load_model(args.checkpoint, args.arch, args.input, args.classes)
    costs = exit_costs(model, shape)
    cumulative = flops_per_exit(model, shape)
    full = costs.full_path
    source = (
        args.checkpoint
        or f"untrained build_model({model.arch!r}, {shape[0]}, {model.num_classes}, input_size={shape[1]})"
    )
    print(f"model: {source}")
    print(
        f"input: {shape[0]}x{shape[1]}x{shape[2]}, {model.num_exits} exits, full path {full / 1e6:.2f} MFLOPs"
    )
    print()

    print(
        "Answering at each exit (cumulative, every early head on the way included; the full path is"
        " the baseline: backbone + final head, no early heads):"
    )
    rows = []
    for k, flops in enumerate(cumulative):
        label = f"exit {k}" if k < model.num_exits - 1 else f"exit {k} (full path)"
        rows.append([label, f"{flops / 1e6:.2f}", f"{flops / full:.3f}"])
    # What answering at the final exit costs in early-exit mode (every early head was paid).
    last = model.num_exits - 1
    rows.append(
        [
            f"exit {last} via early-exit mode",
            f"{costs.answer_at(last) / 1e6:.2f}",
            f"{costs.answer_at(last) / full:.3f}",
        ]
    )
    print_table(["", "MFLOPs", "of full"], rows)
    print()

    print("Components:")
    rows = []
    for k, (seg, head) in enumerate(zip(costs.segments, costs.heads, strict=True)):
        rows.append([f"segment {k}", f"{seg / 1e6:.3f}", f"{seg / full:.3f}"])
        rows.append([f"head {k}", f"{head / 1e6:.3f}", f"{head / full:.3f}"])
    print_table(["", "MFLOPs", "of full"], rows)
    print()

    first = cumulative[0] / full
    checks = [
        {
            "name": f"first early exit <= {FIRST_EXIT_MAX:.2f} of the full path",
            "value": first,
            "pass": first <= FIRST_EXIT_MAX,
        }
    ]
    for k, head in enumerate(costs.heads):
        checks.append(
            {
                "name": f"head {k} <= {HEAD_MAX:.2f} of the full path",
                "value": head / full,
                "pass": head / full <= HEAD_MAX,
            }
        )
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {c['value']:.3f}")

    write_json(
        args.json,
        {
            "benchmark": "flops",
            "model": source,
            "input": list(shape),
            "full_path": full,
            "segments": costs.segments,
            "heads": costs.heads,
            "answer_at": cumulative[:-1] + [costs.answer_at(last)],
            "flops_per_exit": cumulative,
            "fractions": {
                "per_exit": [f / full for f in cumulative],
                "segments": [s / full for s in costs.segments],
                "heads": [h / full for h in costs.heads],
            },
            "checks": checks,
            "dataset": meta.get("dataset"),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

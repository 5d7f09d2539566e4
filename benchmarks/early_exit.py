"""Measured early-exit speedup vs the full path, beside the FLOP-ideal speedup.

    python benchmarks/early_exit.py --checkpoint runs/x/best.safetensors
    python benchmarks/early_exit.py --checkpoint C --threshold 0.9 0.99 --repeats 7 --threads 1 \\
        --json out/early_exit.json

For every threshold, on the checkpoint's test images (first ``--limit`` for batch 1, first
``--batched-limit`` for batch ``--batch-size``): early exit (``predict(model, x, t)``) and the full
path (``predict(model, x, 2.0)``: backbone and final head only) run on the SAME images in one run,
alternating, ``--repeats`` times; the median per-sample time is kept (`measured_speedup`). Both
sides use the BN-fused model (`fuse_for_inference`); batched early exit uses compaction.

Printed per threshold: accuracy of early exit vs the final exit's, exit mix, FLOP-ideal speedup
(full-path FLOPs / expected FLOPs under the mix), batch-1 latency and batched throughput of both
sides with their ratio, and measured / FLOP-ideal. Then a batch-1 latency table of every segment
and head beside its FLOPs (`component_latency`, `exit_costs`): at batch 1, per-call overhead, not
FLOPs, often decides the speedup.
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    load_model,
    load_test_images,
    print_environment,
    print_table,
    set_threads,
    write_json,
)

from egt_core.evaluate import component_latency, measured_speedup
from egt_core.inference import exit_mix, expected_flops, flop_ideal_speedup, predict
from egt_core.models import exit_costs, fuse_for_inference

DEFAULT_THRESHOLDS = (0.9, 0.95, 0.99, 0.995, 0.999)
FULL = 2.0  # any threshold > 1 runs the full path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint")
    p.add_argument("--dataset", help="dataset spec (default: the one named in the checkpoint)")
    p.add_argument(
        "--limit",
        type=int,
        default=1000,
        help="test images timed at batch 1 (default: %(default)s)",
    )
    p.add_argument(
        "--batched-limit",
        type=int,
        default=2048,
        help="test images timed batched and used for accuracy / exit mix (default: %(default)s)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        default=list(DEFAULT_THRESHOLDS),
        help="max-softmax thresholds",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="batched size (default: %(default)s)"
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="alternating repeats per side (default: %(default)s)"
    )
    p.add_argument("--component-repeats", type=int, default=200, help="calls per component latency")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    threads = set_threads(args.threads)
    model, shape, meta = load_model(args.checkpoint)
    images, labels, spec = load_test_images(meta, args.dataset, max(args.limit, args.batched_limit))
    one = images[: args.limit]
    many, many_labels = images[: args.batched_limit], labels[: args.batched_limit]
    fused = fuse_for_inference(model)
    costs = exit_costs(model, shape)
    E = model.num_exits

    print(f"checkpoint: {args.checkpoint}  dataset: {spec} (test split)")
    print_environment(threads)
    print(
        f"batch 1: {len(one)} images; batch {args.batch_size}: {len(many)} images; "
        f"{args.repeats} alternating repeats, medians; BN-fused model on both sides"
    )

    # Final-exit accuracy: the full path's answer on the same images.
    full_pred = predict(fused, many, FULL).prediction
    final_acc = float((full_pred == many_labels).float().mean())
    print(f"final-exit accuracy (full path): {final_acc:.4f} on {len(many)} images")
    print()

    # Warm-up (allocator, oneDNN primitives) for both sides and both batch sizes.
    for t in (args.threshold[0], FULL):
        for x in one[:20].split(1):
            predict(fused, x, t)
        predict(fused, many[: args.batch_size], t)

    rows = []
    for t in args.threshold:
        batched = predict(fused, many, t)
        pred, mix = batched.prediction, exit_mix(batched, E)
        # Decisions at batch 1 (the timed images) must equal the batched ones (compaction).
        exits1 = torch.cat([predict(fused, x, t).exit_index for x in one.split(1)])
        same = bool(torch.equal(exits1, predict(fused, one, t).exit_index))
        mix1 = torch.bincount(exits1, minlength=E).tolist()
        b1 = measured_speedup(fused, one, t, batch_size=1, repeats=args.repeats)
        bb = measured_speedup(fused, many, t, batch_size=args.batch_size, repeats=args.repeats)
        ideal, ideal1 = flop_ideal_speedup(mix, costs, t), flop_ideal_speedup(mix1, costs, t)
        rows.append(
            {
                "threshold": t,
                "accuracy": float((pred == many_labels).float().mean()),
                "final_accuracy": final_acc,
                "exit_mix": mix,
                "exit_fraction": [m / len(many) for m in mix],
                "flop_fraction": expected_flops(mix, costs, t) / costs.full_path,
                "flop_ideal_speedup": ideal,
                "batch1": {
                    **b1,
                    "exit_mix": mix1,
                    "flop_ideal_speedup": ideal1,
                    "vs_flop_ideal": b1["speedup"] / ideal1,
                },
                "batched": {
                    **bb,
                    "batch_size": args.batch_size,
                    "early_per_s": 1e3 / bb["early_ms"],
                    "full_per_s": 1e3 / bb["full_ms"],
                    "vs_flop_ideal": bb["speedup"] / ideal,
                },
                "batch1_decisions_equal_batched": same,
            }
        )

    print(f"Accuracy and exit mix ({len(many)} images); final exit {final_acc:.4f}:")
    print_table(
        [
            "threshold",
            "accuracy",
            "vs final",
            "exit mix (fractions)",
            "FLOPs of full",
            "FLOP-ideal",
        ],
        [
            [
                r["threshold"],
                f"{r['accuracy']:.4f}",
                f"{r['accuracy'] - final_acc:+.4f}",
                " / ".join(f"{f:.2f}" for f in r["exit_fraction"]),
                f"{r['flop_fraction']:.3f}",
                f"{r['flop_ideal_speedup']:.2f}x",
            ]
            for r in rows
        ],
    )
    print()
    print(f"Batch 1 ({len(one)} images; per-sample latency, median of {args.repeats}):")
    print_table(
        [
            "threshold",
            "early ms",
            "full ms",
            "speedup",
            "FLOP-ideal",
            "meas/ideal",
            "same as batched",
        ],
        [
            [
                r["threshold"],
                f"{r['batch1']['early_ms']:.3f}",
                f"{r['batch1']['full_ms']:.3f}",
                f"{r['batch1']['speedup']:.2f}x",
                f"{r['batch1']['flop_ideal_speedup']:.2f}x",
                f"{r['batch1']['vs_flop_ideal']:.2f}",
                "yes" if r["batch1_decisions_equal_batched"] else "NO",
            ]
            for r in rows
        ],
    )
    print()
    print(
        f"Batch {args.batch_size} with compaction ({len(many)} images; throughput, median of {args.repeats}):"
    )
    print_table(
        ["threshold", "early img/s", "full img/s", "speedup", "FLOP-ideal", "meas/ideal"],
        [
            [
                r["threshold"],
                f"{r['batched']['early_per_s']:.0f}",
                f"{r['batched']['full_per_s']:.0f}",
                f"{r['batched']['speedup']:.2f}x",
                f"{r['flop_ideal_speedup']:.2f}x",
                f"{r['batched']['vs_flop_ideal']:.2f}",
            ]
            for r in rows
        ],
    )
    print()

    lat = component_latency(fused, one[:1], repeats=args.component_repeats)
    full_ms = sum(lat["segments_ms"]) + lat["heads_ms"][-1]
    comp_rows, components = [], []
    for k in range(E):
        for kind, flops, ms in (
            ("segment", costs.segments[k], lat["segments_ms"][k]),
            ("head", costs.heads[k], lat["heads_ms"][k]),
        ):
            components.append({"component": f"{kind} {k}", "flops": flops, "ms": ms})
            comp_rows.append(
                [
                    f"{kind} {k}",
                    f"{flops / 1e6:.3f}",
                    f"{flops / costs.full_path:.3f}",
                    f"{ms:.4f}",
                    f"{ms / full_ms:.3f}",
                ]
            )
    answer_ms = [sum(lat["segments_ms"][: k + 1]) + sum(lat["heads_ms"][: k + 1]) for k in range(E)]
    for k in range(E - 1):
        comp_rows.append(
            [
                f"answer at exit {k}",
                f"{costs.answer_at(k) / 1e6:.3f}",
                f"{costs.answer_at(k) / costs.full_path:.3f}",
                f"{answer_ms[k]:.4f}",
                f"{answer_ms[k] / full_ms:.3f}",
            ]
        )
    comp_rows.append(
        ["full path", f"{costs.full_path / 1e6:.3f}", "1.000", f"{full_ms:.4f}", "1.000"]
    )
    print(f"Batch-1 component latency (median of {args.component_repeats} calls) beside FLOPs:")
    print_table(["component", "MFLOPs", "of full", "ms", "of full"], comp_rows)
    print(
        "(if a component's latency share is well above its FLOP share, per-call overhead, not "
        "FLOPs, limits the batch-1 speedup)"
    )
    print()
    print("Batch-1 speedup predicted from component latencies and the exit mix (no overlap):")
    for r in rows:
        mix1 = r["batch1"]["exit_mix"]
        expected_ms = sum(m * answer_ms[k] for k, m in enumerate(mix1)) / max(1, sum(mix1))
        r["batch1"]["component_predicted_speedup"] = full_ms / expected_ms
        print(
            f"  threshold {r['threshold']}: predicted {full_ms / expected_ms:.2f}x, "
            f"measured {r['batch1']['speedup']:.2f}x, FLOP-ideal {r['batch1']['flop_ideal_speedup']:.2f}x"
        )

    write_json(
        args.json,
        {
            "benchmark": "early_exit",
            "checkpoint": args.checkpoint,
            "dataset": spec,
            "torch_threads": threads,
            "batch1_images": len(one),
            "batched_images": len(many),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "final_accuracy": final_acc,
            "flops": {
                "segments": costs.segments,
                "heads": costs.heads,
                "full_path": costs.full_path,
            },
            "component_latency_batch1": {**lat, "full_path_ms": full_ms, "components": components},
            "thresholds": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step cost of the EGT consistency term: lambda = 0 vs lambda > 0, per attention kind.

    python benchmarks/train_overhead.py                        # random 1x28x28 tensors, no data
    python benchmarks/train_overhead.py --dataset fashion-mnist --steps 20 --repeats 5 --threads 2
    python benchmarks/train_overhead.py --json out/train_overhead.json

One timed run = ``--steps`` training steps (forward, `egt_loss`, zero_grad, backward, SGD step, as
in `egt_core.train`) over a fixed list of batches held in memory (no data loading, no
augmentation), starting from the same initial weights and optimizer state every time. For each
attention kind (cam, activation, gradcam) the lambda = 0 run and the lambda > 0 run alternate
(order flipped every repeat) ``--repeats`` times; the median seconds per step is reported with its
ratio to that kind's own interleaved lambda = 0 baseline. Targets: <= 1.10x for cam and activation
(forward-only maps). gradcam needs double backprop (``create_graph=True``) and is expected to cost
much more.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _common import median, print_environment, print_table, set_threads, write_json

from egt_core.attention import ATTENTION_KINDS
from egt_core.losses import EGTLossConfig, egt_loss
from egt_core.models import MultiExitNet, build_model
from egt_core.train import TrainConfig, make_optimizer

CHEAP_TARGET = 1.10
CHEAP_KINDS = ("cam", "activation")


def fixed_batches(dataset: str, steps: int, batch_size: int, seed: int) -> tuple[list, int, int, int]:
    """``steps`` batches ``(x, y)`` plus (channels, input size, classes)."""
    g = torch.Generator().manual_seed(seed)
    if dataset == "random":
        channels, size, classes = 1, 28, 10
        xs = torch.randn(steps * batch_size, channels, size, size, generator=g)
        ys = torch.randint(0, classes, (steps * batch_size,), generator=g)
    else:
        from torch.utils.data import DataLoader

        from egt_core.data import limit, load_dataset

        data = load_dataset(dataset, seed=seed, augment=False)
        n = steps * batch_size
        if n > len(data.train):
            raise SystemExit(f"--steps x --batch-size = {n} exceeds the {len(data.train)} training images")
        x_list, y_list = zip(*DataLoader(limit(data.train, n), batch_size=512), strict=True)
        xs, ys = torch.cat(x_list), torch.cat(y_list)
        channels, size, classes = data.in_channels, data.input_size, len(data.classes)
    batches = list(zip(xs.split(batch_size), ys.split(batch_size), strict=True))
    return batches, channels, size, classes


def run(init: MultiExitNet, batches: list, loss_cfg: EGTLossConfig) -> float:
    """Seconds per step for one pass over ``batches`` from the initial weights."""
    model = copy.deepcopy(init).train()
    opt = make_optimizer(TrainConfig(), model)
    t0 = time.perf_counter()
    for x, y in batches:
        terms = egt_loss(model(x), y, loss_cfg)
        opt.zero_grad(set_to_none=True)
        terms.total.backward()
        opt.step()
    return (time.perf_counter() - t0) / len(batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset",
        default="random",
        help="random (1x28x28 tensors, 10 classes) | fashion-mnist | shapes | any egt spec (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=20, help="training steps per timed run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side and kind (default: %(default)s)")
    p.add_argument("--lam", type=float, default=1.0, help="lambda of the EGT side (default: %(default)s)")
    p.add_argument("--kinds", nargs="+", default=list(ATTENTION_KINDS), choices=ATTENTION_KINDS)
    p.add_argument("--arch", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.lam <= 0:
        raise SystemExit("--lam must be > 0 (the baseline side is lambda = 0)")

    threads = set_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as egt_core.train does
    batches, channels, size, classes = fixed_batches(args.dataset, args.steps, args.batch_size, args.seed)
    torch.manual_seed(args.seed)
    init = build_model(args.arch, channels, classes, input_size=size)

    print(f"data: {args.dataset} ({channels}x{size}x{size}, {classes} classes), {args.steps} fixed batches of {args.batch_size}")
    print_environment(threads)
    print(f"{args.repeats} alternating runs per side and kind, medians of seconds per step; lambda = {args.lam}")

    run(init, batches[:2], EGTLossConfig(lam=0.0))  # warm-up
    results = []
    for kind in args.kinds:
        base_cfg = EGTLossConfig(lam=0.0, attention=kind)
        egt_cfg = EGTLossConfig(lam=args.lam, attention=kind)
        run(init, batches[:1], egt_cfg)  # warm-up of this kind's code path
        base, egt = [], []
        for r in range(args.repeats):
            if r % 2 == 0:
                base.append(run(init, batches, base_cfg))
                egt.append(run(init, batches, egt_cfg))
            else:
                egt.append(run(init, batches, egt_cfg))
                base.append(run(init, batches, base_cfg))
        b, e = median(base), median(egt)
        target = CHEAP_TARGET if kind in CHEAP_KINDS else None
        results.append(
            {
                "attention": kind,
                "lambda0_s_per_step": b,
                "egt_s_per_step": e,
                "ratio": e / b,
                "target": target,
                "meets_target": None if target is None else e / b <= target,
                "lambda0_runs": base,
                "egt_runs": egt,
            }
        )
        print(f"  {kind}: done ({e / b:.2f}x)", flush=True)

    print()
    print_table(
        ["attention", "lambda=0 s/step", f"lambda={args.lam:g} s/step", "ratio", "target", "result"],
        [
            [
                r["attention"],
                f"{r['lambda0_s_per_step']:.4f}",
                f"{r['egt_s_per_step']:.4f}",
                f"{r['ratio']:.2f}x",
                f"<= {r['target']:.2f}x" if r["target"] else "none (double backprop)",
                "-" if r["target"] is None else ("PASS" if r["meets_target"] else "FAIL"),
            ]
            for r in results
        ],
    )
    write_json(
        args.json,
        {
            "benchmark": "train_overhead",
            "dataset": args.dataset,
            "input": [channels, size, size],
            "classes": classes,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "lambda": args.lam,
            "torch_threads": threads,
            "results": results,
        },
        seed=args.seed,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

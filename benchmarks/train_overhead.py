"""Training-step cost of the EGT consistency term: lambda = 0 vs lambda > 0, per attention kind.

    python benchmarks/train_overhead.py                        # random 1x28x28 tensors, no data
    python benchmarks/train_overhead.py --dataset fashion-mnist --steps 20 --repeats 5 --threads 2
    python benchmarks/train_overhead.py --json out/train_overhead.json

One training step = forward, `egt_loss`, zero_grad, backward, SGD step (as in `egt_core.train`),
over a fixed list of ``--steps`` batches held in memory (no data loading, no augmentation). For
each attention kind (cam, activation, gradcam), a repeat starts two trainers from the same initial
weights and optimizer state, one with lambda = 0 and one with lambda > 0, and steps them through
the same batches alternately (the side going first flips every step). The median seconds per step
over all ``--steps`` x ``--repeats`` steps is reported, with its ratio to that kind's own
interleaved lambda = 0 baseline. Targets: <= 1.10x for cam and activation (forward-only maps).
gradcam uses double backprop (``create_graph=True``); it has no target. (With this model's heads,
GAP + linear, that second backward only runs through the head, so it may turn out cheap.)
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


def fixed_batches(
    dataset: str, steps: int, batch_size: int, seed: int
) -> tuple[list, int, int, int]:
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
            raise SystemExit(
                f"--steps x --batch-size = {n} exceeds the {len(data.train)} training images"
            )
        x_list, y_list = zip(*DataLoader(limit(data.train, n), batch_size=512), strict=True)
        xs, ys = torch.cat(x_list), torch.cat(y_list)
        channels, size, classes = data.in_channels, data.input_size, len(data.classes)
    batches = list(zip(xs.split(batch_size), ys.split(batch_size), strict=True))
    return batches, channels, size, classes


class Trainer:
    """One model + optimizer from the shared initial weights, stepping with one loss config."""

    def __init__(self, init: MultiExitNet, loss_cfg: EGTLossConfig) -> None:
        self.model = copy.deepcopy(init).train()
        self.opt = make_optimizer(TrainConfig(), self.model)
        self.loss_cfg = loss_cfg

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step (as in `egt_core.train`); returns its wall seconds."""
        t0 = time.perf_counter()
        terms = egt_loss(self.model(x), y, self.loss_cfg)
        self.opt.zero_grad(set_to_none=True)
        terms.total.backward()
        self.opt.step()
        return time.perf_counter() - t0


def compare(
    init: MultiExitNet, batches: list, base_cfg: EGTLossConfig, egt_cfg: EGTLossConfig, repeats: int
) -> tuple[list[float], list[float]]:
    """Per-step seconds of both sides; each repeat starts both from ``init`` and alternates them
    step by step (the side going first flips every step), so drift hits both alike."""
    base, egt = [], []
    for r in range(repeats):
        sides = [(Trainer(init, base_cfg), base), (Trainer(init, egt_cfg), egt)]
        sides[0][0].step(*batches[0])  # warm-up step, not timed
        sides[1][0].step(*batches[0])
        for i, (x, y) in enumerate(batches):
            for trainer, times in sides if (i + r) % 2 == 0 else sides[::-1]:
                times.append(trainer.step(x, y))
    return base, egt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dataset",
        default="random",
        help="random (1x28x28 tensors, 10 classes) | fashion-mnist | shapes | any egt spec (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="fixed batches = timed steps per side and repeat (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="passes over the batches per kind, from the initial weights (default: %(default)s)",
    )
    p.add_argument(
        "--lam", type=float, default=1.0, help="lambda of the EGT side (default: %(default)s)"
    )
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
    batches, channels, size, classes = fixed_batches(
        args.dataset, args.steps, args.batch_size, args.seed
    )
    torch.manual_seed(args.seed)
    init = build_model(args.arch, channels, classes, input_size=size)

    print(
        f"data: {args.dataset} ({channels}x{size}x{size}, {classes} classes), {args.steps} fixed batches of {args.batch_size}"
    )
    print_environment(threads)
    print(
        f"{args.repeats} repeats x {args.steps} steps per side and kind, alternating step by step; "
        f"medians of seconds per step; lambda = {args.lam}"
    )

    results = []
    for kind in args.kinds:
        base_cfg = EGTLossConfig(lam=0.0, attention=kind)
        egt_cfg = EGTLossConfig(lam=args.lam, attention=kind)
        base, egt = compare(init, batches, base_cfg, egt_cfg, args.repeats)
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
                "lambda0_steps_s": base,
                "egt_steps_s": egt,
            }
        )
        print(f"  {kind}: done ({e / b:.2f}x)", flush=True)

    print()
    print_table(
        [
            "attention",
            "lambda=0 s/step",
            f"lambda={args.lam:g} s/step",
            "ratio",
            "target",
            "result",
        ],
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

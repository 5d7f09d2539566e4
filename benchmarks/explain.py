"""Cost of explaining one image at every exit: our `explain()` vs plain grad-cam, one call per exit.

    python benchmarks/explain.py                                   # untrained small model, 1x28x28
    python benchmarks/explain.py --checkpoint runs/x/best.safetensors --repeats 50 --threads 1
    python benchmarks/explain.py --json out/explain.json

The baseline is what a user without EGT would write: for every exit k, a fresh
``pytorch_grad_cam.GradCAM(model=ExitSelector(model, k), target_layers=[model.cam_layers()[k]])``
used as a context manager and called on the image (model as loaded: parameters require grad, so
the package's backward also computes weight gradients). The class explained is the final exit's
prediction, computed once outside the timing (which favours the baseline).

(a) ``explain(model, x, "cam")``: the trained CAMs of all exits from one forward pass, vs the
    baseline. Target >= 10x faster.
(b) ``explain(model, x, "gradcam")`` vs the baseline: does our Grad-CAM share one forward pass?
    Target >= 2x. Also timed: a shared-forward Grad-CAM prototype that lives in this file only
    (one forward of the full model, one ``autograd.grad`` per exit from its logit to its CAM
    layer), with its agreement with grad-cam's maps, to show what sharing would give.

Sides alternate (order flipped every repeat) after a warm-up; medians of ``--repeats``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    alternate,
    load_model,
    load_test_images,
    median,
    print_environment,
    print_table,
    set_threads,
    write_json,
)
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor

from egt_core.attention import normalize_maps
from egt_core.explain import explain
from egt_core.models import ExitSelector, MultiExitNet, exit_costs

CAM_TARGET = 10.0
SHARING_TARGET = 2.0


def gradcam_per_exit(model: MultiExitNet, x: Tensor, classes: Tensor) -> Tensor:
    """The baseline: one GradCAM object and call per exit, as a user of grad-cam alone would."""
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    layers = model.cam_layers()
    maps = []
    for k in range(model.num_exits):
        with GradCAM(model=ExitSelector(model, k), target_layers=[layers[k]]) as cam:
            maps.append(torch.from_numpy(np.asarray(cam(input_tensor=x, targets=targets))))
    model.zero_grad(set_to_none=True)  # do not let weight gradients pile up between repeats
    return torch.stack(maps, 1)


def shared_forward_gradcam(model: MultiExitNet, x: Tensor, classes: Tensor) -> Tensor:
    """Prototype (not in egt_core): Grad-CAM of every exit from ONE forward pass.

    Each exit's gradient of its class logit w.r.t. its own CAM layer only runs back through that
    head's pooling and linear layer (`torch.autograd.grad`), not through the backbone, and no
    weight gradients are computed. Post-processing mirrors grad-cam: ReLU, min-max per map at the
    feature resolution, bilinear resize to the input, min-max again.
    """
    model.eval()
    with torch.enable_grad():
        outputs = model(x)
        maps = []
        for out in outputs:
            score = out.logits.gather(1, classes[:, None]).sum()
            (grad,) = torch.autograd.grad(score, out.features, retain_graph=True)
            cam = F.relu((grad.mean((2, 3), keepdim=True) * out.features).sum(1, keepdim=True))
            cam = normalize_maps(cam.detach())
            maps.append(F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False))
    return normalize_maps(torch.cat(maps, 1))  # grad-cam min-maxes again after resizing


def agreement(a: Tensor, b: Tensor) -> list[dict[str, float | None]]:
    """Per exit: max |a - b| and Pearson correlation of two (1, E, H, W) map stacks."""
    rows = []
    for k in range(a.shape[1]):
        u, v = a[0, k].flatten().double(), b[0, k].flatten().double()
        constant = bool(u.std() == 0 or v.std() == 0)  # e.g. an all-zero map: no correlation
        corr = None if constant else float(torch.corrcoef(torch.stack([u, v]))[0, 1])
        rows.append({"max_abs_diff": float((u - v).abs().max()), "pearson": corr})
    return rows


def _pearson(row: dict[str, float | None]) -> str:
    return "const" if row["pearson"] is None else f"{row['pearson']:.4f}"


def flop_ceiling(model: MultiExitNet, shape: tuple[int, int, int]) -> float:
    """FLOP estimate of baseline / explain(cam): per exit, a forward to that exit plus a backward
    (about 2x its forward, weight gradients included), over one forward through every exit."""
    costs = exit_costs(model, shape)
    alone = [sum(costs.segments[: k + 1]) + costs.heads[k] for k in range(model.num_exits)]
    return 3 * sum(alone) / costs.answer_at(model.num_exits - 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        help="a .safetensors checkpoint (default: untrained small 1x28x28, 10 classes)",
    )
    p.add_argument(
        "--dataset", help="dataset for the image (default: the checkpoint's; random if none)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=20,
        help="alternating repeats per side (default: %(default)s)",
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    threads = set_threads(args.threads)
    model, shape, meta = load_model(args.checkpoint)
    if args.checkpoint or args.dataset:
        images, _, spec = load_test_images(meta, args.dataset, 1)
        x, image_source = images[:1], f"first test image of {spec}"
    else:
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
        image_source = "random normal tensor"
    with torch.no_grad():
        classes = model.eval().full_path(x).argmax(1)
    E = model.num_exits

    print(f"model: {args.checkpoint or 'untrained build_model(small, 1, 10, input_size=28)'}")
    print(
        f"image: {image_source}, {shape[0]}x{shape[1]}x{shape[2]}; {E} exits; explained class {int(classes[0])}"
    )
    print_environment(threads)
    print(f"{args.repeats} alternating repeats per side after a warm-up; medians")
    print()

    sides = {
        "grad-cam, one call per exit": lambda: gradcam_per_exit(model, x, classes),
        'explain(model, x, "cam")': lambda: explain(model, x, "cam"),
        'explain(model, x, "gradcam")': lambda: explain(model, x, "gradcam"),
        "shared-forward Grad-CAM (prototype)": lambda: shared_forward_gradcam(model, x, classes),
    }
    times = alternate(sides, args.repeats, warmup=2)
    ms = {name: median(ts) * 1e3 for name, ts in times.items()}
    base = ms["grad-cam, one call per exit"]

    print_table(
        ["all exits, one image", "median ms", "baseline / this"],
        [[name, f"{v:.3f}", f"{base / v:.2f}x"] for name, v in ms.items()],
    )
    print()

    # Are the maps the same maps? (CAM equals Grad-CAM up to a positive factor for our heads.)
    reference = gradcam_per_exit(model, x, classes)
    agree = {
        "cam": agreement(explain(model, x, "cam").maps, reference),
        "gradcam": agreement(explain(model, x, "gradcam").maps, reference),
        "prototype": agreement(shared_forward_gradcam(model, x, classes), reference),
    }
    print("Agreement with grad-cam's maps per exit (Pearson / max |diff| on [0, 1] maps):")
    print_table(
        ["maps"] + [f"exit {k}" for k in range(E)],
        [
            [name] + [f"{_pearson(r)} / {r['max_abs_diff']:.3f}" for r in rows]
            for name, rows in agree.items()
        ],
    )
    print()

    cam_speedup = base / ms['explain(model, x, "cam")']
    sharing = base / ms['explain(model, x, "gradcam")']
    proto = base / ms["shared-forward Grad-CAM (prototype)"]
    print(
        f"{'PASS' if cam_speedup >= CAM_TARGET else 'FAIL'}  (a) trained CAMs vs grad-cam per exit: "
        f"{cam_speedup:.1f}x faster (target >= {CAM_TARGET:.0f}x)"
    )
    ceiling = flop_ceiling(model, shape)
    print(
        f"      FLOP estimate of this ratio's ceiling for {E} exits: ~{ceiling:.1f}x (grad-cam pays "
        "a forward to each exit plus a backward; the trained CAMs one forward)"
    )
    print(
        f"{'PASS' if sharing >= SHARING_TARGET else 'FAIL'}  (b) explain(gradcam) vs grad-cam per exit: "
        f"{sharing:.2f}x (target >= {SHARING_TARGET:.0f}x)"
    )
    if sharing < 1.5:
        print(
            "      explain(..., 'gradcam') does NOT share a forward pass: it runs one grad-cam object "
            f"(forward + full backward) per exit plus one extra forward, so it costs about what {E} "
            "separate grad-cam calls cost."
        )
    print(
        f"      the shared-forward prototype in this file would give {proto:.1f}x on this machine."
    )

    write_json(
        args.json,
        {
            "benchmark": "explain",
            "model": args.checkpoint or "untrained small 1x28x28",
            "image": image_source,
            "num_exits": E,
            "repeats": args.repeats,
            "torch_threads": threads,
            "median_ms": ms,
            "runs_s": times,
            "cam_vs_gradcam_per_exit": cam_speedup,
            "cam_ratio_flop_ceiling": ceiling,
            "explain_gradcam_vs_gradcam_per_exit": sharing,
            "prototype_shared_forward_vs_gradcam_per_exit": proto,
            "agreement_with_gradcam": agree,
            "targets": {"cam": CAM_TARGET, "sharing": SHARING_TARGET},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

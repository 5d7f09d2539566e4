"""Upload-to-maps latency of the app's compute step, on the shipped checkpoints.

    python benchmarks/app_latency.py [--pair fashion-mnist] [--method cam] [--repeats 20]

Times what the app does for one uploaded image (`app.logic.analyse_image`: decode, explain every
exit of both models, score consistency) plus the threshold decision for both models. Prints the
median and best over distinct images. The app's goal: well under 1 s for the 28 px models.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import logic  # noqa: E402


def png(seed: int, size: int, mode: str) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", default=str(ROOT / "checkpoints"))
    p.add_argument("--pair", default="fashion-mnist")
    p.add_argument("--method", default="cam")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.9)
    args = p.parse_args()
    threads = logic.use_app_threads()
    group = next(g for g in logic.discover(args.root).groups if g.folder == args.pair and g.is_pair)
    models = [(e, logic.load_bundle(e.path)) for e in group.models]
    meta = models[0][1].meta
    mode = "L" if meta["in_channels"] == 1 else "RGB"
    logic.analyse_image(png(-1 % 97, 96, mode), models, name="warm-up", method=args.method)
    times = []
    for seed in range(args.repeats):
        data = png(seed, 96, mode)
        t0 = time.perf_counter()
        a = logic.analyse_image(data, models, name="x.png", method=args.method)
        for (_, bundle), m in zip(models, a.models, strict=True):
            logic.decide(bundle, m.tensor, args.threshold)
        times.append(time.perf_counter() - t0)
    print(
        f"{args.pair} ({meta['input_size']} px, {len(models)} models, method {args.method}, "
        f"{threads} torch thread(s)): upload to maps median {statistics.median(times) * 1e3:.1f} ms,"
        f" best {min(times) * 1e3:.1f} ms over {args.repeats} distinct images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

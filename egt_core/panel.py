"""One picture per image: the input and every exit's map, scores in the titles (CLI and app)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from .explain import overlay


def render_panel(
    display: np.ndarray,
    maps: np.ndarray,
    exit_labels: Sequence[str],
    title: str = "",
    answering_exit: int | None = None,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> bytes:
    """PNG bytes: input, then one overlay per exit (the final exit last), for one image.

    ``display`` is ``(H, W, 3)`` in [0, 1]; ``maps`` is ``(E, H, W)`` in [0, 1]; ``exit_labels``
    holds one multi-line caption per exit (prediction, confidence, scores).
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or len(maps) < 1:
        raise ValueError(f"maps must be (exits, H, W), got shape {maps.shape}")
    if len(exit_labels) != len(maps):
        raise ValueError(f"{len(exit_labels)} exit labels for {len(maps)} maps")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    n = len(maps) + 1
    fig = Figure(figsize=(2.6 * n, 3.3), dpi=110)
    axes = fig.subplots(1, n)
    axes[0].imshow(display, interpolation="nearest")
    axes[0].set_title("input (as the model sees it)", fontsize=8)
    for e, (ax, heat) in enumerate(zip(axes[1:], maps, strict=True)):
        ax.imshow(overlay(display, heat, alpha, colormap), interpolation="bilinear")
        answers = e == answering_exit
        ax.set_title(
            exit_labels[e] + ("\n<< answers here" if answers else ""),
            fontsize=7,
            color="#b00020" if answers else "black",
        )
        if answers:
            for spine in ax.spines.values():
                spine.set_edgecolor("#b00020")
                spine.set_linewidth(3)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

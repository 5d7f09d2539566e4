"""The per-image panel: a PNG with the input and one overlay per exit."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from egt_core.panel import render_panel


def decode(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    return img


def inputs(exits: int = 3, size: int = 28):
    rng = np.random.default_rng(0)
    display = rng.random((size, size, 3), dtype=np.float32)
    maps = rng.random((exits, size, size), dtype=np.float32)
    labels = [f"exit {e + 1}\nclass {e} 0.{e + 5}" for e in range(exits)]
    return display, maps, labels


def test_panel_is_a_png_with_one_column_per_exit_plus_input():
    display, maps, labels = inputs(3)
    three = decode(render_panel(display, maps, labels, title="shoe.png", answering_exit=1))
    display2, maps2, labels2 = inputs(2)
    two = decode(render_panel(display2, maps2, labels2))
    assert three.width > two.width > three.height / 2
    assert three.height == two.height
    # Not blank: the overlays carry colour.
    pixels = np.asarray(three.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10


def test_answering_exit_is_marked():
    display, maps, labels = inputs(3)
    plain = render_panel(display, maps, labels, answering_exit=None)
    marked = render_panel(display, maps, labels, answering_exit=0)
    assert plain != marked
    red = np.asarray(decode(marked).convert("RGB")).astype(int)
    is_mark = (red[..., 0] > 150) & (red[..., 1] < 40) & (red[..., 2] < 60)  # #b00020
    assert is_mark.sum() > 50


def test_flat_and_nan_maps_still_render():
    display, maps, labels = inputs(3)
    maps[0] = 0.0
    maps[1] = np.nan
    decode(render_panel(display, maps, labels))


def test_mismatched_inputs_are_errors():
    display, maps, labels = inputs(3)
    with pytest.raises(ValueError, match="2 exit labels for 3 maps"):
        render_panel(display, maps, labels[:2])
    with pytest.raises(ValueError, match="maps must be"):
        render_panel(display, maps[0], labels)

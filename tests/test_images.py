"""Tests for egt_core.images.load_image against a corpus of good, odd and hostile files.

Every file is generated here (in memory or under tmp_path); nothing is shipped with the repo.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from egt_core.images import MAX_PIXELS, ImageLoadError, LoadedImage, image_to_display, load_image

TIME_LIMIT_S = 2.0

CONFIGS = {
    "gray28": dict(in_channels=1, size=28, mean=(0.2860,), std=(0.3530,)),
    "rgb64": dict(in_channels=3, size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


# --------------------------------------------------------------------------------------------
# Corpus builders


def encode(img: Image.Image, fmt: str, **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG whose IHDR declares a huge 8-bit grayscale image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def photo(width: int = 48, height: int = 40) -> Image.Image:
    """A smooth RGB test picture (compresses well, no flat areas)."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    arr = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def animated_gif() -> bytes:
    first = Image.new("RGB", (20, 20), (255, 0, 0))
    second = Image.new("RGB", (20, 20), (0, 0, 255))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def multipage_tiff() -> bytes:
    first = Image.new("RGB", (20, 20), (255, 0, 0))
    second = Image.new("RGB", (20, 20), (0, 0, 255))
    return encode(first, "TIFF", save_all=True, append_images=[second])


def exif_rotated_jpeg(orientation: int) -> bytes:
    """60x30 white image with a black marker in its stored top-left corner."""
    img = Image.new("RGB", (60, 30), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 15, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def half_split(mode: str, left, right, size=(40, 20)) -> Image.Image:
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def rgba_png() -> bytes:
    """Left half: fully transparent red; right half: opaque blue."""
    return encode(half_split("RGBA", (255, 0, 0, 0), (0, 0, 255, 255)), "PNG")


def la_png() -> bytes:
    """Left half: fully transparent black; right half: opaque black."""
    return encode(half_split("LA", (0, 0), (0, 255)), "PNG")


def palette_png() -> bytes:
    """Palette image: index 0 (red) transparent on the left, index 1 (green) on the right."""
    img = half_split("P", 0, 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    return encode(img, "PNG", transparency=0)


def two_level(dtype, low, high, fmt: str, mode: str | None = None, bad=None) -> bytes:
    """40x20 high-bit-depth image: left half ``low``, right half ``high``, optional ``bad``
    (NaN/inf) in the four leftmost columns."""
    arr = np.full((20, 40), low, dtype=dtype)
    arr[:, 20:] = high
    if bad is not None:
        arr[:, :4] = bad
    # fromarray cannot express big-endian 16-bit; frombytes can.
    img = Image.frombytes(mode, (40, 20), arr.tobytes()) if mode else Image.fromarray(arr)
    return encode(img, fmt)


def gray16_png() -> bytes:
    return two_level(np.uint16, 1000, 3000, "PNG")


def float_tiff() -> bytes:
    arr = np.linspace(-5.0, 5.0, 40 * 20, dtype=np.float32).reshape(20, 40)
    arr[0, 0] = np.nan
    arr[0, 1] = np.inf
    return encode(Image.fromarray(arr, "F"), "TIFF")


def one_bit_png() -> bytes:
    return encode(half_split("1", 1, 0), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)


GOOD = {
    "rgb_png": lambda: encode(photo(), "PNG"),
    "rgb_jpeg": lambda: encode(photo(), "JPEG"),
    "bmp": lambda: encode(photo(), "BMP"),
    "webp": lambda: encode(photo(), "WEBP"),
    "cmyk_jpeg": cmyk_jpeg,
    "gray16_png": gray16_png,
    "float_tiff": float_tiff,
    "int32_tiff": lambda: two_level(np.int32, -70_000, 5, "TIFF", "I"),
    "gray16_big_endian_tiff": lambda: two_level(">u2", 1000, 3000, "TIFF", "I;16B"),
    "lab_tiff": lambda: encode(photo().convert("LAB"), "TIFF"),
    "ycbcr_tiff": lambda: encode(photo().convert("YCbCr"), "TIFF"),
    "rgba_png": rgba_png,
    "la_png": la_png,
    "palette_png": palette_png,
    "one_bit_png": one_bit_png,
    "animated_gif": animated_gif,
    "multipage_tiff": multipage_tiff,
    "exif_rotated_jpeg": lambda: exif_rotated_jpeg(6),
    "one_pixel": lambda: encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
    "strip_10000x10": lambda: encode(photo(10_000, 10), "PNG"),
    "tall_strip": lambda: encode(photo(3, 900), "JPEG"),
}

BAD = {
    "plain_text": (lambda: b"just some notes\nnot a picture\n" * 20, "text"),
    "html": (lambda: b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
    "svg": (
        lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>',
        "SVG",
    ),
    "empty": (lambda: b"", "empty"),
    "truncated_png": (lambda: _cut(encode(photo(200, 200), "PNG"), 0.8), "truncated"),
    "truncated_png_half": (lambda: _cut(encode(photo(200, 200), "PNG"), 0.5), "truncated"),
    "truncated_jpeg_header": (lambda: _cut(encode(photo(200, 200), "JPEG"), 0.1), "truncated"),
    "truncated_jpeg_half": (lambda: _cut(encode(photo(200, 200), "JPEG"), 0.5), "truncated"),
    "png_bomb": (png_bomb, "50000x50000"),
    "random_binary": (lambda: bytes(range(256)) * 4, "not an image"),
    "svg_with_doctype": (
        lambda: b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x.dtd">\n<svg width="9"></svg>',
        "SVG",
    ),
    "pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF"),
    "heic": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "HEIC"),
    # Pillow could open EPS, but only by running Ghostscript on untrusted input: refused.
    "eps": (lambda: encode(photo(8, 8), "EPS"), "not an image"),
}


def _cut(data: bytes, keep: float) -> bytes:
    return data[: int(len(data) * keep)]


# --------------------------------------------------------------------------------------------
# Helpers


def timed_load(source, cfg: dict, **kw) -> LoadedImage:
    """load_image, asserting the time budget and that only ImageLoadError can escape."""
    start = time.perf_counter()
    try:
        return load_image(source, **cfg, **kw)
    except ImageLoadError as err:
        msg = str(err)
        assert msg and "\n" not in msg
        raise
    finally:
        assert time.perf_counter() - start < TIME_LIMIT_S


def check_result(res: LoadedImage, cfg: dict) -> None:
    c, s = cfg["in_channels"], cfg["size"]
    assert isinstance(res, LoadedImage)
    assert res.tensor.shape == (1, c, s, s)
    assert res.tensor.dtype == torch.float32
    assert torch.isfinite(res.tensor).all()
    assert res.display.shape == (s, s, 3)
    assert res.display.dtype == np.float32
    assert res.display.min() >= 0.0 and res.display.max() <= 1.0
    # The tensor is exactly the display pixels, normalised.
    mean = torch.tensor(cfg["mean"]).view(1, c, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, c, 1, 1)
    unit = res.tensor * std + mean
    expected = torch.from_numpy(res.display[..., :c]).permute(2, 0, 1).unsqueeze(0)
    torch.testing.assert_close(unit, expected, atol=1e-5, rtol=0)
    if c == 1:
        assert np.array_equal(res.display[..., 0], res.display[..., 1])
    w, h = res.original_size
    assert w >= 1 and h >= 1


def content_box(size: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the letterboxed content, as load_image places it."""
    scale = size / max(width, height)
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - tw) // 2, (size - th) // 2
    return left, top, left + tw, top + th


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def cfg(request) -> dict:
    return CONFIGS[request.param]


# --------------------------------------------------------------------------------------------
# The corpus


def test_pillow_truncated_flag_left_alone():
    # load_image must not flip this process-wide switch (other threads rely on it).
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageLoadError):
        load_image(_cut(encode(photo(200, 200), "PNG"), 0.5), **CONFIGS["gray28"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before


@pytest.mark.parametrize("kind", list(GOOD))
def test_good_files_load(kind, cfg):
    res = timed_load(GOOD[kind](), cfg)
    check_result(res, cfg)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_refused(kind, cfg):
    make, fragment = BAD[kind]
    with pytest.raises(ImageLoadError) as info:
        timed_load(make(), cfg)
    assert fragment.lower() in str(info.value).lower()


def test_svg_saved_as_png_path(tmp_path: Path, cfg):
    path = tmp_path / "drawing.png"
    path.write_bytes(BAD["svg"][0]())
    with pytest.raises(ImageLoadError, match="SVG"):
        timed_load(path, cfg)


def test_bomb_refused_before_decoding():
    data = png_bomb()
    assert len(data) < 500
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"50000x50000 \(2,500,000,000 pixels\)"):
        load_image(data, **CONFIGS["rgb64"])
    assert time.perf_counter() - start < 0.5


def test_own_pixel_limit_applies_below_pillows():
    # 7000x7000 = 49M pixels: under Pillow's own warning threshold, over our default limit.
    assert 7000 * 7000 > MAX_PIXELS
    with pytest.raises(ImageLoadError, match=r"7000x7000.*limit of 40,000,000"):
        load_image(png_bomb(7000, 7000), **CONFIGS["gray28"])
    with pytest.raises(ImageLoadError, match="48x40"):
        load_image(encode(photo(), "PNG"), **CONFIGS["gray28"], max_pixels=1000)


def test_max_bytes(cfg):
    data = encode(photo(), "PNG")
    with pytest.raises(ImageLoadError, match="larger than"):
        timed_load(data, cfg, max_bytes=len(data) - 1)
    with pytest.raises(ImageLoadError, match="larger than"):
        timed_load(io.BytesIO(data), cfg, max_bytes=100)
    check_result(timed_load(data, cfg, max_bytes=len(data)), cfg)


def test_truncated_refused_even_if_pillow_told_to_accept(monkeypatch, cfg):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for fmt in ("PNG", "JPEG"):
        data = _cut(encode(photo(200, 200), fmt), 0.5)
        with pytest.raises(ImageLoadError, match="truncated"):
            timed_load(data, cfg)
    check_result(timed_load(encode(photo(), "JPEG"), cfg), cfg)


# --------------------------------------------------------------------------------------------
# What the pixels look like


def test_animated_gif_uses_first_frame():
    res = timed_load(animated_gif(), CONFIGS["rgb64"])
    assert res.original_mode == "P"
    np.testing.assert_allclose(res.display[32, 32], [1.0, 0.0, 0.0], atol=0.02)


def test_multipage_tiff_uses_first_frame():
    res = timed_load(multipage_tiff(), CONFIGS["rgb64"])
    np.testing.assert_allclose(res.display[32, 32], [1.0, 0.0, 0.0], atol=0.02)


def test_cmyk_becomes_rgb():
    res = timed_load(cmyk_jpeg(), CONFIGS["rgb64"])
    assert res.original_mode == "CMYK"
    r, g, b = res.display[32, 32]
    assert r > 0.8 and g < 0.2 and b < 0.2


HIGH_DEPTH = {
    "gray16_png": (gray16_png, "I;16"),
    "gray16_big_endian_tiff": (lambda: two_level(">u2", 1000, 3000, "TIFF", "I;16B"), "I;16B"),
    "int32_tiff": (lambda: two_level(np.int32, -70_000, 5, "TIFF", "I"), "I"),
    "float_tiff": (lambda: two_level(np.float32, -2.5, 7.0, "TIFF", "F"), "F"),
    "float_huge_range_tiff": (lambda: two_level(np.float32, -3e38, 3e38, "TIFF", "F"), "F"),
    # NaN/inf count as the minimum, on both the fast and the exact path.
    "float_nan_tiff": (lambda: two_level(np.float32, 1, 7, "TIFF", "F", bad=np.nan), "F"),
    "float_inf_tiff": (lambda: two_level(np.float32, -1e-3, 1e-3, "TIFF", "F", bad=np.inf), "F"),
}


@pytest.mark.parametrize("kind", list(HIGH_DEPTH))
def test_high_depth_stretched_by_own_range(kind, cfg):
    make, mode = HIGH_DEPTH[kind]
    res = timed_load(make(), cfg)
    assert res.original_mode == mode
    left, top, right, bottom = content_box(cfg["size"], 40, 20)
    y = (top + bottom) // 2
    np.testing.assert_allclose(res.display[y, left + 2], [0, 0, 0], atol=0.02)  # minimum
    np.testing.assert_allclose(res.display[y, right - 3], [1, 1, 1], atol=0.02)  # maximum


@pytest.mark.parametrize("value", [3.0, np.nan])
def test_flat_or_all_nan_float_is_black(value):
    data = encode(Image.fromarray(np.full((10, 10), value, np.float32), "F"), "TIFF")
    res = timed_load(data, CONFIGS["gray28"])
    assert res.display.max() == 0.0


def test_float_gradient_with_nan_and_inf_uses_full_range():
    res = timed_load(float_tiff(), CONFIGS["rgb64"])
    assert res.display.min() < 0.02 and res.display.max() > 0.98


def test_transparency_composited_on_white(cfg):
    s = cfg["size"]
    left, top, right, bottom = content_box(s, 40, 20)
    y = (top + bottom) // 2
    xl, xr = left + 3, right - 4

    rgba = timed_load(rgba_png(), cfg)
    np.testing.assert_allclose(rgba.display[y, xl], [1, 1, 1], atol=0.02)
    if cfg["in_channels"] == 3:
        np.testing.assert_allclose(rgba.display[y, xr], [0, 0, 1], atol=0.02)

    la = timed_load(la_png(), cfg)
    np.testing.assert_allclose(la.display[y, xl], [1, 1, 1], atol=0.02)
    np.testing.assert_allclose(la.display[y, xr], [0, 0, 0], atol=0.02)

    pal = timed_load(palette_png(), cfg)
    np.testing.assert_allclose(pal.display[y, xl], [1, 1, 1], atol=0.02)
    if cfg["in_channels"] == 3:
        np.testing.assert_allclose(pal.display[y, xr], [0, 1, 0], atol=0.02)

    # invert=True turns the white background black, Fashion-MNIST style.
    inv = timed_load(la_png(), cfg, invert=True)
    np.testing.assert_allclose(inv.display[y, xl], [0, 0, 0], atol=0.02)
    np.testing.assert_allclose(inv.display[y, xr], [1, 1, 1], atol=0.02)


def test_one_bit_becomes_gray(cfg):
    res = timed_load(one_bit_png(), cfg)
    assert res.original_mode == "1"
    left, top, right, bottom = content_box(cfg["size"], 40, 20)
    y = (top + bottom) // 2
    np.testing.assert_allclose(res.display[y, left + 2], [1, 1, 1], atol=0.02)
    np.testing.assert_allclose(res.display[y, right - 3], [0, 0, 0], atol=0.02)


@pytest.mark.parametrize(
    ("orientation", "expected_quadrant"),
    [(1, "top-left"), (6, "top-right"), (8, "bottom-left"), (3, "bottom-right")],
)
def test_exif_orientation_applied(orientation, expected_quadrant, cfg):
    s = cfg["size"]
    res = timed_load(exif_rotated_jpeg(orientation), cfg)
    upright_wh = (30, 60) if orientation in (6, 8) else (60, 30)
    assert res.original_size == upright_wh
    left, top, right, bottom = content_box(s, *upright_wh)
    dark = res.display.mean(axis=-1) < 0.4
    ys, xs = np.nonzero(dark)
    assert len(xs) > 0
    # All dark pixels lie inside the content box, in the expected corner.
    assert xs.min() >= left and xs.max() < right and ys.min() >= top and ys.max() < bottom
    cx, cy = xs.mean(), ys.mean()
    vertical, horizontal = expected_quadrant.split("-")
    assert (cy < (top + bottom) / 2) == (vertical == "top")
    assert (cx < (left + right) / 2) == (horizontal == "left")


def test_one_pixel_fills_the_square(cfg):
    res = timed_load(GOOD["one_pixel"](), cfg)
    assert res.original_size == (1, 1)
    if cfg["in_channels"] == 3:
        expected = np.array([10, 200, 30]) / 255
    else:
        expected = np.full(3, round(0.299 * 10 + 0.587 * 200 + 0.114 * 30) / 255)
    np.testing.assert_allclose(res.display, np.broadcast_to(expected, res.display.shape), atol=0.01)


def test_strip_letterboxed(cfg):
    s = cfg["size"]
    res = timed_load(GOOD["strip_10000x10"](), cfg)
    assert res.original_size == (10_000, 10)
    left, top, right, bottom = content_box(s, 10_000, 10)
    assert (right - left, bottom - top) == (s, 1)
    # Padding is one flat colour (the border median), the content row is a gradient.
    pad = res.display[:top]
    assert np.ptp(pad.reshape(-1, 3), axis=0).max() == 0
    assert np.ptp(res.display[top, :, 0]) > 0.1


def test_letterbox_padding_uses_border_median():
    # Dark picture with a light frame: the padding should be the frame colour, not black.
    img = Image.new("RGB", (40, 20), (200, 180, 160))
    img.paste((0, 0, 0), (4, 4, 36, 16))
    res = timed_load(encode(img, "PNG"), CONFIGS["rgb64"])
    np.testing.assert_allclose(res.display[2, 32], np.array([200, 180, 160]) / 255, atol=0.01)


# --------------------------------------------------------------------------------------------
# Source types and arguments


def test_source_types_agree(tmp_path: Path, cfg):
    data = encode(photo(), "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    with path.open("rb") as fh:
        results = [
            timed_load(data, cfg),
            timed_load(bytearray(data), cfg),
            timed_load(memoryview(data), cfg),
            timed_load(str(path), cfg),
            timed_load(path, cfg),
            timed_load(io.BytesIO(data), cfg),
            timed_load(fh, cfg),
        ]
    for res in results:
        check_result(res, cfg)
        assert torch.equal(res.tensor, results[0].tensor)
    assert results[0].name == "image"
    assert [r.name for r in results[3:5]] == ["photo.png", "photo.png"]
    assert results[6].name == "photo.png"
    assert timed_load(data, cfg, name="upload.png").name == "upload.png"


def test_missing_path_and_directory(tmp_path: Path, cfg):
    with pytest.raises(ImageLoadError, match="Could not read"):
        timed_load(tmp_path / "nope.png", cfg)
    with pytest.raises(ImageLoadError, match="Could not read"):
        timed_load(tmp_path, cfg)


def test_bad_arguments_are_programming_errors():
    data = encode(photo(), "PNG")
    with pytest.raises(ValueError, match="in_channels"):
        load_image(data, in_channels=2, size=28, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="mean"):
        load_image(data, in_channels=3, size=28, mean=(0, 0), std=(1,))
    with pytest.raises(TypeError):
        load_image(12345, in_channels=1, size=28, mean=(0,), std=(1,))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        load_image(io.StringIO("x"), in_channels=1, size=28, mean=(0,), std=(1,))


def test_image_to_display_shapes():
    gray = torch.rand(1, 1, 5, 7)
    out = image_to_display(gray)
    assert out.shape == (5, 7, 3) and out.dtype == np.float32
    assert np.array_equal(out[..., 0], out[..., 2])
    assert image_to_display(torch.full((3, 2, 2), 2.0)).max() == 1.0


# --------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, only LoadedImage or ImageLoadError comes out.

_SEEDS = [
    encode(photo(16, 12), "PNG"),
    encode(photo(16, 12), "JPEG"),
    encode(photo(16, 12).convert("P"), "GIF"),
    encode(photo(16, 12), "BMP"),
    encode(photo(16, 12), "TIFF"),
]
_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"II*\x00"]


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


hostile_bytes = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda m, b: m + b, st.sampled_from(_MAGIC), st.binary(max_size=2048)),
    mutated_image(),
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's chatter about corrupt metadata
@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=hostile_bytes, config=st.sampled_from(list(CONFIGS)))
def test_fuzz_only_typed_outcomes(data, config):
    cfg = CONFIGS[config]
    try:
        res = load_image(data, **cfg)
    except ImageLoadError as err:
        assert str(err) and "\n" not in str(err)
    else:
        check_result(res, cfg)

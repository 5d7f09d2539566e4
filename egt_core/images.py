"""Turn an uploaded or on-disk image file into a model-ready tensor.

The Streamlit app and the CLI both call :func:`load_image`, so a file gives the same tensor (and
the same error) wherever it is loaded. Anything can arrive here, so the function either returns a
:class:`LoadedImage` or raises :class:`ImageLoadError` with a one-line message a person can act on.

Policies, in the order they are applied:

* Size limits: at most ``max_bytes`` are read, and an image whose header declares more than
  ``max_pixels`` pixels (frame 0 for multi-frame files) is refused before any pixel data is
  decoded, so a few hundred bytes cannot make us allocate gigabytes.
* Formats: only common raster formats are opened (:data:`ALLOWED_FORMATS`). EPS, PDF and friends
  are excluded on purpose: Pillow renders EPS by running Ghostscript.
* Decoding is eager (``load()``), so truncated or corrupt files fail here rather than later.
* Multi-frame files (animated GIF/WebP, multi-page TIFF): frame 0 only.
* EXIF orientation is honoured, so phone photos come out the way they are shown.
* Modes: high-bit-depth grayscale (``I;16*``, ``I``, ``F``) is stretched to 0..255 using the
  image's own minimum and maximum (a flat image becomes black; NaN/inf count as the minimum).
  Transparency (``RGBA``, ``LA``, ``PA``, palette or colour-key transparency) is composited
  onto white; with ``invert=True`` that background then turns black, like Fashion-MNIST.
  Every other mode (CMYK, YCbCr, LAB, HSV, 1-bit, ...) goes through Pillow's RGB/L conversion.
* Geometry: letterbox. The longer side is resized to ``size`` (Lanczos), the image is centred,
  and the rest is padded with the median colour of the resized image's border, so a 10000x10
  strip and a single pixel both give a sensible square.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_BYTES",
    "MAX_PIXELS",
    "ImageLoadError",
    "LoadedImage",
    "image_to_display",
    "load_image",
]

MAX_PIXELS: int = 40_000_000
MAX_BYTES: int = 20 * 1024 * 1024

# Raster formats people actually upload. Restricting Pillow's format sniffing also keeps exotic
# plugins (and EPS's Ghostscript subprocess) away from untrusted bytes.
Image.init()  # register every plugin so the filter below sees what this Pillow build supports
ALLOWED_FORMATS: tuple[str, ...] = tuple(
    f
    for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "AVIF", "PPM", "ICO")
    if f in Image.OPEN
)

_BACKGROUND = 255  # white, see module docstring
_READ_CHUNK = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# EXIF orientation value -> the transpose that makes the image upright (as ImageOps does).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageLoadError(ValueError):
    """The input could not be turned into an image; ``str(err)`` is one line for a person."""


@dataclass
class LoadedImage:
    """A decoded image, as the model sees it and as a person should see it."""

    tensor: torch.Tensor  # (1, C, size, size) float32, normalised with mean/std
    display: np.ndarray  # (size, size, 3) float32 RGB in [0, 1], the same pixels, unnormalised
    original_size: tuple[int, int]  # (width, height) of the full-size image, EXIF-rotated
    original_mode: str  # Pillow mode of the file, e.g. "RGB", "P", "I;16", "CMYK"
    name: str


def load_image(
    source: bytes | str | os.PathLike | BinaryIO,
    *,
    in_channels: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    name: str | None = None,
    invert: bool = False,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
) -> LoadedImage:
    """Decode ``source`` into a letterboxed ``size`` x ``size`` tensor with ``in_channels``.

    ``source`` is the file's content (bytes-like), a path (``str`` is always a path, never data)
    or a binary file object, read from its current position. ``invert`` flips intensities after
    letterboxing (for models trained on light-on-dark data). Raises :class:`ImageLoadError` for
    anything wrong with the input, and ``ValueError``/``TypeError`` only for bad arguments.
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    mean_t = _per_channel(mean, in_channels, "mean")
    std_t = _per_channel(std, in_channels, "std")
    if bool((std_t == 0).any()):
        raise ValueError("std must not contain zeros")

    data, default_name = _read_source(source, max_bytes)
    name = name or default_name
    pixels, original_size, original_mode = _decode(data, in_channels, size, max_pixels)

    if invert:
        pixels = 255 - pixels
    unit = torch.from_numpy(pixels.astype(np.float32) / 255.0)  # (size, size, C)
    tensor = ((unit.permute(2, 0, 1) - mean_t[:, None, None]) / std_t[:, None, None]).unsqueeze(0)
    return LoadedImage(
        tensor=tensor.contiguous(),
        display=image_to_display(unit.permute(2, 0, 1)),
        original_size=original_size,
        original_mode=original_mode,
        name=name,
    )


def image_to_display(tensor_chw_unnormalised: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) or (1, C, H, W) values in [0, 1] -> (H, W, 3) float32 RGB for overlays.

    Gray is replicated to three channels so plotting code never has to special-case it.
    """
    x = torch.as_tensor(tensor_chw_unnormalised).detach().to("cpu", torch.float32)
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected (C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return np.ascontiguousarray(x.clamp(0.0, 1.0).permute(1, 2, 0).numpy(), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Reading


def _per_channel(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(list(values), dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{what} needs 1 or {channels} values, got {t.numel()}")
    return t


def _read_source(source: object, max_bytes: int) -> tuple[bytes, str]:
    """Return at most ``max_bytes`` of content and a display name; oversize is an error."""
    if isinstance(source, bytes | bytearray | memoryview):
        data, name = bytes(source), "image"
    elif isinstance(source, str | os.PathLike):
        path = os.fsdecode(os.fspath(source))
        name = os.path.basename(path) or path
        try:
            with open(path, "rb") as fh:
                data = _read_limited(fh, max_bytes + 1)
        except OSError as exc:
            raise ImageLoadError(f"Could not read {name!r}: {exc.strerror or exc}.") from exc
    elif hasattr(source, "read"):
        raw_name = getattr(source, "name", None)
        name = os.path.basename(raw_name) if isinstance(raw_name, str) and raw_name else "image"
        try:
            data = _read_limited(source, max_bytes + 1)
        except OSError as exc:
            raise ImageLoadError(f"Could not read the uploaded file: {exc}.") from exc
    else:
        raise TypeError(f"expected bytes, a path or a binary file, got {type(source).__name__}")

    if not data:
        raise ImageLoadError("The file is empty.")
    if len(data) > max_bytes:
        raise ImageLoadError(f"The file is larger than the {_mib(max_bytes)} limit.")
    return data, name


def _read_limited(fh: BinaryIO, limit: int) -> bytes:
    """Read up to ``limit`` bytes; loops because raw streams may return short reads."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = fh.read(min(_READ_CHUNK, limit - len(buf)))
        if chunk is None:  # non-blocking stream with nothing available
            break
        if not isinstance(chunk, bytes | bytearray):
            raise TypeError("the file object must be opened in binary mode ('rb')")
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB" if n >= 1024 * 1024 else f"{n:,} bytes"


# --------------------------------------------------------------------------------------------
# Decoding


def _decode(
    data: bytes, in_channels: int, size: int, max_pixels: int
) -> tuple[np.ndarray, tuple[int, int], str]:
    """Bytes -> (size, size, C) uint8 letterboxed pixels, (width, height), original mode."""
    img = _open(data, max_pixels)
    try:
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageLoadError(f"The image declares an empty size ({width}x{height}).")
        if width * height > max_pixels:
            raise ImageLoadError(_too_big(width, height, width * height, max_pixels))
        original_mode = img.mode
        orientation = _exif_orientation(img)

        # Target size of the image content inside the square; uniform scale, so the same for
        # the stored and the EXIF-rotated orientation.
        scale = size / max(width, height)
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        # JPEG can decode at 1/2, 1/4 or 1/8 scale almost for free; keep 2x headroom for quality.
        img.draft(None, (target[0] * 2, target[1] * 2))

        try:
            img.load()
        except Exception as exc:
            kind, detail = img.format or "image", _detail(exc)
            if "truncated" in detail.lower():
                msg = f"This {kind} file is truncated (an incomplete download or upload?)."
            else:
                msg = f"This {kind} file is corrupt ({detail})."
            raise ImageLoadError(msg) from exc
        if ImageFile.LOAD_TRUNCATED_IMAGES and _looks_truncated(img.format, data):
            # Someone in this process told Pillow to pad truncated files with grey; we don't.
            raise ImageLoadError(f"This {img.format} file is truncated.")

        # Only cheap, unavoidable work happens at full resolution; compositing and quantising
        # are done on the small resized image.
        work = _resizable(img)
        if work.size != target:
            work = work.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        flat = _finish(work)
        want = "L" if in_channels == 1 else "RGB"
        if flat.mode != want:
            flat = flat.convert(want)
        if orientation in _ORIENTATION_FIX:
            flat = flat.transpose(_ORIENTATION_FIX[orientation])
            if orientation >= 5:
                width, height = height, width
        content = np.asarray(flat, dtype=np.uint8).reshape(flat.height, flat.width, in_channels)
    except ImageLoadError:
        raise
    except Exception as exc:  # anything Pillow/numpy throws on hostile input
        raise ImageLoadError(f"This image could not be decoded ({_detail(exc)}).") from exc
    finally:
        img.close()
    return _letterbox(content, size), (width, height), original_mode


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and read the header only; no pixel data is decoded here.

    Global Pillow state (``Image.MAX_IMAGE_PIXELS``, warning filters) is left alone because the
    app serves sessions from threads. Our own pixel check runs right after this; Pillow's
    built-in bomb check inside ``open()`` only fires first for images far beyond the default
    ``MAX_PIXELS`` (its warning is then just a log line before we refuse the image anyway).
    """
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        dims = _png_declared_size(data) or (0, 0)
        match = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(match.group(1)) if match else dims[0] * dims[1]
        limit = max_pixels if pixels > max_pixels else None
        raise ImageLoadError(_too_big(*dims, pixels, limit)) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"This file is not an image Pillow can read ({_sniff(data)})."
        ) from exc
    except Exception as exc:
        raise ImageLoadError(
            f"This image's header is truncated or corrupt ({_detail(exc)})."
        ) from exc


def _too_big(width: int, height: int, pixels: int, limit: int | None) -> str:
    size = f"{width}x{height} ({pixels:,} pixels)" if width and height else f"{pixels:,} pixels"
    limit_txt = f"the limit of {limit:,}" if limit else "Pillow's safety limit"
    return f"The image declares {size}, more than {limit_txt}; refusing to decode it."


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation tag (1..8), or 1 if absent or unreadable; bad EXIF is not fatal."""
    try:
        value = img.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:
        return 1


def _resizable(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L", "RGB", "LA", "RGBA" or "F" (already stretched to 0..255).

    Pillow resizes "LA"/"RGBA" with premultiplied alpha, so compositing after the resize gives
    the same picture as compositing before, at a fraction of the cost.
    """
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        return _stretched_float(img)
    if mode == "P":
        rgba_palette = img.palette is not None and img.palette.mode == "RGBA"
        return img.convert("RGBA" if "transparency" in img.info or rgba_palette else "RGB")
    if mode in ("L", "RGB"):
        # Colour-key transparency (PNG tRNS) becomes a real alpha channel.
        return img.convert(mode + "A") if "transparency" in img.info else img
    if mode in ("LA", "RGBA"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _stretched_float(img: Image.Image) -> Image.Image:
    """16/32-bit or float image -> "F" mapped to 0..255 by its own min..max (contrast stretch).

    A flat image becomes black; NaN and +-inf count as the minimum of the finite values.
    """
    if img.mode == "F":
        f = img
    elif img.mode in ("I", "I;16"):
        f = img.convert("F")
    else:  # other 16-bit byte orders
        f = img.convert("I").convert("F")

    # A full-image box average is non-finite iff some pixel is (or the sum overflows, which
    # only sends us down the slower exact path). It is much cheaper than a numpy copy.
    if not math.isfinite(f.reduce(f.size).getpixel((0, 0))):
        arr = np.asarray(f, dtype=np.float32)
        finite = np.isfinite(arr)
        if not finite.any():
            return Image.new("F", f.size, 0.0)
        fill = arr[finite].min()
        f = Image.fromarray(np.where(finite, arr, fill), "F")  # float32 in, float32 out

    lo, hi = f.getextrema()
    if not hi > lo:
        return Image.new("F", f.size, 0.0)
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    return f.point(lambda x: x * scale + offset)


def _finish(img: Image.Image) -> Image.Image:
    """Small resized image -> 8-bit "L" or "RGB": composite alpha on white, quantise floats."""
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255, neginf=0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("LA", "RGBA"):
        base_mode = img.mode[:-1]
        background = Image.new(base_mode, img.size, (_BACKGROUND,) * len(base_mode))
        background.paste(img.convert(base_mode), mask=img.getchannel("A"))
        return background
    return img


def _letterbox(content: np.ndarray, size: int) -> np.ndarray:
    """Centre (h, w, C) uint8 content in a size x size square padded with its border median."""
    h, w, c = content.shape
    border = np.concatenate(
        [content[0], content[-1], content[:, 0], content[:, -1]], axis=0
    ).reshape(-1, c)
    fill = np.clip(np.rint(np.median(border, axis=0)), 0, 255).astype(np.uint8)
    out = np.empty((size, size, c), dtype=np.uint8)
    out[:] = fill
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = content
    return out


# --------------------------------------------------------------------------------------------
# Diagnostics


def _looks_truncated(fmt: str | None, data: bytes) -> bool:
    """Structural end-of-file check, used only if Pillow was told to accept truncated files."""
    if fmt == "PNG":
        return _PNG_IEND not in data
    if fmt in ("JPEG", "MPO"):
        # Markers cannot occur inside entropy-coded data, so a complete file has an EOI marker
        # after its last start-of-scan marker.
        sos = data.rfind(b"\xff\xda")
        return sos < 0 or data.find(b"\xff\xd9", sos) < 0
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    return False


def _png_declared_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    return None


def _sniff(data: bytes) -> str:
    """Best guess at what a non-image upload is, for the error message."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "looks like HTML, perhaps a web page saved instead of the image"
    if head.startswith(b"<") and b"<svg" in head:
        return "looks like an SVG drawing; export it as PNG first"
    if head.startswith(b"<") and b"<html" in head:
        return "looks like HTML, perhaps a web page saved instead of the image"
    if head.startswith(b"<?xml"):
        return "looks like XML"
    if head.startswith(b"%pdf"):
        return "looks like a PDF"
    if head.startswith(b"pk\x03\x04"):
        return "looks like a ZIP archive"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1"):
        return "looks like a HEIC photo; convert it to JPEG or PNG"
    # Replacement characters cover non-UTF-8 bytes (and a character cut at the 4 KiB mark).
    text = data[:4096].decode("utf-8", errors="replace")
    if "\x00" not in text:
        printable = sum((ch.isprintable() and ch != "\ufffd") or ch in "\t\r\n" for ch in text)
        if printable >= 0.95 * len(text):
            return "looks like plain text"
    return "unknown or unsupported format"


def _detail(exc: BaseException) -> str:
    """Exception text squeezed onto one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."

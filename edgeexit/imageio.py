"""Image files and class folders (torch-free: shared by training and the on-device runtime)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from .errors import EdgeexitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageError(EdgeexitError, ValueError):
    """An image file that cannot be read (missing, empty, corrupt or not an image)."""


def is_image_file(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: above any camera frame, far below what fills a device's memory
_max_pixels = DEFAULT_MAX_PIXELS


class ImageTooLarge(ImageError):
    """An image with more pixels than the limit (skipped and counted like an unreadable one)."""


def set_max_pixels(limit: int) -> None:
    """Set the process-wide pixel limit of ``load_image`` (the commands' ``--max-pixels``)."""
    global _max_pixels
    ceiling = _pil_ceiling()
    if not 1 <= int(limit) <= ceiling:
        raise ValueError(f"--max-pixels must be between 1 and {ceiling} (Pillow's own limit), got {limit}")
    _max_pixels = int(limit)


def max_pixels() -> int:
    return _max_pixels


def _pil_ceiling() -> int:
    """Pillow refuses images above 2 x Image.MAX_IMAGE_PIXELS (DecompressionBombError) before we see them."""
    return 2 * int(Image.MAX_IMAGE_PIXELS) if Image.MAX_IMAGE_PIXELS else 1 << 40


@contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` with Pillow's decompression-bomb warning and error turned into our own limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageTooLarge(f"image {path} is too large: more than {_pil_ceiling()} pixels") from None
    with img:
        yield img


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    path = Path(path)
    try:
        with _open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None


def _reduce_if_large(img: Image.Image, path: Path, limit: int) -> None:
    """Refuse an image above ``limit`` pixels before decoding it; a JPEG is decoded at 1/2, 1/4 or 1/8 scale
    instead (draft mode) when that brings it under the limit."""
    width, height = img.size
    if width * height <= limit:
        return
    if img.format == "JPEG":
        for scale in (2, 4, 8):
            if (width // scale) * (height // scale) <= limit:
                img.draft(img.mode, (width // scale, height // scale))
                return
    raise ImageTooLarge(f"image {path} is too large: {width}x{height} = {width * height / 1e6:.0f} MP "
                        f"(limit {limit / 1e6:g} MP, --max-pixels)")


def _to_8bit(img: Image.Image, channels: int) -> np.ndarray:
    """Any Pillow mode -> uint8 HxWxC. 16- and 32-bit grayscale keep their full range (65535 -> 255, not clipped
    to white); transparent images are composited over white; palette, LA, CMYK, YCbCr ... through Pillow."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return gray[:, :, None] if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.rint(np.nan_to_num(np.asarray(img, dtype=np.float64))), 0, 255).astype(np.uint8)
        return gray[:, :, None] if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    array = np.asarray(img.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


_ORIENTATION = 0x0112  # EXIF tag


def _upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: rotated/flipped by its EXIF orientation (phones store portrait JPEGs as
    landscape pixels plus this tag)."""
    if img.getexif().get(_ORIENTATION, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def load_image(path: Path | str, channels: int = 3, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 HxWxC (C = 3: RGB, C = 1: grayscale), upright (EXIF orientation applied).

    ``max_pixels`` (default: the process-wide limit, ``set_max_pixels``) refuses larger images before decoding
    them (JPEGs are decoded reduced when that fits). Raises ImageError (ImageTooLarge for the limit) with the file
    name for anything unreadable, so callers can skip and count it.
    """
    path = Path(path)
    try:
        with _open(path) as img:
            _reduce_if_large(img, path, int(max_pixels or _max_pixels))
            img.load()
            return _to_8bit(_upright(img), channels)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 (OSError, SyntaxError, struct.error ...: Pillow raises many kinds)
        raise ImageError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None


def decode_image(data: bytes, channels: int = 3) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, BMP, WebP bytes) to uint8 HxWxC, as :func:`load_image` reads a file.

    Raises ImageError for anything that is not a decodable image (empty, truncated, another format).
    """
    import io  # noqa: PLC0415

    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()
            img = img.convert("RGB" if channels == 3 else "L")
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image ({len(data)} bytes): {exc.__class__.__name__}: {exc}") from None
    return array if array.ndim == 3 else array[:, :, None]


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert a uint8 HxW, HxWx1, HxWx3 or HxWx4 array to HxWx``channels`` (RGB order).

    Grayscale uses ITU-R 601-2 luma weights, as PIL's ``convert("L")`` does.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an HxWxC image with 1, 3 or 4 channels, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[:, :, None]


@dataclass(frozen=True)
class ImageFolder:
    """A class-folder data set: ``root/<class>/*.{png,jpg,jpeg,bmp,webp}``; classes in sorted folder order."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def scan_image_folder(root: Path | str, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """List a class-folder data set. ``classes`` pins the label order (e.g. the model's classes).

    A folder with image files directly inside (no class folders) is an unlabelled set: labels are -1.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        files = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
        if not files:
            raise FileNotFoundError(f"no images or class folders in {root}")
        return ImageFolder(root, tuple(classes or ()), tuple(files), tuple([-1] * len(files)))
    class_list = tuple(classes) if classes else tuple(found)
    index = {name: i for i, name in enumerate(class_list)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise ValueError(f"{root} has class folders the model does not know: {', '.join(unknown[:5])}")
    paths: list[Path] = []
    labels: list[int] = []
    for name in found:
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and is_image_file(p))
        paths += files
        labels += [index[name]] * len(files)
    if not paths:
        raise FileNotFoundError(f"no image files under {root}")
    return ImageFolder(root, class_list, tuple(paths), tuple(labels))


def warn_skipped(path: Path | str, error: Exception) -> None:
    """One warning line per unreadable file."""
    warnings.warn(f"skipped {error}" if str(path) in str(error) else f"skipped {path}: {error}", stacklevel=2)

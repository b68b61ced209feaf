"""Image files and class folders (torch-free: shared by training and the on-device runtime)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageError(ValueError):
    """An image file that cannot be read (missing, empty, corrupt or not an image)."""


def is_image_file(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: Path | str, channels: int = 3) -> np.ndarray:
    """Read an image file as uint8 HxWxC (C = 3: RGB, C = 1: grayscale).

    Raises ImageError with the file name for anything unreadable, so callers can skip and count it.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB" if channels == 3 else "L")
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None
    return array if array.ndim == 3 else array[:, :, None]


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

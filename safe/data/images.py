"""Image loading via Pillow, always RGB."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from safe.core.errors import SafeError


class ImageLoadError(SafeError):
    """A missing or undecodable image."""


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image file {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces a full decode, so truncated files fail here
    except Exception as exc:
        raise ImageLoadError(f"cannot decode image {path}: {exc}") from None

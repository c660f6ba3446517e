"""Decode the image a user passes to the device; family-agnostic.

Turning the decoded image into the vision graph's inputs is the artifact's family's
job (``DraftArtifact.family.vision_inputs``).
"""

from __future__ import annotations

import io

from PIL import Image


class ImageError(ValueError):
    """The image could not be read."""


def load_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) with a clear error on failure."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read the image ({exc}); pass a PNG or JPEG file") from None
    return image

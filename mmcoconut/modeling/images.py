"""Images as the model reads them: RGB, transparent pixels composited on white (the shard writer and the processor
both go through `load_rgb`, so a PNG with alpha gives the same pixels in training and at inference)."""
from __future__ import annotations

import os

from PIL import Image


def load_rgb(image):
    """A PIL RGB image from a path or a PIL image (decoded now, so a truncated file fails here); other inputs
    (arrays, tensors) pass through unchanged."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            img.load()
            image = img.copy()
    if not isinstance(image, Image.Image):
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")

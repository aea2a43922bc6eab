"""Drawing for the pictures: a grid of equal tiles on a white sheet, with a title, row and column
labels, each tile framed by a thin grey line, and the colour maps the pictures share. Pillow
only (pixel-exact tiles, legible text at any size); every tile is an (h, w, 3) uint8 array."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from tubevit_fast.io import require

BACKGROUND = (255, 255, 255)
FRAME = (96, 96, 96)
TEXT = (0, 0, 0)
FONT_SIZE = 14
PAD, GAP = 10, 4  # sheet margin, space between tiles (pixels)


def _pil():
    return require("PIL.Image", "drawing the pictures")


@lru_cache(maxsize=1)
def font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_SIZE)  # Pillow's built-in scalable font


def _text_size(text: str) -> tuple[int, int]:
    if not text:
        return 0, 0
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font())
    return box[2], box[3]  # right and bottom edges: the size from the origin


def signed_colours(kernel: np.ndarray) -> np.ndarray:
    """(C, kt, kh, kw) weights -> (kt, kh, kw, 3) uint8 on the kernel's own symmetric scale: 0 is
    mid grey, +max|w| full intensity, -max|w| none, per channel (RGB kernels as colour, any other
    channel count as grey from the channel mean)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    scale = np.abs(kernel).max()
    unit = 0.5 + 0.5 * kernel / scale if scale > 0 else np.full_like(kernel, 0.5)
    unit = unit if kernel.shape[0] == 3 else np.repeat(unit.mean(0, keepdims=True), 3, axis=0)
    return np.rint(np.moveaxis(unit, 0, -1) * 255).astype(np.uint8)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] -> uint8 RGB on a black-red-yellow-white ramp (brighter is hotter)."""
    h = np.clip(heat, 0, 1)[..., None] * 3
    return np.rint(np.clip(np.concatenate([h, h - 1, h - 2], axis=-1), 0, 1) * 255).astype(np.uint8)


def zoom(tile: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor (each weight or pixel a factor x factor block)."""
    return np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)


def zoom_for(h: int, w: int, target: int) -> int:
    """The integer enlargement that brings the longer side of an h x w tile nearest `target` pixels."""
    return max(1, round(target / max(h, w)))


def fit(frame: np.ndarray, target: int) -> np.ndarray:
    """A (h, w, 3) uint8 frame brought near `target` pixels on its longer side by an integer factor:
    enlarged pixel by pixel, or shrunk by averaging factor x factor blocks (a thin read strip
    still shows, paler)."""
    h, w = frame.shape[:2]
    if max(h, w) < 1.5 * target:
        return zoom(frame, zoom_for(h, w, target))
    shrink = round(max(h, w) / target)
    h, w = h // shrink * shrink, w // shrink * shrink
    blocks = frame[:h, :w].reshape(h // shrink, shrink, w // shrink, shrink, 3).astype(np.float64)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def sheet(tiles: Sequence[Sequence[np.ndarray | None]], title: str = "", row_labels: Sequence[str] = (),
          col_labels: Sequence[str] = ()):
    """A PIL image of `tiles` (rows of equal-size tiles; None leaves a cell empty) with the title
    above, each column's label above its column (bottom-aligned) and each row's label left of its row."""
    pil = _pil()
    from PIL import ImageDraw

    th, tw = next(t for row in tiles for t in row if t is not None).shape[:2]
    cols = max(len(row) for row in tiles)
    label_w = max([_text_size(s)[0] for s in row_labels] + [0])
    title_h = _text_size(title)[1]
    col_h = max([_text_size(s)[1] for s in col_labels] + [0])
    left = PAD + (label_w + GAP if label_w else 0)
    top = PAD + (title_h + GAP if title_h else 0) + (col_h + GAP if col_h else 0)
    cell_h, cell_w = th + 2 + GAP, tw + 2 + GAP  # tile, its 1-pixel frame, the gap
    width = max(left + cols * cell_w - GAP + PAD, PAD + _text_size(title)[0] + PAD)
    canvas = np.full((top + len(tiles) * cell_h - GAP + PAD, width, 3), BACKGROUND, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is None:
                continue
            y, x = top + r * cell_h, left + c * cell_w
            canvas[y:y + th + 2, x:x + tw + 2] = FRAME
            canvas[y + 1:y + 1 + th, x + 1:x + 1 + tw] = tile
    image = pil.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    if title:
        draw.multiline_text((PAD, PAD), title, fill=TEXT, font=font())
    for c, label in enumerate(col_labels):
        if label:
            (w, h), x = _text_size(label), left + c * cell_w
            draw.multiline_text((x + max(0, (tw + 2 - w) // 2), top - GAP - h), label, fill=TEXT, font=font(),
                                align="center")
    for r, label in enumerate(row_labels):
        if label:
            y = top + r * cell_h + max(0, (th + 2 - _text_size(label)[1]) // 2)
            draw.multiline_text((PAD, y), label, fill=TEXT, font=font())
    return image


def save_png(image, path: str) -> str:
    image.save(path, format="PNG")
    return path


def save_gif(images: Sequence, path: str, ms_per_frame: int = 400) -> str:
    """An animated GIF, one frame per image, looping forever. The frames are padded to one size."""
    pil = _pil()
    width, height = max(im.width for im in images), max(im.height for im in images)
    frames = []
    for im in images:
        frame = pil.new("RGB", (width, height), BACKGROUND)
        frame.paste(im, (0, 0))
        frames.append(frame)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return path

"""Drawing boxes with labels onto images, captioned image grids and histograms (PIL).

Boxes are absolute pixel xyxy (x0, y0, x1, y1) in the input image's coordinates.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
    (128, 0, 0), (0, 0, 128), (128, 128, 0), (255, 225, 25), (250, 190, 212), (255, 215, 180),
)


_TAG_ALPHA = 150  # label tags are translucent so that they hide less of the image


def label_color(label: str) -> tuple[int, int, int]:
    """A fixed palette colour for `label` (the same label always gets the same one)."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 (H, W, 3) image, got {array.dtype} {array.shape}.")
    return Image.fromarray(array)


def draw_boxes(
    image: np.ndarray | Image.Image,
    boxes: np.ndarray | Sequence[Sequence[float]],
    labels: Sequence[str],
    scores: np.ndarray | Sequence[float] | None = None,
    *,
    scale: float = 1.0,
    line_width: int = 2,
    font_size: int = 11,
) -> Image.Image:
    """Returns a copy of `image` (enlarged by `scale`) with each box outlined in its
    label's colour and tagged "label" or "label 0.87" when scores are given (tags are
    drawn after all outlines, on translucent backgrounds)."""
    pil = _to_pil(image)
    boxes = np.asarray(boxes, np.float32)
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"Expected boxes of shape (N, 4) in xyxy, got {boxes.shape}.")
    if len(labels) != len(boxes):
        raise ValueError(f"Got {len(boxes)} boxes but {len(labels)} labels.")
    if scores is not None and len(scores) != len(boxes):
        raise ValueError(f"Got {len(boxes)} boxes but {len(scores)} scores.")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}.")
    if scale != 1.0:
        size = (round(pil.width * scale), round(pil.height * scale))
        pil = pil.resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR)
    overlay = Image.new("RGBA", pil.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    font = _font(font_size)
    for box, label in zip(boxes * scale, labels):
        x0, y0, x1, y1 = (float(v) for v in box)
        # Pixel edges to PIL's inclusive corners; a box under a pixel is drawn as one pixel.
        draw.rectangle([x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)], outline=label_color(label) + (255,),
                       width=line_width)
    for k, (box, label) in enumerate(zip(boxes * scale, labels)):  # tags over all outlines
        color = label_color(label)
        x0, y0 = float(box[0]), float(box[1])
        text = label if scores is None else f"{label} {float(scores[k]):.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside when at the top
        tx = min(max(x0, 0.0), max(pil.width - tw, 0.0))
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=color + (_TAG_ALPHA,))
        ink = (0, 0, 0, 255) if sum(color) > 382 else (255, 255, 255, 255)
        draw.text((tx + 2 - tx0, ty + 2 - ty0), text, fill=ink, font=font)
    return Image.alpha_composite(pil.convert("RGBA"), overlay).convert("RGB")


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of `text` into lines no wider than `width` pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def image_grid(
    images: Sequence[np.ndarray | Image.Image],
    captions: Sequence[str],
    cols: int,
    *,
    pad: int = 6,
    font_size: int = 11,
) -> Image.Image:
    """Composes `images` row by row, `cols` per row, each with its caption wrapped
    beneath it, on a white sheet. Cells are as large as the largest image."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    if len(captions) != len(images):
        raise ValueError(f"Got {len(images)} images but {len(captions)} captions.")
    if cols < 1:
        raise ValueError(f"cols must be at least 1, got {cols}.")
    pils = [_to_pil(im) for im in images]
    font = _font(font_size)
    cell_w = max(p.width for p in pils)
    cell_h = max(p.height for p in pils)
    wrapped = [_wrap(c, font, cell_w) for c in captions]
    line_h = font_size + 3
    text_h = line_h * max(len(w) for w in wrapped)
    rows = -(-len(pils) // cols)
    cols = min(cols, len(pils))
    sheet = Image.new(
        "RGB",
        (pad + cols * (cell_w + pad), pad + rows * (cell_h + text_h + 2 * pad)),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for k, (pil, lines) in enumerate(zip(pils, wrapped)):
        r, c = divmod(k, cols)
        x = pad + c * (cell_w + pad)
        y = pad + r * (cell_h + text_h + 2 * pad)
        sheet.paste(pil, (x, y))
        for n, line in enumerate(lines):
            draw.text((x, y + cell_h + pad // 2 + n * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def histogram(
    counts: Sequence[int],
    value_range: tuple[float, float],
    *,
    marker: float | None = None,
    title: str = "",
    size: tuple[int, int] = (480, 240),
    font_size: int = 11,
) -> Image.Image:
    """A bar chart of histogram `counts` over equal bins of `value_range`, with the
    range's ends and the largest count labelled and an optional vertical `marker`
    line (e.g. a threshold)."""
    width, height = size
    font = _font(font_size)
    pad, top, bottom = 8, 2 * font_size + 8, font_size + 10
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((pad, 4), title, fill=(0, 0, 0), font=font)
    peak = max(max(counts, default=0), 1)
    draw.text((pad, font_size + 6), f"max {max(counts, default=0)}", fill=(90, 90, 90), font=font)
    x0, x1, y0, y1 = pad, width - pad, top, height - bottom
    bar_w = (x1 - x0) / max(len(counts), 1)
    for i, count in enumerate(counts):
        bar_top = y1 - (y1 - y0) * count / peak
        draw.rectangle([x0 + i * bar_w + 1, bar_top, x0 + (i + 1) * bar_w - 1, y1], fill=(70, 110, 170))
    draw.line([x0, y1, x1, y1], fill=(0, 0, 0))
    low, high = value_range
    draw.text((x0, y1 + 3), f"{low:g}", fill=(0, 0, 0), font=font)
    end_label = f"{high:g}"
    draw.text((x1 - font.getlength(end_label), y1 + 3), end_label, fill=(0, 0, 0), font=font)
    if marker is not None and high > low:
        mx = x0 + (x1 - x0) * (marker - low) / (high - low)
        draw.line([mx, y0, mx, y1], fill=(200, 0, 0), width=2)
    return image

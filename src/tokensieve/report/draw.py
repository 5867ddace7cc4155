"""Pictures drawn with Pillow alone: kept-patch strips, accuracy-vs-retain line charts and
grouped bar charts (speed-ups per configuration)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "bar_chart", "kept_patches_strip", "line_chart"]

#: Line colours of the charts, one per series, in order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow without sizes
        return ImageFont.load_default()


def kept_patches_strip(
    frames: np.ndarray,
    kept: Sequence[Sequence[int]],
    grid: int,
    *,
    title: str = "",
    focus: Sequence[Sequence[tuple[int, int]]] | None = None,
    scale: int = 3,
    path: str | Path | None = None,
) -> Image.Image:
    """One row of frames with the kept visual tokens shown and the dropped ones dimmed.

    Args:
        frames: uint8 ``[T, H, W, 3]``.
        kept: per frame, the kept token indices in raster order of a ``grid × grid`` layout.
        grid: tokens per side of a frame.
        title: text drawn above the row.
        focus: per frame, cells ``(row, col)`` to outline (what the question is about).
        scale: pixel magnification.
        path: save the picture there as PNG when given.

    Each frame is labelled with its budget (kept tokens / tokens per frame) under it.
    """
    t, h, w, _ = frames.shape
    fh, fw = h * scale, w * scale
    gap, top, bottom = 4, 22 if title else 4, 34
    width = t * fw + (t + 1) * gap
    canvas = Image.new("RGB", (width, top + fh + bottom), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    if title:
        draw.text((gap, 4), title, fill=(0, 0, 0), font=font)
    cell_h, cell_w = fh / grid, fw / grid
    per_frame = grid * grid
    max_kept = max((len(k) for k in kept), default=1) or 1
    for i in range(t):
        img = Image.fromarray(frames[i]).resize((fw, fh), Image.Resampling.NEAREST)
        arr = np.asarray(img).astype(np.float32)
        dim = np.full((grid, grid), True)
        for k in kept[i]:
            dim[k // grid, k % grid] = False
        mask = np.kron(dim, np.ones((int(cell_h), int(cell_w)), bool))
        arr[mask] = arr[mask] * 0.22 + 255 * 0.08
        frame = Image.fromarray(arr.astype(np.uint8))
        x0 = gap + i * (fw + gap)
        canvas.paste(frame, (x0, top))
        for k in kept[i]:
            r, c = divmod(k, grid)
            box = (x0 + c * cell_w, top + r * cell_h, x0 + (c + 1) * cell_w - 1, top + (r + 1) * cell_h - 1)
            draw.rectangle(box, outline=(255, 255, 255), width=1)
        if focus is not None:
            for r, c in focus[i]:
                box = (x0 + c * cell_w - 1, top + r * cell_h - 1, x0 + (c + 1) * cell_w, top + (r + 1) * cell_h)
                draw.rectangle(box, outline=(255, 0, 0), width=2)
        # per-frame budget: a bar and the count
        bar_w = int((fw - 4) * len(kept[i]) / max(max_kept, 1))
        y = top + fh + 4
        draw.rectangle((x0 + 2, y, x0 + 2 + bar_w, y + 8), fill=(31, 119, 180))
        draw.text((x0 + 2, y + 11), f"{len(kept[i])}/{per_frame}", fill=(0, 0, 0), font=_font(12))
    if path is not None:
        canvas.save(str(path))
    return canvas


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] = (0.0, 1.0),
    hline: tuple[float, str] | None = None,
    size: tuple[int, int] = (760, 480),
    path: str | Path | None = None,
) -> Image.Image:
    """A line chart: one line per series of ``(x, y)`` points, a legend, optional horizontal reference line."""
    width, height = size
    left, right, top, bottom = 64, 170, 40, 56
    canvas = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    xs = sorted({x for pts in series.values() for x, _ in pts})
    if not xs:
        xs = [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pad = 0.04 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_lo, y_hi = ylim
    pw, ph = width - left - right, height - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * pw, top + (1 - (y - y_lo) / (y_hi - y_lo)) * ph)

    draw.text((left, 10), title, fill=(0, 0, 0), font=font)
    draw.rectangle((left, top, left + pw, top + ph), outline=(0, 0, 0))
    for i in range(6):
        y = y_lo + (y_hi - y_lo) * i / 5
        _, yy = px(x_lo, y)
        draw.line((left, yy, left + pw, yy), fill=(225, 225, 225))
        draw.text((left - 40, yy - 7), f"{y:.2f}", fill=(0, 0, 0), font=small)
    for x in xs:
        xx, _ = px(x, y_lo)
        draw.line((xx, top, xx, top + ph), fill=(235, 235, 235))
        draw.text((xx - 12, top + ph + 6), f"{x:g}", fill=(0, 0, 0), font=small)
    draw.text((left + pw / 2 - 30, height - 24), xlabel, fill=(0, 0, 0), font=font)
    draw.text((6, top - 24), ylabel, fill=(0, 0, 0), font=small)
    if hline is not None:
        value, label = hline
        _, yy = px(x_lo, value)
        for x0 in range(int(left), int(left + pw), 10):
            draw.line((x0, yy, x0 + 5, yy), fill=(120, 120, 120), width=1)
        draw.text((left + 4, yy - 15), label, fill=(90, 90, 90), font=small)
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)
        coords = [px(x, y) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        ly = top + 6 + i * 18
        draw.line((left + pw + 12, ly + 7, left + pw + 32, ly + 7), fill=colour, width=3)
        draw.text((left + pw + 38, ly), name, fill=(0, 0, 0), font=small)
    if path is not None:
        canvas.save(str(path))
    return canvas


def bar_chart(
    groups: dict[str, dict[str, float]],
    *,
    title: str,
    ylabel: str,
    hline: tuple[float, str] | None = None,
    path: str | Path | None = None,
) -> Image.Image:
    """Grouped horizontal bars: one group per key of ``groups`` (a configuration), one bar per
    series inside it (e.g. prefill and end-to-end speed-up), the value written at the bar's end."""
    series = list(dict.fromkeys(k for g in groups.values() for k in g))
    font, small = _font(14), _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 20 + int(max([measure.textlength(name, font=small) for name in groups] + [100.0]))
    right, top, bar_h, gap = 90, 44, 14, 12
    height = top + len(groups) * (len(series) * bar_h + gap) + 40 + 18 * len(series)
    width = label_w + 560 + right
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    hi = max([v for g in groups.values() for v in g.values()] + [hline[0] if hline else 0.0, 1e-9]) * 1.08
    pw = width - label_w - right

    def px(v: float) -> float:
        return label_w + v / hi * pw

    draw.text((10, 10), title, fill=(0, 0, 0), font=font)
    y = top
    for name, values in groups.items():
        draw.text((10, y + (len(series) * bar_h) / 2 - 7), name, fill=(0, 0, 0), font=small)
        for i, key in enumerate(series):
            if key in values:
                v = values[key]
                draw.rectangle((label_w, y, px(v), y + bar_h - 2), fill=PALETTE[i % len(PALETTE)])
                draw.text((px(v) + 4, y), f"{v:.2f}", fill=(0, 0, 0), font=small)
            y += bar_h
        y += gap
    if hline is not None:
        value, label = hline
        xx = px(value)
        for y0 in range(top - 6, y, 8):
            draw.line((xx, y0, xx, y0 + 4), fill=(120, 120, 120))
        draw.text((xx + 3, top - 18), label, fill=(90, 90, 90), font=small)
    draw.text((label_w, y + 2), ylabel, fill=(0, 0, 0), font=small)
    for i, key in enumerate(series):
        ly = y + 22 + i * 18
        draw.rectangle((label_w, ly + 2, label_w + 16, ly + 12), fill=PALETTE[i % len(PALETTE)])
        draw.text((label_w + 22, ly), key, fill=(0, 0, 0), font=small)
    if path is not None:
        canvas.save(str(path))
    return canvas

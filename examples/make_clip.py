"""Write ``examples/clip.mp4``: 24 frames, 64×64, a red square crossing a blue field, and a
green circle that shows up for three frames only. Used by the README's first command.

    python examples/make_clip.py [PATH]
"""

from __future__ import annotations

import sys
from fractions import Fraction

import av
import numpy as np


def frames(n: int = 24, size: int = 64) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for t in range(n):
        img = np.zeros((size, size, 3), dtype=np.uint8)
        img[..., 2] = 160 + (xx // 8 % 2) * 40  # striped blue background
        x0 = 4 + t * 2
        img[20:36, x0 : x0 + 16] = (220, 30, 30)
        if 10 <= t < 13:
            disc = (yy - 48) ** 2 + (xx - 48) ** 2 < 64
            img[disc] = (30, 200, 60)
        out.append(img)
    return out


def main(path: str = "examples/clip.mp4") -> None:
    with av.open(path, mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, 8)
        for img in frames():
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Camera pixels -> the model's input: normalisation and down-scaling, as the bundle says.

Normalisation is part of the model, never guessed from the data: a pixel value v becomes
v / (2**bit_depth - 1) (8 bits for uint8 frames; 16, 12 or 10 for uint16 frames, whatever the
model was trained with). No "if image.max() > 1" heuristics.

Down-scaling is part of the model too (the paper trains on 256x256 down-scaled images). Two
kinds:

* ``downscale = n`` (the daemon's kind): the mean of every n x n block. An integer block factor
  is exact to stream: n camera lines make one model line whatever the frame heights, and the
  same floating-point operations happen in the same order as offline (rows are summed one at a
  time, then columns), so streaming stays bit-identical to offline. A width that is not a
  multiple of n is padded by repeating the last column; a segment whose length is not a multiple
  of n is padded by repeating its last line.
* ``resize = (w, h)``: a fixed-size area resize (the paper's 256x256), for offline inspection of
  images of one size only. The daemon refuses it: a fixed size means nothing for an endless web.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class InputSpec:
    bit_depth: int = 8
    downscale: int = 1
    resize: tuple[int, int] | None = None  # (width, height)

    def __post_init__(self) -> None:
        if not 1 <= self.bit_depth <= 16:
            raise ValueError(f"bit_depth must be in 1..16, got {self.bit_depth}")
        if self.downscale < 1:
            raise ValueError(f"downscale must be >= 1, got {self.downscale}")
        if self.resize is not None and (self.resize[0] < 1 or self.resize[1] < 1):
            raise ValueError(f"resize must be positive, got {self.resize}")
        if self.resize is not None and self.downscale != 1:
            raise ValueError("give either a resize or a downscale factor, not both")

    @property
    def streamable(self) -> bool:
        return self.resize is None

    def normalise(self, pixels: npt.NDArray[np.generic]) -> F32:
        scale = np.float32(1.0 / (2**self.bit_depth - 1))
        out: F32 = pixels.astype(np.float32) * scale
        return out

    def model_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the model's view of an image of this size."""
        if self.resize is not None:
            return self.resize[1], self.resize[0]
        n = self.downscale
        return math.ceil(height / n), math.ceil(width / n)

    def to_model(self, pixels: npt.NDArray[np.generic]) -> F32:
        """Normalised and down-scaled float32 image for the model."""
        x = self.normalise(pixels)
        if self.resize is not None:
            out: F32 = cv2.resize(x, self.resize, interpolation=cv2.INTER_AREA)
            return out
        return block_mean(x, self.downscale)

    def box_to_original(
        self, y0: int, y1: int, x0: int, x1: int, height: int, width: int
    ) -> tuple[int, int, int, int]:
        """A model-pixel box (end exclusive) -> the original image's pixel box, clipped."""
        if self.resize is None:
            n = self.downscale
            return y0 * n, min(y1 * n, height), x0 * n, min(x1 * n, width)
        mh, mw = self.model_shape(height, width)
        sy, sx = height / mh, width / mw
        return (
            math.floor(y0 * sy),
            min(math.ceil(y1 * sy), height),
            math.floor(x0 * sx),
            min(math.ceil(x1 * sx), width),
        )

    def area_to_original(self, area: int, height: int, width: int) -> int:
        """Model pixels -> camera pixels: n*n each for a 1/n down-scaling (exact to stream)."""
        if self.resize is None:
            return area * self.downscale * self.downscale
        mh, mw = self.model_shape(height, width)
        return round(area * (height / mh) * (width / mw))

    def to_dict(self) -> dict[str, object]:
        return {
            "bit_depth": self.bit_depth,
            "downscale": self.downscale,
            "resize": list(self.resize) if self.resize else None,
            "normalisation": f"value / (2**{self.bit_depth} - 1)",
        }


def block_mean(x: F32, n: int) -> F32:
    """Mean of every n x n block; ragged edges are padded by repetition (see module doc)."""
    if n == 1:
        return x
    h, w = x.shape
    pad_h, pad_w = (-h) % n, (-w) % n
    if pad_h or pad_w:
        x = np.pad(x, ((0, pad_h), (0, pad_w)), mode="edge")
    rows = x[0::n].copy()
    for i in range(1, n):
        rows += x[i::n]
    cols = rows[:, 0::n].copy()
    for j in range(1, n):
        cols += rows[:, j::n]
    out: F32 = cols * np.float32(1.0 / (n * n))
    return out


def upscale_to(image: F32, height: int, width: int, spec: InputSpec, nearest: bool) -> F32:
    """A model-scale map back to the original image size, for pictures (not for regions)."""
    if image.shape == (height, width):
        return image
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    if spec.resize is None:
        n = spec.downscale
        big = np.repeat(np.repeat(image, n, axis=0), n, axis=1) if nearest else None
        if big is not None:
            out: F32 = np.ascontiguousarray(big[:height, :width])
            return out
        full = cv2.resize(image, (image.shape[1] * n, image.shape[0] * n), interpolation=interp)
        return np.ascontiguousarray(full[:height, :width])
    resized: F32 = cv2.resize(image, (width, height), interpolation=interp)
    return resized

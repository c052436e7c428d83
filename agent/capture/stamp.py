"""A machine-readable stamp in the image itself: frame number and wall-clock capture time.

Written by the synthetic source and read back after encode, network and decode, so a
receiving room can measure glass-to-glass latency and spot lost frames without any
side channel. Layout, at the top-left corner: a grid of black/white square blocks,
``width // 80`` pixels each (16 px at 1280 wide: whole H.264 macroblocks and JPEG MCUs,
so compression keeps them clean), 80 blocks a row. The first two blocks are a white and
a black reference for the threshold; then, most significant bit first, a magic byte,
the 32-bit frame number, the 64-bit ``time.time_ns()`` and a CRC-16 over those 13 bytes.
Wall-clock rather than monotonic time because sender and receiver are different machines
(both NTP-synchronised); on one machine the two clocks give the same latencies.
"""

from __future__ import annotations

import binascii
import math
import struct
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

_MAGIC = 0xA5
_PAYLOAD = struct.Struct(">BIQ")  # magic, frame number, time_ns
_CELLS = 2 + 8 * (_PAYLOAD.size + 2)  # references + payload + CRC-16
_MAX_COLUMNS = 80
_MIN_BLOCK = 4
_MIN_CONTRAST = 64.0


@dataclass(frozen=True, slots=True)
class Stamp:
    frame: int  # wraps at 2**32
    time_ns: int  # time.time_ns() when the image was made

    def age_s(self, now_ns: int | None = None) -> float:
        """Seconds since the image was made, by this machine's wall clock."""
        return ((time.time_ns() if now_ns is None else now_ns) - self.time_ns) / 1e9


def stamp_geometry(width: int) -> tuple[int, int, int]:
    """(block size px, blocks per row, rows) for an image ``width`` pixels wide."""
    block = max(_MIN_BLOCK, width // _MAX_COLUMNS)
    columns = min(_MAX_COLUMNS, width // block)
    return block, columns, math.ceil(_CELLS / columns)


def stamp_height(width: int) -> int:
    """Pixel rows the stamp covers, so a pattern can keep its own drawing below it."""
    block, _, rows = stamp_geometry(width)
    return block * rows


def _bits(stamp: Stamp) -> NDArray[np.uint8]:
    payload = _PAYLOAD.pack(_MAGIC, stamp.frame & 0xFFFFFFFF, stamp.time_ns & (2**64 - 1))
    crc = binascii.crc_hqx(payload, 0xFFFF)
    data = np.frombuffer(payload + struct.pack(">H", crc), dtype=np.uint8)
    return np.concatenate([np.array([1, 0], dtype=np.uint8), np.unpackbits(data)])


def draw_stamp(image: NDArray[np.uint8], stamp: Stamp) -> None:
    """Write ``stamp`` into the top-left corner of ``image`` (BGR or grey), in place."""
    height, width = image.shape[:2]
    block, columns, rows = stamp_geometry(width)
    if rows * block > height:
        raise ValueError(f"image {width}x{height} is too small for a stamp")
    cells = np.zeros(rows * columns, dtype=np.uint8)
    cells[_CELLS:] = np.arange(rows * columns - _CELLS, dtype=np.uint8) & 1  # visible filler
    cells[:_CELLS] = _bits(stamp)
    grid = cells.reshape(rows, columns) * np.uint8(255)
    pixels = np.repeat(np.repeat(grid, block, axis=0), block, axis=1)
    region = image[: rows * block, : columns * block]
    if image.ndim == 3:
        region[...] = pixels[:, :, None]
    else:
        region[...] = pixels


def read_stamp(image: NDArray[np.uint8]) -> Stamp | None:
    """Decode a stamp written by :func:`draw_stamp`; None if absent or damaged.

    Samples the centre half of each block (edges are where compression smears), thresholds
    halfway between the two reference blocks, and checks the magic byte and the CRC, so a
    natural image or a badly damaged one gives None rather than a wrong number.
    """
    if image.ndim not in (2, 3) or image.shape[0] == 0:
        return None
    height, width = image.shape[:2]
    block, columns, rows = stamp_geometry(width)
    if rows * block > height:
        return None
    region = image[: rows * block, : columns * block]
    if region.ndim == 2:
        region = region[:, :, None]
    quarter = block // 4
    blocks = region.reshape(rows, block, columns, block, region.shape[2])
    centres = blocks[:, quarter : block - quarter, :, quarter : block - quarter]
    levels = centres.mean(axis=(1, 3, 4), dtype=np.float32).reshape(-1)[:_CELLS]
    white, black = float(levels[0]), float(levels[1])
    if white - black < _MIN_CONTRAST:
        return None
    bits = (levels[2:] > (white + black) / 2).astype(np.uint8)
    data = np.packbits(bits).tobytes()
    payload, crc = data[: _PAYLOAD.size], data[_PAYLOAD.size :]
    if binascii.crc_hqx(payload, 0xFFFF) != struct.unpack(">H", crc)[0]:
        return None
    magic, frame, time_ns = _PAYLOAD.unpack(payload)
    if magic != _MAGIC:
        return None
    return Stamp(frame=frame, time_ns=time_ns)

"""A minimal PNG writer (standard library only): 8-bit palette or RGB images, no row filter.

The QC picture is written with it instead of an imaging library, whose import alone cost about
as much as drawing the picture.  The bytes depend only on the pixels, the palette and the zlib
level: the same picture gives the same file.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["png_bytes"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(pixels: np.ndarray, palette: np.ndarray | None = None, level: int = 1) -> bytes:
    """Encode an image as PNG.

    Parameters
    ----------
    pixels : (H, W) uint8 array of palette indices, or (H, W, 3) uint8 RGB array
    palette : (n, 3) uint8 array, n <= 256, optional
        The colours of the indices; required with (H, W) ``pixels``, which must be < n.
    level : int
        zlib compression level (0-9).

    Returns
    -------
    bytes
        The PNG file: IHDR (bit depth 8, colour type 3 with a PLTE chunk, or 2 for RGB), one
        IDAT of filter-0 rows, IEND.
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    if pixels.ndim == 2:
        if palette is None or not 0 < len(palette) <= 256:
            raise ValueError("a palette image needs a palette of 1 to 256 colours")
        colour_type, rows = 3, pixels
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour_type, rows = 2, pixels.reshape(height, width * 3)
    else:
        raise ValueError(f"PNG pixels must be (H, W) or (H, W, 3); got shape {pixels.shape}")
    raw = np.zeros((height, rows.shape[1] + 1), dtype=np.uint8)  # filter byte 0 per row
    raw[:, 1:] = rows
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    if colour_type == 3:
        chunks.append(_chunk(b"PLTE", np.asarray(palette, dtype=np.uint8).tobytes()))
    chunks.append(_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)))
    chunks.append(_chunk(b"IEND", b""))
    return _SIGNATURE + b"".join(chunks)

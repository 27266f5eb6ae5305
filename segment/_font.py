"""A small bitmap font for the QC picture's text, drawn with numpy (no imaging library).

The glyphs are printable ASCII (32-126) of Pillow's bitmap default font
(``PIL.ImageFont.load_default_imagefont()`` of Pillow 13.0, the X11 bitmap font "courB08"):
6 x 11 pixels each, one byte per row (the 6 high bits, left to right), written as hex.  They
were read out of Pillow once, at development time.  Pillow is distributed under the HPND licence
(permissive: use, copy, modify and distribute with its copyright notice: "Copyright (c) 1997-2011
by Secret Labs AB, (c) 1995-2011 by Fredrik Lundh and contributors, (c) 2010 by Jeffrey A. Clark
and contributors").  Other characters are drawn as ``?``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["GLYPH_H", "GLYPH_W", "draw_text", "text_mask", "text_size"]

GLYPH_W, GLYPH_H = 6, 11
_FIRST = 32
# fmt: off
_GLYPHS = (
    "0000000000000000000000", "0000006060606000600000", "0000005050500000000000",  # ' !"'
    "00005050f85050f8505000", "002078c8f07818d8f02000", "0000e0a8f02078a8380000",  # '#$%'
    "00000070c060f8b0f80000", "0000302040000000000000", "0000102060606060201000",  # "&'("
    "0000402030303030204000", "000020f060900000000000", "0000002020f82020000000",  # ')*+'
    "0000000000000000302040", "0000000000f80000000000", "0000000000000000600000",  # ',-.'
    "0000080810102020404000", "000070d8d8d8d8d8700000", "000030f030303030fc0000",  # '/01'
    "000070d8183060d8f80000", "000070d8187018d8700000", "0000183858d8fc18180000",  # '234'
    "0000f8c0f0d81898f00000", "000070d8c0f0d8d8700000", "0000f8d818303060600000",  # '567'
    "000070d8d870d8d8700000", "000070d8d87818d8700000", "0000000000600000600000",  # '89:'
    "0000000000600000604080", "0000003060c06030000000", "00000000f000f000000000",  # ';<='
    "0000006030183060000000", "0000007098306000600000", "000070c898a8a89cc07000",  # '>?@'
    "000000f07050f8d8dc0000", "000000f0d8f0d8d8f00000", "00000078d8c0c0d8700000",  # 'ABC'
    "000000f0d8d8d8d8f00000", "000000f8c0f0c0d8f80000", "000000f8c0f0c0c0e00000",  # 'DEF'
    "00000070d8c0f8d8780000", "000000dcd8f8d8d8dc0000", "000000f060606060f00000",  # 'GHI'
    "000000783030b0b0e00000", "000000d8d0e0f0d8ec0000", "000000e0c0c0c0d8f80000",  # 'JKL'
    "00000088d8d8f8a8a80000", "000000dce8e8d8d8c80000", "00000070d8d8d8d8700000",  # 'MNO'
    "000000f0d8d8f0c0e00000", "00000070d8d8d8d8701800", "000000f0d8d8f0d8ec0000",  # 'PQR'
    "00000078c8f03898f00000", "000000f868606060f00000", "000000dcd8d8d8d8700000",  # 'STU'
    "000000dcd8507070200000", "000000aca8a8f870500000", "000000cc78303078cc0000",  # 'VWX'
    "000000cccc783030780000", "000000f8d83060d8f80000", "0000706060606060607000",  # 'YZ['
    "0000808040402020101000", "0000703030303030307000", "00002070d8000000000000",  # '\\]^'
    "00000000000000000000fc", "0000602010000000000000", "0000000070d878d8fc0000",  # '_`a'
    "0000c0c0f0d8d8d8f00000", "0000000070d8c0d8700000", "0000381878d8d8d87c0000",  # 'bcd'
    "0000000070d8f8c0780000", "00003860f8606060f80000", "000000006cd8d8d87818f0",  # 'efg'
    "0000c0c0f0d8d8d8d80000", "00003000f0303030fc0000", "00003000f03030303030e0",  # 'hij'
    "0000c0c0d8f0e0f0dc0000", "0000f03030303030fc0000", "00000000f0f8a8a8a80000",  # 'klm'
    "00000000b0d8d8d8d80000", "0000000070d8d8d8700000", "00000000f0d8d8d8f0c0e0",  # 'nop'
    "000000006cd8d8d878183c", "00000000dc746060f00000", "0000000078e0781cf80000",  # 'qrs'
    "00006060f860606c380000", "00000000d8d8d8d87c0000", "00000000d8d87070200000",  # 'tuv'
    "00000000aca8f878500000", "00000000ec783078dc0000", "00000000dcd8d8507060c0",  # 'wxy'
    "00000000f8b060d8f80000", "0000183030603030301800", "0000002020202020202000",  # 'z{|'
    "0000c0606030606060c000", "0000000068b00000000000",  # '}~'
)
# fmt: on


@lru_cache(maxsize=1)
def _bitmaps() -> np.ndarray:
    """(95, GLYPH_H, GLYPH_W) bool glyphs of characters 32..126."""
    rows = np.frombuffer(bytes.fromhex("".join(_GLYPHS)), dtype=np.uint8)
    bits = np.unpackbits(rows.reshape(len(_GLYPHS), GLYPH_H, 1), axis=2)
    return bits[:, :, :GLYPH_W].astype(bool)


def text_size(text: str) -> tuple[int, int]:
    """(width, height) in pixels of ``text``: ``GLYPH_W`` per character, ``GLYPH_H`` high."""
    return GLYPH_W * len(text), GLYPH_H


def text_mask(text: str) -> np.ndarray:
    """(GLYPH_H, GLYPH_W * len(text)) bool: the pixels of ``text`` (one line)."""
    codes = np.array([ord(c) for c in text], dtype=np.intp) - _FIRST
    codes[(codes < 0) | (codes >= len(_GLYPHS))] = ord("?") - _FIRST
    glyphs = _bitmaps()[codes]  # (n, H, W)
    return glyphs.transpose(1, 0, 2).reshape(GLYPH_H, GLYPH_W * len(text))


def draw_text(canvas: np.ndarray, x: int, y: int, text: str, colour, stroke=None) -> None:
    """Draw ``text`` into the (H, W, 3) ``canvas`` in place, its top-left corner at (x, y).

    The text pixels are exactly ``colour`` (no anti-aliasing); with ``stroke`` (an RGB colour),
    each glyph is first outlined by a 1-pixel border of that colour (readable on any
    background).  Pixels outside the canvas are skipped.
    """
    if not text:
        return
    glyphs = text_mask(text)
    mask = np.zeros((GLYPH_H + 2, glyphs.shape[1] + 2), dtype=bool)  # starts at (x - 1, y - 1)
    mask[1:-1, 1:-1] = glyphs
    layers = [(mask, colour)]
    if stroke is not None:
        border = np.zeros_like(mask)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                border[dy : dy + GLYPH_H, dx : dx + glyphs.shape[1]] |= glyphs
        layers.insert(0, (border, stroke))
    top, left = y - 1, x - 1
    y0, x0 = max(top, 0), max(left, 0)
    y1 = min(top + mask.shape[0], canvas.shape[0])
    x1 = min(left + mask.shape[1], canvas.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    region = canvas[y0:y1, x0:x1]
    for layer, fill in layers:
        region[layer[y0 - top : y1 - top, x0 - left : x1 - left]] = fill

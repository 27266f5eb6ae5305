"""A seeded fuzzer of NIfTI headers and gzip streams (shared by tests/ and benchmarks/).

``mutations(seed, n)`` yields ``(name, kind, bytes)``: a small valid ``.nii.gz`` (or ``.nii``)
changed in one hostile way. ``kind`` says what was changed; ``corrupt_gzip(data)`` is the
oracle of what ``gzip -t`` rejects (the whole stream must decompress and pass every member's
CRC-32 and length check).
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib

import nibabel as nib
import numpy as np

#: (offset, struct format) of NIfTI-1 header fields worth lying in.
HEADER_FIELDS = {
    "sizeof_hdr": (0, "<i"),
    "dim0": (40, "<h"),
    "dim1": (42, "<h"),
    "dim2": (44, "<h"),
    "dim3": (46, "<h"),
    "dim4": (48, "<h"),
    "dim5": (50, "<h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim0": (76, "<f"),
    "pixdim1": (80, "<f"),
    "pixdim2": (84, "<f"),
    "pixdim3": (88, "<f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "xyzt_units": (123, "<B"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "quatern_b": (256, "<f"),
    "srow_x0": (280, "<f"),
    "magic": (344, "<4s"),
}
_INT_VALUES = (0, -1, 1, 2, 7, 71, 255, 256, 1024, 2000, 32767, -32768)
_FLOAT_VALUES = (0.0, -1.0, 1e-30, 1e30, 1e38, float("nan"), float("inf"), -float("inf"), 2.0**63,
                 352.0, 351.0, 1e9)  # fmt: skip
_DATATYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304,
              4096, 3, 9999)  # fmt: skip


def base_volume(seed: int = 0) -> np.ndarray:
    """An (8, 9, 10) int16 volume of three tissues with noise."""
    rng = np.random.default_rng(seed)
    levels = np.repeat([100, 200, 300], [3, 3, 4])[None, None, :]
    return (levels + rng.normal(0, 10, (8, 9, 10))).astype(np.int16)


def nifti_bytes(volume: np.ndarray | None = None) -> bytes:
    """Uncompressed NIfTI-1 bytes of ``volume`` (default :func:`base_volume`)."""
    volume = base_volume() if volume is None else volume
    img = nib.Nifti1Image(volume, np.diag([1.5, 2.0, 2.5, 1.0]))
    img.header.set_xyzt_units("mm")
    stream = io.BytesIO()
    img.to_stream(stream)
    return stream.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def corrupt_gzip(data: bytes) -> bool:
    """Whether ``gzip -t`` would reject ``data`` (any member fails to decompress or check)."""
    if len(data) >= 4 and data[3] & 0xE0:  # reserved flag bits (gzip -t: "not supported")
        return True
    try:
        gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return True
    return False


def _set_field(raw: bytearray, field: str, rng: np.random.Generator) -> str:
    offset, fmt = HEADER_FIELDS[field]
    if fmt == "<f":
        value = float(rng.choice(_FLOAT_VALUES))
    elif fmt == "<4s":
        value = bytes(rng.choice([b"n+1\0", b"ni1\0", b"n+2\0", b"xxxx", b"\0\0\0\0"]))
    elif field == "datatype":
        value = int(rng.choice(_DATATYPES))
    elif fmt == "<B":
        value = int(rng.integers(0, 256))
    else:
        value = int(rng.choice(_INT_VALUES))
    struct.pack_into(fmt, raw, offset, value)
    return f"{field}={value!r}"


def mutate_header(raw: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One to three header fields set to hostile values, or random bytes of the header flipped."""
    out = bytearray(raw)
    if rng.random() < 0.75:
        fields = rng.choice(list(HEADER_FIELDS), size=int(rng.integers(1, 4)), replace=False)
        what = ",".join(_set_field(out, str(f), rng) for f in fields)
    else:
        where = rng.integers(0, 352, size=int(rng.integers(1, 6)))
        for i in where:
            out[int(i)] ^= int(rng.integers(1, 256))
        what = "flip header bytes " + ",".join(str(int(i)) for i in where)
    return what, bytes(out)


def mutate_gzip(stream: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """A damaged gzip stream of a valid NIfTI: bytes flipped, cut, trailer or header changed."""
    out = bytearray(stream)
    choice = int(rng.integers(0, 7))
    if choice == 0:  # flip deflate bytes
        i = int(rng.integers(10, len(out) - 8))
        out[i] ^= int(rng.integers(1, 256))
        return f"flip deflate byte {i}", bytes(out)
    if choice == 1:  # cut short
        n = int(rng.integers(1, len(out)))
        return f"truncate to {n} bytes", bytes(out[:n])
    if choice == 2:  # CRC-32
        out[-8 + int(rng.integers(0, 4))] ^= 0xFF
        return "bad CRC-32", bytes(out)
    if choice == 3:  # ISIZE
        out[-4 + int(rng.integers(0, 4))] ^= 0xFF
        return "bad ISIZE", bytes(out)
    if choice == 4:  # trailing garbage
        return "trailing garbage", bytes(out) + bytes(rng.integers(1, 256, 16, dtype=np.uint8))
    if choice == 5:  # header flags byte
        out[3] = int(rng.integers(0, 256))
        return f"gzip FLG {out[3]}", bytes(out)
    # a second member that is cut short
    second = gz(b"\0" * 1000)
    return "cut second member", bytes(out) + second[: int(rng.integers(1, len(second) - 1))]


def mutations(seed: int, n: int):
    """``n`` hostile files ``(name, kind, what, data)``; kind: header, header-nii or gzip."""
    rng = np.random.default_rng(seed)
    raw = nifti_bytes()
    clean_gz = gz(raw)
    for i in range(n):
        roll = rng.random()
        if roll < 0.45:
            what, data = mutate_header(raw, rng)
            yield f"h{i:04d}.nii.gz", "header", what, gz(data)
        elif roll < 0.6:
            what, data = mutate_header(raw, rng)
            yield f"n{i:04d}.nii", "header-nii", what, data
        else:
            what, data = mutate_gzip(clean_gz, rng)
            yield f"g{i:04d}.nii.gz", "gzip", what, data


def huge_header_file(shape=(2000, 2000, 2000), dtype=np.float32) -> bytes:
    """A few-kB ``.nii.gz`` whose header claims ``shape`` (the data are one small volume)."""
    raw = bytearray(nifti_bytes(np.zeros((8, 9, 10), dtype=dtype)))
    struct.pack_into("<8h", raw, 40, 3, *shape, 1, 1, 1, 1)
    return gz(bytes(raw))

"""gzip members of our ``.nii.gz`` outputs: deterministic (mtime 0), compressed in parallel."""

from __future__ import annotations

import errno
import os
import shutil
import zlib
from collections import deque
from pathlib import Path

#: gzip level of .nii.gz outputs. Level 1 writes probability maps about 3x faster than
#: level 6 for files about 10 % larger; nibabel's own default is also 1.
DEFAULT_COMPRESSLEVEL = 1
#: How our gzip members choose their zlib strategy: a few samples of each member are
#: compressed both with the default strategy and with ``Z_RLE`` (matches of runs only), and
#: the member gets ``Z_RLE`` unless that is more than 10 % larger (the trade-off of level 1
#: over 6: a file up to 10 % larger for about twice the speed). On float32 maps whose
#: mantissas rarely repeat (an MRF posterior, a plain fit of a float scan, a bias field), the
#: default strategy spends its time searching for matches it does not find: ``Z_RLE``
#: compresses them 2-2.5x faster into files about as small (0.379 vs 0.394 of the raw size on
#: the MRF posterior of the 8x head; a bias field 5 % larger, 1.9x faster). On a plain fit of
#: an integer scan, whose probabilities repeat with each intensity, only the default strategy
#: finds the repeats (0.337 vs 0.905).
#: Either way the output is ordinary deflate data that every gzip reader reads.
STRATEGY_SAMPLES = (3, 16384)


def _gzip_member(data, level: int) -> bytes:
    """``data`` (bytes or a C-contiguous array) as one complete gzip member, mtime 0."""
    packer = zlib.compressobj(level, zlib.DEFLATED, 31, 8, _strategy(data, level))  # 31: gzip
    return packer.compress(data) + packer.flush()


def _strategy(data, level: int) -> int:
    """``Z_RLE`` unless the default strategy is clearly smaller on samples of ``data``."""
    raw = memoryview(data).cast("B")
    count, size = STRATEGY_SAMPLES
    if level == 0 or len(raw) <= count * size:
        return zlib.Z_DEFAULT_STRATEGY
    stride = (len(raw) - size) // (count - 1)
    sample = b"".join(raw[i * stride : i * stride + size] for i in range(count))

    def compressed(strategy):
        packer = zlib.compressobj(level, zlib.DEFLATED, -15, 8, strategy)
        return len(packer.compress(sample) + packer.flush())

    rle = compressed(zlib.Z_RLE)
    return zlib.Z_RLE if rle <= 1.10 * compressed(zlib.Z_DEFAULT_STRATEGY) else (
        zlib.Z_DEFAULT_STRATEGY)  # fmt: skip


def _write_members(streams, head, members, compresslevel, n_threads, backlog) -> None:
    """Write ``head`` and the ``(stream index, data)`` items as gzip members to ``streams``.

    Compressed in ``n_threads`` threads, at most ``n_threads + backlog`` items in flight;
    each stream gets its members in the order ``members`` produced them (``head`` to
    ``streams[0]`` first).
    """
    from concurrent.futures import ThreadPoolExecutor

    n_threads = n_threads or os.cpu_count() or 1
    pending: deque = deque()
    with ThreadPoolExecutor(n_threads) as pool:
        try:
            pending.append((0, pool.submit(_gzip_member, head, compresslevel)))
            for index, data in members:
                pending.append((index, pool.submit(_gzip_member, data, compresslevel)))
                del data
                while len(pending) > n_threads + backlog:
                    index, future = pending.popleft()
                    streams[index].write(future.result())
            while pending:
                index, future = pending.popleft()
                streams[index].write(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _append_file(stream, source: Path) -> None:
    """Append the file ``source`` to the open binary ``stream`` (in the kernel where possible)."""
    stream.flush()
    with open(source, "rb") as src:
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(src.fileno(), stream.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        except (AttributeError, OSError) as error:  # no copy_file_range here: copy in Python
            if isinstance(error, OSError) and error.errno not in _NO_COPY_RANGE:
                raise
        if remaining > 0:
            src.seek(-remaining, os.SEEK_END)
            stream.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, stream, 1 << 20)


#: copy_file_range errors that mean "not supported here", not a failed write.
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM)

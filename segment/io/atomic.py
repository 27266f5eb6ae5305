"""Atomic writes: temporary names, all-or-nothing output sets, stale temp files, locks."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from segment.io.read import _matched_extension

# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _temporary_path(path: Path, token: str | None = None) -> Path:
    """Hidden temporary name next to ``path`` keeping its (image) extension."""
    ext = _matched_extension(path) or path.suffix
    stem = path.name[: -len(ext)] if ext else path.name
    token = token or _temporary_token()
    return path.with_name(f".{stem}.tmp-{token}{ext}")


def _temporary_token() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


#: Names of our temporary files: ``.<name>.tmp-<pid>-<8 hex digits>[<ext>]``.
TEMPORARY_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}")


def remove_stale_temporaries(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Remove the temporary files (``.<name>.tmp-<pid>-<token>``) of dead writers under ``root``.

    A writer is dead when its process no longer runs on this machine or is a zombie (killed,
    not yet reaped by its parent); files of live writers, such as another batch writing
    into the same folder, are left alone. Returns the files removed.
    """
    removed = []
    for folder, dirs, files in os.walk(root):
        if not recursive:
            dirs.clear()
        for name in files:
            match = TEMPORARY_NAME.match(name)
            if match and not pid_alive(int(match[1])):
                path = Path(folder) / name
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine and is not a zombie."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return pid < 2**22  # exists but not ours, or an impossible pid
    try:  # a zombie has exited: only its exit status is left for its parent to collect
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write a file atomically.

    Yields a temporary path in the same folder (``.<stem>.tmp-<pid>-<token><ext>``, so writers
    that look at the extension still work).  When the block succeeds the temporary file replaces
    ``path`` with ``os.replace``; on any exception, including ``KeyboardInterrupt``, the temporary
    file is removed and the exception re-raised, leaving ``path`` untouched.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_write(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    """
    path = Path(path)
    tmp = _temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


class StagedWrites:
    """Several files written under temporary names, then moved into place together.

    :meth:`path` gives the temporary name to write a final file under (hidden, in the same
    folder, with the same extension). :meth:`commit` moves every staged file into place in
    the order staged; the last one staged is the set's commit record (the sidecar): an old
    record is retired (renamed aside) before anything else is replaced and the new one moved
    into place last, like a database's commit record. Whatever the moment a process is
    killed, the folder holds the complete old set, the complete new set, or files without a
    record, which every reader takes as incomplete (never old and new files that look
    complete). An existing file is first renamed aside, and the set of files this call
    replaced is put back if a rename fails or is interrupted (Ctrl-C). :meth:`discard`
    removes what is still staged. Files renamed aside by a killed process are hidden
    temporary files, removed by the next run (:func:`remove_stale_temporaries`).

    The commit of the files of one folder holds an exclusive advisory lock on the folder
    (``flock``), so that two processes replacing the same set take turns.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> staged = StagedWrites()
    >>> _ = staged.path(folder / "a.txt").write_text("a")
    >>> _ = staged.path(folder / "b.txt").write_text("b")
    >>> sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    []
    >>> staged.commit()
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt', 'b.txt']
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)
        self._tokens: list[str] = []

    def path(self, final: str | Path) -> Path:
        """The temporary path to write ``final`` under."""
        kill_point(f"stage-{len(self._staged)}")
        final, token = Path(final), _temporary_token()
        temporary = _temporary_path(final, token)
        self._staged.append((temporary, final))
        self._tokens.append(token)
        return temporary

    def final_name(self, name: str | Path) -> str:
        """``name`` with a staged temporary path (or a temporary file of one) replaced by its
        final path, so that an error names the file the user asked for."""
        text = str(name)
        for (_, final), token in zip(self._staged, self._tokens):
            if Path(text).parent == final.parent and f".tmp-{token}" in Path(text).name:
                return str(final)
        return text

    def commit(self) -> None:
        """Move the staged files into place, in order; all of them or, on failure, none."""
        moved: list[tuple[Path, Path | None]] = []  # (final, old file renamed aside)
        folders = sorted({final.parent for _, final in self._staged})
        try:
            with ExitStack() as locks:
                for folder in folders:
                    locks.enter_context(folder_lock(folder))
                if self._staged:  # retire the old commit record first
                    record = self._staged[-1][1]
                    aside = _temporary_path(record) if record.exists() else None
                    moved.append((record, aside))
                    if aside is not None:
                        os.replace(record, aside)
                    kill_point("commit-retired")
                for index, (temporary, final) in enumerate(self._staged):
                    if index < len(self._staged) - 1:
                        aside = _temporary_path(final) if final.exists() else None
                        moved.append((final, aside))  # before the renames: an interrupt
                        if aside is not None:  # may come between
                            os.replace(final, aside)
                    os.replace(temporary, final)
                    kill_point(f"commit-{index}")
        except BaseException:
            for final, aside in reversed(moved):  # put the old files back
                with suppress(OSError):
                    if aside is not None:
                        os.replace(aside, final)
                    else:
                        final.unlink()
            self.discard()
            raise
        for _, aside in moved:
            if aside is not None:
                with suppress(OSError):
                    aside.unlink()
        self._staged.clear()
        self._tokens.clear()

    def discard(self) -> None:
        """Remove the files still staged (those written so far)."""
        for temporary, _ in self._staged:
            with suppress(OSError):
                temporary.unlink()
        self._staged.clear()
        self._tokens.clear()


@contextmanager
def folder_lock(folder: str | Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock (``flock``) on ``folder`` itself (no lock file).

    Yields True when the lock is held; with ``blocking=False``, False when another process
    holds it. Where the file system has no ``flock`` (some network file systems), yields True
    without a lock.
    """
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        except OSError:  # no flock here
            held = True
        yield held
    finally:
        os.close(fd)  # releases the lock


def kill_point(name: str) -> None:
    """Test hook: ``SIGKILL`` this process when ``SEGMENT_KILL_AT`` names this point.

    The reliability tests kill a run at a chosen moment of writing its outputs (``stage-<i>``
    before the i-th output is written, ``commit-retired`` after the old sidecar is retired,
    ``commit-<i>`` after the i-th rename, ``summary-<n>`` after the n-th batch summary)
    instead of after a guessed sleep. Unset, this costs one dictionary lookup.

    ``SEGMENT_KILL_ONCE=<file>`` kills only the first process to reach the point (the one
    that creates ``<file>``), e.g. one worker of a cluster; ``SEGMENT_KILL_PID=<pid>`` kills
    that process instead of this one (e.g. the dask scheduler).
    """
    if os.environ.get("SEGMENT_KILL_AT") != name:
        return
    import signal

    once = os.environ.get("SEGMENT_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(int(os.environ.get("SEGMENT_KILL_PID") or os.getpid()), signal.SIGKILL)

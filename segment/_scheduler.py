"""Turn the user's ``scheduler``/``workers`` options into Dask compute arguments, in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: Scheduler names accepted besides a ``tcp://host:port`` address or a distributed Client.
SCHEDULERS = ("threads", "processes", "synchronous")


def check_scheduler(scheduler: Any) -> Any:
    """Validate a scheduler option; return it unchanged (``None`` means threads)."""
    if scheduler is None or scheduler in SCHEDULERS:
        return scheduler
    if isinstance(scheduler, str):
        if scheduler.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
            return scheduler
        raise ValueError(
            f"scheduler={scheduler!r} is not one of {', '.join(SCHEDULERS)} "
            "or the address of a dask.distributed scheduler (tcp://host:port)"
        )
    if hasattr(scheduler, "get") and hasattr(scheduler, "submit"):  # a distributed.Client
        return scheduler
    raise ValueError(f"scheduler={scheduler!r} is not a scheduler name, address or Client")


@contextlib.contextmanager
def compute_kwargs(scheduler: Any = None, n_workers: int | None = None) -> Iterator[dict]:
    """Keyword arguments for :func:`dask.compute` for the chosen scheduler.

    Connects to (and afterwards disconnects from) a ``tcp://`` address; a ``distributed.Client``
    passed in is used as it is and left open.

    Parameters
    ----------
    scheduler : {"threads", "processes", "synchronous"}, str address, Client or None
        ``None`` means ``"threads"``.
    n_workers : int, optional
        Threads or processes for the local schedulers (default: one per core).
    """
    scheduler = check_scheduler(scheduler)
    if scheduler is None:
        scheduler = "threads"
    if isinstance(scheduler, str) and "://" in scheduler:
        from distributed import Client

        try:
            client = Client(scheduler, timeout="10s", set_as_default=False)
        except OSError as error:
            raise ValueError(
                f"cannot connect to the dask scheduler at {scheduler}: {error}; "
                "start one with `dask scheduler` and `dask worker ADDRESS`, "
                "or use --scheduler threads"
            ) from None
        try:
            yield {"scheduler": client}
        finally:
            client.close()
    elif scheduler == "synchronous":
        import dask.local

        yield {"scheduler": dask.local.get_sync}
    elif scheduler == "threads":
        # The get function itself, not the name: dask resolves a name by importing
        # distributed first (over a second at every start-up).
        import dask.threaded

        yield {"scheduler": dask.threaded.get, "num_workers": n_workers}
    elif scheduler == "processes":
        # One pool for the whole fit: by name, dask starts a new pool for every compute.
        from concurrent.futures import ProcessPoolExecutor

        import dask.multiprocessing

        context = dask.multiprocessing.get_context()
        with ProcessPoolExecutor(n_workers, mp_context=context) as pool:
            yield {"scheduler": dask.multiprocessing.get, "pool": pool}
    else:
        yield {"scheduler": scheduler}


def is_distributed(kwargs: dict) -> bool:
    """True when ``kwargs`` point at a distributed Client."""
    return hasattr(kwargs.get("scheduler"), "submit")

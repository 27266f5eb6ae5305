"""segment._scheduler: the --scheduler / --workers options as dask compute arguments."""

from __future__ import annotations

import dask
import dask.array as da
import dask.local
import dask.multiprocessing
import dask.threaded
import numpy as np
import pytest

from segment._scheduler import SCHEDULERS, check_scheduler, compute_kwargs, is_distributed


class FakeClient:
    """Quacks like a distributed.Client (get and submit)."""

    def get(self, *args, **kwargs):  # pragma: no cover - never called
        raise AssertionError

    def submit(self, *args, **kwargs):  # pragma: no cover - never called
        raise AssertionError


@pytest.mark.parametrize(
    "value", [None, *SCHEDULERS, "tcp://10.0.0.5:8786", "tls://host:1", "inproc://x"]
)
def test_good_schedulers_are_returned_unchanged(value):
    assert check_scheduler(value) == value


def test_a_client_is_accepted_as_it_is():
    client = FakeClient()
    assert check_scheduler(client) is client
    with compute_kwargs(client) as kwargs:
        assert kwargs == {"scheduler": client}
        assert is_distributed(kwargs)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", r"scheduler='fast' is not one of threads, processes, synchronous or the address"),
        ("http://host:8786", r"scheduler='http://host:8786' is not one of"),
        ("Threads", r"scheduler='Threads' is not one of"),
        (3, r"scheduler=3 is not a scheduler name, address or Client"),
        (object, r"is not a scheduler name, address or Client"),
    ],
)
def test_bad_schedulers_are_refused_naming_the_value(value, message):
    with pytest.raises(ValueError, match=message):
        check_scheduler(value)
    with pytest.raises(ValueError, match=message), compute_kwargs(value):
        pass


@pytest.mark.parametrize(
    ("scheduler", "workers", "expected"),
    [
        (None, None, {"scheduler": dask.threaded.get, "num_workers": None}),
        ("threads", 3, {"scheduler": dask.threaded.get, "num_workers": 3}),
        ("synchronous", 3, {"scheduler": dask.local.get_sync}),
    ],
)
def test_local_schedulers_map_to_their_get_function(scheduler, workers, expected):
    with compute_kwargs(scheduler, workers) as kwargs:
        assert kwargs == expected
        assert not is_distributed(kwargs)


def test_processes_use_one_pool_of_the_requested_size():
    with compute_kwargs("processes", 2) as kwargs:
        assert kwargs["scheduler"] is dask.multiprocessing.get
        pool = kwargs["pool"]
        assert pool._max_workers == 2
        x = da.arange(10, chunks=3)
        assert int(dask.compute(x.sum(), **kwargs)[0]) == 45
    with pytest.raises(RuntimeError):  # closed when the block ends
        pool.submit(int)


@pytest.mark.parametrize(("scheduler", "chunks"), [(None, 5), ("threads", 7), ("synchronous", 13)])
def test_every_scheduler_computes_the_same_sums(scheduler, chunks):
    values = np.random.default_rng(0).normal(size=1001)
    x = da.from_array(values, chunks=chunks)
    with compute_kwargs(scheduler, 2) as kwargs:
        (total,) = dask.compute((x * x).sum(), **kwargs)
    assert total == pytest.approx(float((values * values).sum()), rel=1e-12)

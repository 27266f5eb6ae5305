"""Input and parameter checks, each failing with one line that says what, got, and the fix."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .exceptions import InputError, SegmentError


def check_n_components(n_components: Any) -> int:
    """``n_components`` must be an integer >= 1 (and <= 255, the label maps are uint8)."""
    if (
        isinstance(n_components, bool)
        or not isinstance(n_components, numbers.Integral)
        or not 1 <= n_components <= 255
    ):
        raise SegmentError(
            f"n_components must be an integer between 1 and 255, got {n_components!r}"
        )
    return int(n_components)


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False):
    """A positive (or non-negative) number."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise SegmentError(f"{name} must be {what} {bound}, got {value!r}")
    return value


def check_features(X: Any) -> Any:
    """Features as a 2-D ``(N, D)`` numpy or Dask array of numbers.

    A 1-D array is one channel. Returns the array (numpy or Dask), never copied needlessly.
    """
    import dask.array as da

    if hasattr(X, "toarray") and hasattr(X, "nnz"):  # scipy.sparse, without importing scipy
        raise SegmentError(
            f"X is a sparse {type(X).__name__}: sparse input is not supported; pass X.toarray()"
        )
    if not isinstance(X, da.Array):
        X = np.asarray(X)
        if X.dtype.kind == "O":
            try:
                X = X.astype(np.float64)
            except ValueError:  # a TypeError (a dict, a list) says enough by itself
                raise SegmentError(
                    "X must hold numbers, got dtype object with non-numeric entries"
                ) from None
    if X.dtype.kind == "c":
        raise SegmentError(
            f"X holds complex numbers (dtype {X.dtype}): Complex data not supported; "
            "pass magnitudes (np.abs(X)) or real and imaginary parts as two channels"
        )
    if X.dtype.kind not in "biuf":
        raise SegmentError(f"X must hold numbers, got dtype {X.dtype}")
    if X.dtype.kind == "b":
        X = X.astype(np.uint8)
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    if X.ndim != 2:
        raise SegmentError(
            f"X must be (n_voxels,) or (n_voxels, n_channels), got shape {X.shape}; "
            "flatten the image first (segment.masking.flatten)"
        )
    if X.shape[1] == 0:
        raise SegmentError(
            f"X is empty (shape {X.shape}): X has 0 feature(s) (shape={X.shape}) while a "
            "minimum of 1 is required; give at least one channel"
        )
    if X.shape[0] == 0:
        raise SegmentError(
            f"X is empty (shape {X.shape}): X has 0 sample(s) (shape={X.shape}) while a "
            "minimum of 1 is required; there are no voxels to fit"
        )
    return X


def check_sample_weight(sample_weight: Any, n_samples: int) -> Any:
    """Non-negative finite weights of shape (N,) or None."""
    if sample_weight is None:
        return None
    import dask.array as da

    if not isinstance(sample_weight, da.Array):
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        if sample_weight.shape != (n_samples,):
            raise SegmentError(
                f"sample_weight must have shape ({n_samples},), got {sample_weight.shape}"
            )
        if not np.all(np.isfinite(sample_weight)) or np.any(sample_weight < 0):
            raise SegmentError("sample_weight must be finite and >= 0")
    return sample_weight


def check_data_summary(moments: dict, n_components: int) -> None:
    """Refuse non-finite, empty and constant data."""
    if moments["n_nonfinite"]:
        raise SegmentError(
            f"X contains {moments['n_nonfinite']} voxels with non-finite values (NaN or inf); "
            "leave them out with a mask (segment_array does this for you)"
        )
    if moments["n"] <= 0:
        raise SegmentError(
            "X has no voxels with positive weight to fit (sample weights sum to zero); "
            "give some voxels a weight above zero"
        )
    if np.all(moments["m2"] <= 0):
        if moments["n"] == 1:
            raise SegmentError(
                "X has 1 sample (n_samples=1); a mixture needs at least n_components "
                "distinct intensities"
            )
        raise SegmentError(
            f"the data are constant (every voxel is {moments['mean'].tolist()}); "
            "a mixture needs at least n_components distinct intensities"
        )
    constant = np.flatnonzero(moments["m2"] <= 0)
    if len(constant):
        raise SegmentError(
            f"channel {int(constant[0])} is constant (every voxel is "
            f"{float(moments['mean'][constant[0]]):g}); drop it or check the co-registration"
        )


def check_n_distinct(n_distinct: int, n_components: int) -> None:
    """At least as many distinct feature vectors as components."""
    if n_distinct < n_components:
        raise SegmentError(
            f"only {n_distinct} distinct intensities but n_components={n_components}; "
            f"lower n_components (-k) to at most {n_distinct} or check the image"
        )


def check_variance_floor(variance_floor: Any, n_features: int) -> np.ndarray | None:
    """None (the relative default) or a positive number / (D,) array in squared intensity units."""
    if variance_floor is None:
        return None
    floor = np.asarray(variance_floor, dtype=np.float64)
    if floor.ndim == 0:
        floor = np.full(n_features, float(floor))
    if floor.shape != (n_features,) or not np.all(np.isfinite(floor)) or np.any(floor <= 0):
        raise SegmentError(
            f"variance_floor must be a positive number or {n_features} positive numbers "
            f"(one per channel, in squared intensity units), got {variance_floor!r}"
        )
    return floor


def check_initial_parameters(
    means: Any, covariances: Any, weights: Any, n_components: int, n_features: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Shapes, finiteness, positive-definiteness and normalisation of explicit initial parameters.

    ``covariances`` may be given as (K,) variances when D == 1.
    """
    K, D = n_components, n_features
    if means is not None:
        means = _check_shape("means_init", means, [(K, D)] + ([(K,)] if D == 1 else []))
        means = means.reshape(K, D)
    if covariances is not None:
        covariances = _check_shape(
            "covariances_init", covariances, [(K, D, D)] + ([(K,), (K, 1)] if D == 1 else [])
        )
        covariances = covariances.reshape(K, D, D)
        for k, cov in enumerate(covariances):
            if not np.allclose(cov, cov.T) or np.any(np.linalg.eigvalsh(cov) <= 0):
                raise SegmentError(
                    f"covariances_init[{k}] is not symmetric positive-definite "
                    f"(eigenvalues {np.linalg.eigvalsh(0.5 * (cov + cov.T)).tolist()}); "
                    "give positive variances"
                )
    if weights is not None:
        weights = _check_shape("weights_init", weights, [(K,)])
        if np.any(weights <= 0) or not np.isclose(weights.sum(), 1.0, atol=1e-6):
            raise SegmentError(
                f"weights_init must be > 0 and sum to 1, got {weights.tolist()} "
                f"(sum {weights.sum():.6g}); a component of weight 0 could never be used"
            )
        weights = weights / weights.sum()
    return means, covariances, weights


def _check_shape(name: str, value: Any, shapes: list[tuple]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape not in shapes:
        expected = " or ".join(str(s) for s in shapes)
        raise SegmentError(
            f"{name} must have shape {expected} (n_components, n_channels...), got {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise SegmentError(f"{name} contains non-finite values: {array.tolist()}")
    return array


#: The values of K that ``n_components="auto"`` (``-k auto``) tries.
AUTO_K_RANGE = (2, 8)


def check_k_range(n_components: Any) -> list[int] | None:
    """The values of K to choose from by BIC, or None for a plain integer ``n_components``.

    ``"auto"`` (or ``"bic"``) means K = 2..8; ``"auto:A-B"`` K = A..B; a list, tuple or
    ``range`` of integers those values. At least two values, each 1..255.
    """
    if isinstance(n_components, numbers.Integral) and not isinstance(n_components, bool):
        return None
    if isinstance(n_components, str):
        text = n_components.strip().lower()
        low, high = AUTO_K_RANGE
        if text.startswith(("auto:", "bic:")):
            first, sep, last = text.partition(":")[2].partition("-")
            if not (sep and first.strip().isdigit() and last.strip().isdigit()):
                raise SegmentError(
                    f"n_components must be an integer, 'auto' or 'auto:A-B' (e.g. auto:2-8), "
                    f"got {n_components!r}"
                )
            low, high = int(first), int(last)
        elif text not in ("auto", "bic"):
            raise SegmentError(
                f"n_components must be an integer, 'auto' or 'auto:A-B' (e.g. auto:2-8), "
                f"got {n_components!r}"
            )
        values = list(range(low, high + 1))
    elif isinstance(n_components, (list, tuple, range)):
        values = sorted({check_n_components(k) for k in n_components})
    else:
        check_n_components(n_components)  # raises with the usual message
        return None
    if len(values) < 2:
        raise SegmentError(
            f"the range of K in n_components={n_components!r} holds fewer than two values; "
            "give at least two, e.g. auto:2-8"
        )
    for k in (values[0], values[-1]):
        check_n_components(k)
    return values


def memory_budget(memory_limit: int | str | None) -> float:
    """Bytes from ``memory_limit`` (default 3 GB)."""
    if memory_limit is None:
        return 3e9
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(memory_limit) if isinstance(memory_limit, str) else memory_limit
    except ValueError:
        value = None
    if not isinstance(value, (int, float)) or value <= 0:
        raise SegmentError(
            f"memory_limit must be a positive size such as 2GB or 1500MB, got {memory_limit!r}"
        )
    return float(value)


def check_compresslevel(compresslevel: int | None) -> int:
    """The gzip level of ``.nii.gz`` outputs, 0-9 (default ``io.DEFAULT_COMPRESSLEVEL``)."""
    from .io import DEFAULT_COMPRESSLEVEL

    if compresslevel is None:
        return DEFAULT_COMPRESSLEVEL
    if (
        isinstance(compresslevel, bool)
        or not isinstance(compresslevel, (int, np.integer))
        or (not 0 <= compresslevel <= 9)
    ):
        raise SegmentError(f"compresslevel must be an integer from 0 to 9, got {compresslevel!r}")
    return int(compresslevel)


def check_outputs_free(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse to replace existing outputs unless ``overwrite``."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise InputError(path, "exists; pass --overwrite to replace it")


def check_out_dir_creatable(out_dir: str | Path) -> None:
    """Fail early, without creating anything, if ``out_dir`` could not be created or written."""
    path = Path(out_dir).absolute()
    if path.exists():
        if not path.is_dir():
            raise InputError(out_dir, "exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(out_dir, "the output folder is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(out_dir, f"cannot create the output folder: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(out_dir, f"cannot create the output folder: {parent} is not writable")


def check_mask_spec(mask: Any) -> None:
    """A mask given as a path must exist (before any scan is loaded)."""
    if not isinstance(mask, (str, Path)) or str(mask).lower() in ("none", "auto"):
        return
    if not Path(mask).exists():
        raise InputError(
            mask, "mask file not found; give a mask file on the scan's grid, 'auto' or 'none'"
        )

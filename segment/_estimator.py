"""scikit-learn's estimator contract for :class:`segment.GaussianMixtureEM`, without scikit-learn.

``get_params`` / ``set_params`` / ``repr`` read the parameters off ``__init__``'s signature, as
``sklearn.base.BaseEstimator`` does, so ``clone``, ``Pipeline`` and ``GridSearchCV`` work; the
density methods (``score_samples``, ``bic``, ``aic``, ``sample``) are those of scikit-learn's
``GaussianMixture`` with the same free-parameter count. scikit-learn is imported only inside
``__sklearn_tags__``, which only scikit-learn calls. Kept apart from :mod:`segment.mixture`,
which holds the EM loop, so that the two change independently.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from . import _chunked, _em, _validation
from ._scheduler import compute_kwargs
from .exceptions import NotFittedError, SegmentError

__all__ = ["EstimatorMixin", "n_parameters", "posterior_block"]


def n_parameters(n_components: int, n_features: int) -> int:
    """Free parameters of a full-covariance mixture, as scikit-learn's ``GaussianMixture``.

    ``K D (D + 1) / 2`` covariance entries, ``K D`` means and ``K - 1`` weights.
    """
    K, D = n_components, n_features
    return K * D * (D + 1) // 2 + K * D + K - 1


class EstimatorMixin:
    """Parameters by introspection, a short ``repr``, prediction and the density methods.

    The class using it stores every ``__init__`` argument under its own name and sets
    ``weights_``, ``means_``, ``covariances_``, ``precisions_cholesky_`` and ``n_features_in_``
    when fitted.
    """

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        names = []
        for p in signature.parameters.values():
            if p.name == "self" or p.kind == p.VAR_KEYWORD:
                continue
            if p.kind == p.VAR_POSITIONAL:
                raise TypeError(f"{cls.__name__}.__init__ must not take *args")
            names.append(p.name)
        return sorted(names)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The ``__init__`` arguments as a dict (with ``name__sub`` entries for nested ones)."""
        out: dict[str, Any] = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params: Any):
        """Set ``__init__`` arguments by name; unknown names raise ``ValueError``."""
        valid = self.get_params(deep=True)
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, sep, sub = key.partition("__")
            if name not in valid:
                raise SegmentError(
                    f"invalid parameter {name!r} for {type(self).__name__}; valid parameters "
                    f"are {sorted(self._get_param_names())}"
                )
            if sep:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
                valid[name] = value
        for name, sub_params in nested.items():
            valid[name].set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name in self._get_param_names()
            if not _same(getattr(self, name), defaults.get(name, inspect.Parameter.empty))
        ]
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self):
        """scikit-learn's tags: an unsupervised density estimator (called by scikit-learn only)."""
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(
            estimator_type="density_estimator",
            target_tags=TargetTags(required=False),
            transformer_tags=None,
            classifier_tags=None,
            regressor_tags=None,
            input_tags=InputTags(),
        )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "means_")

    # ------------------------------------------------------------------ density methods
    def _check_is_fitted(self) -> None:
        if not hasattr(self, "means_"):
            raise _not_fitted_error(
                f"this {type(self).__name__} is not fitted yet; call fit(X) first"
            )

    def _check_fitted_features(self, X: Any) -> Any:
        """Features for prediction: fitted, the fitted channel count, finite (numpy input)."""
        self._check_is_fitted()
        one_d = getattr(X, "ndim", None) == 1
        X = _validation.check_features(X)
        if X.shape[1] != self.n_features_in_:
            hint = " (Reshape your data: a 1-D X is one channel)" if one_d else ""
            raise SegmentError(
                f"X has {X.shape[1]} channels but the mixture was fitted on "
                f"{self.n_features_in_} (X has {X.shape[1]} features, but "
                f"{type(self).__name__} is expecting {self.n_features_in_} features as "
                f"input){hint}; give the channels of the fit"
            )
        if isinstance(X, np.ndarray) and X.dtype.kind == "f" and not np.isfinite(X).all():
            raise SegmentError(
                "X contains non-finite values (NaN or inf); leave those voxels out with a mask"
            )
        return X

    # ------------------------------------------------------------------ prediction
    @property
    def _params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.weights_, self.means_, self.precisions_cholesky_

    def _posterior(self, X: Any, output: str, n_out: int, dtype, lazy: bool = True) -> Any:
        """:func:`posterior_block` of ``X`` by chunks: numpy, or lazy for Dask X when ``lazy``."""
        import dask.array as da

        X = self._check_fitted_features(X)
        out = _chunked.map_rows(
            _chunked.as_feature_array(X, self.chunk_size),
            posterior_block, n_out, dtype, (*self._params, output),
        )  # fmt: skip
        return out if lazy and isinstance(X, da.Array) else self._compute(out)

    def predict_proba(self, X: Any) -> Any:
        """Responsibilities ``r_nk``, (N, K): numpy for numpy input, lazy Dask for Dask input."""
        return self._posterior(X, "proba", self.n_components, np.float64)

    def predict(self, X: Any) -> Any:
        """Most responsible component of each voxel, 0..K-1 in ``means_`` order, shape (N,)."""
        return self._posterior(X, "index", 1, np.intp)[:, 0]

    def predict_with_proba(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """Labels 1..K (uint8, (N,)) and float32 responsibilities (N, K), one E-step per chunk."""
        both = self._posterior(X, "both", self.n_components + 1, np.float32, lazy=False)
        return both[:, -1].astype(np.uint8), both[:, :-1]

    def predict_labels(self, X: Any) -> np.ndarray:
        """Labels 1..K as uint8, (N,), without keeping any (N, K) array."""
        return self._posterior(X, "label", 1, np.uint8, lazy=False)[:, 0]

    def fit_predict(self, X: Any, y: None = None) -> Any:
        """``fit(X)`` then ``predict(X)``."""
        return self.fit(X).predict(X)

    def score(self, X: Any, y: None = None) -> float:
        """Mean log-likelihood per voxel, ``(1/N) sum_n log p(x_n)``."""
        X = self._check_fitted_features(X)
        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            stats = _chunked.statistics(
                _chunked.as_feature_array(X, self.chunk_size), self._params, None, ckw
            )
        return stats["log_likelihood"] / stats["n_samples"]

    def _compute(self, array) -> np.ndarray:
        import dask.array as da

        with compute_kwargs(self.scheduler, self.n_workers) as ckw:
            if self.scheduler in (None, "threads", "synchronous"):
                # each block written into the result as it is computed: compute() would hold
                # every block's output and their concatenation at once (twice the result)
                out = np.empty(array.shape, array.dtype)
                da.store(array, out, lock=False, **ckw)
                return out
            return array.compute(**ckw)

    def score_samples(self, X: Any) -> Any:
        """Log-likelihood of each voxel, ``log p(x_n)``, shape (N,).

        Parameters
        ----------
        X : (N, D) or (N,) numpy or Dask array

        Returns
        -------
        (N,) float64 array: numpy for numpy input, lazy Dask for Dask input.
        """
        import dask.array as da

        X = self._check_fitted_features(X)
        lazy = isinstance(X, da.Array)
        log_p = _chunked.map_rows(
            _chunked.as_feature_array(X, self.chunk_size),
            _log_likelihood_block, 1, np.float64, self._params,
        )[:, 0]  # fmt: skip
        return log_p if lazy else self._compute(log_p)

    def _n_parameters(self) -> int:
        self._check_is_fitted()
        return n_parameters(self.means_.shape[0], self.means_.shape[1])

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X``: ``-2 log L + p log N`` (lower is better).

        ``p`` is :func:`n_parameters`, so this equals ``GaussianMixture.bic`` of scikit-learn
        for the same parameters.
        """
        X = self._check_fitted_features(X)
        log_l = float(self.score(X)) * X.shape[0]
        return -2.0 * log_l + self._n_parameters() * np.log(X.shape[0])

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X``: ``-2 log L + 2 p`` (lower is better)."""
        X = self._check_fitted_features(X)
        return -2.0 * float(self.score(X)) * X.shape[0] + 2.0 * self._n_parameters()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n_samples`` voxels from the fitted mixture.

        Seeded by ``random_state``; returns ``(X, y)``: (n_samples, D) features and their
        (n_samples,) component indices 0..K-1, grouped by component like scikit-learn's.
        """
        self._check_is_fitted()
        if (
            isinstance(n_samples, bool)
            or not isinstance(n_samples, (int, np.integer))
            or (n_samples < 1)
        ):
            raise SegmentError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        rng = np.random.default_rng(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_ / self.weights_.sum())
        X = np.concatenate([
            rng.multivariate_normal(mean, cov, int(n), method="cholesky")
            for mean, cov, n in zip(self.means_, self.covariances_, counts)
        ])  # fmt: skip
        y = np.repeat(np.arange(len(counts)), counts)
        return X, y


def _not_fitted_error(message: str) -> NotFittedError:
    """:class:`NotFittedError`, also scikit-learn's when scikit-learn is already imported.

    scikit-learn's checks test for their own class; it is never imported here for that.
    """
    import sys

    sklearn_exceptions = sys.modules.get("sklearn.exceptions")
    if sklearn_exceptions is None:
        return NotFittedError(message)
    global _SklearnNotFittedError
    if _SklearnNotFittedError is None:
        _SklearnNotFittedError = type(
            "NotFittedError", (NotFittedError, sklearn_exceptions.NotFittedError),
            {"__module__": NotFittedError.__module__, "__doc__": NotFittedError.__doc__},
        )  # fmt: skip
    return _SklearnNotFittedError(message)


_SklearnNotFittedError: type | None = None


def posterior_block(X, weights, means, precisions_chol, output: str) -> np.ndarray:
    """The posterior of a block of rows, from :func:`segment._em.responsibilities`.

    ``output``: ``"proba"`` (n, K) float64; ``"index"`` (n, 1) the argmax 0..K-1;
    ``"label"`` (n, 1) uint8 labels 1..K; ``"both"`` (n, K + 1) float32, the responsibilities
    then the label (exact in float32). One-channel integer rows are computed once per value
    (:func:`segment._em.by_value`).
    """

    def rows(X):
        resp = _em.responsibilities(X, weights, means, precisions_chol)
        if output == "proba":
            return resp
        if output == "both":
            out = np.empty((resp.shape[0], resp.shape[1] + 1), dtype=np.float32)
            out[:, :-1] = resp
            out[:, -1] = np.argmax(resp, axis=1) + 1
            return out
        index = np.argmax(resp, axis=1)
        return ((index + 1).astype(np.uint8) if output == "label" else index)[:, None]

    return _em.by_value(X, rows)


def _log_likelihood_block(X, weights, means, precisions_chol):
    """``log p(x_n)`` of a block of rows, (n, 1) float64."""
    out = np.empty((X.shape[0], 1))
    for start in range(0, X.shape[0], _em.BLOCK):
        block = np.asarray(X[start : start + _em.BLOCK], dtype=np.float64)
        out[start : start + _em.BLOCK, 0] = _em.e_step(block, weights, means, precisions_chol)[1]
    return out


def _same(value: Any, default: Any) -> bool:
    """Whether a parameter still has its default (arrays compare by identity, like sklearn)."""
    if value is default:
        return True
    if isinstance(value, np.ndarray) or isinstance(default, np.ndarray):
        return False
    try:
        return bool(value == default) and type(value) is type(default)
    except (TypeError, ValueError):
        return False

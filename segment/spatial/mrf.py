"""The Potts MRF prior as a component of the spatial model.

:class:`MRFPrior` holds the prior's strength and neighbour weights and runs the mean-field
sweeps of :class:`segment._sweeps.PosteriorGrid` until the posterior settles. The per-block
maths is in :mod:`segment._spatial` (and its compiled twin in :mod:`segment._kernels`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from .. import _spatial
from .._sweeps import PosteriorGrid
from ..exceptions import ConvergenceWarning

#: Mean-field sweeps stop when the posterior changes by less than this per voxel (half the L1
#: distance, in [0, 1], measured on the 1/255 steps the sweeps keep, whose rounding adds about
#: 0.005 to it) ...; the probability maps are then one more sweep. With 0.01, the rounding
#: noise added two sweeps on the noisy phantoms and the extra smoothing eroded the thin skull
#: (Dice -0.011 against the plain mixture at 9 % noise); 0.02 stops where the float sweeps did.
MRF_TOL = 2e-2
#: ... or after this many sweeps.
MAX_MRF_SWEEPS = 50


class MRFPrior:
    """``beta * sum_j w_ij [z_i = z_j]`` over the 26-neighbourhood (8 in 2-D), w = 1 / mm.

    Parameters
    ----------
    beta : float
        Strength (0: off), in FSL FAST's units.
    spacing : tuple of float
        Voxel size per axis, mm.

    Attributes
    ----------
    kernel : (3,) * ndim array
        Neighbour weights (:func:`segment._spatial.neighbour_kernel`).
    n_sweeps, change
        Sweeps run by the last :meth:`settle` and the mean posterior change of the last one.
    """

    def __init__(self, beta: float, spacing: tuple[float, ...]):
        self.beta = float(beta)
        self.kernel = _spatial.neighbour_kernel(spacing)
        self.n_sweeps, self.change = 0, None

    def settle(self, grid: PosteriorGrid, announce: Callable[[str], None]) -> None:
        """Mean-field sweeps of ``grid`` in place until the posterior settles.

        The first sweep (beta = 0) is the mixture's own posterior; from the second MRF sweep,
        voxels whose neighbours did not move are kept. Warns with :class:`ConvergenceWarning`
        after :data:`MAX_MRF_SWEEPS` sweeps.
        """
        grid.sweep(0.0)
        self.n_sweeps, self.change = 0, None
        while self.beta > 0 and self.n_sweeps < MAX_MRF_SWEEPS:
            announce(f"MRF sweep {self.n_sweeps + 1}")
            self.change = grid.sweep(self.beta, skip_settled=self.n_sweeps > 0)
            self.n_sweeps += 1
            if self.change < MRF_TOL:
                break
        else:
            if self.beta > 0:
                warnings.warn(
                    f"the MRF mean-field sweeps did not settle in {MAX_MRF_SWEEPS} sweeps "
                    f"(mean change {self.change:.3g} per voxel); lower mrf_beta",
                    ConvergenceWarning,
                    stacklevel=4,
                )

"""EASGD as Cooperative SGD (Wang & Joshi, arXiv 1808.07576): mixing matrix and best elasticity.

In the Cooperative SGD framework the ``m`` worker models and one auxiliary (center) variable
are the columns of ``X``; a communication round is ``X <- (X - eta G) W`` with

.. math::

    W = \\begin{pmatrix}(1-\\alpha) I_m & \\alpha \\mathbf 1_m\\\\
                         \\alpha \\mathbf 1_m^\\top & 1-m\\alpha\\end{pmatrix},

i.e. the paper's ``beta = m * alpha``. ``W`` is symmetric and doubly stochastic with
eigenvalues ``1``, ``1-alpha`` (``m-1`` times) and ``1-(m+1) alpha``. The error term of the
convergence bound grows with :math:`\\zeta = \\max(|\\lambda_2|, |\\lambda_{m+1}|)`, which is
smallest at :math:`\\alpha^\\star = 2/(m+2)`, :math:`\\zeta^\\star = m/(m+2)` (``m >= 2``).

Example::

    >>> alpha, zeta = optimal_elasticity(4)
    >>> round(mixing_zeta(easgd_mixing_matrix(4, alpha)), 12) == round(zeta, 12)
    True
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["easgd_mixing_matrix", "mixing_zeta", "optimal_elasticity"]

_TOL = 1e-10


def _check_m(m: object) -> int:
    if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < 1:
        raise ValueError(f"m={m!r} is not a valid number of workers; use an integer >= 1")
    return int(m)


def easgd_mixing_matrix(m: int, alpha: float) -> NDArray[np.float64]:
    """The ``(m+1)x(m+1)`` EASGD mixing matrix (workers first, center last).

    Args:
        m: number of workers (integer >= 1).
        alpha: elasticity (moving rate), finite and > 0. Values with ``zeta >= 1``, i.e.
            ``alpha >= 2/(m+1)``, are legal but never reach consensus, and warn.
    """
    m = _check_m(m)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.integer | np.floating):
        raise ValueError(f"alpha={alpha!r} must be a number in (0, {2 / (m + 1):g})")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"alpha={alpha!r} is outside (0, {2 / (m + 1):g}); the best elasticity for m={m} "
            f"is alpha={2 / (m + 2):g}"
        )
    a = float(alpha)
    if a >= 2 / (m + 1):
        warnings.warn(
            f"alpha={a:g} >= 2/(m+1)={2 / (m + 1):g}: zeta >= 1, the mixing never reaches "
            f"consensus; the best elasticity for m={m} is alpha={2 / (m + 2):g}",
            RuntimeWarning,
            stacklevel=2,
        )
    w = np.zeros((m + 1, m + 1))
    w[:m, :m] = (1 - a) * np.eye(m)
    w[:m, m] = a
    w[m, :m] = a
    w[m, m] = 1 - m * a
    return w


def mixing_zeta(w: ArrayLike) -> float:
    """``zeta = max(|lambda_2|, |lambda_n|)`` of a symmetric doubly stochastic matrix.

    Equivalently the spectral norm of ``W - 11^T/n``: how fast repeated mixing contracts the
    models toward their average. ``0`` for a 1x1 matrix.
    """
    a = np.asarray(w, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.size == 0:
        raise ValueError(f"W must be a non-empty square matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("W has non-finite entries")
    if not np.allclose(a, a.T, atol=_TOL, rtol=0):
        raise ValueError("W is not symmetric; zeta is defined here for symmetric W only")
    ones = np.ones(a.shape[0])
    if not np.allclose(a @ ones, ones, atol=_TOL, rtol=0):
        raise ValueError("W is not doubly stochastic: its rows do not sum to 1")
    eig = np.linalg.eigvalsh(a)[::-1]  # descending; eig[0] == 1 for doubly stochastic W
    if eig.size == 1:
        return 0.0
    return float(max(abs(eig[1]), abs(eig[-1])))


def optimal_elasticity(m: int) -> tuple[float, float]:
    """``(alpha_star, zeta_star) = (2/(m+2), m/(m+2))``: the elasticity minimising ``zeta``.

    For ``m >= 2``, ``zeta(alpha) = max(|1-alpha|, |1-(m+1) alpha|)`` is smallest where the two
    branches meet, ``1 - alpha = (m+1) alpha - 1``; the matching ``beta* = m alpha* = 2m/(m+2)``
    lies in ``[1, 2)``, above the EASGD paper's ``beta = 0.9``. A single worker (``m = 1``) has
    no ``1 - alpha`` eigenvalue, so there ``zeta = |1 - 2 alpha|`` and the optimum is
    ``(1/2, 0)``: the worker and the center are averaged exactly.
    """
    m = _check_m(m)
    if m == 1:
        return 0.5, 0.0
    return 2 / (m + 2), m / (m + 2)

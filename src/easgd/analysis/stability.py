"""Stability and variance analysis of EASGD against ADMM (paper section 6, spec sections 2.4, 6).

Everything here is linear algebra on the 1-D quadratic :math:`F(x)=x^2/2`, where the learning
rate ``eta`` stands for :math:`\\eta h` (so :math:`\\nabla F(x)=x`). A state vector evolves as
:math:`s_{t+1}=M s_t`; the iteration is stable when the spectral radius of ``M`` is at most 1.

* Round-robin EASGD (eqs. 12-13): state ``(x^1..x^p, center)``. Worker ``i`` (0-based here, the
  paper's :math:`F^{i+1}`) moves its own variable and the center, both from time-``t`` values.
  Each per-worker map is symmetric; one cycle is :math:`F^p\\circ\\dots\\circ F^1` (worker 0 acts
  first).
* Round-robin ADMM: state ``(lambda^1..lambda^p, x^1..x^p, center)``; worker ``i`` does a dual
  step, a primal step, then the center is recomputed from the newest ``x^j`` and ``lambda^j``.
* Synchronous EASGD: all workers and the center update at once from time-``t`` values.

Maps are built by running the update rule on the columns of the identity matrix, so the map is
the algorithm itself; the private step functions also accept batches of ``(eta, alpha)`` values
(broadcast over leading axes), which :mod:`easgd.analysis.figures` draws over a grid.

Decisions where the paper leaves a choice:

* ``stable`` means "does not grow exponentially": ``spectral_radius <= 1 + STABILITY_TOL``.
  Maps whose radius is 1 up to that tolerance (every single-worker ADMM map, for instance) are
  reported stable *and* ``marginal``.
* The round-robin EASGD condition is the paper's condition on the 2x2 block shared by every
  worker. It is sufficient for the composite map but not necessary (for p=2 the composite stays
  stable slightly past the bound).
* No analytic condition is known for round-robin ADMM, so ``analytic_stable`` is ``None`` there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.linalg import solve_discrete_lyapunov

__all__ = [
    "MAPS",
    "MAX_ANALYZE_P",
    "STABILITY_TOL",
    "Divergence",
    "admm_divergence",
    "admm_roundrobin_map",
    "admm_roundrobin_worker_map",
    "analyze",
    "averaged_sgd_variance",
    "center_stationary_variance",
    "center_stationary_variance_numeric",
    "easgd_roundrobin_block",
    "easgd_roundrobin_condition",
    "easgd_roundrobin_map",
    "easgd_roundrobin_worker_map",
    "easgd_sync_condition",
    "easgd_sync_map",
    "iterate_map",
    "spectral_radius",
]

logger = logging.getLogger(__name__)

MAPS = ("easgd-roundrobin", "easgd-sync", "admm-roundrobin")
STABILITY_TOL = 1e-12
MAX_ANALYZE_P = 512  # ADMM maps are dense (2p+1)^2 matrices; beyond this eig takes too long

Array = NDArray[np.float64]


# --------------------------------------------------------------------------- validation
def _check_p(p: object) -> int:
    if isinstance(p, bool) or not isinstance(p, int | np.integer) or p < 1:
        raise ValueError(f"p={p!r} is not a valid number of workers; use an integer >= 1")
    return int(p)


def _check_positive(name: str, value: object, hint: str = "") -> float:
    if (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise ValueError(f"{name}={value!r} is outside (0, inf); it must be finite and > 0{hint}")


def _check_worker(i: object, p: int) -> int:
    if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < p:
        raise ValueError(f"i={i!r} is not a worker index; with p={p} use 0 <= i <= {p - 1}")
    return int(i)


# --------------------------------------------------------------------------- update rules
def _col(v: ArrayLike) -> NDArray[Any]:
    """A scalar or batch of parameters, shaped to broadcast against rows ``(..., k)``."""
    return np.asarray(v, dtype=float)[..., None]


def _easgd_rr_step(s: Array, i: int, p: int, eta: ArrayLike, alpha: ArrayLike) -> None:
    """Worker ``i``'s round-robin EASGD step on states ``s`` of shape ``(..., p+1, k)``."""
    e, a = _col(eta), _col(alpha)
    x, c = s[..., i, :].copy(), s[..., p, :].copy()
    s[..., i, :] = x - e * x - a * (x - c)
    s[..., p, :] = c + a * (x - c)


def _admm_rr_step(s: Array, i: int, p: int, eta: ArrayLike, rho: ArrayLike) -> None:
    """Worker ``i``'s round-robin ADMM step on states of shape ``(..., 2p+1, k)``."""
    e, r = _col(eta), _col(rho)
    lam, x, c = s[..., i, :], s[..., p + i, :], s[..., 2 * p, :]
    lam_new = lam - (x - c)  # F1: dual ascent
    x_new = (x - e * x + e * r * (lam_new + c)) / (1 + e * r)  # F2: linearized primal step
    s[..., i, :] = lam_new
    s[..., p + i, :] = x_new
    # F3: the center from the newest x^j and lambda^j of all workers
    s[..., 2 * p, :] = (s[..., p : 2 * p, :].sum(axis=-2) - s[..., :p, :].sum(axis=-2)) / p


def _batch_shape(*params: ArrayLike) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*(np.shape(v) for v in params)))


def _identity(n: int, batch: tuple[int, ...]) -> Array:
    return np.broadcast_to(np.eye(n), (*batch, n, n)).copy()


def _easgd_rr_composite(p: int, eta: ArrayLike, alpha: ArrayLike) -> Array:
    m = _identity(p + 1, _batch_shape(eta, alpha))
    for i in range(p):
        _easgd_rr_step(m, i, p, eta, alpha)
    return m


def _admm_rr_composite(p: int, eta: ArrayLike, rho: ArrayLike) -> Array:
    m = _identity(2 * p + 1, _batch_shape(eta, rho))
    for i in range(p):
        _admm_rr_step(m, i, p, eta, rho)
    return m


def _sync_map(p: int, eta: ArrayLike, alpha: ArrayLike, beta: ArrayLike) -> Array:
    e, a, b = (np.asarray(v, dtype=float)[..., None, None] for v in (eta, alpha, beta))
    m = np.zeros((*_batch_shape(eta, alpha, beta), p + 1, p + 1))
    eye = np.eye(p)
    m[..., :p, :p] = (1 - e - a) * eye
    m[..., :p, p:] = a
    m[..., p:, :p] = b / p
    m[..., p:, p:] = 1 - b
    return m


def _radius(m: NDArray[Any]) -> NDArray[Any]:
    return np.abs(np.linalg.eigvals(m)).max(axis=-1)


# --------------------------------------------------------------------------- public maps
def easgd_roundrobin_worker_map(i: int, p: int, eta: float, alpha: float) -> Array:
    """Worker ``i``'s ``(p+1)x(p+1)`` round-robin EASGD map (symmetric; 0-based ``i``)."""
    p = _check_p(p)
    i = _check_worker(i, p)
    eta, alpha = _check_positive("eta", eta), _check_positive("alpha", alpha)
    m = _identity(p + 1, ())
    _easgd_rr_step(m, i, p, eta, alpha)
    return m


def easgd_roundrobin_map(p: int, eta: float, alpha: float) -> Array:
    """One round-robin EASGD cycle :math:`F^p\\circ\\dots\\circ F^1` (worker 0 first)."""
    p = _check_p(p)
    return _easgd_rr_composite(p, _check_positive("eta", eta), _check_positive("alpha", alpha))


def easgd_roundrobin_block(eta: float, alpha: float) -> Array:
    """The 2x2 block ``[[1-eta-alpha, alpha], [alpha, 1-alpha]]`` shared by every worker map."""
    return easgd_roundrobin_worker_map(0, 1, eta, alpha)


def easgd_sync_map(p: int, eta: float, alpha: float, beta: float | None = None) -> Array:
    """Synchronous EASGD map ``[[(1-eta-alpha) I, alpha 1], [beta/p 1^T, 1-beta]]``.

    ``beta`` defaults to ``p * alpha`` (the paper's elastic symmetry).
    """
    p = _check_p(p)
    eta, alpha = _check_positive("eta", eta), _check_positive("alpha", alpha)
    beta = p * alpha if beta is None else _check_positive("beta", beta)
    return _sync_map(p, eta, alpha, beta)


def admm_roundrobin_worker_map(i: int, p: int, eta: float, rho: float) -> Array:
    """Worker ``i``'s ``(2p+1)x(2p+1)`` round-robin ADMM map ``F3 o F2 o F1`` (0-based ``i``).

    State order: ``lambda^1..lambda^p, x^1..x^p, center``.
    """
    p = _check_p(p)
    i = _check_worker(i, p)
    eta, rho = _check_positive("eta", eta), _check_positive("rho", rho)
    m = _identity(2 * p + 1, ())
    _admm_rr_step(m, i, p, eta, rho)
    return m


def admm_roundrobin_map(p: int, eta: float, rho: float) -> Array:
    """One round-robin ADMM cycle :math:`F^p\\circ\\dots\\circ F^1` (worker 0 first)."""
    p = _check_p(p)
    return _admm_rr_composite(p, _check_positive("eta", eta), _check_positive("rho", rho))


def spectral_radius(m: ArrayLike) -> float:
    """Largest eigenvalue modulus of the square matrix ``m``."""
    a = np.asarray(m, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.size == 0:
        raise ValueError(f"spectral_radius needs a non-empty square matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("spectral_radius: the matrix has non-finite entries")
    return float(_radius(a))


# --------------------------------------------------------------------------- conditions
def _rr_condition(eta: ArrayLike, alpha: ArrayLike) -> NDArray[np.bool_]:
    e, a = np.asarray(eta, dtype=float), np.asarray(alpha, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = (4 - 2 * e) / (4 - e)
    return (e >= 0) & (e <= 2) & (a >= 0) & (a <= bound)


def _jury(p: int, eta: ArrayLike, alpha: ArrayLike, beta: ArrayLike) -> NDArray[np.bool_]:
    u, a, b = (np.asarray(v, dtype=float) for v in (eta, alpha, beta))
    ok = (u * b > 0) & ((2 - u) * (2 - b) > 2 * a) & (np.abs((1 - u - a) * (1 - b) - a * b) < 1)
    if p >= 2:  # the p-1 copies of the eigenvalue 1-u-alpha (differences between workers)
        ok &= np.abs(1 - u - a) < 1
    return np.asarray(ok)


def _check_finite(**values: float) -> None:
    for name, v in values.items():
        if not math.isfinite(v):
            raise ValueError(f"{name}={v!r} must be a finite number")


def easgd_roundrobin_condition(eta: float, alpha: float) -> bool:
    """The paper's round-robin condition ``0<=eta<=2`` and ``0<=alpha<=(4-2eta)/(4-eta)``.

    Exactly ``|lambda| <= 1`` for both eigenvalues of the shared 2x2 block; sufficient (not
    necessary) for the composite map.
    """
    _check_finite(eta=eta, alpha=alpha)
    return bool(_rr_condition(eta, alpha))


def easgd_sync_condition(p: int, eta: float, alpha: float, beta: float) -> bool:
    """Jury conditions (strict) for the synchronous EASGD map, spec section 6.3."""
    p = _check_p(p)
    _check_finite(eta=eta, alpha=alpha, beta=beta)
    return bool(_jury(p, eta, alpha, beta))


# --------------------------------------------------------------------------- iteration
def iterate_map(m: ArrayLike, s0: ArrayLike, steps: int, *, trajectory: bool = False) -> Array:
    """Iterate ``s <- m @ s`` for ``steps`` steps.

    Returns ``max|s_t|`` for ``t = 1..steps`` (shape ``(steps,)``), or with ``trajectory=True``
    the states themselves (shape ``(steps, n)``). If the iterate overflows, iteration stops,
    a warning is logged and the remaining entries are ``inf``.
    """
    a = np.asarray(m, dtype=float)
    s = np.asarray(s0, dtype=float).copy()
    if a.ndim != 2 or a.shape[0] != a.shape[1] or s.shape != (a.shape[0],):
        raise ValueError(
            f"iterate_map: need a square matrix and a matching vector, got {a.shape} and {s.shape}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0")
    out = np.full((steps, s.size) if trajectory else (steps,), np.inf)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps):
            s = a @ s
            if not np.all(np.isfinite(s)):
                logger.warning("iterate_map: overflow at step %d of %d; stopping", t + 1, steps)
                break
            out[t] = s if trajectory else np.abs(s).max()
    return out


@dataclass(frozen=True)
class Divergence:
    """Result of :func:`admm_divergence`.

    ``max_abs[k]`` is ``max|s|`` after ``k+1`` cycles (``inf`` after an overflow, whose cycle is
    ``overflow_cycle``); ``growth = max_abs[-1] / x0``.
    """

    p: int
    eta: float
    rho: float
    x0: float
    spectral_radius: float
    max_abs: Array
    growth: float
    overflow_cycle: int | None


def admm_divergence(
    p: int, eta: float = 0.001, rho: float = 2.5, cycles: int = 10_000, x0: float = 1000.0
) -> Divergence:
    """Iterate round-robin ADMM from the paper's start ``lambda=0, x=center=x0`` (spec 6.2).

    At ``(eta, rho) = (0.001, 2.5)`` and ``p=3``, ``max|s|`` grows from 1e3 to about 7e4 after
    1e4 cycles and about 1.2e9 after 2e4 cycles.
    """
    p = _check_p(p)
    x0 = _check_positive("x0", x0)
    if isinstance(cycles, bool) or not isinstance(cycles, int | np.integer) or cycles < 1:
        raise ValueError(f"cycles={cycles!r} must be an integer >= 1")
    m = admm_roundrobin_map(p, eta, rho)
    s0 = np.concatenate([np.zeros(p), np.full(p + 1, x0)])
    max_abs = iterate_map(m, s0, int(cycles))
    bad = np.flatnonzero(~np.isfinite(max_abs))
    return Divergence(
        p=p,
        eta=float(eta),
        rho=float(rho),
        x0=x0,
        spectral_radius=spectral_radius(m),
        max_abs=max_abs,
        growth=float(max_abs[-1] / x0),
        overflow_cycle=int(bad[0]) + 1 if bad.size else None,
    )


# --------------------------------------------------------------------------- variance
def _variance_args(
    p: int, eta: float, h: float, sigma: float, alpha: float, beta: float | None
) -> tuple[int, float, float, float, float]:
    p = _check_p(p)
    eta, h, alpha = (_check_positive(n, v) for n, v in (("eta", eta), ("h", h), ("alpha", alpha)))
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma={sigma!r} is outside [0, inf); it is the gradient noise std")
    beta = p * alpha if beta is None else _check_positive("beta", beta)
    u = eta * h
    if not _jury(p, u, alpha, beta):
        r = float(_radius(_sync_map(p, u, alpha, beta)))
        raise ValueError(
            f"synchronous EASGD with p={p}, eta*h={u:g}, alpha={alpha:g}, beta={beta:g} is not "
            f"stable (spectral radius {r:.6g} >= 1): the center has no stationary variance"
        )
    return p, u, alpha, beta, eta * eta * sigma * sigma


def center_stationary_variance(
    p: int, eta: float, h: float, sigma: float, alpha: float, beta: float | None = None
) -> float:
    """Closed-form stationary variance of the center, synchronous EASGD (spec 6.3).

    Quadratic ``F(x) = h x^2 / 2``, gradients ``h x + xi`` with ``Var xi = sigma^2`` independent
    across workers, ``u = eta h``::

        Var = eta^2 sigma^2 / p * beta (2-u-alpha-beta+beta u)
              / (u (u+alpha+beta-beta u) (4-2u-2alpha-2beta+beta u))

    ``beta`` defaults to ``p * alpha``. Raises ``ValueError`` outside the Jury-stable region.
    """
    p, u, a, b, q = _variance_args(p, eta, h, sigma, alpha, beta)
    num = b * (2 - u - a - b + b * u)
    den = u * (u + a + b - b * u) * (4 - 2 * u - 2 * a - 2 * b + b * u)
    return q / p * num / den


def center_stationary_variance_numeric(
    p: int, eta: float, h: float, sigma: float, alpha: float, beta: float | None = None
) -> float:
    """The same variance from the discrete Lyapunov equation ``S = A S A^T + Q``.

    ``A`` is :func:`easgd_sync_map` at ``eta*h``; ``Q = eta^2 sigma^2 diag(1,..,1, 0)``: each
    worker's gradient noise enters through its ``-eta * xi`` term, the center gets none.
    """
    p, u, a, b, q = _variance_args(p, eta, h, sigma, alpha, beta)
    noise = np.diag(np.r_[np.full(p, q), 0.0])
    cov = solve_discrete_lyapunov(_sync_map(p, u, a, b), noise)
    return float(cov[p, p])


def averaged_sgd_variance(p: int, eta: float, h: float, sigma: float) -> float:
    """Stationary variance of the mean of ``p`` independent constant-step SGD chains.

    ``eta^2 sigma^2 / (p u (2-u))`` with ``u = eta h``; needs ``0 < u < 2``.
    """
    p = _check_p(p)
    eta, h = _check_positive("eta", eta), _check_positive("h", h)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma={sigma!r} is outside [0, inf); it is the gradient noise std")
    u = eta * h
    if u >= 2:
        raise ValueError(f"eta*h={u:g} is outside (0, 2): SGD on the quadratic diverges")
    return eta * eta * sigma * sigma / (p * u * (2 - u))


# --------------------------------------------------------------------------- analyze
def _parameters(
    map_name: str, p: int, alpha: float | None, rho: float | None, beta: float | None
) -> dict[str, float]:
    """Check that exactly the parameters ``map_name`` uses were given."""
    if map_name not in MAPS:
        raise ValueError(f"map={map_name!r} is not known; choose one of {', '.join(MAPS)}")
    if map_name.startswith("easgd"):
        if rho is not None:
            raise ValueError(
                f"rho={rho!r} was given but map {map_name} takes alpha (the moving rate), not "
                "rho (the ADMM penalty); pass alpha instead"
            )
        if alpha is None:
            raise ValueError(f"map {map_name} needs alpha (the moving rate eta*rho)")
        out = {"alpha": _check_positive("alpha", alpha)}
        if map_name == "easgd-sync":
            b = p * out["alpha"] if beta is None else _check_positive("beta", beta)
            out["beta"] = b
        elif beta is not None:
            raise ValueError(f"beta={beta!r} is only used by map easgd-sync, not {map_name}")
        return out
    if alpha is not None:
        raise ValueError(
            f"alpha={alpha!r} was given but map {map_name} takes rho (the ADMM penalty), not "
            "alpha; pass rho instead"
        )
    if beta is not None:
        raise ValueError(f"beta={beta!r} is only used by map easgd-sync, not {map_name}")
    if rho is None:
        raise ValueError(f"map {map_name} needs rho (the ADMM penalty)")
    return {"rho": _check_positive("rho", rho)}


def analyze(
    map_name: str,
    p: int,
    eta: float,
    alpha: float | None = None,
    rho: float | None = None,
    beta: float | None = None,
) -> dict[str, Any]:
    """Spectral analysis of one linear map, as a JSON-ready dict.

    Keys: ``map, p, eta`` and ``alpha``/``beta`` (EASGD) or ``rho`` (ADMM), ``spectral_radius``,
    ``stable`` (radius <= 1 + STABILITY_TOL), ``marginal`` (radius within STABILITY_TOL of 1),
    ``analytic_stable`` (the paper's / Jury condition; ``None`` for ADMM, where none is known)
    and ``eigenvalues`` (``[re, im]`` pairs, largest modulus first).
    """
    p = _check_p(p)
    if p > MAX_ANALYZE_P:
        raise ValueError(f"p={p} is outside [1, {MAX_ANALYZE_P}]; larger maps take too long")
    eta = _check_positive("eta", eta, " (eta stands for eta*h)")
    params = _parameters(map_name, p, alpha, rho, beta)
    analytic: bool | None
    if map_name == "easgd-roundrobin":
        m = easgd_roundrobin_map(p, eta, params["alpha"])
        analytic = easgd_roundrobin_condition(eta, params["alpha"])
    elif map_name == "easgd-sync":
        m = easgd_sync_map(p, eta, params["alpha"], params["beta"])
        analytic = easgd_sync_condition(p, eta, params["alpha"], params["beta"])
    else:
        m = admm_roundrobin_map(p, eta, params["rho"])
        analytic = None
    eig = np.linalg.eigvals(m)
    eig = eig[np.argsort(-np.abs(eig), kind="stable")]
    radius = float(np.abs(eig[0]))
    logger.debug("analyze %s p=%d eta=%g %s: radius %.12g", map_name, p, eta, params, radius)
    return {
        "map": map_name,
        "p": p,
        "eta": eta,
        **params,
        "spectral_radius": radius,
        "stable": radius <= 1 + STABILITY_TOL,
        "marginal": abs(radius - 1) <= STABILITY_TOL,
        "analytic_stable": analytic,
        "eigenvalues": [[float(z.real), float(z.imag)] for z in eig],
    }

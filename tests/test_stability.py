"""Known answers for the stability and variance analysis (paper-spec sections 2.4, 6 and 7)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest

from easgd.analysis import stability as st
from easgd.analysis.cooperative import easgd_mixing_matrix, mixing_zeta, optimal_elasticity

# --------------------------------------------------------------------------- round-robin EASGD


def _easgd_rr_reference(s: np.ndarray, p: int, eta: float, alpha: float) -> np.ndarray:
    """Eqs. 12-13 written out scalar by scalar: worker i, then worker i+1, ..."""
    s = s.copy()
    for i in range(p):
        x, c = s[i], s[p]
        s[i] = x - eta * x - alpha * (x - c)
        s[p] = c + alpha * (x - c)
    return s


def test_roundrobin_worker_maps_match_the_spec_matrices_for_p2() -> None:
    eta, alpha = 0.3, 0.2
    f1 = np.array([[1 - eta - alpha, 0, alpha], [0, 1, 0], [alpha, 0, 1 - alpha]])
    f2 = np.array([[1, 0, 0], [0, 1 - eta - alpha, alpha], [0, alpha, 1 - alpha]])
    np.testing.assert_allclose(st.easgd_roundrobin_worker_map(0, 2, eta, alpha), f1)
    np.testing.assert_allclose(st.easgd_roundrobin_worker_map(1, 2, eta, alpha), f2)
    # composition order: worker 1 (index 0) acts first
    np.testing.assert_allclose(st.easgd_roundrobin_map(2, eta, alpha), f2 @ f1)


@pytest.mark.parametrize("p", [1, 3, 6])
def test_roundrobin_composite_equals_step_by_step_iteration(p: int) -> None:
    eta, alpha = 0.4, 0.3
    workers = [st.easgd_roundrobin_worker_map(i, p, eta, alpha) for i in range(p)]
    for f in workers:
        np.testing.assert_array_equal(f, f.T)  # each per-worker map is symmetric
    m = st.easgd_roundrobin_map(p, eta, alpha)
    product = np.eye(p + 1)
    for f in workers:
        product = f @ product
    np.testing.assert_allclose(m, product, atol=1e-15)
    s = np.random.default_rng(p).normal(size=p + 1)
    for _ in range(5):
        np.testing.assert_allclose(m @ s, _easgd_rr_reference(s, p, eta, alpha), atol=1e-14)
        s = m @ s


@pytest.mark.parametrize(("eta", "alpha"), [(0.1, 0.05), (1.0, 0.5), (1.9, 0.9), (2.1, 1.1)])
def test_block_eigenvalues_closed_form(eta: float, alpha: float) -> None:
    root = math.sqrt(alpha**2 + eta**2 / 4)
    expected = sorted([1 - alpha - eta / 2 - root, 1 - alpha - eta / 2 + root])
    got = np.sort(np.linalg.eigvalsh(st.easgd_roundrobin_block(eta, alpha)))
    np.testing.assert_allclose(got, expected, atol=1e-14)


def test_roundrobin_condition_is_the_block_condition_on_a_grid() -> None:
    checked = 0
    for eta in np.linspace(-0.5, 2.5, 61):
        for alpha in np.linspace(-0.3, 1.3, 49):
            e, a = float(eta), float(alpha)
            block = np.array([[1 - e - a, a], [a, 1 - a]])
            radius = np.abs(np.linalg.eigvalsh(block)).max()
            if abs(radius - 1) < 1e-9:
                continue  # on the boundary: rounding decides
            assert st.easgd_roundrobin_condition(e, a) == (radius <= 1), (e, a, radius)
            checked += 1
    assert checked > 2500


def test_roundrobin_condition_is_sufficient_not_necessary_for_the_cycle() -> None:
    # spec 6.1: p=2, eta=1, alpha=0.70 > 2/3 is outside the bound, yet the cycle is stable
    assert not st.easgd_roundrobin_condition(1.0, 0.70)
    radius = st.spectral_radius(st.easgd_roundrobin_map(2, 1.0, 0.70))
    # the spec's 0.995 is the per-step rate radius**(1/p); the cycle radius is about 0.989
    assert radius < 1 and radius**0.5 == pytest.approx(0.995, abs=1e-3)
    assert st.spectral_radius(st.easgd_roundrobin_map(3, 1.0, 0.70)) > 1  # but not for p=3
    rng = np.random.default_rng(0)
    for eta, alpha in rng.uniform([0, 0], [2, 1], size=(200, 2)):
        if st.easgd_roundrobin_condition(eta, alpha):
            assert st.spectral_radius(st.easgd_roundrobin_map(4, eta, alpha)) <= 1 + 1e-12


# --------------------------------------------------------------------------- synchronous EASGD


def test_sync_map_structure_and_eigenvalues() -> None:
    p, u, alpha = 4, 0.1, 0.225
    m = st.easgd_sync_map(p, u, alpha)  # beta defaults to p * alpha = 0.9
    assert m[p, p] == pytest.approx(1 - 0.9)
    np.testing.assert_allclose(m[p, :p], 0.9 / p)
    eig = np.sort(np.linalg.eigvals(m).real)
    block = np.array([[1 - u - alpha, alpha], [0.9, 1 - 0.9]])
    expected = np.sort([*([1 - u - alpha] * (p - 1)), *np.linalg.eigvals(block).real])
    np.testing.assert_allclose(eig, expected, atol=1e-12)


@pytest.mark.parametrize("p", [1, 2, 4, 16])
def test_jury_conditions_match_numeric_radius(p: int) -> None:
    rng = np.random.default_rng(p)
    draws = np.column_stack([rng.uniform(0.001, 2.5, 1500), rng.uniform(0.001, 2.0 / p, 1500)])
    grid = np.array(
        [(e, a) for e in np.linspace(0.05, 2.45, 25) for a in np.linspace(0.01, 0.6, 25)]
    )
    checked = stable = 0
    for u, alpha in np.vstack([draws, grid]):
        radius = st.spectral_radius(st.easgd_sync_map(p, u, alpha))
        if abs(radius - 1) < 1e-9:
            continue
        expected = radius < 1
        assert st.easgd_sync_condition(p, u, alpha, p * alpha) == expected, (u, alpha, radius)
        checked += 1
        stable += expected
    assert checked > 2000 and 0.1 * checked < stable < 0.9 * checked  # both sides exercised


def test_jury_with_beta_equal_alpha_gives_the_roundrobin_bound() -> None:
    u = 0.8
    bound = (4 - 2 * u) / (4 - u)
    assert st.easgd_sync_condition(1, u, bound - 1e-6, bound - 1e-6)
    assert not st.easgd_sync_condition(1, u, bound + 1e-6, bound + 1e-6)


# --------------------------------------------------------------------------- round-robin ADMM


def _admm_worker_reference(i: int, p: int, eta: float, rho: float) -> np.ndarray:
    """F3 @ F2 @ F1 as three explicit matrices from the spec section 2.4 equations."""
    n, lam, x, c = 2 * p + 1, i, p + i, 2 * p
    f1 = np.eye(n)
    f1[lam, x], f1[lam, c] = -1.0, 1.0  # lambda <- lambda - (x - center)
    f2 = np.eye(n)
    f2[x, x] = (1 - eta) / (
        1 + eta * rho
    )  # x <- (x - eta x + eta rho (lambda + center))/(1+eta rho)
    f2[x, lam] = f2[x, c] = eta * rho / (1 + eta * rho)
    f3 = np.eye(n)
    f3[c, :] = np.r_[np.full(p, -1 / p), np.full(p, 1 / p), 0.0]  # center <- mean(x - lambda)
    return f3 @ f2 @ f1


@pytest.mark.parametrize(("p", "radius"), [(2, 0.99900), (3, 1.00097), (8, 1.00226)])
def test_admm_radius_at_the_paper_example(p: int, radius: float) -> None:
    m = st.admm_roundrobin_map(p, 0.001, 2.5)
    assert round(st.spectral_radius(m), 5) == radius
    product = np.eye(2 * p + 1)
    for i in range(p):
        f = st.admm_roundrobin_worker_map(i, p, 0.001, 2.5)
        np.testing.assert_allclose(f, _admm_worker_reference(i, p, 0.001, 2.5), atol=1e-15)
        assert st.spectral_radius(f) == pytest.approx(1.0, abs=1e-12)  # each alone: radius 1
        assert not np.allclose(f, f.T)  # unlike EASGD, not symmetric
        product = f @ product
    np.testing.assert_allclose(m, product, atol=1e-13)


def test_admm_diverges_from_the_paper_start() -> None:
    d = st.admm_divergence(3, cycles=20_000)
    assert d.spectral_radius == pytest.approx(1.00097, abs=5e-6)
    assert d.overflow_cycle is None and d.max_abs.shape == (20_000,)
    assert 3e4 < d.max_abs[9_999] < 2e5  # ~7e4 after 1e4 cycles
    assert 5e8 < d.max_abs[-1] < 3e9  # ~1.2e9 after 2e4 cycles
    assert d.growth == pytest.approx(d.max_abs[-1] / 1000.0)
    assert st.admm_divergence(2, cycles=20_000).growth < 1e-3  # p=2 is stable there


def test_iterate_map_stops_at_overflow(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="easgd.analysis.stability"):
        out = st.iterate_map(1e200 * np.eye(2), np.ones(2), 5)
    np.testing.assert_array_equal(out, [1e200, np.inf, np.inf, np.inf, np.inf])
    assert "overflow at step 2" in caplog.text
    traj = st.iterate_map(np.diag([0.5, 2.0]), np.ones(2), 3, trajectory=True)
    np.testing.assert_allclose(traj, [[0.5, 2], [0.25, 4], [0.125, 8]])


# --------------------------------------------------------------------------- variance


@pytest.mark.parametrize(
    ("p", "eta", "h", "sigma", "alpha", "beta"),
    [
        (4, 0.1, 1.0, 1.0, 0.225, 0.9),
        (1, 0.05, 2.0, 0.3, 0.2, 0.5),
        (16, 0.3, 0.5, 2.0, 0.05, 0.8),
        (3, 0.5, 1.5, 1.0, 0.3, 1.5),
        (8, 0.02, 3.0, 0.7, 0.1, None),
    ],
)
def test_center_variance_closed_form_matches_lyapunov(
    p: int, eta: float, h: float, sigma: float, alpha: float, beta: float | None
) -> None:
    closed = st.center_stationary_variance(p, eta, h, sigma, alpha, beta)
    numeric = st.center_stationary_variance_numeric(p, eta, h, sigma, alpha, beta)
    assert closed == pytest.approx(numeric, rel=1e-9)


@pytest.mark.parametrize(
    ("p", "alpha", "beta", "ratio"),
    [(4, 0.225, 0.9, 0.79), (16, 0.9 / 16, 0.9, 0.93), (4, 0.01, 0.04, 0.26)],
)
def test_center_variance_ratio_to_averaged_sgd(
    p: int, alpha: float, beta: float, ratio: float
) -> None:
    u, sigma = 0.1, 1.3
    got = st.center_stationary_variance(p, u, 1.0, sigma, alpha, beta)
    assert got / st.averaged_sgd_variance(p, u, 1.0, sigma) == pytest.approx(ratio, abs=0.005)


def test_center_variance_needs_a_stable_map() -> None:
    with pytest.raises(ValueError, match="not stable"):
        st.center_stationary_variance(4, 1.0, 1.0, 1.0, 0.5)


# --------------------------------------------------------------------------- cooperative SGD


@pytest.mark.parametrize(("m", "alpha"), [(1, 0.3), (4, 0.1), (7, 2 / 9)])
def test_mixing_matrix_spectrum(m: int, alpha: float) -> None:
    w = easgd_mixing_matrix(m, alpha)
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose(w.sum(axis=0), 1, atol=1e-15)
    np.testing.assert_allclose(w.sum(axis=1), 1, atol=1e-15)
    expected = np.sort([1.0, *([1 - alpha] * (m - 1)), 1 - (m + 1) * alpha])
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(w)), expected, atol=1e-14)
    assert mixing_zeta(w) == pytest.approx(max(abs(e) for e in expected[:-1]), abs=1e-14)


@pytest.mark.parametrize("m", [2, 4, 16])
def test_optimal_elasticity(m: int) -> None:
    alpha, zeta = optimal_elasticity(m)
    assert (alpha, zeta) == pytest.approx((2 / (m + 2), m / (m + 2)))
    assert mixing_zeta(easgd_mixing_matrix(m, alpha)) == pytest.approx(zeta, abs=1e-12)
    grid = np.linspace(0.001, 2 / (m + 1) - 1e-3, 400)
    assert min(mixing_zeta(easgd_mixing_matrix(m, float(a))) for a in grid) >= zeta - 1e-12
    assert optimal_elasticity(1) == (0.5, 0.0)  # one worker: no 1-alpha eigenvalue


def test_mixing_without_consensus_warns() -> None:
    with pytest.warns(RuntimeWarning, match="zeta >= 1"):
        easgd_mixing_matrix(4, 0.5)


# --------------------------------------------------------------------------- analyze


def test_analyze_reports_radius_and_both_stability_verdicts() -> None:
    r = st.analyze("admm-roundrobin", 3, 0.001, rho=2.5)
    assert r["spectral_radius"] == pytest.approx(1.00097, abs=5e-6)
    assert r["stable"] is False and r["analytic_stable"] is None and "alpha" not in r
    assert len(r["eigenvalues"]) == 7
    mags = [math.hypot(*z) for z in r["eigenvalues"]]
    assert mags == sorted(mags, reverse=True) and mags[0] == pytest.approx(r["spectral_radius"])

    r = st.analyze("easgd-sync", 4, 0.1, alpha=0.225)
    assert r["beta"] == pytest.approx(0.9)
    assert r["stable"] is True and r["analytic_stable"] is True and r["marginal"] is False

    r = st.analyze("easgd-roundrobin", 2, 1.0, alpha=0.7)  # composite stable past the bound
    assert r["stable"] is True and r["analytic_stable"] is False


def test_marginal_radius_counts_as_stable() -> None:
    # one worker of ADMM alone has radius exactly 1: not exponentially divergent
    radius = st.spectral_radius(st.admm_roundrobin_worker_map(0, 3, 0.001, 2.5))
    assert radius <= 1 + st.STABILITY_TOL


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"map_name": "easgd-sgd", "p": 2, "eta": 0.1, "alpha": 0.1}, "map='easgd-sgd'"),
    ({"map_name": "easgd-sync", "p": 0, "eta": 0.1, "alpha": 0.1}, "p=0"),
    ({"map_name": "easgd-sync", "p": 2.5, "eta": 0.1, "alpha": 0.1}, "p=2.5"),
    ({"map_name": "easgd-sync", "p": True, "eta": 0.1, "alpha": 0.1}, "p=True"),
    ({"map_name": "easgd-sync", "p": 2, "eta": -0.1, "alpha": 0.1}, "eta=-0.1 is outside (0, inf)"),
    ({"map_name": "easgd-sync", "p": 2, "eta": math.inf, "alpha": 0.1}, "eta=inf"),
    ({"map_name": "easgd-sync", "p": 2, "eta": math.nan, "alpha": 0.1}, "eta=nan"),
    ({"map_name": "easgd-sync", "p": 2, "eta": 0.1, "alpha": 0.0}, "alpha=0.0 is outside (0, inf)"),
    ({"map_name": "easgd-sync", "p": 2, "eta": 0.1, "alpha": 0.1, "beta": -1.0}, "beta=-1.0"),
    ({"map_name": "easgd-sync", "p": 2, "eta": 0.1}, "needs alpha"),
    ({"map_name": "easgd-roundrobin", "p": 2, "eta": 0.1, "rho": 2.5}, "rho=2.5 was given"),
    ({"map_name": "easgd-roundrobin", "p": 2, "eta": 0.1, "alpha": 0.1, "beta": 0.2}, "beta=0.2"),
    ({"map_name": "admm-roundrobin", "p": 2, "eta": 0.1, "alpha": 0.1}, "alpha=0.1 was given"),
    ({"map_name": "admm-roundrobin", "p": 2, "eta": 0.1}, "needs rho"),
    ({"map_name": "admm-roundrobin", "p": 2, "eta": 0.1, "rho": math.nan}, "rho=nan"),
    ({"map_name": "admm-roundrobin", "p": 10_000, "eta": 0.1, "rho": 1.0}, "p=10000 is outside"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS)
def test_analyze_rejects_bad_inputs(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        st.analyze(**kwargs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: st.easgd_roundrobin_worker_map(3, 3, 0.1, 0.1), "i=3 is not a worker index"),
        (lambda: st.admm_roundrobin_map(3, 0.1, -2.0), "rho=-2.0"),
        (lambda: st.spectral_radius(np.ones((2, 3))), "square"),
        (lambda: st.iterate_map(np.eye(2), np.ones(3), 4), "matching vector"),
        (lambda: st.admm_divergence(3, cycles=0), "cycles=0"),
        (lambda: st.averaged_sgd_variance(2, 2.0, 1.0, 1.0), "eta\\*h=2"),
        (lambda: st.center_stationary_variance(2, 0.1, 1.0, -1.0, 0.1), "sigma=-1.0"),
        (lambda: st.easgd_roundrobin_condition(math.nan, 0.1), "eta=nan"),
        (lambda: easgd_mixing_matrix(0, 0.1), "m=0"),
        (lambda: easgd_mixing_matrix(3, -0.1), "alpha=-0.1"),
        (lambda: mixing_zeta(np.array([[0.5, 0.5], [0.0, 1.0]])), "not symmetric"),
        (lambda: mixing_zeta(np.array([[0.5, 0.2], [0.2, 0.5]])), "not doubly stochastic"),
    ],
)
def test_library_rejects_bad_inputs(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()

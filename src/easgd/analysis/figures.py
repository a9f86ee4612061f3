"""The stability figures: spectral radius over a grid of parameters, as PNG and SVG.

:func:`write_figures` draws, for round-robin ADMM (the paper's Figure 1), round-robin EASGD
and synchronous EASGD, the spectral radius of one cycle of the linear map of
:mod:`easgd.analysis.stability` over a grid of ``(eta, alpha)`` or ``(eta, rho)``, with the
numeric boundary ``radius = 1``, the unstable region hatched, and the analytic boundary where
one is known. The maps themselves are :mod:`easgd.analysis.stability`'s batched private
step functions, so a figure shows exactly the maps that ``easgd stability --map`` analyses;
this module only lays them out. Every file is written atomically through
:func:`easgd.runlog.atomic_write_bytes`.

matplotlib (and :mod:`easgd.runlog`, which imports torch) are imported only when figures are
written, so ``easgd --help`` and ``easgd stability --map`` stay light.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from easgd.analysis.stability import (
    Array,
    _admm_rr_composite,
    _easgd_rr_composite,
    _jury,
    _radius,
    _sync_map,
)

__all__ = ["write_figures"]

logger = logging.getLogger(__name__)

_DPI = 110


def _grid(lo: float, hi: float, n: int) -> Array:
    """Cell centers of ``n`` equal cells in ``(lo, hi)``: never touches the open ends."""
    edges = np.linspace(lo, hi, n + 1)
    return np.asarray((edges[:-1] + edges[1:]) / 2)


def _panel(
    fig: Any, ax: Any, x: Array, y: Array, radius: Array, norm: Any, title: str, extend: str
) -> None:
    """Radius as colour, the numeric boundary radius=1 and hatching where it exceeds 1."""
    mesh = ax.pcolormesh(x, y, radius, norm=norm, cmap="RdBu_r", shading="nearest")
    if radius.max() > 1 > radius.min():
        ax.contourf(x, y, radius, levels=[1, np.inf], colors="none", hatches=["//"])
        ax.contour(x, y, radius, levels=[1], colors="k", linewidths=1.5)
    bar = fig.colorbar(mesh, ax=ax, extend=extend)
    bar.set_label("spectral radius")
    if norm.vmax - norm.vmin < 0.1:
        # near 1 the two halves of TwoSlopeNorm differ in scale: tick both explicitly
        bar.set_ticks(np.r_[np.linspace(norm.vmin, 1, 4), np.linspace(1, norm.vmax, 4)[1:]])
    ax.set_title(title)


def _legend(ax: Any, analytic: str | None = None, point: str | None = None) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color="k", lw=1.5, label="radius = 1 (numeric)"),
        Patch(facecolor="white", edgecolor="k", hatch="//", label="radius > 1: unstable"),
    ]
    if analytic:
        handles.append(Line2D([], [], color="gold", lw=2.5, ls="--", label=analytic))
    if point:
        handles.append(Line2D([], [], color="k", marker="*", ms=11, ls="", label=point))
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)


def _admm_figure(n: int) -> Any:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    eta, rho = _grid(0.0, 1e-2, n), _grid(0.0, 10.0, n)
    e, r = np.meshgrid(eta, rho)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    for ax, p in zip(fig.subplots(1, 2), (3, 8), strict=True):
        rad = _radius(_admm_rr_composite(p, e, r))
        norm = TwoSlopeNorm(vcenter=1.0, vmin=min(rad.min(), 1 - 1e-4), vmax=max(rad.max(), 1.0001))
        _panel(fig, ax, eta * 1e3, rho, rad, norm, f"round-robin ADMM, p = {p}", "neither")
        ax.plot([1.0], [2.5], "k*", ms=11)
        ax.set_xlabel(r"$\eta\,h$ ($\times 10^{-3}$)")
        ax.set_ylabel(r"$\rho$")
        _legend(ax, point=r"$\eta=10^{-3}, \rho=2.5$ (divergence example)")
    fig.suptitle(r"Largest $|\mathrm{eig}|$ of one round-robin ADMM cycle $F^p\circ\dots\circ F^1$")
    return fig


def _easgd_figure(n: int, sync: bool) -> Any:
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    p = 4
    a_hi = 0.6 if sync else 1.2
    eta, alpha = _grid(0.0, 2.2, n), _grid(0.0, a_hi, n)
    e, a = np.meshgrid(eta, alpha)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=2.0)
    if sync:
        fig = Figure(figsize=(6.2, 4.6), layout="constrained")
        ax = fig.subplots()
        _panel(
            fig,
            ax,
            eta,
            alpha,
            _radius(_sync_map(p, e, a, p * a)),
            norm,
            rf"p = {p}, $\beta = p\alpha$",
            "max",
        )
        fine_e, fine_a = np.meshgrid(_grid(0.0, 2.2, 400), _grid(0.0, a_hi, 400))
        jury = _jury(p, fine_e, fine_a, p * fine_a).astype(float)
        ax.contour(
            fine_e, fine_a, jury, levels=[0.5], colors="gold", linewidths=2.5, linestyles="--"
        )
        _legend(ax, analytic="Jury conditions (analytic)")
        axes = [ax]
    else:
        fig = Figure(figsize=(11, 4.4), layout="constrained")
        axes = list(fig.subplots(1, 2))
        block = _radius(_easgd_rr_composite(1, e, a))
        _panel(fig, axes[0], eta, alpha, block, norm, "one worker's 2x2 block", "max")
        _panel(
            fig,
            axes[1],
            eta,
            alpha,
            _radius(_easgd_rr_composite(p, e, a)),
            norm,
            rf"one cycle $F^{p}\circ\dots\circ F^1$, p = {p}",
            "max",
        )
        curve = np.linspace(0.0, 2.0, 200)
        for ax in axes:
            ax.plot(curve, (4 - 2 * curve) / (4 - curve), color="gold", lw=2.5, ls="--")
            _legend(ax, analytic=r"$\alpha = (4-2\eta)/(4-\eta)$, $\eta \leq 2$")
    for ax in axes:
        ax.set_xlabel(r"$\eta\,h$")
        ax.set_ylabel(r"$\alpha$")
        ax.set_xlim(0, 2.2)
        ax.set_ylim(0, a_hi)
    kind = "Synchronous" if sync else "Round-robin"
    fig.suptitle(f"{kind} EASGD on $F(x) = h x^2/2$: spectral radius (blue = stable)")
    return fig


def write_figures(out_dir: str | os.PathLike[str], *, resolution: int = 80) -> list[Path]:
    """Write the stability figures, each as PNG and SVG, into ``out_dir``; return the paths.

    1. ``admm_roundrobin_radius``: largest |eig| of a round-robin ADMM cycle over
       eta in (0, 1e-2), rho in (0, 10), for p=3 and p=8 (the paper's Figure 1).
    2. ``easgd_roundrobin_radius``: round-robin EASGD over eta*h in (0, 2.2), alpha in (0, 1.2),
       for the shared 2x2 block and a p=4 cycle, with the analytic boundary.
    3. ``easgd_sync_radius``: synchronous EASGD, p=4, beta=p*alpha, with the Jury boundary.

    ``resolution`` is the number of grid points per axis (10..1000).
    """
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or not (10 <= resolution <= 1000)
    ):
        raise ValueError(f"resolution={resolution!r} is outside [10, 1000] grid points per axis")
    from easgd.runlog import atomic_write_bytes

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"figure directory {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "admm_roundrobin_radius": lambda: _admm_figure(resolution),
        "easgd_roundrobin_radius": lambda: _easgd_figure(resolution, sync=False),
        "easgd_sync_radius": lambda: _easgd_figure(resolution, sync=True),
    }
    paths: list[Path] = []
    for name, make in figures.items():
        fig = make()
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=_DPI)
            atomic_write_bytes(path, buf.getvalue(), mode=0o644)  # figures are to share
            paths.append(path)
            logger.info("wrote %s", path)
    return paths

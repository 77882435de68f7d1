"""A linear Cox proportional-hazards model with an L2 penalty, fit by L-BFGS (SciPy) on the partial likelihood
with Breslow's handling of tied times, and Breslow's estimator of the baseline cumulative hazard: the survival
floor row of the report (bench/probes.py), small enough to read and test in full.

Objective (Cox 1972; ties as Breslow 1974: each event's risk set is every patient still followed at its time,
tied ones included), for rows ``x_i`` with times ``t_i``, events ``δ_i`` and ``η_i = x_i·β``::

    f(β) = C · Σ_{i: δ_i = 1} [ log Σ_{j: t_j ≥ t_i} exp(η_j) − η_i ] + ½ ‖β‖²

the penalty written as scikit-learn writes its logistic regression's (``C`` the inverse strength), so one grid
of ``C`` serves every probe. It is minimised divided by ``C`` times the number of events (the same minimiser,
better scaled). The baseline cumulative hazard is Breslow's, ``H₀(t) = Σ_{t_i ≤ t, δ_i = 1} 1 / Σ_{j: t_j ≥ t_i}
exp(η_j)``, so that ``S(t | x) = exp(−H₀(t) exp(x·β))``. No intercept: the model is invariant to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

__all__ = ["CoxModel", "fit_cox", "neg_partial_log_likelihood"]


def _risk_sets(time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order of the rows by decreasing time and, per sorted row, the last sorted position whose time is
    not smaller than its own: the cumulative sums up to it are the sums over its (Breslow) risk set."""
    order = np.argsort(-time, kind="stable")
    desc = -time[order]  # ascending
    return order, np.searchsorted(desc, desc, side="right") - 1


def neg_partial_log_likelihood(
    eta: np.ndarray, time: np.ndarray, event: np.ndarray, x: np.ndarray | None = None
) -> tuple[float, np.ndarray | None]:
    """``−log PL`` (Breslow ties; summed over events) of log relative hazards ``eta``, and, with ``x``, its
    gradient with respect to ``β`` of ``eta = x·β``."""
    order, last = _risk_sets(np.asarray(time, dtype=np.float64))
    e, d = np.asarray(eta, dtype=np.float64)[order], np.asarray(event)[order] == 1
    shift = e.max() if len(e) else 0.0
    w = np.exp(e - shift)
    denom = np.cumsum(w)[last]
    value = float(np.sum(np.log(denom[d]) + shift - e[d]))
    if x is None:
        return value, None
    xs = np.asarray(x, dtype=np.float64)[order]
    weighted = np.cumsum(w[:, None] * xs, axis=0)[last]
    grad = np.sum(weighted[d] / denom[d, None] - xs[d], axis=0)
    return value, grad


@dataclass(frozen=True)
class CoxModel:
    """A fitted model: coefficients ``β`` and the Breslow baseline cumulative hazard, a step function with
    jumps ``hazard_jumps`` at the distinct event times ``event_times`` (ascending)."""

    coef: np.ndarray
    event_times: np.ndarray
    hazard_jumps: np.ndarray

    def log_hazard(self, x: np.ndarray) -> np.ndarray:
        """``η = x·β`` of rows ``x`` (the relative log-hazard; higher: earlier event)."""
        return np.asarray(x, dtype=np.float64) @ self.coef

    def cumulative_hazard(self, times: np.ndarray) -> np.ndarray:
        """``H₀(t)`` at each of ``times`` (0 before the first event time)."""
        steps = np.searchsorted(self.event_times, np.asarray(times, dtype=np.float64), side="right")
        return np.concatenate([[0.0], np.cumsum(self.hazard_jumps)])[steps]

    def survival(self, x: np.ndarray, times: np.ndarray) -> np.ndarray:
        """``S(t | x) = exp(−H₀(t) exp(x·β))``, shape ``(rows, times)``."""
        return np.exp(-np.outer(np.exp(self.log_hazard(x)), self.cumulative_hazard(times)))


def _breslow(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Breslow's baseline hazard jumps: at each distinct event time, its events over its risk set's sum."""
    times = np.unique(time[event == 1])
    w = np.exp(eta)
    at_risk = np.array([w[time >= t].sum() for t in times])
    deaths = np.array([np.sum((time == t) & (event == 1)) for t in times])
    return times, deaths / at_risk


def fit_cox(
    x: np.ndarray, time: np.ndarray, event: np.ndarray, c: float, start: np.ndarray | None = None
) -> CoxModel:
    """Minimise the penalised objective of this module's docstring on rows ``x`` ``(n, D)`` (L-BFGS from
    ``start``, default 0, to a gradient of 1e-9); then Breslow's baseline hazard at the fitted ``β``."""
    x = np.asarray(x, dtype=np.float64)
    time, event = np.asarray(time, dtype=np.float64), np.asarray(event).astype(int)
    if not event.any():
        raise ValueError("a Cox model needs at least one event")
    events = int(event.sum())

    def objective(beta: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = neg_partial_log_likelihood(x @ beta, time, event, x)
        return value / events + beta @ beta / (2 * c * events), grad / events + beta / (c * events)

    beta0 = np.zeros(x.shape[1]) if start is None else np.asarray(start, dtype=np.float64)
    fit = minimize(
        objective,
        beta0,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-9, "ftol": 1e-15},
    )
    times, jumps = _breslow(x @ fit.x, time, event)
    return CoxModel(fit.x, times, jumps)

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Phases
#
# > The step window of the sharpest sustained change in a training curve, found by a continuous
# > three-segment linear fit, or "none" when the curve has no such window.
#
# Paper 1 §6 (Figure 6) shades steps 2,600–3,200 of the large MAML model, where PER collapses,
# Paloma perplexity drops and query accuracy jumps, and reads it as a phase transition. The paper
# picks the window by eye; here it is a fitted quantity, computed the same way for every curve
# (PER, Paloma perplexity, query accuracy, ...) of every run, so a claimed window can be checked
# and a curve without one says so.

# %%
#| default_exp phases

# %%
#| export
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd


# %% [markdown]
# ## The model of a curve
#
# A curve $y(t)$ over steps $t$ (noisy, irregularly spaced) is fitted by a continuous piecewise-linear
# function with two breakpoints $b_1 < b_2$:
# $$\hat y(t) = c_0 + c_1 t + c_2 (t - b_1)_+ + c_3 (t - b_2)_+,$$
# so the slopes are $c_1$ before $b_1$, $m = c_1 + c_2$ inside the window, and $c_1 + c_2 + c_3$
# after $b_2$. For fixed breakpoints this is ordinary least squares on four hinge features; the
# breakpoints are searched below (steps are rescaled to [0, 1] for conditioning).
# All breakpoint pairs are solved at once as a batch of least-squares problems, and so are many
# curves on the same steps (the columns of `y`: the resampled curves of the significance test below).
# The residual sum of squares comes from the normal equations, $y^\top y - \hat c^\top X^\top y$, so no
# (pairs × points × curves) residual array is formed.

# %%
#| export
def hinge_features(t: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    "Design matrices [1, t, (t-b1)+, (t-b2)+] for each breakpoint pair: (P, n, 4)."
    t = t[None, :]  # (1, n)
    ones = np.ones((len(b1), t.shape[1]))
    return np.stack([ones, ones * t, np.maximum(t - b1[:, None], 0), np.maximum(t - b2[:, None], 0)], axis=-1)

def fit_breakpoint_pairs(t: np.ndarray, y: np.ndarray, b1: np.ndarray, b2: np.ndarray):
    "Least-squares coefficients (P, 4[, R]) and residual sums of squares (P[, R]) per breakpoint pair of y (n[, R])."
    X, Y = hinge_features(t, b1, b2), y if y.ndim == 2 else y[:, None]  # (P, n, 4), (n, R)
    XtX, XtY = np.einsum("pni,pnj->pij", X, X), np.einsum("pni,nr->pir", X, Y)  # (P, 4, 4), (P, 4, R)
    coef = np.linalg.solve(XtX + 1e-12 * np.eye(4), XtY)  # (P, 4, R)
    sse = np.maximum((Y ** 2).sum(0)[None, :] - np.einsum("pir,pir->pr", coef, XtY), 0)  # (P, R)
    return (coef, sse) if y.ndim == 2 else (coef[..., 0], sse[:, 0])


# %%
t = np.linspace(0, 1, 21)
truth = np.where(t < 0.4, 1.0, np.where(t < 0.6, 1.0 - 2.0 * (t - 0.4), 0.6))  # flat, slope -2, flat
coef, sse = fit_breakpoint_pairs(t, truth, np.array([0.4, 0.3]), np.array([0.6, 0.6]))
assert np.allclose(coef[0], [1.0, 0.0, -2.0, 2.0], atol=1e-6) and sse[0] < 1e-9 < sse[1]
_, sse2 = fit_breakpoint_pairs(t, np.stack([truth, 2 * truth], 1), np.array([0.4, 0.3]), np.array([0.6, 0.6]))
assert np.allclose(sse2[:, 0], sse) and np.allclose(sse2[:, 1], 4 * sse)  # several curves at once


# %% [markdown]
# ## Searching the breakpoints
#
# The breakpoints are searched first over at most `max_candidates` of the observed steps (evenly
# spaced in index), then on a finer grid of `refine` positions between the neighbours of each coarse
# optimum, so a window's ends need not fall on an observed step (with irregular spacing the nearest
# observation can be far from the true break). Each outer segment keeps at least `min_points`
# observations, so its slope is estimated from data.

# %%
#| export
def _search(t, y, candidates, min_points):
    i, j = np.triu_indices(len(candidates), k=1)
    b1, b2 = candidates[i], candidates[j]
    keep = ((t[None, :] <= b1[:, None]).sum(1) >= min_points) & ((t[None, :] >= b2[:, None]).sum(1) >= min_points)
    if not keep.any(): return None
    coef, sse = fit_breakpoint_pairs(t, y, b1[keep], b2[keep])
    best = int(np.argmin(sse))
    return float(b1[keep][best]), float(b2[keep][best]), coef[best], float(sse[best])

def best_three_segments(t: np.ndarray, y: np.ndarray, min_points: int = 3, max_candidates: int = 60, refine: int = 8):
    "Breakpoints, coefficients and SSE of the best continuous 3-segment fit (coarse grid, then refined)."
    coarse = np.unique(t[np.linspace(0, len(t) - 1, min(len(t), max_candidates)).round().astype(int)])
    found = _search(t, y, coarse, min_points)
    if found is None: return None
    def around(b):  # a fine grid between the coarse neighbours of b
        k = int(np.searchsorted(coarse, b))
        return np.linspace(coarse[max(k - 1, 0)], coarse[min(k + 1, len(coarse) - 1)], 2 * refine + 1)
    return _search(t, y, np.union1d(around(found[0]), around(found[1])), min_points) or found


# %%
rng = np.random.default_rng(0)
t = np.sort(rng.uniform(0, 1, 400))
y = np.where(t < 0.4, 1.0, np.where(t < 0.6, 1.0 - 2.0 * (t - 0.4), 0.6)) + 0.01 * rng.normal(size=t.size)
b1, b2, coef, sse = best_three_segments(t, y)  # 400 points: coarse grid of 60, then refined
assert abs(b1 - 0.4) < 0.02 and abs(b2 - 0.6) < 0.02 and abs(coef[1] + coef[2] + 2.0) < 0.2
t_sparse = np.array([0, .1, .2, .3, .45, .5, .55, .7, .8, .9, 1.0])  # no observation near the breaks
b1, b2, _, _ = best_three_segments(t_sparse, np.interp(t_sparse, [0, .4, .6, 1], [1, 1, .6, .6]))
assert abs(b1 - 0.4) < 0.02 and abs(b2 - 0.6) < 0.02


# %% [markdown]
# ## When is there a phase?
#
# The best 3-segment fit always exists, so four conditions decide whether its middle segment is a
# phase, and the answer is `None` otherwise:
#
# 1. **It is a window, not a blip:** it spans at least `min_width` of the curve's steps (5 %: 300 of
#    6,000 steps, three evaluations at the papers' cadence) and holds at least two observations.
# 2. **It is the sharpest part:** the middle slope is at least `min_steepness` = 3 times as steep as
#    both outer slopes, so a curve that changes at an even pace, or changes most at its start (an
#    ordinary decaying loss), has no window.
# 3. **It beats a straight line by a clear margin:** $\Delta\mathrm{BIC} = n \ln(\mathrm{SSE}_{line}/
#    \mathrm{SSE}_{3}) - 4 \ln n \ge 10$ (`min_bic_gain`; 4 extra parameters; "very strong evidence"
#    on the Kass–Raftery scale). This is a cheap screen: BIC's penalty assumes independent residuals.
# 4. **It beats the noise:** training curves are autocorrelated (one evaluation set, weights that
#    change a little per step), and a fit searched over every breakpoint pair finds a "window" in any
#    wiggle. So the gain $G = n\ln(\mathrm{SSE}_{line}/\mathrm{SSE}_3)$ is compared with its
#    distribution under the null of no phase: `resamples` curves made of the straight-line fit plus
#    the line's residuals resampled in moving blocks of `block` points (default $\lceil\sqrt n\rceil$,
#    8 for 61 evaluations, keeping their correlation over that range), each fitted the same way (on the coarse grid, as the
#    observed curve for this test). The phase stands when $p = (1 + \#\{G^* \ge G\}) / (1 + R)
#    \le$ `alpha` (5 %).
#
# A perfectly straight line (no residual) has no phase. Fit the raw per-evaluation values: a rolling
# mean manufactures smooth bumps that a fit then mistakes for windows (the earlier Figure 6 marked a
# two-step "phase" in a smoothed chance-level curve). The result is the window's first and last step
# (the fitted breakpoints, rounded to whole steps), the size of the change across it (fitted value at
# the end minus at the start, in the curve's units), the slopes' ratio, the BIC gain and the p-value.

# %%
#| export
@dataclass
class Phase:
    "A window of sharp sustained change in a curve."
    start: float  # first step of the window
    end: float  # last step of the window
    change: float  # fitted value at `end` minus at `start`, in the curve's units
    steepness: float  # |middle slope| / max |outer slope|
    bic_gain: float  # BIC of a straight line minus BIC of the 3-segment fit
    p_value: float  # of the gain against the block-resampled straight line

def _line_fit(t, y):
    "Least-squares line values at t of a curve (n,) or curves (n, R)."
    X = np.stack([np.ones_like(t), t], axis=1)
    return X @ np.linalg.lstsq(X, y, rcond=None)[0]

def _line_sse(t, y):
    return float(((y - _line_fit(t, y)) ** 2).sum())


# %%
#| export
def coarse_gains(t: np.ndarray, Y: np.ndarray, min_points: int = 3, max_candidates: int = 60) -> np.ndarray:
    "The gain n ln(SSE_line / SSE_3) of the best 3-segment fit on the coarse grid, for each curve (column) of Y (n, R)."
    coarse = np.unique(t[np.linspace(0, len(t) - 1, min(len(t), max_candidates)).round().astype(int)])
    i, j = np.triu_indices(len(coarse), k=1)
    b1, b2 = coarse[i], coarse[j]
    keep = ((t[None, :] <= b1[:, None]).sum(1) >= min_points) & ((t[None, :] >= b2[:, None]).sum(1) >= min_points)
    _, sse = fit_breakpoint_pairs(t, Y, b1[keep], b2[keep])  # (P, R)
    line = ((Y - _line_fit(t, Y)) ** 2).sum(0)  # (R,)
    return len(t) * np.log(np.maximum(line, 1e-300) / np.maximum(sse.min(0), 1e-300))

def block_resamples(residuals: np.ndarray, block: int, count: int, rng) -> np.ndarray:
    "`count` resamples (n, count) of `residuals` (n,) made of moving blocks of `block` consecutive values."
    n = len(residuals)
    starts = rng.integers(0, n - block + 1, size=(count, -(-n // block)))  # (R, blocks)
    return residuals[(starts[..., None] + np.arange(block)).reshape(count, -1)[:, :n]].T

def noise_p_value(t: np.ndarray, y: np.ndarray, *, min_points: int, max_candidates: int, resamples: int,
                  block: int | None,
                  seed: int) -> float:
    "p-value of the curve's 3-segment gain against a straight line plus block-resampled residuals."
    line = _line_fit(t, y)
    block = block or int(np.ceil(np.sqrt(len(t))))
    null = line[:, None] + block_resamples(y - line, block, resamples, np.random.default_rng(seed))  # (n, R)
    observed = coarse_gains(t, y[:, None], min_points, max_candidates)[0]
    return float((1 + (coarse_gains(t, null, min_points, max_candidates) >= observed).sum()) / (1 + resamples))


# %%
#| export
def find_phase(steps, values, *, min_bic_gain: float = 10.0, min_steepness: float = 3.0, min_points: int = 3,
               max_candidates: int = 60, min_width: float = 0.05, alpha: float = 0.05, resamples: int = 99,
               block: int | None = None, seed: int = 0) -> Phase | None:
    "The window of sharpest sustained change of a curve (continuous 3-segment fit, tested against the noise), or None."
    steps, values = np.asarray(steps, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(steps) & np.isfinite(values)
    order = np.argsort(steps[ok], kind="stable")
    steps, y = steps[ok][order], values[ok][order]
    if len(steps) < 2 * min_points + 2:
        raise ValueError(f"a phase fit needs at least {2 * min_points + 2} finite points, got {len(steps)}")
    t = (steps - steps[0]) / (steps[-1] - steps[0])  # [0, 1]
    line_sse, n = _line_sse(t, y), len(t)
    if line_sse <= 1e-12 * max(float(((y - y.mean()) ** 2).sum()), 1e-300): return None  # exactly straight
    b1, b2, coef, sse = best_three_segments(t, y, min_points, max_candidates)
    bic_gain = n * np.log(line_sse / max(sse, 1e-300)) - 4 * np.log(n)
    left, middle, right = coef[1], coef[1] + coef[2], coef[1] + coef[2] + coef[3]
    steepness = abs(middle) / max(abs(left), abs(right), 1e-300)
    wide = b2 - b1 >= min_width and ((t >= b1) & (t <= b2)).sum() >= 2  # a window, with observations in it
    if not wide or bic_gain < min_bic_gain or steepness < min_steepness: return None
    p = noise_p_value(t, y, min_points=min_points, max_candidates=max_candidates, resamples=resamples, block=block,
                      seed=seed)
    if p > alpha: return None
    to_step = lambda b: float(round(steps[0] + b * (steps[-1] - steps[0])))  # nearest whole step
    return Phase(to_step(b1), to_step(b2), float(middle * (b2 - b1)), float(steepness), float(bic_gain), p)


# %% [markdown]
# ### Recovering a known break
#
# Synthetic curves shaped like Figure 6: noisy, irregularly spaced steps in [0, 6000], flat (or
# gently drifting) before 2,600, a drop of 0.3 until 3,200, then flat, with Gaussian noise of
# σ = 0.02 on 60 points (about one every 100 steps, the checkpoint interval). Over 20 noise draws
# each end of the window is recovered within 200 steps (two checkpoint intervals; at this noise the
# least-squares optimum itself moves that far in the worst draw), within 75 steps on average, and
# the change within 0.05.

# %%
def synthetic(seed, n=60, start=2600, end=3200, drop=-0.3, noise=0.02, drift=-1e-5):
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(np.arange(0, 6001, 10), n, replace=False))  # irregular spacing
    ramp = np.clip((steps - start) / (end - start), 0, 1) * drop
    return steps, 0.8 + drift * steps + ramp + noise * rng.normal(size=n)

errors = []
for seed in range(20):
    phase = find_phase(*synthetic(seed))
    assert phase is not None, seed
    errors += [abs(phase.start - 2600), abs(phase.end - 3200)]
    assert max(errors[-2:]) <= 200, (seed, phase)
    assert abs(phase.change - (-0.3 - 1e-5 * (phase.end - phase.start))) < 0.05, (seed, phase)
assert np.mean(errors) < 75, np.mean(errors)
print(f"window ends off by {np.mean(errors):.0f} steps on average, {max(errors):.0f} at most")

# %% [markdown]
# A smooth (logistic) rise, like query accuracy jumping from chance, gives a window around its
# midpoint; the unsorted order of the points and missing values do not matter.

# %%
steps = np.arange(0, 6001, 100.0)
acc = 0.03 + 0.5 / (1 + np.exp(-(steps - 2900) / 120)) + 0.01 * np.random.default_rng(1).normal(size=steps.size)
acc[[5, 40]] = np.nan
shuffle = np.random.default_rng(2).permutation(steps.size)
phase = find_phase(steps[shuffle], acc[shuffle])
assert phase.start < 2900 < phase.end and phase.end - phase.start <= 800 and 0.4 < phase.change < 0.6

# %% [markdown]
# ### Saying none
#
# A straight line, exact or noisy, and pure noise have no phase; neither has a curve that changes
# fastest at its start (an exponentially decaying loss). Pure noise, as independent draws (100
# curves of 61 evaluations) and as rolling means of five (60 curves: what the earlier figure was fed),
# reports a phase in at most 5 % of curves. Autocorrelated wander (AR(1), φ = 0.8, 60 curves) is the
# hard case: the screens alone report a phase in about 9 % of such curves, the noise test keeps it
# at or below 10 % (measured: 5 %) and only ever removes phases.

# %%
from picomaml.devtools import raises

steps = np.arange(0, 6001, 100.0)
assert find_phase(steps, 2.0 - 1e-4 * steps) is None
rng = np.random.default_rng(3)
for _ in range(20):
    assert find_phase(steps, 2.0 - 1e-4 * steps + 0.05 * rng.normal(size=steps.size)) is None
assert find_phase(steps, 3 + 4 * np.exp(-steps / 800) + 0.02 * rng.normal(size=steps.size)) is None

def ar1(rng, n, phi=0.8):
    "An AR(1) series of n points with unit innovations."
    e, x = rng.normal(size=n), np.zeros(n)
    for i in range(1, n): x[i] = phi * x[i - 1] + e[i]
    return x

reported = lambda curves, **kw: np.array([find_phase(steps, c, **kw) is not None for c in curves])
wander = [ar1(rng, steps.size) for _ in range(60)]
rates = {"independent noise": reported([rng.normal(size=steps.size) for _ in range(100)]).mean(),
         "rolling means of noise": reported([pd.Series(rng.normal(size=steps.size)).rolling(5, min_periods=1).mean()
                                             for _ in range(60)]).mean()}
tested, screened = reported(wander), reported(wander, alpha=1.0)
assert max(rates.values()) <= 0.05 and tested.mean() <= 0.10 and not (tested & ~screened).any(), (rates, tested.mean())
print({k: f"{v:.0%}" for k, v in rates.items()},
      f"AR(1) wander: {tested.mean():.0%} (screens alone: {screened.mean():.0%})")
raises(lambda: find_phase([1, 2, 3], [1, 2, 3]), "at least 8", kind=ValueError)
# a one-point blip is no window
assert find_phase(steps, np.where(steps == 4200, 1.0, 0.0) + 1e-3 * rng.normal(size=steps.size)) is None


# %% [markdown]
# ## A run's curves
#
# A run's phase table: one row per curve, with the window or NaN where the curve has none.
# `per_curve` turns spectra records (`picomaml.spectra.read_spectra`) into the mean PER over blocks
# for one kind (weight or gradient) and optionally one matrix, the curve Figure 6 plots.

# %%
#| export
def per_curve(spectra: pd.DataFrame, kind: str = "weight", matrix: str | None = None) -> tuple:
    "(steps, mean PER over blocks) from spectra records of one kind (and optionally one matrix)."
    rows = spectra[(spectra.kind == kind) & ((spectra.matrix == matrix) if matrix else True)]
    if rows.empty:
        raise ValueError(f"no spectra records with kind={kind!r}" + (f" and matrix={matrix!r}" if matrix else ""))
    mean = rows.groupby("step").per.mean()
    return mean.index.to_numpy(dtype=float), mean.to_numpy()

def phase_table(curves: dict, **thresholds) -> pd.DataFrame:
    "One row per named curve `{name: (steps, values)}`: its phase window, or NaN where it has none."
    rows = []
    for name, (steps, values) in curves.items():
        phase = find_phase(steps, values, **thresholds)
        rows.append({"curve": name, **(asdict(phase) if phase else dict.fromkeys(Phase.__dataclass_fields__, np.nan))})
    return pd.DataFrame(rows)


# %%
spectra = pd.DataFrame([{"step": s, "layer": l, "matrix": "attention.v_proj", "kind": k, "per": p}
                        for s, p in zip(*synthetic(4)) for l in (0, 1) for k in ("weight", "gradient")])
per_steps, per_values = per_curve(spectra, "weight", "attention.v_proj")
assert np.allclose(per_values, synthetic(4)[1])
table = phase_table({"PER (weights)": (per_steps, per_values),
                     "paloma": (steps, 30 - 1e-3 * steps + rng.normal(size=steps.size))})
assert (table.curve.tolist() == ["PER (weights)", "paloma"] and table.end[0] > table.start[0]
        and np.isnan(table.start[1]))

table

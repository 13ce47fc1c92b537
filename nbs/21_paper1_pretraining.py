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
# # Paper 1: pretraining and learning dynamics
#
# > Figure 1, Table 2 and Figures 3–6 of "Learning dynamics of meta-pretraining", regenerated from
# > the runs' `metrics.jsonl` and `spectra.jsonl`.
#
# This notebook reads only run outputs and writes `p1_fig{1,3,4,5,6}_*.{png,pdf}` and
# `p1_table2_loss_paloma.{md,tex,csv}`. A run that is absent leaves a "missing: <run>" note in its
# panel or table cell; no number is ever filled in. The defaults read the CPU demo (`make demo`:
# `runs/demo-maml`, `runs/demo-vanilla`) and write under `runs/reports/` (only the pipeline writes the
# committed `figures/` and `paper_tables/`); the paper-scale call, run from the repository root, is
# `mkdir -p runs/reports && papermill nbs/21_paper1_pretraining.ipynb runs/reports/21.ipynb --cwd nbs -y '{sizes: [tiny, small, medium, large], seeds: [42, 1, 2], table_step: 6000, phase_size: large}'`
# (lists go through `-y`, YAML; papermill's `-p` would pass them as strings).

# %% tags=["parameters"]
runs_dir = "../runs"  # <runs_dir>/<run_name>/{metrics,spectra}.jsonl
figures_dir = "../runs/reports/figures"  # the pipeline passes ../figures when it regenerates the committed outputs
tables_dir = "../runs/reports/paper_tables"
sizes = ["demo"]  # paper: ["tiny", "small", "medium", "large"]
arms = ["maml", "vanilla"]
seeds = [42]  # pretraining seeds: 42 is the presets' own (runs without a suffix), k runs <name>-seed<k>
table_step = None  # Table 2's step: 6000 in the paper; None: each run's last logged step
loss_window = 10  # Table 2's train loss: mean next-token loss over this many steps ending at the step
smooth = 5  # rolling mean over this many logged steps in the curves
phase_size = "demo"  # Figure 6's model size: "large" in the paper
per_matrices = ["attention.v_proj", "attention.o_proj"]  # Figure 5: attention layers (paper §6)
smoke = False  # fewer bootstrap resamples in the seed bands

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import yaml

from picomaml.names import run_name
from picomaml.phases import find_phase
from picomaml.report import (
    MISSING,
    SIZE_COLORS,
    find_runs,
    format_estimate,
    missing_label,
    missing_note,
    runs_metrics,
    runs_spectra,
    save_figure,
    save_table,
    set_style,
    smoothed,
)

# %% [markdown]
# Under `nbdev_test` (which sets `IN_TEST`) the notebook writes into a temporary directory, so the
# test suite never overwrites the committed demo figures and tables; papermill runs write to the
# parameters' directories.

# %%
if os.environ.get("IN_TEST"):
    figures_dir = tables_dir = tempfile.mkdtemp(prefix="p1_pretraining_")
set_style()
n_boot = 100 if smoke else 1000

# %% [markdown]
# ## The runs
#
# One row per expected (size, arm, seed); `found` says whether its `metrics.jsonl` exists. Names are
# `pico-{size}-{arm}[-seed<k>]` and `demo-{arm}[-seed<k>]` (`picomaml.report.run_name` / `parse_run_name`).

# %%
runs = find_runs(runs_dir, sizes=sizes, arms=arms, seeds=seeds)
runs = runs[runs.has_metrics]
expected = pd.DataFrame([(s, a, k, run_name(s, a, k)) for s in sizes for a in arms for k in seeds],
                        columns=["size", "arm", "seed", "name"])
expected["found"] = expected["name"].isin(runs["name"])
metrics, spectra = runs_metrics(runs), runs_spectra(runs)
expected


# %% [markdown]
# ## A curve panel
#
# Every curve figure draws one metric per run against the step: colour by size, solid MAML and
# dashed vanilla, the line the mean over seeds with its 95 % bootstrap band when there are several.
# A panel with nothing to draw says what is missing.

# %%
def lacking(data: pd.DataFrame, y: str, size=None, arm=None, names=None) -> list[str]:
    "The expected runs (of one size/arm, or `names`) with no logged value of `y` in `data`."
    present = set(data["name"][data[y].notna()]) if y in data else set()
    chosen = expected[expected["size"].isin([size] if size else sizes)
                      & expected.arm.isin([arm] if arm else arms)]["name"]
    return [n for n in (chosen if names is None else names) if n not in present]

def curve_panel(ax, data: pd.DataFrame, y: str, ylabel: str, what: str, arm=None, size=None, logy=False, legend=True,
                names=None) -> None:
    "Plot `y` against step per size (hue) and arm (style); name the expected runs (or `names`) that lack `y` (`what`)."
    ax.set_ylabel(ylabel)
    absent = lacking(data, y, size, arm, names)
    if data.empty or y not in data or data[y].dropna().empty:
        return missing_note(ax, f"{what} of {', '.join(absent) or 'every run'}")
    data = data.dropna(subset=[y])
    sns.lineplot(data=data, x="step", y=y, hue="size", style="arm",
                 palette={s: SIZE_COLORS[s] for s in data["size"].unique()},
                 hue_order=[s for s in sizes if s in set(data["size"])],
                 style_order=[a for a in ("maml", "vanilla") if a in set(data.arm)],
                 errorbar=("ci", 95), n_boot=n_boot, seed=0, ax=ax, linewidth=1, legend=legend,
                 # sparse curves: show the points
                 marker="o" if data.groupby("name").size().max() <= 60 else None, markersize=3)
    if absent: ax.text(0.99, 0.02, missing_label(absent), ha="right", va="bottom", transform=ax.transAxes, fontsize=6,
                       color="0.35")
    if logy: ax.set_yscale("log")
    ax.set_xlabel("step")


# %%
_first = expected.iloc[0]  # whatever runs the parameters ask for: the check holds for any of them
_data = pd.DataFrame({"name": _first["name"], "step": [1, 2], "size": _first["size"], "arm": _first.arm,
                      "loss": [np.nan, 3.0]})
fig, (ax_none, ax_some) = plt.subplots(2, 1)
curve_panel(ax_none, _data.assign(loss=np.nan), "loss", "loss", "metrics")
curve_panel(ax_some, _data, "loss", "loss", "metrics", arm=_first.arm)
assert ax_none.texts[0].get_text() == f"missing: metrics of {', '.join(expected['name'])}"
_others = [n for n in expected["name"][expected.arm == _first.arm] if n != _first["name"]]
assert (len(ax_some.lines[0].get_xdata()) == 1
        and [t.get_text() for t in ax_some.texts] == ([f"missing: {', '.join(_others)}"] if _others else []))
plt.close(fig)

# %% [markdown]
# ## Figure 1: training loss and Paloma perplexity
#
# Paper 1 Fig. 1 plots the training loss (top) and Paloma perplexity (bottom) of the MAML models
# against the pretraining step. Two training losses are logged and both are drawn, labelled:
#
# - **the logged objective** (`loss`): the mean over a step's draws of the loss each draw trained on,
#   next-token cross-entropy for a next-token draw and the 32-way query cross-entropy (at most
#   ln 32 ≈ 3.47) for an episode. pico-train logs this, and the paper very probably reports it: its
#   MAML "train loss" is below the vanilla arm's at every size while its Paloma perplexity is worse,
#   and tiny's 4.44 ≈ (5.41 + ln 32) / 2. It is the curve comparable with the paper, and it does not
#   measure language modelling for the MAML arm;
# - **the next-token loss** (`next_token_loss`): the cross-entropy of the next-token draws only, the same
#   measure in both arms: how well the model predicts text.
#
# The Paloma panel is the per-document mean perplexity (pico-train's measure, the paper's). The paper
# reports the MAML models reaching their vanilla loss 1.3–1.6× sooner and, from Table 2, a worse
# Paloma perplexity at most sizes by step 6,000, with a rise and a second descent in the large model's
# perplexity around step 3,000.

# %%
fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
curve_panel(top, smoothed(metrics, "loss", smooth), "loss", "train loss:\nlogged objective", "training losses")
top.set_title("logged objective (next-token or 32-way query CE per draw): the paper's curve", fontsize=8)
curve_panel(middle, smoothed(metrics, "next_token_loss", smooth), "next_token_loss", "train loss:\nnext-token CE",
            "next-token losses", legend=False)
middle.set_title("next-token cross-entropy of the next-token draws: language modelling", fontsize=8)
curve_panel(bottom, smoothed(metrics, "paloma_doc_ppl"), "paloma_doc_ppl", "Paloma perplexity\n(per-document mean)",
            "Paloma evaluations", logy=True, legend=False)
save_figure(fig, "p1_fig1_loss_paloma", figures_dir)

# %% [markdown]
# ## Table 2: loss and Paloma perplexity at step 6,000
#
# For every size and arm: the training loss, two ways (each the mean over the `loss_window` steps ending
# at the step, since a single step's loss is a few micro-batches'): the **logged objective** (`loss`,
# comparable with the paper's column, see Figure 1) and the **next-token loss** (`next_token_loss`, the
# language-modelling measure, comparable between arms); and the Paloma perplexity evaluated at exactly
# that step, two ways. The paper's numbers are pico-train's
# **per-document mean** perplexity (each document's own perplexity, averaged over documents;
# `paloma_doc_ppl`), so that is the column to read against them; the **token-weighted** perplexity
# (exp of the mean cross-entropy over all tokens; `paloma_ppl`) is beside it, labelled. With
# `table_step = None` (the demo) each run's last logged step is used and the step is shown. A run
# that has not reached the step, or that has no evaluation there, is "missing". Several seeds:
# mean ± half-width of the 95 % bootstrap interval over seeds. The paper's values (single seed, its
# Table 2, from `docs/reported_numbers.csv`) follow our rows, marked `paper:` (`picomaml.report.save_table`).

# %%
PPL_KEYS = ("paloma_doc_ppl", "paloma_ppl")  # per-document mean (the paper's measure), token-weighted

LOSS_KEYS = ("loss", "next_token_loss")  # the logged objective (the paper's), the next-token loss

def loss_and_ppl_at(run: pd.DataFrame, step, window: int) -> tuple:
    ("`(step, mean objective and mean next_token_loss over the `window` steps ending at step, "
     "per-document and token-weighted Paloma at step)`.")
    step = run.step.max() if step is None else step
    if run.empty or run.step.max() < step: return (step, np.nan, np.nan, np.nan, np.nan)
    window = run[(run.step > step - window) & (run.step <= step)]
    # NaN-skipping: logged steps only
    losses = [window[k].astype(float).mean() if k in window else np.nan for k in LOSS_KEYS]
    at = lambda key: run.loc[run.step == step, key].astype(float).dropna() if key in run else pd.Series(dtype=float)
    return (step, *losses, *(at(k).iloc[0] if len(at(k)) else np.nan for k in PPL_KEYS))


# %%
_toy = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [9.0, 3.4, 3.0, 1.0], "next_token_loss": [9.0, np.nan, 3.0, 1.0],
                     "paloma_ppl": [np.nan, 50.0, np.nan, 20.0], "paloma_doc_ppl": [np.nan, 60.0, np.nan, 25.0]})
assert (loss_and_ppl_at(_toy, None, 2) == (4, 2.0, 2.0, 25.0, 20.0)
        and loss_and_ppl_at(_toy, 2, 2)[1:] == (6.2, 9.0, 60.0, 50.0))
assert loss_and_ppl_at(_toy, None, 10)[2] == np.mean([9.0, 3.0, 1.0])  # next-token steps only
assert np.isnan(loss_and_ppl_at(_toy, 3, 2)[3]) and np.isnan(loss_and_ppl_at(_toy, 5, 2)[1])


# %%
def table2() -> pd.DataFrame:
    "Table 2: one row per size and arm, formatted cells (missing where absent)."
    rows = []
    for size in sizes:
        for arm in ("vanilla", "maml"):
            if arm not in arms: continue
            at = [loss_and_ppl_at(metrics[metrics["name"] == r.name], table_step, loss_window)
                  for r in runs[(runs["size"] == size) & (runs.arm == arm)].itertuples()]
            steps = sorted({int(s) for s, *_ in at})
            rows.append({"model": run_name(size, arm), "step": ", ".join(map(str, steps)) or MISSING,
                         "train loss: logged objective (the paper's)": format_estimate([a[1] for a in at]),
                         "train loss: next-token CE (language modelling)": format_estimate([a[2] for a in at]),
                         "Paloma ppl: per-document mean (the paper's)": format_estimate([a[3] for a in at]),
                         "Paloma ppl: token-weighted": format_estimate([a[4] for a in at])})
    return pd.DataFrame(rows)

table = table2()
save_table(table, "p1_table2_loss_paloma", tables_dir,
           "Paper 1 Table 2 at the final step: the training loss as logged (the mean of the loss each draw trained "
           "on, next-token or 32-way query; comparable with the paper's column) and as next-token cross-entropy "
           "(language modelling, comparable between arms), each the mean over the last 10 logged steps; Paloma "
           "perplexity as the mean of per-document perplexities (pico-train's measure, the paper's) and token-weighted")
table


# %% [markdown]
# ## How much sooner MAML reaches the vanilla loss
#
# Paper 1 §4 ("Training-perplexity tradeoff across scales"): "all four Pico-MAML variants reach their respective vanilla loss 1.3–1.6×
# sooner". The paper does not define the measure; ours: let L* be the vanilla arm's training loss at
# its last step (smoothed as in Table 2, a rolling mean over `loss_window` logged steps), T_vanilla the
# first step at which the vanilla arm's smoothed loss reaches L* and T_MAML the first step at which the
# MAML arm's does; the speed-up is T_vanilla / T_MAML. Both losses of Table 2: on the **logged
# objective** (the paper's loss; the MAML arm's includes its query losses, at most ln 32, so it falls
# below the vanilla loss sooner without modelling text better), and on the **next-token loss** (whether
# MAML reaches the vanilla arm's language modelling sooner). Steps are optimizer steps, as in the
# paper's figure (a MAML run takes about half as many next-token micro-batches per step). A MAML arm
# that never reaches L* is reported as not reached. Runs are paired by seed.

# %%
def steps_to(curve: pd.DataFrame, key: str, level: float) -> float:
    "First step at which `key` of a (step-sorted) curve is at most `level`; NaN if never."
    hit = curve.step[curve[key].astype(float) <= level]
    return float(hit.iloc[0]) if len(hit) else np.nan

def speedup(vanilla: pd.DataFrame, maml: pd.DataFrame, key: str = "next_token_loss") -> float:
    "T_vanilla / T_MAML to the vanilla arm's final smoothed `key` (NaN if MAML never reaches it)."
    if vanilla.empty or maml.empty: return np.nan
    target = float(vanilla[key].iloc[-1])
    return steps_to(vanilla, key, target) / steps_to(maml, key, target)


# %%
_v = pd.DataFrame({"step": [100, 200, 300, 400], "next_token_loss": [6.0, 5.0, 4.5, 4.0]})
assert speedup(_v, pd.DataFrame({"step": [100, 200, 300, 400], "next_token_loss": [5.5, 4.2, 3.9, 3.5]})) == 400 / 300
assert np.isnan(speedup(_v, pd.DataFrame({"step": [100, 200], "next_token_loss": [7.0, 6.5]})))


# %%
def speedup_cell(key: str, size: str) -> tuple:
    ("(cell, seeds paired, seeds not reaching it) of MAML's speed-up to the vanilla arm's final smoothed `key`, "
     "paired by seed.")
    curves = smoothed(metrics, key, loss_window)
    pairs = [(curves[curves["name"] == run_name(size, "vanilla", k)],
              curves[curves["name"] == run_name(size, "maml", k)]) for k in seeds]
    pairs = [(v, m) for v, m in pairs if not v.empty and not m.empty]
    ratios = [speedup(v, m, key) for v, m in pairs]
    reached = [r for r in ratios if np.isfinite(r)]
    return (format_estimate(reached) if reached else ("not reached" if pairs else MISSING), len(pairs),
            sum(not np.isfinite(r) for r in ratios))

def speedup_table() -> pd.DataFrame:
    "Per size: MAML's speed-up to the vanilla loss on both losses (mean ± 95 % bootstrap half-width over seeds)."
    rows = []
    for size in sizes:
        (objective, paired, missed), (next_token, _, missed_nt) = (speedup_cell("loss", size),
                                                                   speedup_cell("next_token_loss", size))
        rows.append({"size": size, "seeds": paired,
                     "speed-up on the logged objective (×, the paper's loss)": objective,
                     "speed-up on the next-token loss (×, language modelling)": next_token,
                     "seeds not reaching it (objective, next-token)": f"{missed}, {missed_nt}"})
    return pd.DataFrame(rows)

speedups = speedup_table()
save_table(speedups, "p1_text_speedup", tables_dir,
           "Paper 1 §4: steps for the vanilla arm to reach its final training loss over the steps MAML takes to reach "
           "it, on the logged objective (the paper's loss, which for MAML includes the 32-way query losses) and on "
           "the next-token loss (paper: 1.3-1.6x)")
speedups

# %% [markdown]
# ## Figure 3: support and query accuracy
#
# Paper 1 Fig. 3: support accuracy (after the ten inner steps) and query accuracy of the MAML
# models against the step. Chance is 1/32 ≈ 3.1 % for the papers' 32-way episodes. The paper reports query
# accuracy above 40 % for small and medium, a tiny model stuck near chance, and a late rise of the
# large model after step 4,500 (to over 0.5 after its phase transition).
#
# Solid: the head after its inner loop (φ_T), what the paper plots. Dashed: the same head before it
# (φ_0), which knows nothing of the episode's label order. The gap between the two is what the inner
# loop adapted; where they coincide, the accuracy is not the inner loop's doing (`05_maml` measures how
# far the papers' ten steps at 1e-3 can move the head at all).

# %%
def phi0_overlay(ax, data: pd.DataFrame, key: str, legend: bool) -> None:
    ("Draw φ_0's curve of `key` (the head before its inner loop) dashed, per size, "
     "over the φ_T curves `curve_panel` drew.")
    data = data.dropna(subset=[key]) if key in data else data.iloc[:0]
    for size, g in data.groupby("size", sort=False):
        mean = g.groupby("step")[key].mean()  # over seeds
        ax.plot(mean.index, mean.values, color=SIZE_COLORS[size], linestyle="--", linewidth=0.8)
    if legend and len(data):
        ax.plot([], [], color="0.3", linewidth=1, label="φ_T: after the inner loop")
        ax.plot([], [], color="0.3", linestyle="--", linewidth=0.8, label="φ_0: before it")
        ax.legend(fontsize=7)

# %% [markdown]
# Chance is 1/N for N-way episodes: N is read from the runs' saved `config.yaml` (32 in the papers,
# 4 in the rehearsal's shrunk episodes), so the dotted line is the chance of the runs drawn.

# %%
def episode_ways(run_dirs) -> int | None:
    "The N of the N-way episodes of these runs (their saved config.yaml), or None when none is saved or they differ."
    ways = {yaml.safe_load((Path(d) / "config.yaml").read_text())["smlmt"]["n_way"]
            for d in run_dirs if (Path(d) / "config.yaml").is_file()}
    return ways.pop() if len(ways) == 1 else None

# %%
with tempfile.TemporaryDirectory() as _tmp:
    for _name, _n in (("a", 32), ("b", 32), ("c", 4)):
        (Path(_tmp) / _name).mkdir()
        (Path(_tmp) / _name / "config.yaml").write_text(yaml.safe_dump({"smlmt": {"n_way": _n}}))
    assert (episode_ways([Path(_tmp) / "a", Path(_tmp) / "b"]) == 32
            and episode_ways([Path(_tmp) / "a", Path(_tmp) / "c"]) is None)
    assert episode_ways([Path(_tmp) / "none"]) is None

# %% [markdown]
# Left, the method as the papers write it (the runs above); right, the released trainer's reading
# (`released-<size>-maml`, pretrained by `make paper` and `make rehearse` at the first seed:
# vocabulary-indexed head read at the mask, inner lr 0.01, per-rank episodes whose query set is the
# support set; `docs/settings.md`, "Two readings of the episode branch"). The demo has no released
# run and says so in that column.

# %%
maml = metrics[metrics.arm == "maml"]
released_runs = find_runs(runs_dir, sizes=sizes, arms=["maml"], seeds=seeds[:1], families=("released",))
released = runs_metrics(released_runs[released_runs.has_metrics])
fig, axes = plt.subplots(2, 2, figsize=(11, 5), sharex="col")
released_names = [run_name(s, "maml", seeds[0], "released") for s in sizes if s != "demo"]
readings = [("as written", maml, None, runs[runs.arm == "maml"].path),
            ("released reading", released, released_names, released_runs.path)]
for column, (reading, data, names, run_dirs) in enumerate(readings):
    ways = episode_ways(run_dirs)
    for ax, key, label in [(axes[0, column], "support_acc", "support accuracy"),
                           (axes[1, column], "query_acc", "query accuracy")]:
        if data.empty:
            missing_note(ax, "released runs (none in the demo: make rehearse, make paper)"); continue
        curve_panel(ax, smoothed(data, key, smooth), key, label, "episode metrics", arm="maml",
                    legend=ax is axes[0, column], names=names)
        phi0_overlay(ax, smoothed(data, f"{key}_phi0", smooth), f"{key}_phi0", legend=ax is axes[0, column])
        if ax.lines and ways: ax.axhline(1 / ways, color="0.5", linestyle=":", linewidth=0.8)
    axes[0, column].set_title(f"{reading}{f', {ways}-way episodes' if ways else ''}", fontsize=9)
fig.suptitle("Episode accuracy of the MAML arm (32-way in the papers): φ_T (solid) and φ_0 (dashed); "
             "dotted: chance 1/N", fontsize=8)
save_figure(fig, "p1_fig3_support_query_acc", figures_dir)

# %% [markdown]
# The same four accuracies at the end of training, as numbers: per size, the mean over the last
# `loss_window` logged steps of each, with a 95 % bootstrap interval over seeds when there are several.
# The paper's "above 40 %" (small and medium) is the query accuracy of φ_T; φ_0 beside it says how much
# of that the inner loop did.

# %%
EPISODE_KEYS = {"query accuracy of φ_T (the paper's)": "query_acc", "query accuracy of φ_0": "query_acc_phi0",
                "support accuracy of φ_T": "support_acc", "support accuracy of φ_0": "support_acc_phi0"}

def final_mean(curve: pd.DataFrame, key: str, window: int) -> float:
    "Mean of `key` over a run's last `window` logged steps (NaN if never logged)."
    logged = curve.dropna(subset=[key]) if key in curve else curve.iloc[:0]
    return float(logged.sort_values("step")[key].tail(window).astype(float).mean()) if len(logged) else np.nan

def episode_table() -> pd.DataFrame:
    "Per size: the MAML arm's final support and query accuracy of φ_T and φ_0 (mean over seeds)."
    rows = []
    for size in sizes:
        runs_of = [maml[maml["name"] == run_name(size, "maml", k)] for k in seeds]
        rows.append({"size": size,
                     **{label: format_estimate([final_mean(r, key, loss_window) for r in runs_of], digits=3)
                        for label, key in EPISODE_KEYS.items()}})
    return pd.DataFrame(rows)


# %%
_curve = pd.DataFrame({"step": [3, 1, 2], "query_acc": [0.5, 0.1, np.nan]})
assert final_mean(_curve, "query_acc", 2) == 0.3 and np.isnan(final_mean(_curve, "support_acc", 2))

# %%
episodes = episode_table()
save_table(episodes, "p1_text_episode_accuracy", tables_dir,
           f"Paper 1 Fig. 3 at the end of training: the MAML arm's 32-way query and support accuracy of the adapted "
           f"head (φ_T) and of the head before its inner loop (φ_0), each the mean over the last {loss_window} logged "
           f"steps (chance 1/32 ≈ 0.031)")
episodes

# %% [markdown]
# ## Figure 4: classifier head weights
#
# Paper 1 Fig. 4: the standard deviation (top) and mean (bottom) of the adapted head's logits-layer
# weights across episodes. The paper sees the std grow in every model (the small one most, after
# 2k steps) and the mean stay near zero except for the tiny model, which drifts in one direction.

# %%
fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
curve_panel(top, smoothed(maml, "head_weight_std", smooth), "head_weight_std", "head weight std", "head statistics",
            arm="maml")
curve_panel(bottom, smoothed(maml, "head_weight_mean", smooth), "head_weight_mean", "head weight mean",
            "head statistics", arm="maml", legend=False)
save_figure(fig, "p1_fig4_head_weights", figures_dir)


# %% [markdown]
# ## Figure 5: proportional effective rank of weights and gradients
#
# Paper 1 Fig. 5 (§6, the PER equation): PER of the attention layers' weights (top) and of the
# next-token loss gradients (bottom) for both arms at the checkpoints up to step 6,000, here the
# mean over blocks of `per_matrices`. The paper reports PER declining over training in every MAML
# model, with an abrupt drop in the large one around step 3,000 and no comparable drop in the
# vanilla models.

# %%
def mean_per(spectra: pd.DataFrame, kind: str) -> pd.DataFrame:
    "Per run and step: the mean PER over blocks of the `per_matrices` of one kind (weight|gradient)."
    if spectra.empty or "per" not in spectra:
        return pd.DataFrame(columns=["name", "size", "arm", "seed", "step", "per"])
    chosen = spectra[(spectra.kind == kind) & spectra.matrix.isin(per_matrices)]
    return chosen.groupby(["name", "size", "arm", "seed", "step"], as_index=False).per.mean()


# %%
_spec = pd.DataFrame({"name": "r", "size": "demo", "arm": "maml", "seed": 0, "step": [1, 1, 1, 2],
                      "matrix": ["attention.v_proj", "attention.o_proj", "swiglu.w_2", "attention.v_proj"],
                      "kind": ["weight", "weight", "weight", "gradient"], "per": [0.5, 0.7, 0.1, 0.3]})
assert mean_per(_spec, "weight").per.tolist() == [0.6] and mean_per(_spec, "gradient").step.tolist() == [2]

# %%
fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
curve_panel(top, mean_per(spectra, "weight"), "per", "PER (weights)", "weight spectra")
curve_panel(bottom, mean_per(spectra, "gradient"), "per", "PER (gradients)", "gradient spectra", legend=False)
save_figure(fig, "p1_fig5_per", figures_dir)


# %% [markdown]
# ## Figure 6: the large model's phase transition
#
# Paper 1 Fig. 6: the large MAML model's weight PER, Paloma perplexity and query accuracy over 6,000
# steps, with steps 2,600–3,200 shaded where "PER collapses, perplexity drops, and query accuracy
# jumps". Instead of shading by eye we locate each curve's window of sharpest sustained change with
# `picomaml.phases.find_phase` (nbs/09_phases: a continuous three-segment fit of at least 5 % of the
# steps, steeper than its surroundings, tested against block-resampled noise at the 5 % level) and
# shade the PER window in every panel; each panel's title gives its own window and p-value, so whether
# the three coincide is visible. The fit and the panels use the raw per-evaluation values (the
# mean over seeds when there are several), not a rolling mean, whose smooth bumps the fit would take
# for windows. "no phase" means no window passed; too few points for a fit is said as such.

# %%
def phase_of(curve: pd.DataFrame, y: str):
    "`(Phase | None, reason)` of one curve (seed 0 run, or the mean over seeds)."
    if curve.empty or y not in curve: return None, "no values"
    mean = curve.groupby("step", as_index=False)[y].mean()
    try: return find_phase(mean.step, mean[y]), "no phase"
    except ValueError: return None, f"too few points ({len(mean)})"

_steps = np.arange(0, 6000, 100.0)
_toy_curve = pd.DataFrame({"step": _steps,
                           "per": np.where(_steps < 2600, 0.8,
                                           np.where(_steps > 3200, 0.5, 0.8 - 0.3 * (_steps - 2600) / 600))})
_phase, _ = phase_of(_toy_curve, "per")
assert abs(_phase.start - 2600) <= 100 and abs(_phase.end - 3200) <= 100
assert phase_of(_toy_curve.head(3), "per") == (None, "too few points (3)")

# %%
large = lambda d: d[(d["size"] == phase_size) & (d.arm == "maml")] if not d.empty else d
panels = [(large(mean_per(spectra, "weight")), "per", "PER (weights)", "weight spectra"),
          (large(metrics), "paloma_doc_ppl", "Paloma perplexity (per-document mean)", "Paloma evaluations"),
          (large(metrics), "query_acc", "query accuracy (after adaptation)", "episode metrics")]
phases = [phase_of(data, y) for data, y, _, _ in panels]
fig, axes = plt.subplots(3, 1, figsize=(6, 6), sharex=True)
for ax, (data, y, label, what), (phase, reason) in zip(axes, panels, phases):
    curve_panel(ax, data, y, label, what, arm="maml", size=phase_size, legend=False)
    if not data.empty:
        ax.set_title(f"{label}: " + (f"steps {phase.start:.0f}–{phase.end:.0f} (p = {phase.p_value:.2f})" if phase
                                     else reason), fontsize=8)
    if phases[0][0] and not data.empty: ax.axvspan(phases[0][0].start, phases[0][0].end, color="#CC79A7", alpha=0.2,
                                                   linewidth=0)
save_figure(fig, "p1_fig6_phase_transition", figures_dir)
pd.DataFrame([{"curve": label, "phase": f"{p.start:.0f}–{p.end:.0f} (change {p.change:+.3g})" if p else reason}
              for (_, _, label, _), (p, reason) in zip(panels, phases)])

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
# # Paper 2: zero-shot Philippine NER
#
# > Figures 1–7 and 9 and Tables 2, 4 and 5 of "Meta-pretraining for zero-shot cross-lingual NER in
# > low-resource Philippine languages", regenerated from the NER sweep's results.
#
# This notebook reads the NER sweep's JSON lines (`<ner_dir>/<grid>-results.jsonl`, one record
# per finetuning run: `picomaml.ner_finetune.result_record` plus the grid coordinates, the backbone's
# parameter count), the side files of saved predictions and, for Tables 4
# and 5, the UNER statistics the sweep writes beside its results: outputs only, through
# `picomaml.report`, never the model or the data code. It writes `figures/p2_fig{1..7,9}_*.{png,pdf}` and
# `paper_tables/p2_table{2,4,5}_*.{md,tex,csv}`. A result that is absent leaves a "missing: …" note in
# its panel or table cell; no number is ever filled in. The defaults read the CPU demo and write under
# `runs/reports/`; the paper-scale call passes `sizes=["tiny","small","medium","large"]` and
# `sweep_size="medium"` (with `seeds=[42, 1, 2]` for several seeds).

# %% tags=["parameters"]
figures_dir = "../runs/reports/figures"  # the pipeline passes ../figures when it regenerates the committed outputs
tables_dir = "../runs/reports/paper_tables"
sizes = ["demo"]  # paper: ["tiny", "small", "medium", "large"]
arms = ["maml", "vanilla"]
seeds = [42]  # pretraining seeds: 42 is the presets' own (runs without a suffix), k runs <name>-seed<k>
ner_dir = "../runs/ner"  # the sweep's <grid>-results.jsonl files
ner_results = []  # results files or glob patterns; empty: every *-results.jsonl in ner_dir
head = "crf"  # paper 2 finetunes a linear-chain CRF head
sweep_size = "demo"  # the checkpoint sweep (Figs. 4-7, 9, Table 5): "medium" in the paper
sweep_dataset = "sk_snk"
sweep_regime = "head"
smoke = False  # fewer bootstrap replicates for the intervals

# %%
import glob
import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from picomaml.names import ARMS, CEBUANO, DEFAULT_SEED, IN_LANGUAGE, OUTPUTS, PHILIPPINE, SOURCES, TAGALOG
from picomaml.names import ENTITY_TYPES as TAGS
from picomaml.report import (
    ARM_COLORS,
    MISSING,
    N_BOOT,
    NER_COLUMNS,
    bootstrap_ci,
    format_estimate,
    mean_replicates,
    missing_label,
    missing_note,
    ner_long,
    pooled_f1,
    read_ner_results,
    relative_change,
    save_figure,
    save_table,
    set_style,
    with_replicates,
)

# %% [markdown]
# Under `nbdev_test` (which sets `IN_TEST`) the notebook writes into a temporary directory, so the
# test suite never overwrites the committed demo figures and tables.

# %%
if os.environ.get("IN_TEST"):
    figures_dir = tables_dir = tempfile.mkdtemp(prefix="p2_ner_")
set_style()
seeds = list(seeds) or [DEFAULT_SEED]
n_boot = 200 if smoke else N_BOOT

# %% [markdown]
# ## One row per finetuning run
#
# `picomaml.report.ner_long` reads each record's grid coordinates (size, arm and seed from the
# record, else from the pretraining run's name; the checkpoint's step) and flattens its test F1 into
# one row per test set. `ner_runs` turns that back into one row per record, with the micro-F1 of
# each test set as an `f1:<test set>` column next to the record's own fields (dev F1, t90, AUC, slope,
# curves). Paper 2 scores in micro-F1 (§3: "Zero-shot Micro-F1 on Cebuano & Tagalog"), so a language
# with several test sets is scored on their pooled sentences (`picomaml.report.pooled_f1`: every span
# of every sentence counted together): Tagalog pools tl_trg and tl_ugnayan, Cebuano is ceb_gja, and
# "zero-shot" pools the three Philippine sets. The unweighted mean of the sets' F1s, which let
# tl_ugnayan's two PER spans weigh as much as tl_trg's nineteen, is used only for records that lack
# per-sentence counts; a run that lacks one of the sets has no such score. Each of the three comes
# with its sentence-bootstrap replicates (`<score>_boot`: the same sentence draws for every record, so
# arms compare paired), None for records without per-sentence counts.

# %%
COORDS = [c for c in NER_COLUMNS if c != "test_set"]

SCORES = {"zero_shot": PHILIPPINE, "tagalog": TAGALOG, "cebuano": CEBUANO}

def ner_runs(results: pd.DataFrame, n_boot: int = N_BOOT) -> pd.DataFrame:
    ("One row per NER record: coordinates, `f1:<test set>`, zero-shot/Tagalog/Cebuano F1 and their `_boot` replicates, "
     "the record's fields.")
    if results.empty or "test_f1" not in results:
        return pd.DataFrame(columns=COORDS + [*SCORES, *(f"{k}_boot" for k in SCORES)])
    results = results.reset_index(drop=True)
    long = with_replicates(ner_long(results), n_boot)
    long["record"] = np.repeat(results.index, [len(t) if isinstance(t, dict) else 0 for t in results.test_f1])
    f1 = long.pivot(index="record", columns="test_set", values="f1").add_prefix("f1:")
    runs = long.groupby("record")[COORDS].first().join(f1)
    counts = (results.sentence_counts if "sentence_counts" in results
              else pd.Series([None] * len(results), index=results.index))
    for score, sets in SCORES.items():
        mean = (runs[[f"f1:{s}" for s in sets]].mean(axis=1, skipna=False) if all(f"f1:{s}" in runs for s in sets)
                else np.nan)
        pooled = {r: pooled_f1(counts[r], sets, n_boot=n_boot) for r in runs.index}  # r: the record
        runs[score] = pd.Series({r: f1 if np.isfinite(f1) else np.nan for r, (f1, _) in pooled.items()}).fillna(mean)
        runs[f"{score}_boot"] = pd.Series({r: reps for r, (_, reps) in pooled.items()}, dtype=object)
    return runs.join(results.drop(columns=[c for c in results if c in runs or c in ("test_f1", "test_strict_f1")]))


# %% [markdown]
# Two hand-written records: the first has all three Philippine sets, the second lacks tl_ugnayan.

# %%
_records = pd.DataFrame([
    {"pretraining_run": "pico-tiny-maml", "checkpoint": "step_000060", "head": "crf", "regime": "head",
     "dataset": "sk_snk", "test_f1": {"sk_snk": 0.5, "tl_trg": 0.2, "tl_ugnayan": 0.4, "ceb_gja": 0.3}, "t90": 10,
     "dev_f1": 0.45},
    {"pretraining_run": "pico-tiny-vanilla-seed1", "checkpoint": "step_000060", "head": "crf", "regime": "full",
     "dataset": "all", "test_f1": {"tl_trg": 0.1, "ceb_gja": 0.2}, "t90": 12, "dev_f1": 0.4}])
_runs = ner_runs(_records)
assert np.isclose(_runs.zero_shot[0], 0.3) and np.isclose(_runs.tagalog[0], 0.3) and _runs.cebuano[0] == 0.3
assert np.isnan(_runs.zero_shot[1]) and np.isnan(_runs.tagalog[1]) and _runs.cebuano[1] == 0.2
assert _runs[["arm", "seed", "checkpoint_step", "t90"]].values.tolist() == [["maml", 42, 60.0, 10],
                                                                            ["vanilla", 1, 60.0, 12]]
assert ner_runs(pd.DataFrame()).empty and _runs.zero_shot_boot.isna().all()  # no per-sentence counts in these records
_counts = {"n": 2, "sentences": [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]}  # sentence 0: one correct PER; sentence 1: no spans
_with = ner_runs(_records.assign(sentence_counts=[{t: _counts for t in PHILIPPINE}, None]), n_boot=50)
assert _with.zero_shot_boot[0].shape == (50,) and _with.zero_shot_boot[1] is None
# pooled: one correct PER in each set
assert _with.zero_shot[0] == 1.0 and set(np.unique(_with.zero_shot_boot[0])) <= {0.0, 1.0}
_uneven = {"tl_trg": {"n": 3, "sentences": [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                                            [2, 0, 1, 2, 0, 0, 0, 0, 0, 0]]},
           "tl_ugnayan": {"n": 1, "sentences": [[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]]}, "ceb_gja": _counts}
_pooled = ner_runs(_records.iloc[:1].assign(sentence_counts=[_uneven]), n_boot=20)
# not the mean of the sets' 0.2 and 0.4
assert np.isclose(_pooled.tagalog[0], 2 * 2 / (3 + 5)) and not np.isclose(_pooled.tagalog[0], 0.3)

# %% [markdown]
# ## The final checkpoint, matched arms
#
# Figures 1–3 and Table 2 compare the two arms at the end of pretraining. `final_runs` keeps, per
# pretraining run, the records of its last checkpoint (a record without a step, e.g. a Hub model,
# counts as final) with the chosen head; a configuration finetuned twice keeps its last record.
# `matched` keeps only the (size, seed, regime, dataset) cells that both arms have, so an arm is never
# averaged over runs the other lacks.

# %%
CELL = ["size", "seed", "regime", "dataset"]

def final_runs(runs: pd.DataFrame, head: str) -> pd.DataFrame:
    "Records of each pretraining run's last checkpoint with head `head` (one per configuration)."
    runs = runs[runs["head"] == head]
    step = runs.checkpoint_step.fillna(np.inf)
    last = step == step.groupby(runs.pretraining_run).transform("max")
    return runs[last].drop_duplicates(["pretraining_run", "regime", "dataset"], keep="last")

def matched(runs: pd.DataFrame, value: str) -> pd.DataFrame:
    "Rows whose (size, seed, regime, dataset) cell has a finite `value` in both arms."
    ok = runs[np.isfinite(runs[value].astype(float))]
    both = ok.groupby(CELL).arm.transform("nunique") == 2
    return ok[both & ok.arm.isin(["maml", "vanilla"])]


# %%
_grid = ner_runs(pd.DataFrame([
    {"pretraining_run": f"pico-tiny-{a}", "checkpoint": f"step_{s:06d}", "head": "crf", "regime": "head", "dataset": d,
     "test_f1": {t: f for t in PHILIPPINE}}
    for a, s, d, f in [("maml", 30, "sk_snk", 0.9), ("maml", 60, "sk_snk", 0.3), ("vanilla", 60, "sk_snk", 0.2),
                       ("maml", 60, "en_ewt", 0.5)]]))
_final = final_runs(_grid, "crf")
assert sorted(_final.zero_shot.round(6).tolist()) == [0.2, 0.3, 0.5]
assert matched(_final, "zero_shot").dataset.tolist() == ["sk_snk", "sk_snk"] and final_runs(_grid, "linear").empty


# %% [markdown]
# ## Arm means over seeds, with intervals
#
# A bar is the mean over seeds of the per-seed mean score (over the matched finetuning runs), its
# error bar the 95 % interval of `picomaml.report.bootstrap_ci` over the test sentences and the
# seeds. The relative gain is paper 2's $100\,(F1_{\text{MAML}} - F1_{\text{vanilla}})/F1_{\text{vanilla}}$,
# per seed, averaged over seeds; its interval pairs the arms by seed and by sentence draw.

# %%
def per_seed(runs: pd.DataFrame, value: str, by=("size",)) -> pd.DataFrame:
    "Per `by`, arm and seed: the mean of `value` over the runs and of its `<value>_boot` replicates (None without)."
    rows = [dict(zip([*by, "arm", "seed"], key), point=g[value].mean(),
                 boot=mean_replicates(g.get(f"{value}_boot", [None])))
            for key, g in runs.groupby([*by, "arm", "seed"])]
    return pd.DataFrame(rows, columns=[*by, "arm", "seed", "point", "boot"])

def arm_means(runs: pd.DataFrame, value: str, by=("size",)) -> pd.DataFrame:
    ("Per `by` and arm: mean over seeds, 95 % interval low/high (over seeds and sentences), seed count, "
     "and whether it is an interval.")
    rows = [dict(zip([*by, "arm"], key), **dict(zip(("mean", "low", "high"), bootstrap_ci(g.point, g.boot))),
                 seeds=len(g), interval=len(g) > 1 or g.boot.notna().any())
            for key, g in per_seed(runs, value, by).groupby([*by, "arm"])]
    return pd.DataFrame(rows, columns=[*by, "arm", "mean", "low", "high", "seeds", "interval"])

def arm_gains(runs: pd.DataFrame, value: str, by=("size",)) -> pd.DataFrame:
    "Per `by`: MAML's relative gain over vanilla (%) averaged over seeds, and its paired 95 % interval."
    wide = per_seed(runs, value, by).pivot(index=[*by, "seed"], columns="arm")
    rows = []
    for key, g in (wide.groupby(level=list(by))
                   if len(wide) and {"maml", "vanilla"} <= set(wide.columns.get_level_values(1)) else []):
        gains = relative_change(g[("point", "maml")], g[("point", "vanilla")])
        boots = [relative_change(m, v) if m is not None and v is not None else None
                 for m, v in zip(g[("boot", "maml")], g[("boot", "vanilla")])]
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,)),
                         **dict(zip(("gain", "low", "high"), bootstrap_ci(gains, boots)))))
    return pd.DataFrame(rows, columns=[*by, "gain", "low", "high"])


# %%
_toy = pd.DataFrame({"size": "tiny", "arm": ["maml"] * 4 + ["vanilla"] * 2, "seed": [0, 0, 1, 1, 0, 1],
                     "f": [0.2, 0.4, 0.5, 0.5, 0.1, 0.3]})
_means = arm_means(_toy, "f").set_index("arm")
assert (np.isclose(_means.loc["maml", "mean"], 0.4) and _means.loc["maml", "seeds"] == 2
        and _means.loc["maml", "low"] >= 0.3)
assert np.isclose(_means.loc["vanilla", "mean"], 0.2) and _means.interval.all()
# seed 0: 0.3 vs 0.1, seed 1: 0.5 vs 0.3
assert np.isclose(arm_gains(_toy, "f").gain.item(), (200 + 200 / 3) / 2)
# gain replicates 200 %, 100 %
_one = _toy[_toy.seed == 0].assign(f_boot=[np.array([0.2, 0.3]), np.array([0.4, 0.5]), np.array([0.1, 0.2])])
_g = arm_gains(_one, "f")
assert (np.isclose(_g.gain.item(), 200) and np.allclose(_g[["low", "high"]].values, [[102.5, 197.5]])
        and not arm_means(_toy[_toy.seed == 0], "f").interval.any())

# %% [markdown]
# ## The results

# %%
paths = ([Path(f) for pattern in ner_results for f in sorted(glob.glob(pattern))]
         or sorted(Path(ner_dir).glob("*-results.jsonl")))
runs = ner_runs(read_ner_results(paths))
runs = runs[runs["size"].isin(sizes) & runs.arm.isin(arms) & runs.seed.isin(seeds)]
final = final_runs(runs, head)
# each record's backbone parameter count
params = runs.groupby("size")["params"].median().to_dict() if "params" in runs else {}
print(f"{len(runs)} finetuning record(s) from {', '.join(p.name for p in paths) or 'no results file'}; "
      f"{len(final)} at a final checkpoint with the {head} head")


# %% [markdown]
# ## Figure 1: scale curve
#
# Zero-shot micro-F1 on Cebuano and Tagalog per model size, MAML against vanilla, averaged over
# every finetuning source and both regimes; the line is MAML's relative gain (right axis).
# **Paper 2**: MAML helps at every scale; "the relative lift shrinks from +38 % (11 M) to +6 %
# (570 M)" (caption), the abstract's "2–6 pp under head-only tuning and 1–3 pp after full tuning".

# %%
def size_label(size: str, params: dict) -> str:
    ("A size with its backbone's parameter count from the records' `params`, e.g. 'tiny\\n11.3M' "
     "(the bare size without one).")
    return f"{size}\n{params[size] / 1e6:.1f}M" if np.isfinite(params.get(size, np.nan)) else size

def errors(rows: pd.DataFrame, value: str = "mean"):
    "The (2, n) error-bar lengths below and above `value` of rows with low/high, or None if no row has an interval."
    return (np.vstack([rows[value] - rows.low, rows.high - rows[value]])
            if rows.get("interval", pd.Series([True])).any() else None)

def arm_bars(ax, means: pd.DataFrame, sizes, what: str, params: dict, gains: pd.DataFrame | None = None) -> list[str]:
    ("Bars of MAML and vanilla per size (95 % intervals), and the relative gain (with its interval) on a twin axis; "
     "returns missing sizes.")
    table = means.set_index(["size", "arm"])
    present = [s for s in sizes if all((s, a) in table.index for a in ("maml", "vanilla"))]
    missing = [s for s in sizes if s not in present]
    if not present:
        missing_note(ax, f"{what} for sizes {', '.join(sizes)}")
        return missing
    x = np.arange(len(present))
    for offset, arm in ((-0.2, "maml"), (0.2, "vanilla")):
        rows = table.loc[[(s, arm) for s in present]]
        ax.bar(x + offset, rows["mean"], 0.4, yerr=errors(rows), color=ARM_COLORS[arm], label=arm, capsize=3)
    ax.set_xticks(x, [size_label(s, params) for s in present])
    if gains is not None:
        g = gains.set_index("size").reindex(present)
        twin = ax.twinx()
        twin.errorbar(x, g.gain, yerr=errors(g.assign(interval=np.isfinite(g.low)), "gain"), fmt="k-o", capsize=2,
                      label="relative gain")
        twin.axhline(0, color="0.6", lw=0.8)
        twin.set_ylabel("MAML relative gain (%)")
        twin.grid(False)
    if missing: ax.annotate(missing_label(missing), (0, -0.25), xycoords="axes fraction", fontsize=7, color="0.35")
    return missing


# %%
_fig, _ax = plt.subplots()
_two = pd.DataFrame({"size": "tiny", "arm": ["maml", "vanilla"], "seed": 0, "f": [0.3, 0.2]})
assert (arm_bars(_ax, arm_means(_two, "f"), ["tiny", "large"], "F1", {"tiny": 11.3e6}, arm_gains(_two, "f"))
        == ["large"] and len(_ax.patches) == 2)
assert _ax.get_xticklabels()[0].get_text() == "tiny\n11.3M" and size_label("large", {}) == "large"
# one seed, no counts: no bars
assert np.isclose(_fig.axes[1].lines[0].get_ydata()[0], 50.0) and not _ax.containers[0].errorbar
plt.close("all")

INTERVALS = "error bars: 95 % bootstrap over test sentences (paired between arms) and pretraining seeds"

# %%
scale = matched(final, "zero_shot")
fig, ax = plt.subplots(figsize=(5.5, 3.4))
arm_bars(ax, arm_means(scale, "zero_shot"), sizes, f"zero-shot F1 ({head} head, both arms)", params,
         arm_gains(scale, "zero_shot"))
ax.set(ylabel="zero-shot micro-F1 (ceb, tl)", title=f"Scale curve\n{INTERVALS}")
ax.title.set_fontsize(8)
ax.legend(loc="upper left")
save_figure(fig, "p2_fig1_scale_curve", figures_dir)
arm_means(scale, "zero_shot")

# %% [markdown]
# ## Figure 2: finetuning regime
#
# The same comparison split by regime: head-only (backbone frozen) left, full finetuning right, each
# with its paired relative gain.
# **Paper 2**: "MAML yields 1–2 pp gains when only the CRF head is trained … Full tuning narrows the
# gap to 0.5–1.3 pp"; head-only "magnifies the meta-learning advantage up to +2.5 pp at 570 M"; tiny
# shows "no gain under head-only tuning".

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
regime_means, regime_gains = (arm_means(scale, "zero_shot", by=("regime", "size")),
                              arm_gains(scale, "zero_shot", by=("regime", "size")))
for ax, regime in zip(axes, ("head", "full")):
    arm_bars(ax, regime_means[regime_means.regime == regime], sizes, f"{regime} finetuning results", params,
             regime_gains[regime_gains.regime == regime])
    ax.set(title=f"{regime}-only" if regime == "head" else "full finetuning", ylabel="zero-shot micro-F1 (ceb, tl)")
axes[0].legend(loc="upper left")
fig.suptitle(INTERVALS, fontsize=8)
save_figure(fig, "p2_fig2_regime", figures_dir)
regime_means


# %% [markdown]
# ## Figure 3: zero-shot F1 by finetuning language
#
# One panel per finetuning source (the nine in-language sets and `all`): zero-shot F1 against model
# size for both arms (both regimes averaged). **Paper 2**: "Eight of nine languages exhibit positive
# deltas; the largest relative lifts occur for Slovak (+18 %) and Croatian (+13 %)", and "the sole
# regression (–2 pp on Simplified Chinese)".

# %%
def source_panel(ax, means: pd.DataFrame, sizes, source: str) -> None:
    "Zero-shot F1 against size, one line per arm, for one finetuning source; a panel without results keeps its axes."
    if means.empty: missing_note(ax, f"{source} results")
    for arm, g in means.groupby("arm"):
        g = g.set_index("size").reindex(sizes)
        ax.errorbar(range(len(g)), g["mean"],
                    yerr=errors(g.dropna(subset=["mean"])) if g["mean"].notna().any() else None,
                    color=ARM_COLORS[arm], marker="o", label=arm, capsize=2)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_title(source)


# %% [markdown]
# The scale, label and legend belong to the figure, not to its first panel: every panel shares one
# y range (zero-shot micro-F1, 0 to 1 when nothing is drawn), the left column carries the label, and
# the legend names both arms whichever panels have results.

# %%
by_source = arm_means(scale, "zero_shot", by=("dataset", "size"))
fig, axes = plt.subplots(2, 5, figsize=(12, 5), sharey=True)
for ax, source in zip(axes.flat, SOURCES):
    source_panel(ax, by_source[by_source.dataset == source], sizes, source)
if by_source.empty: axes[0, 0].set_ylim(0, 1)
for ax in axes[:, 0]: ax.set_ylabel("zero-shot micro-F1")
fig.legend(handles=[plt.Line2D([], [], color=ARM_COLORS[a], marker="o", label=a) for a in ARMS], loc="upper right")
fig.suptitle(f"Zero-shot F1 by finetuning language ({INTERVALS})")
save_figure(fig, "p2_fig3_zero_shot_by_language", figures_dir)
by_source.pivot_table(index=["dataset", "size"], columns="arm", values="mean")


# %% [markdown]
# ## The checkpoint sweep (Figures 4–7)
#
# Paper 2 §4 finetunes the CRF head (head-only) on Slovak from each of the 61 checkpoints of the
# medium MAML run. `sweep_runs` selects those records (parameters `sweep_size`, `sweep_dataset`,
# `sweep_regime`), one per checkpoint, in step order. The per-step training loss is the record's
# `loss_curve`, the step-wise dev F1 its `dev_f1_steps` ([step, F1] pairs); `as_curve` reads either.

# %%
def sweep_runs(runs: pd.DataFrame, size: str, dataset: str, regime: str, head: str, arm: str = "maml") -> pd.DataFrame:
    "The checkpoint sweep's records, one per checkpoint step, sorted by step."
    sel = runs[(runs["size"] == size) & (runs.dataset == dataset) & (runs.regime == regime) & (runs["head"] == head)
               & (runs.arm == arm)]
    return (sel.dropna(subset=["checkpoint_step"]).drop_duplicates(["seed", "checkpoint_step"], keep="last")
            .sort_values(["checkpoint_step", "seed"]))

def as_curve(value):
    "(steps, values) of a record's curve: a list of values (steps 1, 2, …) or of [step, value] pairs; None if absent."
    if not isinstance(value, (list, tuple, np.ndarray)) or not len(value): return None
    points = np.asarray(value, float)
    return (points[:, 0], points[:, 1]) if points.ndim == 2 else (np.arange(1, len(points) + 1.0), points)

def curve_band(curves) -> pd.DataFrame:
    "Per step: median, 25th and 75th percentile over the (steps, values) curves that have that step."
    table = pd.DataFrame({i: pd.Series(y, index=x) for i, (x, y) in enumerate(curves)}).sort_index()  # (steps, runs)
    q = np.nanpercentile(table.to_numpy(float), [50, 25, 75], axis=1) if len(table) else np.empty((3, 0))
    return pd.DataFrame({"step": table.index.to_numpy(float), "median": q[0], "q25": q[1], "q75": q[2]})


# %%
_band = curve_band([as_curve([4.0, 2.0, 1.0]), as_curve([3.0, 1.0]), as_curve([5.0, 3.0, 2.0])])
assert (_band["median"].tolist() == [4.0, 2.0, 1.5] and _band.q25[0] == 3.5 and _band.q75[0] == 4.5
        and curve_band([]).empty)
_steps = curve_band([as_curve([[100, 0.1], [200, 0.3]]), as_curve([[100, 0.2], [150, 0.2], [200, 0.4]])])
assert (_steps.step.tolist() == [100, 150, 200] and np.allclose(_steps["median"], [0.15, 0.2, 0.35])
        and as_curve(None) is None)

# %%
sweep = sweep_runs(runs, sweep_size, sweep_dataset, sweep_regime, head)
sweep_what = f"{sweep_size} MAML checkpoints, {sweep_regime}-only {head} on {sweep_dataset}"
print(f"checkpoint sweep: {len(sweep)} record(s) ({sweep_what}), steps {sweep.checkpoint_step.astype(int).tolist()}")


# %% [markdown]
# ### Figure 4: learning-curve fan
#
# Every sweep run's training loss per finetuning step (top) and dev micro-F1 along the finetuning
# steps (bottom: the record's `dev_f1_steps`, scored every `ner.dev_every` steps and at each epoch's
# end), coloured by checkpoint (viridis, darker = later), with the median and inter-quartile band.
# **Paper 2**: "The train-loss fan collapses to its asymptote within the first ≈ 800 steps …
# the evaluation F1 rises smoothly to 0.14 and plateaus with a narrow ± 0.01 IQR."

# %%
def fan(ax, curves, steps, xlabel: str, ylabel: str, what: str) -> None:
    "Individual (steps, values) curves coloured by checkpoint step, their median and IQR band."
    curves = [c for c in curves if c is not None]
    if not curves:
        missing_note(ax, what)
        return
    colors = plt.get_cmap("viridis_r")(np.linspace(0.1, 1, len(curves)))
    for (x, y), color in zip(curves, colors):
        ax.plot(x, y, color=color, lw=0.6, alpha=0.5, marker="." if len(x) < 3 else None)
    band = curve_band(curves)
    ax.fill_between(band.step, band.q25, band.q75, color="0.2", alpha=0.2, label="IQR")
    ax.plot(band.step, band["median"], color="black", lw=2, label="median")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(loc="upper right", title=f"{len(curves)} checkpoints ({int(min(steps))}–{int(max(steps))})")


# %%
fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.5))
curves = lambda key: [as_curve(c) for c in sweep.get(key, pd.Series(dtype=object))]
fan(top, curves("loss_curve"), sweep.checkpoint_step, "finetuning step", "train loss", f"loss curves of {sweep_what}")
fan(bottom, curves("dev_f1_steps"), sweep.checkpoint_step, "finetuning step", f"{sweep_dataset} dev micro-F1",
    f"step-wise dev F1 of {sweep_what}")
fig.suptitle(f"Learning curves ({sweep_size}, {sweep_regime}-only, {sweep_dataset})")
save_figure(fig, "p2_fig4_learning_curve_fan", figures_dir)


# %% [markdown]
# ### Figure 5: final metrics against the checkpoint
#
# Top: the final training loss of each sweep run, the mean loss of its last epoch (a single step's
# loss is one mini-batch's); bottom: dev micro-F1 on the finetuning language and zero-shot F1 on
# Tagalog and Cebuano (pooled micro-F1), against the pretraining step.
# **Paper 2**: every run "converges to the same narrow band of train loss (0.10–0.15)"; Slovak dev F1
# "plateaus early (by around step 1k)" while Tagalog and Cebuano keep climbing, "ending 0.15 and
# 0.12 points higher than at the initial checkpoint".

# %%
def final_loss(curve, epochs) -> float:
    "The mean training loss of a curve's last epoch (its steps split evenly over `epochs`); NaN without a curve."
    if not isinstance(curve, (list, tuple, np.ndarray)) or not len(curve): return np.nan
    per_epoch = max(1, len(curve) // int(epochs)) if isinstance(epochs, (int, float)) and epochs >= 1 else len(curve)
    return float(np.mean(curve[-per_epoch:]))

def checkpoint_lines(ax, sweep: pd.DataFrame, columns: dict, ylabel: str, what: str) -> None:
    "One line per `columns` entry (column -> label) against the checkpoint step; a note for absent columns."
    drawn = [c for c in columns if c in sweep and sweep[c].notna().any()]
    if sweep.empty or not drawn:
        missing_note(ax, what)
        return
    colors = dict(zip(columns, sns.color_palette("viridis", len(columns))))
    for c in drawn:
        g = sweep.groupby("checkpoint_step")[c].mean()
        ax.plot(g.index, g.values, marker=".", color=colors[c], label=columns[c])
    ax.set(xlabel="pretraining checkpoint (step)", ylabel=ylabel)
    absent = [columns[c] for c in columns if c not in drawn]
    ax.legend(title=missing_label(absent) if absent else None)


# %%
assert final_loss([4.0, 3.0, 2.0, 1.0], 2) == 1.5 and final_loss([2.0], 1) == 2.0 and np.isnan(final_loss(None, 3))
_none = pd.Series([None] * len(sweep), index=sweep.index, dtype=object)
sweep = sweep.assign(final_train_loss=[final_loss(c, e)
                                       for c, e in zip(sweep.get("loss_curve", _none), sweep.get("epochs", _none))])
fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
checkpoint_lines(top, sweep, {"final_train_loss": "last epoch's mean train loss"}, "train loss",
                 f"loss curves of {sweep_what}")
checkpoint_lines(bottom, sweep, {"dev_f1": f"{sweep_dataset} dev", "tagalog": "Tagalog", "cebuano": "Cebuano"},
                 "micro-F1", sweep_what)
fig.suptitle("Final metrics vs. pretraining checkpoint")
save_figure(fig, "p2_fig5_checkpoint_metrics", figures_dir)
(sweep[["checkpoint_step", "final_train_loss", "dev_f1", "tagalog", "cebuano"]].reset_index(drop=True) if len(sweep)
 else "missing: sweep")


# %% [markdown]
# ### Figure 6: per-entity F1 against the checkpoint
#
# Per-tag F1 (PER, LOC, ORG) on Tagalog (tl_trg and tl_ugnayan pooled, as above; a record without
# per-sentence counts: the mean of the sets where the tag is defined) and Cebuano. **Paper 2**: "PER
# climbs to 0.6–0.7 while LOC and ORG remain at zero"; "Tagalog benefits earlier than Cebuano".

# %%
def tag_f1(sweep: pd.DataFrame, test_sets) -> pd.DataFrame:
    ("Per record of `sweep` and tag: F1 over the pooled sentences of `test_sets` "
     "(without counts: their mean where defined).")
    rows, none = [], pd.Series([None] * len(sweep), dtype=object, index=sweep.index)
    for per_tag, counts in zip(sweep.get("per_tag_f1", none), sweep.get("sentence_counts", none)):
        per_tag = per_tag if isinstance(per_tag, dict) else {}
        vals = {t: [per_tag[s].get(t, np.nan) for s in test_sets if s in per_tag] for t in TAGS}
        mean = {t: np.nanmean(v) if np.isfinite(v).any() else np.nan for t, v in vals.items()}
        pooled = {t: pooled_f1(counts, test_sets, tag=t, n_boot=1)[0] for t in TAGS}
        rows.append({t: pooled[t] if isinstance(counts, dict) and all(s in counts for s in test_sets) else mean[t]
                     for t in TAGS})
    return pd.DataFrame(rows, columns=list(TAGS), index=sweep.index)


# %%
_pt = pd.DataFrame({"per_tag_f1": [{"tl_trg": {"PER": 0.6, "LOC": 0.0, "ORG": np.nan},
                                    "tl_ugnayan": {"PER": 0.4, "LOC": np.nan, "ORG": np.nan}}]})
assert tag_f1(_pt, TAGALOG).iloc[0].fillna(-1).tolist() == [0.5, 0.0, -1] and np.isnan(tag_f1(_pt, CEBUANO).PER[0])
# pooled: 2 correct, 3 predicted, 5 gold
assert np.isclose(tag_f1(_pt.assign(sentence_counts=[_uneven]), TAGALOG).PER[0], 0.5)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
for ax, (language, sets) in zip(axes, (("Tagalog", TAGALOG), ("Cebuano", CEBUANO))):
    tags = tag_f1(sweep, sets).assign(checkpoint_step=sweep.checkpoint_step)
    checkpoint_lines(ax, tags, dict(zip(TAGS, TAGS)), "F1", f"per-tag F1 on {language} ({sweep_what})")
    ax.set_title(language)
fig.suptitle("Per-entity F1 across MAML checkpoints")
save_figure(fig, "p2_fig6_per_entity_f1", figures_dir)


# %% [markdown]
# ### Predictions and gold-tag probabilities (side files)
#
# Figures 7 and 9 need per-word outputs, not just scores. A record may name a side file
# in `predictions` (a path relative to its results file): JSON holding, per test set, the
# sentences' `words`, gold `tags`, predicted tags `pred` and the probability of the gold tag
# `gold_prob` (`picomaml.ner_finetune.gold_tag_probabilities`). `side_outputs` reads it, or returns None.

# %%
def side_outputs(record, results_dirs: dict) -> dict | None:
    "The per-test-set words/tags/pred/gold_prob of a record's side file, or None when it has none."
    name = record.get("predictions")
    if not isinstance(name, str) or not name: return None
    path = Path(name) if Path(name).is_absolute() else Path(results_dirs.get(record.get("source"), ".")) / name
    return json.loads(path.read_text()) if path.is_file() else None

def pooled(side: dict | None, test_sets) -> dict:
    "The words, tags, pred and gold_prob of several test sets of a side file, concatenated."
    out = {k: [] for k in ("words", "tags", "pred", "gold_prob")}
    for s in test_sets:
        for k in out: out[k] += (side or {}).get(s, {}).get(k, [])
    return out


# %%
with tempfile.TemporaryDirectory() as _tmp:
    Path(_tmp, "side.json").write_text(json.dumps({"tl_trg": {"words": [["si", "Juan"]], "tags": [["O", "B-PER"]],
                                                              "pred": [["O", "O"]], "gold_prob": [[0.9, 0.2]]}}))
    _side = side_outputs({"predictions": "side.json", "source": "x-results.jsonl"}, {"x-results.jsonl": _tmp})
    assert pooled(_side, TAGALOG)["gold_prob"] == [[0.9, 0.2]] and side_outputs({"predictions": None}, {}) is None

# %%
result_dirs = {p.name: p.parent for p in paths}
sweep_sides = [side_outputs(r, result_dirs) for r in sweep.to_dict("records")]


# %% [markdown]
# ### Figure 7: token confidence across checkpoints
#
# For the ten most frequent words of each Philippine test language, split into entities (gold tag
# not O) and non-entities, the mean probability the sweep's model gives the gold tag, per checkpoint
# (heatmap; brighter = more confident). Words are the paper's: punctuation-only tokens (".", ",",
# quotes), which would otherwise fill the non-entity rows, are left out. **Paper 2**: function words (*ng*, *ang*, *sa*) "start with
# high confidence and barely budge after the first 200 meta-updates"; names such as *Maria*, *Pasay*,
# *Cebu* "become steadily brighter … until about step 3000".

# %%
def confidence_grid(sides: list, steps, test_sets, entities: bool, top: int = 10) -> pd.DataFrame:
    "Rows: the `top` most frequent (entity / non-entity) words; columns: checkpoint steps; cells: mean p(gold tag)."
    # every checkpoint saw the same test words
    first = pooled(next((s for s in sides if s is not None), None), test_sets)
    is_word = lambda w: any(c.isalnum() for c in w)  # not punctuation only
    counts = Counter(w for words, tags in zip(first["words"], first["tags"]) for w, t in zip(words, tags)
                     if (t != "O") == entities and is_word(w))
    cells = defaultdict(list)
    for side, step in zip(sides, steps):
        data = pooled(side, test_sets)
        for words, tags, probs in zip(data["words"], data["tags"], data["gold_prob"]):
            for w, t, p in zip(words, tags, probs):
                if (t != "O") == entities: cells[(w, int(step))].append(p)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    cols = sorted({int(s) for side, s in zip(sides, steps) if side is not None})
    return pd.DataFrame([[np.mean(cells[(w, s)]) if cells[(w, s)] else np.nan for s in cols] for w in words],
                        index=words, columns=cols)


# %%
_sides = [{"tl_trg": {"words": [["ang", "Maria", "ang", ".", "."]], "tags": [["O", "B-PER", "O", "O", "O"]],
                      "gold_prob": [[0.8, 0.2, 0.6, 1, 1]]}},
          {"tl_trg": {"words": [["ang", "Maria", "ang", ".", "."]], "tags": [["O", "B-PER", "O", "O", "O"]],
                      "gold_prob": [[0.9, 0.5, 0.9, 1, 1]]}}]
_grid7 = confidence_grid(_sides, [0, 100], TAGALOG, entities=False)
assert _grid7.index.tolist() == ["ang"] and np.allclose(_grid7.loc["ang"].tolist(), [0.7, 0.9])
assert confidence_grid(_sides, [0, 100], TAGALOG, entities=True).loc["Maria", 100] == 0.5
assert confidence_grid([None], [0], TAGALOG, True).empty

# %%
fig, axes = plt.subplots(2, 2, figsize=(11, 7))
for ax, (language, sets, entities, letter) in zip(axes.flat, [("Tagalog", TAGALOG, True, "a"),
                                                              ("Tagalog", TAGALOG, False, "b"),
                                                              ("Cebuano", CEBUANO, True, "c"),
                                                              ("Cebuano", CEBUANO, False, "d")]):
    kind = "entities" if entities else "non-entities"
    grid = confidence_grid(sweep_sides, sweep.checkpoint_step, sets, entities) if len(sweep) else pd.DataFrame()
    if grid.empty: missing_note(ax, f"gold-tag probabilities on {language} ({sweep_what})")
    else: sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": "p(correct tag)"})
    ax.set_title(f"({letter}) {language}, {kind}")
    if not grid.empty: ax.set(xlabel="checkpoint step", ylabel="word")
save_figure(fig, "p2_fig7_token_confidence", figures_dir)

# %% [markdown]
# ## Figure 9: case studies
#
# Paper 2 App. B compares the vanilla and MAML models word by word on two tl_trg sentences through
# Δ surprisal = (−log p_MAML) − (−log p_vanilla) of the gold tag: negative = MAML more confident.
# We take both arms' runs of the sweep's configuration at their last checkpoint. **Paper 2**: on
# "Inahit ni John ang sarili niya." MAML "sharply reduces surprisal on 'John'" (prototype
# amplification); on "Malapit kay Maria si Juan." Δ is positive for "Malapit" and "kay" (a combined
# change of about 3.3 log-probability points: contextual suppression).

# %%
CASE_SENTENCES = ("Inahit ni John ang sarili niya .", "Malapit kay Maria si Juan .")

def sentence_probs(side: dict | None, sentence: str, test_set: str = "tl_trg") -> tuple[list, list] | None:
    "The words and gold-tag probabilities of `sentence` (space-joined words) in a side file, or None."
    data = pooled(side, [test_set])
    for words, probs in zip(data["words"], data["gold_prob"]):
        if " ".join(words) == sentence: return words, probs
    return None

def surprisal_delta(maml: tuple | None, vanilla: tuple | None) -> pd.DataFrame | None:
    "Per word: −log p_MAML + log p_vanilla of the gold tag (None unless both arms have the sentence)."
    if maml is None or vanilla is None: return None
    return pd.DataFrame({"word": maml[0], "delta": np.log(vanilla[1]) - np.log(maml[1])})


# %%
_d = surprisal_delta((["ni", "John"], [0.5, 0.8]), (["ni", "John"], [0.5, 0.2]))
assert _d.delta[0] == 0 and np.isclose(_d.delta[1], np.log(0.2 / 0.8)) and surprisal_delta(None, (["a"], [1.0])) is None


# %%
def last_record(arm: str):
    ("The sweep configuration's record of `arm` at its last checkpoint: the sweep's last step, "
     "else the final model (None if absent).")
    rows = sweep_runs(runs, sweep_size, sweep_dataset, sweep_regime, head, arm)
    if not len(rows):  # a final model without a step: the authors' released `main`
        saved = runs["predictions"].notna() if "predictions" in runs else False
        rows = runs[(runs["size"] == sweep_size) & (runs.dataset == sweep_dataset) & (runs.regime == sweep_regime)
                    & (runs["head"] == head) & (runs.arm == arm) & saved]
    return rows.iloc[-1].to_dict() if len(rows) else None

case_sides = {arm: side_outputs(r, result_dirs) if (r := last_record(arm)) else None for arm in ("maml", "vanilla")}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for ax, sentence, letter in zip(axes, CASE_SENTENCES, "ab"):
    delta = surprisal_delta(*(sentence_probs(case_sides[arm], sentence) for arm in ("maml", "vanilla")))
    if delta is None: missing_note(ax, f"gold-tag probabilities of both arms on tl_trg "
                                       f"({sweep_size}, {sweep_regime}-only, {sweep_dataset})")
    else:
        ax.bar(range(len(delta)), delta.delta,
               color=[ARM_COLORS["maml"] if d < 0 else ARM_COLORS["vanilla"] for d in delta.delta])
        ax.set_xticks(range(len(delta)), delta.word)
        ax.axhline(0, color="0.3", lw=0.8)
    ax.set(title=f"({letter}) {sentence}", ylabel="Δ surprisal (MAML − vanilla)")
save_figure(fig, "p2_fig9_case_studies", figures_dir)

# %% [markdown]
# ## Table 2: finetuning speed
#
# Δ (MAML − vanilla) of t90, normalised loss AUC and initial slope (`picomaml.crf_metrics.loss_curve_metrics`,
# paper 2 §3), per size and regime, averaged over the nine in-language finetuning tasks at the
# final checkpoint. The measures are read on each run's loss curve as `11_crf_metrics` states: t90 on
# the trailing mean over 5 % of the steps, between the means of the first and last 5 % (a smoothed
# reading of one mini-batch's losses, not the raw first and last batch). Each cell is the mean over
# the (task, seed) pairs with a 95 % bootstrap interval resampling the tasks (and seeds): these are
# loss-curve measures, not scores of test sentences. **Paper 2**:
# "full-model finetuning shows the clearest acceleration for the largest and smallest models: MAML
# cuts t90 by roughly 8 % (≈ 111 steps)" (Δt90 −111.1 for large and tiny, full); head-only medium
# and tiny "slow down" (+55.6); "slope remains near zero".

# %%
SPEED = ("t90", "auc", "slope")

def speed_deltas(final: pd.DataFrame) -> pd.DataFrame:
    "Per (size, regime, seed, in-language task both arms have): MAML − vanilla of t90, AUC and slope."
    rows = final[final.dataset.isin(IN_LANGUAGE)]
    rows = matched(rows, "t90") if len(rows) and all(k in rows for k in SPEED) else rows.iloc[:0]
    if rows.empty: return pd.DataFrame(columns=["size", "regime", "seed", "dataset", *SPEED])
    wide = rows.pivot_table(index=["size", "regime", "seed", "dataset"], columns="arm", values=list(SPEED),
                            aggfunc="mean")
    return pd.DataFrame({k: wide[(k, "maml")] - wide[(k, "vanilla")] for k in SPEED}).dropna().reset_index()

def speed_table(deltas: pd.DataFrame, sizes) -> pd.DataFrame:
    ("Table 2: one row per (size, regime) asked for, each Δ the mean over (task, seed) pairs "
     "with its bootstrap interval, or 'missing'.")
    digits = {"t90": 1, "auc": 3, "slope": 6}
    rows = []
    for size in sizes:
        for regime in ("full", "head"):
            g = deltas[(deltas["size"] == size) & (deltas.regime == regime)]
            rows.append({"size": size, "regime": regime, "tasks": str(g.dataset.nunique()) if len(g) else MISSING,
                         **{f"Δ{k}": format_estimate(g[k], digits[k]) for k in SPEED}})
    return pd.DataFrame(rows, columns=["size", "regime", "tasks", *(f"Δ{k}" for k in SPEED)])


# %%
_speed = ner_runs(pd.DataFrame([
    {"pretraining_run": f"pico-tiny-{a}", "checkpoint": "step_000060", "head": "crf", "regime": "full", "dataset": d,
     "test_f1": {"tl_trg": 0.1}, "t90": t, "auc": 1.0, "slope": -0.1}
    for a, d, t in [("maml", "sk_snk", 100), ("vanilla", "sk_snk", 150), ("maml", "en_ewt", 80),
                    ("vanilla", "en_ewt", 90), ("maml", "da_ddt", 1)]]))
_t2 = speed_table(speed_deltas(final_runs(_speed, "crf")), ["tiny", "large"]).set_index(["size", "regime"])
# no vanilla da_ddt
assert (_t2.loc[("tiny", "full"), "Δt90"].startswith("-30.0 [-50.0, -10.0]")
        and _t2.loc[("tiny", "full"), "tasks"] == "2")
assert _t2.loc[("tiny", "full"), "Δauc"] == "0.000 [0.000, 0.000]" and (_t2.loc[("large", "head")] == MISSING).all()
assert speed_deltas(final_runs(_speed[_speed.arm == "maml"], "crf")).empty  # in-language records of one arm only

# %%
table2 = speed_table(speed_deltas(final), sizes)
save_table(table2, "p2_table2_finetuning_speed", tables_dir,
           f"Finetuning convergence speed, Δ (MAML − vanilla) averaged over the in-language tasks ({head} head, final "
           f"checkpoint): t90 is read on the loss curve's trailing mean over 5 % of its steps, between the means of "
           f"its first and last 5 %; AUC is the mean loss; slope the fit over the first 10 % of steps. Brackets: 95 % "
           f"bootstrap interval resampling the (task, seed) pairs.")
table2


# %% [markdown]
# ## Tables 4 and 5: data statistics
#
# These two tables describe the data more than the models. The NER sweep writes the statistics of
# the whole UNER splits beside its results (`<results stem>-uner-statistics.json`,
# `picomaml.ner_data.uner_statistics`): span statistics of every finetuning set, and per zero-shot
# language (keyed by its test sets: `tl_trg+tl_ugnayan`, `ceb_gja`) the particle share of its PER
# spans and its OOV rates against every finetuning set. `read_statistics` merges the files of the
# results read here; without them the tables say what is missing.
#
# **Table 4** — spans per entity type in the finetuning set and the share that are a single word.
# **Paper 2** (sk_snk train): PER 2,277 (87.6 %), LOC 277 (75.1 %), ORG 153 (56.9 %).

# %%
def read_statistics(paths) -> dict:
    "The UNER statistics written beside the results files `paths` (`finetuning`, `zero_shot`), merged."
    merged = {"finetuning": {}, "zero_shot": {}}
    for p in paths:
        path = Path(p).parent / f"{Path(p).stem}-uner-statistics.json"
        if path.is_file():
            for key, value in json.loads(path.read_text()).items(): merged[key].update(value)
    return merged

def span_table(stats: dict | None, what: str) -> pd.DataFrame:
    "Table 4: spans and single-word share per entity type of one finetuning set's statistics (None: missing)."
    if stats is None: return pd.DataFrame({"entity": TAGS, "spans": f"{MISSING}: {what}", "single-token %": MISSING})
    spans = stats["spans"]
    return pd.DataFrame({"entity": TAGS, "spans": [f"{spans[t]['spans']:,}" for t in TAGS],
                         "single-token %": [f"{100 * spans[t]['single_token_share']:.1f}" if spans[t]["spans"]
                                            else MISSING for t in TAGS]})


# %%
_stats4 = {"sentences": 2, "spans": {"PER": {"spans": 2, "single_token_share": 0.5},
                                     "LOC": {"spans": 1, "single_token_share": 1.0},
                                     "ORG": {"spans": 0, "single_token_share": np.nan}}}
assert span_table(_stats4, "x").values.tolist() == [["PER", "2", "50.0"], ["LOC", "1", "100.0"], ["ORG", "0", MISSING]]
assert span_table(None, "sk_snk statistics").spans[0] == "missing: sk_snk statistics"
with tempfile.TemporaryDirectory() as _tmp:
    Path(_tmp, "a-results-uner-statistics.json").write_text(json.dumps({"finetuning": {"sk_snk": _stats4},
                                                                         "zero_shot": {}}))
    _read = read_statistics([Path(_tmp, "a-results.jsonl"), Path(_tmp, "b-results.jsonl")])  # b has no statistics file
    # NaN read back is another NaN object
    assert json.dumps(_read) == json.dumps({"finetuning": {"sk_snk": _stats4}, "zero_shot": {}})

# %%
statistics = read_statistics(paths)
statistics_what = f"UNER statistics of {sweep_dataset} (the NER sweep writes <results>-uner-statistics.json)"
table4 = span_table(statistics["finetuning"].get(sweep_dataset), statistics_what)
save_table(table4, "p2_table4_span_statistics", tables_dir,
           f"Span statistics of the {sweep_dataset} finetuning set (whole train split)")
table4

# %% [markdown]
# **Table 5** — per Philippine language: the share of gold PER spans whose left neighbour is a case
# particle (by default si and ni, the particles paper 2's text names; `ner.particles` and
# `picomaml.ner_data.particle_recall`) — the quantity paper 2 calls "particle recall" (≈ 11 % Tagalog,
# 5–6 % Cebuano in its text) —, the model's recall of those particle-preceded spans across the sweep's
# checkpoints (mean ± s.d.; the records' `particle_recall` counts, pooled over a language's test sets),
# and the OOV rate of test word tokens (and types) against the finetuning set: the share of test word
# occurrences whose exact surface form never occurs as a word of the finetuning set's train split.
# **Paper 2**: particle recall 0.113 ± 0.000 (Tagalog), 0.058 ± 0.000 (Cebuano); OOV 0.523 and 0.534.
# Its ± 0.000 across checkpoints says these are properties of the data, which is how we compute the
# first and last columns. Neither reproduces on UNER v1 (`10_ner_data`): the particle share is 0.71
# (Tagalog, 21 PER spans) and 0.88 (Cebuano) with si/ni, 0.90 with all six markers; the OOV token
# rate against sk_snk is 0.745 and 0.723. The paper defines neither quantity, so the caption says so.

# %%
LANGUAGES = (("Tagalog", TAGALOG), ("Cebuano", CEBUANO))

def mean_sd(values, digits: int = 3) -> str:
    "'mean ± s.d. (n=k)' of the finite values, or 'missing'."
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    return (f"{x.mean():.{digits}f} ± {x.std(ddof=1) if x.size > 1 else 0:.{digits}f} (n={x.size})" if x.size
            else MISSING)

def pooled_recall(record_particles, test_sets) -> float:
    "A record's recall of particle-preceded PER spans over `test_sets` pooled (NaN unless it scored them all)."
    counts = [record_particles.get(t) for t in test_sets] if isinstance(record_particles, dict) else [None]
    if any(c is None for c in counts) or not sum(c["after_particle"] for c in counts): return np.nan
    return sum(c["found_after_particle"] for c in counts) / sum(c["after_particle"] for c in counts)

def particle_table(zero_shot: dict, source: str, particles: list) -> pd.DataFrame:
    ("Table 5: per language, particle share of PER spans, model recall after particles (over records), "
     "OOV rates against `source`.")
    rows = []
    for language, sets in LANGUAGES:
        stats = zero_shot.get("+".join(sets))
        oov = stats["oov"].get(source) if stats else None
        rows.append({"language": language,
                     "particle share of PER spans": f"{stats['particles']['share']:.3f}" if stats
                                                    else f"{MISSING}: UNER statistics of {'+'.join(sets)}",
                     "model recall after particle": mean_sd([pooled_recall(p, sets) for p in particles]),
                     "OOV token rate": f"{oov['oov_token_rate']:.3f}" if oov else MISSING,
                     "OOV type rate": f"{oov['oov_type_rate']:.3f}" if oov else MISSING})
    return pd.DataFrame(rows)


# %%
_zs = {"tl_trg+tl_ugnayan": {"particles": {"share": 0.5},
                             "oov": {"sk_snk": {"oov_token_rate": 0.5, "oov_type_rate": 0.25}}}}
_counts = lambda found: {"tl_trg": {"after_particle": 1, "found_after_particle": found},
                         "tl_ugnayan": {"after_particle": 0, "found_after_particle": 0}}
_t5 = particle_table(_zs, "sk_snk", [_counts(1), _counts(0), None]).set_index("language")
assert _t5.loc["Tagalog"].tolist() == ["0.500", "0.500 ± 0.707 (n=2)", "0.500", "0.250"]
assert (_t5.loc["Cebuano", "particle share of PER spans"].startswith("missing")
        and _t5.loc["Cebuano", "OOV token rate"] == MISSING)
assert (particle_table(_zs, "en_ewt", []).loc[0, "OOV token rate"] == MISSING
        and np.isnan(pooled_recall({"tl_trg": _counts(1)["tl_trg"]}, TAGALOG)))

# %%
table5 = particle_table(statistics["zero_shot"], sweep_dataset,
                        sweep.get("particle_recall", pd.Series(dtype=object)).tolist())
_particles = next((z["particles"].get("particles") for z in statistics["zero_shot"].values()
                   if "particles" in z), None) or ["si", "ni"]
save_table(table5, "p2_table5_particles_oov", tables_dir,
           f"Particle-preceded PER spans (the share of gold PER spans right after {'/'.join(_particles)}) and the OOV "
           f"rate (the share of test word tokens, and of distinct words, never seen in the {sweep_dataset} train "
           f"split) on the zero-shot test sets; model recall over the checkpoint sweep. Paper 2 defines neither: its "
           f"0.113/0.058 and 0.523/0.534 are not reproduced by these definitions")
table5

# %% [markdown]
# ## Every output exists
#
# Whatever was missing, each generated output of paper 2 (`picomaml.names.OUTPUTS`) has its files.

# %%
P2_FIGURES = [OUTPUTS[f"p2_fig{i}"] for i in (1, 2, 3, 4, 5, 6, 7, 9)]
P2_TABLES = [OUTPUTS[f"p2_table{i}"] for i in (2, 4, 5)]

# %%
assert all((Path(figures_dir) / f"{n}.{e}").is_file() for n in P2_FIGURES for e in ("png", "pdf"))
assert all((Path(tables_dir) / f"{n}.{e}").is_file() for n in P2_TABLES for e in ("md", "tex", "csv"))

# %% [markdown]
# ## Reading the demo outputs
#
# The CPU demo (`sizes=["demo"]`) pretrains a few dozen steps of the tiny architecture and finetunes
# on a subset of the grid: its figures show that the pipeline produces every output, not the papers'
# effects, which need the paper-scale runs (four sizes, 6,000 steps, the full 160-run grid and the
# 61-checkpoint sweep). The comparisons to make at that scale are quoted above each figure.

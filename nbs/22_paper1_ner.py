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
# # Paper 1: Universal NER after meta-pretraining
#
# > Tables 3–9 and Figure 2 of "Learning dynamics of meta-pretraining", regenerated from the NER
# > sweep's result records.
#
# Paper 1 §5 finetunes every pretrained model (the step-6,000 checkpoint, a linear head) on each
# Universal NER training set and on `all`, head-only and full, and scores every test set
# (paper 1 App. B). This notebook reads the sweep's JSON lines (nbs/12_ner_sweep: one record per
# finetuning run, `picomaml.ner_finetune.result_record` plus grid coordinates) and writes
# `paper_tables/p1_table{3..9}_*.{md,tex,csv}` and `figures/p1_fig2_delta_f1_by_tag.{png,pdf}`.
# Absent runs give "missing" cells; a relative change whose vanilla F1 is 0 is "n/a" (the paper's
# "N/A"). Every F1 and ΔF1 carries a 95 % bootstrap interval over the test sentences and, with
# several pretraining seeds (`-seed<k>` runs), over the seeds (`picomaml.report.bootstrap_ci`): MAML
# and vanilla are paired by seed and by the sentence draw, and each table's caption says so.

# %% tags=["parameters"]
figures_dir = "../runs/reports/figures"  # the pipeline passes ../figures when it regenerates the committed outputs
tables_dir = "../runs/reports/paper_tables"
sizes = ["demo"]  # paper: ["tiny", "small", "medium", "large"]
arms = ["maml", "vanilla"]
seeds = [42]  # pretraining seeds: 42 is the presets' own (runs without a suffix), k runs <name>-seed<k>
ner_results = ["../runs/ner/*-results.jsonl"]  # files or glob patterns of NER sweep records
head = "linear"  # paper 1 uses a linear head (paper 2: crf)
smoke = False  # fewer bootstrap replicates for the intervals

# %%
import glob
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from picomaml.names import ENTITY_TYPES as TAGS
from picomaml.names import IN_LANGUAGE, NEAR_ZERO_BASE, OTHER, PUD
from picomaml.report import (
    MISSING,
    N_BOOT,
    RELATIVE_NOTE,
    SIZE_COLORS,
    bootstrap_ci,
    format_estimate,
    interval_note,
    mean_replicates,
    missing_label,
    missing_note,
    ner_long,
    read_ner_results,
    relative_estimate,
    save_figure,
    save_table,
    set_style,
    with_replicates,
)

# %% [markdown]
# Under `nbdev_test` (`IN_TEST`) outputs go to a temporary directory so the committed demo outputs
# are never overwritten by the test suite.

# %%
if os.environ.get("IN_TEST"):
    figures_dir = tables_dir = tempfile.mkdtemp(prefix="p1_ner_")
set_style()
n_boot = 200 if smoke else N_BOOT


# %% [markdown]
# ## The results
#
# Paper 1 uses the final pretraining checkpoint: for each pretraining run we keep the records of
# its highest checkpoint step (a checkpoint sweep for paper 2 may sit in the same files), with the
# chosen head, sizes and seeds.

# %%
def final_checkpoint(long: pd.DataFrame) -> pd.DataFrame:
    "The rows of each pretraining run's highest checkpoint step (all rows of a run whose steps are unknown)."
    last = long.groupby("pretraining_run").checkpoint_step.transform("max")
    return long[last.isna() | (long.checkpoint_step == last)].reset_index(drop=True)

_toy = pd.DataFrame({"pretraining_run": ["a", "a", "b"], "checkpoint_step": [100.0, 6000.0, np.nan]})
assert final_checkpoint(_toy).checkpoint_step.tolist()[0] == 6000.0 and len(final_checkpoint(_toy)) == 2

# %%
paths = sorted({p for pattern in ner_results for p in (glob.glob(pattern) or [pattern])})
records = read_ner_results(paths)
def select(long: pd.DataFrame) -> pd.DataFrame:
    "Paper 1's rows: the chosen head, sizes, arms and seeds at the final checkpoint."
    chosen = long[(long["head"] == head) & long["size"].isin(sizes) & long.arm.isin(arms) & long.seed.isin(seeds)]
    return final_checkpoint(chosen)
f1, tag_f1 = (with_replicates(select(ner_long(records, tags=t)), n_boot) for t in (False, True))
note = interval_note(n_boot, seeds)
print(f"{len(records)} records from {paths}; {len(f1)} (run, test set) rows for paper 1, "
      f"{f1.boot.notna().sum()} with per-sentence counts")


# %% [markdown]
# ## Cells
#
# `statistic` averages F1 over the rows of one size, arm, seed and regime that a table cell selects,
# and its sentence replicates the same way (`mean_replicates`); `relative_cell` is the relative
# change of MAML over vanilla in percent (the papers' "(%)"), per seed and per replicate — paired by
# seed and by sentence draw — then combined, with the two mean F1 it divides beside it and a
# "base ≈ 0" mark where the vanilla F1 is within noise of zero (`picomaml.report.relative_estimate`);
# `absolute_cell` a plain F1.

# %%
def statistic(rows: pd.DataFrame, size: str, arm: str, seed: int, regime: str) -> tuple[float, np.ndarray | None]:
    ("Mean F1 over the rows of one size, arm, seed and regime (NaN if none), "
     "and its sentence replicates (None without).")
    chosen = rows[(rows["size"] == size) & (rows.arm == arm) & (rows.seed == seed) & (rows.regime == regime)]
    return (chosen.f1.astype(float).mean(), mean_replicates(chosen.boot)) if len(chosen) else (np.nan, None)

def relative_cell(rows: pd.DataFrame, size: str, regime: str) -> str:
    ("The '(%)' cell of MAML over vanilla for one size and regime "
     "(`picomaml.report.relative_estimate`, paired by seed).")
    return relative_estimate([(statistic(rows, size, "maml", k, regime), statistic(rows, size, "vanilla", k, regime))
                              for k in seeds])

def absolute_cell(rows: pd.DataFrame, size: str, arm: str, regime: str) -> str:
    "F1 (3 decimals) of one size and arm over seeds with its interval, or 'missing'."
    values = [statistic(rows, size, arm, k, regime) for k in seeds]
    return format_estimate([v for v, _ in values], 3, [b for _, b in values])


# %%
_rows = pd.DataFrame({"size": "large", "seed": 42, "regime": "head", "arm": ["maml", "maml", "vanilla", "vanilla"],
                      "f1": [0.3, 0.5, 0.4, 0.4], "boot": [None] * 4})
assert (statistic(_rows, "large", "maml", 42, "head") == (0.4, None)
        and np.isnan(statistic(_rows, "large", "maml", 42, "full")[0]))
assert (relative_cell(_rows, "large", "head") == "+0.0 (F1 0.400 vs 0.400)"
        and relative_cell(_rows, "large", "full") == MISSING)
assert (relative_cell(_rows.assign(f1=[0.2, 0.2, 0.0, 0.0]), "large", "head")
        == f"n/a (F1 0.200 vs 0.000; {NEAR_ZERO_BASE})")
assert relative_cell(_rows.assign(f1=[0.3, 0.3, 0.4, 0.4]), "large", "head") == "-25.0 (F1 0.300 vs 0.400)"
assert absolute_cell(_rows, "large", "vanilla", "head") == "0.400"
_boots = _rows.assign(boot=[np.array([0.2, 0.4]), np.array([0.4, 0.6]), np.array([0.35, 0.45]), np.array([0.35, 0.45])])
assert np.allclose(statistic(_boots, "large", "maml", 42, "head")[1], [0.3, 0.5])  # replicate-wise means over the rows
assert relative_cell(_boots, "large", "head") == "+0.0 [-13.7, +10.5] (F1 0.400 vs 0.400)"
assert absolute_cell(_boots, "large", "maml", "head") == "0.400 [0.305, 0.495]"

# %%
# finetuned and tested on the same treebank
in_language = f1[(f1.dataset == f1.test_set) & f1.test_set.isin(IN_LANGUAGE)]
from_english = f1[(f1.dataset == "en_ewt") & f1.test_set.isin(OTHER)]  # zero-shot from English

def relative_table(rows: pd.DataFrame, columns: dict, regimes=("head", "full")) -> pd.DataFrame:
    "One row per size; a column per (name, row filter) and regime: relative change of MAML over vanilla."
    table = []
    for size in sizes:
        cells = {"model": f"{size} (%)"}
        for name, keep in columns.items():
            for regime in regimes:
                cells[f"{name} {regime}" if len(regimes) > 1 else name] = relative_cell(rows[keep(rows)], size, regime)
        table.append(cells)
    return pd.DataFrame(table)


# %% [markdown]
# ## Table 3: relative F1 change by evaluation group, regime and size
#
# Paper 1 Table 3: per size, the relative change of mean micro-F1 of MAML over vanilla, head-only
# and full, on three groups of test sets: seen (the nine in-language test sets), test-only PUD and
# test-only other (Cebuano, Tagalog). The mean runs over every finetuning dataset (the nine and
# `all`) and every test set of the group ("averaged across each finetuning dataset", §5). The paper
# reports, for large, +6.2/+4.8 (seen, head/full), +7.2/+3.5 (PUD), +2.1/+8.1 (other), and for tiny
# −8.3/−3.0, +6.7/0.0, −37.5/+3.8: a lift at medium/large under full tuning.

# %%
table3 = relative_table(f1, {"seen": lambda r: r.test_set.isin(IN_LANGUAGE), "PUD": lambda r: r.test_set.isin(PUD),
                             "other": lambda r: r.test_set.isin(OTHER)})
save_table(table3, "p1_table3_relative_f1_by_group", tables_dir,
           "Paper 1 Table 3: relative micro-F1 change (%) of MAML over vanilla by evaluation group and regime. Each "
           "cell: per pretraining seed and arm, the unweighted mean of micro-F1 over every (finetuning dataset, test "
           "set) pair in the group (finetuning on each of the nine treebanks and on all nine together; seen: their "
           "nine test sets, PUD: the six PUD sets, other: ceb_gja, tl_trg, tl_ugnayan) at the final checkpoint; then "
           f"100 (MAML − vanilla) / vanilla of those means, averaged over seeds. {note} {RELATIVE_NOTE}")
table3

# %% [markdown]
# ## Tables 4, 5, 8 and 9: relative F1 change per language
#
# In-language runs only (finetuned and tested on the same treebank). Tables 4 (head-only) and 5
# (full) show five languages, Tables 8 and 9 all nine treebanks. The paper shows Tables 4 and 8
# for the large model only; we give every size, so the large row is the comparable one. The paper's
# large head-only row (Table 8): da +8.1, en +14.8, hr +10.7, pt +8.6, sk +7.3, sr +7.8, sv +18.0,
# zh_gsd −32.4, zh_gsdsimp +2.6; its full-tuning large row (Table 9): +3.6, +4.4, −0.5, +4.2, +5.7,
# +1.3, +2.8, +3.4, +5.0.

# %%
FIVE_LANGUAGES = {"Danish": "da_ddt", "English": "en_ewt", "Croatian": "hr_set", "Portuguese": "pt_bosque",
                  "Swedish": "sv_talbanken"}
per_language = lambda names: {name: (lambda r, d=d: r.test_set == d) for name, d in names.items()}
for number, regime, names, what in [(4, "head", FIVE_LANGUAGES, "head-only"), (5, "full", FIVE_LANGUAGES, "full"),
                                    (8, "head", {d: d for d in IN_LANGUAGE}, "head-only"),
                                    (9, "full", {d: d for d in IN_LANGUAGE}, "full")]:
    table = relative_table(in_language, per_language(names), regimes=(regime,))
    save_table(table, f"p1_table{number}_relative_f1_{regime}_per_language", tables_dir,
               f"Paper 1 Table {number}: relative micro-F1 change (%) of MAML over vanilla, {what} tuning, per "
               f"language (finetuned and tested on that treebank, final checkpoint, averaged over seeds). {note} "
               f"{RELATIVE_NOTE}")
    display(table)

# %% [markdown]
# ## Table 6: zero-shot transfer from English to Cebuano and Tagalog
#
# Models finetuned on `en_ewt` and scored on ceb_gja, tl_trg and tl_ugnayan; "overall" is the mean
# F1 over the three. Relative change of MAML over vanilla per size and regime. The paper reports,
# head-only, small +151.1 % overall (0.088 → 0.221 F1), medium +24.3 %, large +9.0 %, tiny −100 %;
# under full tuning small +7.3 %, medium 0.0 %, large −8.0 %, tiny −6.2 %.

# %%
zero_shot = {"overall": lambda r: r.test_set.isin(OTHER), "Cebuano": lambda r: r.test_set == "ceb_gja",
             "Tagalog (TRG)": lambda r: r.test_set == "tl_trg",
             "Tagalog (Ugnayan)": lambda r: r.test_set == "tl_ugnayan"}
table6 = pd.DataFrame([{"model": size, "regime": regime,
                        **relative_table(from_english, zero_shot, (regime,)).set_index("model").loc[f"{size} (%)"]}
                       for regime in ("head", "full") for size in sizes])
save_table(table6, "p1_table6_zero_shot_ceb_tl", tables_dir,
           f"Paper 1 Table 6: relative change (%) of MAML over vanilla in zero-shot micro-F1 from English (finetuned "
           f"on en_ewt) on Cebuano and Tagalog; overall: the unweighted mean F1 of the three test sets. {note} "
           f"{RELATIVE_NOTE}")
table6

# %% [markdown]
# ## Table 7: head-only F1 per dataset, eight models
#
# Absolute in-language micro-F1 under head-only tuning, one row per arm and size. The paper's large
# rows (Table 7): vanilla 0.247 0.366 0.401 0.337 0.178 0.422 0.261 0.034 0.039, MAML 0.267 0.420
# 0.444 0.366 0.191 0.455 0.308 0.023 0.040 (da, en, hr, pt, sk, sr, sv, zh_gsd, zh_gsdsimp); the
# tiny models are near 0 everywhere.

# %%
table7 = pd.DataFrame([{"model": f"{arm}_{size}",
                        **{d: absolute_cell(in_language[in_language.test_set == d], size, arm, "head")
                           for d in IN_LANGUAGE}}
                       for size in sizes for arm in ("vanilla", "maml") if arm in arms])
save_table(table7, "p1_table7_head_only_f1", tables_dir,
           f"Paper 1 Table 7: in-language micro-F1 under head-only tuning. {note}")
table7


# %% [markdown]
# ## Figure 2: ΔF1 by entity class
#
# Paper 1 Fig. 2: $\Delta F1 = F1_{\text{MAML}} - F1_{\text{vanilla}}$ per entity class (PER, LOC,
# ORG), averaged over the nine in-language datasets, per size, for head-only and full tuning. The
# paper reports, head-only, large PER +0.034 and LOC +0.023, ORG +0.016 already at small/medium;
# full tuning, large PER +0.027, LOC +0.016, ORG +0.012. A bar is the mean over seeds of the per-seed
# ΔF1, its error bar the 95 % interval over seeds and test sentences, paired (`bootstrap_ci`).

# %%
def tag_deltas(tags: pd.DataFrame) -> pd.DataFrame:
    "Per size, regime, seed and tag: mean in-language F1 of MAML minus vanilla's, and its sentence replicates."
    rows = tags[(tags.dataset == tags.test_set) & tags.test_set.isin(IN_LANGUAGE) & tags.tag.isin(TAGS)]
    out = []
    for (size, regime, seed, tag), g in rows.groupby(["size", "regime", "seed", "tag"]):
        arms = [g[(g.arm == arm) & g.f1.notna()] for arm in ("maml", "vanilla")]
        if any(a.empty for a in arms): continue
        boots = [mean_replicates(a.boot) for a in arms]
        out.append({"size": size, "regime": regime, "seed": seed, "tag": tag,
                    "delta": arms[0].f1.mean() - arms[1].f1.mean(),
                    "boot": None if any(b is None for b in boots) else boots[0] - boots[1]})
    return pd.DataFrame(out, columns=["size", "regime", "seed", "tag", "delta", "boot"])

def delta_bars(ax, data: pd.DataFrame, sizes) -> list[str]:
    ("Bars of mean ΔF1 per tag (x) and size with their 95 % intervals over seeds and sentences; "
     "returns the sizes without bars.")
    present = [s for s in sizes if s in set(data["size"])]
    width = 0.8 / max(len(present), 1)
    for i, size in enumerate(present):
        cells = [data[(data["size"] == size) & (data.tag == tag)] for tag in TAGS]
        mean, low, high = np.array([bootstrap_ci(c.delta, c.boot) for c in cells]).T  # (tags,) each
        ax.bar(np.arange(len(TAGS)) - 0.4 + width * (i + 0.5), mean, width, yerr=[mean - low, high - mean],
               capsize=2, color=SIZE_COLORS[size], label=size)
    ax.set_xticks(range(len(TAGS)), TAGS)
    return [s for s in sizes if s not in present]

_tags = pd.DataFrame({"size": "large", "regime": "head", "seed": 0, "tag": "PER",
                      "dataset": ["en_ewt", "en_ewt", "da_ddt", "da_ddt", "en_ewt"],
                      "test_set": ["en_ewt", "en_ewt", "da_ddt", "da_ddt", "tl_trg"],
                      "arm": ["maml", "vanilla"] * 2 + ["maml"],
                      "f1": [0.5, 0.4, 0.3, 0.3, 0.9],
                      "boot": [np.array([0.5, 0.6]), np.array([0.4, 0.4]), np.array([0.3, 0.2]), np.array([0.3, 0.3]),
                               None]})
_d = tag_deltas(_tags)
assert (np.isclose(_d.delta.item(), 0.05) and np.allclose(_d.boot.item(), [0.05, 0.05])
        and tag_deltas(_tags[_tags.arm == "maml"]).empty)
_fig, _ax = plt.subplots()
assert delta_bars(_ax, _d, ["tiny", "large"]) == ["tiny"] and np.isclose(_ax.patches[0].get_height(), 0.05)
plt.close(_fig)

# %%
deltas = tag_deltas(tag_f1)
fig, axes = plt.subplots(1, 2, figsize=(8, 3), sharey=True)
for ax, regime in zip(axes, ("head", "full")):
    data = deltas[deltas.regime == regime]
    ax.set_title(f"{regime} tuning")
    if data.empty:
        missing_note(ax, f"{regime}-tuned in-language per-tag F1 of both arms ({', '.join(sizes)})")
        continue
    absent = delta_bars(ax, data, sizes)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_ylabel("ΔF1 (MAML − vanilla)")
    ax.legend(title="size", fontsize=7)
    if absent: ax.text(0.99, 0.02, missing_label(absent), ha="right", va="bottom", transform=ax.transAxes, fontsize=6,
                       color="0.35")
fig.suptitle("Bars: mean over seeds; error bars: 95 % bootstrap over seeds and test sentences, paired", fontsize=7)
save_figure(fig, "p1_fig2_delta_f1_by_tag", figures_dir)

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
# # Report helpers
#
# > Find runs, read their outputs, and write the papers' figures and tables deterministically,
# > marking what is missing instead of inventing it.
#
# The analysis notebooks (`21_`, `22_` for paper 1, `23_`, `24_` for paper 2) regenerate every output
# of `picomaml.names.OUTPUTS`. They share what is here: run discovery, tolerant readers for `metrics.jsonl`,
# `spectra.jsonl` and the NER sweep results, one seaborn style, writers that give byte-identical
# files on rerun, a "missing" marker for absent runs, and 95 % bootstrap intervals over test
# sentences and pretraining seeds for every F1 and ΔF1.
#
# One rule for the analysis layer: **21–24 export nothing**. They are documents that papermill
# re-executes on a profile's runs; a function one of them needs is defined, and tested, in it, and
# what two of them share lives here (`picomaml.report`) or, for names, in `picomaml.names`. Neither
# module imports the model, the data or the NER code: the analysis reads run outputs only.

# %%
#| default_exp report

# %%
#| export
from __future__ import annotations

import functools
import json
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from picomaml.config import PRESETS_DIR
from picomaml.names import (
    ARMS,
    DEFAULT_SEED,
    ENTITY_TYPES,
    NEAR_ZERO_BASE,
    NEAR_ZERO_F1,
    PAPER_SIZES,
    SIZES,
    SOURCES,
    SPECTRA_KEY,
    parse_run_name,
    step_of,
)
from picomaml.runlog import read_records

# %%
import tempfile

# %% [markdown]
# ## Run names
#
# Pretraining runs live in `<runs_dir>/<run name>/`, named by `picomaml.names.run_name`
# (`pico-<size>-<arm>`, `demo-<arm>`, `-seed<k>` for a pretraining seed other than the presets' 42),
# the same function the pipeline names them with and the NER grids find them by;
# `parse_run_name` reads a name back.

# %% [markdown]
# `find_runs` lists the run directories under `runs_dir` whose names parse, optionally restricted to
# some sizes, arms, seeds and families, with flags saying which outputs each one has. A missing
# `runs_dir` gives an empty table (a notebook then marks everything missing), not an error.

# %%
#| export
RUN_COLUMNS = ["name", "family", "size", "arm", "seed", "path", "has_metrics", "has_spectra"]

def find_runs(runs_dir, sizes=None, arms=None, seeds=None, families=("pico", "demo")) -> pd.DataFrame:
    "The pretraining runs under `runs_dir` (one row each, sorted by size, arm, seed)."
    root, rows = Path(runs_dir), []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        info = parse_run_name(path.name) if path.is_dir() else None
        if info is None or (families and info["family"] not in families): continue
        if ((sizes and info["size"] not in sizes) or (arms and info["arm"] not in arms)
                or (seeds and info["seed"] not in seeds)): continue
        rows.append({"name": path.name, **info, "path": path, "has_metrics": (path / "metrics.jsonl").is_file(),
                     "has_spectra": (path / "spectra.jsonl").is_file()})
    # typed even when empty
    runs = pd.DataFrame(rows, columns=RUN_COLUMNS).astype({"seed": int, "has_metrics": bool, "has_spectra": bool})
    order = {s: i for i, s in enumerate(SIZES)}
    return runs.sort_values(["size", "arm", "seed"], key=lambda c: c.map(order) if c.name == "size" else c,
                            ignore_index=True)


# %%
with tempfile.TemporaryDirectory() as tmp:
    for name in ["pico-large-maml", "pico-tiny-vanilla-seed1", "pico-tiny-vanilla", "demo-maml", "ner",
                 "released-tiny-maml"]:
        (Path(tmp) / name).mkdir()
    (Path(tmp) / "demo-maml" / "metrics.jsonl").write_text("")
    runs = find_runs(tmp)
    # seeds 1 < 42
    assert runs.name.tolist() == ["demo-maml", "pico-tiny-vanilla-seed1", "pico-tiny-vanilla", "pico-large-maml"]
    assert runs.has_metrics.tolist() == [True, False, False, False] and not runs.has_spectra.any()
    assert find_runs(tmp, sizes=["tiny"], seeds=[1]).name.tolist() == ["pico-tiny-vanilla-seed1"]
    assert find_runs(tmp, families=["released"]).name.tolist() == ["released-tiny-maml"]
_none = find_runs("/nonexistent")
assert _none.empty and list(_none.columns) == RUN_COLUMNS and list(_none[_none.has_metrics].columns) == RUN_COLUMNS


# %% [markdown]
# ## Readers
#
# A JSON-lines file written by a run that crashed can end in a torn line. The readers (`00_runlog`'s
# `read_records`) skip an unparsable line with a warning naming the file and line. A step's metrics can span two lines (the
# training record, then the evaluation written after that step's checkpoint), so `read_metrics`
# merges the lines of a step, a later value of a key winning. A missing file reads as an empty table.

# %%
#| export
def read_metrics(run_dir) -> pd.DataFrame:
    "A run's `metrics.jsonl` as a DataFrame, one row per optimizer step (its lines merged, later values winning)."
    merged = {}
    for record in read_records(Path(run_dir) / "metrics.jsonl"):
        if "step" in record: merged.setdefault(record["step"], {}).update(record)
    if not merged: return pd.DataFrame(columns=["step"])
    return pd.DataFrame([merged[step] for step in sorted(merged)])


# %%
with tempfile.TemporaryDirectory() as tmp:
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.5, "paloma_ppl": 40.0}]
    (Path(tmp) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = read_metrics(tmp)
    assert (m.step.tolist() == [1, 2] and m.loss.tolist() == [5.0, 3.5] and np.isnan(m.paloma_ppl[0])
            and m.paloma_ppl[1] == 40.0)
    (Path(tmp) / "metrics.jsonl").write_text('{"step": 5, "loss": 2.0}\n{"step": 5, "paloma_ppl": 30.0}\n')
    assert read_metrics(tmp)[["loss", "paloma_ppl"]].values.tolist() == [[2.0, 30.0]]  # training line + evaluation line
    assert any("metrics.jsonl:4" in str(w.message) for w in caught)
    assert read_metrics(Path(tmp) / "nothing").empty


# %% [markdown]
# `read_run_spectra` reads a run's `spectra.jsonl` (paper 1 §6: PER of weights and gradients per
# step, layer and matrix; one record per step, layer, matrix and kind, the last one winning), with an
# absent file read as empty; it reads JSON, so the analysis needs no torch. `read_ner_results` reads
# the NER sweep's JSON-lines files (nbs/12_ner_sweep; one record per finetuning run, fields of
# `picomaml.ner_finetune.result_record` plus the grid coordinates) into one table with a `source` column.

# %%
#| export
def read_run_spectra(run_dir) -> pd.DataFrame:
    "A run's `spectra.jsonl` as a DataFrame (step, layer, matrix, kind, per, ...); empty if absent."
    df = pd.DataFrame(read_records(Path(run_dir) / "spectra.jsonl"))
    if df.empty: return pd.DataFrame(columns=SPECTRA_KEY + ["per"])
    return df.drop_duplicates(SPECTRA_KEY, keep="last").sort_values(SPECTRA_KEY, ignore_index=True)

def read_ner_results(paths) -> pd.DataFrame:
    "The NER sweep records of one or more JSON-lines files, with the file name in `source`; empty if none."
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows = [{**r, "source": Path(p).name} for p in paths for r in read_records(p)]
    df = pd.DataFrame(rows)
    if "key" in df and (repeated := df.duplicated(["source", "key"])).any():  # two sweeps that once ran on one file
        warnings.warn(f"{', '.join(sorted(df.source[repeated].unique()))}: {repeated.sum()} rows repeat a job already "
                      f"recorded; the first of each is kept")
        df = df[~repeated].reset_index(drop=True)
    return df


# %%
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "a-results.jsonl").write_text(json.dumps({"dataset": "sk_snk", "test_f1": {"sk_snk": 0.8}}) + "\n")
    ner = read_ner_results([Path(tmp) / "a-results.jsonl", Path(tmp) / "absent.jsonl"])
    assert len(ner) == 1 and ner.source[0] == "a-results.jsonl" and ner.test_f1[0] == {"sk_snk": 0.8}
    assert read_ner_results(Path(tmp) / "absent.jsonl").empty and read_run_spectra(tmp).empty
    (Path(tmp) / "b-results.jsonl").write_text("".join(json.dumps({"key": k, "dev_f1": f}) + "\n"
                                                       for k, f in [("j1", 0.5), ("j1", 0.6)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_ner_results(Path(tmp) / "b-results.jsonl").dev_f1.tolist() == [0.5]
    assert "b-results.jsonl: 1 rows repeat a job already recorded" in str(caught[0].message)

# %% [markdown]
# `runs_metrics` and `runs_spectra` stack the outputs of the runs `find_runs` found into one long
# table, each row tagged with its run's name, size, arm and seed, ready for seaborn's `hue`/`style`.
# `smoothed` is the rolling mean of one metric per run over its logged (non-null) steps: `next_token_loss`
# exists only on next-token steps and the episode metrics only on MAML steps.

# %%
#| export
RUN_KEYS = ["name", "size", "arm", "seed"]

def _stack(runs: pd.DataFrame, read) -> pd.DataFrame:
    frames = [read(r.path).assign(**{k: getattr(r, k) for k in RUN_KEYS}) for r in runs.itertuples()]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RUN_KEYS + ["step"])

def runs_metrics(runs: pd.DataFrame) -> pd.DataFrame:
    "The metrics of every run in `runs` (a `find_runs` table) in one long DataFrame."
    return _stack(runs, read_metrics)

def runs_spectra(runs: pd.DataFrame) -> pd.DataFrame:
    "The spectra records of every run in `runs` in one long DataFrame."
    return _stack(runs, read_run_spectra)

def smoothed(metrics: pd.DataFrame, key: str, window: int = 1) -> pd.DataFrame:
    "`RUN_KEYS + [step, key]` rows where `key` was logged, `key` a per-run rolling mean over `window` logged steps."
    if key not in metrics: return pd.DataFrame(columns=RUN_KEYS + ["step", key])
    rows = metrics.dropna(subset=[key])[RUN_KEYS + ["step", key]].sort_values(["name", "step"], ignore_index=True)
    rows[key] = rows.groupby("name")[key].transform(lambda x: x.astype(float).rolling(window, min_periods=1).mean())
    return rows


# %%
with tempfile.TemporaryDirectory() as tmp:
    for name, losses in [("demo-maml", [None, 4.0, 2.0, None]), ("demo-vanilla", [5.0, 4.0, 3.0, 2.0])]:
        (Path(tmp) / name).mkdir()
        lines = (json.dumps({"step": i + 1, "next_token_loss": v}) + "\n" for i, v in enumerate(losses))
        (Path(tmp) / name / "metrics.jsonl").write_text("".join(lines))
    (Path(tmp) / "pico-tiny-maml").mkdir()  # a run that has not logged yet
    stacked = runs_metrics(find_runs(tmp))
    assert len(stacked) == 8 and set(stacked.name) == {"demo-maml", "demo-vanilla"} and set(stacked["size"]) == {"demo"}
    curve = smoothed(stacked, "next_token_loss", window=2)
    assert (curve[curve.name == "demo-maml"].next_token_loss.tolist() == [4.0, 3.0]
            and curve[curve.name == "demo-maml"].step.tolist() == [2, 3])
    assert curve[curve.name == "demo-vanilla"].next_token_loss.tolist() == [5.0, 4.5, 3.5, 2.5]
    assert smoothed(stacked, "paloma_ppl").empty and runs_spectra(find_runs(tmp)).empty
assert runs_metrics(find_runs("/nonexistent")).empty

# %% [markdown]
# The analysis wants one row per (finetuning run, test set) with the pretraining run's size, arm
# and seed as columns. `ner_long` flattens the records: the grid coordinates are taken from the
# record when present (`size`, `arm`), else from the pretraining run's name, which alone gives the
# pretraining `seed` (a record's own `seed` is its finetuning seed, kept as `ner_seed`); the checkpoint
# (an int, `step_006000` or a path ending in it) becomes the integer `checkpoint_step` (NaN when it
# has no step, e.g. a released Hub model). `tags=True` gives one row per entity tag instead, from
# `per_tag_f1`. Each row keeps the run's per-sentence counts on its test set (`counts`, None for
# records without them) for the intervals below.

# %%
#| export
NER_COLUMNS = ["pretraining_run", "family", "size", "arm", "seed", "ner_seed", "checkpoint_step", "head", "regime",
               "dataset", "test_set"]

def _checkpoint_step(checkpoint) -> float:
    step = step_of(checkpoint)
    return float(step) if step is not None else np.nan

def _field(record: dict, key: str, default=None):
    value = record.get(key, default)  # a DataFrame row holds NaN where another record had the key
    return default if value is None or (isinstance(value, float) and np.isnan(value)) else value

def ner_long(results: pd.DataFrame, tags: bool = False) -> pd.DataFrame:
    ("NER records flattened to one row per (run, test set) with `f1`, `strict_f1`; or per tag with `f1`; "
     "and the run's `counts` there.")
    rows = []
    for r in results.to_dict("records"):
        name = str(_field(r, "pretraining_run", ""))
        info = parse_run_name(name) or {"family": "", "size": "", "arm": "", "seed": DEFAULT_SEED}
        base = {"pretraining_run": name, "family": info["family"],
                **{k: _field(r, k, info[k]) for k in ("size", "arm")},
                "seed": info["seed"], "ner_seed": _field(r, "seed", 0),  # a record's own `seed` is its finetuning seed
                "checkpoint_step": float(_field(r, "step", _checkpoint_step(_field(r, "checkpoint", "")))),
                **{k: _field(r, k) for k in ("head", "regime", "dataset")}}
        strict, per_tag, counts = (_field(r, k, {}) for k in ("test_strict_f1", "per_tag_f1", "sentence_counts"))
        for test_set, f1 in _field(r, "test_f1", {}).items():
            c = counts.get(test_set)
            if tags: rows += [{**base, "test_set": test_set, "tag": tag, "f1": v, "counts": c}
                              for tag, v in per_tag.get(test_set, {}).items()]
            else: rows.append({**base, "test_set": test_set, "f1": f1, "strict_f1": strict.get(test_set, np.nan),
                               "counts": c})
    return pd.DataFrame(rows, columns=NER_COLUMNS + (["tag", "f1"] if tags else ["f1", "strict_f1"]) + ["counts"])


# %%
_records = pd.DataFrame([{"pretraining_run": "pico-large-maml-seed2",
                          "checkpoint": "runs/pico-large-maml/checkpoints/step_006000", "head": "linear",
                          "regime": "full", "dataset": "en_ewt", "test_f1": {"en_ewt": 0.5, "tl_trg": 0.2},
                          "test_strict_f1": {"en_ewt": 0.45, "tl_trg": 0.1},
                          "per_tag_f1": {"en_ewt": {"PER": 0.6, "LOC": 0.4}, "tl_trg": {"PER": 0.3}}},
                         {"pretraining_run": "hub-model", "size": "small", "arm": "vanilla", "checkpoint": "",
                          "head": "crf", "regime": "head", "dataset": "all", "test_f1": {"en_ewt": 0.1}}])
_long = ner_long(_records)
assert (_long[["size", "arm", "seed", "test_set", "f1", "strict_f1"]].values.tolist()[:2]
        == [["large", "maml", 2, "en_ewt", 0.5, 0.45], ["large", "maml", 2, "tl_trg", 0.2, 0.1]])
assert (_long.checkpoint_step[0] == 6000 and np.isnan(_long.checkpoint_step[2])
        and _long.loc[2, ["size", "arm"]].tolist() == ["small", "vanilla"])
_tags = ner_long(_records, tags=True)
assert len(_tags) == 3 and _tags.set_index(["test_set", "tag"]).f1[("en_ewt", "LOC")] == 0.4
assert (ner_long(pd.DataFrame()).empty
        and list(ner_long(pd.DataFrame(), tags=True).columns)[-3:] == ["tag", "f1", "counts"])
assert _long.counts.isna().all()  # these records kept no per-sentence counts

# %% [markdown]
# ## What the report notebooks read from the NER sweep
#
# Declared once, here, so the grids can be checked against it (`picomaml.ner_sweep.uncovered`) without
# running anything: `sizes` is `all` (every size of the profile) or `sweep` (paper 2's checkpoint-sweep
# model, medium in the paper), `step` is `final` or `scheduled` (every checkpoint the run saved).

# %%
#| export
NER_READS = [
    dict(notebook="22_paper1_ner", outputs="Tables 3-9, Fig. 2", head="linear", regimes=("head", "full"),
         datasets=SOURCES, sizes="all", arms=ARMS, step="final"),
    dict(notebook="23_paper2_ner", outputs="Figs. 1-3, Table 2", head="crf", regimes=("head", "full"), datasets=SOURCES,
         sizes="all", arms=ARMS, step="final"),
    dict(notebook="23_paper2_ner", outputs="Figs. 4-7, Table 5", head="crf", regimes=("head",), datasets=("sk_snk",),
         sizes="sweep", arms=("maml",), step="scheduled", predictions=True),
    dict(notebook="23_paper2_ner", outputs="Fig. 9", head="crf", regimes=("head",), datasets=("sk_snk",),
         sizes="sweep", arms=("vanilla",), step="final", predictions=True),
]

# %% [markdown]
# ## Intervals: test sentences and pretraining seeds
#
# The papers report one run per cell, without intervals. Every F1 and ΔF1 here carries a 95 %
# interval that combines the two sources of chance we can measure: **the test sentences** (a test
# set is a sample of sentences; another sample would give another F1) and, with several runs,
# **the pretraining seeds**. Both are crossed, not nested — every run is scored on the same
# sentences of a test set — so we resample both (a two-way, "pigeonhole" bootstrap, Owen 2007):
# in each of `n_boot` replicates, every test set's sentences are drawn with replacement **once**, the
# same draw for every run scored on that set, and the seeds are drawn with replacement; a cell is
# recomputed from the drawn seeds' runs on the drawn sentences. Because the sentence draw is shared,
# MAML − vanilla differences and relative changes are paired on the same sentences. The interval is
# the 2.5th–97.5th percentile of the replicates; the point is the cell's own value (the mean over
# seeds of the runs' seqeval scores). The replicates use fixed seeds, so tables are byte-identical on
# rerun.
#
# A run keeps per sentence what a resample needs (`sentence_counts` of the sweep's rows, from
# `picomaml.crf_metrics`: per sentence with a span, the correct, predicted and gold spans per type),
# so a replicate's micro-F1 is 2·correct / (predicted + gold) of the drawn sentences' summed counts.
#
# `sentence_weights` is one test set's draw: how often each of its n sentences is drawn in each
# replicate, fixed by the set's name and n (so every notebook and cell draws the same).

# %%
#| export
N_BOOT = 1000  # bootstrap replicates of every interval (the notebooks' `smoke` runs use fewer)

@functools.lru_cache(maxsize=64)
def sentence_weights(test_set: str, n: int, n_boot: int = N_BOOT) -> np.ndarray:
    ("How often each of a test set's n sentences is drawn in each replicate, (n_boot, n): "
     "one fixed draw per test set and n.")
    rng = np.random.default_rng([zlib.crc32(test_set.encode()), n, n_boot])
    return rng.multinomial(n, np.full(n, 1 / n), size=n_boot).astype(np.float32)

def replicate_counts(counts: dict, test_set: str, n_boot: int = N_BOOT) -> np.ndarray:
    "Summed (correct, predicted, gold) spans per entity type in each replicate of a run's test set: (n_boot, types, 3)."
    # (m, 10): index, counts
    rows = np.asarray(counts["sentences"], dtype=np.float32).reshape(-1, 1 + 3 * len(ENTITY_TYPES))
    # (n_boot, m)
    drawn = sentence_weights(test_set, counts["n"], n_boot)[:, rows[:, 0].astype(int)]
    # whole numbers: float32 sums are exact
    return (drawn @ rows[:, 1:]).astype(float).reshape(n_boot, len(ENTITY_TYPES), 3)

def counts_f1(counts: np.ndarray, tag: str | None = None) -> np.ndarray:
    "F1 of (..., types, 3) span counts: micro over the types (0 without spans), or one type's (NaN without spans)."
    c = counts.sum(-2) if tag is None else counts[..., ENTITY_TYPES.index(tag), :]  # (..., 3)
    spans = c[..., 1] + c[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(spans > 0, 2 * c[..., 0] / spans, 0.0 if tag is None else np.nan)


# %% [markdown]
# A draw keeps each test set's size, differs between sets and replicates, and repeats exactly; a
# replicate of counts whose weights are all 1 is the run's own F1. Two sentences, one with a correct
# PER and one with a missed ORG: F1 = 2·1 / (1 + 2) overall, 1 for PER, 0 for ORG, NaN for LOC.

# %%
_w = sentence_weights("tl_trg", 5, 200)
assert _w.shape == (200, 5) and (_w.sum(1) == 5).all() and len({tuple(r) for r in _w}) > 50
assert (_w == sentence_weights("tl_trg", 5, 200)).all() and not (_w == sentence_weights("ceb_gja", 5, 200)).all()
# (PER, LOC, ORG) x (tp, pred, gold)
_counts = {"n": 3, "sentences": [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0], [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]]}
_total = np.asarray([r[1:] for r in _counts["sentences"]], float).reshape(-1, 3, 3).sum(0)
assert (counts_f1(_total) == 2 / 3 and counts_f1(_total, "PER") == 1 and counts_f1(_total, "ORG") == 0
        and np.isnan(counts_f1(_total, "LOC")))
_reps = counts_f1(replicate_counts(_counts, "x", 500))  # (500,)
# some resamples drop a sentence
assert _reps.shape == (500,) and set(np.round(_reps, 6)) <= {0.0, round(2 / 3, 6), 1.0, 0.5, 0.8}


# %% [markdown]
# `with_replicates` adds to a long table (`ner_long`, which carries each row's `counts`) a `boot`
# column: the row's F1 — micro, or its `tag`'s — in each replicate, or None for a row whose run kept
# no counts (results written before the sweep stored them, or hand-written ones); the counts of one
# run and test set are resampled once for all its tags.

# %%
#| export
def with_replicates(long: pd.DataFrame, n_boot: int = N_BOOT) -> pd.DataFrame:
    "`long` with `boot`: each row's F1 (micro, or its `tag`'s) in each of `n_boot` replicates; None without counts."
    summed, boot = {}, []
    for r in long.itertuples():
        counts = getattr(r, "counts", None)
        if not isinstance(counts, dict): boot.append(None); continue
        if id(counts) not in summed: summed[id(counts)] = replicate_counts(counts, r.test_set, n_boot)
        boot.append(counts_f1(summed[id(counts)], getattr(r, "tag", None)))
    return long.assign(boot=pd.Series(boot, index=long.index, dtype=object))

def mean_replicates(boots) -> np.ndarray | None:
    "Replicate-wise mean of several rows' `boot` arrays (NaN-skipping), None if any row has none."
    boots = list(boots)
    if not boots or any(b is None or (isinstance(b, float) and np.isnan(b)) for b in boots): return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate where every row's tag F1 is NaN stays NaN
        return np.nanmean(np.stack(boots), axis=0)


# %% [markdown]
# A language with several test sets (Tagalog: tl_trg and tl_ugnayan) has one micro-F1 when its
# sentences are pooled: the spans of every sentence of every set counted together, so each entity
# weighs the same wherever it occurs. The unweighted mean of the sets' F1s would let tl_ugnayan's two
# PER spans weigh as much as tl_trg's nineteen. `pooled_f1` sums the stored per-sentence counts of the
# sets, and in each bootstrap replicate their replicate sums (each set's own sentence draw, so pooled
# scores of two runs stay paired); `tag` gives that tag's F1.

# %%
#| export
def summed_counts(counts: dict) -> np.ndarray:
    "The (types, 3) (correct, predicted, gold) span counts of a run's whole test set, from its per-sentence counts."
    rows = np.asarray(counts["sentences"], dtype=float).reshape(-1, 1 + 3 * len(ENTITY_TYPES))
    return rows[:, 1:].sum(0).reshape(len(ENTITY_TYPES), 3)

def pooled_f1(counts_by_set: dict, test_sets, tag: str | None = None, n_boot: int = N_BOOT) -> tuple:
    ("(F1, replicates) of a run over the pooled sentences of `test_sets` (micro, or `tag`'s); "
     "(NaN, None) unless every set has counts.")
    if not isinstance(counts_by_set, dict) or not all(isinstance(counts_by_set.get(t), dict) for t in test_sets):
        return np.nan, None
    point = counts_f1(sum(summed_counts(counts_by_set[t]) for t in test_sets), tag)
    reps = counts_f1(sum(replicate_counts(counts_by_set[t], t, n_boot) for t in test_sets), tag)
    return float(point), reps


# %%
_two = {"a": {"n": 2, "sentences": [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0]]},  # set a: one correct PER in two sentences
        "b": {"n": 3, "sentences": [[1, 0, 1, 3, 0, 0, 0, 0, 0, 0]]}}  # set b: three gold PER, one wrong prediction
_f1, _reps = pooled_f1(_two, ["a", "b"], n_boot=200)
assert np.isclose(_f1, 2 * 1 / (2 + 4)) and _reps.shape == (200,)  # pooled: 1 correct of 2 predicted and 4 gold
# the mean of sets: 0.5
assert np.isclose((counts_f1(summed_counts(_two["a"])) + counts_f1(summed_counts(_two["b"]))) / 2, 0.5)
assert np.isnan(pooled_f1(_two, ["a", "c"])[0]) and pooled_f1(None, ["a"]) == (pooled_f1(None, ["a"])[0], None)
assert (np.isclose(pooled_f1(_two, ["a", "b"], tag="PER")[0], _f1)
        and np.isnan(pooled_f1(_two, ["a", "b"], tag="LOC")[0]))


# %% [markdown]
# `bootstrap_ci` combines per-seed values with their sentence replicates: in replicate b the seeds
# are drawn with replacement and their values *in replicate b* averaged, so every drawn seed is read
# on the same sentence draw. A seed without replicates contributes its value to every replicate; with
# one seed and no replicates there is no interval (the interval is the value). Replicates that are
# not finite (a relative change over a vanilla F1 of 0 in that draw) are left out of the quantiles.

# %%
#| export
def bootstrap_ci(values, replicates=None, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    ("`(mean, low, high)`: the mean of per-seed `values`, and the percentile interval resampling seeds and "
     "(given per-seed `replicates`) sentences.")
    x = np.asarray(values, dtype=float)
    reps = list(replicates) if replicates is not None else [None] * len(x)
    keep = np.isfinite(x)
    x, reps = x[keep], [r for r, k in zip(reps, keep) if k]
    if x.size == 0: return (np.nan, np.nan, np.nan)
    if x.size == 1 and reps[0] is None: return (float(x[0]),) * 3
    n_boot = next((len(r) for r in reps if r is not None), N_BOOT)
    # (seeds, n_boot)
    table = np.stack([np.full(n_boot, v) if r is None else np.asarray(r, float) for v, r in zip(x, reps)])
    drawn = (np.random.default_rng(seed).integers(0, x.size, (x.size, n_boot)) if x.size > 1
             else np.zeros((1, n_boot), int))
    means = table[drawn, np.arange(n_boot)].mean(0)  # (n_boot,)
    means = means[np.isfinite(means)]
    if means.size == 0: return (float(x.mean()), np.nan, np.nan)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(x.mean()), float(low), float(high)


# %%
assert bootstrap_ci([2.0]) == (2.0, 2.0, 2.0) and all(np.isnan(bootstrap_ci([])))
_mean, _low, _high = bootstrap_ci([1.0, 2.0, 3.0, 4.0])
assert _mean == 2.5 and 1.0 <= _low < 2.5 < _high <= 4.0 and bootstrap_ci([1.0, 2.0, 3.0, 4.0]) == (_mean, _low, _high)
assert bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0, 5.0)
_wide, _narrow = bootstrap_ci(np.arange(10.0), level=0.99), bootstrap_ci(np.arange(10.0), level=0.5)
assert _wide[1] < _narrow[1] < _narrow[2] < _wide[2]
_one = bootstrap_ci([0.5], [np.linspace(0.4, 0.6, 1001)])  # one seed: the sentence replicates' percentiles
assert _one[0] == 0.5 and np.isclose(_one[1], 0.405) and np.isclose(_one[2], 0.595)
_both = bootstrap_ci([0.3, 0.7], [np.linspace(0.25, 0.35, 1001), np.linspace(0.65, 0.75, 1001)])
assert _both[0] == 0.5 and _both[1] < 0.35 and _both[2] > 0.65  # the seed spread widens the sentence interval

# %% [markdown]
# Paired differences are tighter than the arms' own intervals: two runs that share the sentences
# that are hard for both have a difference whose replicates cancel that shared variation. Below, two
# arms scored on one set of 400 sentences, where MAML finds one more entity in every tenth sentence.

# %%
_rng = np.random.default_rng(0)
_gold = _rng.integers(0, 3, 400)  # gold PER spans per sentence
_vanilla = np.minimum(_gold, _rng.integers(0, 3, 400))  # correct ones
_maml = np.minimum(_gold, _vanilla + (np.arange(400) % 10 == 0))
_as_counts = lambda tp: {"n": 400, "sentences": [[i, t, g, g, 0, 0, 0, 0, 0, 0]
                                                 for i, (t, g) in enumerate(zip(tp, _gold)) if g]}
_f1 = {arm: counts_f1(replicate_counts(_as_counts(tp), "toy", 1000))
       for arm, tp in (("maml", _maml), ("vanilla", _vanilla))}
_diff = bootstrap_ci([0.0], [_f1["maml"] - _f1["vanilla"]])
assert 0 < _diff[1] and _diff[2] - _diff[1] < (bootstrap_ci([0.0], [_f1["maml"]])[2]
                                               - bootstrap_ci([0.0], [_f1["maml"]])[1]) / 2

# %% [markdown]
# A table cell is `MISSING` when there is nothing to report, the value when it has no interval (one
# seed, no per-sentence counts), and otherwise `value [low, high]`; `signed` writes the sign of every
# number, as the relative changes do. `interval_note` is the sentence a table's caption carries to say
# how its intervals were made.

# %%
#| export
MISSING = "missing"

def format_estimate(values, digits: int = 2, replicates=None, signed: bool = False) -> str:
    "A table cell: 'missing', the value, or 'mean [low, high]' of the 95 % bootstrap interval over seeds and sentences."
    mean, low, high = bootstrap_ci(values, replicates)
    if not np.isfinite(mean): return MISSING
    spec = f"{'+' if signed else ''}.{digits}f"
    resampled = np.isfinite(np.asarray(values, float)).sum() > 1 or any(r is not None for r in (replicates or []))
    return f"{mean:{spec}} [{low:{spec}}, {high:{spec}}]" if resampled and np.isfinite(low) else f"{mean:{spec}}"

def interval_note(n_boot: int, seeds, sentences: bool = True) -> str:
    "How a table's intervals were computed, for its caption."
    over = (["test sentences (one draw per test set, shared by every run scored on it, so differences are paired)"]
            if sentences else []) + \
           ([f"the {len(seeds)} pretraining seeds"] if len(seeds) > 1 else [])
    if not over: return "One pretraining seed: no intervals."
    return (f"Brackets: 95 % percentile interval of a {n_boot:,}-replicate bootstrap resampling {' and '.join(over)}"
            + ("; a value without brackets is from runs without per-sentence counts." if sentences else "."))


# %%
assert format_estimate([]) == "missing" and format_estimate([np.nan]) == "missing"
assert format_estimate([3.14159]) == "3.14" and format_estimate([1.0, 1.0], digits=1) == "1.0 [1.0, 1.0]"
assert (format_estimate([1.0, 3.0]).startswith("2.00 [1.00, ")
        and format_estimate([0.5], 1, [np.linspace(-1, 2, 101)], signed=True) == "+0.5 [-0.9, +1.9]")
assert ("pretraining seeds" not in interval_note(1000, [42])
        and "the 3 pretraining seeds" in interval_note(200, [1, 2, 3], sentences=False))


# %% [markdown]
# Paper 1's NER tables (Tables 3–5, 8, 9) report the relative F1 change of the MAML model over the
# vanilla one, $100\,(F1_{\text{MAML}} - F1_{\text{vanilla}}) / F1_{\text{vanilla}}$ in percent;
# paper 2 uses the same ratio for its relative gains.

# %%
#| export
def relative_change(new, base):
    "Percent change of `new` over `base`; NaN where `base` is 0 or either is missing."
    new, base = np.asarray(new, dtype=float), np.asarray(base, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base != 0, 100.0 * (new - base) / base, np.nan)


# %%
assert (np.isclose(relative_change(0.55, 0.5), 10.0) and np.isnan(relative_change(0.3, 0.0))
        and np.isnan(relative_change(np.nan, 0.5)))
assert np.allclose(relative_change([0.4, 0.6], [0.5, 0.5]), [-20.0, 20.0])

# %% [markdown]
# A relative-change table cell: from one (MAML, vanilla) pair per pretraining seed, each arm an
# `(F1, sentence replicates or None)`, the change per seed and per replicate (paired by seed and by
# sentence draw) combined by `format_estimate`; then, in parentheses, the two mean F1 it divides, and
# `NEAR_ZERO_BASE` when the vanilla F1's interval reaches below `NEAR_ZERO_F1`. A vanilla F1 of 0 gives
# "n/a" with the F1s still shown. `RELATIVE_NOTE` is the caption sentence that explains the cell.

# %%
#| export
RELATIVE_NOTE = (f"In parentheses: the mean F1 of MAML and of vanilla that the change divides; '{NEAR_ZERO_BASE}' "
                 f"marks a vanilla F1 whose 95 % interval reaches below {NEAR_ZERO_F1}, where the ratio amplifies "
                 f"noise: read the absolute F1 there.")

def relative_estimate(pairs) -> str:
    ("A '(%)' cell from (MAML, vanilla) pairs of (F1, replicates or None), one per seed: "
     "change [interval] (F1 m vs v[; base ≈ 0]).")
    pairs = [(m, v) for m, v in pairs if np.isfinite(m[0]) and np.isfinite(v[0])]
    if not pairs: return MISSING
    changes = [float(relative_change(m[0], v[0])) for m, v in pairs]
    boots = [relative_change(m[1], v[1]) if m[1] is not None and v[1] is not None else None for m, v in pairs]
    change = "n/a" if all(np.isnan(changes)) else format_estimate(changes, 1, boots, signed=True)
    maml, _, _ = bootstrap_ci([m[0] for m, _ in pairs], [m[1] for m, _ in pairs])
    vanilla, low, _ = bootstrap_ci([v[0] for _, v in pairs], [v[1] for _, v in pairs])
    near_zero = (low if np.isfinite(low) else vanilla) < NEAR_ZERO_F1  # without replicates the point decides
    return f"{change} (F1 {maml:.3f} vs {vanilla:.3f}{'; ' + NEAR_ZERO_BASE if near_zero else ''})"


# %%
assert (relative_estimate([((0.3, None), (0.4, None))]) == "-25.0 (F1 0.300 vs 0.400)"
        and relative_estimate([]) == MISSING)
assert relative_estimate([((0.2, None), (0.0, None))]) == f"n/a (F1 0.200 vs 0.000; {NEAR_ZERO_BASE})"
assert relative_estimate([((0.02, None), (0.01, None))]).endswith(f"(F1 0.020 vs 0.010; {NEAR_ZERO_BASE})")
_pair = ((0.4, np.linspace(0.3, 0.5, 11)), (0.4, np.linspace(0.35, 0.45, 11)))
assert relative_estimate([_pair]).startswith("+0.0 [") and relative_estimate([_pair]).endswith("(F1 0.400 vs 0.400)")
_noisy_base = ((0.05, np.full(11, 0.05)), (0.03, np.linspace(0.0, 0.06, 11)))  # the base's interval reaches 0
assert relative_estimate([_noisy_base]).endswith(f"vs 0.030; {NEAR_ZERO_BASE})")

# %% [markdown]
# ## One figure style, deterministic files
#
# `set_style` is the one seaborn style of every figure (white grid, paper context, colour-blind
# palette, MAML and vanilla always the same colours). `save_figure` writes `<name>.png` and
# `<name>.pdf`; the PDF has no creation date and the PNG no software version, so an unchanged input
# gives byte-identical files (tested below). Fonts are fixed to the DejaVu family matplotlib ships.

# %%
#| export
ARM_COLORS = {"maml": "#0072B2", "vanilla": "#D55E00"}
SIZE_COLORS = dict(zip(SIZES, ["#7f7f7f", "#E69F00", "#56B4E9", "#009E73", "#CC79A7"]))  # colour-blind safe (Okabe-Ito)

def set_style() -> None:
    "The seaborn/matplotlib style of every figure."
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font="DejaVu Sans")
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "svg.hashsalt": "picomaml",
                                "figure.constrained_layout.use": True, "legend.frameon": False})

def figure_missing(fig) -> list[str]:
    "Every 'missing: …' note drawn in `fig` (panel notes, annotations, titles, legend titles)."
    texts = [t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title]]
    texts += [ax.get_legend().get_title().get_text() for ax in fig.axes if ax.get_legend()]
    return sorted({t for t in texts if t.startswith(f"{MISSING}:")})

def save_figure(fig, name: str, figures_dir) -> list[Path]:
    ("Write `fig` as `<figures_dir>/<name>.png` and `.pdf` (byte-stable), record its missing notes, close it, "
     "return the paths.")
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], metadata={"Software": None})
    fig.savefig(paths[1], metadata={"CreationDate": None, "Producer": None, "Creator": None})
    ledger = out / "missing.json"  # what each figure lacks, so a reader (or a test) need not look at the pictures
    missing = json.loads(ledger.read_text()) if ledger.is_file() else {}
    ledger.write_text(json.dumps({**missing, name: figure_missing(fig)}, indent=1, sort_keys=True) + "\n")
    plt.close(fig)
    return paths


# %% [markdown]
# `missing_note` replaces a panel's content with a visible "missing: <what>" note, so a figure with
# absent runs still has every panel and says why one is empty. It hides the panel's tick labels
# without removing its ticks, so a panel sharing its x axis with a drawn one keeps its steps.

# %%
#| export
def missing_label(items) -> str:
    "'missing: a, b' for a figure's note (`save_figure` lists every such note in `missing.json`)."
    return f"{MISSING}: {items if isinstance(items, str) else ', '.join(items)}"

def missing_note(ax, what: str) -> None:
    "Mark an axes panel as missing: a centred 'missing: <what>' note."
    ax.text(0.5, 0.5, missing_label(what), ha="center", va="center", transform=ax.transAxes, color="0.35", wrap=True)
    # not set_xticks: that would empty a shared axis
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)
    ax.grid(False)


# %%
set_style()
def _demo_figure():
    fig, (left, right) = plt.subplots(1, 2, figsize=(5, 2))
    left.plot([0, 1, 2], [3.0, 2.0, 1.5], color=ARM_COLORS["maml"], label="maml")
    missing_note(right, "pico-large-vanilla")
    return fig, right

with tempfile.TemporaryDirectory() as tmp:
    fig, right = _demo_figure()
    assert right.texts[0].get_text() == "missing: pico-large-vanilla"
    fig_shared, (drawn, empty) = plt.subplots(2, 1, sharex=True)
    drawn.plot([0, 100], [1, 2]); missing_note(empty, "x")
    assert len(drawn.get_xticks()) > 1; plt.close(fig_shared)
    first = [p.read_bytes() for p in save_figure(fig, "p1_figX_demo", Path(tmp) / "figs")]
    again = [p.read_bytes() for p in save_figure(_demo_figure()[0], "p1_figX_demo", Path(tmp) / "figs")]
    assert first == again and first[0][:4] == b"\x89PNG" and first[1][:5] == b"%PDF-"
    assert sorted(p.name for p in (Path(tmp) / "figs").iterdir()) == ["missing.json", "p1_figX_demo.pdf",
                                                                      "p1_figX_demo.png"]
    assert (json.loads((Path(tmp) / "figs" / "missing.json").read_text())
            == {"p1_figX_demo": ["missing: pico-large-vanilla"]})

# %% [markdown]
# ## The papers' numbers beside ours
#
# `docs/reported_numbers.csv` holds every number the two papers report: one row per cell of their
# results tables and per quantitative claim of their text, with the paper, table or section, row,
# column, value or range, unit and the text as printed (`tests/test_reported_numbers.py` checks its
# shape, and each cell against the papers' own text). `PAPER_TABLES` says, for each of our tables
# with a counterpart in a paper, which table or claim it is, how our row names the paper's row, and
# which of our columns is which of the paper's. `save_table` appends the paper's rows to such a
# table, marked `paper: ` in its first column, so every regenerated table prints the paper's value
# beside ours; the scorecard (`29_scorecard`) scores each cell through the same map.

# %%
#| export
REPORTED_NUMBERS = PRESETS_DIR.parent / "docs" / "reported_numbers.csv"
PAPER_ROW = "paper: "  # first-column prefix of the paper's rows in our tables

@functools.cache
def reported_numbers(path=REPORTED_NUMBERS) -> pd.DataFrame:
    "The papers' reported numbers (one row per table cell or claim), every field a string."
    return pd.read_csv(path, dtype=str, keep_default_na=False)

@dataclass(frozen=True)
class PaperTable:
    paper: str  # "1" or "2"
    source: str  # the paper's "Table N", or "text" (columns then map to claim keys)
    columns: dict  # our column -> the paper's column label, or the claim's key
    row: Callable  # our row's key cells (a tuple of str) -> the paper's row label (None: no counterpart)
    keys: int = 1  # how many leading columns of ours name a row
    null: float | None = None  # the value of "no effect" (0 for a change, 1 for a ratio; None: not an effect)
    scale_free: tuple = ()  # our columns that are properties of the data, comparable at any model scale
    unit: float = 1.0  # the paper's numbers times this are in our units (0.01: the paper's percent, our fraction)

    def reported(self) -> pd.DataFrame:
        "The paper's rows of this table (or its claims)."
        rep = reported_numbers()
        if self.source == "text": return rep[rep.key.isin(list(self.columns.values()))]
        return rep[(rep.paper == self.paper) & (rep.source == self.source)]

    def covers(self, record: dict, row_label) -> bool:
        "Whether the paper's record speaks of our row (a text claim: of every size its row lists, or of all)."
        if row_label is None: return False
        if self.source != "text": return record["row"].lower() == row_label.lower()
        named = re.split(r"[^a-z0-9]+", record["row"].lower())
        return row_label.lower() in named or "all" in named

# %% [markdown]
# How our rows name the paper's: a run `pico-<size>-<arm>` is the paper's `pico-decoder-<size>` or
# `pico-maml-decoder-<size>`; a relative row `<size> (%)` and a head-only row `<arm>_<size>` are
# written as the paper writes them (case aside); a row of two key cells (size, regime) is the paper's
# `<size> / <regime>`. The demo's rows (`demo-maml`, `demo (%)`) have no counterpart in the papers.

# %%
#| export
def paper_model(key) -> str | None:
    "The paper's model name of our run name (`pico-small-maml` -> `pico-maml-decoder-small`)."
    run = parse_run_name(key[0])
    if run is None or run["family"] != "pico" or run["seed"] != DEFAULT_SEED: return None
    return f"pico-{'maml-' if run['arm'] == 'maml' else ''}decoder-{run['size']}"

def same_label(key) -> str | None: return key[0] if not key[0].startswith("demo") else None
def size_regime(key) -> str | None: return f"{key[0]} / {key[1]}" if key[0] in PAPER_SIZES else None
def paper_size(key) -> str | None: return key[0] if key[0] in PAPER_SIZES else None

_GROUPS = {"seen": "Seen", "PUD": "Test-Only (PUD)", "other": "Test-Only (Other)"}
_LANGUAGES = ("Danish", "English", "Croatian", "Portuguese", "Swedish")
_DATASETS = ("da_ddt", "en_ewt", "hr_set", "pt_bosque", "sk_snk", "sr_set", "sv_talbanken", "zh_gsd", "zh_gsdsimp")
PAPER_TABLES = {
    "p1_table2_loss_paloma": PaperTable("1", "Table 2",
                                        {"train loss: logged objective (the paper's)": "Train Loss @6k",
                                         "Paloma ppl: per-document mean (the paper's)": "Paloma Perplexity @6k"},
                                        paper_model),
    "p1_table3_relative_f1_by_group": PaperTable("1", "Table 3",
                                                 {f"{g} {r}": f"{p} / {r.title()}" for g, p in _GROUPS.items()
                                                  for r in ("head", "full")}, same_label, null=0.0),
    "p1_table4_relative_f1_head_per_language": PaperTable("1", "Table 4", {c: c for c in _LANGUAGES}, same_label,
                                                          null=0.0),
    "p1_table5_relative_f1_full_per_language": PaperTable("1", "Table 5", {c: c for c in _LANGUAGES}, same_label,
                                                          null=0.0),
    "p1_table6_zero_shot_ceb_tl": PaperTable("1", "Table 6",
                                             {"overall": "Overall",
                                              **{c: c for c in ("Cebuano", "Tagalog (TRG)", "Tagalog (Ugnayan)")}},
                                             size_regime, keys=2, null=0.0),
    "p1_table7_head_only_f1": PaperTable("1", "Table 7", {c: c for c in _DATASETS}, same_label),
    "p1_table8_relative_f1_head_per_language": PaperTable("1", "Table 8", {c: c for c in _DATASETS}, same_label,
                                                          null=0.0),
    "p1_table9_relative_f1_full_per_language": PaperTable("1", "Table 9", {c: c for c in _DATASETS}, same_label,
                                                          null=0.0),
    "p1_text_speedup": PaperTable("1", "text",
                                  {"speed-up on the logged objective (×, the paper's loss)": "p1.text.loss-speedup"},
                                  paper_size, null=1.0),
    "p1_text_episode_accuracy": PaperTable("1", "text",
                                           {"query accuracy of φ_T (the paper's)": "p1.text.query-acc-small-medium",
                                            "support accuracy of φ_T": "p1.text.support-acc-small-medium"},
                                           paper_size, unit=0.01),
    "p2_table2_finetuning_speed": PaperTable("2", "Table 2",
                                             {"Δt90": r"$\Delta t_{90}$", "Δauc": r"$\Delta \text{AUC}$",
                                              "Δslope": r"$\Delta \text{slope}$"}, size_regime,
                                             keys=2, null=0.0),
    "p2_table4_span_statistics": PaperTable("2", "Table 4", {"spans": "# spans", "single-token %": "% single-token"},
                                            same_label, scale_free=("spans", "single-token %")),
    "p2_table5_particles_oov": PaperTable("2", "Table 5", {"model recall after particle": "Particle recall",
                                                           "OOV token rate": "OOV rate"}, same_label,
                                          scale_free=("OOV token rate",)),
}

# %% [markdown]
# `beside_paper` appends the paper's rows to one of our tables: its row label in the first column
# (split over the key columns where a row has two), each mapped column's cell as the paper prints
# it, the other cells empty; a text claim's row is the sizes it speaks of (`paper: small, medium`).

# %%
#| export
def beside_paper(df: pd.DataFrame, name: str) -> pd.DataFrame:
    "`df` with the paper's rows appended (first column `paper: <the paper's row>`), if `name` has a counterpart."
    spec = PAPER_TABLES.get(name)
    if spec is None or df.empty: return df
    rep, keys, rows = spec.reported(), list(df.columns[:spec.keys]), []
    for label in dict.fromkeys(rep.row):
        row = dict.fromkeys(df.columns, "")
        row.update(zip(keys, label.split(" / ", spec.keys - 1)))
        row[keys[0]] = PAPER_ROW + row[keys[0]]
        for ours, theirs in spec.columns.items():
            hit = rep[(rep.row == label) & ((rep.key if spec.source == "text" else rep.column) == theirs)]
            if ours in row and len(hit): row[ours] = hit.printed.iloc[0]
        rows.append(row)
    return pd.concat([df, pd.DataFrame(rows, columns=df.columns)], ignore_index=True)


# %%
_t3 = beside_paper(pd.DataFrame({"model": ["demo (%)"], "seen head": ["+1.0 [-2.0, +4.0]"], "seen full": ["+0.5"]}),
                   "p1_table3_relative_f1_by_group")
assert _t3.model.tolist() == ["demo (%)"] + [f"{PAPER_ROW}{s} (%)" for s in PAPER_SIZES]
assert _t3.set_index("model").loc[f"{PAPER_ROW}tiny (%)"].tolist() == ["-8.3", "-3.0"]
_t6 = beside_paper(pd.DataFrame({"model": ["tiny"], "regime": ["head"], "overall": ["+3.0"]}),
                   "p1_table6_zero_shot_ceb_tl")
assert _t6.iloc[1].tolist() == [PAPER_ROW + "tiny", "head", "-100.0%"] and len(_t6) == 9
_speed = beside_paper(pd.DataFrame({"size": ["tiny"],
                                    "speed-up on the logged objective (×, the paper's loss)": ["1.10"]}),
                      "p1_text_speedup")
assert _speed.iloc[1].tolist() == [PAPER_ROW + "tiny, small, medium, large", "1.3–1.6 \\times sooner"]
assert (beside_paper(_t3, "p1_tableX") is _t3
        and PAPER_TABLES["p1_table2_loss_paloma"].row(("pico-small-maml",)) == "pico-maml-decoder-small")
assert (PAPER_TABLES["p1_table2_loss_paloma"].row(("demo-maml",)) is None
        and PAPER_TABLES["p1_table7_head_only_f1"].row(("maml_demo",)) == "maml_demo")
for name, spec in PAPER_TABLES.items():  # every column the map names is one the transcription has
    rep = spec.reported()
    assert set(spec.columns.values()) <= set(rep.key if spec.source == "text" else rep.column), name


# %% [markdown]
# ## Tables: Markdown, LaTeX and CSV
#
# `save_table` writes a DataFrame three ways. Cells are written as given (format numbers before, so
# all three files agree); the Markdown table carries the caption as its first line, the LaTeX one a
# `table` float with `\caption` and `\label{tab:<name>}`. No timestamps, so a rerun is byte-identical.

# %%
#| export
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$"}

def latex_escape(text) -> str:
    "`text` with LaTeX's special characters escaped."
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))

def markdown_table(df: pd.DataFrame) -> str:
    "A pipe table of `df` (columns as header, cells as strings)."
    cells = lambda row: "| " + " | ".join(str(c).replace("|", r"\|") for c in row) + " |"
    return "\n".join([cells(df.columns), "|" + "---|" * len(df.columns),
                      *(cells(r) for r in df.itertuples(index=False))])

def latex_table(df: pd.DataFrame, caption: str, label: str) -> str:
    "A booktabs `table` float of `df` with a caption and label."
    row = lambda cells: " & ".join(latex_escape(c) for c in cells) + r" \\"
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
                      rf"\label{{tab:{label}}}", rf"\begin{{tabular}}{{{'l' * len(df.columns)}}}", r"\toprule",
                      row(df.columns), r"\midrule",
                      *(row(r) for r in df.itertuples(index=False)), r"\bottomrule", r"\end{tabular}", r"\end{table}"])

def save_table(df: pd.DataFrame, name: str, tables_dir, caption: str) -> list[Path]:
    "Write `df` (with the paper's rows, if `name` has a counterpart) as `<tables_dir>/<name>.md`, `.tex` and `.csv`."
    df = beside_paper(df, name)
    out = Path(tables_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md", out / f"{name}.tex", out / f"{name}.csv"]
    paths[0].write_text(f"**{caption}**\n\n{markdown_table(df)}\n")
    paths[1].write_text(latex_table(df, caption, name) + "\n")
    df.to_csv(paths[2], index=False, lineterminator="\n")
    return paths


# %%
_table = pd.DataFrame({"size": ["tiny", "large"], "loss_maml": ["3.10", MISSING], "F1 %": ["1.0 ± 0.2 (n=3)", "a|b"]})
with tempfile.TemporaryDirectory() as tmp:
    md, tex, csv = save_table(_table, "p1_tableX", tmp, "Loss at 6k & F1")
    assert md.read_text().splitlines()[2:4] == ["| size | loss_maml | F1 % |", "|---|---|---|"]
    assert r"| large | missing | a\|b |" in md.read_text()
    assert r"loss\_maml & F1 \% \\" in tex.read_text() and r"1.0 $\pm$ 0.2 (n=3)" in tex.read_text()
    assert r"\caption{Loss at 6k \& F1}" in tex.read_text() and r"\label{tab:p1_tableX}" in tex.read_text()
    assert pd.read_csv(csv, dtype=str).equals(_table)
    before = [p.read_bytes() for p in (md, tex, csv)]
    assert [p.read_bytes() for p in save_table(_table, "p1_tableX", tmp, "Loss at 6k & F1")] == before

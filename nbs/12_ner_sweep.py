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

# %%

# %% [markdown]
# # The NER sweep
#
# > One command finetunes every combination of heads × regimes × finetuning datasets × checkpoints ×
# > pretraining runs, appending one JSON line per finished run; a restart skips finished rows.
#
# Paper 1 App. B evaluates 2 regimes × 10 datasets × 4 sizes × 2 arms = 160 runs at step 6000 with
# a linear head; paper 2 §4 finetunes one configuration (medium MAML, head-only, sk_snk, CRF head)
# on all 61 checkpoints, steps 0, 100, …, 6000 (its Fig. 4). Grids live in `configs/sweeps/`.

# %%
#| default_exp ner_sweep

# %%
#| export
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi, hf_hub_download
from tqdm.auto import tqdm

from picomaml.checkpoints import LATEST_FILE, load_backbone, scheduled_steps
from picomaml.cli import ensure_writable, run_command
from picomaml.config import PRESETS_DIR, NERConfig, apply_overrides, load_config
from picomaml.crf_metrics import score
from picomaml.device import (
    DEVICE_CHOICES,
    configure_cuda_allocator,
    cuda_problem,
    peak_memory_gib,
    require_cuda,
    reset_peak_memory,
)
from picomaml.model import config_from_json, count_parameters
from picomaml.names import ARMS, DEFAULT_SEED, PHILIPPINE, TEST_SETS, run_name, step_dir_name, step_of
from picomaml.ner_data import (
    ZERO_SHOT_LANGUAGES,
    encode_split,
    encode_words,
    load_split,
    particle_recall,
    uner_statistics,
)
from picomaml.ner_finetune import NERTagger, finetune, gold_tag_probabilities, predict, result_record, window_features
from picomaml.plan import episode_flops
from picomaml.runlog import append_records, drop_torn_tail, exclusive_lock, lock_file_of, write_json_atomic
from picomaml.tokenizer import load_tokenizer


# %% [markdown]
# ## The results table
#
# One row is one JSON line, appended through `00_runlog`'s `append_records`: under an exclusive lock
# of the file (the sweep's worker processes share one results file), every byte checked written,
# then `fsync`ed, so concurrent workers never interleave inside a line, a finished row survives a
# crash, and a full disk cuts the file back to its last whole row. A kill during the write can still
# leave a torn last line; reading skips it with a warning (its run is simply redone), and a launch
# cuts it off before it appends (`drop_torn_tail`). A broken line anywhere else is an error naming
# the file and line. A job recorded twice (two sweeps that ran on one file before the file had a
# lock) keeps its first row, with a warning.

# %%
#| export
class SweepError(ValueError):
    "A grid or results file that cannot be used; the message names the file, key or line."

def read_rows(path) -> list[dict]:
    "Rows of a results file, the first of each job key; a torn last line is skipped with a warning."
    if not Path(path).exists(): return []
    lines = Path(path).read_text().split("\n")
    rows, repeated = {}, 0
    for n, line in enumerate(lines, 1):
        if not line.strip(): continue
        try: row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) and lines[-1]:
                warnings.warn(f"{path}:{n}: torn last line ignored (an interrupted write); its run will be redone")
                continue
            raise SweepError(f"{path}:{n}: not a JSON row ({e}); fix or delete that line") from e
        repeated += row.get("key") in rows
        rows.setdefault(row.get("key", n), row)
    if repeated: warnings.warn(f"{path}: {repeated} rows repeat a job already recorded (two sweeps on one file?); "
                               "the first of each is kept")
    return list(rows.values())


# %%
import tempfile

from picomaml.devtools import raises

with tempfile.TemporaryDirectory() as tmp:
    table = Path(tmp) / "r.jsonl"
    append_records(table, [{"key": "a"}]); append_records(table, [{"key": "b"}])
    assert [r["key"] for r in read_rows(table)] == ["a", "b"]
    with open(table, "a") as f: f.write('{"key": "c", "dev_f')  # a write killed half-way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [r["key"] for r in read_rows(table)] == ["a", "b"]
    assert "r.jsonl:3: torn last line" in str(caught[0].message)
    drop_torn_tail(table); append_records(table, [{"key": "c"}])
    assert [r["key"] for r in read_rows(table)] == ["a", "b", "c"]
    append_records(table, [{"key": "b", "dev_f1": 0.5}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_rows(table) == [{"key": "a"}, {"key": "b"}, {"key": "c"}]
    assert "1 rows repeat a job already recorded" in str(caught[0].message)
    table.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    raises(lambda: read_rows(table), "r.jsonl:2: not a JSON row")

# %% [markdown]
# ## Grid files
#
# A grid file (`configs/sweeps/*.yaml`) holds `defaults` and a list of `grids`. Each grid is a
# product of `heads`, `regimes`, `datasets`, `seeds` (finetuning seeds) and its `runs`; keys of
# `defaults` (and `ner` overrides, `test_sets`, `save_predictions`, `max_train_sentences`,
# `max_eval_sentences`) apply unless a grid sets its own, and the sweep's `grid_overrides` (the
# rehearsal's shrink, `30_pipeline`) apply over both.
#
# A run entry names a pretraining run by **size and arm** (and `family`, `pico` unless said), never
# by a path: the sweep builds the directory `<runs_dir>/<run name>/checkpoints/` with
# `picomaml.names.run_name` for each pretraining seed it is given, the same function the pipeline
# names the runs with. `step` picks the checkpoints: `final` (the run's last step, from its
# `config.yaml`), `scheduled` (every step the run checkpoints: paper 2's 0, 100, …, 6000), or a step
# number or list. For a model that was not trained here, `hub` names a Hub repository (with optional
# `revision`, `subfolder`, `{step}` filled in from `steps`, and a `run` label), and `checkpoint` a
# local directory.

# %%
#| export
GRID_KEYS = {"name", "heads", "regimes", "datasets", "seeds", "runs", "ner", "test_sets", "save_predictions",
             "max_train_sentences", "max_eval_sentences"}
# what changes a job's output besides its coordinates
SETTING_KEYS = GRID_KEYS - {"name", "heads", "regimes", "datasets", "seeds", "runs"}
RUN_KEYS = {"run", "family", "arm", "size", "step", "checkpoint", "hub", "revision", "subfolder", "steps"}

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    "One backbone to finetune: a local directory or a Hub repo (+ revision, subfolder), and its pretraining run."
    run: str
    arm: str
    size: str
    source: str
    revision: str | None = None
    subfolder: str | None = None
    step: int | None = None
    hub: bool = False
    selector: str = ""  # the grid's `step` for a run named by size and arm: final, scheduled, or a step

    @property
    def name(self) -> str:
        return (self.source + (f"@{self.revision}" if self.revision else "")
                + (f"/{self.subfolder}" if self.subfolder else ""))

def expand_steps(steps, where: str) -> list:
    "A list of steps, or range(start, stop + 1, every) of a {start, stop, every} mapping."
    if isinstance(steps, dict):
        try: return list(range(steps["start"], steps["stop"] + 1, steps["every"]))
        except KeyError as e: raise SweepError(f"{where}: steps needs start, stop and every; missing {e}") from None
    return list(steps)


# %% [markdown]
# `run_steps` reads a pretraining run's own configuration to turn `final` and `scheduled` into step
# numbers, so a grid follows the run it points at (the rehearsal's 6-step runs and the papers'
# 6,000-step runs alike) instead of hard-coding 6000. A run that has not been started has no
# configuration yet; its checkpoints are then reported missing, with the command that makes them.

# %%
#| export
def run_steps(run_dir: Path, step, where: str) -> list[int]:
    "The checkpoint steps `step` (final | scheduled | int | list) selects for the run in `run_dir`."
    if isinstance(step, int) and not isinstance(step, bool): return [step]
    if isinstance(step, list): return [int(s) for s in step]
    if step not in ("final", "scheduled"):
        raise SweepError(f"{where}: step {step!r} is not final, scheduled, a step or a list of steps")
    if not (run_dir / "config.yaml").is_file(): return []
    run_cfg = load_config(run_dir / "config.yaml")
    return [run_cfg.train.steps] if step == "final" else scheduled_steps(run_cfg.checkpoint, run_cfg.train.steps)

def run_checkpoints(entry: dict, where: str, runs_dir="runs", pretraining_seeds=(DEFAULT_SEED,),
                    released=None) -> list[Checkpoint]:
    ("The checkpoints of one run entry of a grid, for every pretraining seed (or the authors' release: `released`, "
     "a ReleasedHub).")
    unknown = set(entry) - RUN_KEYS
    if unknown: raise SweepError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(RUN_KEYS)}")
    for key in ("arm", "size"):
        if key not in entry: raise SweepError(f"{where}: a run entry needs `{key}`")
    if entry["arm"] not in ARMS: raise SweepError(f"{where}: arm {entry['arm']!r} is not one of {', '.join(ARMS)}")
    if "hub" in entry or "checkpoint" in entry: return external_checkpoints(entry, where)
    if released is not None: return released_checkpoints(entry, where, released)
    out = []
    for seed in pretraining_seeds:
        name = run_name(entry["size"], entry["arm"], seed, entry.get("family"))
        run_dir = Path(runs_dir) / name
        steps = run_steps(run_dir, entry.get("step", "final"), where) or [None]
        selector = str(entry.get("step", "final"))
        out += [Checkpoint(name, entry["arm"], entry["size"],
                           str(run_dir / "checkpoints" / (step_dir_name(s) if s is not None else "<not pretrained>")),
                           step=s, selector=selector) for s in steps]
    return out

def external_checkpoints(entry: dict, where: str) -> list[Checkpoint]:
    "The checkpoints of a Hub (`hub`) or local-directory (`checkpoint`) run entry, labelled by its `run`."
    if "run" not in entry: raise SweepError(f"{where}: a `hub` or `checkpoint` entry needs a `run` label")
    if "hub" in entry and "checkpoint" in entry: raise SweepError(f"{where}: give one of `checkpoint` (local) or `hub`")
    base = dict(run=entry["run"], arm=entry["arm"], size=entry["size"])
    steps = expand_steps(entry["steps"], where) if "steps" in entry else [None]
    fill = lambda v, step: v.format(step=step) if isinstance(v, str) and step is not None else v
    if "checkpoint" in entry:
        return [Checkpoint(**base, source=fill(entry["checkpoint"], s),
                           step=s if s is not None else step_of(entry["checkpoint"])) for s in steps]
    return [Checkpoint(**base, source=entry["hub"], revision=fill(entry.get("revision"), s),
                       subfolder=fill(entry.get("subfolder"), s), step=s, hub=True) for s in steps]


# %% [markdown]
# A job is one (checkpoint, head, regime, dataset, seed) under its grid's settings. Its key is every
# coordinate **and** every setting that changes its output (caps, `ner` overrides, test sets,
# whether predictions are saved), so two grids that finetune the same checkpoint differently are two
# jobs, and a job whose settings change is run again rather than taken as done.

# %%
#| export
@dataclasses.dataclass(frozen=True)
class Job:
    "One finetuning run of the sweep and the grid settings it runs under."
    checkpoint: Checkpoint
    head: str
    regime: str
    dataset: str
    seed: int
    settings: tuple  # sorted (key, JSON value) pairs of SETTING_KEYS

    @property
    def key(self) -> str:
        c = self.checkpoint
        settings = ",".join(f"{k}={v}" for k, v in self.settings)
        return "|".join(map(str, (c.run, c.name, self.head, self.regime, self.dataset, self.seed, settings)))

GRID_CHOICES = {f"{f.name}s": f.metadata["choices"] for f in dataclasses.fields(NERConfig)
                if f.name in ("head", "regime")}

def load_grid(path, runs_dir="runs", pretraining_seeds=(DEFAULT_SEED,), grid_overrides: dict | None = None, *,
              released=None) -> list[Job]:
    "Every job of a grid file, checkpoints expanded for each pretraining seed, in checkpoint order."
    path = Path(path)
    if not path.is_file(): raise SweepError(f"grid file {path} does not exist")
    try: spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e: raise SweepError(f"grid file {path} is not valid YAML: {e}") from None
    defaults, jobs = spec.get("defaults", {}), []
    for i, grid in enumerate(spec.get("grids", [])):
        where = f"{path}: grids[{i}]"
        g = {**defaults, **grid}
        for key, value in (grid_overrides or {}).items():
            g[key] = {**g.get(key, {}), **value} if key == "ner" else value
        unknown = set(g) - GRID_KEYS
        if unknown: raise SweepError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(GRID_KEYS)}")
        for key, allowed in GRID_CHOICES.items():  # the whole grid, before its first job runs
            if bad := [v for v in g.get(key, []) if v not in allowed]:
                raise SweepError(f"{where}.{key}: {bad[0]!r} is not one of {', '.join(allowed)}; nothing was run")
        settings = tuple(sorted((k, json.dumps(g[k], sort_keys=True)) for k in SETTING_KEYS if k in g))
        ckpts = [c for j, r in enumerate(g.get("runs", []))
                 for c in run_checkpoints(r, f"{where}.runs[{j}]", runs_dir, pretraining_seeds, released)]
        for c, head, regime, dataset, seed in itertools.product(ckpts, g.get("heads", ["linear"]),
                                                                g.get("regimes", ["head"]),
                                                                g.get("datasets", ["sk_snk"]), g.get("seeds", [0])):
            jobs.append(Job(c, head, regime, dataset, seed, settings))
    if not jobs: raise SweepError(f"{path}: the grid has no jobs (no `grids`, or a grid without runs)")
    return sorted(dict.fromkeys(jobs), key=lambda j: (j.checkpoint.name, j.dataset))

def check_checkpoints(jobs: list[Job]) -> None:
    "Raise SweepError naming every checkpoint that is missing, and how to make them, before any run starts."
    missing = []
    for c in dict.fromkeys(j.checkpoint for j in jobs):
        if not c.hub:
            if (Path(c.source) / "checkpoints").is_dir():
                latest = Path(c.source) / "checkpoints" / LATEST_FILE
                example = Path(c.source) / "checkpoints" / (latest.read_text().strip() if latest.is_file()
                                                            else "step_NNNNNN")
                raise SweepError(f"checkpoint {c.source} is a run directory, not a checkpoint: "
                                 f"name one of its checkpoints, e.g. {example}")
            if not all((Path(c.source) / f).is_file() for f in ("config.json", "model.safetensors")):
                missing.append(c.source)
            continue
        try: hf_hub_download(c.source, "config.json", subfolder=c.subfolder, revision=c.revision)
        except Exception as e: missing.append(f"{c.name} (Hub: {type(e).__name__})")
    if missing:
        raise SweepError(f"{len(missing)} missing checkpoint(s) (each needs config.json + model.safetensors): "
                         f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}. Pretrain those runs first "
                         "(python -m picomaml.pipeline <profile> --stages pretrain, or python -m picomaml.launch "
                         "--config configs/<preset>.yaml), or fix the grid's runs")


# %% [markdown]
# ## Do the grids cover what the reports read?
#
# The report notebooks declare what they read from the sweep (`picomaml.report.NER_READS`: head,
# regimes, datasets, which runs, which checkpoints, whether predictions are saved). `uncovered`
# expands those reads for a profile's sizes, arms and pretraining seeds and lists every cell no job of
# the grids produces, so a grid that forgets a cell fails a test instead of a figure panel saying
# "missing" after days of GPU time.

# %%
#| export
def uncovered(jobs: list[Job], reads: list[dict], sizes, seeds, family: str = "pico",
              sweep_size: str = "medium") -> list[str]:
    "Every cell the reads ask for that no job produces, as 'notebook: run head regime dataset step'."
    have = {(j.checkpoint.run, j.head, j.regime, j.dataset, j.checkpoint.selector,
             job_settings(j).get("save_predictions", False)) for j in jobs}
    gaps = []
    for read in reads:
        for size in (sizes if read["sizes"] == "all" else [sweep_size]):
            for arm, seed, regime, dataset in itertools.product(read["arms"], seeds, read["regimes"], read["datasets"]):
                name = run_name(size, arm, seed, family)
                wanted = [(name, read["head"], regime, dataset, read["step"], p)
                          for p in ((True,) if read.get("predictions") else (True, False))]
                if not have & set(wanted):
                    gaps.append(f"{read['notebook']}: {name} {read['head']} {regime} {dataset} {read['step']}")
    return gaps


# %% [markdown]
# ## Running the sweep
#
# Jobs run checkpoint by checkpoint, so each backbone is loaded once; for head-only jobs the frozen
# backbone's features of every split are computed once per checkpoint and shared by every head and
# seed. Splits are encoded once per sweep (capped by `max_train_sentences` / `max_eval_sentences`;
# the Philippine test sets of a job that saves its predictions are never capped, because paper 2's
# §4 analyses and App. B's case studies read those predictions sentence by sentence).
# A row holds the coordinates, the backbone's parameter count and the result record of
# `picomaml.ner_finetune` (dev F1 and its per-epoch curve; test micro-F1 default and strict and per-tag
# F1 per test set; t90, AUC, slope and the per-step loss curve). With
# `save_predictions`, the predicted tags and gold-tag probabilities of the Philippine test sets go
# to a side file named in the row. For each Philippine test set the row also holds the model's recall
# of the gold PER spans that follow a case particle (`particle_recall`, paper 2 Table 5).

# %%
#| export
def job_settings(job: Job) -> dict:
    "The grid settings of a job as values."
    return {k: json.loads(v) for k, v in job.settings}

def capped(sentences: list, cap: int | None, seed: int = 0) -> list:
    "At most `cap` sentences, a seeded sample in original order (so `all` draws from every set, not the first)."
    if not cap or len(sentences) <= cap: return sentences
    keep = sorted(random.Random(seed).sample(range(len(sentences)), cap))
    return [sentences[i] for i in keep]

def job_ner_config(job: Job, cfg, grid) -> NERConfig:
    "The NER settings a job runs under: the config's `ner` section with the grid's `ner` overrides."
    return apply_overrides(copy.deepcopy(cfg), {"ner": job_settings(job).get("ner", {})}, str(grid)).ner

def split_cap(job: Job, name: str, split: str) -> int | None:
    "How many sentences of a split a job reads (None: all): the grid's caps, except test sets it saves predictions of."
    st = job_settings(job)
    # paper 2 §4 reads these sentence by sentence
    if split == "test" and st.get("save_predictions") and name in PHILIPPINE: return None
    return st.get("max_train_sentences" if split == "train" else "max_eval_sentences")


def run_job(job: Job, backbone, ner_cfg, data, features, out: Path, *, device="cpu") -> dict:
    "Finetune and evaluate one job on `device`; return its row (on CUDA with the job's peak GiB)."
    st, t0 = job_settings(job), time.perf_counter()
    reset_peak_memory(device)
    cfg = dataclasses.replace(ner_cfg, head=job.head, regime=job.regime, train_sets=[job.dataset], seed=job.seed)
    shared = job.regime == "head" and cfg.cache_features
    feats = (lambda name: features(name)) if shared else (lambda name: None)
    train, dev = data(job.dataset, "train"), data(job.dataset, "dev")
    tagger, hist = finetune(backbone, train, dev, cfg, train_feats=feats((job.dataset, "train")),
                            dev_feats=feats((job.dataset, "dev")), device=device)
    tests, side, particles = {}, {}, {}
    for name in st.get("test_sets") or list(TEST_SETS):
        split = data(name, "test")
        pred = predict(tagger, split, feats((name, "test")), cfg.batch_size)
        tests[name] = score([s.tags for s in split.sentences], pred)
        if name in PHILIPPINE: particles[name] = {**particle_recall(split.sentences, pred, particles=cfg.particles),
                                                  "particles": cfg.particles}
        if st.get("save_predictions") and name in PHILIPPINE:
            side[name] = {"words": [s.words for s in split.sentences],
                          "tags": [s.tags for s in split.sentences], "pred": pred,
                          "gold_prob": gold_tag_probabilities(tagger, split, feats((name, "test")), cfg.batch_size)}
    c = job.checkpoint
    row = {"key": job.key, "pretraining_run": c.run, "arm": c.arm, "size": c.size, "checkpoint": c.name, "step": c.step,
           "head": job.head, "regime": job.regime, "dataset": job.dataset, "seed": job.seed,
           "params": count_parameters(backbone.cfg), "device": str(tagger.device), "precision": tagger.precision,
           **result_record(hist, tests)}
    if particles: row["particle_recall"] = particles
    if side:
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_",
                          f"{c.run}-{c.step}-{job.head}-{job.regime}-{job.dataset}-{job.seed}")
        path = (out.parent / f"{out.stem}-predictions"
                / f"{readable}-{hashlib.sha1(job.key.encode()).hexdigest()[:10]}.json")
        write_json_atomic(path, side, indent=None)
        row["predictions"] = str(path.relative_to(out.parent))  # relative to the results file, wherever it moves
    row["seconds"] = time.perf_counter() - t0
    if (peak := peak_memory_gib(device)) is not None: row["peak_gib"] = peak
    return row


# %% [markdown]
# ## The data statistics beside the results
#
# Paper 2's Tables 4 and 5 describe the data (span statistics of the finetuning set; particle share
# and OOV rate of the zero-shot languages), and the report notebook reads outputs, not the UNER
# reader. So before it runs any job the sweep writes `picomaml.ner_data.uner_statistics` beside its
# results, as `<results stem>-uner-statistics.json`, for every finetuning set of the grid and every
# zero-shot language whose test sets the grid evaluates. They are computed on the whole splits, not
# the sweep's capped samples (they describe the data sets), and only when the file lacks one of them.

# %%
#| export
def statistics_path(out) -> Path:
    "The UNER statistics file of the results file `out`: `<out stem>-uner-statistics.json` beside it."
    return Path(out).parent / f"{Path(out).stem}-uner-statistics.json"

def write_uner_statistics(out, jobs: list[Job], ner_cfg) -> None:
    "Write (or complete) the UNER statistics of the jobs' finetuning sets and zero-shot languages beside `out`."
    path = statistics_path(out)
    have = json.loads(path.read_text()) if path.is_file() else {"finetuning": {}, "zero_shot": {}}
    tested = {t for j in jobs for t in (job_settings(j).get("test_sets") or TEST_SETS)}
    sources = sorted({j.dataset for j in jobs})
    languages = [name for name, sets in ZERO_SHOT_LANGUAGES.items() if set(sets) <= tested]
    current = lambda l: have["zero_shot"].get(l, {}).get("particles", {}).get("particles") == list(ner_cfg.particles)
    if set(sources) <= set(have["finetuning"]) and all(set(sources) <= set(have["zero_shot"].get(l, {}).get("oov", {}))
                                                       and current(l) for l in languages):
        return
    train = {d: load_split(d, "train", ner_cfg) for d in sources}
    zero_shot = {name: [s for t in ZERO_SHOT_LANGUAGES[name] for s in load_split(t, "test", ner_cfg)]
                 for name in languages}
    new = uner_statistics(train, zero_shot, ner_cfg.particles)
    write_json_atomic(path, {k: {**have[k], **new[k]} for k in new}, indent=None)


# %%
_pool = [f"da{i}" for i in range(50)] + [f"sk{i}" for i in range(50)]
_sample = capped(_pool, 20, seed=0)
assert len(_sample) == 20 and _sample == capped(_pool, 20, seed=0) and _sample == sorted(_sample, key=_pool.index)
assert any(x.startswith("da") for x in _sample) and any(x.startswith("sk") for x in _sample)
assert capped(_pool, None) is _pool and capped(_pool, 500) is _pool


# %% [markdown]
# Before the first job runs, every job's windows are checked against the positions its checkpoint
# was trained with: `ner.max_len` sub-tokens must fit the backbone's `max_seq_len`, which a trained
# model cannot be given more of, so the grid or the command line has to ask for shorter windows.

# %%
#| export
def trained_positions(c: Checkpoint) -> int:
    "The max_seq_len a checkpoint was trained with, from its config.json (a Hub checkpoint's is fetched, and cached)."
    path = (hf_hub_download(c.source, "config.json", subfolder=c.subfolder, revision=c.revision) if c.hub
            else Path(c.source) / "config.json")
    return config_from_json(json.loads(Path(path).read_text()), str(path)).max_seq_len

def check_windows(jobs: list[Job], cfg, grid) -> None:
    "SweepError naming the first job whose ner.max_len exceeds its checkpoint's max_seq_len, before any job runs."
    positions = {c: trained_positions(c) for c in dict.fromkeys(j.checkpoint for j in jobs)}
    for job in jobs:
        if (max_len := job_ner_config(job, cfg, grid).max_len) > (trained := positions[job.checkpoint]):
            raise SweepError(f"ner.max_len={max_len} is longer than the {trained} positions checkpoint "
                             f"{job.checkpoint.source} was trained with (its model.max_seq_len): "
                             f"set ner.max_len={trained} or lower, in the grid's `ner` or on the command line; "
                             "nothing was run")


# %%
#| export
def sweep_jobs(grid, out: Path, cfg, runs_dir, pretraining_seeds, grid_overrides, *, setup: bool = True,
               released=None) -> list[Job]:
    ("Every job of the grid, its checkpoints and windows checked; `setup` (one process per launch) also writes the "
     "UNER statistics, cuts a torn tail.")
    jobs = load_grid(grid, runs_dir, pretraining_seeds, grid_overrides, released=released)
    check_checkpoints(jobs)
    check_windows(jobs, cfg, grid)
    if setup:
        write_uner_statistics(out, jobs, cfg.ner)
        drop_torn_tail(out)
    return jobs

def run_sweep(grid, out, preset=None, overrides=(), *, limit: int | None = None, encode=None, runs_dir="runs",
              pretraining_seeds=(DEFAULT_SEED,), grid_overrides: dict | None = None, device="cpu",
              worker: tuple | None = None, released=None) -> int:
    ("Run every unfinished job of a grid file on `device`, appending rows to `out`; returns how many ran. "
     "`worker`: (index, count, claims).")
    cfg, out, device = load_config(preset, overrides), Path(out), torch.device(device)
    if worker is None: ensure_writable(out.parent, "--out")  # before its lock file is made there
    # its workers append under it
    lock = nullcontext() if worker else exclusive_lock(lock_file_of(out), f"results file {out}")
    with lock:
        jobs = sweep_jobs(grid, out, cfg, runs_dir, pretraining_seeds, grid_overrides, setup=worker is None,
                          released=released)
        done = {r["key"] for r in read_rows(out)}
        todo = [j for j in (jobs if worker is None else worker_order(jobs, *worker[:2])) if j.key not in done]
        encode = encode or load_tokenizer(cfg.data).encode
        encoded, features, loaded, ran = {}, {}, {}, 0
        for job in tqdm(todo, desc=f"NER sweep ({len(done)} of {len(jobs)} done)", disable=worker is not None):
            if limit is not None and ran >= limit: break
            # another worker of this launch has it
            if worker is not None and not claim(worker[2], job, worker[0]): continue
            ner_cfg = job_ner_config(job, cfg, grid)
            def data(name, split, job=job, ner_cfg=ner_cfg):
                cap = split_cap(job, name, split)
                key = (name, split, cap, ner_cfg.max_len)
                if key not in encoded:
                    encoded[key] = encode_split(capped(load_split(name, split, ner_cfg), cap), encode, ner_cfg.max_len,
                                                f"{name}/{split}")
                return encoded[key]
            if job.checkpoint not in loaded:
                c = job.checkpoint
                loaded.clear(); features.clear()
                loaded[c] = (load_backbone(c.source, c.revision, c.subfolder) if c.hub
                             else load_backbone(c.source)).to(device)  # verified
            backbone = loaded[job.checkpoint]
            def feats(name_split, data=data, ner_cfg=ner_cfg):
                key = (*name_split, data(*name_split).name, len(data(*name_split).windows))
                if key not in features:
                    tagger = NERTagger(backbone, device=device, precision=ner_cfg.precision)
                    features[key] = window_features(tagger, data(*name_split), ner_cfg.batch_size)
                return features[key]
            row = run_job(job, backbone, ner_cfg, data, feats, out, device=device)
            append_records(out, [row], sort_keys=True)
            ran += 1
            if worker is not None: print(f"[worker {worker[0]} on {device}] {job.key.split('|', 1)[0]} {job.head} "
                                         f"{job.regime} {job.dataset}: dev F1 {row['dev_f1']:.3f}, "
                                         f"{row['seconds']:.0f} s", flush=True)
        return ran


# %% [markdown]
# ## One worker per GPU
#
# The paper grids are 2 × 160 jobs, half of them full finetuning of backbones up to 570M parameters:
# one process on one GPU of a four-GPU node would leave three idle. With several devices the command
# starts one **worker process per device** (`--workers`, by default one per visible GPU), each running
# the same sweep on its own device and appending to the same results file. Workers share out the jobs
# by **claims**: before a job, a worker creates its claim file in the launch's claims directory with an
# exclusive create (`O_EXCL`, atomic on a local or NFS file system), and skips jobs another worker
# claimed. Each worker tries the checkpoints in its own order (the list of checkpoints rotated by its
# index), so workers start on different backbones, load each one once and share its head-only
# features, and only meet on a checkpoint when the others are done. Rows are appended under the
# file's lock (above). The claims directory belongs to one launch: a relaunch (after a worker was
# killed, or the node was lost) makes a new one and removes the old ones, so a job whose worker died
# mid-job is not blocked: it has no row, and the relaunch runs it. A worker also exits when the
# process that started it is gone, so a killed sweep leaves no orphan writing into the file.

# %%
#| export
def claim(claims: Path, job: Job, worker: int) -> bool:
    "Take `job` for `worker` unless another worker of this launch has (an exclusive create of its claim file)."
    try: fd = os.open(Path(claims) / hashlib.sha1(job.key.encode()).hexdigest(),
                      os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError: return False
    with os.fdopen(fd, "w") as f: f.write(f"worker {worker} on {socket.gethostname()}, pid {os.getpid()}: {job.key}\n")
    return True

def worker_order(jobs: list[Job], worker: int, workers: int) -> list[Job]:
    ("The jobs in the order worker `worker` of `workers` tries them: the checkpoints rotated so workers start on "
     "different backbones.")
    groups = [list(group) for _, group in itertools.groupby(jobs, key=lambda j: j.checkpoint)]
    first = worker * len(groups) // workers
    return [j for group in groups[first:] + groups[:first] for j in group]


# %%
_ck = lambda name: Checkpoint(name, "maml", "tiny", name)
_jobs = [Job(_ck(c), "linear", "head", d, 0, ()) for c in "abcd" for d in ("x", "y")]
assert ([j.checkpoint.run + j.dataset for j in worker_order(_jobs, 1, 2)]
        == ["cx", "cy", "dx", "dy", "ax", "ay", "bx", "by"])
with tempfile.TemporaryDirectory() as _claims:
    assert claim(_claims, _jobs[0], 0) and not claim(_claims, _jobs[0], 1) and claim(_claims, _jobs[1], 1)


# %% [markdown]
# Which devices: `--device auto` (the default) is every visible GPU when CUDA is usable, one worker
# each (or `--workers N` of them), else the CPU, said on one line; `--device cuda` insists on GPUs and
# stops with the reason when there are none (`00_device`); `--device cuda:K` is one worker on GPU K;
# `--device cpu --workers N` runs N CPU workers, each with its share of the cores.

# %%
#| export
def sweep_devices(requested: str, workers: int = 0, say=print, **facts) -> list[str]:
    "The device of each worker for `--device` and `--workers` (0: one per visible GPU, else one)."
    if requested not in ("auto", "cpu", "cuda") and not (requested.startswith("cuda:") and requested[5:].isdigit()):
        raise SweepError(f"--device {requested!r} is not one of {DEVICE_CHOICES}")
    if requested.startswith("cuda:"):
        if workers > 1:
            raise SweepError(f"--device {requested} is one GPU: give --device cuda --workers {workers} for several")
        require_cuda(int(requested[5:]) + 1, f"--device {requested}", "--device cpu", **facts)
        return [requested]
    problem = "" if requested == "cpu" else cuda_problem(max(workers, 1), **facts)
    if requested == "cuda" and problem: require_cuda(max(workers, 1), "--device cuda", "--device cpu", **facts)
    if requested == "cpu" or problem:
        if problem: say(f"[ner_sweep] no usable GPU ({problem}): running on the CPU")
        return ["cpu"] * max(workers, 1)
    return [f"cuda:{i}" for i in range(workers or facts.get("cuda", torch.cuda).device_count())]


# %%
from types import SimpleNamespace

_cuda = lambda n: SimpleNamespace(is_available=lambda: n > 0, device_count=lambda: n, init=lambda: None)
_gpus = dict(env={}, cuda_version="12.8", device_files=[Path("/dev/nvidia0")])
assert sweep_devices("auto", cuda=_cuda(4), **_gpus) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
assert (sweep_devices("cuda", 2, cuda=_cuda(4), **_gpus) == ["cuda:0", "cuda:1"]
        and sweep_devices("cuda:3", cuda=_cuda(4), **_gpus) == ["cuda:3"])
assert (sweep_devices("cpu", 2) == ["cpu", "cpu"]
        and sweep_devices("auto", say=lambda m: None, cuda=_cuda(0), env={}, device_files=[]) == ["cpu"])
raises(lambda: sweep_devices("cuda", cuda=_cuda(0), env={}, cuda_version="12.8", device_files=[]),
       "To run on CPU anyway: --device cpu")
raises(lambda: sweep_devices("gpu"), "--device 'gpu' is not one of")


# %% [markdown]
# The launch: the parent process checks the grid and the checkpoints, writes the UNER statistics and
# cuts a torn tail once, then starts the workers (`python -m picomaml.ner_sweep ... --device D
# --worker I,N,CLAIMS,PARENT_PID`, each logging to `<results stem>-workers/worker-I.log`), shows one
# progress bar over the rows they append, and waits. When a worker fails, the others finish their
# jobs; the command then stops with one line naming the worker and its log, every finished row kept.

# %%
#| export
def fresh_claims(out: Path) -> Path:
    ("A new claims directory for this launch beside `out`; the claims of earlier launches (dead or finished workers) "
     "are removed.")
    root = out.parent / f".{out.name}.claims"
    shutil.rmtree(root, ignore_errors=True)
    (root / uuid.uuid4().hex).mkdir(parents=True)
    return next(root.iterdir())

def watch_parent(parent_pid: int) -> None:
    "Exit this worker process when the process that started it is gone (a killed sweep leaves no orphans)."
    def watch():
        while os.getppid() == parent_pid: time.sleep(1)
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="watch-parent").start()

def run_workers(argv: list[str], devices: list[str], out: Path, total: int) -> int:
    "Run one sweep worker per device on the results file `out` and wait; returns how many rows they added."
    claims, logs, before = fresh_claims(out), out.parent / f"{out.stem}-workers", len(read_rows(out))
    logs.mkdir(parents=True, exist_ok=True)
    # CPU workers split the cores (unless the user set a count)
    cpu_share = str(max(1, (os.cpu_count() or 1) // len(devices)))
    threads = {} if "OMP_NUM_THREADS" in os.environ or devices[0] != "cpu" else {"OMP_NUM_THREADS": cpu_share}
    procs = [subprocess.Popen([sys.executable, "-m", "picomaml.ner_sweep", *argv, "--device", device, "--worker",
                               f"{i},{len(devices)},{claims},{os.getpid()}"],
                              stdout=open(logs / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT,
                              env={**os.environ, **threads}) for i, device in enumerate(devices)]
    with tqdm(total=total, initial=before,
              desc=f"NER sweep, {len(devices)} workers ({', '.join(dict.fromkeys(devices))})") as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(1)
            bar.update(len(read_rows(out)) - bar.n)
        bar.update(len(read_rows(out)) - bar.n)
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if failed:
        i, code = failed[0]
        last = ((logs / f"worker-{i}.log").read_text().strip().splitlines() or ["(no output)"])[-1]
        raise SweepError(f"{len(failed)} of {len(devices)} NER workers failed; worker {i} on {devices[i]} "
                         f"(exit {code}): {last} (its log: {logs / f'worker-{i}.log'}). The finished rows are kept: "
                         "relaunch the same command to run the rest")
    return len(read_rows(out)) - before


# %% [markdown]
# ## The authors' released checkpoints
#
# Most readers cannot pretrain the eight models (about 104 GPU-node hours) but can finetune them.
# With `--released` every run entry named by size and arm reads the authors' checkpoint on the Hub
# instead of a local run: `pico-lm/pico-maml-decoder-<size>` for the MAML arm and
# `pico-lm/pico-decoder-<size>` for the vanilla arm (`RELEASED_REPOS`). The final model is the
# repository's `main`. The per-step checkpoints are commits: pico-train pushes each checkpoint to a
# branch named after its run with the message "Saving HF Model -- Step N", so `step_revisions` reads
# the branch's commit history and maps each step to the newest commit that names it. `final` is
# `main`; `scheduled` is every step the branch holds; a step or a list of steps must be on the branch.
# Each result row's `checkpoint` is `<repo>@<commit>`: which revision it used. A compute node without
# the Hub reads a local mirror instead (`--released DIR`, `ReleasedMirror`): `DIR/<repo>/` holds the
# final model and `DIR/<repo>/step_<N>/` each step, as `huggingface-cli download <repo> --local-dir
# DIR/<repo>` and, with the commit of step N from the branch's history, `--revision <commit>
# --local-dir DIR/<repo>/step_<N>` write them; rows then name the directory they read. The run label is the
# one a local run of that size and arm would have (`pico-medium-maml`), so the analysis notebooks read
# released and local results alike. `ReleasedHub` holds the Hub client (`HfApi`, or a stand-in in
# the tests) and which branch of each repo holds the steps (`branches`; by default the repository's
# only branch besides `main`).

# %%
#| export
RELEASED_REPOS = {"maml": "pico-lm/pico-maml-decoder-{size}", "vanilla": "pico-lm/pico-decoder-{size}"}
STEP_COMMIT = re.compile(r"Saving HF Model -- Step (\d+)")  # pico-train's commit message for each checkpoint it pushes

@dataclasses.dataclass
class ReleasedHub:
    "The authors' released checkpoints: a Hub client (HfApi or a stand-in), the branch of each repo holding its steps."
    api: object
    branches: dict = dataclasses.field(default_factory=dict)  # repo -> branch (default: its only branch besides main)

    def branch(self, repo: str) -> str:
        "The branch pico-train pushed the run's checkpoints to."
        if repo in self.branches: return self.branches[repo]
        names = [b.name for b in self.api.list_repo_refs(repo).branches if b.name != "main"]
        if len(names) != 1:
            raise SweepError(f"{repo} has {len(names)} branches besides main ({', '.join(names) or 'none'}): "
                             f"name the one with the run's checkpoints (ReleasedHub.branches)")
        return names[0]

    def step_revisions(self, repo: str) -> dict[int, str]:
        "{step: commit id} of the checkpoints on the repo's branch (the newest commit that names a step)."
        found = {}
        for commit in self.api.list_repo_commits(repo, revision=self.branch(repo)):  # newest first
            if m := STEP_COMMIT.search(commit.title or ""): found.setdefault(int(m[1]), commit.commit_id)
        return dict(sorted(found.items()))

    def source(self, repo: str, revision: str) -> dict:
        "Where a checkpoint of `repo` at `revision` is read from."
        return dict(source=repo, revision=revision, hub=True)

@dataclasses.dataclass
class ReleasedMirror:
    "The released checkpoints copied locally: `<root>/<repo>/` (main) and `<root>/<repo>/step_<N>/` (each step)."
    root: Path

    def branch(self, repo: str) -> str: return f"the local mirror {Path(self.root) / repo}"

    def step_revisions(self, repo: str) -> dict[int, str]:
        "{step: directory name} of the step checkpoints the mirror holds."
        return {s: p.name for p in sorted((Path(self.root) / repo).glob("step_*"))
                if (s := step_of(p.name)) is not None}

    def source(self, repo: str, revision: str) -> dict:
        return dict(source=str(Path(self.root) / repo / ("" if revision == "main" else revision)))

def released_checkpoints(entry: dict, where: str, released: ReleasedHub) -> list[Checkpoint]:
    "The released checkpoints of a run entry named by size and arm (final: main; scheduled, a step or steps: commits)."
    repo, step = RELEASED_REPOS[entry["arm"]].format(size=entry["size"]), entry.get("step", "final")
    base = dict(run=run_name(entry["size"], entry["arm"]), arm=entry["arm"], size=entry["size"], selector=str(step))
    if step == "final": return [Checkpoint(**base, **released.source(repo, "main"))]
    revisions = released.step_revisions(repo)
    steps = list(revisions) if step == "scheduled" else run_steps(Path(), step, where)
    absent = [s for s in steps if s not in revisions]
    if absent or not steps:
        raise SweepError(f"{where}: {repo} (branch {released.branch(repo)}) has no checkpoint of step(s) "
                         f"{absent or step}; its steps: {', '.join(map(str, revisions)) or 'none'}")
    return [Checkpoint(**base, **released.source(repo, revisions[s]), step=s) for s in steps]


# %% [markdown]
# ## What a grid costs
#
# Before a sweep on the papers' models, or on the authors' checkpoints, runs for hours, `grid_cost`
# says what its jobs read and compute: the distinct checkpoints (their float32 weights, 4 bytes a
# parameter, downloaded or read once each), the backbone's FLOPs counted as the planner counts them
# (`picomaml.plan`: 2·N per token forward, 6·N forward and backward, plus attention over the window,
# no output layer), and the optimizer steps of the head-only jobs. Head-only jobs on one checkpoint
# share one backbone pass over each split they read (the sweep's feature cache), and their time is
# then the head's own steps, which FLOPs do not measure (a CRF's forward algorithm is sequential in
# the sentence length). Full finetuning runs forward and backward over its training split each
# epoch, a forward over dev each epoch and every `ner.dev_every` steps, then a forward over each test
# set. Every job is counted at `ner.epochs` epochs: early stopping can only shorten it, so the FLOPs are
# an upper bound. A split's size is its sentences under the grid's caps and their sub-tokens:
# `split_size` counts the words and measures the tokenizer's sub-tokens per word on a seeded sample.

# %%
#| export
@dataclasses.dataclass(frozen=True)
class SplitSize:
    "Sentences and backbone sub-tokens of one split as a job reads it (under the grid's caps)."
    sentences: int
    tokens: int

def split_size(name: str, split: str, cap: int | None, ner_cfg: NERConfig, encode, sample: int = 256) -> SplitSize:
    "A split's size under a cap: its words counted, sub-tokens per word measured on a seeded sample of sentences."
    sentences = capped(load_split(name, split, ner_cfg), cap)
    probe = capped(sentences, sample, seed=1)
    per_word = (sum(len(t) for s in probe for t in encode_words(s.words, encode))
                / max(1, sum(len(s.words) for s in probe)))
    return SplitSize(len(sentences), round(per_word * sum(len(s.words) for s in sentences)))

def pass_flops(mc, size: SplitSize, backward: bool = False) -> float:
    "FLOPs of one backbone pass over a split (forward, or forward and backward) in windows of its mean length."
    window = size.tokens / max(1, size.sentences)
    return episode_flops(mc, 0, size.tokens, window) if backward else episode_flops(mc, size.tokens, 0, window)


# %%
#| export
@dataclasses.dataclass
class GridCost:
    "What a grid's jobs read and compute, at most."
    jobs: int
    checkpoints: int
    checkpoint_bytes: int  # float32 weights of the distinct checkpoints
    flops: float  # backbone FLOPs: the head-only jobs' shared feature passes and full finetuning at `ner.epochs` epochs
    head_steps: int  # optimizer steps of the head-only jobs' heads, at `ner.epochs` epochs

def job_tests(job: Job) -> list[str]:
    "The test sets a job evaluates."
    return job_settings(job).get("test_sets") or list(TEST_SETS)

def grid_cost(jobs: list[Job], ner_of, size_of, model_of) -> GridCost:
    ("The cost of `jobs`: ner_of(job) -> NERConfig, size_of(job, name, split) -> SplitSize, "
     "model_of(checkpoint) -> ModelConfig.")
    shared, flops, head_steps = set(), 0.0, 0
    for job in jobs:
        ner, mc = ner_of(job), model_of(job.checkpoint)
        train, dev = size_of(job, job.dataset, "train"), size_of(job, job.dataset, "dev")
        steps = -(-train.sentences // ner.batch_size)  # an epoch's optimizer steps
        reads = [(job.dataset, "train"), (job.dataset, "dev"), *((t, "test") for t in job_tests(job))]
        if job.regime == "head":
            head_steps += ner.epochs * steps
            for name, split in reads:  # one shared pass per checkpoint and split as this job reads it
                key = (job.checkpoint, name, split, size_of(job, name, split))
                if key not in shared: shared.add(key); flops += pass_flops(mc, key[-1])
            continue
        dev_passes = 1 + (steps // ner.dev_every if ner.dev_every else 0)
        flops += ner.epochs * (pass_flops(mc, train, backward=True) + dev_passes * pass_flops(mc, dev))
        flops += sum(pass_flops(mc, size_of(job, t, "test")) for t in job_tests(job))
    checkpoints = dict.fromkeys(j.checkpoint for j in jobs)
    return GridCost(len(jobs), len(checkpoints), sum(4 * count_parameters(model_of(c)) for c in checkpoints), flops,
                    head_steps)


# %% [markdown]
# Known answers on a toy grid: two head-only jobs (both heads) on one checkpoint share one forward pass
# over each split; a full-finetuning job pays forward and backward over train and a dev pass each epoch,
# then its test set. A real split's size is exact when the sample holds the whole capped split.

# %%
from picomaml.config import DataConfig, ModelConfig
from picomaml.plan import _block_params

_mc = ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128)
_ck = Checkpoint("r", "maml", "tiny", "/ckpt")
_settings = (("test_sets", json.dumps(["tl_trg"])),)
_toy = [Job(_ck, head, regime, "sk_snk", 0, _settings)
        for head, regime in (("linear", "head"), ("crf", "head"), ("linear", "full"))]
_sizes = {"train": SplitSize(10, 100), "dev": SplitSize(4, 40), "test": SplitSize(2, 20)}
_ner = dataclasses.replace(NERConfig(), batch_size=4, epochs=2, dev_every=0)
_cost = grid_cost(_toy, lambda job: _ner, lambda job, name, split: _sizes[split], lambda c: _mc)
_forward = lambda tokens: tokens * (2 * _block_params(_mc) + 4 * 32 * 10)  # windows of 10 sub-tokens, one block
assert _cost.flops == _forward(100 + 40 + 20) + 2 * (3 * _forward(100) + _forward(40)) + _forward(20)
assert ((_cost.jobs, _cost.checkpoints, _cost.head_steps) == (3, 1, 2 * 2 * 3)
        and _cost.checkpoint_bytes == 4 * count_parameters(_mc))
_with_dev_every = grid_cost(_toy[2:], lambda job: dataclasses.replace(_ner, dev_every=1),
                            lambda job, name, split: _sizes[split], lambda c: _mc)
# 3 steps an epoch: 3 more dev passes
assert _with_dev_every.flops == 2 * (3 * _forward(100) + 4 * _forward(40)) + _forward(20)

os.environ.setdefault("PICOMAML_DATA", str(Path("../../shared/data").resolve()))
_encode = load_tokenizer(DataConfig()).encode
_sk = capped(load_split("sk_snk", "train", NERConfig()), 100)
_size = split_size("sk_snk", "train", 100, NERConfig(), _encode)
assert _size == SplitSize(100, sum(len(t) for s in _sk for t in encode_words(s.words, _encode)))


# %% [markdown]
# `plan_grid` prices a grid file as the sweep would run it. For the authors' checkpoints it needs no
# Hub: `PlannedRelease` lists each repo's steps as the papers schedule them (every checkpoint step of
# the size's preset, as paper 2's checkpoint sweep reads them), and a Hub checkpoint's model is the
# papers' preset of its size. The time is the FLOPs over one GPU's peak at an MFU the user states
# (`--mfu`, by default 10 %: finetuning batches are 16 sentences of a few dozen sub-tokens, far from
# the large matmuls a pretraining step keeps busy; measure and pass your own).

# %%
#| export
@dataclasses.dataclass
class PlannedRelease:
    ("The released checkpoints as the papers schedule them (every checkpoint step of the size's preset), "
     "for a plan without the Hub.")
    def branch(self, repo: str) -> str: return "the papers' checkpoint schedule"

    def step_revisions(self, repo: str) -> dict[int, str]:
        cfg = load_config(PRESETS_DIR / f"pico-{repo.rsplit('-', 1)[1]}-maml.yaml")
        return {s: step_dir_name(s) for s in scheduled_steps(cfg.checkpoint, cfg.train.steps)}

    def source(self, repo: str, revision: str) -> dict: return dict(source=repo, revision=revision, hub=True)

def checkpoint_model(c: Checkpoint):
    ("The ModelConfig of a checkpoint: its config.json when local, else the papers' preset of its size "
     "(or the Hub's config.json).")
    if not c.hub: return config_from_json(json.loads((Path(c.source) / "config.json").read_text()),
                                          str(Path(c.source) / "config.json"))
    preset = PRESETS_DIR / f"pico-{c.size}-maml.yaml"
    if preset.is_file(): return load_config(preset).model
    path = hf_hub_download(c.source, "config.json", subfolder=c.subfolder, revision=c.revision)
    return config_from_json(json.loads(Path(path).read_text()), f"{c.name}/config.json")

def plan_grid(grid, cfg, runs_dir="runs", pretraining_seeds=(DEFAULT_SEED,), grid_overrides=None, *,
              released=None) -> GridCost:
    "The cost of every job of a grid file (done or not), its splits measured on the data the sweep reads."
    jobs, encode, sizes = (load_grid(grid, runs_dir, pretraining_seeds, grid_overrides, released=released),
                           load_tokenizer(cfg.data).encode, {})
    def size_of(job, name, split):
        key = (name, split, split_cap(job, name, split))
        if key not in sizes: sizes[key] = split_size(*key, cfg.ner, encode)
        return sizes[key]
    return grid_cost(jobs, lambda job: job_ner_config(job, cfg, grid), size_of, checkpoint_model)

def format_grid_cost(grid, cost: GridCost, tflops: float, mfu: float) -> str:
    "Three lines: what a grid reads, its backbone FLOPs and hours on one GPU, its head-only steps."
    hours = cost.flops / (tflops * 1e12 * mfu) / 3600
    return (f"{grid}: {cost.jobs:,} jobs on {cost.checkpoints} checkpoints "
            f"({cost.checkpoint_bytes / 1e9:.1f} GB of float32 weights to read)\n"
            f"  backbone: {cost.flops:.2e} FLOPs at most, {hours:.1f} h on one GPU at {mfu:.0%} MFU of {tflops:g} "
            f"TFLOP/s (divide by the GPUs: one worker each)\n"
            f"  heads: {cost.head_steps:,} optimizer steps of head-only jobs at most "
            "(the head's time, not in the FLOPs)")


# %%
_planned = PlannedRelease()
assert list(_planned.step_revisions("pico-lm/pico-decoder-medium"))[:3] == [0, 100, 200]
assert max(_planned.step_revisions("pico-lm/pico-decoder-medium")) == 6000
_medium = released_checkpoints({"arm": "maml", "size": "medium", "step": "scheduled"}, "g", _planned)
assert (len(_medium) == len(_planned.step_revisions("pico-lm/pico-maml-decoder-medium"))
        and checkpoint_model(_medium[0]).d_model == 768)
_line = format_grid_cost("g", GridCost(3, 1, 4e9, 989e12 * 0.1 * 3600, 12), 989, 0.1)
assert ("3 jobs on 1 checkpoints (4.0 GB" in _line and "1.0 h on one GPU at 10% MFU of 989 TFLOP/s" in _line
        and "12 optimizer" in _line)


# %% [markdown]
# ## Command line
#
# `python -m picomaml.ner_sweep --grid configs/sweeps/demo.yaml --out runs/ner/demo-results.jsonl
# [--runs-dir runs] [--pretraining-seeds 42 1] [--grid-overrides YAML] [--config preset] [--limit N]
# [--device auto|cpu|cuda|cuda:K] [--workers N] [ner.key=value ...]`. On a GPU node the default is one
# worker per GPU; `--device cpu` runs on the CPU anyway.

# %%
#| export
def parse_args(argv=None) -> argparse.Namespace:
    "Arguments of `python -m picomaml.ner_sweep`."
    p = argparse.ArgumentParser(prog="python -m picomaml.ner_sweep",
                                description="Run a NER finetuning sweep on the GPUs given (one worker each); "
                                            "finished rows are skipped on restart.")
    p.add_argument("--grid", required=True, help="grid file, e.g. configs/sweeps/demo.yaml")
    p.add_argument("--out", required=True, help="results table (JSON lines), e.g. runs/ner/demo-results.jsonl")
    p.add_argument("--config", default=None, help="Config preset (configs/*.yaml) for data and ner defaults")
    p.add_argument("--runs-dir", default="runs", help="where the pretraining runs of the grid's run entries live")
    p.add_argument("--pretraining-seeds", type=int, nargs="+", default=[DEFAULT_SEED],
                   help="pretraining seeds of the runs to finetune "
                        f"(run names carry -seed<k> unless k = {DEFAULT_SEED})")
    p.add_argument("--grid-overrides", default="",
                   help="YAML mapping applied over every grid, e.g. '{max_train_sentences: 8}'")
    p.add_argument("--released", nargs="?", const="hub", default=None, metavar="MIRROR",
                   help="finetune the authors' released checkpoints (pico-lm/pico-[maml-]decoder-<size>) "
                        "instead of local runs: from the Hub, or from MIRROR, a local directory holding "
                        "<repo>/ (main) and <repo>/step_<N>/")
    p.add_argument("--plan", action="store_true",
                   help="print what the grid reads and computes, and its hours on one GPU; run nothing")
    p.add_argument("--gpu-tflops", type=float, default=989,
                   help="--plan: dense bf16 peak TFLOP/s of one GPU (H100 989, A100 312)")
    p.add_argument("--mfu", type=float, default=0.1,
                   help="--plan: model FLOPs utilisation of finetuning (a guess: measure yours)")
    p.add_argument("--limit", type=int, default=None, help="run at most this many unfinished jobs (per worker)")
    p.add_argument("--device", default="auto",
                   help=f"{DEVICE_CHOICES}; auto: every visible GPU when CUDA is usable, else the CPU")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes, one per device (0: one per visible GPU, one on CPU)")
    # INDEX,COUNT,CLAIMS,PARENT_PID: set by the parent for its workers
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides such as ner.lr=1e-4")
    a = p.parse_args(argv)
    if a.workers < 0: p.error("--workers must be 0 (one per visible GPU) or positive")
    if a.gpu_tflops <= 0 or not 0 < a.mfu <= 1:
        raise SweepError(f"--gpu-tflops must be positive and --mfu in (0, 1]; got {a.gpu_tflops}, {a.mfu}")
    if a.limit is not None and a.limit < 0:
        raise SweepError(f"--limit {a.limit}: must be 0 or more (how many unfinished jobs to run)")
    return a

def worker_arguments(a: argparse.Namespace) -> list[str]:
    "The command line of a worker: the sweep's own arguments, without its devices."
    optional = [("--config", a.config), ("--grid-overrides", a.grid_overrides or None), ("--limit", a.limit)]
    return ["--grid", str(a.grid), "--out", str(a.out), "--runs-dir", str(a.runs_dir),
            "--pretraining-seeds", *map(str, a.pretraining_seeds),
            *(item for key, value in optional if value is not None for item in (key, str(value))),
            *(["--released", a.released] if a.released else []), *a.overrides]

def main(argv=None) -> None:
    "Command-line entry point: one process, or one worker process per device."
    configure_cuda_allocator()  # before anything touches a GPU
    a = parse_args(argv)
    try: grid_overrides = yaml.safe_load(a.grid_overrides) if a.grid_overrides else None
    except yaml.YAMLError as e: raise SweepError(f"--grid-overrides is not valid YAML: {e}") from None
    sweep = dict(limit=a.limit, runs_dir=a.runs_dir, pretraining_seeds=a.pretraining_seeds,
                 grid_overrides=grid_overrides,
                 released=(None if a.released is None else ReleasedHub(HfApi()) if a.released == "hub"
                           else ReleasedMirror(Path(a.released))))
    if a.plan:
        released = PlannedRelease() if a.released == "hub" else sweep["released"]
        cost = plan_grid(a.grid, load_config(a.config, a.overrides), a.runs_dir, a.pretraining_seeds, grid_overrides,
                         released=released)
        return print(format_grid_cost(a.grid, cost, a.gpu_tflops, a.mfu), flush=True)
    if a.worker:
        index, count, claims, parent = a.worker.split(",")
        watch_parent(int(parent))
        n = run_sweep(a.grid, a.out, a.config, a.overrides, device=a.device,
                      worker=(int(index), int(count), Path(claims)), **sweep)
        return print(f"worker {index}: {n} runs finished", flush=True)
    devices = sweep_devices(a.device, a.workers)
    if len(devices) == 1: n = run_sweep(a.grid, a.out, a.config, a.overrides, device=devices[0], **sweep)
    else:
        cfg, out = load_config(a.config, a.overrides), Path(a.out)
        ensure_writable(out.parent, "--out")
        with exclusive_lock(lock_file_of(out), f"results file {out}"):  # the workers append under the launch's lock
            jobs = sweep_jobs(a.grid, out, cfg, a.runs_dir, a.pretraining_seeds, grid_overrides,
                              released=sweep["released"])
            done = {r["key"] for r in read_rows(out)}
            n = run_workers(worker_arguments(a), devices, out, len(jobs)) if any(j.key not in done for j in jobs) else 0
    print(f"{n} runs finished; results in {a.out}")

if __name__ == "__main__" and "__file__" in globals(): run_command(main)

# %%
_args = parse_args(["--grid", "g.yaml", "--out", "r.jsonl", "--device", "cuda", "--workers", "4", "--limit", "2",
                    "ner.lr=1e-4"])
assert worker_arguments(_args) == ["--grid", "g.yaml", "--out", "r.jsonl", "--runs-dir", "runs",
                                   "--pretraining-seeds", "42", "--limit", "2", "ner.lr=1e-4"]

# %% [markdown]
# ## A tiny sweep end to end
#
# Two checkpoints of a tiny PicoDecoder written like a training run's (`checkpoints/step_N` and
# `latest`), a grid over both heads with a step glob, capped data. A first call with `limit=3`
# stands in for a killed sweep; the second call runs only the rest and no key appears twice. A
# grid naming a missing checkpoint fails before anything runs.

# %%
from picomaml.config import ModelConfig, save_config
from picomaml.model import PicoDecoder, save_pretrained
from picomaml.ner_data import Sentence, oov_rate, span_statistics

os.environ.setdefault("PICOMAML_DATA", str(Path("../../shared/data").resolve()))
_sweep_dir = tempfile.TemporaryDirectory()
tmp = Path(_sweep_dir.name)
torch.manual_seed(0)
tiny = PicoDecoder(ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128))
run = tmp / "runs" / run_name("tiny", "maml", 7)
save_config(load_config(None, ["train.steps=100", "checkpoint.every=100"]), run / "config.yaml")
for step in (0, 100): save_pretrained(tiny, run / f"checkpoints/step_{step:06d}")
grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "lr": 1e-2, "batch_size": 4}, "max_train_sentences": 16,
                     "max_eval_sentences": 8, "test_sets": ["sk_snk", "tl_trg", "tl_ugnayan"],
                     "save_predictions": True},
        "grids": [{"heads": ["linear", "crf"], "regimes": ["head"], "datasets": ["sk_snk"],
                   "runs": [{"arm": "maml", "size": "tiny", "step": "scheduled"}]}]}
(tmp / "g.yaml").write_text(yaml.safe_dump(grid))
sweep = dict(runs_dir=tmp / "runs", pretraining_seeds=[7])
jobs = load_grid(tmp / "g.yaml", **sweep)
assert (len(jobs) == 4 and sorted({j.checkpoint.step for j in jobs}) == [0, 100]
        and {j.checkpoint.run for j in jobs} == {"pico-tiny-maml-seed7"})
# step: final
assert [c.step for c in run_checkpoints({"arm": "maml", "size": "tiny"}, "x", tmp / "runs", [7])] == [100]

# %% [markdown]
# A sweep stopped after three jobs, then restarted: the restart runs the fourth only, and each row
# carries its F1 on every test set, its loss curve and the backbone's size.

# %%
out = tmp / "results.jsonl"
assert run_sweep(tmp / "g.yaml", out, limit=3, **sweep) == 3 and len(read_rows(out)) == 3
assert run_sweep(tmp / "g.yaml", out, **sweep) == 1
rows = read_rows(out)
assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
r = rows[0]
assert (set(r["test_f1"]) == {"sk_snk", "tl_trg", "tl_ugnayan"} and len(r["loss_curve"]) == r["steps"]
        and r["params"] == count_parameters(tiny.cfg))
rows[0]["key"], rows[0]["dev_f1"], rows[0]["t90"]

# %% [markdown]
# The saved predictions cover each Philippine test set whole (not the cap of 8 sentences), and the
# row's particle recall is the one recomputed from them.

# %%
side = json.loads((out.parent / r["predictions"]).read_text())
tl_trg = load_split("tl_trg", "test", load_config().ner)
assert (set(side) == {"tl_trg", "tl_ugnayan"}
        and len(side["tl_trg"]["pred"]) == len(side["tl_trg"]["words"]) == len(tl_trg) > 8)
tl_sentences = [Sentence(w, t) for w, t in zip(side["tl_trg"]["words"], side["tl_trg"]["tags"])]
# NaN-safe: a NaN read back is another NaN
same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
assert (same(r["particle_recall"]["tl_trg"],
             {**particle_recall(tl_sentences, side["tl_trg"]["pred"]), "particles": ["si", "ni"]})
        and set(r["particle_recall"]) == {"tl_trg", "tl_ugnayan"})
assert all(0 < p < 1 for p in side["tl_trg"]["gold_prob"][0])

# %% [markdown]
# The statistics file describes the whole splits, not the sweep's capped samples.

# %%
stats = json.loads(statistics_path(out).read_text())
sk_train, tagalog = (load_split("sk_snk", "train", load_config().ner),
                     tl_trg + load_split("tl_ugnayan", "test", load_config().ner))
assert (same(stats["finetuning"], {"sk_snk": {"sentences": len(sk_train), "spans": span_statistics(sk_train)}})
        and len(sk_train) > 16)
assert list(stats["zero_shot"]) == ["tl_trg+tl_ugnayan"]
assert same(stats["zero_shot"]["tl_trg+tl_ugnayan"]["particles"],
            {**particle_recall(tagalog), "particles": ["si", "ni"]})
assert stats["zero_shot"]["tl_trg+tl_ugnayan"]["oov"] == {"sk_snk": oov_rate(tagalog, sk_train)}

# %% [markdown]
# Other settings make a new job; a missing run, a run directory given as a checkpoint, a misspelt
# head and a window longer than the checkpoint's positions each fail before anything runs.

# %%
#| hide
assert run_sweep(tmp / "g.yaml", out, grid_overrides={"max_train_sentences": 8}, limit=1, **sweep) == 1
grid["grids"][0]["runs"].append({"arm": "vanilla", "size": "tiny", "step": "final"})
(tmp / "g.yaml").write_text(yaml.safe_dump(grid))
e = raises(lambda: run_sweep(tmp / "g.yaml", tmp / "other.jsonl", **sweep), kind=SweepError)
assert "pico-tiny-vanilla-seed7" in str(e) and "--stages pretrain" in str(e) and not (tmp / "other.jsonl").exists()
grid["grids"][0]["runs"] = [{"run": "mine", "arm": "maml", "size": "tiny", "checkpoint": str(run)}]
(tmp / "g.yaml").write_text(yaml.safe_dump(grid))
raises(lambda: run_sweep(tmp / "g.yaml", tmp / "other.jsonl", **sweep), f"{run} is a run directory, not a checkpoint")
grid["grids"][0]["heads"] = ["linear", "crff"]
(tmp / "g.yaml").write_text(yaml.safe_dump(grid))
raises(lambda: load_grid(tmp / "g.yaml", **sweep),
       "g.yaml: grids[0].heads: 'crff' is not one of linear, crf; nothing was run")
grid["grids"][0].update(heads=["linear"], runs=[{"arm": "maml", "size": "tiny", "step": "final"}])
(tmp / "g.yaml").write_text(yaml.safe_dump(grid))
raises(lambda: run_sweep(tmp / "g.yaml", tmp / "other.jsonl", grid_overrides={"ner": {"max_len": 256}}, **sweep),
       "ner.max_len=256 is longer than the 128 positions checkpoint")
_sweep_dir.cleanup()

# %% [markdown]
# ### Tests: the released checkpoints through a stand-in Hub
#
# A stand-in for the Hub: `ReleaseHub` answers the two `HfApi` calls `ReleasedHub` makes from
# commits it records, and writes each commit's files into a Hugging Face cache (the layout
# `huggingface-cli download` leaves), so `load_pretrained` then takes its real Hub path, offline.

# %%
import types

import huggingface_hub


class ReleaseHub:
    "Stand-in for HfApi over a Hugging Face cache: pico-train-style commits on a run branch."
    def __init__(self, cache_dir): self.cache_dir, self.commits = Path(cache_dir), {}
    def push(self, model, repo: str, branch: str, title: str) -> str:
        "Commit `model` to `branch` of `repo` (and to main) with the message `title`; return the commit id."
        commit = hashlib.sha1(f"{repo}{branch}{title}{len(self.commits.get(repo, []))}".encode()).hexdigest()
        root = self.cache_dir / f"models--{repo.replace('/', '--')}"
        save_pretrained(model, root / "snapshots" / commit)
        for ref in (branch, "main"):
            (root / "refs").mkdir(parents=True, exist_ok=True)
            (root / "refs" / ref).write_text(commit)
        # newest first
        self.commits.setdefault(repo, []).insert(0, types.SimpleNamespace(title=title, commit_id=commit))
        return commit
    def list_repo_refs(self, repo):
        branches = sorted(p.name for p in (self.cache_dir / f"models--{repo.replace('/', '--')}" / "refs").iterdir())
        return types.SimpleNamespace(branches=[types.SimpleNamespace(name=b) for b in branches])
    def list_repo_commits(self, repo, revision=None): return list(self.commits[repo])


# %%
from picomaml.model import load_pretrained

_hub_dir = tempfile.TemporaryDirectory()
tmp, repo, branch = Path(_hub_dir.name), "pico-lm/pico-maml-decoder-tiny", "pico-maml-decoder-tiny-6000"
hub, steps_pushed = ReleaseHub(tmp / "hf"), {}
for step in (0, 100, 200, 200):  # step 200 pushed twice (a relaunch): the newer commit is the checkpoint
    torch.manual_seed(step + len(steps_pushed))
    steps_pushed[step] = (PicoDecoder(tiny.cfg), None)
    steps_pushed[step] = (steps_pushed[step][0],
                          hub.push(steps_pushed[step][0], repo, branch, f"Saving HF Model -- Step {step}"))
hub.push(tiny, "pico-lm/pico-decoder-tiny", "pico-decoder-tiny-6000", "Saving HF Model -- Step 6000")
released = ReleasedHub(hub)
assert (released.branch(repo) == branch
        and released.step_revisions(repo) == {s: c for s, (_, c) in steps_pushed.items()})
scheduled = released_checkpoints({"arm": "maml", "size": "tiny", "step": "scheduled"}, "g", released)
assert ([(c.run, c.step, c.name) for c in scheduled]
        == [("pico-tiny-maml", s, f"{repo}@{c}") for s, (_, c) in steps_pushed.items()])
assert (released_checkpoints({"arm": "vanilla", "size": "tiny"}, "g", released)[0].name
        == "pico-lm/pico-decoder-tiny@main")
raises(lambda: released_checkpoints({"arm": "maml", "size": "tiny", "step": [300]}, "g", released),
       f"{repo} (branch {branch}) has no checkpoint of step(s) [300]; its steps: 0, 100, 200")

# %% [markdown]
# A sweep over two of those steps and the vanilla model's main branch, offline through the cache:
# one row per checkpoint, each named by its commit and traced to its pretraining run and step, and
# the weights loaded for step 200 are the newer commit's. A repo with a second run branch is refused.

# %%
grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "batch_size": 4}, "max_train_sentences": 8,
                     "max_eval_sentences": 4, "test_sets": ["tl_trg"]},
        "grids": [{"heads": ["linear"], "regimes": ["head"], "datasets": ["sk_snk"],
                   "runs": [{"arm": "maml", "size": "tiny", "step": [100, 200]},
                            {"arm": "vanilla", "size": "tiny"}]}]}
(tmp / "g.yaml").write_text(yaml.safe_dump(grid))
cache, offline = huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE
huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE = str(tmp / "hf"), True
try:
    assert run_sweep(tmp / "g.yaml", tmp / "r.jsonl", released=released) == 3
    rows = {r["checkpoint"]: r for r in read_rows(tmp / "r.jsonl")}
    loaded = load_pretrained(repo, revision=steps_pushed[200][1])
finally: huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE = cache, offline
hub.push(tiny, repo, "another-run", "Saving HF Model -- Step 0")
raises(lambda: ReleasedHub(hub).branch(repo), f"{repo} has 2 branches besides main (another-run, {branch})")
_hub_dir.cleanup()
assert sorted(rows) == sorted([f"{repo}@{steps_pushed[100][1]}", f"{repo}@{steps_pushed[200][1]}",
                               "pico-lm/pico-decoder-tiny@main"])
assert ({(r["pretraining_run"], r["step"]) for r in rows.values()}
        == {("pico-tiny-maml", 100), ("pico-tiny-maml", 200), ("pico-tiny-vanilla", None)})
assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), steps_pushed[200][0].state_dict().values()))

# %% [markdown]
# The local mirror: the same entries read `<root>/<repo>/` and its `step_<N>/` directories.

# %%
with tempfile.TemporaryDirectory() as tmp:
    mirror = ReleasedMirror(Path(tmp))
    for step in (0, 100): save_pretrained(tiny, Path(tmp) / "pico-lm/pico-maml-decoder-tiny" / step_dir_name(step))
    save_pretrained(tiny, Path(tmp) / "pico-lm/pico-maml-decoder-tiny")
    local = released_checkpoints({"arm": "maml", "size": "tiny", "step": "scheduled"}, "g", mirror)
    assert ([(c.step, c.source, c.hub) for c in local]
            == [(s, f"{tmp}/pico-lm/pico-maml-decoder-tiny/{step_dir_name(s)}", False) for s in (0, 100)])
    final = released_checkpoints({"arm": "maml", "size": "tiny"}, "g", mirror)[0]
    assert (final.source == f"{tmp}/pico-lm/pico-maml-decoder-tiny"
            and check_checkpoints([Job(final, "linear", "head", "sk_snk", 0, ())]) is None)
    raises(lambda: released_checkpoints({"arm": "vanilla", "size": "tiny", "step": [100]}, "g", mirror),
              f"pico-lm/pico-decoder-tiny (branch the local mirror {tmp}/pico-lm/pico-decoder-tiny) "
              "has no checkpoint of step(s) [100]")

# %% [markdown]
# ## On a GPU: backbone, head and batches on the sweep's device
#
# Tested on this CPU machine with `recorded_moves` (`00_device`), under which `cuda:1` runs on the
# CPU while every move is recorded: asked for `cuda:1`, the sweep moves each backbone there, builds
# every head there (linear and CRF, head-only and full finetuning), and moves every batch there;
# nothing goes to any other accelerator, and every row says where it ran. (In float32:
# `ner.precision=32-true`, as there is no CUDA autocast to record on a CPU.)

# %%
from picomaml.device import recorded_moves

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    save_pretrained(tiny, tmp / "ckpt")
    grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "batch_size": 4, "precision": "32-true"},
                         "max_train_sentences": 8, "max_eval_sentences": 4, "test_sets": ["tl_trg"]},
            "grids": [{"heads": ["linear", "crf"], "regimes": ["head", "full"], "datasets": ["sk_snk"],
                       "runs": [{"run": "t", "arm": "maml", "size": "tiny", "checkpoint": str(tmp / "ckpt")}]}]}
    (tmp / "g.yaml").write_text(yaml.safe_dump(grid))
    with recorded_moves("cuda:1") as moves:
        assert run_sweep(tmp / "g.yaml", tmp / "r.jsonl", device="cuda:1") == 4
    placed = read_rows(tmp / "r.jsonl")
assert ({"PicoDecoder", "LinearTagHead", "CRFTagHead", "Tensor"}
        <= {what for what, d in moves if d == torch.device("cuda", 1)})
assert {d for _, d in moves} <= {torch.device("cuda", 1), torch.device("cpu")}
assert {(r["device"], r["precision"]) for r in placed} == {("cuda:1", "32-true")}

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---


# %% [markdown]
# # The NER sweep
#
# > One command finetunes every combination of heads × regimes × finetuning datasets × checkpoints ×
# > pretraining runs, appending one JSON line per finished run; a restart skips finished rows.
#
# Paper 1 App. B evaluates 2 regimes × 10 datasets × 4 sizes × 2 arms = 160 runs at step 6000 with
# a linear head; paper 2 §4 finetunes one configuration (medium MAML, head-only, sk_snk, CRF head)
# on all 61 checkpoints, steps 0, 100, …, 6000 (method.md §5). Grids live in `configs/sweeps/`.

# %%
#| default_exp sweep

# %%
#| export
from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import itertools
import json
import os
import random
import re
import time
import warnings
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from picomaml.config import ConfigError, apply_overrides, load_config
from picomaml.model import count_parameters, load_pretrained
from picomaml.ner import (NERTagger, finetune, gold_tag_probabilities, loss_curve_metrics, predict, score,
                          window_features)
from picomaml.ner_data import TEST_SETS, encode_split, load_split

# %% [markdown]
# ## The results table: atomic appends
#
# One row is one JSON line, written by a single `os.write` on a file opened with `O_APPEND`, then
# `fsync`ed: concurrent writers never interleave inside a line, and a finished row survives a crash.
# A kill during the write can still leave a torn last line; reading skips it with a warning (its
# run is simply redone). A broken line anywhere else is an error naming the file and line.

# %%
#| export
class SweepError(ValueError):
    "A grid or results file that cannot be used; the message names the file, key or line."

def append_row(path, row: dict) -> None:
    "Append one JSON line atomically (one write on an O_APPEND descriptor) and fsync it."
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally: os.close(fd)

def read_rows(path) -> list[dict]:
    "Rows of a results file; a torn last line is skipped with a warning."
    if not Path(path).exists(): return []
    lines = Path(path).read_text().split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip(): continue
        try: rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) and lines[-1]:
                warnings.warn(f"{path}:{n}: torn last line ignored (an interrupted write); its run will be redone")
                continue
            raise SweepError(f"{path}:{n}: not a JSON row ({e}); fix or delete that line") from e
    return rows

# %% [markdown]
# Before a sweep appends, it cuts a torn tail off the file: otherwise the next row would be glued
# onto the fragment and both lost.

# %%
#| export
def drop_torn_tail(path) -> None:
    "Truncate a results file after its last complete line (the sweep is the file's only writer)."
    if not Path(path).exists(): return
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f: f.truncate(data.rfind(b"\n") + 1)

# %%
import tempfile
with tempfile.TemporaryDirectory() as tmp:
    table = Path(tmp) / "r.jsonl"
    append_row(table, {"key": "a"}); append_row(table, {"key": "b"})
    assert [r["key"] for r in read_rows(table)] == ["a", "b"]
    with open(table, "a") as f: f.write('{"key": "c", "dev_f')  # a write killed half-way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [r["key"] for r in read_rows(table)] == ["a", "b"]
    assert "r.jsonl:3: torn last line" in str(caught[0].message)
    drop_torn_tail(table); append_row(table, {"key": "c"})
    assert [r["key"] for r in read_rows(table)] == ["a", "b", "c"]
    table.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    try: read_rows(table); raise AssertionError("accepted a broken middle line")
    except SweepError as e: assert "r.jsonl:2:" in str(e)

# %% [markdown]
# ## Grid files
#
# A grid file (`configs/sweeps/*.yaml`) holds `defaults` and a list of `grids`. Each grid is a
# product of `heads`, `regimes`, `datasets`, `seeds` and its `runs`; keys of `defaults` (and `ner`
# overrides, `test_sets`, `save_predictions`, `max_train_sentences`, `max_eval_sentences`) apply
# unless a grid sets its own. A run entry names the pretraining run (`run`, `arm` maml|vanilla,
# `size`) and its checkpoints: `checkpoint` is a local directory, a run's `checkpoints/` directory
# (its `latest`), or a glob (`…/step_*`); `hub` is a Hub repo id with optional `revision` and
# `subfolder`. With `steps` (a list or `{start, stop, every}`), `{step}` in the checkpoint,
# revision or subfolder is filled in per step (`{step:06d}` works too).

# %%
#| export
GRID_KEYS = {"name", "heads", "regimes", "datasets", "seeds", "runs", "ner", "test_sets", "save_predictions",
             "max_train_sentences", "max_eval_sentences"}
RUN_KEYS = {"run", "arm", "size", "checkpoint", "hub", "revision", "subfolder", "steps"}

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

    @property
    def name(self) -> str:
        return self.source + (f"@{self.revision}" if self.revision else "") + (f"/{self.subfolder}" if self.subfolder else "")

def step_of(path: str) -> int | None:
    "The step of a `step_NNNNNN` checkpoint name, else None."
    m = re.search(r"step_?(\d+)$", str(path).rstrip("/"))
    return int(m.group(1)) if m else None

def expand_steps(steps, where: str) -> list:
    "A list of steps, or range(start, stop + 1, every) of a {start, stop, every} mapping."
    if isinstance(steps, dict):
        try: return list(range(steps["start"], steps["stop"] + 1, steps["every"]))
        except KeyError as e: raise SweepError(f"{where}: steps needs start, stop and every; missing {e}") from None
    return list(steps)

# %%
#| export
def local_checkpoints(path: str) -> list[str]:
    "Checkpoint directories named by a path: a glob, a run's checkpoints/ (its latest) or a directory."
    if any(c in path for c in "*?["): return sorted(glob.glob(path))
    latest = Path(path) / "latest"
    if latest.is_file(): return [str(Path(path) / latest.read_text().strip())]
    return [path]

def run_checkpoints(entry: dict, where: str) -> list[Checkpoint]:
    "The checkpoints of one run entry of a grid."
    unknown = set(entry) - RUN_KEYS
    if unknown: raise SweepError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(RUN_KEYS)}")
    for key in ("run", "arm", "size"):
        if key not in entry: raise SweepError(f"{where}: a run entry needs `{key}`")
    if entry["arm"] not in ("maml", "vanilla"): raise SweepError(f"{where}: arm {entry['arm']!r} is not maml or vanilla")
    if ("checkpoint" in entry) == ("hub" in entry): raise SweepError(f"{where}: give exactly one of `checkpoint` (local) or `hub`")
    base = dict(run=entry["run"], arm=entry["arm"], size=entry["size"])
    steps = expand_steps(entry["steps"], where) if "steps" in entry else [None]
    fill = lambda v, step: v.format(step=step) if isinstance(v, str) and step is not None else v
    out = []
    for step in steps:
        if "hub" in entry:
            out.append(Checkpoint(**base, source=entry["hub"], revision=fill(entry.get("revision"), step),
                                  subfolder=fill(entry.get("subfolder"), step), step=step, hub=True))
        else:
            paths = local_checkpoints(fill(entry["checkpoint"], step))
            if not paths: raise SweepError(f"{where}: checkpoint glob {entry['checkpoint']!r} matches no directory")
            out += [Checkpoint(**base, source=p, step=step if step is not None else step_of(p)) for p in paths]
    return out

# %% [markdown]
# Every (grid, checkpoint, head, regime, dataset, seed) is one job; its key is those coordinates.

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
    settings: tuple  # sorted (key, value) pairs of the grid's ner overrides, caps and test sets

    @property
    def key(self) -> str:
        c = self.checkpoint
        return "|".join(map(str, (c.run, c.name, self.head, self.regime, self.dataset, self.seed)))

def load_grid(path) -> list[Job]:
    "Every job of a grid file, checkpoints expanded, in checkpoint order."
    path = Path(path)
    if not path.is_file(): raise SweepError(f"grid file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    defaults, jobs = spec.get("defaults", {}), []
    for i, grid in enumerate(spec.get("grids", [])):
        where = f"{path}: grids[{i}]"
        g = {**defaults, **grid}
        unknown = set(g) - GRID_KEYS
        if unknown: raise SweepError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(GRID_KEYS)}")
        settings = tuple(sorted((k, json.dumps(g[k], sort_keys=True)) for k in GRID_KEYS - {"name", "heads", "regimes", "datasets", "seeds", "runs"} if k in g))
        ckpts = [c for j, r in enumerate(g.get("runs", [])) for c in run_checkpoints(r, f"{where}.runs[{j}]")]
        for c, head, regime, dataset, seed in itertools.product(ckpts, g.get("heads", ["linear"]), g.get("regimes", ["head"]),
                                                                g.get("datasets", ["sk_snk"]), g.get("seeds", [0])):
            jobs.append(Job(c, head, regime, dataset, seed, settings))
    if not jobs: raise SweepError(f"{path}: the grid has no jobs (no `grids`, or a grid without runs)")
    return sorted(dict.fromkeys(jobs), key=lambda j: (j.checkpoint.name, j.dataset))

def check_checkpoints(jobs: list[Job]) -> None:
    "Raise SweepError naming every checkpoint that is missing, before any run starts."
    from huggingface_hub import hf_hub_download
    missing = []
    for c in dict.fromkeys(j.checkpoint for j in jobs):
        if not c.hub:
            if not all((Path(c.source) / f).is_file() for f in ("config.json", "model.safetensors")): missing.append(c.source)
            continue
        try: hf_hub_download(c.source, "config.json", subfolder=c.subfolder, revision=c.revision)
        except Exception as e: missing.append(f"{c.name} (Hub: {type(e).__name__})")
    if missing: raise SweepError(f"missing checkpoints (each needs config.json + model.safetensors): {', '.join(missing)}")

# %% [markdown]
# ## Running the sweep
#
# Jobs run checkpoint by checkpoint, so each backbone is loaded once; for head-only jobs the frozen
# backbone's features of every split are computed once per checkpoint and shared by every head and
# seed. Splits are encoded once per sweep (capped by `max_train_sentences` / `max_eval_sentences`).
# A row holds the coordinates, the result record of `picomaml.ner` (dev F1; test micro-F1 default
# and strict and per-tag F1 per test set; t90, AUC, slope) and the per-step loss curve. With
# `save_predictions`, the predicted tags and gold-tag probabilities of the Philippine test sets go
# to a side file named in the row.

# %%
#| export
PHILIPPINE = ("ceb_gja", "tl_trg", "tl_ugnayan")

def job_settings(job: Job) -> dict:
    "The grid settings of a job as values."
    return {k: json.loads(v) for k, v in job.settings}

def capped(sentences: list, cap: int | None, seed: int = 0) -> list:
    "At most `cap` sentences, a seeded sample in original order (so `all` draws from every set, not the first)."
    if not cap or len(sentences) <= cap: return sentences
    keep = sorted(random.Random(seed).sample(range(len(sentences)), cap))
    return [sentences[i] for i in keep]

def write_side_file(path: Path, data: dict) -> None:
    "Write a JSON side file atomically (temporary file, then rename)."
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)

def run_job(job: Job, backbone, ner_cfg, data, features, out: Path) -> dict:
    "Finetune and evaluate one job; return its row."
    st, t0 = job_settings(job), time.perf_counter()
    cfg = dataclasses.replace(ner_cfg, head=job.head, regime=job.regime, train_sets=[job.dataset], seed=job.seed)
    shared = job.regime == "head" and cfg.cache_features
    feats = (lambda name: features(name)) if shared else (lambda name: None)
    train, dev = data(job.dataset, "train"), data(job.dataset, "dev")
    tagger, hist = finetune(backbone, train, dev, cfg, train_feats=feats((job.dataset, "train")), dev_feats=feats((job.dataset, "dev")))
    tests, side = {}, {}
    for name in st.get("test_sets") or list(TEST_SETS):
        split = data(name, "test")
        pred = predict(tagger, split, feats((name, "test")), cfg.batch_size)
        tests[name] = score([s.tags for s in split.sentences], pred)
        if st.get("save_predictions") and name in PHILIPPINE:
            side[name] = {"words": [s.words for s in split.sentences], "tags": [s.tags for s in split.sentences], "pred": pred,
                          "gold_prob": gold_tag_probabilities(tagger, split, feats((name, "test")), cfg.batch_size)}
    c = job.checkpoint
    row = {"key": job.key, "pretraining_run": c.run, "arm": c.arm, "size": c.size, "checkpoint": c.name, "step": c.step,
           "head": job.head, "regime": job.regime, "dataset": job.dataset, "seed": job.seed,
           "params": count_parameters(backbone.cfg), "dev_f1": hist["best_dev_f1"], "dev_f1_curve": hist["dev_f1"],
           "test_f1": {k: v["micro_f1"] for k, v in tests.items()},
           "test_strict_f1": {k: v["strict_micro_f1"] for k, v in tests.items()},
           "per_tag_f1": {k: v["per_tag_f1"] for k, v in tests.items()},
           **loss_curve_metrics(hist["loss"]), "loss_curve": hist["loss"], "epochs": hist["epochs"], "steps": hist["steps"]}
    if side:
        path = out.parent / f"{out.stem}-predictions" / (re.sub(r"[^A-Za-z0-9._-]+", "_", job.key) + ".json")
        write_side_file(path, side)
        row["predictions"] = str(path.relative_to(out.parent))  # relative to the results file, wherever it moves
    row["seconds"] = time.perf_counter() - t0
    return row


# %%
_pool = [f"da{i}" for i in range(50)] + [f"sk{i}" for i in range(50)]
_sample = capped(_pool, 20, seed=0)
assert len(_sample) == 20 and _sample == capped(_pool, 20, seed=0) and _sample == sorted(_sample, key=_pool.index)
assert any(x.startswith("da") for x in _sample) and any(x.startswith("sk") for x in _sample)
assert capped(_pool, None) is _pool and capped(_pool, 500) is _pool

# %%
#| export
def run_sweep(grid, out, preset=None, overrides=(), limit: int | None = None, encode=None) -> int:
    "Run every unfinished job of a grid file, appending rows to `out`; returns how many ran."
    from picomaml.tokenizer import load_tokenizer
    cfg, out = load_config(preset, overrides), Path(out)
    jobs = load_grid(grid)
    check_checkpoints(jobs)
    done = {r["key"] for r in read_rows(out)}
    drop_torn_tail(out)
    todo = [j for j in jobs if j.key not in done][:limit]
    encode = encode or load_tokenizer(cfg.data).encode
    encoded, features, loaded = {}, {}, {}
    for job in tqdm(todo, desc=f"NER sweep ({len(done)} of {len(jobs)} done)"):
        st = job_settings(job)
        ner_cfg = apply_overrides(copy.deepcopy(cfg), {"ner": st.get("ner", {})}, str(grid)).ner
        def data(name, split, st=st, ner_cfg=ner_cfg):
            cap = st.get("max_train_sentences" if split == "train" else "max_eval_sentences")
            key = (name, split, cap, ner_cfg.max_len)
            if key not in encoded: encoded[key] = encode_split(capped(load_split(name, split, ner_cfg), cap), encode, ner_cfg.max_len, f"{name}/{split}")
            return encoded[key]
        if job.checkpoint not in loaded:
            c = job.checkpoint
            loaded.clear(); features.clear()
            loaded[c] = load_pretrained(c.source, c.revision, c.subfolder) if c.hub else load_pretrained(c.source)
        backbone = loaded[job.checkpoint]
        def feats(name_split, data=data, ner_cfg=ner_cfg):
            key = (*name_split, data(*name_split).name, len(data(*name_split).windows))
            if key not in features: features[key] = window_features(NERTagger(backbone), data(*name_split), ner_cfg.batch_size)
            return features[key]
        append_row(out, run_job(job, backbone, ner_cfg, data, feats, out))
    return len(todo)

# %% [markdown]
# ## Command line
#
# `python -m picomaml.sweep --grid configs/sweeps/demo.yaml --out runs/ner/demo-results.jsonl
# [--config preset] [--limit N] [ner.key=value ...]`.

# %%
#| export
def main(argv=None) -> None:
    "Command-line entry point."
    p = argparse.ArgumentParser(description="Run a NER finetuning sweep; finished rows are skipped on restart.")
    p.add_argument("--grid", required=True, help="grid file, e.g. configs/sweeps/demo.yaml")
    p.add_argument("--out", required=True, help="results table (JSON lines), e.g. runs/ner/demo-results.jsonl")
    p.add_argument("--config", default=None, help="Config preset (configs/*.yaml) for data and ner defaults")
    p.add_argument("--limit", type=int, default=None, help="run at most this many unfinished jobs")
    p.add_argument("overrides", nargs="*", help="config overrides such as ner.lr=1e-4")
    a = p.parse_args(argv)
    try: n = run_sweep(a.grid, a.out, a.config, a.overrides, a.limit)
    except (SweepError, ConfigError) as e: raise SystemExit(f"error: {e}")
    print(f"{n} runs finished; results in {a.out}")

if __name__ == "__main__" and "__file__" in globals(): main()

# %% [markdown]
# ## A tiny sweep end to end
#
# Two checkpoints of a tiny PicoDecoder written like a training run's (`checkpoints/step_N` and
# `latest`), a grid over both heads with a step glob, capped data. A first call with `limit=3`
# stands in for a killed sweep; the second call runs only the rest and no key appears twice. A
# grid naming a missing checkpoint fails before anything runs.

# %%
from picomaml.config import ModelConfig
from picomaml.model import PicoDecoder, save_pretrained
os.environ.setdefault("PICOMAML_DATA", str(Path("../../shared/data").resolve()))
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    torch.manual_seed(0)
    tiny = PicoDecoder(ModelConfig(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=128))
    for step in (0, 100): save_pretrained(tiny, tmp / f"run/checkpoints/step_{step:06d}")
    (tmp / "run/checkpoints/latest").write_text("step_000100\n")
    grid = {"defaults": {"ner": {"epochs": 1, "max_len": 64, "lr": 1e-2, "batch_size": 4}, "max_train_sentences": 16, "max_eval_sentences": 8,
                         "test_sets": ["sk_snk", "tl_trg"], "save_predictions": True},
            "grids": [{"heads": ["linear", "crf"], "regimes": ["head"], "datasets": ["sk_snk"],
                       "runs": [{"run": "t", "arm": "maml", "size": "tiny", "checkpoint": str(tmp / "run/checkpoints/step_*")}]}]}
    (tmp / "g.yaml").write_text(yaml.safe_dump(grid))
    jobs = load_grid(tmp / "g.yaml")
    assert len(jobs) == 4 and sorted({j.checkpoint.step for j in jobs}) == [0, 100]
    out = tmp / "results.jsonl"
    assert run_sweep(tmp / "g.yaml", out, limit=3) == 3 and len(read_rows(out)) == 3
    assert run_sweep(tmp / "g.yaml", out) == 1
    rows = read_rows(out)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    r = rows[0]
    assert set(r["test_f1"]) == {"sk_snk", "tl_trg"} and len(r["loss_curve"]) == r["steps"] and r["params"] == count_parameters(tiny.cfg)
    side = json.loads((out.parent / r["predictions"]).read_text())
    assert set(side) == {"tl_trg"} and len(side["tl_trg"]["pred"]) == len(side["tl_trg"]["words"]) == 8
    assert all(0 < p < 1 for p in side["tl_trg"]["gold_prob"][0])
    grid["grids"][0]["runs"].append({"run": "gone", "arm": "vanilla", "size": "tiny", "checkpoint": str(tmp / "nowhere")})
    (tmp / "g.yaml").write_text(yaml.safe_dump(grid))
    try: run_sweep(tmp / "g.yaml", tmp / "other.jsonl"); raise AssertionError("ran with a missing checkpoint")
    except SweepError as e: assert "nowhere" in str(e) and not (tmp / "other.jsonl").exists()
rows[0]["key"], rows[0]["dev_f1"], rows[0]["t90"]

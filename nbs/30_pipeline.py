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
# # The pipeline
#
# > One command from raw text to every table and figure: prepare data, pretrain both arms, sweep
# > Universal NER over the checkpoints, and re-execute the analysis notebooks.
#
# `python -m picomaml.pipeline paper` is both papers at their scale on one node of 4 GPUs: both arms
# × four sizes (and the released trainer's reading of the MAML arm, for the episode figures), the
# 160-run NER grid of paper 1, paper 2's CRF grid and its 61-checkpoint sweep, the four analysis
# notebooks, and the scorecard that scores every number the papers report against them. `rehearse` is **that same profile** under one shrink transform applied
# by code (below), with its data read through the Hub code path from a local dataset directory; CI
# runs it, so the paper path is exercised end to end on every change. `demo` is what `make demo` runs
# on a CPU; `smoke` is the demo shrunk for CI.
#
# Every stage is skipped when its result is already there: prepared data has a manifest, a finished
# run's `latest` checkpoint is its last step, the NER sweep skips the rows its results file already
# holds. So a killed pipeline picks up where it stopped, and a second run only re-executes the
# notebooks. The wall time of every stage is printed as a table at the end and saved next to the
# runs (`timings-<profile>.json`).

# %%
#| default_exp pipeline

# %%
#| export
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import papermill

from picomaml.checkpoints import LATEST_FILE, CheckpointCorrupt, list_checkpoints, verify_checkpoint
from picomaml.cli import UserError, ensure_writable, run_command
from picomaml.config import PRESETS_DIR, ConfigError, load_config
from picomaml.device import require_cuda
from picomaml.names import ARMS, DEFAULT_SEED, PAPER_SIZES, run_name, step_dir_name
from picomaml.runlog import write_text_atomic


# %% [markdown]
# ## Profiles
#
# A profile names the runs (preset + overrides per size, arm and pretraining seed), the NER grids,
# where the data comes from, and where the analysis notebooks write. Run names come from
# `picomaml.names.run_name`, the one function the grids and the report notebooks also use.

# %%
#| export
@dataclass
class Profile:
    name: str
    runs_dir: str  # where run directories, NER results, executed notebooks and timings go
    sizes: list  # model sizes: the presets are pico-<size>-<arm>.yaml (family pico) or demo[-vanilla].yaml
    family: str  # "pico" (the papers' presets) or "demo"
    nproc: int  # processes per pretraining run (GPUs, or gloo CPU processes)
    grids: list  # NER sweep grids under configs/sweeps/
    seeds: list = field(default_factory=lambda: [DEFAULT_SEED])  # pretraining seeds: each arm once per seed
    jobs: int = 1  # pretraining runs at once (CPU rehearsals of many small runs: their start-up overlaps)
    data: str = "hub"  # hub: the presets' own data; local: prepare $PICOMAML_DATA/corpus; hub-layout: the rehearsal's
    seq_len: int = 128  # rows of prepared local data hold seq_len + 1 ids
    overrides: list = field(default_factory=list)  # section.key=value for every pretraining run
    # size (or released-<size>) -> more section.key=value for its runs
    size_overrides: dict = field(default_factory=dict)
    grid_overrides: dict = field(default_factory=dict)  # applied over every NER grid (picomaml.ner_sweep)
    commits_outputs: bool = False  # reports write the committed figures/ and paper_tables/ (else under runs_dir)
    smoke: bool = False  # fewer bootstrap resamples in the notebooks
    phase_size: str = "demo"  # the model of paper 1 Fig. 6's phase transition (large in the paper)
    sweep_size: str = "demo"  # the model of paper 2's checkpoint sweep (medium in the paper)
    device: str = "cpu"  # cuda: every stage on GPUs (checked before any work); cpu: CPU processes
    ner_workers: int = 1  # NER sweep worker processes (0: one per GPU of the node)
    paper_scale: bool = False  # the runs are the papers' models: the scorecard compares scale-dependent numbers
    # also pretrain released-<size>-maml (the released trainer's reading), first seed, for the episode figures
    released_arm: bool = False
    # pretrain nothing: the NER grids finetune the authors' checkpoints ("hub", or a local mirror)
    released_checkpoints: str = ""

PAPER = Profile("paper", "runs", list(PAPER_SIZES), "pico", 4, ["paper1", "paper2"], commits_outputs=True,
                phase_size="large", sweep_size="medium", device="cuda", ner_workers=0, paper_scale=True,
                released_arm=True)

# %% [markdown]
# ## The rehearsal: the paper profile, shrunk by one transform
#
# `rehearse` is not a second copy of the paper's presets and grids: it is `PAPER` passed through
# `shrink`, which keeps every preset, grid, stage and notebook and changes only sizes, in these
# ways (each a division or a cap, written once here):
#
# | what | paper | rehearsal |
# |---|---|---|
# | model width d, per size | 96 / 384 / 768 / 1,536 | d / 32 rounded up to a multiple of 6: 6 / 12 / 24 / 48, ffn 4d |
# | heads (query / key-value) | 12 / 4 | 3 / 1 (the same 3:1 grouping) |
# | depth | 12 blocks | 2 |
# | steps, warmup, and the cadence of checkpoints, evaluation, spectra | 6,000; 2,500; every 100 | ÷ 2,000 (at least 1): 3; 1; every step |
# | sequence length (the RoPE cache: 128, for NER windows of up to 128 sub-tokens) | 2,048 | 32 |
# | branch micro-batch (global batch) | 256 (2,048; tiny 1,024) | 32 (256; tiny 128): still 8 draws a step, 4 for tiny; 32 rows so that an episode's pool of rows from across a file holds four repeated words (16 failed one micro-batch in 256) |
# | SMLMT episode (N-way K+Q-shot, window) | 32-way 4+4, 64 | 4-way 1+1, 8, from the branch micro-batch as in the papers |
# | Paloma documents evaluated; rows of the spectra's gradient | the whole split, each document on its own; the whole split | the first 16 documents; the first 16 rows |
# | NER sentences (train / each evaluation split), epochs | all, ≤ 10 | 16 / 4 (a job that saves predictions keeps the whole tl and ceb test sets), 1 |
# | pretraining seeds | any | 42 and 1 |
# | devices | 4 GPUs: pretraining on 4 processes, NER on 4 workers (one per GPU) | CPU: 1 process a run, NER on 2 CPU workers |
#
# The rehearsal runs on the CPU because it says so (`device="cpu"`): the paper profile asks for GPUs
# and stops at once, with the reason, on a machine whose CUDA is unusable (below).
#
# The data goes through the Hub code path: `datasets.load_dataset(<dir>, streaming=True)` on local
# directories in the Hub datasets' layout (`picomaml.data.write_hub_layout`), made from
# `$PICOMAML_DATA`'s corpus (its first 300 training and 20 evaluation documents), with 256 rows per
# parquet file so that runs cross file boundaries and a resumed run opens the file of its position.
# Pretraining runs two at a time, so their start-up (about 10 s of imports each) overlaps. Outputs go
# under `runs/rehearse/`, never into the committed `figures/` and `paper_tables/`.

# %%
#| export
SHRINK = dict(width_divisor=32, heads=(3, 1), layers=2, step_divisor=2000, seq_len=32, ner_max_len=128,
              branch_divisor=8, episode=dict(n_way=4, k_shot=1, q_query=1, window=8, exclude_top=20),
              eval_documents=16, spectra_rows=16, rows_per_file=256,
              ner=dict(max_train_sentences=16, max_eval_sentences=4,
                       ner=dict(epochs=1, patience=1, max_len=128, batch_size=8)),
              seeds=[DEFAULT_SEED, 1], documents={"train": 300, "eval": 20})
REHEARSAL_DATA = "hub"  # under the rehearsal's runs_dir: hub/pretokenized-dolma, hub/pretokenized-paloma

def shrink_size(size: str, family: str = "pico") -> list[str]:
    "The rehearsal's overrides of one size's preset (width, heads, depth, steps and cadence, rows) of a family."
    cfg, s = load_config(PRESETS_DIR / f"{family}-{size}-maml.yaml"), SHRINK
    d = math.ceil(cfg.model.d_model / s["width_divisor"] / 6) * 6  # three heads of even width (RoPE rotates pairs)
    steps = cfg.train.steps // s["step_divisor"]
    per_step = lambda every: max(1, every // s["step_divisor"])
    branch = cfg.train.branch_batch // s["branch_divisor"]
    return [f"model.d_model={d}", f"model.ffn_hidden={4 * d}", f"model.n_heads={s['heads'][0]}",
            f"model.n_kv_heads={s['heads'][1]}", f"model.n_layers={s['layers']}",
            f"model.max_seq_len={s['ner_max_len']}", f"data.seq_len={s['seq_len']}",
            f"train.steps={steps}", f"train.warmup_steps={max(1, cfg.train.warmup_steps // s['step_divisor'])}",
            f"checkpoint.every={per_step(cfg.checkpoint.every)}", f"eval.every={per_step(cfg.eval.every)}",
            f"spectra.every={per_step(cfg.spectra.every)}", f"train.branch_batch={branch}",
            f"train.global_batch={cfg.train.global_batch // cfg.train.branch_batch * branch}",
            f"eval.max_documents={s['eval_documents']}", f"spectra.grad_rows={s['spectra_rows']}",
            *(f"smlmt.{k}={v}" for k, v in s["episode"].items()), *released_shrink(cfg)]

def released_shrink(cfg) -> list[str]:
    "The released reading's settings, shrunk: rows cropped to half their ids, its decay horizon and episode pool ÷."
    if not cfg.data.row_len: return []
    s = SHRINK
    return [f"data.seq_len={s['seq_len'] // 2}", f"data.row_len={s['seq_len'] + 1}",
            f"train.decay_steps={max(1, cfg.train.decay_steps // s['step_divisor'])}",
            f"smlmt.pool_rows={max(1, cfg.smlmt.pool_rows // s['branch_divisor'])}"]

def shrink(profile: Profile, runs_dir: str = "runs/rehearse", name: str = "rehearse") -> Profile:
    "The rehearsal of `profile`: the same presets, grids, stages and notebooks under the SHRINK transform."
    if profile.released_checkpoints:  # nothing to pretrain: only the NER grids and the notebooks shrink
        return dataclasses.replace(profile, name=name, runs_dir=runs_dir, device="cpu", ner_workers=2,
                                   grid_overrides=SHRINK["ner"], smoke=True, paper_scale=False)
    data = Path(runs_dir).resolve() / REHEARSAL_DATA
    source = ["data.source=hub", f"data.train_hub={data / 'pretokenized-dolma'}",
              f"data.eval_hub={data / 'pretokenized-paloma'}", f"data.rows_per_file={SHRINK['rows_per_file']}",
              "logging.progress_bar=false"]
    return dataclasses.replace(profile, name="rehearse", runs_dir=runs_dir, nproc=1, jobs=2,
                               seeds=list(SHRINK["seeds"]), data="hub-layout", device="cpu", ner_workers=2,
                               seq_len=SHRINK["seq_len"], overrides=profile.overrides + source,
                               size_overrides={s: shrink_size(s) for s in profile.sizes}
                               | {f"released-{s}": shrink_size(s, "released") for s in profile.sizes},
                               grid_overrides=SHRINK["ner"], commits_outputs=False, smoke=True, paper_scale=False)


# %% [markdown]
# The demo and the smoke run use local shards prepared from `$PICOMAML_DATA/corpus`; the smoke run is
# the demo with the overrides below, so CI also takes the demo's path in a couple of minutes.

# %%
#| export
SMOKE_OVERRIDES = ["model.n_layers=2", "train.steps=4", "checkpoint.every=2", "checkpoint.log_spaced=false",
                   "train.global_batch=4", "train.branch_batch=2", "train.warmup_steps=1", "eval.every=2",
                   "eval.max_documents=8", "spectra.every=2", "spectra.grad_rows=2", "smlmt.n_way=8", "smlmt.k_shot=2",
                   "smlmt.q_query=2", "smlmt.window=16"]

RELEASED = dataclasses.replace(PAPER, name="released", runs_dir="runs/released", nproc=1, commits_outputs=False,
                               released_checkpoints="hub", released_arm=False)
PROFILES = {
    "paper": PAPER,
    "released": RELEASED,
    "rehearse": shrink(PAPER),
    "rehearse-released": shrink(RELEASED, "runs/rehearse-released", "rehearse-released"),
    "demo": Profile("demo", "runs", ["demo"], "demo", 2, ["demo"], data="local", commits_outputs=True),
    "smoke": Profile("smoke", "runs/smoke", ["demo"], "demo", 1, ["smoke"], data="local", overrides=SMOKE_OVERRIDES,
                     smoke=True),
}

# %%
import yaml

assert set(PROFILES) == {"paper", "released", "rehearse", "rehearse-released", "demo", "smoke"}
for p in PROFILES.values():
    for g in p.grids: assert (PRESETS_DIR / "sweeps" / f"{g}.yaml").is_file(), g
_rehearse = PROFILES["rehearse"]
assert _rehearse.grids == PAPER.grids and _rehearse.sizes == PAPER.sizes and _rehearse.family == PAPER.family
assert ("model.d_model=48" in _rehearse.size_overrides["large"]
        and "model.d_model=6" in _rehearse.size_overrides["tiny"]
        and "train.steps=3" in _rehearse.size_overrides["tiny"])
assert ("train.global_batch=128" in _rehearse.size_overrides["tiny"]
        and "train.global_batch=256" in _rehearse.size_overrides["small"])


# %% [markdown]
# ## Which runs
#
# `pretraining_runs` expands a profile into `(preset, overrides, run name)` triples, one per size,
# arm and pretraining seed. A seed other than the presets' 42 is passed as `train.seed` and named in
# the run (`picomaml.names.run_name`), so each arm is run once per seed and the notebooks can put
# intervals over seeds on the tables.

# %%
#| export
def preset_path(profile: Profile, size: str, arm: str) -> Path:
    "The preset of one arm and size: pico-<size>-<arm>.yaml, or demo.yaml / demo-vanilla.yaml."
    if profile.family == "pico": return PRESETS_DIR / f"pico-{size}-{arm}.yaml"
    return PRESETS_DIR / ("demo.yaml" if arm == "maml" else "demo-vanilla.yaml")

def pretraining_runs(profile: Profile) -> list[tuple[Path, list, str]]:
    "A profile's pretraining runs as (preset, overrides, run name); none when it finetunes the released checkpoints."
    if profile.released_checkpoints: return []
    def run(preset, overrides_key, name, seed):
        extra = [f"logging.runs_dir={profile.runs_dir}", f"logging.run_name={name}", f"train.seed={seed}",
                 f"train.device={profile.device}"]
        return preset, profile.overrides + profile.size_overrides.get(overrides_key, []) + extra, name
    runs = []
    for size in profile.sizes:
        runs += [run(preset_path(profile, size, arm), size, run_name(size, arm, seed, profile.family), seed)
                 for arm in ARMS for seed in profile.seeds]
        if profile.released_arm:  # the released trainer's reading of the method: its MAML arm, at the first seed
            seed = profile.seeds[0]
            runs.append(run(PRESETS_DIR / f"released-{size}-maml.yaml", f"released-{size}",
                            run_name(size, "maml", seed, "released"), seed))
    return runs


# %%
demo_runs = pretraining_runs(PROFILES["demo"])
assert [r[2] for r in demo_runs] == ["demo-maml", "demo-vanilla"]
_seeded = dataclasses.replace(PAPER, seeds=[42, 1, 2])
assert [r[2] for r in pretraining_runs(_seeded)][:3] == ["pico-tiny-maml", "pico-tiny-maml-seed1",
                                                         "pico-tiny-maml-seed2"]
assert ([r[2] for r in pretraining_runs(_seeded)][6] == "released-tiny-maml"
        and len(pretraining_runs(_seeded)) == 4 * (2 * 3 + 1))
_released = {name: load_config(p, o) for p, o, name in pretraining_runs(_rehearse) if name.startswith("released-")}
assert sorted(_released) == [f"released-{s}-maml" for s in sorted(PAPER_SIZES)]
assert all(c.data.row_len == 33 and c.data.seq_len == 16 and c.smlmt.episode_scope == "rank"
           for c in _released.values())
for preset, overrides, name in (demo_runs + pretraining_runs(_seeded) + pretraining_runs(PROFILES["smoke"])
                                + pretraining_runs(_rehearse)):
    cfg = load_config(preset, overrides)
    assert cfg.logging.run_name == name and (cfg.maml.rho == 0) == ("-vanilla" in name)


# %% [markdown]
# ## Is a stage done?
#
# A run is finished when its `checkpoints/latest` names the configured last step and that checkpoint
# is there and passes its digests (`picomaml.checkpoints.verify_checkpoint`): a final checkpoint
# deleted or damaged since is said so, and the run is relaunched, which resumes from its newest good
# checkpoint and writes the final one again. Prepared data is there when its manifest is.

# %%
#| export
def run_finished(preset, overrides) -> bool:
    "True when the run's latest checkpoint is its final step, and that checkpoint is there and verifies."
    cfg = load_config(preset, overrides)
    root = Path(cfg.logging.runs_dir) / cfg.logging.run_name / "checkpoints"
    final = root / step_dir_name(cfg.train.steps)
    if not ((root / LATEST_FILE).is_file() and (root / LATEST_FILE).read_text().strip() == final.name): return False
    try:
        if final not in [d for _, d in list_checkpoints(root)]:
            raise CheckpointCorrupt(f"{final}, which {root / LATEST_FILE} names, is gone")
        verify_checkpoint(final)
        return True
    except CheckpointCorrupt as e:
        print(f"[pipeline] {e}: training {cfg.logging.run_name} again from its newest good checkpoint", flush=True)
        return False


# %%
import contextlib
import io
import tempfile

import torch

from picomaml.checkpoints import write_checkpoint
from picomaml.config import ModelConfig
from picomaml.model import PicoDecoder

with tempfile.TemporaryDirectory() as tmp:
    preset, overrides, name = pretraining_runs(PROFILES["demo"])[0]
    overrides = overrides + [f"logging.runs_dir={tmp}"]
    assert not run_finished(preset, overrides)
    (Path(tmp) / name / "checkpoints").mkdir(parents=True)
    steps = load_config(preset).train.steps
    (Path(tmp) / name / "checkpoints" / "latest").write_text(f"step_{steps - 1:06d}\n")
    assert not run_finished(preset, overrides)
    (Path(tmp) / name / "checkpoints" / "latest").write_text(f"step_{steps:06d}\n")
    # latest alone is not enough
    with contextlib.redirect_stdout(io.StringIO()) as said: assert not run_finished(preset, overrides)
    assert f"step_{steps:06d}, which" in said.getvalue() and "is gone" in said.getvalue()
    tiny = PicoDecoder(ModelConfig(d_model=24, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=48, vocab_size=64,
                                   max_seq_len=32))
    final = write_checkpoint(Path(tmp) / name / "checkpoints", steps, tiny, torch.nn.Linear(2, 2), {})
    (final / "model.safetensors").write_bytes((final / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with contextlib.redirect_stdout(io.StringIO()) as said: assert not run_finished(preset, overrides)
    assert "fails its SHA-256 check" in said.getvalue()
    write_checkpoint(Path(tmp) / name / "checkpoints", steps, tiny, torch.nn.Linear(2, 2), {})
    assert run_finished(preset, overrides)


# %% [markdown]
# ## Commands
#
# Each stage is a subprocess, exactly the command a person would type, so the pipeline adds no
# behaviour of its own. Several processes go through `torch.distributed.run` (torchrun) with
# `--standalone`, which picks a free port; one process is a plain `python -m picomaml.launch`. The
# sweep is told where the runs are and which pretraining seeds to finetune, so the grids name runs
# by size and arm only, and which device to run on with how many workers (on the paper's node: four,
# one per GPU, `12_ner_sweep`).

# %%
#| export
def launch_command(preset, overrides, nproc: int) -> list[str]:
    "The command that pretrains one run on `nproc` processes."
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        head = [sys.executable]
    return head + ["-m", "picomaml.launch", "--config", str(preset), *overrides]

def prepare_command(src, out, seq_len: int, max_documents: int = 0) -> list[str]:
    "The command that pretokenizes raw documents into shards."
    cmd = [sys.executable, "-m", "picomaml.data", "prepare", "--src", str(src), "--out", str(out),
           "--seq-len", str(seq_len)]
    return cmd + (["--max-documents", str(max_documents)] if max_documents else [])

def sweep_command(grid: str, profile: Profile) -> list[str]:
    "The command that runs one NER grid of a profile, appending to `<runs_dir>/ner/<grid>-results.jsonl`."
    cmd = [sys.executable, "-m", "picomaml.ner_sweep", "--grid", str(PRESETS_DIR / "sweeps" / f"{grid}.yaml"),
           "--out", str(Path(profile.runs_dir) / "ner" / f"{grid}-results.jsonl"), "--runs-dir", profile.runs_dir,
           "--pretraining-seeds", *map(str, profile.seeds), "--device", profile.device,
           "--workers", str(profile.ner_workers or profile.nproc)]  # 0: one worker per GPU of the node
    cmd += ["--released", profile.released_checkpoints] if profile.released_checkpoints else []
    return cmd + (["--grid-overrides", json.dumps(profile.grid_overrides)] if profile.grid_overrides else [])


# %%
assert launch_command("c.yaml", ["a.b=1"], 2)[1:5] == ["-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node=2"]
assert launch_command("c.yaml", [], 1)[1:] == ["-m", "picomaml.launch", "--config", "c.yaml"]
_cmd = sweep_command("paper1", _rehearse)
assert (_cmd[_cmd.index("--out") + 1].endswith("runs/rehearse/ner/paper1-results.jsonl")
        and _cmd[_cmd.index("--pretraining-seeds") + 1:][:2] == ["42", "1"])
assert yaml.safe_load(_cmd[-1]) == SHRINK["ner"]
assert (pretraining_runs(PROFILES["released"]) == []
        and sweep_command("paper2", PROFILES["released"])[-2:] == ["--released", "hub"])
assert "--released" not in sweep_command("paper2", PAPER) and PROFILES["released"].grids == PAPER.grids


# %% [markdown]
# ## Data for each profile
#
# `local` profiles pretokenize `$PICOMAML_DATA/corpus/{train,eval}` into `data/pretokenized/`. The
# rehearsal pretokenizes the same corpus into its own directory and rewrites it in the Hub datasets'
# layout, which the runs then stream. The `paper` profile reads the Hub datasets named in its presets.

# %%
#| export
def need_shared_data() -> Path:
    "$PICOMAML_DATA as a Path; a one-line error saying what to set when it is missing."
    data = os.environ.get("PICOMAML_DATA")
    if not data or not Path(data).is_dir():
        raise ConfigError(f"PICOMAML_DATA={data or '(unset)'} is not a directory: point it at a directory with "
                          "corpus/train, corpus/eval and tokenizer/ (the Makefile uses ../shared/data), or use the "
                          "`paper` profile (Hub data)")
    return Path(data)

def prepare_stages(profile: Profile, timings: dict) -> None:
    "Pretokenize $PICOMAML_DATA/corpus/{train,eval} for the local profiles (and the rehearsal's Hub-layout copies)."
    data = need_shared_data()
    local = profile.data == "local"
    root = PRESETS_DIR.parent / "data" / "pretokenized" if local else Path(profile.runs_dir).resolve() / "shards"
    hub_names = {"train": ("pretokenized-dolma", "train"), "eval": ("pretokenized-paloma", "val")}
    for split in ("train", "eval"):
        out = root / split
        timed(f"prepare {split}", timings, (out / "manifest.json").is_file(),
              lambda: call(prepare_command(data / "corpus" / split, out, profile.seq_len,
                                           0 if local else SHRINK["documents"][split])))
        if not local:
            name, hub_split = hub_names[split]
            layout = Path(profile.runs_dir).resolve() / REHEARSAL_DATA / name
            timed(f"hub layout {name}", timings, layout.is_dir(), lambda: call(
                [sys.executable, "-m", "picomaml.data", "hub-layout", "--shards", str(out), "--out", str(layout),
                 "--rows-per-file", str(SHRINK["rows_per_file"]), "--split", hub_split]))


# %% [markdown]
# ## The analysis notebooks
#
# Every notebook `nbs/2N_*.ipynb` after the shared helpers (`20_report`) is an analysis notebook with
# a papermill `parameters` cell. The pipeline re-executes each with the profile's runs and writes the
# executed copy next to the runs (`<runs_dir>/reports/`), never over the source notebook. Only the
# profiles that regenerate the committed outputs (`demo`, `paper`) write into the repository's
# `figures/` and `paper_tables/`; the others write `<runs_dir>/figures/` and `<runs_dir>/paper_tables/`.

# %%
#| export
NBS_DIR = PRESETS_DIR.parent / "nbs"

def analysis_notebooks(nbs_dir=NBS_DIR) -> list[Path]:
    "The analysis notebooks, in order."
    return sorted(p for p in Path(nbs_dir).glob("2[1-9]_*.ipynb"))

def report_parameters(profile: Profile) -> dict:
    "The papermill parameters for every analysis notebook of a profile (absolute paths)."
    root = PRESETS_DIR.parent
    runs = (root / profile.runs_dir).resolve()  # the notebooks run in nbs/: paths must be absolute
    out = root if profile.commits_outputs else runs
    return dict(runs_dir=str(runs), figures_dir=str(out / "figures"), tables_dir=str(out / "paper_tables"),
                sizes=list(profile.sizes), arms=list(ARMS), seeds=list(profile.seeds), ner_dir=str(runs / "ner"),
                ner_results=[str(runs / "ner" / "*-results.jsonl")], smoke=profile.smoke,
                phase_size=profile.phase_size, sweep_size=profile.sweep_size, paper_scale=profile.paper_scale)


# %%
_params = report_parameters(PROFILES["smoke"])
assert (_params["figures_dir"].endswith("runs/smoke/figures") and _params["smoke"]
        and _params["runs_dir"].endswith("runs/smoke"))
assert report_parameters(PROFILES["demo"])["figures_dir"] == str(PRESETS_DIR.parent / "figures")
assert (report_parameters(_rehearse)["tables_dir"].endswith("runs/rehearse/paper_tables")
        and report_parameters(_rehearse)["seeds"] == [42, 1])
# every notebook takes the outputs' place and the runs' selection, and a source of results
for nb in analysis_notebooks():
    declared = set(papermill.inspect_notebook(str(nb)))
    assert ("sizes" in declared and declared & {"figures_dir", "tables_dir"}
            and declared & {"runs_dir", "ner_results", "tables_dir"}), nb.name
assert analysis_notebooks()[-1].name == "29_scorecard.ipynb"  # last: it scores the tables the others wrote


# %%
#| export
def execute_reports(params: dict, reports_dir, notebooks=None) -> None:
    "Re-execute every analysis notebook with those of `params` it declares (papermill, cwd nbs/)."
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    for nb in notebooks or analysis_notebooks():
        declared = papermill.inspect_notebook(str(nb))
        print(f"  executing {nb.name}", flush=True)
        try: papermill.execute_notebook(str(nb), str(reports_dir / nb.name), kernel_name="python3", cwd=str(nb.parent),
                                        parameters={k: v for k, v in params.items() if k in declared},
                                        progress_bar=False)
        except papermill.PapermillExecutionError as e:
            raise UserError(f"{nb.name} failed at cell {e.exec_count} ({e.ename}: {e.evalue}); the executed copy "
                            f"with the traceback is {reports_dir / nb.name}") from None

def scorecard_line(tables_dir) -> str:
    "The reproduction scorecard's one-line summary (`29_scorecard` writes it in bold), or why there is none."
    path = Path(tables_dir) / "scorecard.md"
    bold = [line.strip("*") for line in path.read_text().splitlines() if line.startswith("**")] if path.exists() else []
    return bold[0] if bold else f"no scorecard at {path}"


# %%
with tempfile.TemporaryDirectory() as tmp:
    assert scorecard_line(tmp) == f"no scorecard at {Path(tmp) / 'scorecard.md'}"
    (Path(tmp) / "scorecard.md").write_text("# Reproduction scorecard\n\n"
                                            "**Scorecard (demo runs): 3 of 9 claims reproduced**\n\nVerdicts: ...\n")
    assert scorecard_line(tmp) == "Scorecard (demo runs): 3 of 9 claims reproduced"


# %% [markdown]
# ## Running the stages
#
# `run_pipeline` runs each stage unless it is done, times it, and prints the table. A failing stage
# stops the pipeline with the stage's name and command; what earlier stages produced stays.

# %%
#| export
def timed(name: str, timings: dict, done: bool, action) -> None:
    "Run `action()` unless `done`, recording its wall time under `name`."
    if done:
        print(f"[pipeline] {name}: already done, skipped", flush=True)
        timings[name] = None  # keeps the time measured when the stage last ran (see `save_timings`)
        return
    print(f"[pipeline] {name} ...", flush=True)
    start = time.perf_counter()
    action()
    timings[name] = round(time.perf_counter() - start, 1)

def threads_per_process(processes: int) -> dict:
    "OMP_NUM_THREADS for `processes` concurrent processes on this machine's cores (unless the user set it)."
    if "OMP_NUM_THREADS" in os.environ: return {}
    # no oversubscription, the same count every run
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}

def call(cmd: list[str], env: dict | None = None) -> None:
    "Run a command (with `env` added to the environment); a failure stops the pipeline naming the command."
    print("  $ " + " ".join(map(str, cmd)), flush=True)
    if subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode != 0:
        raise UserError(f"the pipeline stopped: {' '.join(map(str, cmd))} failed (its error is printed above)")

def call_parallel(named: list[tuple[str, list[str]]], jobs: int, log_dir) -> None:
    "Run named commands `jobs` at a time, each logging to <log_dir>/<name>.log; a failure stops naming it and its log."
    log_dir, running, env = Path(log_dir), [], {**os.environ, **threads_per_process(jobs)}
    log_dir.mkdir(parents=True, exist_ok=True)
    queue = list(named)
    while queue or running:
        while queue and len(running) < jobs:
            name, cmd = queue.pop(0)
            print(f"  [{name}] $ " + " ".join(map(str, cmd)), flush=True)
            log = open(log_dir / f"{name}.log", "w")
            running.append((name, cmd, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
        time.sleep(0.2)
        for entry in [r for r in running if r[3].poll() is not None]:
            name, cmd, log, proc = entry
            log.close(); running.remove(entry)
            if proc.returncode != 0:
                for _, _, other_log, other in running: other.kill(); other.wait(); other_log.close()
                tail = (log_dir / f"{name}.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise UserError(f"the pipeline stopped: {name} failed ({tail[0]}); its output is in "
                                f"{log_dir / f'{name}.log'}")
            print(f"  [{name}] done", flush=True)

def format_timings(timings: dict) -> str:
    "A Markdown table of the stages' wall times (skipped stages say so)."
    rows = [f"| {k} | {'skipped' if v is None else f'{v:.1f}'} |" for k, v in timings.items()]
    total = sum(v for v in timings.values() if v is not None)
    return "\n".join(["| stage | seconds |", "|---|---|", *rows, f"| total | {total:.1f} |"])

def save_timings(timings: dict, path) -> dict:
    "Merge this run's stage times into `path`: a skipped stage keeps the time of its last real run."
    path = Path(path)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update({k: v for k, v in timings.items() if v is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(merged, indent=1) + "\n")
    return merged


# %%
from picomaml.devtools import raises

with tempfile.TemporaryDirectory() as tmp:
    assert threads_per_process(1)["OMP_NUM_THREADS"] == str(os.cpu_count() or 1) or "OMP_NUM_THREADS" in os.environ
    call_parallel([(f"ok{i}", [sys.executable, "-c", f"print({i})"]) for i in range(3)], 2, tmp)
    assert [(Path(tmp) / f"ok{i}.log").read_text() for i in range(3)] == ["0\n", "1\n", "2\n"]
    raises(lambda: call_parallel([("bad", [sys.executable, "-c", "raise SystemExit(3)"]),
                                  ("slow", [sys.executable, "-c", "import time; time.sleep(30)"])], 2, tmp),
           "bad failed", "bad.log", kind=UserError)

# %%
_t = {}
timed("a", _t, True, lambda: 1 / 0)
timed("b", _t, False, lambda: None)
assert _t["a"] is None and _t["b"] >= 0 and "| a | skipped |" in format_timings(_t)
with tempfile.TemporaryDirectory() as tmp:
    save_timings({"pretrain": 100.0, "reports": 20.0}, Path(tmp) / "t.json")
    assert (save_timings({"pretrain": None, "reports": 21.0}, Path(tmp) / "t.json")
            == {"pretrain": 100.0, "reports": 21.0})


# %%
#| export
def run_pipeline(profile: Profile, stages=("data", "pretrain", "ner", "reports")) -> dict:
    "Run a profile's stages in order, skipping what is done; returns the stage timings."
    timings = {}
    if profile.device == "cuda":
        require_cuda(profile.nproc, f"the {profile.name} profile",
                     f"python -m picomaml.pipeline {profile.name} --device cpu "
                     f"(days on CPU), or make rehearse (the shrunk paper profile, minutes)")
    os.chdir(PRESETS_DIR.parent)  # presets, data/ and runs/ are relative to the repository root
    ensure_writable(profile.runs_dir, f"the {profile.name} profile's runs directory")
    if "data" in stages and profile.data != "hub": prepare_stages(profile, timings)
    if "pretrain" in stages:
        todo = []
        for preset, overrides, name in pretraining_runs(profile):
            finished = run_finished(preset, overrides)
            if profile.jobs == 1 or finished:
                timed(f"pretrain {name}", timings, finished,
                      lambda: call(launch_command(preset, overrides, profile.nproc),
                                   threads_per_process(profile.nproc)))
            else: todo.append((name, launch_command(preset, overrides, profile.nproc)))
        if todo: timed(f"pretrain {len(todo)} runs, {profile.jobs} at a time", timings, False,
                       lambda: call_parallel(todo, profile.jobs, Path(profile.runs_dir) / "logs"))
    if "ner" in stages:
        for grid in profile.grids:
            timed(f"ner sweep {grid}", timings, False, lambda: call(sweep_command(grid, profile)))
    if "reports" in stages:
        timed("reports", timings, False,
              lambda: execute_reports(report_parameters(profile), Path(profile.runs_dir) / "reports"))
        print(scorecard_line(report_parameters(profile)["tables_dir"]), flush=True)
    print(format_timings(timings))
    save_timings(timings, Path(profile.runs_dir) / f"timings-{profile.name}.json")
    return timings


# %% [markdown]
# ## The authors' checkpoints: `make released`
#
# `released` is the paper profile with its pretraining replaced by the authors' checkpoints on the
# Hub (`picomaml.ner_sweep --released`: `pico-lm/pico-maml-decoder-<size>` and
# `pico-lm/pico-decoder-<size>`, their `main` for the final model and the commits of the run's branch
# for paper 2's checkpoint sweep). It runs both papers' NER grids on the GPUs of this machine (one is
# enough: one sweep worker per GPU), the analysis notebooks and the scorecard, under `runs/released/`;
# the pretraining figures are marked missing (the checkpoints carry no training logs). It is the way
# to score paper 2's NER claims at the papers' scale without pretraining. `--plan` prints what each
# grid reads and computes and its hours on one GPU, from the papers' checkpoint schedule, without the
# Hub (`picomaml.ner_sweep --plan`). `rehearse-released` is the same profile under the rehearsal's
# shrink of the NER grids, on CPU, for a mirror given with `--released-mirror` (`make test` builds
# one of the eight models at the rehearsal's sizes, `tests/test_released.py`).

# %% [markdown]
# ## The command line
#
# ```sh
# python -m picomaml.pipeline demo                        # make demo
# python -m picomaml.pipeline paper --seeds 42 1 2        # the papers' scale on one node of 4 GPUs, three seeds
# python -m picomaml.pipeline released                    # make released: both papers' NER grids over the authors' checkpoints
# python -m picomaml.pipeline released --plan             # what make released reads and computes, and its hours on one GPU
# python -m picomaml.pipeline rehearse                    # make rehearse: the paper profile, shrunk (CI)
# python -m picomaml.pipeline smoke                       # the demo's path in minutes (CI)
# python -m picomaml.pipeline demo --stages reports       # only re-execute the notebooks
# ```

# %%
#| export
def main(argv=None) -> dict:
    "`python -m picomaml.pipeline PROFILE [--seeds ...] [--nproc N] [--stages ...]`."
    p = argparse.ArgumentParser(prog="python -m picomaml.pipeline", description=__doc__)
    p.add_argument("profile", choices=sorted(PROFILES))
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"pretraining seeds, each arm once per seed "
                        f"(default: the profile's; {DEFAULT_SEED} is the presets' own)")
    p.add_argument("--nproc", type=int, default=None, help="processes per pretraining run (default: the profile's)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="where every stage runs (default: the profile's; paper: cuda, checked before any work)")
    p.add_argument("--released-mirror", default=None, metavar="DIR",
                   help="released profile: read the authors' checkpoints from DIR (<repo>/, <repo>/step_<N>/) "
                        "instead of the Hub")
    p.add_argument("--plan", action="store_true",
                   help="print what each NER grid reads and computes, and its hours on one GPU "
                        "(picomaml.ner_sweep --plan); run nothing")
    p.add_argument("--stages", nargs="*", default=["data", "pretrain", "ner", "reports"],
                   choices=["data", "pretrain", "ner", "reports"])
    args = p.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.released_mirror and not profile.released_checkpoints:
        p.error("--released-mirror applies to the released profile")
    profile = dataclasses.replace(profile, seeds=args.seeds or profile.seeds, nproc=args.nproc or profile.nproc,
                                  device=args.device or profile.device,
                                  released_checkpoints=str(Path(args.released_mirror).resolve()) if args.released_mirror
                                  else profile.released_checkpoints)
    if args.plan:
        os.chdir(PRESETS_DIR.parent)  # the sweep's paths are relative to the repository root, as in run_pipeline
        for grid in profile.grids: call(sweep_command(grid, profile) + ["--plan"])
        return {}
    return run_pipeline(profile, args.stages)

if __name__ == "__main__" and "__file__" in globals(): run_command(main)

# %% [markdown]
# The paper profile on a machine whose CUDA cannot serve four GPUs (this one, or any with
# `CUDA_VISIBLE_DEVICES` empty) stops before any work, naming the cause and the ways to run on CPU. The
# paper's runs ask for GPUs (`train.device=cuda`); the rehearsal's and the demo's run on the CPU because
# they say so, and every NER grid gets the profile's device and workers.

# %%
from picomaml.device import cuda_problem

if cuda_problem(4):
    raises(lambda: main(["paper", "--nproc", "4"]), "the paper profile runs on 4 CUDA GPUs, but ")
    raises(lambda: main(["paper", "--nproc", "4"]),
           "To run on CPU anyway: python -m picomaml.pipeline paper --device cpu")
assert (all("train.device=cuda" in o for _, o, _ in pretraining_runs(PAPER))
        and all("train.device=cpu" in o for _, o, _ in demo_runs))
assert all(load_config(p, o).train.device == "cpu" for p, o, _ in pretraining_runs(_rehearse))
_paper_sweep, _rehearsal_sweep = sweep_command("paper1", PAPER), sweep_command("paper1", _rehearse)
assert _paper_sweep[_paper_sweep.index("--device"):][:4] == ["--device", "cuda", "--workers", "4"]
assert _rehearsal_sweep[_rehearsal_sweep.index("--device"):][:4] == ["--device", "cpu", "--workers", "2"]

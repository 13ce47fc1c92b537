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
# # The pipeline
#
# > One command from raw text to every table and figure: prepare data, pretrain both arms, sweep
# > Universal NER over the checkpoints, and re-execute the analysis notebooks.
#
# `python -m picomaml.pipeline demo` is what `make demo` runs on a CPU; `python -m picomaml.pipeline
# paper` is the same recipe at the papers' scale on one node of GPUs (both arms × four sizes, the
# 160-run NER grid of paper 1, the 61-checkpoint sweep of paper 2). `smoke` is the demo shrunk until
# it runs in a couple of minutes; CI runs it to prove that every output file of method.md §6 is
# produced.
#
# Every stage is skipped when its result is already there: prepared data has a manifest, a finished
# run's `latest` checkpoint is its last step, the NER sweep skips the rows its results file already
# holds. So a killed `make demo` picks up where it stopped, and a second `make demo` only re-executes
# the notebooks. The wall time of every stage is printed as a table at the end and saved next to the
# runs (`timings.json`), which is where the benchmarks take "the whole `make demo` by stage" from.

# %%
#| default_exp pipeline

# %%
#| export
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from picomaml.config import PRESETS_DIR, load_config

# %% [markdown]
# ## Profiles
#
# A profile names the runs (preset + overrides per arm, size and seed), the NER grid, the data
# preparation, and the parameters handed to the analysis notebooks. The run-name pattern is the
# contract with those notebooks: `<prefix><size>-<arm>` plus `-seed<k>` when several seeds are asked
# for.

# %%
#| export
@dataclass
class Profile:
    name: str
    runs_dir: str  # where run directories, NER results and timings go
    sizes: list  # model sizes; the presets are `<preset_prefix><size>-<arm>.yaml`
    preset_prefix: str  # "pico-" for the papers' presets, "" for demo.yaml / demo-vanilla.yaml
    nproc: int  # processes per pretraining run (GPUs, or gloo CPU processes)
    seq_len: int  # rows of prepared local data hold seq_len + 1 ids
    grids: list  # NER sweep grids under configs/sweeps/
    overrides: list = field(default_factory=list)  # section.key=value for every pretraining run
    ner_overrides: list = field(default_factory=list)  # ner.key=value for every sweep
    smoke: bool = False  # passed to the analysis notebooks
    phase_size: str = "demo"  # the model of paper 1 Fig. 6's phase transition (large in the paper)
    sweep_size: str = "demo"  # the model of paper 2's checkpoint sweep (medium in the paper)

ARMS = ("maml", "vanilla")

PROFILES = {
    "demo": Profile("demo", "runs", ["demo"], "", 2, 128, ["demo"]),
    "smoke": Profile("smoke", "runs/smoke", ["demo"], "", 1, 128, ["smoke"], smoke=True, overrides=[
        "model.n_layers=2", "train.steps=4", "train.save_every=2", "train.log_spaced_checkpoints=false",
        "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=1", "eval.every=2",
        "eval.max_rows=8", "spectra.every=2", "spectra.grad_rows=2", "smlmt.n_way=8", "smlmt.k_shot=2",
        "smlmt.q_query=2", "smlmt.window=16"]),
    "paper": Profile("paper", "runs", ["tiny", "small", "medium", "large"], "pico-", 4, 2048, ["paper1", "paper2"],
                     phase_size="large", sweep_size="medium"),
}

# %%
assert set(PROFILES) == {"demo", "smoke", "paper"}
for p in PROFILES.values():
    for g in p.grids: assert (PRESETS_DIR / "sweeps" / f"{g}.yaml").is_file(), g

# %% [markdown]
# ## Which runs
#
# `pretraining_runs` expands a profile into `(preset, overrides, run_name)` triples. With seeds, the
# run name gets `-seed<k>` and `train.seed=<k>`, so each arm is run once per seed and the notebooks can
# put bootstrap intervals on the tables.

# %%
#| export
def preset_path(profile: Profile, size: str, arm: str) -> Path:
    "The preset of one arm and size: demo.yaml / demo-vanilla.yaml, or pico-<size>-<arm>.yaml."
    if profile.preset_prefix: return PRESETS_DIR / f"{profile.preset_prefix}{size}-{arm}.yaml"
    return PRESETS_DIR / ("demo.yaml" if arm == "maml" else "demo-vanilla.yaml")

def pretraining_runs(profile: Profile, seeds=()) -> list[tuple[Path, list, str]]:
    "Every pretraining run of a profile as (preset, overrides, run name)."
    runs = []
    for size in profile.sizes:
        for arm in ARMS:
            for seed in (seeds or [None]):
                name = f"{profile.preset_prefix}{size}-{arm}" + (f"-seed{seed}" if seed is not None else "")
                extra = [f"logging.runs_dir={profile.runs_dir}", f"logging.run_name={name}"]
                if seed is not None: extra.append(f"train.seed={seed}")
                runs.append((preset_path(profile, size, arm), profile.overrides + extra, name))
    return runs

# %%
demo_runs = pretraining_runs(PROFILES["demo"])
assert [r[2] for r in demo_runs] == ["demo-maml", "demo-vanilla"]
assert [r[2] for r in pretraining_runs(PROFILES["paper"], seeds=[1, 2])][:2] == ["pico-tiny-maml-seed1", "pico-tiny-maml-seed2"]
for preset, overrides, name in demo_runs + pretraining_runs(PROFILES["paper"]) + pretraining_runs(PROFILES["smoke"]):
    cfg = load_config(preset, overrides)
    assert cfg.logging.run_name == name and (cfg.maml.rho == 0) == name.split("-")[-1].startswith("vanilla")

# %% [markdown]
# ## Is a stage done?
#
# A run is finished when its `checkpoints/latest` names the configured last step. Prepared data is
# there when its manifest is.

# %%
#| export
def run_finished(preset, overrides) -> bool:
    "True when the run's latest checkpoint is its final step."
    cfg = load_config(preset, overrides)
    latest = Path(cfg.logging.runs_dir) / cfg.logging.run_name / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{cfg.train.steps:06d}"

# %%
import tempfile
with tempfile.TemporaryDirectory() as tmp:
    preset, overrides, name = pretraining_runs(PROFILES["demo"])[0]
    overrides = overrides + [f"logging.runs_dir={tmp}"]
    assert not run_finished(preset, overrides)
    (Path(tmp) / name / "checkpoints").mkdir(parents=True)
    steps = load_config(preset).train.steps
    (Path(tmp) / name / "checkpoints" / "latest").write_text(f"step_{steps - 1:06d}\n")
    assert not run_finished(preset, overrides)
    (Path(tmp) / name / "checkpoints" / "latest").write_text(f"step_{steps:06d}\n")
    assert run_finished(preset, overrides)

# %% [markdown]
# ## Commands
#
# Each stage is a subprocess, exactly the command a person would type, so the pipeline adds no
# behaviour of its own. Several processes go through `torch.distributed.run` (torchrun) with
# `--standalone`, which picks a free port; one process is a plain `python -m picomaml.launch`.

# %%
#| export
def launch_command(preset, overrides, nproc: int) -> list[str]:
    "The command that pretrains one run on `nproc` processes."
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        head = [sys.executable]
    return head + ["-m", "picomaml.launch", "--config", str(preset), *overrides]

def prepare_command(src, out, seq_len: int) -> list[str]:
    "The command that pretokenizes raw documents into shards."
    return [sys.executable, "-m", "picomaml.data", "prepare", "--src", str(src), "--out", str(out), "--seq-len", str(seq_len)]

def sweep_command(grid: str, runs_dir, overrides=()) -> list[str]:
    "The command that runs one NER grid, appending to `<runs_dir>/ner/<grid>-results.jsonl`."
    return [sys.executable, "-m", "picomaml.sweep", "--grid", str(PRESETS_DIR / "sweeps" / f"{grid}.yaml"),
            "--out", str(Path(runs_dir) / "ner" / f"{grid}-results.jsonl"), *overrides]

# %%
assert launch_command("c.yaml", ["a.b=1"], 2)[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
assert launch_command("c.yaml", [], 1)[1:] == ["-m", "picomaml.launch", "--config", "c.yaml"]
assert sweep_command("demo", "runs")[-1].endswith("runs/ner/demo-results.jsonl")

# %% [markdown]
# ## The analysis notebooks
#
# Every notebook `nbs/2N_*.ipynb` after the shared helpers (`20_report`) is an analysis notebook with a
# papermill `parameters` cell. The pipeline re-executes each with the profile's runs and writes the
# executed copy next to the runs (`<runs_dir>/reports/`), never over the source notebook. The demo
# writes into the repository's `figures/` and `paper_tables/` (those are committed); the smoke run
# writes under its own runs directory so CI never touches the committed outputs.

# %%
#| export
NBS_DIR = PRESETS_DIR.parent / "nbs"

def analysis_notebooks(nbs_dir=NBS_DIR) -> list[Path]:
    "The analysis notebooks, in order."
    return sorted(p for p in Path(nbs_dir).glob("2[1-9]_*.ipynb"))

def report_parameters(profile: Profile, seeds=(), out_dir=None) -> dict:
    "The papermill parameters for every analysis notebook of a profile (absolute paths)."
    root = PRESETS_DIR.parent
    out = (root / out_dir).resolve() if out_dir else root  # the notebooks run in nbs/: paths must be absolute
    runs = (root / profile.runs_dir).resolve()
    ner = runs / "ner"
    return dict(runs_dir=str(runs), figures_dir=str(out / "figures"), tables_dir=str(out / "paper_tables"),
                sizes=list(profile.sizes), arms=list(ARMS), run_prefix=profile.preset_prefix,
                seeds=list(seeds) or [0],  # seed 0: run names without a -seed suffix
                ner_dir=str(ner), ner_results=[str(ner / "*-results.jsonl")], smoke=profile.smoke,
                phase_size=profile.phase_size, sweep_size=profile.sweep_size)

# %%
_params = report_parameters(PROFILES["smoke"], out_dir="/tmp/x")
assert _params["figures_dir"] == "/tmp/x/figures" and _params["smoke"] and _params["runs_dir"].endswith("runs/smoke")
assert Path(report_parameters(PROFILES["smoke"], out_dir="runs/smoke")["tables_dir"]).is_absolute()
import papermill
for nb in analysis_notebooks():  # every notebook declares the parameters every profile passes to all
    declared = papermill.inspect_notebook(str(nb))
    assert {"runs_dir", "figures_dir", "tables_dir", "sizes", "seeds", "smoke"} <= set(declared), nb.name

# %%
#| export
def execute_reports(params: dict, reports_dir, notebooks=None) -> None:
    "Re-execute every analysis notebook with those of `params` it declares (papermill, cwd nbs/)."
    import papermill
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    for nb in notebooks or analysis_notebooks():
        declared = papermill.inspect_notebook(str(nb))
        print(f"  executing {nb.name}", flush=True)
        papermill.execute_notebook(str(nb), str(reports_dir / nb.name), kernel_name="python3", cwd=str(nb.parent),
                                   parameters={k: v for k, v in params.items() if k in declared}, progress_bar=False)

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

def call(cmd: list[str]) -> None:
    "Run a command; a failure stops the pipeline naming the command."
    print("  $ " + " ".join(map(str, cmd)), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"[pipeline] failed: {' '.join(map(str, cmd))}")

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
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged

# %%
_t = {}
timed("a", _t, True, lambda: 1 / 0)
timed("b", _t, False, lambda: None)
assert _t["a"] is None and _t["b"] >= 0 and "| a | skipped |" in format_timings(_t)
with tempfile.TemporaryDirectory() as tmp:
    save_timings({"pretrain": 100.0, "reports": 20.0}, Path(tmp) / "t.json")
    assert save_timings({"pretrain": None, "reports": 21.0}, Path(tmp) / "t.json") == {"pretrain": 100.0, "reports": 21.0}

# %%
#| export
def prepare_stages(profile: Profile, timings: dict) -> None:
    "Pretokenize $PICOMAML_DATA/corpus/{train,eval} into data/pretokenized/ (local profiles only)."
    data = os.environ.get("PICOMAML_DATA")
    if not data:
        raise SystemExit("[pipeline] PICOMAML_DATA is not set: point it at a directory with corpus/train, corpus/eval "
                         "and tokenizer/ (the Makefile uses ../shared/data), or use the `paper` profile (Hub data)")
    for split in ("train", "eval"):
        out = PRESETS_DIR.parent / "data" / "pretokenized" / split
        timed(f"prepare {split}", timings, (out / "manifest.json").is_file(),
              lambda: call(prepare_command(Path(data) / "corpus" / split, out, profile.seq_len)))

def run_pipeline(profile: Profile, seeds=(), stages=("data", "pretrain", "ner", "reports")) -> dict:
    "Run a profile's stages in order, skipping what is done; returns the stage timings."
    timings = {}
    os.chdir(PRESETS_DIR.parent)  # presets, data/ and runs/ are relative to the repository root
    if "data" in stages and profile.name != "paper": prepare_stages(profile, timings)
    if "pretrain" in stages:
        for preset, overrides, name in pretraining_runs(profile, seeds):
            timed(f"pretrain {name}", timings, run_finished(preset, overrides),
                  lambda: call(launch_command(preset, overrides, profile.nproc)))
    if "ner" in stages:
        for grid in profile.grids:
            timed(f"ner sweep {grid}", timings, False,
                  lambda: call(sweep_command(grid, profile.runs_dir, profile.ner_overrides)))
    if "reports" in stages:
        out_dir = Path(profile.runs_dir) if profile.smoke else None
        timed("reports", timings, False, lambda: execute_reports(
            report_parameters(profile, seeds, out_dir), Path(profile.runs_dir) / "reports"))
    print(format_timings(timings))
    save_timings(timings, Path(profile.runs_dir) / f"timings-{profile.name}.json")
    return timings

# %% [markdown]
# ## The command line
#
# ```sh
# python -m picomaml.pipeline demo                 # make demo
# python -m picomaml.pipeline demo --seeds 1 2 3   # each arm once per seed
# python -m picomaml.pipeline paper --nproc 4      # the papers' scale on one node of 4 GPUs
# python -m picomaml.pipeline smoke                # every output file, in minutes (CI)
# python -m picomaml.pipeline demo --stages reports  # only re-execute the notebooks
# ```

# %%
#| export
def main(argv=None) -> dict:
    "`python -m picomaml.pipeline PROFILE [--seeds ...] [--nproc N] [--stages ...]`."
    p = argparse.ArgumentParser(prog="python -m picomaml.pipeline", description=__doc__)
    p.add_argument("profile", choices=sorted(PROFILES))
    p.add_argument("--seeds", type=int, nargs="*", default=[], help="run each arm once per seed")
    p.add_argument("--nproc", type=int, default=None, help="processes per pretraining run (default: the profile's)")
    p.add_argument("--stages", nargs="*", default=["data", "pretrain", "ner", "reports"],
                   choices=["data", "pretrain", "ner", "reports"])
    args = p.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.nproc: profile = Profile(**{**profile.__dict__, "nproc": args.nproc})
    return run_pipeline(profile, args.seeds, args.stages)

if __name__ == "__main__" and "__file__" in globals(): main()

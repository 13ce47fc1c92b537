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
# # picomaml
#
# > Meta-pretraining small LLaMA-style decoders with first-order MAML on SMLMT episodes, their
# > learning dynamics, and zero-shot cross-lingual NER — a reproducible, notebook-first artifact.
#
# This repository re-implements two papers from their text:
#
# 1. *Learning Dynamics of Meta-Learning in Small Model Pretraining* (Africa, Weiss, Buttery, Diehl Martinez)
# 2. *Meta-Pretraining for Zero-Shot Cross-Lingual NER in Low-Resource Philippine Languages*
#
# A Pico decoder (RMSNorm, grouped-query attention with 12 query / 4 key-value heads, RoPE, SwiGLU,
# 12 blocks; d = 96/384/768/1536) is pretrained with a hybrid rule: each micro-batch is, with
# probability rho = 0.5, a first-order MAML episode on a 32-way 4-shot subset-masked LM task (only a
# small MLP head adapts in the inner loop), and otherwise an ordinary next-token step. The matched
# vanilla arm is the same run with rho = 0. We then follow singular-value spectra and proportional
# effective rank of weights and gradients, Paloma perplexity and episode accuracies through training,
# and finetune linear and CRF heads on Universal NER, evaluating zero-shot on Tagalog and Cebuano.
#
# We implement the papers as written. Where the authors' released trainer did something else
# (512-token sequences, inner lr 0.01, no cosine decay, a vocabulary-indexed head, ...), a
# `released-*` preset reproduces that behaviour so the two can be compared.

# %% [markdown]
# ## Two commands
#
# On a fresh clone (Python 3.10+, network access to PyPI; `../shared/data` beside the clone or
# `PICOMAML_DATA` pointing at a directory of the same layout, otherwise the Hugging Face Hub):
#
# ```sh
# make demo   # creates .venv, exports the package, prepares data, runs the CPU demo
# make test   # creates .venv, checks notebooks are clean and the package in sync, runs nbdev_test and pytest (the rehearsal included)
# ```
#
# `make` installs the pinned `requirements.txt` into `.venv` (torch 2.13.0: the CPU wheel where no
# CUDA is present, the CUDA build on a GPU machine). `environment.yml` carries the same pins for conda.
#
# Measured on 2026-12-04 on a 2-core, 24 GB machine with nothing else running, `.venv` already built
# (building it took about 1.5 minutes): `make demo` 9 minutes (540 s), `make test` 22 minutes
# (1,304 s, pytest on two workers; without Chromium, so the docs site's browser test, about 65 s
# more, was skipped). Each writes its stage times to `runs/timings-demo.json` and
# `runs/timings-test.json`; `benchmarks/README.md` breaks them down.

# %% [markdown]
# ## Running the pieces by hand
#
# ```sh
# source .venv/bin/activate && nbdev_export                       # after editing a notebook
# torchrun --standalone --nproc_per_node=4 -m picomaml.launch --config configs/pico-large-maml.yaml
# python -m picomaml.launch --config configs/demo.yaml train.steps=40   # one process, any override
# python -m picomaml.launch --help                                # every option with its comment
# python -m picomaml.ner_sweep --grid configs/sweeps/paper1.yaml --out runs/ner/paper1-results.jsonl
# python -m picomaml.spectra --checkpoints runs/pico-large-maml/checkpoints --batch data/pretokenized/eval --out spectra.jsonl
# mkdir -p runs/reports && papermill nbs/21_paper1_pretraining.ipynb runs/reports/21.ipynb --cwd nbs -y 'sizes: [tiny, small, medium, large]'
# python -m picomaml.plan --config configs/pico-large-maml.yaml --gpus 4 --gpu-memory-gb 80 --gpu-tflops 312   # will it fit?
# make rehearse                                                    # the paper profile end to end, shrunk, on CPU
# make docs                                                        # the site in _docs/: every notebook executed (21-24 on make demo's runs), the API
# python -m picomaml.pipeline paper --nproc 4 --seeds 42 1 2       # everything at the papers' scale, three seeds
# make released                                                    # the NER grids over the authors' checkpoints, one GPU
# python -m picomaml.pipeline released --plan                      # what make released reads and computes (no Hub, no GPU)
# ```
#
# Several nodes: the same `torchrun` with `--nnodes`, `--node_rank` and `--rdzv-endpoint` on each
# node, or `srun python -m picomaml.launch ...` under SLURM (see `07_launch`). Runs resume from their
# latest valid checkpoint by default. A run that gets SIGTERM (a preemption, a time limit) saves the
# step in hand and exits with status 75 for a requeue. A second launch on a run directory or a
# results file that is in use is refused with the holder's host and pid, a full disk ends in one
# line naming the file and loses nothing written before, and every reader checks a checkpoint's
# digests before it trusts it. `docs/cluster.md` has the SLURM job script, what torchrun does with
# the signal, what a shared file system must provide, the locks and the checks.

# %% [markdown]
# ## Running the papers at scale
#
# `make paper` (`python -m picomaml.pipeline paper --nproc 4`) runs both papers on one node of 4 GPUs:
# the eight pretraining runs (four sizes × MAML and vanilla, 6,000 steps, 2,048-token rows, global
# batch 2,048 = 8 branch micro-batches of 256, 1,024 = 4 × 256 for tiny), streaming
# `pico-lm/pretokenized-dolma` and Paloma from the Hub, the NER grids of both papers, and the four
# analysis notebooks, which then regenerate `figures/` and `paper_tables/`. Add `--seeds 42 1 2` for
# three pretraining seeds (intervals over seeds in every table). Every stage skips what is done, so a
# killed pipeline is relaunched with the same command; a run resumes from its newest checkpoint.
#
# Every stage runs on the GPUs. Before any work the pipeline checks that CUDA can serve four GPUs; if
# it cannot (a CPU-only torch wheel, a driver older than the wheel, `CUDA_VISIBLE_DEVICES` empty, a
# container started without GPUs) it stops with one line naming the likely cause (`--device cpu` runs
# it on the CPU anyway). bf16 is used on GPUs of compute capability 8.0 or newer, float32 below. The
# NER stage starts one worker process per GPU (`python -m picomaml.ner_sweep ... --device cuda
# --workers 4`): the workers share the grid's jobs through claim files, each finetuning its own checkpoints on
# its own GPU, and append to one resumable results file under its lock; a worker killed mid-job leaves
# nothing that blocks the relaunch, which reruns that job. The spectra command takes `--device` too.
#
# Before renting GPUs, ask the planner (`06_plan`): it prints each phase's memory, the memory chunk it
# will use, the time at an assumed MFU and the checkpoint disk, and exits 2 with the setting to change
# when a configuration does not fit (the launcher refuses the same configurations before step 1).
# Its predictions for 4 × A100-80GB (312 TFLOP/s bf16) at 40 % MFU:
#
# | preset | parameters | memory chunk (rows of 64 per GPU) | peak GiB per GPU (phase) | hours | checkpoints GiB |
# |---|---|---|---|---|---|
# | pico-tiny-maml / -vanilla | 11.3M | 64 | 27.3 (spectra) | 0.2 / 0.5 | 2.8 |
# | pico-small-maml / -vanilla | 64.7M | 64 | 45.0 (next-token chunk) | 2.7 / 5.4 | 16.1 |
# | pico-medium-maml / -vanilla | 181.2M | 32 | 47.1 (next-token chunk) | 7.7 / 15.2 | 45.2 |
# | pico-large-maml / -vanilla | 570.0M | 22 | 69.8 (next-token chunk) | 24.3 / 47.8 | 142.3 |
#
# A MAML run is about half the FLOPs of its vanilla arm (an episode runs 256 windows of 64 tokens,
# not 256 rows of 2,048). All eight runs take about 104 GPU-node hours at that MFU, and their
# checkpoints (61 each: weights at every 100 steps, the optimizer state only in the newest two, see
# `checkpoint.keep_state`) need about **413 GiB** of disk per pretraining seed; the NER results and
# logs are a few GB more. `configs/pico-large-maml.yaml` does not fit 4 × 16 GB GPUs: the planner says
# which setting to change. The spectra's gradient pass runs in float32, where PyTorch's attention on
# CUDA takes its math kernel and keeps a (rows, 12, 2,048, 2,048) softmax per block (tiny's peak); the
# planner counts it and runs the pass in row groups that fit (`spectra.grad_batch`). These numbers are
# a model (`06_plan` validates it on CPU within 3 %, the math kernel's term included by forcing that
# kernel); `benchmarks/gpu_check.sh` runs the paper path on a GPU node in at most 8 minutes and writes
# `benchmarks/results-gpu.md`: (a) optimizer steps of every size at the planner's chunk, eager and
# compiled, with tokens/s, MFU, each phase's peak memory against the plan and the attention kernel
# PyTorch selected; (b) the rehearsal's shrunk paper run through the real commands on one GPU
# (evaluation, spectra, a checkpoint killed and resumed, NER jobs), each phase's peak against the plan;
# (c) with two GPUs, two NCCL processes against one. `bash benchmarks/gpu_check.sh --dry` runs the same
# code on CPU, and `make test` runs it. It has not yet run on a GPU.
#
# `make rehearse` runs that same `paper` profile, every preset, grid, stage and notebook, with two
# pretraining seeds and the data streamed through the Hub code path from local copies, under one
# shrink transform applied by code (`30_pipeline`): about 11 minutes and 2.2 GB on two CPU cores (2026-12-02;
# its 20 pretraining runs, the released reading's four included, take 6 of them).
# `make test` runs it, so the path `make paper` takes is exercised on every change.

# %% [markdown]
# ## Where data comes from
#
# Every data source is resolved in the same order: a path in the configuration, else the
# `PICOMAML_DATA` directory (the Makefile sets it to `../shared/data` when that exists), else the Hub:
#
# | what | Hub | local layout under `PICOMAML_DATA` |
# |---|---|---|
# | pretraining rows | `pico-lm/pretokenized-dolma` | `pretokenized/train/*.parquet` (or raw `corpus/train`, see `prepare`) |
# | Paloma evaluation | `pico-lm/pretokenized-paloma-tinsy` | `pretokenized/eval/*.parquet` (or raw `corpus/eval`) |
# | tokenizer | `allenai/OLMo-7B-0724-hf` | `tokenizer/olmo-7b-0724-tokenizer.json` |
# | Universal NER | `universalner/universal_ner` | `uner/<dataset>/<dataset>-ud-<split>.iob2` |
#
# Set `HF_HUB_OFFLINE=1` when no network is available, so Hub lookups fail at once instead of retrying.

# %% [markdown]
# ## What the demo shows
#
# `make demo` runs the whole method at toy scale on two CPU cores: it pretokenizes the 1,060 local C4
# and Common Crawl documents into 128-token rows, pretrains the tiny architecture (d = 96, 12 blocks,
# the full 50,304-id vocabulary) for 90 optimizer steps twice — the MAML arm (rho = 0.5, 32-way 4-shot
# episodes) and the matched vanilla arm (rho = 0) — on two gloo processes each, records spectra and
# Paloma-style perplexity along the way, finetunes linear and CRF heads on Universal NER over the final
# and intermediate checkpoints, and re-executes the analysis notebooks (21–24, then the scorecard). Every table and figure of
# both papers (31 in all, listed in `00_names`) is regenerated into `figures/` and `paper_tables/`; the ones committed
# here come from that run. `make compare` then reports, cell by cell, how a rerun's tables and figures
# differ from the committed ones, without rerunning anything: a rerun on the same machine reproduces
# them exactly; on another CPU a cell with an interval counts as reproduced when the rerun lies inside
# the committed interval or the intervals overlap, a relative change on a near-zero F1 (marked
# "base ≈ 0") by its absolute F1, and a bare number (a loss, a perplexity) when within 5 %.
#
# ![Paper 1, Figure 1 at demo scale](figures/p1_fig1_loss_paloma.png)
#
# Both arms learn: next-token loss falls from 11.0 to `7.49` (vanilla) and `7.79` (MAML) in 90
# steps (`p1_table2_loss_paloma`). At equal optimizer steps the MAML arm has taken half as many
# next-token steps, so its next-token loss and its Paloma perplexity (the mean of per-document
# perplexities over the whole evaluation split, the papers' measure: `13125.83` against vanilla's
# `7296.94`) trail the vanilla arm's: the perplexity trade-off paper 1 reports at most scales (its
# Table 2), here at a scale where it is mostly a count of steps. The logged objective, the loss the
# paper's Table 2 and Fig. 1 show, reads `6.06` for MAML because half its draws are 32-way query
# losses (at most ln 32 ≈ 3.47): by that loss MAML "reaches" the vanilla arm's final loss `64.00`
# times sooner, by the next-token loss `not reached` (`p1_text_speedup`; paper 1 §4: 1.3–1.6×).
#
# ![Paper 1, Figure 3 at demo scale](figures/p1_fig3_support_query_acc.png)
#
# Support and query accuracy of the 32-way episodes stay at chance (1/32 ≈ 0.031), and the head
# before its inner loop (φ_0, dashed) scores as the adapted head (φ_T, solid) does: at the end,
# query accuracy `0.030` for φ_T and `0.034` for φ_0, support accuracy `0.032` for both
# (`p1_text_episode_accuracy`). That is the papers' inner loop as written (ten steps at 1e-3), which
# `05_maml` shows cannot move the head even on separable features; `tests/test_learnability.py`
# shows the same loop learning once the inner loop can adapt, and the released trainer's reading
# reaching high accuracy without adapting (`docs/settings.md`, "Two readings of the episode branch";
# `make rehearse` and `make paper` draw that reading in the right-hand column).
#
# ![Paper 1, Figure 5 at demo scale](figures/p1_fig5_per.png)
#
# **NER at demo scale.** 90 steps on 184k tokens leave both backbones with little to offer a
# head-only probe: its in-language micro-F1 is `0.000 [0.000, 0.000]` for both arms on en_ewt
# (`p1_table7_head_only_f1`), so every head-only relative change rests on a vanilla F1 of about
# zero and says so (`base ≈ 0`). Full finetuning moves the backbone and does find entities, and
# paper 1's Table 3 reads `-20.9 [-42.3, +4.6] (F1 0.072 vs 0.091)` on the seen languages and
# `+15.0 [-34.6, +85.0] (F1 0.058 vs 0.050)` on Tagalog/Cebuano for MAML under full tuning (change in
# percent, 95 % interval over the test sentences, then the two absolute F1). These are single-seed
# toy numbers that show the pipeline ends in real tables, not evidence about the method; the
# papers' NER numbers need paper-scale backbones: `make paper` on GPUs, or the authors' released
# checkpoints on one GPU: `make released` runs both papers' NER grids over `pico-lm/pico-maml-decoder-*`
# and `pico-lm/pico-decoder-*` (their final models and, for paper 2's checkpoint sweep, the commits of
# each run's branch, one per saved step; every result row names the revision it used), then the
# notebooks and the scorecard, under `runs/released/`. What it costs, before it runs
# (`python -m picomaml.pipeline released --plan`, from the papers' checkpoint schedule and the UNER
# splits): paper 1's grid is 160 jobs on 8 checkpoints (6.6 GB of weights to read), paper 2's 222
# jobs on 69 (50.8 GB: the medium run's 61 steps); their backbone passes are at most 0.8 and 1.5 hours
# on one H100 at an assumed 10 % MFU, and the head-only jobs add 0.55 and 0.88 million head optimizer
# steps, which FLOPs do not measure (not yet timed on a GPU). `make test` runs the whole profile
# shrunk (`pipeline rehearse-released`, about 3 minutes) over a local mirror of eight small models
# in the release layout.
#
# **The scorecard.** Every run of the pipeline ends by scoring each number the two papers report
# (`docs/reported_numbers.csv`: 456 table cells and claims of the text) against our tables, into
# `paper_tables/scorecard.md` and `.csv` (the rule is stated there; `29_scorecard`). The demo's:
#
# > Scorecard (demo runs): 6 of 456 comparisons reproduced (0 of them with an interval that also holds no effect), 2 not reproduced, 448 not comparable at this scale; 456 reported numbers, a claim about several sizes compared once per size
#
# At demo scale only the properties of the data can be compared: paper 2's span statistics of the
# Slovak training set (its Table 4) are reproduced exactly, and its out-of-vocabulary rates (Table 5)
# are not (our definition, the share of test word tokens never seen in the Slovak training split,
# gives 0.745 and 0.723 against its 0.523 and 0.534; the paper defines none). `make paper` answers
# the rest.

# %% [markdown]
# ## How the repository is organised
#
# The notebooks in `nbs/` are the source and the documentation; `nbdev_export` writes the package
# `picomaml/` from them (never edit it by hand). Each notebook is paired with a jupytext `py:percent`
# file of the same name, which is the convenient one to edit: `make sync` regenerates the notebooks
# from the `.py` files, cleans them, exports the package and rebuilds this README.
#
# | notebook | concern | paper |
# |---|---|---|
# | `00_config` | nested dataclass configuration, presets, `section.key=value` overrides, range checks, what a resume may change | |
# | `00_cli` | command-line errors: one `error: ...` line and exit status 2 for every mistake a user can fix; output directories checked before any work | |
# | `00_device` | which device a process runs on: why CUDA is unusable, bf16 by compute capability, peak FLOP/s by GPU name, the CUDA allocator, SLURM GPU binding | |
# | `00_names` | one home for sizes, arms, run names, dataset groups, checkpoint and output names | |
# | `00_runlog` | the one writer of every run file: durable, checked appends; torn-line reader; atomic replacement; full-disk errors; one writer per run directory and results file | |
# | `01_model` | the Pico decoder; safetensors/Hub checkpoints that load the released models | P1 §3.1 |
# | `02_tokenizer` | the OLMo tokenizer, `[MASK]` = 50,280, word tables for SMLMT | P1 §3.2 |
# | `03_data` | `prepare` raw text into Pico's parquet rows; deterministic sharding and exact resume | P1 §3.3 |
# | `04_smlmt` | vectorised, seeded N-way K-shot subset-masked episodes | P1 §3.2, Table 1 |
# | `05_maml` | the first-order MAML head step on cached support features | P1 §3, App. A |
# | `06_checkpoints` | the run directory: atomic checkpoints, digests, optimizer state of the newest few, resume lookup | P2 §4.1, App. F |
# | `06_collectives` | how ranks share a step: branch micro-batches and rows per rank, the shared branch draw, gathered pools and support features, one gradient sum | P1 App. A.1; P2 App. C.1 |
# | `06_layout` | the frozen layout of a step (draws, rows per rank, memory chunk, episode pools) and the run object the loop's pieces take | P1 App. A |
# | `06_lm_loss` | the fused next-token loss, memory chunks with the same gradient, Paloma perplexities | P1 App. A, §3.3 |
# | `06_monitor` | the `metrics.jsonl` record of each step, Paloma evaluation over ranks, spectra, and when each is due | P1 §3.3 |
# | `06_plan` | the resource planner: memory per phase, the memory chunk, FLOPs, wall time, checkpoint disk | |
# | `06_resume` | resume or start: the checkpoint and settings a relaunch continues from, every rank's training state, NaN stops, known-good checkpoints | |
# | `06_train` | the hybrid loop over branch micro-batches: learning-rate schedule, model and AdamW, the two branches, `train` | P1 App. A, §3.3 |
# | `07_launch` | `torchrun` / SLURM / one-process launcher | |
# | `08_spectra` | singular values and proportional effective rank of weights and gradients | P1 §6 |
# | `09_phases` | change-point detection of phase transitions | P1 §6, Fig. 6 |
# | `10_ner_data` | Universal NER reading, sub-token alignment, span/particle/OOV statistics | P1 §3.4; P2 §2.5 |
# | `11_crf_metrics` | the linear-chain CRF (log-partition, likelihood, Viterbi, marginals); seqeval micro- and per-tag F1; loss-curve speed | P2 §2.5, §5 |
# | `11_ner_finetune` | linear and CRF heads, head-only and full finetuning, zero-shot evaluation | P1 §5; P2 §3 |
# | `12_ner_sweep` | the resumable finetuning grid | P1 App. B; P2 §4 |
# | `20_report` | shared readers, styles and writers of the analysis notebooks | |
# | `21_paper1_pretraining`, `22_paper1_ner` | every table and figure of paper 1 | P1 |
# | `23_paper2_ner`, `24_paper2_indicators` | every generated table and figure of paper 2 | P2 |
# | `29_scorecard` | the reproduction scorecard: each number the papers report beside ours, its interval and a verdict | |
# | `30_pipeline` | `make demo` / `make paper` / `make rehearse`: every stage, skipped when done, timed | |
# | `90_devtools` | README generation and the artifact's consistency checks | |
#
# Configuration presets: `configs/pico-{tiny,small,medium,large}-{maml,vanilla}.yaml` (the papers'
# settings), `configs/released-{size}-maml.yaml` (the released trainer's), `configs/demo.yaml` (CPU).
# Outputs: `runs/` (run directories), `figures/`, `paper_tables/`.

# %%
from picomaml.config import PRESETS_DIR, load_config

demo = load_config(PRESETS_DIR / "demo.yaml")
print(f"demo: d={demo.model.d_model}, seq_len={demo.data.seq_len}, steps={demo.train.steps}, rho={demo.maml.rho}")

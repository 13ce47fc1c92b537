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
# # Spectra
#
# > Singular values and proportional effective rank of weights and of next-token-loss gradients,
# > recorded during training and recomputed afterwards from checkpoints or Hub repositories.
#
# Paper 1 §6 (Figures 5–6) tracks the *proportional effective rank* (PER) of attention and
# feed-forward matrices, for the weights and for their gradients, every 100 steps (paper 1 §3.3).
# Two departures of the released analysis are fixed here (`docs/released-trainer.md`, departure 18):
# gradients come from the **next-token cross-entropy loss** on a fixed evaluation batch, not from
# `logits.mean()`, and a layer name that matches no matrix is an error instead of a silently empty
# plot (the released "mlp" filter produced no feed-forward PER at all).

# %%
#| default_exp spectra

# %%
#| export
from __future__ import annotations

import argparse
import functools
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from picomaml.checkpoints import list_checkpoints, load_backbone
from picomaml.cli import ensure_writable, run_command
from picomaml.config import Config, ConfigError, DataConfig, MAMLConfig, SpectraConfig
from picomaml.device import DEVICE_CHOICES, configure_cuda_allocator, resolve_device
from picomaml.lm_loss import next_token_loss_sum
from picomaml.names import SPECTRA_KEY
from picomaml.plan import GIB, choose_spectra_batch, device_memory_gb
from picomaml.runlog import append_records, exclusive_lock, lock_file_of, read_records


# %% [markdown]
# ## Metrics of one spectrum
#
# Roy & Vetterli (2007), as in pico-analyze and paper 1 §6: with $p_i = s_i / \sum_j s_j$ over the
# singular values, the effective rank is $\mathrm{ER} = \exp(-\sum_i p_i \ln p_i)$ (natural log:
# pico-analyze's docstring says log2 but its code uses ln; `docs/released-trainer.md`, departure 19)
# and $\mathrm{PER} = \mathrm{ER}/n$ with $n$ the number of singular values, $\min(m, n)$ for an
# $m \times n$ matrix. Zero singular values contribute $0 \ln 0 = 0$. A zero matrix has no
# spectrum distribution, so its ER and PER are NaN. The condition number is $s_{max}/s_{min}$,
# infinite when $s_{min} = 0$; the Frobenius norm is $\sqrt{\sum s_i^2}$ and the nuclear norm $\sum s_i$.

# %%
#| export
def spectrum_metrics(s) -> dict:
    "PER, effective rank, condition number, Frobenius and nuclear norms of singular values `s`."
    s = np.asarray(s, dtype=np.float64)  # (n,) with n = min(rows, cols)
    if s.ndim != 1 or s.size == 0 or (s < 0).any():
        raise ValueError(f"expected a non-empty vector of non-negative singular values, got shape {s.shape}")
    nuclear = float(s.sum())
    if nuclear > 0:
        p = s / nuclear
        nz = p[p > 0]  # 0 ln 0 = 0
        effective_rank = float(np.exp(-(nz * np.log(nz)).sum()))
    else:
        effective_rank = math.nan
    s_min, s_max = float(s.min()), float(s.max())
    return {"per": effective_rank / s.size, "effective_rank": effective_rank,
            "condition_number": s_max / s_min if s_min > 0 else math.inf,
            "frobenius_norm": float(np.sqrt((s ** 2).sum())), "nuclear_norm": nuclear}


# %%
m = spectrum_metrics(np.ones(7))  # identity: all singular values equal
assert abs(m["per"] - 1) < 1e-12 and abs(m["effective_rank"] - 7) < 1e-12 and m["condition_number"] == 1
m = spectrum_metrics([3.0, 0, 0, 0, 0])  # rank one
assert abs(m["per"] - 1 / 5) < 1e-12 and m["condition_number"] == math.inf
assert m["frobenius_norm"] == 3 and m["nuclear_norm"] == 3
assert math.isnan(spectrum_metrics(np.zeros(4))["per"])

# %% [markdown]
# A diagonal matrix with spectrum (4, 2, 1, 1): $p = (1/2, 1/4, 1/8, 1/8)$, entropy
# $\frac12\ln 2 + \frac14\ln 4 + 2\cdot\frac18\ln 8 = \frac74 \ln 2$, so ER $= 2^{7/4}$ and PER $= 2^{7/4}/4$.

# %%
D = torch.diag(torch.tensor([1.0, 4.0, 1.0, 2.0]))
m = spectrum_metrics(torch.linalg.svdvals(D).numpy())
assert abs(m["effective_rank"] - 2 ** 1.75) < 1e-6 and abs(m["per"] - 2 ** 1.75 / 4) < 1e-6
assert abs(m["condition_number"] - 4) < 1e-6 and abs(m["frobenius_norm"] - math.sqrt(22)) < 1e-6


# %% [markdown]
# ## Singular values of a matrix
#
# `torch.linalg.svdvals` on the matrix's device, in float32 at least (bf16 weights are upcast).
# A rectangular $m \times n$ matrix has $\min(m, n)$ singular values, so its PER is normalised by
# $\min(m, n)$: a $3 \times 8$ matrix with orthonormal rows has PER 1, not $3/8$.

# %%
#| export
def singular_values(matrix: torch.Tensor) -> np.ndarray:
    "Singular values (descending, float64 numpy) of a 2-D tensor; min(m, n) of them."
    if matrix.ndim != 2: raise ValueError(f"expected a matrix, got a tensor of shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().to(torch.float32 if matrix.dtype != torch.float64
                                                   else torch.float64)).double().cpu().numpy()


# %%
Q, _ = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))  # (8, 3), orthonormal columns
s = singular_values(Q.T)  # (3, 8): three singular values, all 1
assert s.shape == (3,) and abs(spectrum_metrics(s)["per"] - 1) < 1e-6
assert singular_values(torch.randn(5, 2)).shape == (2,)

# %% [markdown]
# ## Which matrices
#
# A layer name is the part of a block's parameter name between `layers.N.` and `.weight`
# (`attention.{q,k,v,o}_proj`, `swiglu.w_{0,1,2}`; the default is `SpectraConfig.layers`:
# `attention.v_proj`, `attention.o_proj`, `swiglu.w_2`). Names are matched at the end of the full
# parameter name, so a model wrapped by Fabric, DDP or `torch.compile` (prefixes such as
# `_forward_module.` or `_orig_mod.`) still matches. A name that matches nothing is an error that
# lists the names the model has.

# %%
#| export
_BLOCK_MATRIX = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.weight$")

def select_matrices(model: torch.nn.Module, layers) -> dict:
    "`{(block index, layer name): weight parameter}` for every block and every name in `layers`."
    found = {}
    for name, param in model.named_parameters():
        match = _BLOCK_MATRIX.search(name)
        if match and param.ndim == 2: found[(int(match.group(1)), match.group(2))] = param
    available = sorted({layer for _, layer in found})
    for layer in layers:
        if layer not in available:
            raise ValueError(f"spectra.layers entry {layer!r} matches no matrix `layers.N.{layer}.weight` of "
                             "the model; "
                             f"valid names: {', '.join(available) or 'none (no layers.N.*.weight parameters)'}")
    return {key: found[key] for key in sorted(found) if key[1] in layers}


# %% [markdown]
# The tests use a small `picomaml.model.PicoDecoder` (two blocks, d 16, 4 query and 2 key/value
# heads, a 64-token vocabulary), whose parameter names are the released checkpoints'.

# %%
import copy
import tempfile

from torch import nn

from picomaml.config import ModelConfig
from picomaml.model import PicoDecoder, save_pretrained

torch.manual_seed(0)
toy = PicoDecoder(ModelConfig(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=32, vocab_size=64,
                              max_seq_len=32))
toy_batch = torch.randint(0, 64, (3, 9))  # (B, T + 1): inputs ids[:, :-1], targets ids[:, 1:]

# %%
from picomaml.devtools import raises

chosen = select_matrices(toy, ["attention.v_proj", "swiglu.w_2"])
assert list(chosen) == [(0, "attention.v_proj"), (0, "swiglu.w_2"), (1, "attention.v_proj"), (1, "swiglu.w_2")]
assert chosen[(1, "swiglu.w_2")] is toy.layers[1].swiglu.w_2.weight
wrapped = nn.Module(); wrapped._forward_module = toy  # how Fabric names a wrapped model's parameters
assert select_matrices(wrapped, ["attention.q_proj"]).keys() == select_matrices(toy, ["attention.q_proj"]).keys()
raises(lambda: select_matrices(toy, ["mlp"]), "'mlp'", "swiglu.w_2", kind=ValueError)


# %% [markdown]
# ## Gradients of the next-token loss
#
# The gradient of each chosen matrix is that of the mean next-token cross-entropy on the fixed
# evaluation batch: rows of `seq_len + 1` ids, inputs `ids[:, :-1]`, targets `ids[:, 1:]`
# (the papers do not say which loss; `docs/settings.md` gives our choice). `torch.autograd.grad`
# returns the gradients without touching any `.grad` buffer, so a call between two training steps
# cannot leak into the optimizer's gradients. The model runs in eval mode for the call (no dropout;
# its mode is restored afterwards).
#
# The rows go through the model `batch_rows` at a time and the gradients are summed: each group's
# summed loss is divided by the targets of *all* the rows, so the sum over groups is the gradient
# of the mean over all of them, whatever the group size. The group size is memory only: the planner
# (`06_plan`) chooses the largest that fits the device, since a float32 pass with grouped-query heads
# takes PyTorch's math attention kernel on CUDA and keeps a (rows, H, T, T) softmax per block. When
# the ranks of a run share the rows, each passes its share and the denominator of the whole; the
# sums are then added over ranks (`06_monitor`). A share without rows calls no backbone.

# %%
#| export
def loss_gradients(model: torch.nn.Module, rows: torch.Tensor, params: dict, batch_rows: int | None = None,
                   denominator: int | None = None) -> dict:
    ("Gradients w.r.t. `params` of the summed next-token loss of `rows` (B, T + 1) / `denominator` "
     "(default: its targets); .grad untouched.")
    device, denominator = next(model.parameters()).device, denominator or rows[:, 1:].numel()
    sums = {key: torch.zeros_like(p) for key, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for group in rows.split(batch_rows or len(rows)) if len(rows) else ():  # (<= batch_rows, T + 1)
                loss = next_token_loss_sum(model, group.to(device, non_blocking=True)) / denominator
                for key, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                    if g is not None: sums[key] += g
    finally:
        model.train(was_training)
    return sums


# %% [markdown]
# Tests: the gradients equal the ordinary backward pass of the mean loss; groups of one, two or all
# three rows give the same gradient (to float32 rounding); two shares of the rows with the whole
# denominator add up to it; no rows give zeros.

# %%
from picomaml.lm_loss import next_token_loss

params = select_matrices(toy, ["attention.o_proj"])
grads = loss_gradients(toy, toy_batch, params)
reference = copy.deepcopy(toy)
next_token_loss(reference, toy_batch).backward()  # the ordinary backward pass is the reference
assert all(torch.allclose(grads[(i, "attention.o_proj")], reference.layers[i].attention.o_proj.weight.grad, atol=1e-6)
           for i in (0, 1))
assert all(p.grad is None for p in toy.parameters())
for group in (1, 2, 3):
    assert all(torch.allclose(g, grads[k], atol=1e-6) for k, g in loss_gradients(toy, toy_batch, params, group).items())
shares = [loss_gradients(toy, toy_batch[r::2], params, 1, denominator=toy_batch[:, 1:].numel()) for r in (0, 1)]
assert all(torch.allclose(shares[0][k] + shares[1][k], grads[k], atol=1e-6) for k in grads)
assert all(torch.equal(g, torch.zeros_like(g))
           for g in loss_gradients(toy, toy_batch[:0], params, 2, denominator=10).values())


# %% [markdown]
# ## The fixed evaluation batch
#
# Either a tensor of ids (rows of `seq_len + 1`) or a pretokenized parquet shard (or a directory of
# shards, read in name order) with an `input_ids` column, the format of `pico-lm/pretokenized-paloma-tinsy`
# and `picomaml.data`'s local sources. The first `rows` rows are used, cut to `seq_len + 1` ids
# when `seq_len` is given, so the same call in the training loop and after the fact gives the same batch.

# %%
#| export
def load_eval_batch(source, rows: int | None = None, seq_len: int | None = None) -> torch.Tensor:
    "The fixed evaluation batch (rows, seq_len + 1) from a tensor or a parquet shard/directory with `input_ids`."
    if isinstance(source, torch.Tensor): ids = source
    else:
        path = Path(source)
        shards = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not shards or not shards[0].is_file():
            raise FileNotFoundError(f"evaluation batch {path}: no parquet shard found "
                                    "(expected a .parquet file or a directory of them)")
        table, out = None, []
        for shard in shards:
            table = pq.read_table(shard)
            if "input_ids" not in table.column_names:
                raise ValueError(f"{shard} has no `input_ids` column (columns: {table.column_names}); "
                                 "expected pretokenized rows")
            out += table.column("input_ids").to_pylist()[: (rows or len(table)) - len(out)]
            if rows and len(out) >= rows: break
        lengths = {len(r) for r in out}
        if len(lengths) != 1: raise ValueError(f"{path}: `input_ids` rows have different lengths {sorted(lengths)[:5]}")
        ids = torch.tensor(out, dtype=torch.long)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"evaluation batch must be (rows, seq_len + 1) ids, got {tuple(ids.shape)}")
    if rows is not None and ids.shape[0] < rows:
        raise ValueError(f"evaluation batch has {ids.shape[0]} rows, {rows} requested (spectra.grad_rows)")
    return ids[: rows or None, : None if seq_len is None else seq_len + 1].long()  # rows 0: all of them


# %%
import pyarrow as pa

with tempfile.TemporaryDirectory() as tmp:
    pq.write_table(pa.table({"input_ids": toy_batch.tolist()}), Path(tmp) / "val-00000.parquet")
    assert torch.equal(load_eval_batch(tmp, rows=2), toy_batch[:2])
    assert torch.equal(load_eval_batch(Path(tmp) / "val-00000.parquet", rows=3, seq_len=4), toy_batch[:, :5])
    pq.write_table(pa.table({"text": ["a"]}), Path(tmp) / "bad.parquet")
    raises(lambda: load_eval_batch(Path(tmp) / "bad.parquet"), "bad.parquet", "input_ids", kind=ValueError)
assert load_eval_batch(toy_batch, rows=2).shape == (2, 9)


# %% [markdown]
# ## Records
#
# One JSON line per (step, block, matrix, kind ∈ {weight, gradient}) in `<run_dir>/spectra.jsonl`:
# the metrics and the singular values themselves (7 significant digits, float32 precision). JSON
# lines are appendable during training, and a crash mid-write damages at most the last line:
# the writer starts a new line if the file does not end with one, and the reader skips lines that
# are not complete JSON (with a warning naming the file and line): `00_runlog`'s `append_records`
# and `read_records`. A step recorded twice (a run resumed from an earlier checkpoint) keeps its last
# record.

# %%
#| export
def spectrum_record(step: int, layer: int, matrix: str, kind: str, tensor: torch.Tensor) -> dict:
    "One record: step, block, matrix name, kind, shape, metrics and singular values of `tensor`."
    s = singular_values(tensor)
    return {"step": int(step), "layer": int(layer), "matrix": matrix, "kind": kind, "shape": list(tensor.shape),
            **spectrum_metrics(s), "singular_values": [float(f"{v:.7g}") for v in s]}


# %% [markdown]
# ## Recording during training
#
# `record_spectra` is what the training loop calls every `spectra.every` steps (on rank 0, with the
# unwrapped module): weights and next-token-loss gradients of every chosen matrix, on the fixed
# evaluation batch (moved to the model's device).

# %%
#| export
def spectrum_records(step: int, params: dict, grads: dict) -> list:
    "Weight and gradient records of every selected matrix `{(block, name): weight}` with its gradient."
    return [spectrum_record(step, layer, matrix, kind, tensor) for (layer, matrix), weight in params.items()
            for kind, tensor in (("weight", weight), ("gradient", grads[(layer, matrix)]))]

def compute_spectra(model: torch.nn.Module, batch: torch.Tensor, layers, step: int,
                    batch_rows: int | None = None) -> list:
    "Weight and gradient spectrum records of `layers` in every block, gradients of the LM loss on `batch`."
    params = select_matrices(model, layers)
    return spectrum_records(step, params, loss_gradients(model, batch, params, batch_rows))

def record_spectra(model: torch.nn.Module, batch: torch.Tensor, layers, step: int, path,
                   batch_rows: int | None = None) -> list:
    "Compute the spectra of `layers` at `step` and append them to the JSON-lines file `path`."
    records = compute_spectra(model, batch, layers, step, batch_rows)
    append_records(path, records)
    return records


# %% [markdown]
# Recording changes nothing: weights and existing `.grad` buffers are bitwise identical afterwards,
# and the train/eval mode is restored.

# %%
with tempfile.TemporaryDirectory() as tmp:
    toy.train()
    next_token_loss(toy, toy_batch.flip(0)).backward()  # a training step's gradients, waiting for the optimizer
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in toy.named_parameters()}
    records = record_spectra(toy, toy_batch, ["attention.v_proj", "swiglu.w_2"], 7, Path(tmp) / "spectra.jsonl")
    assert all(torch.equal(p, before[n][0]) and torch.equal(p.grad, before[n][1]) for n, p in toy.named_parameters())
    assert toy.training and len(records) == 2 * 2 * 2  # blocks × matrices × kinds
    toy.zero_grad(set_to_none=True)
r = records[0]
assert (r["layer"], r["matrix"], r["kind"], r["shape"]) == (0, "attention.v_proj", "weight", [8, 16])
assert len(r["singular_values"]) == 8  # min(8, 16)


# %% [markdown]
# The gradient spectra are those of the next-token loss: they equal the singular values of the
# ordinary backward pass's `.grad`, they change when the targets change, and they differ from the
# released analysis's `logits.mean()` gradients.

# %%
def gradient_svs(records, layer, matrix):
    return np.array(next(r["singular_values"] for r in records
                         if (r["layer"], r["matrix"], r["kind"]) == (layer, matrix, "gradient")))

reference = copy.deepcopy(toy)
next_token_loss(reference, toy_batch).backward()
manual = singular_values(reference.layers[1].swiglu.w_2.weight.grad)
assert np.allclose(gradient_svs(records, 1, "swiglu.w_2"), manual, rtol=1e-5, atol=1e-9)

other_targets = toy_batch.clone(); other_targets[:, 1:] = (other_targets[:, 1:] + 1) % 64
changed = compute_spectra(toy, other_targets, ["swiglu.w_2"], 7)
assert not np.allclose(gradient_svs(changed, 1, "swiglu.w_2"), manual, rtol=1e-3)

released = copy.deepcopy(toy)
released(toy_batch[:, :-1]).mean().backward()
assert not np.allclose(singular_values(released.layers[1].swiglu.w_2.weight.grad), manual, rtol=1e-3)


# %% [markdown]
# ## Reading records
#
# `read_spectra` returns one DataFrame row per record (singular values as a list column), skipping
# torn lines and keeping the last of duplicate (step, layer, matrix, kind) records.

# %%
#| export
def read_spectra(path) -> pd.DataFrame:
    "The records of a spectra JSON-lines file as a DataFrame sorted by step, layer, matrix, kind."
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"spectra file {path} does not exist")
    df = pd.DataFrame(read_records(path))
    if df.empty: return pd.DataFrame(columns=SPECTRA_KEY)
    return df.drop_duplicates(SPECTRA_KEY, keep="last").sort_values(SPECTRA_KEY, ignore_index=True)


# %%
import json

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "spectra.jsonl"
    append_records(path, records)
    with open(path, "a") as f: f.write(json.dumps(records[0])[:40])  # a crash in the middle of a record
    append_records(path, records[:1])  # the run resumes and records again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_spectra(path)
    assert len(df) == len(records) and any(f"spectra.jsonl:{len(records) + 1}" in str(w.message) for w in caught)
assert set(df.kind) == {"weight", "gradient"} and df.groupby("kind").size().tolist() == [4, 4]
assert np.allclose(df.per, [spectrum_metrics(s)["per"] for s in df.singular_values], rtol=1e-5)


# %% [markdown]
# ## After the fact: a directory of checkpoints
#
# The project's checkpoint layout is `<run_dir>/checkpoints/step_000100/{model.safetensors,config.json,...}`
# (`06_checkpoints` owns it). Every listed checkpoint is loaded with `picomaml.checkpoints.load_backbone`
# (safetensors only, its digests verified, non-finite weights refused), in step order; a step
# directory without weights is skipped with a warning.
# Steps already complete in `out` (as many records as the fullest step there) are skipped, so an
# interrupted sweep resumes where it stopped.

# %%
#| export
def checkpoint_steps(checkpoints_dir) -> list:
    ("`[(step, directory)]` of the loadable checkpoints under `checkpoints_dir` "
     "(`picomaml.checkpoints.list_checkpoints`), by step.")
    root = Path(checkpoints_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist (expected <run_dir>/checkpoints)")
    found = list_checkpoints(root)
    for d in sorted(set(root.glob("step_*")) - {d for _, d in found}):
        if d.is_dir(): warnings.warn(f"{d}: no model.safetensors + config.json (an unfinished save?); skipped")
    if not found and (root / "checkpoints").is_dir():
        raise FileNotFoundError(f"{root} is a run directory: give its checkpoints, "
                                f"--checkpoints {root / 'checkpoints'}")
    if not found:
        raise FileNotFoundError(f"{root} holds no checkpoints "
                                "(step_NNNNNN directories with model.safetensors + config.json)")
    return found

def _complete_steps(out: Path) -> set:
    if not out.is_file(): return set()
    counts = read_spectra(out).groupby("step").size()
    return set(counts.index[counts == counts.max()]) if len(counts) else set()

def fitting_batch_rows(model: torch.nn.Module, batch: torch.Tensor, layers, device: torch.device) -> int:
    "Rows per group of the gradient pass that fit `device` (the planner's spectra phase), at most the whole batch."
    # no episodes: a gradient pass
    cfg = Config(model=model.cfg, data=DataConfig(seq_len=batch.shape[1] - 1), maml=MAMLConfig(rho=0),
                 spectra=SpectraConfig(layers=list(layers), grad_rows=len(batch)))
    rows = choose_spectra_batch(cfg, device.type, int(device_memory_gb(device) * GIB))
    if not rows:
        raise ConfigError(f"the gradient of one row of {batch.shape[1] - 1} tokens does not fit in the memory of "
                          f"{device}: use a device with more memory or shorter rows (--seq-len)")
    return rows

def spectra_over_steps(loaders, batch, layers, out, device="cpu", batch_rows: int | None = None) -> Path:
    "Append spectra for `[(step, load)]` (`load()` returns the model) on `device` to `out`, skipping steps done there."
    out, device = Path(out), torch.device(device)
    batch, done = batch.to(device), _complete_steps(out)
    todo = [(step, load) for step, load in loaders if step not in done]
    for step, load in tqdm(todo, desc=f"spectra ({len(loaders) - len(todo)} of {len(loaders)} steps done)",
                           disable=not todo):
        model = load().to(device)
        record_spectra(model, batch, layers, step, out, batch_rows or fitting_batch_rows(model, batch, layers, device))
    return out

def spectra_over_checkpoints(checkpoints_dir, batch, layers, out, device="cpu", batch_rows: int | None = None) -> Path:
    "Append the spectra of every checkpoint under `<run_dir>/checkpoints` to `out`, computed on `device`."
    loaders = [(step, functools.partial(load_backbone, d)) for step, d in checkpoint_steps(checkpoints_dir)]
    return spectra_over_steps(loaders, batch, layers, out, device, batch_rows)


# %% [markdown]
# The test of the whole path: a model is recorded in the loop at steps 100 and 200 and saved as those
# steps' checkpoints; the sweep over the checkpoint directory reproduces the in-loop records.

# %%
with tempfile.TemporaryDirectory() as tmp:
    run = Path(tmp) / "run"
    layers = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]
    for step in (100, 200):
        with torch.no_grad():
            for p in toy.parameters(): p.add_(0.01 * torch.randn_like(p))  # "training"
        record_spectra(toy, toy_batch, layers, step, run / "spectra.jsonl")
        save_pretrained(toy, run / "checkpoints" / f"step_{step:06d}")
    (run / "checkpoints" / "latest").write_text("step_000200")
    (run / "checkpoints" / "step_000300").mkdir()  # a save that never finished
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spectra_over_checkpoints(run / "checkpoints", toy_batch, layers, run / "after.jsonl")
    assert any("step_000300" in str(w.message) for w in caught)
    in_loop, after = read_spectra(run / "spectra.jsonl"), read_spectra(run / "after.jsonl")
    assert len(after) == 2 * 2 * 3 * 2 and (after[SPECTRA_KEY] == in_loop[SPECTRA_KEY]).all().all()
    for col in ("per", "effective_rank", "condition_number", "frobenius_norm", "nuclear_norm"):
        assert np.allclose(after[col], in_loop[col], rtol=1e-5), col
    assert all(np.allclose(a, b, rtol=1e-5) for a, b in zip(after.singular_values, in_loop.singular_values))
    mtime = (run / "after.jsonl").stat().st_mtime_ns
    spectra_over_checkpoints(run / "checkpoints", toy_batch, layers, run / "after.jsonl")
    assert (run / "after.jsonl").stat().st_mtime_ns == mtime  # every step complete: nothing recomputed


# %% [markdown]
# ## After the fact: a released model on the Hub
#
# The released pico-maml decoders (`davidafrica/pico-maml-decoder-{tiny,small,medium,large}`) keep
# every checkpoint as a folder `checkpoints/step_N/` on the `main` branch (with `model.safetensors`,
# `config.json`, the tokenizer, and a multi-GB `fabric_state/` optimizer dump), not as separate git
# revisions. So by default a "revision" names a checkpoint folder (`step_100`) and `branch` is the
# git revision of the repository; `load_backbone` downloads only that folder's `config.json` and
# `model.safetensors`. With `subfolder=""` the names are git revisions instead (branches, tags or
# commits holding a checkpoint at the repository root). The step is the number the name ends with.
# A local directory of the same layout stands in for the repository.

# %%
#| export
def hub_loaders(repo: str, names, branch: str | None = None, subfolder: str = "checkpoints", cache_dir=None) -> list:
    "`[(step, load)]` for checkpoints `names` (e.g. step_100) of a Hub repository or a local directory."
    loaders = []
    for name in names:
        match = re.search(r"(\d+)$", name)
        if not match: raise ValueError(f"revision {name!r} does not end in a step number (expected e.g. step_100)")
        where = dict(subfolder=f"{subfolder}/{name}", revision=branch) if subfolder else dict(revision=name)
        loaders.append((int(match.group(1)), functools.partial(load_backbone, repo, cache_dir=cache_dir, **where)))
    return loaders

def spectra_over_hub(repo: str, names, batch, layers, out, branch: str | None = None, *, subfolder: str = "checkpoints",
                     cache_dir=None, device="cpu", batch_rows: int | None = None) -> Path:
    "Append the spectra of checkpoints `names` of a Hub repository (or local directory) to `out`, computed on `device`."
    return spectra_over_steps(hub_loaders(repo, names, branch, subfolder, cache_dir), batch, layers, out, device,
                              batch_rows)


# %% [markdown]
# Tests: a local directory in the released layout, and the real `huggingface_hub` download path
# answered from a Hugging Face cache directory in offline mode (`models--owner--name/refs/<branch>`
# naming a commit under `snapshots/`), for both checkpoint folders and git revisions.

# %%
import huggingface_hub


def fake_hub_cache(cache, repo_id, files_by_ref: dict):
    "Write a Hugging Face cache in which each ref (branch) of `repo_id` holds the given checkpoints."
    root = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    for n, (ref, checkpoints) in enumerate(files_by_ref.items()):
        commit = f"{n + 1:040x}"
        for path_in_repo, model in checkpoints.items():
            save_pretrained(model, root / "snapshots" / commit / path_in_repo)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)

with tempfile.TemporaryDirectory() as tmp:
    local = Path(tmp) / "pico-maml-decoder-large"
    save_pretrained(toy, local / "checkpoints" / "step_100")
    spectra_over_hub(local, ["step_100"], toy_batch, ["swiglu.w_2"], Path(tmp) / "local.jsonl")
    hub_df = read_spectra(Path(tmp) / "local.jsonl")
    assert set(hub_df.step) == {100} and len(hub_df) == 2 * 2
    expected = pd.DataFrame(compute_spectra(toy, toy_batch, ["swiglu.w_2"], 100)).sort_values(SPECTRA_KEY)
    assert np.allclose(hub_df.per, expected.per, rtol=1e-5)
    raises(lambda: spectra_over_hub(local, ["step_200"], toy_batch, ["swiglu.w_2"], Path(tmp) / "local.jsonl"),
           "step_200", kind=FileNotFoundError)

    other = copy.deepcopy(toy)
    with torch.no_grad(): other.layers[0].swiglu.w_2.weight.mul_(3)
    fake_hub_cache(Path(tmp) / "cache", "owner/pico-maml",
                   {"main": {"checkpoints/step_100": toy, "checkpoints/step_200": other}, "step_300": {"": other}})
    saved, huggingface_hub.constants.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE, True
    try:
        spectra_over_hub("owner/pico-maml", ["step_100", "step_200"], toy_batch, ["swiglu.w_2"],
                         Path(tmp) / "hub.jsonl", cache_dir=Path(tmp) / "cache")
        spectra_over_hub("owner/pico-maml", ["step_300"], toy_batch, ["swiglu.w_2"], Path(tmp) / "hub.jsonl",
                         subfolder="", cache_dir=Path(tmp) / "cache")
    finally: huggingface_hub.constants.HF_HUB_OFFLINE = saved
    hub_df = read_spectra(Path(tmp) / "hub.jsonl")
    weight_norm = hub_df[(hub_df.kind == "weight") & (hub_df.layer == 0)].set_index("step").frobenius_norm
    assert sorted(weight_norm.index) == [100, 200, 300]
    assert (np.isclose(weight_norm[200], 3 * weight_norm[100], rtol=1e-5)
            and np.isclose(weight_norm[300], weight_norm[200]))

# %% [markdown]
# ## What it costs
#
# One checkpoint of the demo's tiny model (d 96, 12 blocks, vocabulary 50,304) with the default
# 3 matrices × 12 blocks × {weight, gradient} = 72 spectra and 8 rows of 128 tokens is one forward
# and backward pass over 1,024 tokens (the 50,304-way output layer dominates) plus 72 small SVDs
# (≈0.3 s) and loading the checkpoint (≈0.3 s). Measured on the 2-core machine while other jobs
# kept its load average at 6–7: 2.4 s best and 4.8 s median per checkpoint, 39 s for a sweep over
# 8 checkpoints; with the machine to itself (≈840 training tokens/s measured there) that is ≈2 s per
# checkpoint, ≈15 s for the demo's 8 checkpoints, about 5 % of its 5-minute run. With 2 rows a
# checkpoint costs about 1 s. The cell below (flagged slow) repeats the measurement.

# %%
#|slow
import time

tiny_model = PicoDecoder(ModelConfig(d_model=96, ffn_hidden=384, max_seq_len=128))
tiny_batch = torch.randint(0, 50280, (8, 129))
with tempfile.TemporaryDirectory() as tmp:
    for step in range(0, 800, 100): save_pretrained(tiny_model, Path(tmp) / "checkpoints" / f"step_{step:06d}")
    start = time.perf_counter()
    spectra_over_checkpoints(Path(tmp) / "checkpoints", tiny_batch, SpectraConfig().layers, Path(tmp) / "spectra.jsonl")
    print(f"8 tiny checkpoints: {time.perf_counter() - start:.1f} s")


# %% [markdown]
# ## Command line
#
# ```
# python -m picomaml.spectra --checkpoints RUN_DIR/checkpoints --batch EVAL_SHARD --out FILE
# python -m picomaml.spectra --hub davidafrica/pico-maml-decoder-large --revisions step_100,step_200 --batch EVAL_SHARD --out FILE
# ```
# `--layers` and `--rows` default to `SpectraConfig` (`layers`, `grad_rows`); `--seq-len` cuts the
# rows (use the run's `data.seq_len` so the batch matches the in-loop one); `--subfolder ""` makes
# the revisions git revisions of the repository root. `--device` (`00_device`) is this process's GPU
# when CUDA is usable, else the CPU (said on one line); `--device cuda` insists on a GPU.
# `--batch-rows` is the group size of the gradient pass, by default the largest the device fits.

# %%
#| export
def parse_args(argv=None) -> argparse.Namespace:
    "Arguments of `python -m picomaml.spectra`."
    defaults = SpectraConfig()
    p = argparse.ArgumentParser(prog="python -m picomaml.spectra",
                                description="Weight and next-token-gradient spectra of checkpoints.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoints", help="a run's checkpoints directory (step_N/ folders)")
    src.add_argument("--hub", help="Hub model repository (or a local directory of the same layout)")
    p.add_argument("--revisions", default="", help="comma-separated checkpoint names, e.g. step_100,step_200")
    p.add_argument("--subfolder", default="checkpoints",
                   help="folder of the checkpoints in the repository; empty: revisions are git revisions")
    p.add_argument("--branch", default=None, help="git revision of the Hub repository (default: main)")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache directory (default: the usual cache)")
    p.add_argument("--batch", required=True, help="parquet shard (or directory of shards) with `input_ids` rows")
    p.add_argument("--rows", type=int, default=defaults.grad_rows,
                   help="rows of the batch (spectra.grad_rows; 0: all of them)")
    p.add_argument("--seq-len", type=int, default=None, help="cut rows to seq_len + 1 ids (the run's data.seq_len)")
    p.add_argument("--layers", default=",".join(defaults.layers),
                   help="comma-separated matrices, e.g. attention.v_proj,swiglu.w_2")
    p.add_argument("--out", required=True, help="spectra JSON-lines file to append to")
    p.add_argument("--device", default="auto",
                   help=f"{DEVICE_CHOICES}; auto: this process's GPU when CUDA is usable, else the CPU")
    p.add_argument("--batch-rows", type=int, default=0,
                   help="rows per forward/backward of the gradient pass; 0: the largest the device fits")
    args = p.parse_args(argv)
    if args.hub and not args.revisions: p.error("--hub needs --revisions (e.g. step_100,step_200)")
    if args.batch_rows < 0: p.error("--batch-rows must be 0 (the largest that fits) or positive")
    return args

def main(argv=None) -> Path:
    "Entry point of `python -m picomaml.spectra`."
    configure_cuda_allocator()
    args = parse_args(argv)
    ensure_writable(Path(args.out).parent, "--out")
    device = resolve_device(args.device)
    batch = load_eval_batch(args.batch, args.rows, args.seq_len)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    on = dict(device=device, batch_rows=args.batch_rows or None)
    # a second launch on one --out would record every step twice
    with exclusive_lock(lock_file_of(args.out), f"spectra file {args.out}"):
        if args.hub:
            names = [name.strip() for name in args.revisions.split(",") if name.strip()]
            out = spectra_over_hub(args.hub, names, batch, layers, args.out, args.branch, subfolder=args.subfolder,
                                   cache_dir=args.cache_dir, **on)
        else: out = spectra_over_checkpoints(args.checkpoints, batch, layers, args.out, **on)
    print(f"spectra of {read_spectra(out).step.nunique()} steps in {out}")
    return out


# %%
with tempfile.TemporaryDirectory() as tmp:
    pq.write_table(pa.table({"input_ids": toy_batch.tolist()}), Path(tmp) / "val.parquet")
    save_pretrained(toy, Path(tmp) / "run" / "checkpoints" / "step_000050")
    out = main(["--checkpoints", f"{tmp}/run/checkpoints", "--batch", f"{tmp}/val.parquet", "--rows", "3",
                "--layers", "attention.q_proj", "--out", f"{tmp}/cli.jsonl"])
    cli = read_spectra(out)
    direct = pd.DataFrame(compute_spectra(toy, toy_batch, ["attention.q_proj"], 50)).sort_values(SPECTRA_KEY)
    assert set(cli.step) == {50} and np.allclose(cli.per, direct.per, rtol=1e-5)
assert (parse_args(["--checkpoints", "c", "--batch", "b", "--out", "o"]).layers
        == "attention.v_proj,attention.o_proj,swiglu.w_2")

# %% [markdown]
# On a GPU machine the device is the GPU: each checkpoint's model and the batch move to the device
# `--device` names. Tested here with `recorded_moves` (`00_device`), under which `cuda:1` runs on the
# CPU while every move is recorded. Without `--batch-rows` the group size is the planner's for the device.

# %%
from picomaml.device import recorded_moves

with tempfile.TemporaryDirectory() as tmp:
    save_pretrained(toy, Path(tmp) / "checkpoints" / "step_000010")
    with recorded_moves("cuda:1") as moves:
        spectra_over_checkpoints(Path(tmp) / "checkpoints", toy_batch, ["swiglu.w_2"], Path(tmp) / "s.jsonl",
                                 device="cuda:1", batch_rows=2)
assert ("PicoDecoder", torch.device("cuda", 1)) in moves and ("Tensor", torch.device("cuda", 1)) in moves
assert {d for _, d in moves} <= {torch.device("cuda", 1), torch.device("cpu")}
# three rows fit in this machine's RAM
assert fitting_batch_rows(toy, toy_batch, ["swiglu.w_2"], torch.device("cpu")) == len(toy_batch)

# %%
#| export
# a notebook also runs as __main__; only the exported module (which has a __file__) parses sys.argv
if __name__ == "__main__" and "__file__" in globals(): run_command(main)

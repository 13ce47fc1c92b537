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
# # The hybrid training loop
#
# > Paper 1, Appendix A (Algorithms 1 and 2): one loop over micro-batches; each micro-batch is, with
# > probability rho, a first-order MAML episode on an SMLMT task, else an ordinary next-token step.
#
# This notebook is the pretraining loop of method.md §3–§4: Lightning Fabric for processes and
# collectives, AdamW with warmup and cosine decay, gradient accumulation, checkpoints that resume
# bit-for-bit, a `metrics.jsonl` line per optimizer step and Paloma perplexity every `eval.every`
# steps. The pieces come first, each tested on toy tensors; `train` at the end puts them in one flat
# loop that reads like the paper's pseudocode.
#
# **Gradients equal a one-process run.** Every rank's loss is its share of the global objective
# (a sum over its rows divided by the global count), and the gradients are summed over ranks with one
# all-reduce per optimizer step. We do not wrap the model in DDP: DDP averages (so each loss would
# need a factor of world size), needs `find_unused_parameters` because the two branches use different
# parameters (the MAML head is idle on AR steps, the output layer on MAML steps), and never sees the
# first-order head gradient, which is written into `phi_0.grad` by hand after the backward pass.
# Summing one flat gradient buffer at the optimizer step is what DDP with `no_sync` over the
# accumulation does, without those three problems.

# %%
#| default_exp train

# %%
#| export
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from picomaml.config import Config, ConfigError, save_config

# %% [markdown]
# ## Global batch = micro-batch × world size × accumulation
#
# method.md §4: the optimizer sees `train.global_batch` sequences per step whatever the hardware. The
# accumulation is derived, and a global batch that does not split evenly is an error naming the keys.

# %%
#| export
def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    "Micro-steps per optimizer step so that micro_batch × world_size × accumulation = global_batch."
    per_pass = micro_batch * world_size
    if micro_batch < 1 or global_batch < per_pass or global_batch % per_pass:
        raise ConfigError(f"train.global_batch={global_batch} must be a positive multiple of train.micro_batch"
                          f"={micro_batch} × world size {world_size} = {per_pass}; change one of them")
    return global_batch // per_pass

# %%
assert accumulation_steps(1024, 64, 4) == 4 and accumulation_steps(16, 8, 2) == 1 and accumulation_steps(16, 8, 1) == 2
try: accumulation_steps(16, 6, 2); raise AssertionError("accepted an uneven global batch")
except ConfigError as e: assert "train.global_batch=16" in str(e) and "train.micro_batch=6" in str(e)

# %% [markdown]
# ## Learning-rate schedule
#
# Linear warmup to the peak over `warmup_steps`, then decay to `min_lr_ratio × lr` over `decay_steps`
# (0: the whole run): cosine in the papers, linear for the `released` preset (whose 200,000-step decay
# is nearly constant over 6,000 steps, method.md §7), or constant. It is a pure function of the step
# (nanoGPT's `get_lr`), so resuming needs only the step, not a scheduler object.

# %%
#| export
def lr_at(step: int, tc) -> float:
    "Learning rate of optimizer step `step` (0-based) under TrainConfig `tc`."
    if step < tc.warmup_steps: return tc.lr * (step + 1) / tc.warmup_steps
    if tc.schedule == "constant": return tc.lr
    span = max(1, (tc.decay_steps or tc.steps) - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if tc.schedule == "cosine" else 1 - progress
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * shape)

# %%
from picomaml.config import TrainConfig
_tc = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
assert lr_at(0, _tc) == 0.1 and lr_at(9, _tc) == 1.0 and lr_at(10, _tc) == 1.0
assert abs(lr_at(60, _tc) - 0.55) < 1e-12 and abs(lr_at(110, _tc) - 0.1) < 1e-12  # cosine midpoint, floor
_lin = TrainConfig(steps=110, warmup_steps=10, lr=1.0, schedule="linear", decay_steps=210)
assert abs(lr_at(110, _lin) - 0.5) < 1e-12  # halfway through a 200-step linear decay
assert lr_at(100, TrainConfig(warmup_steps=10, lr=1.0, schedule="constant")) == 1.0

# %% [markdown]
# ## Which branch: one shared draw per micro-batch
#
# Algorithm 1 draws r ~ U(0, 1) on rank 0 and broadcasts it, so every rank takes the same branch. We
# draw it from a generator seeded by (seed, step), which every rank holds: the same numbers with no
# communication, and the same numbers again after a resume. `rho` = 0 never gives an episode
# (r ≥ 0); `rho` = 1 always does (r < 1).

# %%
#| export
def mix_seed(*parts) -> int:
    "A 63-bit seed from (seed, step, micro-step, tag, ...), stable across processes and runs."
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

def branch_draws(seed: int, step: int, accumulation: int, rho: float) -> list[bool]:
    "For each micro-step of optimizer step `step`: True for a MAML episode, False for next-token loss."
    r = torch.rand(accumulation, generator=torch.Generator().manual_seed(mix_seed(seed, step, "branch")))
    return (r < rho).tolist()

# %%
_draws = [b for s in range(200) for b in branch_draws(42, s, 4, 0.5)]
assert 0.4 < sum(_draws) / len(_draws) < 0.6 and branch_draws(42, 7, 4, 0.5) == branch_draws(42, 7, 4, 0.5)
assert not any(b for s in range(50) for b in branch_draws(0, s, 4, 0.0))
assert all(b for s in range(50) for b in branch_draws(0, s, 4, 1.0))

# %% [markdown]
# ## The next-token loss as a share of the global batch
#
# Algorithm 2's loss is the mean cross-entropy over every target token of the global batch. A rank
# holds `micro_batch` of the `global_batch` rows at each micro-step, so its share is the **sum** over
# its tokens divided by the global token count; the shares of all micro-steps and ranks add up to the
# global mean, and so do their gradients. Rows hold `seq_len + 1` ids: inputs `[:, :-1]`, targets
# `[:, 1:]` (method.md §4). The logits are cast to float32 for the softmax under bf16 autocast.

# %%
#| export
def next_token_loss_sum(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    "Summed next-token cross-entropy of rows (B, T + 1)."
    logits = model(rows[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum")

# %%
class _Bigram(torch.nn.Module):
    "A toy next-token model: logits from an embedding table."
    def __init__(self, vocab=11, d=4):
        super().__init__(); self.emb = torch.nn.Embedding(vocab, vocab)
    def forward(self, ids): return self.emb(ids)  # (B, T, V)

torch.manual_seed(0)
_toy, _rows = _Bigram(), torch.randint(0, 11, (4, 6))
_mean = F.cross_entropy(_toy(_rows[:, :-1]).flatten(0, 1), _rows[:, 1:].flatten())
_shares = [next_token_loss_sum(_toy, part) / _rows[:, 1:].numel() for part in _rows.split(2)]
assert torch.allclose(sum(_shares), _mean)  # two ranks' shares add up to the one-process mean

# %% [markdown]
# ## Paloma perplexity, two ways
#
# Every `eval.every` steps we report perplexity on the Paloma rows (method.md §4): **token-weighted**,
# exp of the mean cross-entropy over all target tokens, and the **per-document mean**, the mean over
# documents of each document's own perplexity, the figure the released trainer reported. Rows are
# packed documents separated by EOS, so a document is a run of targets up to and including an EOS
# (the last run of a row is cut off by the row's end and counts as a document of its own). Each rank
# evaluates a strided shard of the rows; the four sums are all-reduced, so the result does not depend
# on the number of ranks.

# %%
#| export
def document_ids(targets: torch.Tensor, eos_id: int) -> torch.Tensor:
    "Index of the document each target belongs to, unique over the batch; an EOS closes its document: (B, T) -> (B, T)."
    is_eos = (targets == eos_id).long()  # (B, T)
    within_row = is_eos.cumsum(1) - is_eos  # (B, T): EOS counts for the next target on
    return within_row + torch.arange(targets.shape[0], device=targets.device)[:, None] * targets.shape[1]

@torch.no_grad()
def eval_sums(model: torch.nn.Module, rows: torch.Tensor, eos_id: int) -> torch.Tensor:
    "[summed CE, tokens, summed per-document perplexity, documents] of rows (B, T + 1), in float64."
    targets = rows[:, 1:]
    ce = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1).float(), targets.flatten(), reduction="none").double()
    doc = document_ids(targets, eos_id).flatten()  # (B·T,)
    doc = torch.unique(doc, return_inverse=True)[1]  # dense 0..D-1
    doc_ce = torch.zeros(int(doc.max()) + 1, dtype=torch.float64, device=ce.device).index_add_(0, doc, ce)
    doc_len = torch.bincount(doc).double()
    return torch.stack([ce.sum(), ce.new_tensor(ce.numel()), (doc_ce / doc_len).exp().sum(), ce.new_tensor(len(doc_len))])

def perplexities(sums: torch.Tensor) -> dict:
    "Token-weighted and per-document-mean perplexity from all-reduced `eval_sums`."
    ce_sum, tokens, doc_ppl_sum, docs = sums.tolist()
    return {"paloma_ppl": math.exp(ce_sum / tokens), "paloma_doc_ppl": doc_ppl_sum / docs, "eval_loss": ce_sum / tokens}

# %%
_eos = 9
assert document_ids(torch.tensor([[1, 9, 2, 3, 9, 4]]), _eos).tolist() == [[0, 0, 1, 1, 1, 2]]
_rows = torch.tensor([[5, 1, 9, 2, 3, 9, 4], [2, 2, 2, 2, 2, 2, 2]])
_ce = F.cross_entropy(_toy(_rows[:, :-1]).flatten(0, 1), _rows[:, 1:].flatten(), reduction="none").double()
_docs = [_ce[0:2], _ce[2:5], _ce[5:6], _ce[6:12]]  # row 0: [1 9] [2 3 9] [4]; row 1: one document
_ppl = perplexities(eval_sums(_toy, _rows, _eos) )
assert math.isclose(_ppl["paloma_ppl"], _ce.mean().exp().item(), rel_tol=1e-12)
assert math.isclose(_ppl["paloma_doc_ppl"], sum(d.mean().exp().item() for d in _docs) / 4, rel_tol=1e-12)
assert torch.allclose(eval_sums(_toy, _rows[:1], _eos) + eval_sums(_toy, _rows[1:], _eos), eval_sums(_toy, _rows, _eos))

# %% [markdown]
# ## FLOPs and model FLOPs utilisation
#
# We count FLOPs as PaLM (Chowdhery et al. 2022, App. B) does: a forward and backward pass costs
# 6·N per token for N matmul parameters plus 12·L·d·T for attention over T positions; a forward alone
# is a third of that. The input embedding is a lookup and does not count. An AR token runs the whole
# model; an episode runs its support windows forward only and its query windows forward and backward,
# both without the output layer (features are read from the last hidden state); the head's MLP is
# negligible and not counted. MFU divides by a peak: dense bf16 Tensor-Core FLOP/s of the GPU
# (A100 312e12, H100/H200 989e12, from NVIDIA's data sheets); on a CPU or an unknown GPU there is no
# honest peak, so MFU is `null`.

# %%
#| export
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}

def ar_flops(mc, tokens: int, seq_len: int) -> float:
    "Forward + backward FLOPs of `tokens` next-token positions in sequences of `seq_len`."
    n_matmul = mc.n_layers * _block_params(mc) + mc.d_model * mc.vocab_size  # blocks + output layer
    return tokens * (6 * n_matmul + 12 * mc.n_layers * mc.d_model * seq_len)

def episode_flops(mc, support_tokens: int, query_tokens: int, window: int) -> float:
    "FLOPs of an episode: support windows forward only, query windows forward + backward, no output layer."
    per_token = 6 * mc.n_layers * _block_params(mc) + 12 * mc.n_layers * mc.d_model * window
    return support_tokens * per_token / 3 + query_tokens * per_token

def _block_params(mc) -> int:
    "Matmul parameters of one decoder block: GQA projections and the SwiGLU."
    kv = mc.d_model // mc.n_heads * mc.n_kv_heads
    return 2 * mc.d_model * mc.d_model + 2 * mc.d_model * kv + 3 * mc.d_model * mc.ffn_hidden

def peak_flops(device: torch.device) -> float | None:
    "Dense bf16 peak FLOP/s of a known GPU, else None (no honest peak for CPUs)."
    if device.type != "cuda": return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)

# %%
from picomaml.config import ModelConfig
_mc = ModelConfig(d_model=96, ffn_hidden=384)
assert _block_params(_mc) == 2 * 96 * 96 + 2 * 96 * 32 + 3 * 96 * 384
_tiny_params = 11_282_784  # method.md §1: 12 blocks + norms + two embeddings
_matmul = _mc.n_layers * _block_params(_mc) + 96 * 50304
assert _tiny_params - _matmul - 96 * 50304 == 12 * 2 * 96 + 96  # the rest: RMSNorm gains and the input embedding
assert ar_flops(_mc, 1, 0) == 6 * _matmul and episode_flops(_mc, 3, 0, 0) == episode_flops(_mc, 0, 1, 0)
assert peak_flops(torch.device("cpu")) is None

# %% [markdown]
# ## Checkpoints
#
# The layout is fixed for the whole project (other notebooks read it):
#
# ```
# <runs_dir>/<run_name>/config.yaml            resolved configuration, written at start
#                       metrics.jsonl          one JSON line per optimizer step
#                       checkpoints/step_000100/{model.safetensors, config.json, head.safetensors, state.pt}
#                       checkpoints/latest     text: the newest complete step directory
# ```
#
# `model.safetensors` + `config.json` are the Hugging Face format of `picomaml.model.save_pretrained`,
# so any checkpoint loads with `load_pretrained`. The MAML head is a second safetensors file.
# `state.pt` holds everything else needed to continue bit for bit: the step, the data position, the
# optimizer state, every rank's RNG state (as uint8 tensors) and SHA-256 digests of the two weight
# files. It holds only tensors and plain types, so it is read with `torch.load(weights_only=True)`:
# no pickled code is ever run. The learning rate is a function of the step, so there is no scheduler
# state.
#
# A checkpoint is written into a temporary directory and renamed into place, then `latest` is
# replaced by a rename too: a crash at any moment leaves either the old or the new checkpoint
# complete, never a half-written one under a `step_` name.

# %%
#| export
def step_dir_name(step: int) -> str: return f"step_{step:06d}"

def file_sha256(path) -> str:
    "Hex SHA-256 of a file."
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""): digest.update(block)
    return digest.hexdigest()

def write_checkpoint(ckpt_root, step: int, model, head, state: dict) -> Path:
    "Write checkpoints/step_NNNNNN atomically (temp dir + rename), then point `latest` at it."
    from picomaml.model import save_pretrained
    ckpt_root, name = Path(ckpt_root), step_dir_name(step)
    tmp, final = ckpt_root / f".tmp_{name}", ckpt_root / name
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, tmp / "head.safetensors")
    digests = {f: file_sha256(tmp / f) for f in ("model.safetensors", "head.safetensors")}
    torch.save({**state, "sha256": digests}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)  # a step re-reached after falling back past a corrupt checkpoint
    os.replace(tmp, final)
    (ckpt_root / "latest.tmp").write_text(name + "\n")
    os.replace(ckpt_root / "latest.tmp", ckpt_root / "latest")
    return final

# %% [markdown]
# Reading verifies the digests before anything is used, so a truncated or bit-flipped file is
# detected even where the safetensors header still parses. `find_checkpoint` tries the newest
# `step_` directory first and falls back, with a warning naming the file and the reason, to the
# previous valid one.

# %%
#| export
class CheckpointCorrupt(RuntimeError):
    "A checkpoint directory whose files are missing, unreadable or fail their checksum."

def read_checkpoint(directory) -> tuple[dict, dict, dict]:
    "(model tensors, head tensors, state) of a checkpoint directory, verified against its digests."
    directory = Path(directory)
    try:
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        for name, digest in state["sha256"].items():
            if file_sha256(directory / name) != digest: raise CheckpointCorrupt(f"{directory / name} fails its SHA-256 check")
        return load_file(directory / "model.safetensors"), load_file(directory / "head.safetensors"), state
    except CheckpointCorrupt: raise
    except Exception as e: raise CheckpointCorrupt(f"{directory} is unreadable: {type(e).__name__}: {e}") from e

def find_checkpoint(ckpt_root):
    "The newest valid checkpoint as (directory, (model tensors, head tensors, state)), or None."
    ckpt_root = Path(ckpt_root)
    candidates = sorted(ckpt_root.glob("step_*"), reverse=True) if ckpt_root.is_dir() else []
    for directory in candidates:
        try: return directory, read_checkpoint(directory)
        except CheckpointCorrupt as e:
            warnings.warn(f"{e}; resuming from the previous valid checkpoint instead", stacklevel=2)
    return None

# %% [markdown]
# The metrics log must agree with the checkpoint a run resumes from: lines of steps after it (written
# before a crash) are dropped, and so is a torn last line.

# %%
#| export
def truncate_metrics(path, last_step: int) -> None:
    "Keep only the complete lines of metrics file `path` whose step is at most `last_step`."
    path = Path(path)
    if not path.exists(): return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try: record = json.loads(line)
        except json.JSONDecodeError: continue
        if line.endswith("\n") and record["step"] <= last_step: kept.append(line)
    path.write_text("".join(kept))

# %%
import tempfile
with tempfile.TemporaryDirectory() as _tmp:
    _m = Path(_tmp) / "metrics.jsonl"
    _m.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(_m, 2)
    assert _m.read_text() == '{"step": 1}\n{"step": 2}\n'

# %% [markdown]
# A round trip on a tiny decoder: the weights come back bitwise (and load with `load_pretrained`),
# the state comes back through `weights_only=True`, and a bit flipped in the newest checkpoint makes
# `find_checkpoint` warn and fall back to the one before.

# %%
from picomaml.maml import MAMLHead
from picomaml.config import MAMLConfig
from picomaml.model import PicoDecoder, load_pretrained, load_checked
_tiny = ModelConfig(d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=64, max_seq_len=32)
torch.manual_seed(0)
_model, _head = PicoDecoder(_tiny), MAMLHead(24, 3, MAMLConfig(head_layers=2, head_hidden=8))
with tempfile.TemporaryDirectory() as _tmp:
    _root = Path(_tmp) / "checkpoints"
    for _step in (1, 2):
        write_checkpoint(_root, _step, _model, _head, {"step": _step, "rng": torch.get_rng_state()[None]})
    assert (_root / "latest").read_text() == "step_000002\n" and not list(_root.glob(".tmp_*"))
    _dir, (_weights, _head_weights, _state) = find_checkpoint(_root)
    assert _dir.name == "step_000002" and _state["step"] == 2 and torch.equal(_state["rng"][0], torch.get_rng_state())
    _copy = load_checked(PicoDecoder(_tiny), _weights, "test")
    assert all(torch.equal(a, b) for a, b in zip(_copy.state_dict().values(), _model.state_dict().values()))
    assert torch.equal(load_pretrained(_dir).embedding_proj.weight, _model.embedding_proj.weight)
    _blob = bytearray((_dir / "model.safetensors").read_bytes()); _blob[-5] ^= 1
    (_dir / "model.safetensors").write_bytes(bytes(_blob))
    with warnings.catch_warnings(record=True) as _caught:
        warnings.simplefilter("always")
        _dir, (_, _, _state) = find_checkpoint(_root)
    assert _dir.name == "step_000001" and _state["step"] == 1
    assert any("step_000002/model.safetensors fails its SHA-256 check" in str(w.message) for w in _caught)

# %% [markdown]
# ## Collectives: the pool, the support features and the gradients
#
# method.md §3 distributes an episode three ways. The SMLMT **pool** is gathered from every rank's
# rows (Algorithm 1: `X ← AllGather(B)`), so every rank builds the identical episode from
# (seed, micro-step). The episode's **support** rows are split over ranks for the backbone forward,
# and the features gathered back so every rank runs the identical inner loop; the **query** rows are
# split and each rank backpropagates its share. Parts may differ in size by one row
# (`tensor_split`), so the gather pads to the largest part and trims.

# %%
#| export
def part_sizes(n: int, world_size: int) -> list[int]:
    "Sizes of `n` rows split into `world_size` contiguous parts (`torch.tensor_split`)."
    return [len(p) for p in torch.arange(n).tensor_split(world_size)]

def part_slice(n: int, world_size: int, rank: int) -> slice:
    "This rank's contiguous part of `n` rows."
    sizes = part_sizes(n, world_size)
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

def gather_parts(fabric, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    "Every rank's part (sizes[r] rows) concatenated in rank order, on every rank."
    if fabric.world_size == 1: return local
    padded = local.new_zeros((max(sizes), *local.shape[1:]))  # (max part, ...)
    padded[: len(local)] = local
    gathered = fabric.all_gather(padded)  # (world, max part, ...)
    return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])

# %%
assert part_sizes(10, 3) == [4, 3, 3] and part_slice(10, 3, 1) == slice(4, 7) and part_slice(10, 3, 2) == slice(7, 10)
assert part_slice(5, 1, 0) == slice(0, 5)

# %% [markdown]
# The gradients of all parameters (backbone and head) are summed over ranks in one flat all-reduce
# per optimizer step. A parameter no branch touched this step has no gradient on any rank (all ranks
# take the same branches) and stays without one, so AdamW leaves it alone, exactly as in one process.

# %%
#| export
def sum_gradients(fabric, params: list[torch.nn.Parameter]) -> None:
    "Replace every existing .grad by its sum over ranks (one all-reduce)."
    with_grad = [p for p in params if p.grad is not None]
    if fabric.world_size == 1 or not with_grad: return
    flat = fabric.all_reduce(torch.cat([p.grad.flatten() for p in with_grad]), reduce_op="sum")
    for p, g in zip(with_grad, flat.split([p.numel() for p in with_grad])): p.grad.copy_(g.view_as(p))

# %% [markdown]
# ## Uploading checkpoints to the Hub
#
# With `logging.hub_repo` set, rank 0 uploads every checkpoint as its own revision: a branch named
# after the step directory, holding the files under `checkpoints/<step>/` (the pico-maml-decoder
# layout that `load_pretrained(..., revision, subfolder)` and `picomaml.spectra` read). `state.pt`
# stays local: it is for resuming, not for users. `api` defaults to `huggingface_hub.HfApi()`; the
# test passes a local stand-in.

# %%
#| export
def upload_checkpoint(directory, repo_id: str, api=None):
    "Upload a checkpoint's weights and configs to Hub repo `repo_id` on branch `<step dir name>`."
    from huggingface_hub import HfApi
    api, name = api or HfApi(), Path(directory).name
    api.create_repo(repo_id, exist_ok=True)
    api.create_branch(repo_id, branch=name, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(directory), path_in_repo=f"checkpoints/{name}", revision=name,
                             allow_patterns=["*.safetensors", "*.json"], commit_message=f"checkpoint {name}")

# %% [markdown]
# The stand-in writes uploads into a Hugging Face cache directory; with the Hub offline,
# `load_pretrained` then resolves repo, branch and subfolder from that cache through the real
# `hf_hub_download`, exactly as after a download.

# %%
import fnmatch, huggingface_hub

class _CacheHub:
    "Stand-in for HfApi: uploads land in a Hugging Face cache directory."
    def __init__(self, cache_dir): self.cache_dir, self.commits = Path(cache_dir), 0
    def create_repo(self, repo_id, **kw): pass
    def create_branch(self, repo_id, branch, **kw): pass
    def upload_folder(self, repo_id, folder_path, path_in_repo, revision, allow_patterns, **kw):
        self.commits += 1
        repo, commit = self.cache_dir / f"models--{repo_id.replace('/', '--')}", f"{self.commits:040x}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        (repo / "snapshots" / commit / path_in_repo).mkdir(parents=True)
        for f in Path(folder_path).iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns): shutil.copy(f, repo / "snapshots" / commit / path_in_repo)
        return commit

with tempfile.TemporaryDirectory() as _tmp:
    _dir = write_checkpoint(Path(_tmp) / "checkpoints", 3, _model, _head, {"step": 3})
    upload_checkpoint(_dir, "picomaml/test-run", api=_CacheHub(Path(_tmp) / "hf"))
    _saved, huggingface_hub.constants.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE, True
    try: _back = load_pretrained("picomaml/test-run", revision="step_000003", subfolder="checkpoints/step_000003", cache_dir=Path(_tmp) / "hf")
    finally: huggingface_hub.constants.HF_HUB_OFFLINE = _saved
    assert torch.equal(_back.de_embedding_proj.weight, _model.de_embedding_proj.weight)
    assert sorted(p.name for p in (Path(_tmp) / "hf").rglob("step_000003/*")) == ["config.json", "head.safetensors", "model.safetensors"]

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
#
# The output layer and its loss are the largest cost of an AR step that is not essential
# (benchmarks/README.md): the plain path materialises the (B·T, 50,304) logits in float32, then
# their log-softmax, then their gradient, each as large as the logits (1.6 GB for a 64 × 128
# micro-batch). `FusedLinearCrossEntropy` walks the tokens in chunks of `chunk_tokens` and, for
# each chunk, takes the logits, their log-sum-exp, the summed loss and the gradient
# $\partial\ell/\partial z = \mathrm{softmax}(z) - \mathrm{onehot}(y)$ in place, then both matmul gradients
# (hidden states and output weight) at once; backward only scales them by the incoming gradient.
# Same FLOPs, one chunk of logits alive at a time, same result up to float summation order.

# %%
#| export
class FusedLinearCrossEntropy(torch.autograd.Function):
    "Summed CE of logits h @ W.T over token chunks; gradients taken chunk by chunk in forward, so no (N, V) logits."
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens: int):
        loss = torch.zeros((), device=h.device)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)  # (N, d), (V, d) in the parameters' dtype
        for i in range(0, len(h), chunk_tokens):
            h_c, t_c = h[i:i + chunk_tokens], targets[i:i + chunk_tokens]  # (c, d), (c,)
            logits = F.linear(h_c, weight).float()  # (c, V), the matmul in autocast's dtype, as the plain path
            lse = logits.logsumexp(-1)  # (c,)
            loss += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            dlogits = logits.sub_(lse[:, None]).exp_()  # (c, V) softmax, in place of the logits
            dlogits[torch.arange(len(t_c), device=h.device), t_c] -= 1  # softmax - onehot
            grad_h[i:i + chunk_tokens] = dlogits.to(weight.dtype) @ weight  # (c, d)
            grad_w += dlogits.T.to(h_c.dtype) @ h_c  # (V, d)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_loss * grad_h, grad_loss * grad_w, None, None

def next_token_loss_sum(model: torch.nn.Module, rows: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    "Summed next-token cross-entropy of rows (B, T + 1) under a Pico decoder, output layer fused with the loss."
    h = model.hidden(rows[:, :-1]).flatten(0, 1)  # (B·T, d)
    return FusedLinearCrossEntropy.apply(h, model.de_embedding_proj.weight, rows[:, 1:].flatten(), chunk_tokens)

# %% [markdown]
# Tests on a 2-block Pico decoder over a 40-token vocabulary: loss and every gradient equal the plain
# path (whole logits, `F.cross_entropy`) for chunks that divide the tokens, leave a remainder, or hold
# them all, also under a scaled backward; under bf16 autocast they agree to bf16 rounding; and two
# ranks' shares add up to the one-process mean.

# %%
from picomaml.model import PicoDecoder
from picomaml.config import ModelConfig
torch.manual_seed(0)
_toy = PicoDecoder(ModelConfig(d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=48, vocab_size=40, max_seq_len=16))
_rows = torch.randint(0, 40, (4, 7))  # (B, T + 1): 24 targets

def _loss_and_grads(loss_fn, scale=1.0):
    "Loss and cloned parameter gradients of (loss_fn() * scale).backward()."
    _toy.zero_grad(set_to_none=True)
    loss = loss_fn()
    (loss * scale).backward()
    return loss.item(), [p.grad.clone() for p in _toy.parameters()]

_plain = lambda: F.cross_entropy(_toy(_rows[:, :-1]).flatten(0, 1).float(), _rows[:, 1:].flatten(), reduction="sum")
for _chunk, _scale in ((6, 1.0), (5, 0.25), (1024, 1.0)):
    (_want, _want_g), (_got, _got_g) = _loss_and_grads(_plain, _scale), _loss_and_grads(lambda: next_token_loss_sum(_toy, _rows, _chunk), _scale)
    assert abs(_got - _want) < 1e-4 * abs(_want)
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-7) for g, w in zip(_got_g, _want_g))
with torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU path's precision: same loss, gradients to bf16 rounding
    (_want, _want_g), (_got, _got_g) = _loss_and_grads(_plain), _loss_and_grads(lambda: next_token_loss_sum(_toy, _rows, 5))
assert abs(_got - _want) < 1e-3 * abs(_want)
assert all((g - w).abs().max() <= 1e-2 * w.abs().max() for g, w in zip(_got_g, _want_g))
_mean = F.cross_entropy(_toy(_rows[:, :-1]).flatten(0, 1), _rows[:, 1:].flatten())
_shares = [next_token_loss_sum(_toy, part, 5) / _rows[:, 1:].numel() for part in _rows.split(2)]
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
    gathered = [torch.empty_like(padded) for _ in sizes]  # world × (max part, ...)
    torch.distributed.all_gather(gathered, padded)  # plain collective: rows and no-grad features need no autograd
    return torch.cat([part[:n] for part, n in zip(gathered, sizes)])

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

# %% [markdown]
# ## Where an episode's pool comes from
#
# An AR micro-step reads its `micro_batch` rows at its data position (`picomaml.data.batch_for_step`:
# step s owns positions [sG, (s+1)G) of a seeded data order). An episode only uses N·(K+Q) windows of
# W tokens, but needs a pool with at least K+Q free occurrences of N eligible words, which a single
# micro-batch is far too small for at demo scale (method.md §2; `picomaml.smlmt` measures it). So the
# pool size is its own option, `smlmt.pool_rows`: on an episode micro-step every rank reads
# `pool_rows / world_size` rows from a **second data order** (same shards, seed derived from
# `train.seed`, positions laid out exactly as the AR micro-batches' but `pool_rows` per micro-step)
# and the rows are all-gathered (Algorithm 1's `X ← AllGather(B)`). The AR rows of that micro-step
# are not read. Both orders are pure functions of (seed, step, micro-step), so a resumed run reads the
# same rows, and the gathered pool is the same for any world size with the same global batch. With
# the papers' numbers the pool equals the gathered micro-batch (256 = 64 rows × 4 GPUs). For a streamed
# (Hub) source the episode pool is a second stream, read in the dataset's order.

# %%
#| export
def pool_rows_per_rank(pool_rows: int, world_size: int) -> int:
    "Rows each rank reads for an episode's pool; an error naming the key if they do not split evenly."
    if pool_rows < world_size or pool_rows % world_size:
        raise ConfigError(f"smlmt.pool_rows={pool_rows} must be a positive multiple of the world size {world_size}")
    return pool_rows // world_size

# %%
assert pool_rows_per_rank(64, 2) == 32
try: pool_rows_per_rank(63, 2); raise AssertionError
except ConfigError as e: assert "smlmt.pool_rows=63" in str(e)

# %% [markdown]
# ## Setting up a run
#
# Precision (method.md §4): bf16 autocast on GPU, float32 on CPU. Plain fp16 would need a loss
# scaler around the hand-written MAML backward, so it is refused. Model and head are initialised
# from `train.seed` on every rank (identical without a broadcast); AdamW steps backbone and head
# together (method.md §3, "the outer AdamW steps backbone and head together").

# %%
#| export
def resolve_precision(precision: str, accelerator: str) -> str:
    "Fabric precision for `train.precision` on `accelerator` ('cuda' or 'cpu')."
    if precision == "auto": return "bf16-mixed" if accelerator == "cuda" else "32-true"
    if precision == "16-mixed":
        raise ConfigError("train.precision=16-mixed needs a gradient scaler, which the first-order MAML backward does not "
                          "use; set train.precision to bf16-mixed, 32-true or auto")
    return precision

def build_model(cfg: Config, device) -> tuple:
    "(backbone, MAML head, AdamW over both), identically initialised on every rank from train.seed."
    from picomaml.model import PicoDecoder
    from picomaml.maml import MAMLHead
    torch.manual_seed(cfg.train.seed)
    model = PicoDecoder(cfg.model).to(device)
    head = MAMLHead(cfg.model.d_model, cfg.smlmt.n_way, cfg.maml, cfg.model.vocab_size).to(device)
    tc = cfg.train
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  weight_decay=tc.weight_decay)
    return model, head, optimizer

# %%
assert resolve_precision("auto", "cpu") == "32-true" and resolve_precision("auto", "cuda") == "bf16-mixed"
try: resolve_precision("16-mixed", "cuda"); raise AssertionError
except ConfigError as e: assert "train.precision" in str(e)

# %% [markdown]
# ## Resume or start
#
# With `train.resume` (the default) a run continues from the newest valid checkpoint of its run
# directory; rank 0 chooses it (warning about any corrupt newer one) and broadcasts the choice. A run
# that is told not to resume refuses a directory that already has checkpoints rather than mixing two
# runs' files. The resolved configuration is written to `config.yaml`, and the metrics log is cut
# back to the checkpoint's step.

# %%
#| export
def resume_or_start(fabric, cfg: Config, run_dir: Path, model, head, optimizer) -> int:
    "Load the newest valid checkpoint into model/head/optimizer/RNG if resuming; return the step to start from."
    from picomaml.model import load_checked
    ckpt_root = run_dir / "checkpoints"
    has_ckpts = any(ckpt_root.glob("step_*"))
    if has_ckpts and not cfg.train.resume:
        raise ConfigError(f"{run_dir} already holds checkpoints and train.resume=false: set train.resume=true to "
                          f"continue that run, or choose another logging.run_name")
    found = find_checkpoint(ckpt_root) if fabric.global_rank == 0 and has_ckpts else None
    name = fabric.broadcast(found[0].name if found else "", src=0)
    step = 0
    if name:
        weights, head_weights, state = found[1] if found else read_checkpoint(ckpt_root / name)
        load_checked(model, weights, str(ckpt_root / name / "model.safetensors"))
        head.load_state_dict(head_weights)
        optimizer.load_state_dict(state["optimizer"])
        if state["world_size"] == fabric.world_size:  # clone: set_rng_state of a view with a storage offset segfaults (torch 2.13)
            torch.set_rng_state(state["rng_cpu"][fabric.global_rank].clone())
        step = state["step"]
    if fabric.global_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        truncate_metrics(run_dir / "metrics.jsonl", step if name else -1)
        for stale in ckpt_root.glob(".tmp_*"): shutil.rmtree(stale)
        if name: (ckpt_root / "latest").write_text(name + "\n")
    fabric.barrier()
    return step

# %% [markdown]
# Saving gathers every rank's RNG state to rank 0, which writes the checkpoint (and uploads it);
# the others wait at a barrier so nobody runs ahead of a checkpoint that is still being written.

# %%
#| export
def save_training_state(fabric, cfg: Config, run_dir: Path, step: int, model, head, optimizer, hub_api=None) -> None:
    "Checkpoint `step` (model, head, optimizer, every rank's RNG, data position) atomically; rank 0 writes."
    rng = gather_parts(fabric, torch.get_rng_state()[None].to(fabric.device), [1] * fabric.world_size).cpu()  # (world, n)
    if fabric.global_rank == 0:
        state = {"step": step, "data_position": step * cfg.train.global_batch, "world_size": fabric.world_size,
                 "optimizer": optimizer.state_dict(), "rng_cpu": rng}
        directory = write_checkpoint(run_dir / "checkpoints", step, model, head, state)
        if cfg.logging.hub_repo: upload_checkpoint(directory, cfg.logging.hub_repo, hub_api)
    fabric.barrier()

def checkpoint_due(step: int, tc) -> bool:
    "Whether optimizer step `step` (completed steps) is checkpointed: every save_every, log-spaced, the last."
    log_spaced = tc.log_spaced_checkpoints and (step & (step - 1)) == 0  # 0, 1, 2, 4, 8, ...
    return step % tc.save_every == 0 or step == tc.steps or log_spaced

# %%
_tc = TrainConfig(steps=50, save_every=20, log_spaced_checkpoints=True)
assert [s for s in range(51) if checkpoint_due(s, _tc)] == [0, 1, 2, 4, 8, 16, 20, 32, 40, 50]

# %% [markdown]
# ## Paloma evaluation, in parallel over ranks

# %%
#| export
def evaluate(fabric, model, eval_rows, ec, eos_id: int) -> dict:
    "Token-weighted and per-document Paloma perplexity; each rank a strided shard, sums all-reduced."
    from picomaml.data import eval_batches
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=fabric.device)
    for batch in eval_batches(eval_rows, ec.batch_size, ec.max_rows, fabric.global_rank, fabric.world_size):
        with fabric.autocast(): sums += eval_sums(model, batch.to(fabric.device), eos_id)
    model.train()
    return perplexities(fabric.all_reduce(sums, reduce_op="sum").cpu() if fabric.world_size > 1 else sums.cpu())

# %% [markdown]
# ## Monitoring
#
# One JSON line per optimizer step in `metrics.jsonl` (method.md §4; paper 1 Figs. 1, 3, 4):
# `step` (optimizer steps completed), `loss` (the objective the optimizer saw: the mean over the
# step's micro-batches of their next-token or query loss), `ar_loss` and `query_loss` (their means
# over the step's AR and episode micro-batches; `null` when there were none), `n_ar` / `n_maml` and
# `branches` (the branch sequence, `A`/`M`), `lr`, `grad_norm` (before clipping), `support_acc`
# (phi_T on the support set), `query_acc`, `head_w_mean` / `head_w_std` (phi_T's logits layer),
# `head_grad_norm` (the head's summed gradient), `tokens` (AR tokens plus episode window tokens),
# `tokens_per_s` and `mfu`, and at evaluation steps `eval_loss`, `paloma_ppl`, `paloma_doc_ppl`.
# `tokens_per_s` and `mfu` are wall-clock measurements: everything else is a deterministic function of
# the configuration, so a resumed run's log equals an uninterrupted run's once those two are removed.
#
# The step's statistics are accumulated per rank in one float64 vector and all-reduced once; every
# entry is a sum over ranks, then turned into the logged means by `step_record`.

# %%
#| export
STATS = ("loss", "ar_loss", "query_loss", "n_ar", "n_maml", "support_acc", "query_correct", "query_count",
         "head_w_mean", "head_w_std", "tokens", "flops")

def step_record(totals: torch.Tensor, world_size: int) -> dict:
    "Logged means from the all-reduced per-rank sums of STATS."
    t = dict(zip(STATS, totals.tolist()))
    n_ar, n_maml = round(t["n_ar"] / world_size), round(t["n_maml"] / world_size)
    per_episode = lambda key, ranks=world_size: t[key] / ranks / n_maml if n_maml else None  # same value on every rank
    return {"loss": t["loss"], "ar_loss": t["ar_loss"] / n_ar if n_ar else None,
            "query_loss": per_episode("query_loss", 1), "n_ar": n_ar, "n_maml": n_maml,
            "support_acc": per_episode("support_acc"), "query_acc": t["query_correct"] / t["query_count"] if n_maml else None,
            "head_w_mean": per_episode("head_w_mean"), "head_w_std": per_episode("head_w_std"), "tokens": round(t["tokens"])}

# %%
_sums = torch.tensor([2.0, 3.0, 0.9, 2, 2, 1.5, 30, 40, 0.2, 1.0, 1000, 0], dtype=torch.float64)  # 2 ranks, 1 AR + 1 episode
_rec = step_record(_sums, 2)
assert (_rec["n_ar"], _rec["n_maml"], _rec["ar_loss"], _rec["query_loss"]) == (1, 1, 3.0, 0.9)
assert (_rec["support_acc"], _rec["query_acc"], _rec["head_w_std"]) == (0.75, 0.75, 0.5)
assert step_record(torch.tensor([1.0, 2.0, 0, 4, 0, 0, 0, 0, 0, 0, 10, 0], dtype=torch.float64), 2)["query_acc"] is None

# %% [markdown]
# Small pieces the loop calls: statistics, the finiteness check (a NaN/inf loss or gradient stops
# the run **before** the optimizer step, so no checkpoint with broken weights is ever written and
# the last good one stays `latest`), the tokenizer tables SMLMT needs, and the spectra hook
# (`picomaml.spectra.record_spectra` on the first `spectra.grad_rows` evaluation rows, every
# `spectra.every` steps, into `<run>/spectra.jsonl`).

# %%
#| export
def add_stats(stats: dict, **values) -> None:
    "Add named values to this rank's statistics of the step."
    for key, value in values.items(): stats[key] += value

def check_finite(record: dict, run_dir: Path) -> None:
    "Raise FloatingPointError on a NaN/inf loss or gradient norm, naming the step and the checkpoint kept."
    bad = [key for key in ("loss", "grad_norm") if not math.isfinite(record[key])]
    if not bad: return
    latest = Path(run_dir) / "checkpoints" / "latest"
    kept = f"{latest.parent / latest.read_text().strip()}" if latest.exists() else "none was written yet"
    raise FloatingPointError(f"step {record['step']}: {' and '.join(f'{k} is {record[k]}' for k in bad)}; stopped before the "
                             f"optimizer step. The last good checkpoint is kept ({kept}); lower train.lr or set "
                             f"train.grad_clip, then relaunch to resume from it")

def episode_tables(cfg: Config) -> tuple:
    "(word_start, alpha_len, special ids) of the tokenizer, for SMLMT episodes."
    from picomaml.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.data)
    return tok.word_start_table(), tok.alpha_len_table(), [tok.eos_id]

def record_run_spectra(model, eval_rows, cfg: Config, step: int, run_dir: Path) -> None:
    "Weight and gradient spectra of `spectra.layers` on the fixed evaluation batch, appended to spectra.jsonl."
    from picomaml.data import eval_batches
    from picomaml.spectra import record_spectra
    batch = next(eval_batches(eval_rows, cfg.spectra.grad_rows, cfg.spectra.grad_rows))
    record_spectra(model, batch, cfg.spectra.layers, step, run_dir / "spectra.jsonl")

# %%
try: check_finite({"step": 7, "loss": float("nan"), "grad_norm": 1.0}, Path("/nonexistent")); raise AssertionError
except FloatingPointError as e: assert "step 7: loss is nan" in str(e) and "none was written yet" in str(e)
check_finite({"step": 7, "loss": 1.0, "grad_norm": 2.0}, Path("/nonexistent"))

# %% [markdown]
# ## The loop
#
# Paper 1, Algorithms 1 and 2, one micro-batch at a time. Per optimizer step: set the learning rate;
# for each micro-step draw the branch; an **episode** reads and gathers the pool, builds the episode
# of (seed, micro-step), and runs `picomaml.maml.maml_step` with the support rows split over ranks
# (features gathered back) and the query rows split; a **next-token** micro-step backpropagates its
# rank's share of the global loss. Then the gradients are summed over ranks, checked, clipped, and
# AdamW steps. Logging, evaluation, spectra and checkpoints follow. Each micro-step starts from a
# seed of (seed, step, micro-step, rank), so dropout is a function of the position in the run and a
# resumed run repeats it exactly; the head's inner loop gets a seed without the rank, so it is
# identical on every rank.

# %%
#| export
def train(cfg: Config, fabric, hub_api=None) -> Path:
    "Pretrain under `cfg` on a launched Fabric (Algorithms 1 and 2); returns the run directory."
    from tqdm.auto import tqdm
    from picomaml.data import ShardRows, batch_for_step, open_rows
    from picomaml.maml import maml_step
    from picomaml.smlmt import build_episode
    tc, rank, world, device = cfg.train, fabric.global_rank, fabric.world_size, fabric.device
    accum = accumulation_steps(tc.global_batch, tc.micro_batch, world)
    run_dir = Path(cfg.logging.runs_dir) / cfg.logging.run_name
    model, head, optimizer = build_model(cfg, device)
    params = [*model.parameters(), *head.parameters()]
    train_rows = open_rows(cfg.data, "train", cfg.model.vocab_size)
    needs_eval = cfg.eval.every > 0 or cfg.spectra.every > 0
    eval_rows = open_rows(cfg.data, "eval", cfg.model.vocab_size) if needs_eval else None
    if cfg.maml.rho > 0:
        episode_rows = pool_rows_per_rank(cfg.smlmt.pool_rows, world)
        pool_source = train_rows if isinstance(train_rows, ShardRows) else open_rows(cfg.data, "train", cfg.model.vocab_size)
        word_start, alpha_len, special_ids = episode_tables(cfg)
    peak = peak_flops(device)
    start = resume_or_start(fabric, cfg, run_dir, model, head, optimizer)
    if start == 0 and tc.log_spaced_checkpoints: save_training_state(fabric, cfg, run_dir, 0, model, head, optimizer, hub_api)
    bar = tqdm(total=tc.steps, initial=start, disable=rank != 0 or not cfg.logging.progress_bar, desc=cfg.logging.run_name)
    for step in range(start, tc.steps):
        lr = lr_at(step, tc)
        for group in optimizer.param_groups: group["lr"] = lr
        started, stats = time.perf_counter(), dict.fromkeys(STATS, 0.0)
        branches = branch_draws(tc.seed, step, accum, cfg.maml.rho)
        for micro, is_episode in enumerate(branches):
            torch.manual_seed(mix_seed(tc.seed, step, micro, rank))
            if is_episode:
                local = batch_for_step(pool_source, step, micro, rank, world, episode_rows, accum, mix_seed(tc.seed, "pool") % 2**31)
                pool = gather_parts(fabric, local.to(device), [episode_rows] * world)  # (pool_rows, seq_len + 1)
                episode = build_episode(pool, cfg.smlmt, word_start, alpha_len, special_ids, cfg.data.mask_id, tc.seed, step * accum + micro)
                n_support, n_query = len(episode.support_labels), len(episode.query_labels)
                with fabric.autocast():
                    out = maml_step(model, head, episode, cfg.maml, gather=lambda f: gather_parts(fabric, f, part_sizes(n_support, world)),
                                    support_part=part_slice(n_support, world, rank), query_part=part_slice(n_query, world, rank),
                                    loss_scale=1 / accum, inner_seed=mix_seed(tc.seed, step, micro, "inner"))
                window, my_support = episode.support_ids.shape[1], part_sizes(n_support, world)[rank]
                add_stats(stats, loss=out["loss"] / accum, query_loss=out["loss"], n_maml=1, support_acc=out["support_acc"],
                          query_correct=out["query_correct"], query_count=out["query_count"], head_w_mean=out["head_weight_mean"],
                          head_w_std=out["head_weight_std"], tokens=(my_support + out["query_count"]) * window,
                          flops=episode_flops(cfg.model, my_support * window, out["query_count"] * window, window))
            else:
                rows = batch_for_step(train_rows, step, micro, rank, world, tc.micro_batch, accum, tc.seed).to(device)
                n_targets = rows.shape[0] * (rows.shape[1] - 1)
                with fabric.autocast():
                    share = next_token_loss_sum(model, rows) / (n_targets * world)  # this rank's share of the micro-batch mean
                (share / accum).backward()
                add_stats(stats, loss=share.item() / accum, ar_loss=share.item(), n_ar=1, tokens=n_targets,
                          flops=ar_flops(cfg.model, n_targets, rows.shape[1] - 1))
        sum_gradients(fabric, params)
        totals = torch.tensor([stats[k] for k in STATS] + [float(b) for b in branches], dtype=torch.float64, device=device)
        totals = (fabric.all_reduce(totals, reduce_op="sum") if world > 1 else totals).cpu()
        if any(v not in (0, world) for v in totals[len(STATS):].tolist()):
            raise RuntimeError(f"step {step + 1}: ranks took different branches {totals[len(STATS):].tolist()}; the branch draw must be shared")
        record = {"step": step + 1, **step_record(totals[: len(STATS)], world), "lr": lr,
                  "branches": "".join("M" if b else "A" for b in branches)}
        head_grads = [p.grad for p in head.parameters() if p.grad is not None]
        record["head_grad_norm"] = torch.linalg.vector_norm(torch.stack([g.norm() for g in head_grads])).item() if head_grads else None
        record["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else math.inf).item()
        check_finite(record, run_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        record["tokens_per_s"] = record["tokens"] / elapsed
        record["mfu"] = totals[STATS.index("flops")].item() / elapsed / (peak * world) if peak else None
        if cfg.eval.every and (step + 1) % cfg.eval.every == 0:
            record.update(evaluate(fabric, model, eval_rows, cfg.eval, cfg.data.eos_id))
        if cfg.spectra.every and (step + 1) % cfg.spectra.every == 0 and rank == 0:
            record_run_spectra(model, eval_rows, cfg, step + 1, run_dir)
        if rank == 0 and ((step + 1) % cfg.logging.log_every == 0 or step + 1 == tc.steps):
            with open(run_dir / "metrics.jsonl", "a") as f: f.write(json.dumps(record) + "\n")
        fabric.log_dict({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step + 1)
        if checkpoint_due(step + 1, tc): save_training_state(fabric, cfg, run_dir, step + 1, model, head, optimizer, hub_api)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", branches=record["branches"])
    bar.close()
    return run_dir

# %% [markdown]
# ## A tiny run, start to finish
#
# Real data, tiny model: 20 C4 documents prepared into 33-id rows, a two-block d = 24 decoder (the
# real 50,304-row vocabulary, since the rows hold real OLMo ids), one CPU process. Next-token training
# only (rho = 0) must lower the loss, never build an episode and write the whole run directory.

# %%
import os
from lightning.fabric import Fabric
from picomaml.config import load_config
from picomaml.data import prepare
from picomaml.tokenizer import load_tokenizer
import picomaml.smlmt

SHARED = Path(os.environ.get("PICOMAML_DATA", "/work/shared/data"))
_tok = load_tokenizer(load_config(None, [f"data.tokenizer_path={SHARED}/tokenizer/olmo-7b-0724-tokenizer.json"]).data)
_data = Path(tempfile.mkdtemp())
prepare(sorted((SHARED / "corpus/train").glob("c4-sample.0[12].json.gz")), _data / "train", 32, _tok, log=lambda m: None)
prepare(sorted((SHARED / "corpus/eval").glob("c4_100_domains_*.jsonl.gz")), _data / "eval", 32, _tok, log=lambda m: None)

def tiny_config(runs_dir, *overrides):
    "A seconds-long configuration on the prepared rows."
    return load_config(None, [
        "model.d_model=24", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=96", "model.max_seq_len=32",
        f"data.train_path={_data}/train", f"data.eval_path={_data}/eval", "data.seq_len=32", f"data.tokenizer_path={_tok.source}",
        "train.steps=8", "train.global_batch=8", "train.micro_batch=4", "train.lr=1e-2", "train.warmup_steps=2", "train.save_every=4",
        "smlmt.n_way=4", "smlmt.k_shot=2", "smlmt.q_query=2", "smlmt.window=12", "smlmt.pool_rows=64", "smlmt.exclude_top=30",
        "maml.head_hidden=16", "maml.head_layers=2", "eval.every=4", "eval.max_rows=16", "eval.batch_size=8",
        "spectra.every=0", f"logging.runs_dir={runs_dir}", "logging.progress_bar=false", *overrides])

def read_metrics(run_dir): return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]

_fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
_runs = Path(tempfile.mkdtemp())
_real_build = picomaml.smlmt.build_episode
picomaml.smlmt.build_episode = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rho = 0 built an episode"))
try: _run = train(tiny_config(_runs, "maml.rho=0", "logging.run_name=ar"), _fabric)
finally: picomaml.smlmt.build_episode = _real_build
_log = read_metrics(_run)
assert [r["step"] for r in _log] == list(range(1, 9)) and all(r["n_maml"] == 0 and r["n_ar"] == 2 for r in _log)
assert _log[-1]["loss"] < _log[0]["loss"] - 0.3, [r["loss"] for r in _log]
assert all(r["query_loss"] is None and r["support_acc"] is None and r["head_grad_norm"] is None for r in _log)
assert _log[3]["paloma_ppl"] > _log[7]["paloma_ppl"] and "paloma_doc_ppl" in _log[7] and "paloma_ppl" not in _log[4]
assert sorted(p.name for p in (_run / "checkpoints").iterdir()) == ["latest", "step_000004", "step_000008"]
assert load_config(_run / "config.yaml").maml.rho == 0
print(*(f"step {r['step']}: loss {r['loss']:.3f} lr {r['lr']:.4f} {r['tokens_per_s']:.0f} tok/s" for r in _log), sep="\n")

# %% [markdown]
# Episodes only (rho = 1): no next-token step is ever taken, every step logs the episode metrics,
# and the head's weights move (AdamW steps it with the backbone).

# %%
_run = train(tiny_config(_runs, "maml.rho=1", "logging.run_name=maml", "train.steps=3", "eval.every=0",
                         "train.log_spaced_checkpoints=true"), _fabric)
_log = read_metrics(_run)
assert all(r["n_ar"] == 0 and r["n_maml"] == 2 and r["branches"] == "MM" and r["ar_loss"] is None for r in _log)
assert all(0 <= r["support_acc"] <= 1 and 0 <= r["query_acc"] <= 1 and r["head_grad_norm"] > 0 for r in _log)
assert all(math.isclose(r["loss"], r["query_loss"], rel_tol=1e-12) for r in _log)
_head0, _head3 = (load_file(_run / f"checkpoints/step_00000{s}/head.safetensors") for s in (0, 3))
assert all(not torch.equal(_head0[k], _head3[k]) for k in _head0)
print(*(f"step {r['step']}: query loss {r['query_loss']:.3f} support acc {r['support_acc']:.2f} query acc {r['query_acc']:.2f}" for r in _log), sep="\n")

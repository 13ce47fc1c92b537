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
# # The resource plan
#
# > Per-GPU memory, the memory chunk, tokens and FLOPs per optimizer step, wall time and checkpoint
# > disk of a run, predicted from its configuration before anything is allocated. The launcher uses
# > the same plan and refuses, before step 1, a run that would not fit.
#
# Paper 1 §3.3 and paper 2 §2.4 train on branch micro-batches of 256 sequences of 2,048 tokens. On
# four GPUs a rank holds 64 of those rows (the 256 are counted over all ranks: `docs/settings.md`),
# and the activations of 64 rows of the large model are about 160 GB, twice an 80 GB GPU: the rows
# must run in memory chunks (`train.chunk_rows`, `06_lm_loss`), and how many rows a chunk can hold
# is a question of the model, the precision and the device. This notebook answers it from a memory
# model derived from the code: what the autograd graph of each decoder block keeps (counted exactly
# on CPU below), the temporaries of the fused loss and of the backward pass, the persistent weights,
# gradients and AdamW moments, the episode, the evaluation and the spectra. It also holds the FLOP
# counts the trainer logs as MFU, so the plan's time estimates and the trainer's MFU use one
# definition.
#
# `python -m picomaml.plan --config C --gpus N --gpu-memory-gb M [--gpu-tflops T] [--mfu F]` prints
# the plan and exits 0 when the run fits, 2 with one line naming the setting to change when it does not.

# %%
#| default_exp plan

# %%
#| export
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from picomaml.checkpoints import scheduled_steps
from picomaml.config import Config, ConfigError, load_config
from picomaml.device import peak_tflops, resolve_precision

# %%
import contextlib
import dataclasses
import glob
import io
import tempfile
from pathlib import Path

from picomaml.config import PRESETS_DIR, ModelConfig
from picomaml.maml import MAMLHead
from picomaml.model import PicoDecoder

# %% [markdown]
# ## FLOPs and model FLOPs utilisation
#
# We count FLOPs as PaLM (Chowdhery et al. 2022, App. B) does: a forward and backward pass costs
# 6·N per token for N matmul parameters plus 12·L·d·T for attention over T positions; a forward alone
# is a third of that. The input embedding is a lookup and does not count. An AR token runs the whole
# model; an episode runs its support windows forward only and its query windows forward and backward,
# both without the output layer (features are read from the last hidden state); the head's MLP is
# negligible and not counted. Recomputation under activation checkpointing is not model FLOPs and is
# not counted either (it lowers the MFU a run reaches). MFU divides by a peak: dense bf16 Tensor-Core
# FLOP/s of the GPU, looked up by its name (`00_device`: an H100 SXM 989e12, the PCIe card 756e12, an
# A100 312e12, ...); on a CPU or an unknown GPU there is no honest peak, so MFU is `null`.

# %%
#| export
def _block_params(mc) -> int:
    "Matmul parameters of one decoder block: GQA projections and the SwiGLU."
    kv = mc.d_model // mc.n_heads * mc.n_kv_heads
    return 2 * mc.d_model * mc.d_model + 2 * mc.d_model * kv + 3 * mc.d_model * mc.ffn_hidden

def next_token_flops(mc, tokens: int, seq_len: int) -> float:
    "Forward + backward FLOPs of `tokens` next-token positions in sequences of `seq_len`."
    n_matmul = mc.n_layers * _block_params(mc) + mc.d_model * mc.vocab_size  # blocks + output layer
    return tokens * (6 * n_matmul + 12 * mc.n_layers * mc.d_model * seq_len)

def episode_flops(mc, support_tokens: int, query_tokens: int, window: int) -> float:
    "FLOPs of an episode: support windows forward only, query windows forward + backward, no output layer."
    per_token = 6 * mc.n_layers * _block_params(mc) + 12 * mc.n_layers * mc.d_model * window
    return support_tokens * per_token / 3 + query_tokens * per_token

def peak_flops(device) -> float | None:
    "Dense bf16 peak FLOP/s of a known GPU, else None (no honest peak for CPUs)."
    device = torch.device(device)
    if device.type != "cuda": return None
    tflops = peak_tflops(torch.cuda.get_device_name(device))
    return tflops * 1e12 if tflops else None


# %%
_mc = ModelConfig(d_model=96, ffn_hidden=384)
assert _block_params(_mc) == 2 * 96 * 96 + 2 * 96 * 32 + 3 * 96 * 384
_tiny_params = 11_282_784  # paper 1 §3.1's tiny model, counted in 01_model: 12 blocks + norms + two embeddings
_matmul = _mc.n_layers * _block_params(_mc) + 96 * 50304
assert _tiny_params - _matmul - 96 * 50304 == 12 * 2 * 96 + 96  # the rest: RMSNorm gains and the input embedding
assert next_token_flops(_mc, 1, 0) == 6 * _matmul and episode_flops(_mc, 3, 0, 0) == episode_flops(_mc, 0, 1, 0)
assert peak_flops(torch.device("cpu")) is None and peak_flops("cpu") is None


# %% [markdown]
# ## Parameters
#
# The persistent state is a count of parameters: the backbone's (`01_model`) and the MAML head's
# (`05_maml`: `head_layers` linear layers with biases, N-way or, in the `released-*` presets, one
# output per vocabulary id).

# %%
#| export
def param_counts(cfg: Config) -> dict:
    "Parameters by part: block matmuls, input embedding, output layer, RMSNorm gains, MAML head."
    mc, hc = cfg.model, cfg.maml
    n_out = mc.vocab_size if hc.head_output == "vocab" else cfg.smlmt.n_way
    widths = [mc.d_model] + [hc.head_hidden] * (hc.head_layers - 1) + [n_out]
    return {"blocks": mc.n_layers * _block_params(mc), "embedding": mc.vocab_size * mc.d_model,
            "output": mc.vocab_size * mc.d_model, "norms": (2 * mc.n_layers + 1) * mc.d_model,
            "head": sum(i * o + o for i, o in zip(widths[:-1], widths[1:]))}


# %% [markdown]
# Test: the counts equal the real modules' for a toy model with either head, and the tiny model's
# backbone is the 11,282,784 parameters that `01_model` counts (paper 1's "11M").

# %%
from picomaml.devtools import TINY_MODEL

# the shared tiny model over 64 ids and 64 positions, a 5-way head 16 wide
_toy = load_config(None, [*TINY_MODEL, "model.vocab_size=64", "model.max_seq_len=64", "smlmt.n_way=5",
                          "maml.head_hidden=16"])
for _out in ("classes", "vocab"):
    _toy.maml.head_output = _out
    _counts = param_counts(_toy)
    assert sum(_counts.values()) - _counts["head"] == sum(p.numel() for p in PicoDecoder(_toy.model).parameters())
    assert _counts["head"] == sum(p.numel() for p in MAMLHead(24, 5, _toy.maml, 64).parameters())
_toy.maml.head_output = "classes"
assert sum(v for k, v in param_counts(load_config(PRESETS_DIR / "pico-tiny-maml.yaml")).items()
           if k != "head") == _tiny_params


# %% [markdown]
# ## What one decoder block keeps for its backward
#
# Under bf16-mixed precision (GPU) the weights stay float32 and `torch.autocast` runs the matmuls in
# bf16; on CPU everything is float32. Reading `01_model` with that in mind gives, per token, what the
# autograd graph of one block saves (d the width, f the SwiGLU width, d_kv = d · n_kv_heads / n_heads,
# H the query heads, a = 2 bytes under autocast and 4 in float32):
#
# - **the residual stream is float32 in both.** The embedding is not autocast, RMSNorm computes in
#   float32 and returns its input's dtype, and `x + attention(...)` promotes bf16 to float32. Each of
#   the two RMSNorms keeps its input (4d), the normalised x (4d) and 1/rms (4 bytes): 16d + 8.
# - **the inputs of the linear layers.** In float32 the q, k and v projections share one saved input,
#   and so do w_0 and w_1: 2 × 4d. Under autocast each linear casts the float32 norm output again and
#   keeps its own bf16 copy (autocast caches casts of weights only): 5 × 2d.
# - **attention**: `scaled_dot_product_attention` keeps q, k, v, its output (a·d + 2a·d_kv + a·d) and a
#   float32 log-sum-exp per head (4H); `o_proj` keeps its input, a reshaped copy of the output (a·d).
#   RoPE multiplies by constant cos/sin tables and keeps only those.
# - **SwiGLU**: w_0's output (silu's input), silu's output, w_1's output and their product, w_2's
#   input: 4a·f.
#
# Under autocast the graph also keeps the bf16 copy of every block weight (2 bytes a matmul
# parameter), counted separately below. With `train.activation_checkpointing` a block keeps only its
# float32 input (4d) and recomputes the rest in backward. On CUDA, attention in bf16 takes the flash
# kernel, which saves the same q, k, v, output and log-sum-exp as the CPU kernel counted here; its
# output may already be laid out so that `o_proj`'s input is a view of it, one a·d less per block,
# which the GPU check would show as a measurement a few per cent under the plan.

# %%
#| export
def block_saved_bytes(mc, tokens: int, a: int) -> int:
    "Bytes one decoder block's autograd graph keeps for `tokens` positions when matmuls produce `a`-byte activations."
    d, f, H = mc.d_model, mc.ffn_hidden, mc.n_heads
    d_kv = d // H * mc.n_kv_heads
    norms = 2 * (4 * d + 4 * d + 4)  # each RMSNorm: its float32 input, the normalised x, 1/rms
    linear_inputs = 2 * 4 * d if a == 4 else 5 * a * d  # float32: two shared inputs; autocast: one bf16 cast per linear
    attention = 3 * a * d + 2 * a * d_kv + 4 * H  # q, output, o_proj's input; k, v; float32 log-sum-exp per head
    swiglu = 4 * a * f  # w_0 and w_1 outputs, silu's output, their product
    return tokens * (norms + linear_inputs + attention + swiglu)

def activation_bytes(cfg: Config, device: str, capability: tuple | None = None) -> int:
    ("Bytes of a matmul's activation: 2 under bf16 autocast, else 4, with train.precision resolved as the launch "
     "resolves it.")
    return 2 if resolve_precision(cfg.train.precision, device, capability) == "bf16-mixed" else 4


# %% [markdown]
# Test, a known answer: the bytes of the distinct non-parameter storages that the autograd graph of
# `hidden` really saves (seen through `torch.autograd.graph.saved_tensors_hooks`) equal the formula
# exactly, in float32 and under bf16 autocast (the CPU's autocast makes the same casts as CUDA's), with
# and without activation checkpointing, for two shapes and two key/value head counts. Besides the blocks,
# `hidden` keeps the token ids (int64, for the embedding's backward), the RoPE tables (two (T, d_head/2)
# float32 tensors) and the output norm's input, normalised x and 1/rms.

# %%
def graph_bytes(model, rows, autocast) -> int:
    "Bytes of the distinct non-parameter storages saved by the graph of `model.hidden(rows)`."
    storages, params = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}
    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model.hidden(rows)
    return sum(n for ptr, n in storages.items() if ptr not in params)

torch.manual_seed(0)
for _kv, (_B, _T) in ((2, (2, 16)), (4, (3, 40))):
    _mc = dataclasses.replace(_toy.model, n_kv_heads=_kv)
    _N, _d, _L = _B * _T, _mc.d_model, _mc.n_layers
    _model = PicoDecoder(_mc)
    _rows = torch.randint(0, 64, (_B, _T))
    _tail = 8 * _N + 4 * _T * (_d // _mc.n_heads) + _N * (8 * _d + 4)  # ids, RoPE tables, output norm
    for _a, _autocast in ((4, contextlib.nullcontext()), (2, torch.autocast("cpu", dtype=torch.bfloat16))):
        _bf16_weights = 2 * _L * _block_params(_mc) if _a == 2 else 0
        _model.activation_checkpointing = False
        assert graph_bytes(_model, _rows, _autocast) == _tail + _L * block_saved_bytes(_mc, _N, _a) + _bf16_weights
        _model.activation_checkpointing = True
        assert graph_bytes(_model, _rows, _autocast) == _tail + _L * 4 * _N * _d

# %% [markdown]
# ## The attention kernel the device will use
#
# The counts above are those of a fused attention kernel, which keeps q, k, v, the output and a
# float32 log-sum-exp per head and never holds the (T, T) scores. Which kernel
# `scaled_dot_product_attention` takes depends on the device and the dtype. On CUDA the flash and
# cuDNN kernels need fp16 or bf16, and the memory-efficient kernel does not take grouped-query heads
# (`enable_gqa`), so a **float32** pass with GQA (the spectra's gradient pass, a run at
# `train.precision=32-true`, any GPU below compute capability 8.0, where `auto` is float32:
# `00_device`) falls back to the **math kernel**. It computes scores, softmax and product as ordinary
# tensors, and its graph keeps the (rows, H, T, T) float32 softmax instead of the log-sum-exp, and k and v
# repeated to all H heads (counted exactly below, through the saved tensors): at the papers' shapes 12 × 2,048² × 4 bytes = 201 MB per row and block, 19 GiB for 8 rows of the large
# model's 12 blocks. On CPU the default kernel handles float32 GQA itself, which is why a CPU
# measurement sees this term only when it forces the math kernel
# (`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`), as the test below and `tests/test_plan.py` do.
#
# Beyond what the graph keeps, the math kernel's transients were measured on CPU (float32, d 96, 12
# heads, 2 × 1,024 tokens, L = 1, 2, 4, 8 blocks): a chunk's forward and backward peak (L + 1.8) u above
# the fused kernel's, u the size of one block's softmax: the L softmaxes kept, and in the backward of
# the last block the gradients of its softmax and of its scores, planned as 2u. A forward without a
# graph (evaluation, an episode's support windows) holds the scores and the softmax of one block: 2u.

# %%
#| export
def uses_math_attention(mc, device: str, a: int) -> bool:
    "Whether attention takes PyTorch's math kernel: float32 activations with grouped-query heads on CUDA."
    return device == "cuda" and a == 4 and mc.n_kv_heads != mc.n_heads

def attention_probs_bytes(mc, rows: int, seq: int) -> int:
    "Bytes of one block's float32 (rows, H, T, T) attention softmax under the math kernel."
    return 4 * rows * mc.n_heads * seq * seq

def block_kept_bytes(mc, rows: int, seq: int, a: int, math: bool = False) -> int:
    "Bytes one block's graph keeps for rows × seq tokens, under the fused or the math attention kernel (float32)."
    N, d_kv = rows * seq, mc.d_model // mc.n_heads * mc.n_kv_heads
    if not math: return block_saved_bytes(mc, N, a)
    # k, v repeated to all H heads (2 · 4d, not 2 · 4d_kv), no copy of the output
    repeated_kv = 4 * N * (mc.d_model - 2 * d_kv)
    return block_saved_bytes(mc, N, a) + attention_probs_bytes(mc, rows, seq) - 4 * mc.n_heads * N + repeated_kv


# %% [markdown]
# Test, the same known answer under the math kernel: the saved bytes equal the formula, for query/key-value
# head ratios of 2 and 4, and for the Pico ratio 12/4 (at a toy width).

# %%
from torch.nn.attention import SDPBackend, sdpa_kernel

for (_H, _kv, _w), (_B, _T) in (((4, 2, 24), (2, 16)), ((4, 1, 24), (3, 40)), ((12, 4, 48), (2, 24))):
    _mc = dataclasses.replace(_toy.model, n_heads=_H, n_kv_heads=_kv, d_model=_w, ffn_hidden=4 * _w)
    _N, _d, _L = _B * _T, _mc.d_model, _mc.n_layers
    _model, _rows = PicoDecoder(_mc), torch.randint(0, 64, (_B, _T))
    _tail = 8 * _N + 4 * _T * (_d // _mc.n_heads) + _N * (8 * _d + 4)
    with sdpa_kernel(SDPBackend.MATH):
        assert graph_bytes(_model, _rows,
                           contextlib.nullcontext()) == _tail + _L * block_kept_bytes(_mc, _B, _T, 4, math=True)
assert uses_math_attention(_toy.model, "cuda", 4) and not uses_math_attention(_toy.model, "cuda", 2)
assert not uses_math_attention(_toy.model, "cpu", 4) and not uses_math_attention(
    dataclasses.replace(_toy.model, n_kv_heads=4), "cuda", 4)

# %% [markdown]
# ## The peak of one next-token chunk
#
# `next_token_backward` runs a chunk's forward, the fused output layer + loss (`06_lm_loss`) and the
# backward. Above the persistent state, memory peaks at one of three moments, whichever is largest:
#
# 1. **inside the fused loss's forward**, with every block's activations kept: the output norm's
#    tensors (8d + 4 per token), the gradients it computes in forward, ∂h (N × 4d) and ∂W (V × 4d), the
#    bf16 copy of the output weight (autocast's cache), and one 1,024-token chunk of float32 logits
#    (c × 4V) with either `logsumexp`'s same-sized temporary or, later, the bf16 copy of the softmax
#    and the (V, d) product for ∂W. From the second loss chunk on, the previous chunk's softmax is
#    still alive during `logsumexp` (the name `dlogits` holds it until it is rebound): a third c × 4V;
# 2. **its backward**, which scales ∂h and ∂W by the incoming gradient into new tensors;
# 3. **the backward of the last block**, where the residual's float32 gradient and the gradients of
#    silu's output and w_1's output (2 × a·f) exist next to the saved tensors (measured on CPU: this
#    is the block's largest moment). With activation checkpointing this is the moment the last block
#    is recomputed: its whole graph (and its bf16 weights) exists next to every block's saved input.
#
# The three were found by measuring the peak resident memory of real chunks on CPU
# (`tests/test_plan.py` does it for three shapes and asserts ±25 %; the results are below).
# `benchmarks/gpu_check.sh` compares every phase with `torch.cuda.max_memory_allocated` on a GPU and
# writes `benchmarks/results-gpu.md`.

# %%
#| export
LOSS_CHUNK = 1024  # tokens per chunk of the fused output layer + loss (`next_token_loss_sum`'s default)

def kept_bytes(mc, rows: int, seq: int, a: int, checkpointing: bool, math: bool = False) -> int:
    ("Bytes the blocks' graphs keep for backward over rows × seq tokens: token ids, RoPE tables, "
     "every block (or its input).")
    N = rows * seq
    blocks = mc.n_layers * (4 * N * mc.d_model if checkpointing else block_kept_bytes(mc, rows, seq, a, math))
    return 8 * N + 4 * seq * (mc.d_model // mc.n_heads) + blocks

def chunk_peak_bytes(mc, rows: int, seq: int, a: int, checkpointing: bool, lm_loss: bool = True, *,
                     math: bool = False) -> int:
    ("Peak bytes above the persistent state of forward + backward over rows × seq tokens "
     "(with the fused LM loss, or a readout).")
    N, d, V, L = rows * seq, mc.d_model, mc.vocab_size, mc.n_layers
    cast = 2 if a < 4 else 0  # autocast keeps a bf16 copy of each weight it uses
    kept, w_blocks, w_out = (kept_bytes(mc, rows, seq, a, checkpointing, math), cast * L * _block_params(mc),
                             cast * V * d)
    out_norm, grads = N * (8 * d + 4), N * (4 * d + 2 * a * mc.ffn_hidden)
    # the math kernel's backward: d(softmax), d(scores)
    softmax_grads = 2 * attention_probs_bytes(mc, rows, seq) if math else 0
    last_block = block_kept_bytes(mc, rows, seq, a, math) - 4 * N * d + w_blocks // L if checkpointing else w_blocks
    # backward of the last block (recomputed first, with checkpointing)
    moments = [kept + last_block + grads + softmax_grads]
    if lm_loss:
        c = min(LOSS_CHUNK, N)
        previous = 4 * c * V if N > c else 0  # the last chunk's softmax lives on in `dlogits` until rebound
        logits = 4 * c * V + max(4 * c * V + previous, cast * c * V + a * V * d)
        moments.append(kept + w_blocks + w_out + out_norm + 4 * N * d + 4 * V * d + logits)  # fused loss, forward
        # its backward
        moments.append(kept + (0 if checkpointing else w_blocks) + out_norm + 2 * (4 * N * d + 4 * V * d))
    else:
        moments.append(kept + w_blocks + out_norm)  # end of the forward: features for the readout
    return max(moments)


# %% [markdown]
# Tests, invariants: more rows never need less; checkpointing needs less for a full-size chunk; bf16
# activations need less than float32; a readout (no output layer) needs no more than the LM loss.

# %%
_large = load_config(PRESETS_DIR / "pico-large-maml.yaml").model
_peaks = [chunk_peak_bytes(_large, r, 2048, 2, False) for r in range(1, 9)]
assert all(b > a for a, b in zip(_peaks, _peaks[1:]))
assert chunk_peak_bytes(_large, 8, 2048, 2, True) < chunk_peak_bytes(_large, 8, 2048, 2, False) / 3
assert chunk_peak_bytes(_large, 8, 2048, 2, False) < chunk_peak_bytes(_large, 8, 2048, 4, False)
assert chunk_peak_bytes(_large, 8, 64, 2, False, lm_loss=False) <= chunk_peak_bytes(_large, 8, 64, 2, False)
print(f"pico-large, one 2,048-token row in bf16: {chunk_peak_bytes(_large, 1, 2048, 2, False) / 2**30:.2f} GiB, "
      f"with activation checkpointing {chunk_peak_bytes(_large, 1, 2048, 2, True) / 2**30:.2f} GiB")


# %% [markdown]
# Measured by `tests/test_plan.py` on the 2-core development machine (a fresh process per shape, float32,
# max-RSS growth over the chunk with glibc's mmap threshold at 64 KiB so that freed tensors leave the
# resident set; the baseline is taken after the model exists and every `.grad` is allocated):
#
# | chunk | predicted | measured |
# |---|---|---|
# | d 384, 4 blocks, vocabulary 8,192, 2 × 1,024 tokens | 446 MB | 458 MB (+2.6 %) |
# | d 192, 6 blocks, vocabulary 50,304, 4 × 256 tokens | 575 MB | 585 MB (+1.8 %) |
# | d 384, 4 blocks, vocabulary 512, 8 × 512 tokens, activation checkpointing | 237 MB | 240 MB (+1.2 %) |
# | float32 under the math attention kernel: d 96, 12/4 heads, 4 blocks, vocabulary 512, 4 × 512 tokens | 391 MB | 386 MB (−1.3 %) |
# | a spectra group under the math kernel: d 96, 6 blocks, vocabulary 2,048, 2 × 768 tokens | 553 MB | 553 MB (+0.0 %) |
#
# In the last two the float32 (rows, H, T, T) softmaxes are more than half of the phase: the term a
# CPU's default kernel never shows, measured by forcing `sdpa_kernel(SDPBackend.MATH)`.
#
# The 3–12 MB the measurements exceed the predictions by does not grow with the shape (the CPU BLAS's
# and OpenMP's workspaces); the reserve covers it.

# %% [markdown]
# ## The other phases of a step
#
# **An episode** (`05_maml`, `06_collectives`): the pool is gathered on every rank as int64 rows, and the
# vectorised episode search (`04_smlmt`) holds a few pool-sized tensors at once (the candidate grid,
# its max-pooled spread, the taken windows); 64 bytes a pool token bounds both. This rank's share of the
# support windows runs forward without a graph (one block's tensors alive at a time), its share of the
# query windows forward and backward like a chunk without the output layer, and the head's inner loop
# holds logits, softmax and gradient of the support set (only the vocabulary-indexed head makes these
# visible).
#
# **The optimizer step** (`06_collectives`, `06_train`): after the last backward the activations are gone; with
# several ranks `sum_gradients` concatenates every gradient into one flat float32 tensor and
# all-reduces it in place (4 bytes a parameter, freed on return), then AdamW's `foreach` path on CUDA
# allocates sqrt(v) for all parameters at once (4 bytes a parameter); on CPU AdamW loops over tensors,
# two temporaries of the largest one.
#
# **Evaluation** (every `eval.every` steps, `eval.batch_size` rows per device, no graph, after
# `zero_grad`): weights, AdamW moments, the bf16 weight copies, one block's tensors, then the whole
# (rows × T, V) logits as float32 with their log-softmax (8 bytes a logit; under autocast the bf16
# logits are freed once cast).
#
# **Spectra** (every `spectra.every` steps, `08_spectra`): the mean next-token gradient of the first
# `spectra.grad_rows` evaluation rows, accumulated over groups of `spectra.grad_batch` rows (the ranks
# share the groups): per group a full graph outside autocast, so in float32 (under the math attention
# kernel on CUDA), plus two sets of the selected weight matrices' gradients, the group's and the sum.

# %%
#| export
def episode_peak_bytes(cfg: Config, gpus: int, a: int, math: bool = False) -> int:
    "Peak bytes of one MAML episode on a rank above the persistent state: pool, support forward, query backward, head."
    mc, sc = cfg.model, cfg.smlmt
    # a rank's own episode is not split over ranks; its pool is its rows
    split = 1 if sc.episode_scope == "rank" else gpus
    pool = 64 * (sc.pool_rows or cfg.train.branch_batch) // (gpus // split) * (cfg.data.seq_len + 1)
    support_rows, query_rows = -(-sc.n_way * sc.k_shot // split), -(-sc.n_way * sc.q_query // split)
    w_blocks = (2 if a < 4 else 0) * mc.n_layers * _block_params(mc)
    scores = 2 * attention_probs_bytes(mc, support_rows, sc.window) if math else 0
    support = w_blocks + block_saved_bytes(mc, support_rows * sc.window, a) + scores  # no graph: one block at a time
    query = chunk_peak_bytes(mc, query_rows, sc.window, a, cfg.train.activation_checkpointing, lm_loss=False, math=math)
    n_out = mc.vocab_size if cfg.maml.head_output == "vocab" else sc.n_way
    head = 3 * 4 * sc.n_way * sc.k_shot * max(n_out, cfg.maml.head_hidden)
    return pool + max(support, query) + head

def step_transient_bytes(cfg: Config, gpus: int, device: str) -> int:
    "Bytes the optimizer step adds: the flat all-reduce copy (several ranks), then AdamW's sqrt(v) temporaries."
    counts = param_counts(cfg)
    n = sum(counts.values())
    adamw = 4 * n if device == "cuda" else 2 * 4 * max(counts["embedding"], counts["head"],
                                                       cfg.model.ffn_hidden * cfg.model.d_model)
    return max(4 * n if gpus > 1 else 0, adamw)

def eval_peak_bytes(cfg: Config, a: int, rows: int, math: bool = False) -> int:
    ("Peak bytes of evaluating `rows` rows per device above weights and AdamW state: bf16 weights, one block, "
     "the logits.")
    mc, N = cfg.model, rows * cfg.data.seq_len
    cast = (2 if a < 4 else 0) * (mc.n_layers * _block_params(mc) + mc.vocab_size * mc.d_model)
    scores = 2 * attention_probs_bytes(mc, rows, cfg.data.seq_len) if math else 0  # one block's scores and softmax
    return cast + max(block_saved_bytes(mc, N, a) + scores, 4 * N * mc.d_model + 8 * N * mc.vocab_size)

def matrix_sizes(mc) -> dict:
    "Parameters of each weight matrix of a block, by the name `spectra.layers` uses."
    d, kv, f = mc.d_model, mc.d_model // mc.n_heads * mc.n_kv_heads, mc.ffn_hidden
    return {"attention.q_proj": d * d, "attention.k_proj": kv * d, "attention.v_proj": kv * d,
            "attention.o_proj": d * d, "swiglu.w_0": f * d, "swiglu.w_1": f * d, "swiglu.w_2": f * d}

def spectra_peak_bytes(cfg: Config, rows: int, math: bool = False) -> int:
    "Peak bytes of one group of `rows` rows of the spectra's float32 gradient pass above weights and AdamW state."
    mc, sizes = cfg.model, matrix_sizes(cfg.model)
    # one set of the selected gradients
    selected = 4 * mc.n_layers * sum(sizes.get(name, 0) for name in cfg.spectra.layers)
    chunk = chunk_peak_bytes(mc, rows, cfg.data.seq_len, 4, cfg.train.activation_checkpointing, math=math)
    return chunk + 2 * selected  # the group's gradients and the running sum over groups


# %%
_cfg = load_config(PRESETS_DIR / "pico-large-maml.yaml")
_counts = param_counts(_cfg)
assert sum(matrix_sizes(_cfg.model).values()) == _block_params(_cfg.model)
assert step_transient_bytes(_cfg, 4, "cuda") == step_transient_bytes(_cfg, 1, "cuda") == 4 * sum(_counts.values())
assert step_transient_bytes(_cfg, 1, "cpu") == 8 * _counts["embedding"] < step_transient_bytes(_cfg, 2, "cpu")
assert eval_peak_bytes(_cfg, 2, 16) > 16 * 2048 * 50304 * 8  # the logits alone
assert spectra_peak_bytes(_cfg, 8) > chunk_peak_bytes(_cfg.model, 8, 2048, 2, False)  # float32 outside autocast
_released = load_config(PRESETS_DIR / "released-large-maml.yaml")
assert episode_peak_bytes(_released, 4, 2) > episode_peak_bytes(_cfg, 4, 2)  # the vocabulary-indexed head's logits

# %% [markdown]
# ## The reserve
#
# Besides tensors, a GPU process holds memory that `torch.cuda.max_memory_allocated` never sees: the
# CUDA context and its loaded kernels (about 0.5 GiB with lazy loading), NCCL's communication buffers
# (a few hundred MiB per communicator), the cuBLAS workspaces, and the caching allocator's
# fragmentation (blocks rounded up and split; typically well under 10 % of the peak). We reserve
# 2 GiB plus 10 % of the tensor peak. On CPU the memory is the machine's RAM, shared by the ranks of
# one launch; `device_memory_gb` reads what is available after the interpreter and torch are loaded,
# so the reserve there covers only the data reader's caches and Python objects: 0.25 GiB plus 10 %.

# %%
#| export
GIB = 2**30
RESERVE = {"cuda": 2 * GIB, "cpu": GIB // 4}  # context, NCCL, workspaces (CUDA) or reader caches (CPU)
FRAGMENTATION = 0.10  # the caching allocator's rounding and splitting, as a share of the tensor peak

def with_reserve(tensor_bytes: int, device: str) -> int:
    "Device memory a phase needs: its tensors, 10 % for fragmentation and the fixed reserve."
    return int(tensor_bytes * (1 + FRAGMENTATION)) + RESERVE[device]

def device_memory_gb(device) -> float:
    "GiB a process can plan with: a CUDA device's total memory, or the RAM available now on a CPU machine."
    device = torch.device(device)
    if device.type == "cuda": return torch.cuda.get_device_properties(device).total_memory / GIB
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB


# %%
assert with_reserve(0, "cuda") == 2 * GIB and with_reserve(10 * GIB, "cpu") == 11 * GIB + GIB // 4
assert 0 < device_memory_gb("cpu") < 1e5


# %% [markdown]
# ## The phases of a run
#
# The persistent state is float32 weights, gradients (accumulated over the draws of a step) and AdamW's
# two moments: 16 bytes a parameter. Each phase's peak is the persistent state it runs with plus its
# own peak; evaluation and spectra run after `zero_grad`, without gradients. A run fits when every
# phase it will reach fits.

# %%
#| export
def phase_bytes(cfg: Config, gpus: int, device: str, chunk: int, capability: tuple | None = None,
                spectra_rows: int | None = None) -> dict:
    ("Tensor bytes per device at the peak of each phase a run reaches: next-token chunk, episode, step, evaluation, "
     "spectra.")
    n, a = sum(param_counts(cfg).values()), activation_bytes(cfg, device, capability)
    state, ck, math = 16 * n, cfg.train.activation_checkpointing, uses_math_attention(cfg.model, device, a)
    phases = {"next-token chunk": state + chunk_peak_bytes(cfg.model, chunk, cfg.data.seq_len, a, ck, math=math),
              "optimizer step": state + step_transient_bytes(cfg, gpus, device)}
    if cfg.maml.rho > 0: phases["episode"] = state + episode_peak_bytes(cfg, gpus, a, math)
    if cfg.eval.every: phases["evaluation"] = 12 * n + eval_peak_bytes(cfg, a, cfg.eval.batch_size, math)
    if cfg.spectra.every:
        rows = spectra_rows or cfg.spectra.grad_batch or cfg.spectra.grad_rows or SPECTRA_GROUP_ROWS
        phases["spectra"] = 12 * n + spectra_peak_bytes(cfg, rows, uses_math_attention(cfg.model, device, 4))
    return phases

def largest_fitting(need, upper: int, capacity: int, device: str) -> int:
    "The largest k in 1..upper whose tensors need(k) fit in `capacity` with the reserve; 0 if none does."
    return next((k for k in range(upper, 0, -1) if with_reserve(need(k), device) <= capacity), 0)

def choose_chunk(cfg: Config, gpus: int, device: str, capacity: int, capability: tuple | None = None) -> int:
    "Rows per memory chunk: the fewest chunks of this rank's rows that fit, evenly sized; 0 if one row does not fit."
    rows = cfg.train.branch_batch // gpus
    largest = largest_fitting(lambda c: phase_bytes(cfg, gpus, device, c, capability)["next-token chunk"],
                              rows, capacity, device)
    if not largest: return 0
    return -(-rows // -(-rows // largest))  # e.g. 64 rows, 21 fit: 4 chunks of 16

SPECTRA_GROUP_ROWS = 64  # the largest group the spectra's pass is planned in (pico-train accumulates over groups of 8)

def choose_spectra_batch(cfg: Config, device: str, capacity: int) -> int:
    ("Rows per group of the spectra's gradient pass: spectra.grad_batch, else the fewest even groups that fit; "
     "0 if one row does not.")
    rows, n, math = (cfg.spectra.grad_rows or SPECTRA_GROUP_ROWS, sum(param_counts(cfg).values()),
                     uses_math_attention(cfg.model, device, 4))
    if cfg.spectra.grad_batch: return min(cfg.spectra.grad_batch, rows)
    largest = largest_fitting(lambda r: 12 * n + spectra_peak_bytes(cfg, r, math), rows, capacity, device)
    return -(-rows // -(-rows // largest)) if largest else 0


# %%
_cfg = load_config(PRESETS_DIR / "pico-large-maml.yaml")
assert choose_chunk(_cfg, 4, "cuda", 10_000 * GIB) == 64  # all of the rank's rows at once
_c = choose_chunk(_cfg, 4, "cuda", 80 * GIB)
assert 1 <= _c < 64 and with_reserve(phase_bytes(_cfg, 4, "cuda", _c)["next-token chunk"], "cuda") <= 80 * GIB
assert -(-64 // _c) < -(-64 // (_c - 1))  # one row less per chunk would take more chunks
assert choose_chunk(_cfg, 4, "cuda", 14 * GIB) == 0  # one row does not fit
_s80, _s40 = (choose_spectra_batch(_cfg, "cuda", m * GIB) for m in (80, 40))  # groups of the whole split's rows
assert (8 <= _s80 <= SPECTRA_GROUP_ROWS
        and with_reserve(phase_bytes(_cfg, 4, "cuda", 1, spectra_rows=_s80)["spectra"], "cuda") <= 80 * GIB)
# 8 do not fit
assert 1 <= _s40 < 8 and with_reserve(phase_bytes(_cfg, 4, "cuda", 1, spectra_rows=_s40)["spectra"], "cuda") <= 40 * GIB


# %% [markdown]
# ## When a run does not fit
#
# The first phase that does not fit gives the reason, one line naming the setting to change: the
# batch layout keys, the device memory or the model width when the persistent state alone is too
# big, `train.activation_checkpointing` or `train.chunk_rows` for the next-token chunk, the episode's
# shape, `eval.batch_size` or `spectra.grad_batch` (with the largest value that fits). A chunk or a
# spectra group that the user set and that fits is used as given.

# %%
#| export
PROCESS_COUNT = "torchrun's --nproc_per_node times its --nnodes; the planner's --gpus"  # the two commands that set it

def layout_problem(cfg: Config, gpus: int) -> str:
    "Why `gpus` ranks cannot split the batches evenly (naming the keys), or ''."
    # global_batch splits into branch micro-batches: TrainConfig's rule (00_config)
    tc, pool = cfg.train, cfg.smlmt.pool_rows
    if tc.branch_batch % gpus:
        return (f"train.branch_batch={tc.branch_batch} must be a multiple of the {gpus} processes (one per GPU), "
                f"so each holds the same rows; change it, or the process count ({PROCESS_COUNT})")
    if cfg.maml.rho > 0 and pool % gpus:
        return (f"smlmt.pool_rows={pool} must be a multiple of the {gpus} processes (one per GPU); change it, "
                f"or the process count ({PROCESS_COUNT})")
    return ""

def _gib(n: float) -> str:
    "Bytes as GiB for a message."
    return f"{n / GIB:.1f} GiB"

def memory_problem(cfg: Config, gpus: int, device: str, capacity: int, chunk: int, phases: dict, *,
                   capability: tuple | None = None) -> str:
    "The one-line reason the first phase that does not fit gives, naming the setting to change; '' if all fit."
    need = {name: with_reserve(b, device) for name, b in phases.items()}
    have, n = f"the {_gib(capacity)} of each device", sum(param_counts(cfg).values())
    if need["optimizer step"] > capacity:
        return (f"the float32 weights, gradients and AdamW state of {n / 1e6:.0f}M parameters with the optimizer "
                f"step's temporaries need {_gib(need['optimizer step'])}, more than {have}: use devices with more "
                f"memory (--gpu-memory-gb) or a smaller model.d_model")
    best = chunk if need["next-token chunk"] <= capacity else choose_chunk(cfg, gpus, device, capacity, capability)
    if not best:
        fix = ("lower data.seq_len or use devices with more memory (--gpu-memory-gb)"
               if cfg.train.activation_checkpointing else "set train.activation_checkpointing=true")
        one_row = with_reserve(phase_bytes(cfg, gpus, device, 1, capability)["next-token chunk"], device)
        return (f"one row of data.seq_len={cfg.data.seq_len} tokens needs {_gib(one_row)} with the persistent state, "
                f"more than {have}: {fix}")
    if best != chunk:
        return (f"train.chunk_rows={cfg.train.chunk_rows} needs {_gib(need['next-token chunk'])}, more than {have}: "
                f"set train.chunk_rows={best} (or 0: the largest that fits)")
    if need.get("episode", 0) > capacity:
        return (f"a MAML episode needs {_gib(need['episode'])}, more than {have}: lower smlmt.q_query or smlmt.window"
                f"{'' if cfg.train.activation_checkpointing else ', or set train.activation_checkpointing=true'}")
    return rows_problem(cfg, device, capacity, need, have, capability)

def rows_problem(cfg: Config, device: str, capacity: int, need: dict, have: str,
                 capability: tuple | None = None) -> str:
    ("The reason evaluation or spectra do not fit, with the largest eval.batch_size / spectra.grad_batch that does; "
     "'' if both fit.")
    n, a, ck = (sum(param_counts(cfg).values()), activation_bytes(cfg, device, capability),
                cfg.train.activation_checkpointing)
    math, spectra_math = uses_math_attention(cfg.model, device, a), uses_math_attention(cfg.model, device, 4)
    spectra_rows = cfg.spectra.grad_batch or cfg.spectra.grad_rows or SPECTRA_GROUP_ROWS
    checks = (("evaluation", "eval.batch_size", cfg.eval.batch_size, lambda r: eval_peak_bytes(cfg, a, r, math),
               "eval.every=0"),
              ("spectra", "spectra.grad_batch", spectra_rows, lambda r: spectra_peak_bytes(cfg, r, spectra_math),
               "spectra.every=0" if ck else "train.activation_checkpointing=true"))
    for phase, key, rows, peak, otherwise in checks:
        if need.get(phase, 0) <= capacity: continue
        best = largest_fitting(lambda r: 12 * n + peak(r), rows, capacity, device)
        return (f"{phase} with {key}={rows} needs {_gib(need[phase])}, more than {have}: "
                f"set {f'{key}={best}' if best else otherwise}")
    return ""


# %% [markdown]
# ## Tokens, FLOPs, time and disk
#
# An optimizer step reads `global_batch` rows of `data.seq_len` tokens in `global_batch / branch_batch`
# draws; a draw is, with probability rho, an episode on the pool (support and query windows through the
# backbone) and otherwise a next-token micro-batch. The expected tokens through the model and FLOPs
# per step are the mixture; the trainer logs the same counts per step. Wall time is FLOPs over
# `gpus × peak × MFU`, with the monitoring added to the total: every `eval.every` steps (and at step
# 0) a forward pass over the evaluation documents, every `spectra.every` steps a forward and backward
# pass over the spectra's rows. Where these are the whole evaluation split (`eval.max_documents`,
# `spectra.grad_rows` = 0), whose size the configuration does not know, the estimate assumes
# `WHOLE_SPLIT_ROWS` = 1,024 rows (or documents) of `data.seq_len` tokens.
#
# Checkpoints (`06_checkpoints`): every scheduled step (`checkpoint.every`, step 0, the last step,
# the log-spaced ones) keeps float32 weights of the backbone and the head as safetensors (about 110
# bytes of header a tensor) and two small JSON files; the newest `checkpoint.keep_state` also keep the
# training state, AdamW's two moments (8 bytes a parameter, about 860 bytes of `torch.save` framing
# per parameter tensor) and each rank's RNG state (5,056 bytes). While a checkpoint is written the
# oldest state is not yet pruned, so the disk must hold one state more. Metrics and spectra logs are
# megabytes and not counted.

# %%
#| export
def step_cost(cfg: Config, gpus: int = 1) -> tuple[int, float, float]:
    "(data tokens, expected tokens through the model, expected FLOPs) of one optimizer step over all `gpus` devices."
    tc, sc, mc, T = cfg.train, cfg.smlmt, cfg.model, cfg.data.seq_len
    draws, rho = tc.global_batch / tc.branch_batch, cfg.maml.rho
    episodes = gpus if sc.episode_scope == "rank" else 1  # episodes per MAML draw: one per rank, or one gathered
    support, query = episodes * sc.n_way * sc.k_shot * sc.window, episodes * sc.n_way * sc.q_query * sc.window
    next_token_tokens = tc.branch_batch * T
    tokens = draws * (rho * (support + query) + (1 - rho) * next_token_tokens)
    flops = draws * (rho * episode_flops(mc, support, query, sc.window)
                     + (1 - rho) * next_token_flops(mc, next_token_tokens, T))
    return tc.global_batch * T, tokens, flops

WHOLE_SPLIT_ROWS = 1024  # the time estimate's guess at a whole evaluation split, in rows (or documents) of data.seq_len

def wall_time(cfg: Config, flops_per_step: float, gpus: int, tflops: float | None, mfu: float) -> tuple:
    ("(seconds per optimizer step, hours for the run with its monitoring) at `mfu` of `tflops` per device; "
     "Nones without a peak.")
    if not tflops: return None, None
    rate, T = gpus * tflops * 1e12 * mfu, cfg.data.seq_len
    times = lambda every: cfg.train.steps // every + 1 if every else 0  # step 0 too
    row = next_token_flops(cfg.model, T, T)  # forward + backward of one row
    monitoring = (times(cfg.eval.every) * (cfg.eval.max_documents or WHOLE_SPLIT_ROWS) * row / 3  # forward only
                  + times(cfg.spectra.every) * (cfg.spectra.grad_rows or WHOLE_SPLIT_ROWS) * row)
    return flops_per_step / rate, (cfg.train.steps * flops_per_step + monitoring) / rate / 3600

SAFETENSORS_PER_TENSOR, STATE_PER_TENSOR, RNG_STATE = 128, 900, 5056  # bytes, measured on real checkpoints below

def checkpoint_disk(cfg: Config, gpus: int) -> tuple[int, int]:
    "(peak bytes of a run's checkpoints on disk, number of checkpoints)."
    counts, mc = param_counts(cfg), cfg.model
    n_params, tensors = sum(counts.values()), 3 + 9 * mc.n_layers + 2 * cfg.maml.head_layers
    weights = 4 * n_params + SAFETENSORS_PER_TENSOR * tensors + 2048  # + config.json, checkpoint.json
    state = 8 * n_params + STATE_PER_TENSOR * tensors + RNG_STATE * gpus
    n = len(scheduled_steps(cfg.checkpoint, cfg.train.steps))
    return n * weights + min(cfg.checkpoint.keep_state + 1, n) * state, n


# %% [markdown]
# Tests. The papers' large step reads 2,048 × 2,048 tokens; the vanilla arm's FLOPs are the next-token
# FLOPs of all of them, the MAML arm's about half (its episodes are a few percent of a next-token
# draw). Known answer for the disk: a real checkpoint with AdamW state, written by `write_checkpoint`,
# has the predicted size within 1 %.

# %%
from picomaml.checkpoints import write_checkpoint

_maml, _van = (load_config(PRESETS_DIR / f"pico-large-{arm}.yaml") for arm in ("maml", "vanilla"))
_tokens, _, _flops = step_cost(_van)
assert _tokens == 2048 * 2048 and _flops == next_token_flops(_van.model, 2048 * 2048, 2048)
assert 0.5 < step_cost(_maml)[2] / _flops < 0.55
# one episode per rank and draw
_per_rank = load_config(PRESETS_DIR / "pico-large-maml.yaml", ["smlmt.episode_scope=rank"])
_episode_flops = lambda cfg, gpus: step_cost(cfg, gpus)[2] - (1 - cfg.maml.rho) * _flops
assert (abs(_episode_flops(_per_rank, 4) / (4 * _episode_flops(_maml, 4)) - 1) < 1e-9
        and step_cost(_maml, 4) == step_cost(_maml))
# a whole episode on each rank, not a quarter
assert episode_peak_bytes(_per_rank, 4, 2) > episode_peak_bytes(_maml, 4, 2)
_s, _h = wall_time(_van, _flops, 4, 312, 0.4)
assert (_s == _flops / (4 * 312e12 * 0.4) and _h > 6000 * _s / 3600
        and wall_time(_van, _flops, 4, None, 0.4) == (None, None))

_ck = load_config(None, ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
                         "model.ffn_hidden=512", "model.vocab_size=4096", "train.steps=1", "checkpoint.keep_state=1"])
_model, _head = PicoDecoder(_ck.model), MAMLHead(128, _ck.smlmt.n_way, _ck.maml)
_params = [*_model.parameters(), *_head.parameters()]
_opt = torch.optim.AdamW(_params)
for _p in _params: _p.grad = torch.randn_like(_p)
_opt.step()
with tempfile.TemporaryDirectory() as _tmp:
    _dir = write_checkpoint(Path(_tmp), 1, _model, _head, {"world_size": 2},
                            {"optimizer": _opt.state_dict(), "rng_cpu": torch.stack([torch.get_rng_state()] * 2)})
    _real = sum(f.stat().st_size for f in _dir.iterdir())
_disk, _n = checkpoint_disk(_ck, 2)
# steps 0 and 1, both with state while step 1 is written
assert _n == 2 and abs(_disk / 2 - _real) < 0.01 * _real, (_disk / 2, _real)


# %% [markdown]
# ## The plan
#
# `plan_run` puts it together: the batch layout, the chunk (chosen, or `train.chunk_rows` checked), each
# phase's memory, tokens, FLOPs, time and disk. On CPU the memory given is the machine's, shared by the
# `gpus` processes, and activations are float32. GiB are 2^30 bytes (nvidia-smi's MiB / 1024).

# %%
#| export
@dataclass
class Plan:
    "What a run needs per device and in all; `fits` is False with a one-line `reason` naming the setting to change."
    fits: bool
    reason: str
    chunk_rows: int  # rows per forward/backward chunk on each device (0: none fits)
    rows_per_rank: int  # rows of one branch micro-batch on each device
    spectra_batch: int  # rows per group of the spectra's gradient pass (0: none fits)
    memory: dict  # bytes per device: the persistent parts, the chunk's, and each phase's own peak
    phases: dict  # bytes per device at each phase's peak, reserve included
    capacity: int  # bytes per device
    tokens_per_step: int  # data tokens one optimizer step reads
    model_tokens_per_step: float  # tokens through the model per step, expected over the hybrid draw
    flops_per_step: float  # expected model FLOPs per step, all devices
    est_seconds_per_step: float | None
    est_hours: float | None  # the run, evaluations included
    checkpoint_disk_bytes: int
    n_checkpoints: int
    gpus: int
    device: str
    mfu: float
    gpu_tflops: float | None
    steps: int
    activation_checkpointing: bool
    precision: str
    attention: str  # the kernel the next-token chunks take: fused (flash on CUDA), or math (float32 with GQA on CUDA)


# %%
#| export
def memory_parts(cfg: Config, gpus: int, device: str, chunk: int, capability: tuple | None = None,
                 spectra_rows: int | None = None) -> dict:
    ("Bytes per device of each part: persistent state, the chunk's kept activations and transients, "
     "each other phase's own peak.")
    counts, a, ck, T = (param_counts(cfg), activation_bytes(cfg, device, capability),
                        cfg.train.activation_checkpointing, cfg.data.seq_len)
    n, math = sum(counts.values()), uses_math_attention(cfg.model, device, a)
    kept = kept_bytes(cfg.model, chunk, T, a, ck, math)
    parts = {"weights": 4 * n, "gradients": 4 * n, "adamw": 8 * n, "activations": kept,
             "chunk transients": chunk_peak_bytes(cfg.model, chunk, T, a, ck, math=math) - kept,
             "optimizer step": step_transient_bytes(cfg, gpus, device)}
    phases = phase_bytes(cfg, gpus, device, chunk, capability, spectra_rows)
    parts.update({name: phases[name] - (16 if name == "episode" else 12) * n
                  for name in ("episode", "evaluation", "spectra") if name in phases})
    return parts

def plan_run(cfg: Config, gpus: int, gpu_memory_gb: float, gpu_tflops: float | None = None, mfu: float = 0.4, *,
             device: str = "cuda", capability: tuple | None = None) -> Plan:
    ("The resource plan of `cfg` on `gpus` devices of `gpu_memory_gb` GiB (on CPU: the machine's RAM, shared) "
     "of compute `capability`.")
    capacity = int(gpu_memory_gb * GIB / (gpus if device == "cpu" else 1))
    reason = layout_problem(cfg, gpus)
    rows = 0 if reason else cfg.train.branch_batch // gpus
    chunk = (min(cfg.train.chunk_rows, rows) if cfg.train.chunk_rows
             else (rows and choose_chunk(cfg, gpus, device, capacity, capability)))
    spectra = choose_spectra_batch(cfg, device, capacity) if cfg.spectra.every else 0
    tensors = phase_bytes(cfg, gpus, device, max(chunk, 1), capability, spectra)
    reason = reason or memory_problem(cfg, gpus, device, capacity, chunk, tensors, capability=capability)
    tokens, model_tokens, flops = step_cost(cfg, gpus)
    seconds, hours = wall_time(cfg, flops, gpus, gpu_tflops, mfu)
    disk, n_ckpt = checkpoint_disk(cfg, gpus)
    a = activation_bytes(cfg, device, capability)
    return Plan(fits=not reason, reason=reason, chunk_rows=chunk, rows_per_rank=rows, spectra_batch=spectra,
                memory=memory_parts(cfg, gpus, device, max(chunk, 1), capability, spectra),
                phases={name: with_reserve(b, device) for name, b in tensors.items()}, capacity=capacity,
                tokens_per_step=tokens, model_tokens_per_step=model_tokens, flops_per_step=flops,
                est_seconds_per_step=seconds, est_hours=hours, checkpoint_disk_bytes=disk, n_checkpoints=n_ckpt,
                gpus=gpus, device=device, mfu=mfu, gpu_tflops=gpu_tflops,
                steps=cfg.train.steps, activation_checkpointing=cfg.train.activation_checkpointing,
                precision="bf16-mixed" if a == 2 else "32-true",
                attention="math" if uses_math_attention(cfg.model, device, a) else "fused")


# %% [markdown]
# ## Reading a plan

# %%
#| export
PART_LABELS = {"weights": "weights (float32)", "gradients": "gradients (float32)", "adamw": "AdamW moments (float32)",
               "activations": "activations kept by one chunk",
               "chunk transients": "chunk transients (bf16 weights, loss, backward)",
               "optimizer step": "optimizer step temporaries", "episode": "MAML episode (pool, support, query, head)",
               "evaluation": "evaluation (bf16 weights, logits)", "spectra": "spectra gradient pass (float32)"}

def format_plan(plan: Plan) -> str:
    "The plan as a readable table."
    gib = lambda b: f"{b / GIB:8.2f}"
    attention = ("fused kernel" if plan.attention == "fused"
                 else "math kernel (a float32 (rows, H, T, T) softmax kept per block)")
    lines = [f"{plan.gpus} × {plan.device} of {plan.capacity / GIB:.1f} GiB, {plan.precision}, attention: {attention}"
             f"{', activation checkpointing' if plan.activation_checkpointing else ''}",
             f"memory chunk: {plan.chunk_rows} of {plan.rows_per_rank} rows per device "
             f"({-(-plan.rows_per_rank // max(plan.chunk_rows, 1))} chunks a draw)"
             + (f"; spectra gradients {plan.spectra_batch} rows at a time" if plan.spectra_batch else ""),
             "", f"{'memory per device':<52}{'GiB':>8}"]
    lines += [f"  {PART_LABELS[k]:<50}{gib(v)}" for k, v in plan.memory.items()]
    lines += ["", f"{'peak of each phase, with the reserve':<52}{'GiB':>8}  fits"]
    lines += [f"  {k:<50}{gib(v)}  {'yes' if v <= plan.capacity else 'NO'}" for k, v in plan.phases.items()]
    lines += ["", f"per optimizer step: {plan.tokens_per_step:,} data tokens, {plan.model_tokens_per_step:,.0f} tokens "
              f"through the model (expected), {plan.flops_per_step:.3g} FLOPs"]
    if plan.est_seconds_per_step is not None:
        lines.append(f"time at {plan.mfu:.0%} MFU of {plan.gpu_tflops:g} TFLOP/s per device: "
                     f"{plan.est_seconds_per_step:.2f} s a step, {plan.est_hours:.1f} h for {plan.steps:,} steps "
                     f"with evaluations")
    lines.append(f"checkpoints: {plan.n_checkpoints}, {plan.checkpoint_disk_bytes / GIB:.1f} GiB on disk at most")
    if not plan.fits: lines.append(f"does not fit: {plan.reason}")
    return "\n".join(lines)


# %% [markdown]
# ## The papers' sizes
#
# Every paper preset fits on four 80 GB GPUs, each with the chunk the planner picks. On four 16 GB GPUs
# the large model is refused with the setting to change, and a chunk set too large is refused with the
# largest that fits. A batch four GPUs cannot split is refused naming the keys.

# %%
_paper = sorted(glob.glob(str(PRESETS_DIR / "pico-*.yaml")))
assert len(_paper) == 8
for _p in _paper:
    _plan = plan_run(load_config(_p), 4, 80, 312, 0.4)
    assert _plan.fits and 1 <= _plan.chunk_rows <= 64 and max(_plan.phases.values()) <= 80 * GIB, (_p, _plan.reason)
# every preset gets an answer: it fits, or a reason naming a setting
for _p in sorted(glob.glob(str(PRESETS_DIR / "*.yaml"))):
    _plan = plan_run(load_config(_p), 4, 80)
    assert _plan.fits or "set " in _plan.reason or "--" in _plan.reason, (_p, _plan.reason)
_large16 = plan_run(load_config(PRESETS_DIR / "pico-large-maml.yaml"), 4, 16)
assert not _large16.fits and "set " in _large16.reason
print(_large16.reason)
_set = plan_run(load_config(PRESETS_DIR / "pico-large-maml.yaml", ["train.chunk_rows=64"]), 4, 80)
_best = choose_chunk(load_config(PRESETS_DIR / "pico-large-maml.yaml"), 4, "cuda", 80 * GIB)
assert not _set.fits and "train.chunk_rows=64 needs" in _set.reason and f"set train.chunk_rows={_best} " in _set.reason
_odd = plan_run(load_config(PRESETS_DIR / "pico-large-maml.yaml"), 3, 80)
assert not _odd.fits and "train.branch_batch=256" in _odd.reason and "--gpus" in _odd.reason
print(format_plan(plan_run(load_config(PRESETS_DIR / "pico-large-maml.yaml"), 4, 80, 312, 0.4)))


# %% [markdown]
# A float32 run on CUDA (`train.precision=32-true`, or `auto` on a GPU below compute capability 8.0)
# is planned with the math kernel's softmax, and gets smaller chunks; on CPU float32 keeps the fused
# kernel. The spectra pass is planned in groups that fit: the medium model on 40 GB GPUs and the large
# one on 48 GB GPUs take the evaluation rows in groups of fewer than pico-train's eight (a group of
# eight, in float32 under the math kernel, would need more than the device). A chunk or spectra group
# the user set and that fits is used as given.

# %%
_medium = load_config(PRESETS_DIR / "pico-medium-maml.yaml")
_bf16, _v100 = plan_run(_medium, 4, 80), plan_run(_medium, 4, 80, capability=(7, 0))
assert (_bf16.precision, _bf16.attention, _v100.precision, _v100.attention) == ("bf16-mixed", "fused",
                                                                                "32-true", "math")
assert _v100.chunk_rows < _bf16.chunk_rows and plan_run(_medium, 4, 80, device="cpu").attention == "fused"
for _preset, _memory in (("pico-medium-maml", 40), ("pico-large-maml", 48)):
    _cfg = load_config(PRESETS_DIR / f"{_preset}.yaml")
    _plan, _whole = plan_run(_cfg, 4, _memory), phase_bytes(_cfg, 4, "cuda", 1, spectra_rows=8)["spectra"]
    assert _plan.fits and _plan.spectra_batch < 8 < with_reserve(_whole, "cuda") / GIB > _memory, (
        _preset, _plan.reason)
    print(f"{_preset} on 4 x {_memory} GB: chunks of {_plan.chunk_rows} rows, spectra gradients {_plan.spectra_batch} "
          f"rows at a time (8 at once would need {with_reserve(_whole, 'cuda') / GIB:.0f} GiB)")
_given = plan_run(load_config(PRESETS_DIR / "pico-medium-maml.yaml", [f"train.chunk_rows={_bf16.chunk_rows // 2}",
                                                                      "spectra.grad_batch=2"]), 4, 80)
assert _given.fits and (_given.chunk_rows, _given.spectra_batch) == (_bf16.chunk_rows // 2, 2)
_too_big = plan_run(load_config(PRESETS_DIR / "pico-large-maml.yaml", ["spectra.grad_batch=8"]), 4, 48)
assert (not _too_big.fits and "spectra with spectra.grad_batch=8 needs" in _too_big.reason
        and "set spectra.grad_batch=" in _too_big.reason)


# %% [markdown]
# Following the reasons leads to a plan that fits: each names a setting and a value, and applying it
# either fits or moves the refusal to the next phase. Large on four 16 GB GPUs: the evaluation's
# (16 × 2,048, 50,304) logits alone are 12 GiB, and the float32 spectra pass over eight rows is more.

# %%
def follow_reasons(path, gpus, memory, overrides=()):
    "Overrides applied by following the plan's reasons until it fits (at most five)."
    overrides = list(overrides)
    for _ in range(5):
        plan = plan_run(load_config(path, overrides), gpus, memory)
        if plan.fits: return overrides
        overrides.append(plan.reason.rsplit("set ", 1)[1].split()[0])
    raise AssertionError(f"still refused after {overrides}: {plan.reason}")

print(follow_reasons(PRESETS_DIR / "pico-large-maml.yaml", 4, 16))
assert follow_reasons(PRESETS_DIR / "pico-large-maml.yaml", 4, 14)[0] == "train.activation_checkpointing=true"


# %% [markdown]
# ## The command line

# %%
#| export
def parse_args(argv=None) -> argparse.Namespace:
    "Arguments of `python -m picomaml.plan`."
    p = argparse.ArgumentParser(prog="python -m picomaml.plan",
                                description="Memory, chunk, FLOPs, time and disk of a run.")
    p.add_argument("--config", default=None, help="YAML preset, e.g. configs/pico-large-maml.yaml")
    p.add_argument("--gpus", type=int, required=True, help="devices (ranks) of the run")
    p.add_argument("--gpu-memory-gb", type=float, required=True,
                   help="memory per device in GiB (on CPU: the machine's)")
    p.add_argument("--gpu-tflops", type=float, default=None,
                   help="dense bf16 peak TFLOP/s per device (A100 312, H100 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the time estimate")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what the devices are")
    p.add_argument("--compute-capability", default="8.0",
                   help="CUDA compute capability of the GPUs (A100 8.0, H100 9.0, V100 7.0): "
                        "below 8.0 `auto` precision is float32")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)

def main(argv=None) -> int:
    "Print the plan; 0 when the run fits, 2 with one line naming the setting to change when it does not."
    args = parse_args(argv)
    checks = ((args.gpus >= 1, "--gpus must be at least 1"),
              (args.gpu_memory_gb > 0, "--gpu-memory-gb must be positive"),
              (0 < args.mfu <= 1, "--mfu must be in (0, 1]"),
              (args.gpu_tflops is None or args.gpu_tflops > 0, "--gpu-tflops must be positive"))
    try:
        bad = next((message for ok, message in checks if not ok), None)
        if bad: raise ConfigError(bad)
        try: capability = tuple(int(part) for part in args.compute_capability.split("."))
        except ValueError:
            raise ConfigError(f"--compute-capability {args.compute_capability!r} is not a version like 8.0") from None
        plan = plan_run(load_config(args.config, args.overrides), args.gpus, args.gpu_memory_gb, args.gpu_tflops,
                        args.mfu, device=args.device, capability=capability)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if plan.fits: return 0
    print(f"error: {plan.reason}", file=sys.stderr)
    return 2


# %%
def run_main(*argv):
    "(exit status, stdout, stderr) of `main(argv)`."
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        status = main(list(argv))
    return status, out.getvalue(), err.getvalue()

_status, _out, _err = run_main("--config", str(PRESETS_DIR / "pico-small-maml.yaml"), "--gpus", "4", "--gpu-memory-gb",
                               "80", "--gpu-tflops", "312")
assert _status == 0 and "memory chunk:" in _out and "s a step" in _out and _err == ""
_status, _out, _err = run_main("--config", str(PRESETS_DIR / "pico-large-maml.yaml"), "--gpus", "4",
                               "--gpu-memory-gb", "16")
assert _status == 2 and _err.count("\n") == 1 and _err.startswith("error: ") and _err.strip().endswith(_large16.reason)
for _bad, _needle in ((["train.lr=-1"], "train.lr"), (["train.branch_batch=300"], "train.global_batch")):
    _status, _out, _err = run_main("--gpus", "4", "--gpu-memory-gb", "80", *_bad)
    assert _status == 2 and _err.count("\n") == 1 and _needle in _err, _err
assert run_main("--gpus", "4", "--gpu-memory-gb", "80", "--mfu", "1.5")[2] == "error: --mfu must be in (0, 1]\n"

# %%
#| export
if __name__ == "__main__" and "__file__" in globals(): sys.exit(main())


# %% [markdown]
# ## The papers' runs on four A100-80GB at 40 % MFU
#
# What the planner predicts for each paper preset on 4 × A100-80GB (312 TFLOP/s dense bf16) at 40 %
# MFU, and the disk `make paper`'s eight pretraining runs leave in checkpoints (every 100 steps and
# step 0, the newest two with AdamW state).

# %%
def paper_table(gpus=4, memory=80, tflops=312, mfu=0.4) -> str:
    "Markdown table of the plan of every paper preset."
    rows = ["| preset | parameters | chunk (rows) | peak GiB (phase) | tokens / step | FLOPs / step | s / step | hours "
            "| checkpoints GiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    total = 0
    for path in _paper:
        cfg = load_config(path)
        plan = plan_run(cfg, gpus, memory, tflops, mfu)
        phase = max(plan.phases, key=plan.phases.get)
        total += plan.checkpoint_disk_bytes
        rows.append(f"| {Path(path).stem} | {sum(param_counts(cfg).values()) / 1e6:.1f}M | {plan.chunk_rows} of "
                    f"{plan.rows_per_rank} | {plan.phases[phase] / GIB:.1f} ({phase}) | {plan.tokens_per_step:,} | "
                    f"{plan.flops_per_step:.2e} | {plan.est_seconds_per_step:.2f} | {plan.est_hours:.1f} | "
                    f"{plan.checkpoint_disk_bytes / GIB:.1f} |")
    return "\n".join(rows) + f"\n\n`make paper` checkpoints: {total / GIB:.0f} GiB in all."

print(paper_table())

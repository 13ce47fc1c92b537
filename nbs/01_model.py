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
# # The Pico decoder
#
# > A LLaMA-style decoder in plain PyTorch whose released checkpoints (pico-decoder, pico-maml-decoder) load unchanged.
#
# Paper 1 §3.1 ("The starting point is the open Pico decoder"); paper 2 §2.2 and App. F, Table 6.
# Twelve pre-norm blocks: `attention_norm` → grouped-query attention with RoPE → residual,
# `swiglu_norm` → SwiGLU → residual; a final `output_norm`; untied `embedding_proj` and
# `de_embedding_proj`. Width d is the only thing that changes between tiny, small, medium and large.
#
# The module layout follows pico-train's `src/model/pico_decoder.py` (read, not copied): the same
# attribute names (so `state_dict` keys and the spectra layer names agree), interleaved RoPE pairs,
# query head h reading key/value head h // (n_heads / n_kv_heads), and RMSNorm in float32.

# %%
#| default_exp model

# %%
#| export
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from picomaml.config import ModelConfig

# %%
import dataclasses
import math
import shutil

import huggingface_hub

# A tiny configuration for every test below except the parameter counts: d 24, 2 layers, vocab 64,
# 4 query heads sharing 2 key/value heads (head dim 6).
tiny = ModelConfig(d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=64, max_seq_len=32)


# %% [markdown]
# ## RMSNorm
#
# Zhang and Sennrich (2019): $\mathrm{RMSNorm}(x) = x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot g$,
# $\epsilon = 10^{-6}$. Under bf16 autocast the residual stream reaching a norm may be bf16; squaring
# and averaging d values in bf16 loses precision, so the statistic and the gain are computed in
# float32 and the result is cast back to the input dtype once.

# %%
#| export
class RMSNorm(nn.Module):
    "Root-mean-square normalisation with a learned gain, computed in float32."
    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # (..., d)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


# %% [markdown]
# Test: under `torch.autocast("cpu", dtype=torch.bfloat16)` a bf16 input comes back bf16 and equals,
# bit for bit, the float32 computation rounded once; the same formula done in bf16 differs.

# %%
torch.manual_seed(0)
norm = RMSNorm(64)
with torch.no_grad(): norm.weight.copy_(torch.randn(64))
x16 = (3 * torch.randn(4, 8, 64)).bfloat16()
with torch.autocast("cpu", dtype=torch.bfloat16): y16 = norm(x16)
x32 = x16.float()
ref32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
assert y16.dtype == torch.bfloat16
assert torch.allclose(y16.float(), ref32, rtol=1e-2, atol=1e-2)
assert torch.equal(y16, (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight).bfloat16())
in_bf16 = x16 * torch.rsqrt(x16.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.bfloat16()
assert not torch.equal(y16, in_bf16)
assert norm(x32).dtype == torch.float32 and torch.allclose(norm(x32), ref32, atol=1e-5)


# %% [markdown]
# ## Rotary position embeddings
#
# Su et al. (2024), theta 1e4. Each head vector is split into d_head/2 pairs; pair i at position p
# is rotated by the angle $p\,\theta^{-2i/d_\text{head}}$. Pico pairs *adjacent* coordinates
# $(x_{2i}, x_{2i+1})$ (it views them as complex numbers), not the two halves as in some LLaMA ports;
# the released weights were trained that way, so we do the same. The angles are computed per
# forward in float32 (a T × d_head/2 table, negligible next to attention), so no buffer has to
# survive `.to(bfloat16)` and `max_seq_len` is only a guard.

# %%
#| export
def rope_angles(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    "cos and sin of the RoPE angle p·theta^(-2i/head_dim) for positions p < seq_len, pairs i."
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()

def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    "Rotate adjacent pairs (x_2i, x_2i+1) of x (B, H, T, hd) by the position's angles, in float32."
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, hd/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)  # (B, H, T, hd)


# %% [markdown]
# Tests. Known answers: position 0 is the identity; at position 1 the first pair turns by 1 radian
# and the second pair (head dim 4) by $\theta^{-1/2}$, which pins the adjacent-pair convention.
# Invariant: the score of a rotated query at position i with a rotated key at j depends only on
# i − j, and it does depend on it.

# %%
cos, sin = rope_angles(8, 4, 1e4)
e2 = torch.tensor([0., 0., 1., 0.]).expand(1, 1, 8, 4)
assert torch.equal(apply_rope(e2, cos, sin)[0, 0, 0], e2[0, 0, 0])
assert torch.allclose(apply_rope(e2, cos, sin)[0, 0, 1], torch.tensor([0., 0., math.cos(1e-2), math.sin(1e-2)]))
e0 = torch.tensor([1., 0., 0., 0.]).expand(1, 1, 8, 4)
assert torch.allclose(apply_rope(e0, cos, sin)[0, 0, 1], torch.tensor([math.cos(1.), math.sin(1.), 0., 0.]))

torch.manual_seed(0)
T, hd = 12, 6
cos, sin = rope_angles(T, hd, 1e4)
q, k = torch.randn(hd), torch.randn(hd)
q_rot = apply_rope(q.expand(1, 1, T, hd), cos, sin)[0, 0]  # q at every position
k_rot = apply_rope(k.expand(1, 1, T, hd), cos, sin)[0, 0]
scores = q_rot @ k_rot.T  # scores[i, j] = <R_i q, R_j k>
for s in (1, 3, 5):
    assert torch.allclose(scores[s:, s:], scores[:-s, :-s], atol=1e-5)
assert not torch.allclose(scores[0, 1], scores[0, 4])
assert torch.allclose(scores.diagonal(), (q @ k).expand(T), atol=1e-5)


# %% [markdown]
# ## Grouped-query attention
#
# Ainslie et al. (2023): 12 query heads share 4 key/value heads, so query head h reads key/value
# head h // 3 (pico-train's `repeat_interleave` and `enable_gqa` agree on this grouping). No biases.
# PyTorch's `scaled_dot_product_attention` with `is_causal=True` does the masking and, with
# `enable_gqa`, the sharing without materialising repeated K/V.

# %%
#| export
class Attention(nn.Module):
    "Causal grouped-query self-attention with RoPE and no biases."
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, d)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        # (B, T, d); no -1: B may be 0
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


# %% [markdown]
# Test: the module equals plain multi-head attention written out here, with each K/V head repeated
# for its group of consecutive query heads (`repeat_interleave`), an explicit causal mask and
# softmax. Tiling the K/V heads instead (`repeat`) gives a different answer, so the grouping matters.

# %%
def reference_attention(attn: Attention, x: torch.Tensor, kv_expand) -> torch.Tensor:
    B, T, _ = x.shape
    cos, sin = rope_angles(T, attn.head_dim, 1e4)
    heads = lambda proj, n: proj(x).view(B, T, n, attn.head_dim).transpose(1, 2)
    q = apply_rope(heads(attn.q_proj, attn.n_heads), cos, sin)
    k = kv_expand(apply_rope(heads(attn.k_proj, attn.n_kv_heads), cos, sin))
    v = kv_expand(heads(attn.v_proj, attn.n_kv_heads))
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))

torch.manual_seed(0)
attn = Attention(tiny)
x = torch.randn(2, 7, tiny.d_model)
got = attn(x, *rope_angles(7, attn.head_dim, 1e4))
n_rep = tiny.n_heads // tiny.n_kv_heads
assert got.shape == (2, 7, tiny.d_model)
assert torch.allclose(got, reference_attention(attn, x, lambda t: t.repeat_interleave(n_rep, dim=1)), atol=1e-6)
assert not torch.allclose(got, reference_attention(attn, x, lambda t: t.repeat(1, n_rep, 1, 1)), atol=1e-3)


# %% [markdown]
# ## SwiGLU feed-forward
#
# Shazeer (2020): $w_2(\mathrm{silu}(w_0 x) \odot w_1 x)$ with hidden size 4d, no biases.

# %%
#| export
class SwiGLU(nn.Module):
    "Gated feed-forward w_2(silu(w_0 x) * w_1 x)."
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_0 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))  # (B, T, d)


# %%
torch.manual_seed(0)
ffn = SwiGLU(tiny)
x = torch.randn(3, tiny.d_model)
by_hand = (x @ ffn.w_0.weight.T * torch.sigmoid(x @ ffn.w_0.weight.T) * (x @ ffn.w_1.weight.T)) @ ffn.w_2.weight.T
assert ffn.w_0.weight.shape == (tiny.ffn_hidden, tiny.d_model)
assert torch.allclose(ffn(x), by_hand, atol=1e-6)


# %% [markdown]
# ## The block and the decoder
#
# Pre-norm residual block: $h = x + \mathrm{Attn}(\mathrm{RMSNorm}(x))$,
# $y = h + \mathrm{SwiGLU}(\mathrm{RMSNorm}(h))$. The decoder embeds ids, runs the blocks, applies
# `output_norm` — `hidden` returns this, the features the SMLMT and NER heads read — and projects
# to the vocabulary with the untied `de_embedding_proj`. The RoPE table is built once per forward and
# shared by every block.

# %%
#| export
class PicoDecoderBlock(nn.Module):
    "One pre-norm block: attention and SwiGLU, each wrapped in RMSNorm and a residual."
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.swiglu_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.swiglu = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)  # (B, T, d)
        return h + self.swiglu(self.swiglu_norm(h))


# %% [markdown]
# **Initialisation.** Neither paper states one, and paper 1 §3.1 keeps "the design choices and
# hyperparameter choices of the original Pico decoder models", so by default (`model.init=pytorch`)
# we do what pico-train does: nothing. Each module keeps the values PyTorch gave it when it was built:
# `nn.Embedding` ~ N(0, 1), every `nn.Linear` ~ U(±1/√fan_in) (Kaiming-uniform with a = √5), RMSNorm
# gains 1. The vanilla arm is then the Pico model the papers compare against. `model.init=normal`
# redraws every linear and embedding weight from N(0, `model.init_std`) (0.02, the GPT-2/LLaMA
# convention, which keeps a unit-variance embedding from dwarfing the residual branches at the start).

# %%
#| export
def init_normal(model: nn.Module, std: float = 0.02) -> None:
    "Linear and embedding weights ~ N(0, std); RMSNorm gains = 1."
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)): nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm): nn.init.ones_(module.weight)


# %%
#| export
class PicoDecoder(nn.Module):
    "The Pico decoder: embedding, n_layers pre-norm GQA/SwiGLU blocks, output norm, untied output projection."
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding_proj = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(PicoDecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.output_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.de_embedding_proj = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # train.activation_checkpointing: recompute each block in backward
        # pytorch: the modules keep their construction-time values
        if cfg.init == "normal": init_normal(self, cfg.init_std)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        "Final output_norm-ed hidden states (B, T, d) of token ids (B, T)."
        T = input_ids.shape[-1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"{T} tokens exceed model.max_seq_len={self.cfg.max_seq_len}; "
                             f"raise it or shorten the input")
        cos, sin = rope_angles(T, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_theta, input_ids.device)
        h = self.embedding_proj(input_ids)  # (B, T, d)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            h = checkpoint(layer, h, cos, sin, use_reentrant=False) if recompute else layer(h, cos, sin)
        return self.output_norm(h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        "Next-token logits (B, T, V)."
        return self.de_embedding_proj(self.hidden(input_ids))


# %% [markdown]
# Tests: shapes, `forward` is `de_embedding_proj ∘ hidden`, and a bad config.

# %%
from picomaml.config import ConfigError
from picomaml.devtools import raises

torch.manual_seed(0)
model = PicoDecoder(tiny).eval()
ids = torch.randint(0, tiny.vocab_size, (2, 10))
logits = model(ids)
assert logits.shape == (2, 10, tiny.vocab_size) and model.hidden(ids).shape == (2, 10, tiny.d_model)
assert torch.equal(logits, model.de_embedding_proj(model.hidden(ids)))
assert model.cfg is tiny and model.embedding_proj.weight.data_ptr() != model.de_embedding_proj.weight.data_ptr()
# shapes that cannot fit are refused when the ModelConfig is made (00_config), before any module is built
raises(lambda: PicoDecoder(dataclasses.replace(tiny, n_kv_heads=3)), "model.n_kv_heads=3", kind=ConfigError)


# %% [markdown]
# **The initialisation is PyTorch's, untouched.** Under the same seed, the decoder's weights equal,
# bit for bit, those of plain `nn.Embedding` and `nn.Linear` modules built in the decoder's order and
# left alone, which is how pico-train's decoder starts; so they also have PyTorch's distributions: the
# embedding ~ N(0, 1) and each linear weight inside, and filling, its bound 1/√fan_in. Norm gains are 1.

# %%
def default_modules(cfg: ModelConfig) -> list[nn.Module]:
    "Plain torch modules with the decoder's weight shapes, built in its construction order."
    d, hd, ffn = cfg.d_model, cfg.d_model // cfg.n_heads, cfg.ffn_hidden
    block = [(d, cfg.n_heads * hd), (d, cfg.n_kv_heads * hd), (d, cfg.n_kv_heads * hd), (cfg.n_heads * hd, d),
             (d, ffn), (d, ffn), (ffn, d)]
    modules = [nn.Embedding(cfg.vocab_size, d)]  # built first, as in the decoder: construction order fixes the draws
    modules += [nn.Linear(i, o, bias=False) for _ in range(cfg.n_layers) for i, o in block]
    return modules + [nn.Linear(d, cfg.vocab_size, bias=False)]

torch.manual_seed(0)
reference = default_modules(tiny)
weights = [p for n, p in model.named_parameters() if "norm" not in n]
assert len(weights) == len(reference) == 2 + 7 * tiny.n_layers
assert all(torch.equal(w, m.weight) for w, m in zip(weights, reference))
assert (abs(model.embedding_proj.weight.std().item() - 1) < 0.05
        and abs(model.embedding_proj.weight.mean().item()) < 0.05)
for m in model.modules():
    if isinstance(m, nn.Linear): assert 0.95 / m.in_features ** 0.5 < m.weight.abs().max() <= 1 / m.in_features ** 0.5
assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)

# %% [markdown]
# `model.init=normal`: every linear and embedding weight ~ N(0, `init_std`), norm gains 1.

# %%
torch.manual_seed(0)
normal = PicoDecoder(dataclasses.replace(tiny, init="normal", init_std=0.02))
big = torch.cat([p.flatten() for n, p in normal.named_parameters() if "norm" not in n])
assert abs(big.std().item() - 0.02) < 1e-3 and abs(big.mean().item()) < 1e-3
assert all(torch.equal(p, torch.ones_like(p)) for n, p in normal.named_parameters() if "norm" in n)

# %% [markdown]
# Activation checkpointing (`train.activation_checkpointing`) stores only each block's input and
# recomputes the block in the backward pass: the same gradients for less memory. An empty batch (a
# rank that holds no rows of a small episode) gives an empty result, not a reshape error.

# %%
torch.manual_seed(1)
_ids = torch.randint(0, tiny.vocab_size, (2, 10))
_grads = []
for recompute in (False, True):
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing = recompute
    model.hidden(_ids).square().sum().backward()
    _grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
model.activation_checkpointing = False
assert len(_grads[0]) == len(_grads[1]) > 0 and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*_grads))
assert model.hidden(_ids[:0]).shape == (0, 10, tiny.d_model)
raises(lambda: model(torch.zeros(1, 33, dtype=torch.long)), "model.max_seq_len=32", kind=ValueError)

# %% [markdown]
# **Causality.** Changing token t never changes the logits at positions before t (and does change
# them from t on).

# %%
for t in (0, 4, 9):
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % tiny.vocab_size
    new = model(changed)
    assert torch.equal(new[:, :t], logits[:, :t])
    assert not torch.allclose(new[:, t:], logits[:, t:])

# %% [markdown]
# **Mixed precision.** The whole model runs under CPU bf16 autocast: the norms return their input
# dtype, the logits come out bf16 and stay close to the float32 ones.

# %%
with torch.autocast("cpu", dtype=torch.bfloat16):
    logits16, hidden16 = model(ids), model.hidden(ids)
assert logits16.dtype == torch.bfloat16 and hidden16.dtype == torch.float32  # residual stream stays fp32
assert (logits16.float() - logits).abs().max() < 0.05 * logits.abs().max()


# %% [markdown]
# ## Parameter counts
#
# Counted on the meta device, so even the 570M model costs no memory. The papers round the four
# sizes to 11M, 65M, 181M and 570M (paper 1 §3, paper 2 §2.2); the exact counts of their
# architecture (vocab 50,304, ffn 4d, 12 layers) are checked here.

# %%
#| export
def count_parameters(cfg: ModelConfig) -> int:
    "Number of parameters of PicoDecoder(cfg), built on the meta device."
    with torch.device("meta"):
        return sum(p.numel() for p in PicoDecoder(cfg).parameters())


# %%
expected = {96: 11_282_784, 384: 64_595_328, 768: 181_095_168, 1536: 569_808_384}
for d, n in expected.items():
    assert count_parameters(ModelConfig(d_model=d, ffn_hidden=4 * d)) == n, d
assert count_parameters(tiny) == sum(p.numel() for p in model.parameters())


# %% [markdown]
# ## A summary for the demo
#
# Parameters per group (embedding, attention, SwiGLU, norms, output projection), the total, and the
# shape of the model.

# %%
#| export
def parameter_groups(model: PicoDecoder) -> dict[str, int]:
    "Parameter count per group: embedding_proj, attention, swiglu, norms, de_embedding_proj."
    groups = dict.fromkeys(["embedding_proj", "attention", "swiglu", "norms", "de_embedding_proj"], 0)
    for name, p in model.named_parameters():
        group = next(g for g in ("attention_norm", "swiglu_norm", "output_norm", "attention", "swiglu",
                                 "embedding_proj", "de_embedding_proj") if f".{g}." in f".{name}")
        groups["norms" if group.endswith("_norm") else group] += p.numel()
    return groups

def model_summary(model: PicoDecoder) -> str:
    "A printable table of parameter counts per group and the model's shape."
    c = model.cfg
    lines = [f"PicoDecoder: d {c.d_model} · {c.n_layers} layers · {c.n_heads} heads ({c.n_kv_heads} kv, "
             f"head dim {c.d_model // c.n_heads}) · ffn {c.ffn_hidden} · vocab {c.vocab_size:,}"]
    groups = parameter_groups(model)
    lines += [f"  {name:<18}{n:>14,}" for name, n in groups.items()]
    lines.append(f"  {'total':<18}{sum(groups.values()):>14,}")
    return "\n".join(lines)


# %%
print(model_summary(model))
groups = parameter_groups(model)
d, L, V = tiny.d_model, tiny.n_layers, tiny.vocab_size
assert groups == {"embedding_proj": V * d, "attention": L * (2 * d * d + 2 * d * d // 2), "swiglu": L * 3 * d * 96,
                  "norms": (2 * L + 1) * d, "de_embedding_proj": V * d}
assert f"{count_parameters(tiny):,}" in model_summary(model).splitlines()[-1]

# %% [markdown]
# ## Checkpoints in the released format
#
# The released repositories hold a Hugging Face `config.json` written by pico-train's
# `PicoDecoderHFConfig` (pico-train's own key names, plus `model_type`, `architectures`, `auto_map`,
# `batch_size`, `torch_dtype`, ... which we ignore) and a `model.safetensors` whose keys carry the
# HF wrapper's prefix `pico_decoder.`. We write the same two files, so a checkpoint saved here sits
# next to the released ones, and we read either (with or without the prefix). The MAML models have
# `vocab_size` 50,281 in their config; the vocabulary size always comes from `config.json`.

# %%
#| export
# picomaml ModelConfig field -> key in the released config.json
CONFIG_KEYS = {"d_model": "d_model", "n_layers": "n_layers", "n_heads": "attention_n_heads",
               "n_kv_heads": "attention_n_kv_heads", "ffn_hidden": "activation_hidden_dim",
               "vocab_size": "vocab_size", "max_seq_len": "max_seq_len",
               "rope_theta": "position_emb_theta", "norm_eps": "norm_eps"}
REQUIRED_KEYS = ("d_model", "n_layers", "vocab_size", "attention_n_heads", "activation_hidden_dim")
HF_PREFIX = "pico_decoder."

class CheckpointError(ValueError):
    "A checkpoint that does not fit: the message names the file, the key and what was expected."

def config_to_json(cfg: ModelConfig) -> dict:
    "ModelConfig as the released checkpoints' config.json dict."
    return {"model_type": "pico_decoder", "architectures": ["PicoDecoderHF"],
            **{key: getattr(cfg, field) for field, key in CONFIG_KEYS.items()}, "torch_dtype": "float32"}

def config_from_json(data: dict, where: str = "config.json") -> ModelConfig:
    "ModelConfig from a released-format config.json dict; missing keys are an error naming `where`."
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing: raise CheckpointError(f"{where} lacks {missing}; is it a Pico decoder config?")
    defaults = ModelConfig()
    values = {field: data.get(key) for field, key in CONFIG_KEYS.items()}
    if values["n_kv_heads"] is None: values["n_kv_heads"] = values["n_heads"]  # pico-train: None = plain MHA
    values = {f: getattr(defaults, f) if v is None else type(getattr(defaults, f))(v) for f, v in values.items()}
    return ModelConfig(**values)


# %%
released_cfg = {"architectures": ["PicoDecoderHF"], "auto_map": {"AutoConfig": "pico_decoder.PicoDecoderHFConfig"},
                "model_type": "pico_decoder", "batch_size": 1024, "d_model": 24, "n_layers": 2, "vocab_size": 50281,
                "max_seq_len": 2048, "attention_n_heads": 4, "attention_n_kv_heads": 2,
                "activation_hidden_dim": 96, "norm_eps": 1e-06, "position_emb_theta": 10000.0,
                "torch_dtype": "float32", "transformers_version": "4.48.3"}
assert config_from_json(released_cfg) == dataclasses.replace(tiny, vocab_size=50281, max_seq_len=2048)
assert config_from_json(config_to_json(tiny)) == tiny
assert config_from_json({**released_cfg, "attention_n_kv_heads": None}).n_kv_heads == 4
raises(lambda: config_from_json({"hidden_size": 24, "vocab_size": 64}, "x/config.json"), "x/config.json", "d_model",
       kind=CheckpointError)


# %% [markdown]
# Loading checks every key and shape before copying, so a checkpoint of another model fails with the
# offending key and both shapes instead of a wall of `load_state_dict` text.

# %%
#| export
def load_checked(model: PicoDecoder, tensors: dict[str, torch.Tensor], where: str,
                 shapes_from: str = "its config.json") -> PicoDecoder:
    "Copy `tensors` (`pico_decoder.`-prefixed or not) into `model` (shaped by `shapes_from`), or raise CheckpointError."
    tensors = {k.removeprefix(HF_PREFIX): v for k, v in tensors.items()}
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{where} is not a checkpoint of this Pico decoder: missing keys {missing[:5]}"
                              f" ({len(missing)} in all), unexpected keys {unexpected[:5]} ({len(unexpected)} in all)")
    for key, want in expected.items():
        if tensors[key].shape != want.shape:
            raise CheckpointError(f"{where}: {key} has shape {tuple(tensors[key].shape)} but {shapes_from} "
                                  f"gives a model expecting {tuple(want.shape)}; the weights belong to another model")
    model.load_state_dict(tensors)
    return model


# %% [markdown]
# `save_pretrained` writes `config.json` and `model.safetensors` (with `format: pt` metadata, which
# `transformers` requires). Weights are read only from safetensors: nothing is unpickled and no
# remote code runs.

# %%
#| export
def save_pretrained(model: PicoDecoder, directory) -> Path:
    "Write model.safetensors and config.json (the released checkpoints' format) into `directory`."
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {HF_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_to_json(model.cfg), indent=2) + "\n")
    return directory

def load_local(directory) -> PicoDecoder:
    "PicoDecoder from a directory holding config.json and model.safetensors."
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: a checkpoint directory needs config.json and "
                                    f"model.safetensors")
    try: data = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / 'config.json'} is not valid JSON: {e}") from e
    model = PicoDecoder(config_from_json(data, str(directory / "config.json")))
    return load_checked(model, load_file(directory / "model.safetensors"), str(directory / "model.safetensors"))


# %% [markdown]
# `load_pretrained` takes a local directory or a Hub repo id, with an optional branch, tag or commit
# as `revision` and an optional `subfolder` (the MAML repositories keep each step in
# `checkpoints/step_N`). From the Hub it downloads exactly the two files with `hf_hub_download` into
# the usual cache (or `cache_dir`), which also works offline once they are cached.

# %%
#| export
def load_pretrained(source, revision: str | None = None, subfolder: str | None = None, cache_dir=None) -> PicoDecoder:
    "PicoDecoder from a local directory or a Hub repo id (config.json + model.safetensors only)."
    if Path(source).is_dir():
        if revision is not None:
            raise ValueError(f"{source} is a local directory; revision={revision!r} applies only to Hub repos")
        return load_local(Path(source) / (subfolder or ""))
    paths = []
    for name in ("config.json", "model.safetensors"):
        try:
            paths.append(hf_hub_download(str(source), name, subfolder=subfolder, revision=revision,
                                         cache_dir=cache_dir))
        except (HfHubHTTPError, EntryNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"{source!r} is no local directory, and {name} of Hub repo {source!r} (revision "
                                    f"{revision or 'main'}, "
                                    f"subfolder {subfolder or '/'}) could not be fetched: {e}") from e
    return load_local(Path(paths[0]).parent)


# %% [markdown]
# ### Tests: round trips
#
# A local directory round-trips bitwise, config included.

# %%
import tempfile

tmp = Path(tempfile.mkdtemp())
torch.manual_seed(1)
model = PicoDecoder(tiny)
save_pretrained(model, tmp / "tiny")
assert json.loads((tmp / "tiny/config.json").read_text())["attention_n_kv_heads"] == 2
loaded = load_pretrained(tmp / "tiny")
assert loaded.cfg == tiny and loaded.state_dict().keys() == model.state_dict().keys()
assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
assert torch.equal(loaded(ids), model(ids))


# %% [markdown]
# The Hub path runs for real against a local stand-in: `LocalHub` implements the three `HfApi` calls
# by writing the Hugging Face cache layout (`models--owner--name/refs/<branch>`,
# `snapshots/<commit>/...`), and with the Hub in offline mode `hf_hub_download` resolves repo id and
# revision from that cache exactly as it does after a real download.

# %%
class LocalHub:
    "Stand-in for HfApi that 'uploads' into a Hugging Face cache directory."
    def __init__(self, cache_dir): self.cache_dir, self.calls = Path(cache_dir), []
    def create_repo(self, repo_id, **kw): self.calls.append(("create_repo", repo_id))
    def create_branch(self, repo_id, branch, **kw): self.calls.append(("create_branch", repo_id, branch))
    def upload_folder(self, repo_id, folder_path, path_in_repo=None, revision=None, **kw):
        repo = self.cache_dir / f"models--{repo_id.replace('/', '--')}"
        ref, commit = repo / "refs" / (revision or "main"), f"{len(self.calls):040x}"
        if ref.is_file():  # a new commit keeps the files already on the branch
            shutil.copytree(repo / "snapshots" / ref.read_text(), repo / "snapshots" / commit)
        shutil.copytree(folder_path, repo / "snapshots" / commit / (path_in_repo or ""), dirs_exist_ok=True)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
        self.calls.append(("upload_folder", repo_id, revision, path_in_repo))
        return commit

class hub_offline:
    "Context manager: huggingface_hub answers from the cache only (as with HF_HUB_OFFLINE=1)."
    def __enter__(self):
        self.saved, huggingface_hub.constants.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE, True
    def __exit__(self, *exc): huggingface_hub.constants.HF_HUB_OFFLINE = self.saved


# %%
hub = LocalHub(tmp / "hf-cache")
def upload(model, repo_id, revision=None, subfolder=None):
    "Upload a model in the released checkpoints' layout (training uploads via picomaml.checkpoints.upload_checkpoint)."
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder)
        hub.upload_folder(repo_id, folder, path_in_repo=subfolder, revision=revision)

upload(model, "picomaml/pico-test")
torch.manual_seed(2)
later = PicoDecoder(tiny)
upload(later, "picomaml/pico-test", revision="step-100")
upload(later, "picomaml/pico-test", subfolder="checkpoints/step_100")
with hub_offline():
    from_main = load_pretrained("picomaml/pico-test", cache_dir=tmp / "hf-cache")
    from_branch = load_pretrained("picomaml/pico-test", revision="step-100", cache_dir=tmp / "hf-cache")
    from_subfolder = load_pretrained("picomaml/pico-test", subfolder="checkpoints/step_100", cache_dir=tmp / "hf-cache")
    raises(lambda: load_pretrained("picomaml/no-such-model", cache_dir=tmp / "hf-cache"),
           "picomaml/no-such-model", "config.json", kind=FileNotFoundError)
assert all(torch.equal(v, from_main.state_dict()[k]) for k, v in model.state_dict().items())
assert all(torch.equal(v, from_branch.state_dict()[k]) for k, v in later.state_dict().items())
assert all(torch.equal(v, from_subfolder.state_dict()[k]) for k, v in later.state_dict().items())
cached_repo = tmp / "hf-cache/models--picomaml--pico-test"
snapshot = cached_repo / "snapshots" / (cached_repo / "refs/main").read_text()
assert all(torch.equal(a, b)
           for a, b in zip(load_pretrained(snapshot).state_dict().values(), from_main.state_dict().values()))
assert torch.equal(load_pretrained(snapshot, subfolder="checkpoints/step_100").embedding_proj.weight,
                   later.embedding_proj.weight)

# %% [markdown]
# ### Tests: checkpoints of other models and the released format
#
# Weights of a d-32 model next to the config of a d-24 model: the error names the first key that does
# not fit and both shapes. A checkpoint of some other architecture lists the missing and unexpected
# keys. A missing file is named.

# %%
save_pretrained(PicoDecoder(dataclasses.replace(tiny, d_model=32, ffn_hidden=128)), tmp / "wide")
(tmp / "wide/config.json").write_text((tmp / "tiny/config.json").read_text())
raises(lambda: load_pretrained(tmp / "wide"), "embedding_proj.weight has shape (64, 32)", "(64, 24)",
       kind=CheckpointError)

(tmp / "gpt").mkdir()
(tmp / "gpt/config.json").write_text((tmp / "tiny/config.json").read_text())
save_file({"transformer.wte.weight": torch.zeros(64, 24)}, tmp / "gpt/model.safetensors")
raises(lambda: load_pretrained(tmp / "gpt"), "transformer.wte.weight", "de_embedding_proj.weight", kind=CheckpointError)

(tmp / "tiny/model.safetensors").rename(tmp / "tiny/weights.bin")
e = raises(lambda: load_pretrained(tmp / "tiny"), kind=FileNotFoundError)
assert str(tmp / "tiny/model.safetensors") in str(e)

# %% [markdown]
# A checkpoint exactly as the released MAML repositories store it: config.json with the HF extras
# and vocab 50,281, tensor keys prefixed with `pico_decoder.`. It loads, and the logits are
# 50,281-way.

# %%
torch.manual_seed(3)
maml_like = PicoDecoder(config_from_json(released_cfg))
(tmp / "maml").mkdir()
(tmp / "maml/config.json").write_text(json.dumps(released_cfg))
save_file({HF_PREFIX + k: v.contiguous() for k, v in maml_like.state_dict().items()}, tmp / "maml/model.safetensors")
maml_loaded = load_pretrained(tmp / "maml")
assert maml_loaded.cfg.vocab_size == 50281 and maml_loaded(ids[:1, :4]).shape == (1, 4, 50281)
assert torch.equal(maml_loaded.de_embedding_proj.weight, maml_like.de_embedding_proj.weight)

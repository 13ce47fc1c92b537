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
# # Language-model losses
#
# > The next-token loss the trainer backpropagates, and the Paloma perplexities it reports: one home
# > for both, used by the training loop, the evaluation and the spectra's gradients.
#
# Paper 1 App. A, Algorithm 2: the next-token branch minimises the mean cross-entropy of every
# target token of the batch. Paloma perplexity is evaluated every 100 steps (paper 1 §3.3) and
# reported in paper 1 §4 (Table 2, Figure 1).

# %%
#| default_exp lm_loss

# %%
#| export
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


# %% [markdown]
# ## The next-token loss as a share of the global batch
#
# Algorithm 2's loss is the mean cross-entropy over every target token of the global batch. A rank
# holds some of the rows of each branch micro-batch (and runs them in memory chunks), so its share is the **sum** over
# its tokens divided by the global token count; the shares of all micro-steps and ranks add up to the
# global mean, and so do their gradients. Rows hold `seq_len + 1` ids: inputs `[:, :-1]`, targets
# `[:, 1:]`, Pico's row format. The logits are cast to float32 for the softmax under bf16 autocast.
#
# The output layer and its loss are the largest cost of an AR step that is not essential
# (`benchmarks/README.md` measures it): the plain path materialises the (B·T, 50,304) logits in float32, then
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

def next_token_loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    "Mean next-token cross-entropy of rows (B, T + 1): the loss whose gradients the spectra analyse."
    return next_token_loss_sum(model, rows) / rows[:, 1:].numel()


# %% [markdown]
# Tests on a 2-block Pico decoder over a 40-token vocabulary: loss and every gradient equal the plain
# path (whole logits, `F.cross_entropy`) for chunks that divide the tokens, leave a remainder, or hold
# them all, also under a scaled backward; under bf16 autocast they agree to bf16 rounding; and two
# ranks' shares add up to the one-process mean.

# %%
from picomaml.config import ModelConfig
from picomaml.model import PicoDecoder

torch.manual_seed(0)
_toy = PicoDecoder(ModelConfig(d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=48, vocab_size=40,
                               max_seq_len=16))
_rows = torch.randint(0, 40, (4, 7))  # (B, T + 1): 24 targets

def _loss_and_grads(loss_fn, scale=1.0):
    "Loss and cloned parameter gradients of (loss_fn() * scale).backward()."
    _toy.zero_grad(set_to_none=True)
    loss = loss_fn()
    (loss * scale).backward()
    return loss.item(), [p.grad.clone() for p in _toy.parameters()]

_plain = lambda: F.cross_entropy(_toy(_rows[:, :-1]).flatten(0, 1).float(), _rows[:, 1:].flatten(), reduction="sum")
for _chunk, _scale in ((6, 1.0), (5, 0.25), (1024, 1.0)):
    (_want, _want_g), (_got, _got_g) = (_loss_and_grads(_plain, _scale),
                                        _loss_and_grads(lambda: next_token_loss_sum(_toy, _rows, _chunk), _scale))
    assert abs(_got - _want) < 1e-4 * abs(_want)
    # float32 rounding of O(1) gradients
    assert all(torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(_got_g, _want_g))
with torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU path's precision: same loss, gradients to bf16 rounding
    (_want, _want_g), (_got, _got_g) = (_loss_and_grads(_plain),
                                        _loss_and_grads(lambda: next_token_loss_sum(_toy, _rows, 5)))
assert abs(_got - _want) < 1e-3 * abs(_want)
assert all((g - w).abs().max() <= 1e-2 * w.abs().max() for g, w in zip(_got_g, _want_g))
_mean = F.cross_entropy(_toy(_rows[:, :-1]).flatten(0, 1), _rows[:, 1:].flatten())
_shares = [next_token_loss_sum(_toy, part, 5) / _rows[:, 1:].numel() for part in _rows.split(2)]
assert torch.allclose(sum(_shares), _mean)  # two ranks' shares add up to the one-process mean
assert torch.allclose(next_token_loss(_toy, _rows), _mean)


# %% [markdown]
# ## Memory chunks: the same gradient, in pieces
#
# Paper 1 §3.3's micro-batch of 256 sequences of 2,048 tokens is the unit of the hybrid rule, not a
# unit of memory: a rank holds 64 of its rows on four GPUs, whose activations need far more memory
# than a GPU has for the larger models. `next_token_backward` runs a rank's rows `chunk_rows` at a
# time, each chunk's summed loss divided by the same global denominator and backpropagated at once,
# so the gradients accumulate to exactly the gradient of the whole micro-batch's loss (the sum is
# linear), whatever the chunk. The chunk is chosen by the planner (`picomaml.plan`) to fit the device.

# %%
#| export
def next_token_backward(model: torch.nn.Module, rows: torch.Tensor, chunk_rows: int, denominator: float,
                        autocast=contextlib.nullcontext, device=None) -> float:
    "Backpropagate sum-CE(rows (B, T + 1)) / denominator, `chunk_rows` rows at a time; return the summed CE."
    total = 0.0
    for chunk in rows.split(chunk_rows):  # (<= chunk_rows, T + 1)
        chunk = chunk.to(device, non_blocking=True) if device is not None else chunk
        with autocast():  # fabric.autocast on a launched run: bf16 on GPU
            loss = next_token_loss_sum(model, chunk)
        (loss / denominator).backward()
        total += loss.item()
    return total


# %%
torch.manual_seed(3)
_rows = torch.randint(0, 40, (5, 9))  # (B, T + 1)
_grads = {}
for _chunk in (5, 2, 1):
    _toy.zero_grad(set_to_none=True)
    _total = next_token_backward(_toy, _rows, _chunk, denominator=_rows[:, 1:].numel() * 3)
    _grads[_chunk] = [p.grad.clone() for p in _toy.parameters()]
    assert abs(_total - next_token_loss_sum(_toy, _rows).item()) < 1e-4 * _total
assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for c in (2, 1) for a, b in zip(_grads[5], _grads[c]))


# %% [markdown]
# ## Paloma perplexity, two ways
#
# Every `eval.every` steps we report perplexity on the Paloma documents (paper 1 §3.3;
# `picomaml.data.read_eval_documents`: each document on its own, cut at the model's 2,048 tokens).
# The **per-document mean**, the mean over documents of each document's own perplexity
# $\exp(\frac{1}{n_d - 1}\sum_t \mathrm{CE}_t)$, is what pico-train reports (its `mean_perplexity`),
# so it is the measure to read against the papers' tables; the **token-weighted** perplexity, exp of the
# mean cross-entropy over every target token of every document, is the usual definition and is kept
# beside it, labelled. A batch holds whole documents right-padded to its longest: the decoder is causal,
# so a document's positions never see the padding after it, and the padded targets are masked out. Each
# rank scores a share of the documents; the four sums are all-reduced, so the result does not depend
# on the number of ranks, the batch size or the order.

# %%
#| export
@torch.no_grad()
def document_sums(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    "[summed CE, targets, summed per-document ppl, documents] of right-padded documents (B, L) of `lengths` in float64."
    logits = model(ids[:, :-1])  # (B, L - 1, V): each document its own sequence
    ce = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                         reduction="none").view(len(ids), -1).double()
    # (B, L - 1) targets
    mask = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :] < (lengths.to(ids.device) - 1)[:, None]
    ce = ce * mask
    per_document = ce.sum(1) / mask.sum(1)  # (B,) mean CE of each document
    return torch.stack([ce.sum(), mask.sum().double(), per_document.exp().sum(), per_document.new_tensor(len(ids))])

def perplexities(sums: torch.Tensor) -> dict:
    "Per-document-mean and token-weighted perplexity (and the mean CE) from all-reduced `document_sums`."
    ce_sum, tokens, doc_ppl_sum, docs = sums.tolist()
    return {"paloma_doc_ppl": doc_ppl_sum / docs, "paloma_ppl": math.exp(ce_sum / tokens), "eval_loss": ce_sum / tokens}


# %% [markdown]
# Tests, known answers: padded batches give each document's own perplexity (computed alone, unpadded);
# the two measures differ as they should (a short document weighs as much as a long one in the mean
# of perplexities, and by its tokens in the other); sums over any split of the documents add up.

# %%
_documents = [torch.tensor([5, 1, 9, 2]), torch.tensor([3, 3]), torch.tensor([7, 2, 2, 2, 2, 2, 4])]
_ids = torch.zeros(3, 7, dtype=torch.long)
for _i, _d in enumerate(_documents): _ids[_i, :len(_d)] = _d
_lengths = torch.tensor([len(d) for d in _documents])
# each without padding
_alone = [F.cross_entropy(_toy(d[None, :-1])[0], d[1:], reduction="none").double() for d in _documents]

_ppl = perplexities(document_sums(_toy, _ids, _lengths))
assert math.isclose(_ppl["paloma_doc_ppl"], sum(ce.mean().exp().item() for ce in _alone) / 3, rel_tol=1e-6)
assert math.isclose(_ppl["paloma_ppl"], torch.cat(_alone).mean().exp().item(), rel_tol=1e-6)
_split = document_sums(_toy, _ids[:1, :4], _lengths[:1]) + document_sums(_toy, _ids[1:], _lengths[1:])
assert torch.allclose(_split, document_sums(_toy, _ids, _lengths))

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
# # The CRF and the NER metrics
#
# > The linear-chain CRF's algorithms (log-partition, likelihood, Viterbi, marginals) and the scores
# > of a tagger: seqeval micro-F1 and per-tag F1, their per-sentence counts, and the loss-curve
# > speed measures of paper 2.
#
# Paper 2 §2.5 puts a linear-chain CRF on the backbone's word features; paper 1 §3.4 a linear
# classifier, which needs none of the CRF part. Both papers score NER by micro-F1 over entity spans
# (paper 1 §5, Tables 3–9; paper 2 §3 and §4, Figs. 1–6), paper 1 also per entity class (Fig. 2),
# and paper 2 §5 measures how fast finetuning converges from the loss curve (Table 2). Everything
# here works on tensors of scores and tag ids, or on IOB2 tag strings: no model, no data. The heads
# and the finetuning loop that use it are in `11_ner_finetune`.

# %%
#| default_exp crf_metrics

# %%
#| export
from __future__ import annotations

import math

import numpy as np
import torch
from seqeval.metrics import classification_report, f1_score
from seqeval.scheme import IOB2
from torchcrf import CRF

from picomaml.names import ENTITY_TYPES
from picomaml.ner_data import LABELS, tag_spans


# %% [markdown]
# ## The linear-chain CRF
#
# Over the W words of a window with emissions e_t(j) (the head's linear scores) the CRF scores a tag
# sequence y as s_{y_0} + Σ_t e_t(y_t) + Σ_t A_{y_{t−1} y_t} + end_{y_last}, with start scores s,
# transition scores A and end scores, and p(y | x) = exp(score(y)) / Z. The parameters are those of a
# `torchcrf.CRF` (pytorch-crf 0.7.2), so a trained CRF can be read by either implementation; windows
# of a batch are right-padded, with a boolean mask whose first word is always set.
#
# ### The log-partition in ⌈log₂ W⌉ steps
#
# pytorch-crf computes log Z with a Python loop over the words, about a dozen small ops per word
# forward and as many backward, which dominated the CRF head-only epochs (see the benchmark in
# `11_ner_finetune`). Z is a product of step matrices, Z = Σ_k (M_0 M_1 ⋯ M_{n−1})_{0k} exp(end_k)
# with M_t(i, j) = exp(A_ij + e_t(j)) and M_0's rows all exp(s_j + e_0(j)), so it can be multiplied
# pairwise as a tree: ⌈log₂ W⌉ batched products instead of W Python steps; a padded step is the
# identity.
#
# **In log space.** The products must be taken in log space, log(exp(a) exp(b))_ik =
# log Σ_j exp(a_ij + b_jk). An earlier version multiplied probabilities, dividing each matrix by its
# largest entry against overflow; that loses every entry more than ~88 nats (float32's range) below
# a matrix's largest, and such entries matter as soon as transition scores span more than that — as
# with the −1e4 that users put on forbidden BIO transitions (O → I-X): a row of a reachable tag can
# then sit entirely below the largest entry of an unreachable one, the product underflows to 0, and
# log Z became −∞ or NaN. `log_matmul` keeps every entry's own maximum: each sum is shifted by its
# largest term, so it is exact in float32 whatever the range. Terms more than 80 nats below an
# entry's largest are clamped there before `exp`: they change the sum by less than K·e⁻⁸⁰ ≈ 10⁻³⁴ of
# itself (below float32's resolution), and the clamp avoids `exp`'s slow path for huge negative
# arguments (about 15× slower on CPU). The padding identity uses a large finite negative number
# instead of −∞, so no gradient is ever ∞ − ∞.

# %%
#| export
def log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    "log(exp(a) @ exp(b)) of log-space matrices, exact in float32: (..., K, K), (..., K, K) -> (..., K, K)."
    x = a.unsqueeze(-1) + b.unsqueeze(-3)  # (..., K, K, K): i, j, k
    top = x.amax(-2, keepdim=True).detach()  # (..., K, 1, K) largest term of each sum; any shift gives the same value
    return (x - top).clamp(min=-80).exp().sum(-2).log() + top.squeeze(-2)

def crf_log_partition(crf: CRF, em: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    "log Z of every window of a linear-chain CRF by a tree of log-space matrix products: (B, W, K), (B, W) -> (B,)."
    B, W, K = em.shape
    first = (crf.start_transitions + em[:, :1]).unsqueeze(2).expand(B, 1, K, K)  # (B, 1, K, K) every row s + e_0
    steps = torch.cat([first, crf.transitions + em[:, 1:].unsqueeze(2)], 1)  # (B, W, K, K) log M_t
    identity = torch.full((K, K), torch.finfo(em.dtype).min / 4, dtype=em.dtype, device=em.device).fill_diagonal_(0)
    steps = torch.where(mask[:, :, None, None], steps, identity)
    while steps.shape[1] > 1:
        if steps.shape[1] % 2: steps = torch.cat([steps, identity.expand(B, 1, K, K)], 1)
        steps = log_matmul(steps[:, 0::2], steps[:, 1::2])  # (B, W'/2, K, K)
    return torch.logsumexp(steps[:, 0, 0] + crf.end_transitions, 1)

def crf_nll(crf: CRF, em: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    "Negative log-likelihood of the tag paths per word (pytorch-crf's token_mean): (B, W, K), (B, W), (B, W)."
    m = mask.to(em.dtype)
    last = tags.gather(1, mask.sum(1, keepdim=True) - 1).squeeze(1)  # (B,) tag at each window's last word
    gold = (crf.start_transitions[tags[:, 0]] + crf.end_transitions[last]
            + (em.gather(2, tags[..., None]).squeeze(2) * m).sum(1)
            + (crf.transitions[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1))  # (B,) score of the gold path
    return (crf_log_partition(crf, em, mask) - gold).sum() / m.sum()


# %% [markdown]
# The loss is the negative log-likelihood divided by the number of words (pytorch-crf's
# `token_mean`), so the CRF's loss is per word like the linear head's cross-entropy. It equals
# pytorch-crf's loss, and its gradients, on ragged batches of every length from 1 word to 200 (an
# odd number of matrices pads the tree), with random CRF parameters and emissions of scale 3.

# %%
K = len(LABELS)

def grads(loss, params):
    "Gradients of `loss`, zeros for parameters it does not use (the transitions of one-word windows)."
    return [torch.zeros_like(p) if g is None else g
            for g, p in zip(torch.autograd.grad(loss, params, allow_unused=True), params)]

def ragged(B, W, generator=None):
    "A (B, W) mask of windows of random lengths 1 … W, the first one full."
    lengths = torch.randint(1, W + 1, (B,), generator=generator)
    lengths[0] = W
    return torch.arange(W) < lengths[:, None]

torch.manual_seed(0)
crf_ref = CRF(K, batch_first=True)
for p in crf_ref.parameters(): torch.nn.init.normal_(p)
for W in (1, 2, 3, 7, 16, 33, 200):
    em = (3 * torch.randn(5, W, K)).requires_grad_()
    mask = ragged(5, W)
    tags = torch.randint(0, K, (5, W)) * mask
    ours, ref = crf_nll(crf_ref, em, tags, mask), -crf_ref(em, tags, mask, reduction="token_mean")
    assert torch.allclose(ours, ref, atol=1e-5), (W, ours, ref)
    g_ours, g_ref = grads(ours, [em, *crf_ref.parameters()]), grads(ref, [em, *crf_ref.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_ours, g_ref)), W


# %% [markdown]
# **Forbidden transitions.** With −1e4 on every transition IOB2 forbids (O → I-X, B-X/I-X → I-Y of
# another type, and an I-X first word) and emissions of scale 3 to 100 — a span of far more than
# 90 nats — log Z in float32 stays finite and equals pytorch-crf's log Z computed in float64, to
# float32's resolution (1e-6 of |log Z|, which reaches several hundred), on ragged windows up to 200
# words; the loss's gradients are finite and equal pytorch-crf's in float64. The probability-space
# product this replaced returned NaN here from emission scale 60 on.

# %%
def bio_forbidden(labels=LABELS, penalty=-1e4):
    "Transition (K, K) and start (K,) penalties of the transitions IOB2 forbids."
    allowed = lambda a, b: not b.startswith("I-") or (a != "O" and a[2:] == b[2:])
    transitions = torch.tensor([[0.0 if allowed(a, b) else penalty for b in labels] for a in labels])
    return transitions, torch.tensor([penalty if b.startswith("I-") else 0.0 for b in labels])

torch.manual_seed(1)
crf_bio = CRF(K, batch_first=True)
penalty_a, penalty_s = bio_forbidden()
with torch.no_grad():
    crf_bio.transitions.copy_(penalty_a + torch.randn(K, K))
    crf_bio.start_transitions.copy_(penalty_s + torch.randn(K))
    crf_bio.end_transitions.normal_()
crf_bio64 = CRF(K, batch_first=True).double()
crf_bio64.load_state_dict({k: v.double() for k, v in crf_bio.state_dict().items()})
for scale in (3.0, 30.0, 60.0, 100.0):
    for W in (1, 5, 64, 200):
        em, mask = scale * torch.randn(6, W, K), ragged(6, W)
        ours = crf_log_partition(crf_bio, em, mask)
        ref = crf_bio64._compute_normalizer(em.double().transpose(0, 1), mask.transpose(0, 1))  # pytorch-crf in float64
        assert torch.isfinite(ours).all() and torch.allclose(ours.double(), ref, rtol=1e-6, atol=1e-4), \
            (scale, W, ours, ref)
em = (60 * torch.randn(6, 64, K)).requires_grad_()
mask, tags = ragged(6, 64), torch.zeros(6, 64, dtype=torch.long)  # all O: a path without forbidden transitions
g_ours = grads(crf_nll(crf_bio, em, tags, mask), [em, *crf_bio.parameters()])
em64 = em.detach().double().requires_grad_()
g_ref = grads(-crf_bio64(em64, tags, mask, reduction="token_mean"), [em64, *crf_bio64.parameters()])
assert all(torch.isfinite(g).all() and torch.allclose(g.double(), r, atol=1e-4) for g, r in zip(g_ours, g_ref))


# %% [markdown]
# ### Batched Viterbi
#
# δ_0 = s + e_0, δ_t(j) = max_i(δ_{t−1}(i) + A_ij) + e_t(j) with back-pointers ψ_t(j) = argmax_i;
# padded steps carry δ forward unchanged. The best last tag maximises δ + end transitions, and the
# back-pointers are followed for every window at once (pytorch-crf backtracks each sequence in
# Python); a padded step keeps the current tag, so each window's path starts at its own last word.
# Ties break as in pytorch-crf (`max` on the same sums).

# %%
#| export
def viterbi(crf: CRF, em: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    "Best tag sequence of every window: (B, W, K) emissions, (B, W) mask -> (B, W) tag ids (0 after each window's end)."
    B, W, K = em.shape
    score, pointers = crf.start_transitions + em[:, 0], []  # (B, K)
    for t in range(1, W):
        best, arg = (score.unsqueeze(2) + crf.transitions).max(1)  # (B, K): best previous tag for each tag
        pointers.append(arg)
        score = torch.where(mask[:, t, None], best + em[:, t], score)
    tag = (score + crf.end_transitions).max(1).indices  # (B,) tag at each window's last word
    path = torch.zeros(B, W, dtype=torch.long, device=em.device)
    for t in range(W - 1, -1, -1):
        path[:, t] = tag
        if t: tag = torch.where(mask[:, t], pointers[t - 1].gather(1, tag[:, None]).squeeze(1), tag)
    return path * mask


# %% [markdown]
# ### Marginals by forward–backward
#
# Paper 2 reads the probability of the correct tag at every word (Figs. 7 and 9). For the CRF that
# is the marginal p(y_t = j | x) = exp(α_t(j) + β_t(j) − log Z), with log-space forward scores
# α_t(j) = e_t(j) + logsumexp_i(α_{t−1}(i) + A_ij), α_0 = s + e_0, and backward scores
# β_t(i) = logsumexp_j(A_ij + e_{t+1}(j) + β_{t+1}(j)), β_{last} = end transitions.

# %%
#| export
def crf_marginals(crf: CRF, em: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    "Per-word tag marginals of a linear-chain CRF: (B, W, K) emissions -> (B, W, K) probabilities."
    B, W, K = em.shape
    A = crf.transitions  # (K, K) score of tag i followed by tag j
    alphas = [crf.start_transitions + em[:, 0]]  # (B, K)
    for t in range(1, W):
        step = torch.logsumexp(alphas[-1].unsqueeze(2) + A + em[:, t].unsqueeze(1), dim=1)
        alphas.append(torch.where(mask[:, t, None], step, alphas[-1]))
    end = crf.end_transitions.expand(B, K)
    betas = [end]
    for t in range(W - 2, -1, -1):
        step = torch.logsumexp(A + (em[:, t + 1] + betas[0]).unsqueeze(1), dim=2)
        betas.insert(0, torch.where(mask[:, t + 1, None], step, end))
    alpha, beta = torch.stack(alphas, 1), torch.stack(betas, 1)  # (B, W, K)
    log_z = torch.logsumexp(alphas[-1] + crf.end_transitions, dim=1)  # (B,)
    return (alpha + beta - log_z[:, None, None]).exp()


# %% [markdown]
# Brute force over every tag sequence of short inputs, in float64: the batched Viterbi finds the
# best-scoring sequence (and agrees with pytorch-crf's own decoder), the marginals are the summed
# probabilities of the sequences with each tag, and the likelihood is that of the sequence — with a
# padded window in the batch, for random parameters and for the forbidden-transition CRF above.

# %%
import itertools


def sequence_score(crf, em, tags):
    "Unnormalised score of one tag sequence: start + emissions + transitions + end."
    s = crf.start_transitions[tags[0]] + crf.end_transitions[tags[-1]] + sum(em[t, y] for t, y in enumerate(tags))
    return s + sum(crf.transitions[a, b] for a, b in zip(tags, tags[1:]))

torch.manual_seed(0)
mask = torch.tensor([[True] * 4, [True, True, True, False]])
for crf, scale in ((crf_ref, 1.0), (crf_bio, 30.0)):
    em = scale * torch.randn(2, 4, K)
    marg, best = crf_marginals(crf, em, mask), viterbi(crf, em, mask)
    assert [row[:n].tolist() for row, n in zip(best, (4, 3))] == crf.decode(em, mask) and best[1, 3] == 0
    for b, n in enumerate((4, 3)):
        seqs = list(itertools.product(range(K), repeat=n))
        scores = torch.stack([sequence_score(crf, em[b].double(), s) for s in seqs]).double()  # (K^n,)
        assert list(seqs[scores.argmax()]) == best[b, :n].tolist()
        assert torch.allclose(crf_log_partition(crf, em[b:b + 1, :n], mask[b:b + 1, :n]).double(), scores.logsumexp(0),
                              rtol=1e-6)
        probs = (scores - scores.logsumexp(0)).exp()
        for t in range(n):
            brute = torch.stack([probs[[s[t] == j for s in seqs]].sum() for j in range(K)])
            assert torch.allclose(marg[b, t].double(), brute, atol=1e-5)
        gold = best[b:b + 1, :n]
        assert torch.allclose(crf_nll(crf, em[b:b + 1, :n], gold, mask[b:b + 1, :n]).double() * n,
                              -probs[scores.argmax()].log(), atol=1e-4)  # token_mean NLL = -log p(sequence) / words

# %% [markdown]
# And on a larger random batch of ragged windows, the batched path equals pytorch-crf's decoder.

# %%
em = torch.randn(64, 30, K)
mask = ragged(64, 30)
best = viterbi(crf_ref, em, mask)
assert [row[:n].tolist() for row, n in zip(best, mask.sum(1).tolist())] == crf_ref.decode(em, mask)


# %% [markdown]
# ## Scoring with seqeval
#
# Micro-F1 over entity spans in seqeval's default (CoNLL, lenient) mode — the papers' figure — and
# in strict IOB2 mode, which needs `scheme=IOB2` (without it, `mode="strict"` silently falls back to
# the lenient mode). Per-tag F1 for PER, LOC and ORG (NaN for a type with neither gold nor predicted
# spans), and the per-sentence counts behind them (`sentence_counts`, below).

# %% [markdown]
# ### Per-sentence counts, for intervals
#
# An F1 over a test set is a statistic of its sentences, so its sampling uncertainty can be read off
# a bootstrap over sentences — if the counts behind it are kept per sentence. For every sentence
# with a gold or predicted span, `sentence_counts` keeps its index and, per entity type (PER, LOC,
# ORG), the correct, predicted and gold spans (seqeval's default reading, `tag_spans`); with the
# number of sentences n that is everything a resample needs: micro-F1 is 2·correct / (predicted +
# gold) of the summed counts, a type's F1 the same of its own (the report notebooks resample them
# through `picomaml.report`). Sentences without spans are left out (they add nothing to any sum), which keeps
# a results row small.

# %%
#| export
def sentence_counts(gold: list[list[str]], pred: list[list[str]]) -> dict:
    "Sentence count n; per sentence with a span, [index, (correct, predicted, gold) spans of each of PER, LOC, ORG]."
    rows = []
    for i, (g, p) in enumerate(zip(gold, pred)):
        gold_spans, pred_spans = set(tag_spans(g)), set(tag_spans(p))
        per_type = lambda spans, t: sum(s[0] == t for s in spans)
        counts = [c for t in ENTITY_TYPES
                  for c in (per_type(gold_spans & pred_spans, t), per_type(pred_spans, t), per_type(gold_spans, t))]
        if any(counts): rows.append([i, *counts])
    return {"n": len(gold), "sentences": rows}


# %%
#| export
def score(gold: list[list[str]], pred: list[list[str]]) -> dict:
    "seqeval micro-F1 (default and strict IOB2) and per-tag F1 of predicted tag sequences, and per-sentence counts."
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    return {"micro_f1": f1_score(gold, pred, zero_division=0),
            "strict_micro_f1": f1_score(gold, pred, mode="strict", scheme=IOB2, zero_division=0),
            "per_tag_f1": {k: report[k]["f1-score"] if k in report else math.nan for k in ENTITY_TYPES},
            "sentence_counts": sentence_counts(gold, pred)}


# %% [markdown]
# A hand-computed case with 4 gold spans (PER "Jan Novak", LOC "Nitra", PER "Peter", ORG "SNK"). The
# prediction finds "Jan Novak", calls "Nitra" ORG, misses "SNK" and opens "Peter" with `I-PER`.
# Lenient mode reads that `I-PER` as a span start: 2 correct of 3 predicted, P = 2/3, R = 2/4,
# F1 = 4/7. Strict IOB2 drops the span opened by `I-PER`: 1 correct of 2 predicted, P = 1/2,
# R = 1/4, F1 = 1/3. Per tag (lenient): PER 2/2 found, 2 predicted → 1; LOC and ORG → 0.

# %%
gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "O", "B-ORG"]]
pred = [["B-PER", "I-PER", "O", "B-ORG"], ["I-PER", "O", "O"]]
sc = score(gold, pred)
assert abs(sc["micro_f1"] - 4 / 7) < 1e-9 and abs(sc["strict_micro_f1"] - 1 / 3) < 1e-9
assert sc["per_tag_f1"] == {"PER": 1.0, "LOC": 0.0, "ORG": 0.0}
assert f1_score(gold, pred, mode="strict") == sc["micro_f1"]  # the silent fallback this function avoids

# %% [markdown]
# ### Dev micro-F1 without strings
#
# Early stopping reads dev micro-F1 after every epoch, and seqeval over strings dominated the
# head-only epochs (see the benchmark in `11_ner_finetune`). `micro_f1` computes the **same number**
# from tag-id tensors. seqeval's default mode (conlleval) opens a span at every `B-X`, and at an
# `I-X` unless the previous word of the sentence is `B-X` or `I-X` of the same type; an `I-X` after
# those extends the span. So a word *continues* a span iff it is `I-X` and its predecessor's type is
# X; spans start at the other entity words and end at words whose successor does not continue them.
# Each span (start, end, type) becomes one integer key; true positives are predicted keys found among
# the gold keys, and P, R, F1 = 2PR/(P+R) (0 where undefined) use seqeval's own float operations.
# `follows` marks the words that directly follow the previous word of their sentence, so sentences
# (and windows of one sentence) can be packed end to end.

# %%
#| export
TAG_TYPE = torch.tensor([0 if t == "O" else 1 + ENTITY_TYPES.index(t[2:]) for t in LABELS])  # (K,) 0 for O
TAG_INSIDE = torch.tensor([t.startswith("I-") for t in LABELS])  # (K,)

def span_keys(tags: torch.Tensor, follows: torch.Tensor) -> torch.Tensor:
    "One integer key (start, end, type) per entity span of packed tag ids (N,), read as seqeval's default mode does."
    kind, n = TAG_TYPE.to(tags.device)[tags], len(tags)  # (N,) 0 for O
    previous = torch.where(follows, kind.roll(1), 0)  # (N,) type of the sentence's previous word, 0 at its start
    continues = TAG_INSIDE.to(tags.device)[tags] & (previous == kind)  # (N,) I-X right after B-X or I-X
    begins = (kind > 0) & ~continues
    ends = (kind > 0) & ~torch.cat([continues[1:], continues.new_zeros(1)])  # (N,) last word of a span
    first, last = begins.nonzero().squeeze(1), ends.nonzero().squeeze(1)  # (S,) each, in the same span order
    return (first * n + last) * (len(ENTITY_TYPES) + 1) + kind[first]

def micro_f1(gold: torch.Tensor, pred: torch.Tensor, follows: torch.Tensor) -> float:
    "seqeval's default-mode micro-F1 of packed tag ids: (N,) gold, (N,) predicted, (N,) bool `follows`."
    gold_spans, pred_spans = span_keys(gold, follows), span_keys(pred, follows)
    correct = int(torch.isin(pred_spans, gold_spans).sum())
    precision = correct / len(pred_spans) if len(pred_spans) else 0.0
    recall = correct / len(gold_spans) if len(gold_spans) else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# %% [markdown]
# It equals seqeval's `f1_score` exactly (`==`, not approximately) on the toy case above and on
# 500 random batches of sentences — empty ones, all-O ones, and predictions that corrupt the gold
# tags with ill-formed `I-` starts, type switches inside spans and spans at sentence edges.

# %%
import random


def packed(sentences):
    "Tag ids and `follows` flags of sentences packed end to end."
    ids = torch.tensor([LABELS.index(t) for s in sentences for t in s], dtype=torch.long)
    return ids, torch.tensor([i > 0 for s in sentences for i in range(len(s))], dtype=torch.bool)

def random_batch(rng):
    "Random gold sentences (some empty, some all O) and predictions that corrupt 30 % of their tags."
    o_share = rng.choice([0.0, 0.5, 0.8, 1.0])
    gold = [[rng.choice(LABELS[1:]) if rng.random() > o_share else "O" for _ in range(rng.randint(0, 9))]
            for _ in range(rng.randint(1, 6))]
    return gold, [[rng.choice(LABELS) if rng.random() < 0.3 else t for t in s] for s in gold]

assert micro_f1(packed(gold)[0], *packed(pred)) == f1_score(gold, pred) and abs(f1_score(gold, pred) - 4 / 7) < 1e-12
rng = random.Random(0)
for _ in range(500):
    gold_r, pred_r = random_batch(rng)
    assert micro_f1(packed(gold_r)[0], *packed(pred_r)) == f1_score(gold_r, pred_r, zero_division=0), (gold_r, pred_r)


# %% [markdown]
# Summed over the sentences, the counts give seqeval's micro-F1 and per-tag F1 (to rounding: seqeval
# computes 2PR/(P+R), the counts 2·correct/(predicted + gold)) on the hand-computed case and the 500
# random batches above; in the hand case the second sentence has its `I-PER` span (correct in the
# lenient reading) and the missed ORG.

# %%
def summed_counts_f1(counts, kind=None):
    "Micro-F1 (kind None) or one type's F1 of summed per-sentence counts; NaN for a type without spans."
    # (types, 3)
    c = np.asarray([r[1:] for r in counts["sentences"]] or np.zeros((0, 9))).reshape(-1, len(ENTITY_TYPES), 3).sum(0)
    tp, n_pred, n_gold = c.sum(0) if kind is None else c[ENTITY_TYPES.index(kind)]
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else (0.0 if kind is None else math.nan)

hand = sentence_counts(gold, pred)
assert hand == {"n": 2, "sentences": [[0, 1, 1, 1, 0, 0, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]]}
rng = random.Random(1)
for _ in range(500):
    gold_r, pred_r = random_batch(rng)
    sc, counts = score(gold_r, pred_r), sentence_counts(gold_r, pred_r)
    assert counts["n"] == len(gold_r) and math.isclose(summed_counts_f1(counts), sc["micro_f1"], rel_tol=1e-12), \
        (gold_r, pred_r)
    for t in ENTITY_TYPES:
        assert ((math.isnan(sc["per_tag_f1"][t]) and math.isnan(summed_counts_f1(counts, t)))
                or math.isclose(summed_counts_f1(counts, t), sc["per_tag_f1"][t], rel_tol=1e-12))


# %% [markdown]
# ## Finetuning speed from the loss curve (paper 2 Table 2)
#
# Paper 2 §5 measures "convergence time (… t90), normalized area under the loss curve … and initial
# slope" and defines none of them further. The per-step training losses L_1 … L_n are single
# mini-batches' losses, noisy enough that a raw curve's first and last values, and the first step
# that dips below a level, are mostly noise. So the levels and the crossing are read on a smoothed
# curve: the trailing mean over w steps, w = 5 % of the steps (at least one). **t90** is the first
# step at which the smoothed loss is at most L_0 − 0.9 (L_0 − L_end), with L_0 the mean of the first
# w steps and L_end the mean of the last w (a final loss of several batches, not one); **AUC** is the
# trapezoidal area under the raw curve divided by the step span n − 1 (a mean loss, comparable between
# runs of different length; smoothing would not change it); **slope** is the least-squares slope of
# the raw losses over the first 10 % of the steps (at least two; a fit is already an average).

# %%
#| export
def loss_curve_metrics(losses, smooth_share: float = 0.05) -> dict:
    "t90 (of the trailing mean over `smooth_share` of steps), normalised AUC, initial slope of a per-step loss curve."
    y = np.asarray(losses, dtype=float)
    if len(y) < 2: raise ValueError(f"a loss curve needs at least 2 steps, got {len(y)}")
    steps, w = np.arange(1, len(y) + 1), max(1, round(smooth_share * len(y)))
    # trailing mean
    smoothed = np.convolve(y, np.ones(w) / w, mode="full")[: len(y)] / np.minimum(np.arange(1, len(y) + 1), w) * w
    first, last = y[:w].mean(), y[-w:].mean()
    n_fit = max(2, math.ceil(0.1 * len(y)))
    return {"t90": int(steps[np.argmax(smoothed <= first - 0.9 * (first - last))]),
            "auc": float(np.trapezoid(y, steps) / (len(y) - 1)),
            "slope": float(np.polyfit(steps[:n_fit], y[:n_fit], 1)[0]), "final_loss": float(last)}


# %%
# six steps: w = 1, the raw curve; target 0.8 first reached at step 6
curve = loss_curve_metrics([8.0, 6.0, 4.0, 2.0, 1.0, 0.0])
assert curve["t90"] == 6 and abs(curve["auc"] - (7 + 5 + 3 + 1.5 + 0.5) / 5) < 1e-12 and abs(curve["slope"] + 2) < 1e-9
line = loss_curve_metrics(3.0 - 0.25 * np.arange(40))  # 40 steps: the slope is fitted over the first 4
assert abs(line["slope"] + 0.25) < 1e-9 and abs(line["auc"] - (3.0 - 0.25 * 39 / 2)) < 1e-12
decay = loss_curve_metrics([4.0, 2.0, 1.0, 0.5, 0.5, 0.5])
assert decay["t90"] == 4 and abs(decay["slope"] + 2) < 1e-9

# %% [markdown]
# On a noisy curve the smoothed reading is stable where the raw one is not: a decay from 3 to 1 over
# 200 steps with mini-batch noise of 0.3. The raw reading's t90 is wherever one noisy batch first dips
# below the level, so it comes early (biased by tens of steps) and scatters widely, and its final loss
# is one batch; the smoothed t90 is unbiased with about half the scatter, and the final loss stays
# near the curve's end value.

# %%
_clean = 1 + 2 * np.exp(-np.arange(200) / 30)
_raw_t90, _t90, _final = [], [], []
for _seed in range(20):
    _noisy = _clean + 0.3 * np.random.default_rng(_seed).normal(size=200)
    _raw_t90.append(int(np.argmax(_noisy <= _noisy[0] - 0.9 * (_noisy[0] - _noisy[-1]))) + 1)
    _m = loss_curve_metrics(_noisy)
    _t90.append(_m["t90"]); _final.append(_m["final_loss"])
_clean_t90 = loss_curve_metrics(_clean, smooth_share=1 / 200)["t90"]
assert (np.std(_t90) < 0.6 * np.std(_raw_t90) and
        abs(np.mean(_t90) - _clean_t90) < 5 < 20 < abs(np.mean(_raw_t90) - _clean_t90))
assert abs(np.mean(_final) - _clean[-10:].mean()) < 0.05
print(f"t90 over 20 noise draws: raw {np.mean(_raw_t90):.0f} ± {np.std(_raw_t90):.0f}, "
      f"smoothed {np.mean(_t90):.0f} ± {np.std(_t90):.0f} (noise-free {_clean_t90})")

"""Property tests of the SMLMT episode sampler on random pools over a toy byte-level vocabulary."""
from dataclasses import fields

import torch
from hypothesis import given, settings, strategies as st

from picomaml.config import SMLMTConfig
from picomaml.smlmt import Episode, EpisodeError, build_episode, candidate_mask, episode_problems

TOKENS = ["<|padding|>", "<|endoftext|>", "Ġthe", "Ġcat", "Ġdog", "Ġrun", "ning", ",", ".", "Ġox",
          "Ġmat", "Ġsun", "Ġ42", "Ġsky", "Ġbird", "Ġfish", "Ġtree", "s"]
WORD_START = torch.tensor([t.startswith("Ġ") or not t.isalpha() for t in TOKENS])
ALPHA_LEN = torch.tensor([len(t.lstrip("Ġ")) if t.lstrip("Ġ").isalpha() else 0 for t in TOKENS])
SPECIAL, MASK = [0, 1], 99


def reference_candidates(pool, min_chars, exclude_top):
    "Per-token Python reading of the eligibility rules, to compare the vectorised mask with."
    counts = torch.bincount(pool.flatten(), minlength=len(TOKENS)).tolist()
    top = set(sorted(range(len(TOKENS)), key=lambda i: (-counts[i], i))[:exclude_top])
    out = torch.zeros_like(pool, dtype=torch.bool)
    for r, row in enumerate(pool.tolist()):
        for c, (tok, nxt) in enumerate(zip(row, row[1:])):
            text, after = TOKENS[tok], TOKENS[nxt]
            whole = after.startswith("Ġ") or not after.lstrip("Ġ").isalpha() or nxt in SPECIAL
            out[r, c] = (text.startswith("Ġ") and text[1:].isalpha() and len(text) - 1 >= min_chars
                         and tok not in SPECIAL and tok not in top and whole)
    return out


pools = st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1)).map(
    lambda s: torch.randint(0, len(TOKENS), s[:2], generator=torch.Generator().manual_seed(s[2])))
configs = st.builds(SMLMTConfig, n_way=st.integers(1, 4), k_shot=st.integers(1, 3), q_query=st.integers(1, 3),
                    window=st.integers(1, 8), readout=st.sampled_from(["last", "mask"]),
                    min_word_chars=st.integers(1, 4), exclude_top=st.integers(0, 4))


@settings(max_examples=150, deadline=None)
@given(pool=pools, min_chars=st.integers(1, 4), exclude_top=st.integers(0, 4))
def test_candidate_mask_matches_the_rules(pool, min_chars, exclude_top):
    got = candidate_mask(pool, WORD_START, ALPHA_LEN, SPECIAL, min_chars, exclude_top)
    assert torch.equal(got, reference_candidates(pool, min_chars, exclude_top))


@settings(max_examples=200, deadline=None)
@given(pool=pools, cfg=configs, seed=st.integers(0, 1000), step=st.integers(0, 1000))
def test_episode_invariants_or_clear_error(pool, cfg, seed, step):
    if pool.shape[1] < cfg.window:
        try: build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed, step)
        except EpisodeError as e: assert "smlmt.window" in str(e) and "data.seq_len" in str(e); return
        raise AssertionError("rows shorter than the window were accepted")
    need = cfg.k_shot + cfg.q_query
    cand = reference_candidates(pool, cfg.min_word_chars, cfg.exclude_top)
    frequent_words = int((torch.bincount(pool[cand], minlength=len(TOKENS)) >= need).sum())
    try:
        ep = build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed, step)
    except EpisodeError as e:
        R, L = pool.shape
        assert f"{R} x {L} = {R * L:,} tokens" in str(e) and f"smlmt.n_way = {cfg.n_way}" in str(e)
        return
    assert frequent_words >= cfg.n_way  # an episode never appears from too few eligible words
    assert episode_problems(ep, pool, cfg, MASK) == []
    every = torch.cat([ep.support_pos, ep.query_pos])
    assert bool(cand[every[:, 0], every[:, 1]].all())  # every masked occurrence is an eligible one
    again = build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed, step)
    assert all(torch.equal(getattr(ep, f.name), getattr(again, f.name)) for f in fields(Episode))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_steps_give_different_episodes(seed):
    pool = torch.randint(0, len(TOKENS), (8, 60), generator=torch.Generator().manual_seed(seed))
    pool[pool == 0] = 2
    cfg = SMLMTConfig(n_way=3, k_shot=2, q_query=1, window=4, exclude_top=1)
    eps = [build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed, step) for step in range(4)]
    keys = {(tuple(e.class_ids.tolist()), tuple(map(tuple, e.support_pos.tolist()))) for e in eps}
    assert len(keys) > 1

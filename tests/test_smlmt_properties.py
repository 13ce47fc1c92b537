"""Property tests of the SMLMT episode sampler: random pools over a toy byte-level vocabulary and real C4/Dolma rows."""
import os
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picomaml.config import PRESETS_DIR, DataConfig, SMLMTConfig, load_config
from picomaml.smlmt import Episode, EpisodeError, build_episode, candidate_mask, episode_problems
from picomaml.tokenizer import APOSTROPHES

TOKENS = ["<|padding|>", "<|endoftext|>", "Ġthe", "Ġcat", "Ġdog", "Ġrun", "ning", ",", ".", "Ġox",
          "Ġmat", "Ġsun", "Ġ42", "Ġsky", "Ġbird", "Ġfish", "Ġtree", "s", "'t", "'", "6", "',"]
# A boundary lies before whitespace-led tokens, specials and punctuation that does not start with an apostrophe.
WORD_START = torch.tensor([t.startswith(("Ġ", "<|")) or not (any(c.isalnum() for c in t) or t.startswith("'"))
                           for t in TOKENS])
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
            # the next token continues the word: letters, digits ("Fox6") or an apostrophe clitic ("won't", "won ' t")
            glued = not after.startswith("Ġ") and nxt not in SPECIAL and (after[0].isalnum() or after[0] == "'")
            whole = not glued
            out[r, c] = (text.startswith("Ġ") and text[1:].isalpha() and len(text) - 1 >= min_chars
                         and tok not in SPECIAL and tok not in top and whole)
    return out


pools = st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1)).map(
    lambda s: torch.randint(0, len(TOKENS), s[:2], generator=torch.Generator().manual_seed(s[2])))
configs = st.builds(SMLMTConfig, n_way=st.integers(2, 4), k_shot=st.integers(1, 3), q_query=st.integers(1, 3),
                    window=st.integers(2, 8), readout=st.sampled_from(["last", "mask"]),
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
        try: build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed=seed, step=step)
        except EpisodeError as e: assert "smlmt.window" in str(e) and "data.seq_len" in str(e); return
        raise AssertionError("rows shorter than the window were accepted")
    need = cfg.k_shot + cfg.q_query
    cand = reference_candidates(pool, cfg.min_word_chars, cfg.exclude_top)
    frequent_words = int((torch.bincount(pool[cand], minlength=len(TOKENS)) >= need).sum())
    try:
        ep = build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed=seed, step=step)
    except EpisodeError as e:
        R, L = pool.shape
        assert f"{R} x {L} = {R * L:,} tokens" in str(e) and f"smlmt.n_way = {cfg.n_way}" in str(e)
        return
    assert frequent_words >= cfg.n_way  # an episode never appears from too few eligible words
    assert episode_problems(ep, pool, cfg, MASK) == []
    every = torch.cat([ep.support_pos, ep.query_pos])
    assert bool(cand[every[:, 0], every[:, 1]].all())  # every masked occurrence is an eligible one
    again = build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed=seed, step=step)
    assert all(torch.equal(getattr(ep, f.name), getattr(again, f.name)) for f in fields(Episode))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_steps_give_different_episodes(seed):
    pool = torch.randint(0, len(TOKENS), (8, 60), generator=torch.Generator().manual_seed(seed))
    pool[pool == 0] = 2
    cfg = SMLMTConfig(n_way=3, k_shot=2, q_query=1, window=4, exclude_top=1)
    eps = [build_episode(pool, cfg, WORD_START, ALPHA_LEN, SPECIAL, MASK, seed=seed, step=step) for step in range(4)]
    keys = {(tuple(e.class_ids.tolist()), tuple(map(tuple, e.support_pos.tolist()))) for e in eps}
    assert len(keys) > 1


# Real rows: the local C4 and Dolma (Common Crawl) samples, prepared as `make demo` prepares them, in
# pools of the demo's size (512 rows of 129 ids) with the demo's 32-way 4+4-shot settings.
SHARED = Path(os.environ.get("PICOMAML_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
real_data = pytest.mark.skipif(not (SHARED / "tokenizer" / "olmo-7b-0724-tokenizer.json").is_file(),
                               reason=f"local data {SHARED} not found (set PICOMAML_DATA)")


class RealRows(SimpleNamespace):
    "The real-row fixture; a short repr keeps 50,280 token texts out of assertion messages."
    def __repr__(self): return f"RealRows({tuple(self.rows.shape)})"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    "Real rows (R, 129), the tokenizer with its decoded token texts and tables, and the demo's SMLMT settings."
    from picomaml.data import ShardRows, prepare
    from picomaml.tokenizer import load_tokenizer
    tok = load_tokenizer(DataConfig(tokenizer_path=str(SHARED / "tokenizer" / "olmo-7b-0724-tokenizer.json")))
    parts = []
    for name in ("c4-sample.00000-of-00001.json.gz", "cc_en_head-0091.jsonl.gz"):  # C4, and Dolma's Common Crawl
        out = tmp_path_factory.mktemp("rows")
        prepare(SHARED / "corpus" / "train" / name, out, 128, tok, max_documents=150, log=lambda m: None)
        shards = ShardRows(out, 129)
        parts.append(shards.rows(range(len(shards))))
    return RealRows(rows=torch.cat(parts).long(), tok=tok, texts=tok.token_texts(), ws=tok.word_start_table(),
                    al=tok.alpha_len_table(), cfg=load_config(PRESETS_DIR / "demo.yaml").smlmt)


def glued_to_next(texts, row, c):
    "row[c] is not a whole word: what follows continues it (letter, digit, byte piece) or is an apostrophe clitic."
    nxt = texts[row[c + 1]]
    if nxt[:1].isspace() or nxt == "<|endoftext|>": return False
    if nxt[:1].isalnum() or "\ufffd" in nxt: return True
    after = texts[row[c + 2]] if c + 2 < len(row) else ""
    return nxt[:1] in APOSTROPHES and (nxt[1:2].isalpha() or (nxt[1:] == "" and after[:1].isalpha()))  # 't, 's; ’ + t


@real_data
def test_real_rows_hold_what_the_rules_guard_against(real):
    assert len(real.rows) >= 512
    word = real.ws & (real.al >= real.cfg.min_word_chars)
    glued = [(r, c) for r, row in enumerate(real.rows.tolist()) for c in range(len(row) - 1)
             if word[row[c]] and glued_to_next(real.texts, row, c)]
    assert len(glued) > 100  # " won" + "’t", " She" + "'s", " Fox" + "6", ... occur: the tests below are not vacuous
    ep = build_episode(real.rows[:512], real.cfg, real.ws, real.al, [real.tok.eos_id], real.tok.mask_id, seed=0, step=0)
    ids = torch.cat([ep.support_ids, ep.query_ids])
    assert bool(((ids == real.tok.mask_id).sum(1) > 1).any())  # some windows hold their class word twice


@real_data
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 10**6), step=st.integers(0, 10**6))
def test_real_episodes_never_leak_and_never_split_a_word(real, offset, step):
    pool = real.rows.roll(offset % len(real.rows), 0)[:512]                      # (512, 129) a demo-sized pool
    ep = build_episode(pool, real.cfg, real.ws, real.al, [real.tok.eos_id], real.tok.mask_id, seed=0, step=step)
    assert episode_problems(ep, pool, real.cfg, real.tok.mask_id) == []
    for ids, labels in ((ep.support_ids, ep.support_labels), (ep.query_ids, ep.query_labels)):
        # leak rate 0: the answer is never in the window
        assert not bool((ids == ep.class_ids[labels][:, None]).any())
    split = [real.tok.decode(pool[r, c:c + 3]) for r, c in torch.cat([ep.support_pos, ep.query_pos]).tolist()
             if glued_to_next(real.texts, pool[r].tolist(), c)]
    assert split == []                                                         # no class word is a piece of "won't"


@real_data
def test_real_candidates_are_whole_words(real):
    for pool in real.rows.split(512):
        cand = candidate_mask(pool, real.ws, real.al, [real.tok.eos_id, 1, real.tok.mask_id], real.cfg.min_word_chars,
                              real.cfg.exclude_top)
        split = [real.tok.decode(pool[r, c:c + 3]) for r, c in cand.nonzero().tolist()
                 if glued_to_next(real.texts, pool[r].tolist(), c)]

        assert split == []

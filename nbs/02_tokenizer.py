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
# # Tokenizer
#
# > The OLMo tokenizer that Pico's pretokenized Dolma was made with, plus a `[MASK]` id that lives in
# > the padded embedding rows, and the two lookup tables the SMLMT sampler needs.
#
# Pico's data, the Dolma that paper 1 §3.3 trains on "already tokenised and chunked by Pico", is
# tokenized with `allenai/OLMo-7B-0724-hf`: a byte-level BPE with 50,280 ids, `<|endoftext|>` =
# 50,279 appended after every document. Pico pads the embedding to
# 50,304 rows, so ids 50,280–50,303 have no token; SMLMT episodes (paper 1 §3.2) put `[MASK]` at
# 50,280, the first free row, instead of resizing the vocabulary.

# %%
#| default_exp tokenizer

# %%
#| export
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from fastcore.basics import patch
from huggingface_hub import hf_hub_download
from tokenizers import Tokenizer

from picomaml.config import ConfigError, DataConfig, local_data_dir

# %%
import tempfile

SHARED_TOKENIZER = (Path(os.environ.get("PICOMAML_DATA", "/work/shared/data")) / "tokenizer"
                    / "olmo-7b-0724-tokenizer.json")

# %% [markdown]
# ## Where the tokenizer comes from
#
# The same `tokenizer.json` format from three places, first match wins:
# 1. `data.tokenizer_path` — a tokenizer.json, or a directory holding one (e.g. a downloaded Hub repo);
# 2. `$PICOMAML_DATA/tokenizer/olmo-7b-0724-tokenizer.json`, when the variable is set and the file exists;
# 3. the Hub repository `data.tokenizer_hub`.
#
# A local path is returned as a `Path`, a Hub repository id as a `str`. A path that was asked for but
# does not exist is an error, never a silent fall-through to the Hub.

# %%
#| export
LOCAL_TOKENIZER_NAME = "olmo-7b-0724-tokenizer.json"

def resolve_tokenizer_path(data_cfg: DataConfig) -> Path | str:
    "The local tokenizer.json to use (a Path), or the Hub repository id to download it from (a str)."
    if data_cfg.tokenizer_path:
        path = Path(data_cfg.tokenizer_path)
        if path.is_dir(): path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer_path: {path} does not exist; point it at a tokenizer.json "
                                    f"(or a directory with one), or leave it empty to use $PICOMAML_DATA or the Hub")
        return path
    if env := local_data_dir():
        path = env / "tokenizer" / LOCAL_TOKENIZER_NAME
        if path.is_file(): return path
    return data_cfg.tokenizer_hub


# %%
#| hide
from picomaml.devtools import raises

with tempfile.TemporaryDirectory() as tmp:
    saved = os.environ.pop("PICOMAML_DATA", None)
    try:
        assert resolve_tokenizer_path(DataConfig()) == "allenai/OLMo-7B-0724-hf"
        os.environ["PICOMAML_DATA"] = tmp  # set, but holds no tokenizer: still the Hub
        assert resolve_tokenizer_path(DataConfig()) == "allenai/OLMo-7B-0724-hf"
        os.environ["PICOMAML_DATA"] = str(SHARED_TOKENIZER.parent.parent)
        assert resolve_tokenizer_path(DataConfig()) == SHARED_TOKENIZER
        assert resolve_tokenizer_path(DataConfig(tokenizer_path=str(SHARED_TOKENIZER))) == SHARED_TOKENIZER
        raises(lambda: resolve_tokenizer_path(DataConfig(tokenizer_path=f"{tmp}/missing.json")),
               "missing.json", "data.tokenizer_path", kind=FileNotFoundError)
        raises(lambda: resolve_tokenizer_path(DataConfig(tokenizer_path=tmp)), f"{tmp}/tokenizer.json",
               kind=FileNotFoundError)
    finally:
        if saved is None: os.environ.pop("PICOMAML_DATA", None)
        else: os.environ["PICOMAML_DATA"] = saved


# %% [markdown]
# ## Text is text: special tokens only where the code puts them
#
# The `tokenizers` library turns the literal string `<|endoftext|>` inside a document into the EOS id.
# Document boundaries would then appear where a web page merely quotes the marker, and splitting a
# shard on EOS would no longer give back the documents. So we drop the two special tokens
# (`<|endoftext|>`, `<|padding|>`) from the tokenizer's added-token matcher: their ids stay in the
# vocabulary (and decode), but encoding text spells them out as ordinary bytes. The non-special added
# tokens (runs of spaces, Dolma's `|||EMAIL_ADDRESS|||` placeholders) are ordinary text and stay.
# `[MASK]` has no token at all, so the literal text `[MASK]` is just `[`, `MASK`, `]`.

# %%
#| export
def plain_text_tokenizer(tok: Tokenizer) -> Tokenizer:
    "A copy of `tok` whose special tokens are never produced from input text."
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["special"]]
    return Tokenizer.from_str(json.dumps(spec))


# %%
_raw = Tokenizer.from_file(str(SHARED_TOKENIZER))
_plain = plain_text_tokenizer(_raw)
assert _raw.encode("a<|endoftext|>b").ids == [66, 50279, 67]  # what we avoid
assert (50279 not in _plain.encode("a<|endoftext|>b").ids
        and _plain.decode(_plain.encode("a<|endoftext|>b").ids) == "a<|endoftext|>b")
assert _plain.encode("Hello  world").ids == _raw.encode("Hello  world").ids  # ordinary text unchanged


# %% [markdown]
# ## `PicoTokenizer`
#
# `encode` never adds BOS/EOS (the `prepare` step appends EOS itself) and never yields EOS, padding or
# `[MASK]`. `decode` renders `[MASK]` as the text `[MASK]` and EOS as `<|endoftext|>`; any other id
# without a token (50,281–50,303) is an error, since only `[MASK]` may occupy a padded row.

# %%
#| export
class PicoTokenizer:
    "The OLMo BPE tokenizer with a `[MASK]` id in the padded embedding rows."
    def __init__(self, tok: Tokenizer, eos_id: int = 50279, mask_id: int = 50280, source: str = ""):
        self.tok, self.source = plain_text_tokenizer(tok), source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)  # 50,280 real ids
        self.eos_id, self.mask_id = eos_id, mask_id
        if tok.id_to_token(eos_id) != "<|endoftext|>":
            raise ValueError(f"data.eos_id={eos_id} is {tok.id_to_token(eos_id)!r} in {source or 'the tokenizer'}, "
                             f"not '<|endoftext|>'")
        if mask_id < self.vocab_size:
            raise ValueError(f"data.mask_id={mask_id} is the real token {tok.id_to_token(mask_id)!r}; "
                             f"use a padded id >= {self.vocab_size} (50280 for Pico)")

    def encode(self, text: str) -> list[int]:
        "Token ids of `text`: no BOS/EOS added, special tokens never matched."
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        "`encode` of many texts at once (tokenized in parallel)."
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def id_to_token(self, i: int) -> str:
        "The vocabulary string of id `i` (byte-level: `Ġ` marks a leading space)."
        if i == self.mask_id: return "[MASK]"
        token = self.tok.id_to_token(i) if 0 <= i < self.vocab_size else None
        if token is None:
            raise ValueError(f"id {i} has no token (vocabulary 0..{self.vocab_size - 1}, [MASK] {self.mask_id})")
        return token

    def decode(self, ids) -> str:
        "Text of `ids`, with `[MASK]` shown as the text `[MASK]`."
        ids = [int(i) for i in ids]
        for i in ids:
            if i != self.mask_id: self.id_to_token(i)  # raises for ids without a token
        pieces, run = [], []
        for i in ids + [self.mask_id]:
            if i != self.mask_id: run.append(i); continue
            pieces.append(self.tok.decode(run, skip_special_tokens=False)); run = []
        return "[MASK]".join(pieces)

    def __repr__(self):
        return (f"PicoTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, mask_id={self.mask_id}, "
                f"source={self.source!r})")


# %%
tokenizer = PicoTokenizer(Tokenizer.from_file(str(SHARED_TOKENIZER)), source=str(SHARED_TOKENIZER))
assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.mask_id) == (50280, 50279, 50280)
samples = ["Hello world", "héllo\n\n  wörld\t日本語 🙂", " leading and trailing ", "line1\r\nline2\n", "",
           "literal [MASK] and <|endoftext|> and <|padding|>", "|||EMAIL_ADDRESS||| a" + " " * 30 + "b"]
for text in samples:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text, (text, tokenizer.decode(ids))
    assert not {tokenizer.eos_id, tokenizer.mask_id, 1} & set(ids), text
assert tokenizer.encode("Hello world") == [12092, 1533]
assert tokenizer.encode_batch(samples) == [tokenizer.encode(t) for t in samples]
hello, world = tokenizer.encode("Hello world")
assert tokenizer.decode([hello, tokenizer.mask_id, world]) == "Hello[MASK] world"
assert tokenizer.decode(torch.tensor([tokenizer.mask_id, tokenizer.eos_id])) == "[MASK]<|endoftext|>"
assert tokenizer.id_to_token(world) == "Ġworld" and tokenizer.id_to_token(tokenizer.mask_id) == "[MASK]"
raises(lambda: tokenizer.decode([50290]), "50290", kind=ValueError)
raises(lambda: PicoTokenizer(Tokenizer.from_file(str(SHARED_TOKENIZER)), mask_id=50279), "data.mask_id=50279",
       kind=ValueError)

# %% [markdown]
# Unicode text comes back exactly when it is already NFC: the tokenizer's normalizer composes
# characters (NFC), the only change a round trip can make.

# %%
import unicodedata

decomposed = "cafe\u0301"  # e + combining acute
assert tokenizer.decode(tokenizer.encode(decomposed)) == unicodedata.normalize("NFC", decomposed) == "caf\u00e9"


# %% [markdown]
# ## Loading
#
# `load_tokenizer` resolves the source, then reads a local file or downloads `tokenizer.json` from
# the Hub with `huggingface_hub` (cached; honours `HF_HUB_OFFLINE`, `HF_TOKEN`, `cache_dir`).

# %%
#| export
def load_tokenizer(data_cfg: DataConfig | None = None, cache_dir: str | None = None) -> PicoTokenizer:
    "The Pico tokenizer from `data.tokenizer_path`, `$PICOMAML_DATA` or the Hub (see `resolve_tokenizer_path`)."
    data_cfg = data_cfg or DataConfig()
    source = resolve_tokenizer_path(data_cfg)
    if isinstance(source, str):
        try: path = hf_hub_download(source, "tokenizer.json", cache_dir=cache_dir)
        except Exception as e:  # offline, unreachable, gated: say where else a tokenizer could come from
            local = os.environ.get("PICOMAML_DATA")
            raise ConfigError(f"no tokenizer: data.tokenizer_path is empty, PICOMAML_DATA={local or '(unset)'} has no "
                              f"tokenizer/{LOCAL_TOKENIZER_NAME}, and the Hub's {source} could not be fetched "
                              f"({type(e).__name__}); "
                              f"set data.tokenizer_path or PICOMAML_DATA, or allow Hub access") from None
    else:
        path = source
    try: tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a tokenizers tokenizer.json ({e}); check data.tokenizer_path") from e
    return PicoTokenizer(tok, eos_id=data_cfg.eos_id, mask_id=data_cfg.mask_id, source=str(path))


# %%
tokenizer = load_tokenizer(DataConfig(tokenizer_path=str(SHARED_TOKENIZER)))
assert tokenizer.encode("Hello world") == [12092, 1533]
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "tokenizer.json").write_text("{not json")
    raises(lambda: load_tokenizer(DataConfig(tokenizer_path=tmp)), f"{tmp}/tokenizer.json", kind=ValueError)

# %% [markdown]
# The Hub path is tested offline: a Hub cache directory laid out as `huggingface_hub` writes it
# (`models--allenai--OLMo-7B-0724-hf/{refs/main, snapshots/<commit>/tokenizer.json}`) stands in for
# the network, so the real `hf_hub_download` call resolves the file.

# %%
with tempfile.TemporaryDirectory() as cache:
    commit = "0" * 40
    repo_dir = Path(cache) / "models--allenai--OLMo-7B-0724-hf"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "snapshots" / commit / "tokenizer.json").write_bytes(SHARED_TOKENIZER.read_bytes())
    saved = os.environ.pop("PICOMAML_DATA", None)
    try: hub_tokenizer = load_tokenizer(DataConfig(), cache_dir=cache)
    finally:
        if saved is not None: os.environ["PICOMAML_DATA"] = saved
    assert hub_tokenizer.source.startswith(cache) and hub_tokenizer.encode("Hello world") == [12092, 1533]


# %% [markdown]
# ## Tables for the SMLMT sampler
#
# SMLMT classes are whole words that are a single token (Bansal et al. 2020 mask whole words; paper 1
# §3.2): the token begins a word and a word boundary lies right after it. `word_start_table()[i]` is
# True when a word boundary lies *before* token `i`, whatever precedes it: its text starts with
# whitespace (byte-level `Ġ` = space, `Ċ` = newline, runs of spaces, tabs), or it is an added/special
# token (EOS, padding, Dolma's `|||…|||` placeholders), or it is punctuation that cannot be glued to
# the word before it. A token glued to the previous word is never a boundary:
#
# - a letter or digit without leading whitespace continues the word (`lob`+`ster`, `Fox`+`6`);
# - a piece of a multi-byte character (its text decodes to U+FFFD) continues it (`日本`+`語` in bytes);
# - a token that begins with an apostrophe — `'s`, `'t`, `'re`, a bare `'` or `’`, `',` — is a clitic
#   or may be one. The OLMo pre-tokenizer splits `"won’t"` into `won`, `’`, `t` and `"She's"` into
#   `She`, `'s`, so `won` and `She` are no whole words. A bare apostrophe also closes plural
#   possessives and single quotes (`dogs’ bowls`); one token cannot tell these apart, and we give up
#   those few occurrences (0.07 % of the class candidates on the local C4 and Dolma rows, against
#   1.0 % that were clitics) rather than let a clitic through. `APOSTROPHES` lists the characters that
#   C4 and Dolma use as apostrophes (ASCII, typographic ’ and ‘, ʼ, backtick, acute accent, prime).
#
# So in `"John's"` and `"Fox6"` the word is not whole, while in `"end."` and `"cat-like"` the `.` and
# `-` start something new. `alpha_len_table()[i]` is the character count of the token's word text
# (one leading space removed) when it is purely alphabetic, else 0; the sampler compares it with
# `smlmt.min_word_chars`.

# %%
#| export
@patch
def token_texts(self: PicoTokenizer) -> list[str]:
    "The decoded text of every real id (bytes that are not whole UTF-8 characters become U+FFFD)."
    return self.tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)

APOSTROPHES = "'\u2019\u2018\u02bc`\u00b4\u2032"  # ' ’ ‘ ʼ ` ´ ′: all written as apostrophes in web text

@patch
def word_start_table(self: PicoTokenizer) -> torch.Tensor:
    "(V,) bool: True where a word boundary lies before the token (leading whitespace, special, or unglued punctuation)."
    added = {t.content for t in self.tok.get_added_tokens_decoder().values()} | {"<|endoftext|>", "<|padding|>"}
    glued = lambda text: (any(c.isalnum() for c in text) or "\ufffd" in text  # continues a word or a character
                          or text.startswith(tuple(APOSTROPHES)))              # a clitic, or may be one
    starts = [text[:1].isspace() or self.tok.id_to_token(i) in added or not glued(text)
              for i, text in enumerate(self.token_texts())]
    return torch.tensor(starts, dtype=torch.bool)  # (V,)

@patch
def alpha_len_table(self: PicoTokenizer) -> torch.Tensor:
    "(V,) long: characters of the token's word text when purely alphabetic, else 0."
    words = [text[1:] if text.startswith(" ") else text for text in self.token_texts()]
    return torch.tensor([len(w) if w.isalpha() else 0 for w in words], dtype=torch.long)  # (V,)


# %%
word_start, alpha_len = tokenizer.word_start_table(), tokenizer.alpha_len_table()
assert (word_start.shape == alpha_len.shape == (50280,) and word_start.dtype == torch.bool
        and alpha_len.dtype == torch.long)
ids = tokenizer.encode("The Paris lobster's claws, end.\nNew")
table = {tokenizer.id_to_token(i): (bool(word_start[i]), int(alpha_len[i])) for i in ids}
assert table["The"] == (False, 3)       # first word of a text: no leading space, so not a word start
assert table["ĠParis"] == (True, 5)
assert table["Ġlob"] == (True, 3) and table["ster"] == (False, 4)  # a two-token word: "ster" continues it
assert table["'s"] == (False, 0)        # continues "lobster"
assert table[","] == (True, 0) and table["."] == (True, 0) and table["Ċ"] == (True, 0)
starts_of = lambda text: [(tokenizer.id_to_token(i), bool(word_start[i])) for i in tokenizer.encode(text)]
assert starts_of(" won’t She's Fox6") == [("Ġwon", True), ("âĢĻ", False), ("t", False), ("ĠShe", True), ("'s", False),
                                         ("ĠFox", True), ("6", False)]   # âĢĻ is ’ in byte-level spelling
assert starts_of(" dogs' bowls 'cat', cat-like") == [("Ġdogs", True), ("'", False), ("Ġbowls", True), ("Ġ'", True),
                                                     ("cat", False), ("',", False), ("Ġcat", True), ("-", True),
                                                     ("like", False)]

assert [ok for _, ok in starts_of("日本語")] == [False, False, False]  # 日本 + two byte pieces of 語 (U+FFFD alone)
assert all(not word_start[i] for i, t in enumerate(tokenizer.token_texts()) if t.startswith(tuple(APOSTROPHES)))
for special in (tokenizer.eos_id, 1, 0):  # <|endoftext|>, <|padding|>, |||IP_ADDRESS|||
    assert word_start[special] and alpha_len[special] == 0
assert alpha_len[tokenizer.encode(" café")[0]] == 4 and alpha_len[tokenizer.encode(" 2019")[0]] == 0
print(f"{int(word_start.sum())} of {len(word_start)} ids begin a word; {int((alpha_len > 0).sum())} are alphabetic")

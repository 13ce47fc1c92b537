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
# # Universal NER data
#
# > Reading UNER v1 IOB2 files, aligning words to OLMo sub-tokens, and the data-level analyses of paper 2.
#
# Both papers finetune on Universal NER v1 (Mayhew et al. 2024; paper 1 §3.4 and §5,
# paper 2 §2.5 and App. D). This notebook turns the 18 UNER datasets into windows of sub-token ids
# whose first sub-token per word carries the word's tag, and computes the statistics of paper 2's
# Tables 4 and 5 (span statistics, particle recall, OOV rate).

# %%
#| default_exp ner_data

# %%
#| export
from __future__ import annotations

import functools
import math
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from picomaml.config import NERConfig, local_data_dir
from picomaml.names import CEBUANO, ENTITY_TYPES, IN_LANGUAGE, PUD, TAGALOG, TEST_SETS

# %% [markdown]
# ## Labels and dataset groups
#
# UNER's released label set has seven tags: O and B-/I- of PER, ORG and LOC (Mayhew et al., 2024). Two
# training sets (hr_set, sr_set) still carry OTH, and a few files contain stray `B-O`/`I-O`; both
# become O, as in the released data. The datasets fall into three groups (paper 1 §3.4 and App. B; their names live in
# `picomaml.names`): nine
# in-language sets with train/dev/test, six Parallel UD test sets and three Philippine test sets.
# `all` is the nine training sets together.

# %%
#| export
LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
LABEL2ID = {tag: i for i, tag in enumerate(LABELS)}
IGNORE_INDEX = -100  # label of non-first sub-tokens: cross-entropy and the metrics skip it
TO_O = {"B-OTH", "I-OTH", "B-O", "I-O"}

SPLITS = ("train", "dev", "test")

# %%
assert len(LABELS) == 7 and len(TEST_SETS) == 18 and LABEL2ID["I-LOC"] == 6


# %% [markdown]
# ## Reading one IOB2 file
#
# A file holds sentences separated by blank lines; lines starting with `#` are comments
# (`# sent_id = …`, `# text = …`); token lines have five tab-separated columns
# `index token tag xner annotator`. We keep the token and the (normalised) tag, and the file and
# line of the sentence so any later problem can point back at its source. Anything else (a wrong
# column count, an unknown tag, an empty token) is an error naming the file and line.
#
# A missing blank line would silently merge two sentences, so the reader checks what a merge leaves
# behind: token indices must count 1, 2, … within a sentence, no comment may follow a sentence's
# tokens, and a sentence has at most one `# sent_id` and one `# text`. The file must be UTF-8 (a
# leading byte-order mark, as some editors write, is dropped); other bytes are an error naming the
# line and byte offset.

# %%
#| export
class UNERFormatError(ValueError):
    "A UNER file that cannot be read; the message names the file, the line and what is wrong."

@dataclass
class Sentence:
    "One sentence: its words, their IOB2 tags (7-label set) and where it came from."
    words: list[str]
    tags: list[str]
    source: str = ""

def normalise_tag(tag: str, where: str) -> str:
    "Map OTH and stray B-O/I-O to O; reject any tag outside the 7-label set."
    if tag in TO_O: return "O"
    if tag not in LABEL2ID:
        raise UNERFormatError(f"{where}: tag {tag!r} is not one of {', '.join(LABELS)} (or OTH, mapped to O)")
    return tag


# %%
from picomaml.devtools import raises

assert (normalise_tag("B-OTH", "x") == "O" and normalise_tag("I-O", "x") == "O" and
        normalise_tag("B-PER", "x") == "B-PER")
raises(lambda: normalise_tag("B-MISC", "f.iob2:3"), "f.iob2:3", "B-MISC", kind=UNERFormatError)

# %%
#| export
SENTENCE_KEYS = ("sent_id", "text")  # one of each per sentence: a second one means a blank line is missing

def check_comment(line: str, name: str, n: int, seen: dict, sentence_start: int) -> None:
    ("Reject comment line `n` of file `name` if it follows a sentence's tokens or repeats its `sent_id`/`text`: "
     "a blank line is missing.")
    if sentence_start:
        raise UNERFormatError(f"{name}:{n}: comment {line[:40]!r} follows the tokens of the sentence at line "
                              f"{sentence_start}; add the blank line that separates sentences before it")
    key = line[1:].split("=", 1)[0].strip()
    if key in SENTENCE_KEYS and key in seen:
        raise UNERFormatError(f"{name}:{n}: second '# {key}' before this sentence's tokens (first at line "
                              f"{seen[key]}); give the sentence at line {seen[key]} its tokens or delete it")
    seen[key] = n

def parse_token_line(line: str, where: str, index: int, sentence_start: int) -> tuple[str, str]:
    "Word and normalised tag of a token line at `where`, which must be token `index` of its sentence."
    cols = line.split("\t")
    if len(cols) != 5:
        raise UNERFormatError(f"{where}: expected 5 tab-separated columns (index token tag xner annotator), "
                              f"got {len(cols)}: {line!r}")
    if cols[0] != str(index):
        raise UNERFormatError(f"{where}: token index {cols[0]!r} where {index} was expected in the sentence at line "
                              f"{sentence_start}; "
                              "add the blank line that ends the previous sentence, or number the tokens 1, 2, ...")
    if not cols[1].strip(): raise UNERFormatError(f"{where}: empty token in column 2; every token line needs its word")
    return cols[1], normalise_tag(cols[2], where)

def iob2_tags(tags: list[str]) -> tuple[list[str], list[int]]:
    "A sentence's IOB2 tags: an I-X starting an entity (first, after O or another type) becomes B-X; those positions."
    fixed, changed = [], []
    for i, tag in enumerate(tags):
        if tag.startswith("I-") and (i == 0 or fixed[-1][2:] != tag[2:]):
            tag = "B-" + tag[2:]
            changed.append(i)
        fixed.append(tag)
    return fixed, changed

def iob2_sentences(sentences: list[Sentence], name: str) -> list[Sentence]:
    "The sentences of `name` with IOB1-style entity starts converted to IOB2, and a warning naming the first if any."
    converted, first, count = [], None, 0
    for s in sentences:
        tags, changed = iob2_tags(s.tags)
        if changed and first is None: first = f"{s.source}, word {changed[0] + 1}"
        count += len(changed)
        converted.append(Sentence(s.words, tags, s.source))
    if count: warnings.warn(f"{name}: {count} entities start with I- (IOB1 style; the first in the sentence at "
                            f"{first}): read as B-, "
                            f"the IOB2 start of an entity, as seqeval's IOB2 conversion does", stacklevel=2)
    return converted

def parse_iob2_lines(lines: Sequence[str], name: str) -> list[Sentence]:
    "Parse the lines of UNER IOB2 file `name` into sentences (IOB1-style entity starts converted, with a warning)."
    sentences, words, tags, start, seen = [], [], [], 0, {}
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            if words: sentences.append(Sentence(words, tags, f"{name}:{start}"))
            words, tags, seen = [], [], {}
        elif line.startswith("#"): check_comment(line, name, n, seen, start if words else 0)
        else:
            if not words: start = n
            word, tag = parse_token_line(line, f"{name}:{n}", len(words) + 1, start)
            words.append(word)
            tags.append(tag)
    if words: sentences.append(Sentence(words, tags, f"{name}:{start}"))
    return iob2_sentences(sentences, name)

def decode_utf8(data: bytes, name: str) -> str:
    "The text of file `name` from UTF-8 bytes, minus a leading BOM; other bytes are an error naming line and offset."
    try: text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise UNERFormatError(f"{name}:{line}: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                              f"(column {column}) is not UTF-8; "
                              "re-encode the file as UTF-8, e.g. iconv -f <its encoding> -t UTF-8") from None
    return text.removeprefix("\ufeff")

def read_iob2(path) -> list[Sentence]:
    "Read one UNER IOB2 file."
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"UNER file {path} does not exist")
    return list(parse_iob2_bytes(path.read_bytes(), str(path)))

# a sweep reads each training set again inside `all`, and a grid's plan every split: parse each content once
@functools.lru_cache(maxsize=64)
def parse_iob2_bytes(data: bytes, name: str) -> tuple[Sentence, ...]:
    "The sentences of the bytes of IOB2 file `name` (cached by content and name, so a rewritten file is parsed anew)."
    # split on "\n" only: str.splitlines also breaks at \x85, \u2028, ... and would misnumber lines
    return tuple(parse_iob2_lines(decode_utf8(data, name).split("\n"), name))


# %% [markdown]
# A hand-made file with comments, a blank line at the end, an OTH tag and a sentence without a
# trailing blank line parses into two sentences; each broken variant names its line.

# %%
toy = """# sent_id = 1
# text = Peter went to Nitra .
1\tPeter\tB-PER\t-\t-
2\twent\tO\t-\t-
3\tto\tO\t-\t-
4\tNitra\tB-LOC\t-\t-
5\t.\tO\t-\t-

# sent_id = 2
1\tSlovnaft\tB-OTH\t-\t-
2\tsi\tO\t-\t-""".splitlines()
sents = parse_iob2_lines(toy, "toy.iob2")
assert [s.words for s in sents] == [["Peter", "went", "to", "Nitra", "."], ["Slovnaft", "si"]]
assert sents[0].tags == ["B-PER", "O", "O", "B-LOC", "O"] and sents[1].tags == ["O", "O"]
assert sents[0].source == "toy.iob2:3" and sents[1].source == "toy.iob2:10"
for line_no, bad, msg in [(4, "2\twent\tO\t-", "5 tab-separated"), (5, "3\tto\tB-MISC\t-\t-", "B-MISC")]:
    broken = toy[:line_no - 1] + [bad] + toy[line_no:]
    e = raises(lambda: parse_iob2_lines(broken, "toy.iob2"), kind=UNERFormatError)
    assert f"toy.iob2:{line_no}:" in str(e) and msg in str(e), e

# %% [markdown]
# Some UNER files (12 tags in `da_ddt`, `hr_set` and `sr_set`) start an entity with `I-`, as the
# older IOB1 scheme does; the 7-label set is IOB2, where every entity starts with `B-`. Read as
# seqeval reads IOB1: an `I-X` that follows `O` or another type, or opens the sentence, starts an
# entity, so it becomes `B-X`; a continuation `I-X` after `B-X` or `I-X` stays. The file (or Hub
# split) is named once, with the count and the first place; the Hub's copy is converted the same way.

# %%
assert iob2_tags(["I-PER", "I-PER", "O", "I-LOC", "B-ORG", "I-LOC"]) == (
    ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "B-LOC"], [0, 3, 5])
with warnings.catch_warnings(record=True) as _caught:
    warnings.simplefilter("always")
    _iob1 = parse_iob2_lines(toy[:5] + ["4\tNitra\tI-LOC\t-\t-"] + toy[6:], "iob1.iob2")
assert _iob1[0].tags == sents[0].tags and len(_caught) == 1
assert ("iob1.iob2: 1 entities start with I- (IOB1 style; the first in the sentence at iob1.iob2:3, word 4): "
        "read as B-" in str(_caught[0].message))

# %% [markdown]
# The same through a real file on disk: the error names the path and the line.

# %%
import codecs
import tempfile

with tempfile.TemporaryDirectory() as tmp:
    bad = Path(tmp) / "bad-ud-test.iob2"
    bad.write_text("\n".join(toy[:6] + ["5\t.\tO"]) + "\n")
    raises(lambda: read_iob2(bad), f"{bad}:7:", kind=UNERFormatError)

# %% [markdown]
# Each way a file can be broken, as a file on disk: the error is a `UNERFormatError` whose one-line
# message starts with `<file>:<line>:` and says what is wrong. The first three are the same toy file
# with the blank line between its sentences lost (so its second sentence opens with `# sent_id`,
# with `# text`, or with no comment at all); `š` in Windows-1250 is the byte 0x9a.

# %%
good = "\n".join(toy) + "\n"
cp1250 = good.encode().replace(b"\tNitra\t", "\tKošice\t".encode("cp1250"))  # the token on line 6, not the # text
bad_files = [  # file name, content, line the error names, words it must contain
    ("merged", toy[:7] + toy[8:], 8, "follows the tokens of the sentence at line 3"),
    ("merged-text", toy[:7] + ["# text = Slovnaft si"] + toy[9:], 8, "follows the tokens of the sentence at line 3"),
    ("merged-bare", toy[:7] + toy[9:], 8, "token index '1' where 6 was expected"),
    ("two-sent-ids", ["# sent_id = 0"] + toy, 2, "second '# sent_id' before this sentence's tokens (first at line 1)"),
    ("two-texts", toy[:2] + ["# text = again"] + toy[2:], 3, "second '# text'"),
    ("renumbered", toy[:3] + ["3\twent\tO\t-\t-"] + toy[4:], 4, "token index '3' where 2 was expected"),
    ("columns", toy[:5] + ["4\tNitra\tB-LOC"] + toy[6:], 6, "expected 5 tab-separated columns"),
    ("tag", toy[:5] + ["4\tNitra\tB-GPE\t-\t-"] + toy[6:], 6, "tag 'B-GPE'"),
    ("empty-token", toy[:5] + ["4\t \tB-LOC\t-\t-"] + toy[6:], 6, "empty token"),
    ("cp1250", cp1250, 6, f"byte 0x9a at byte offset {cp1250.index(bytes([0x9a]))} (column 5) is not UTF-8"),
    ("bom-cp1250", codecs.BOM_UTF8 + cp1250, 6, f"byte offset {3 + cp1250.index(bytes([0x9a]))}"),
]
with tempfile.TemporaryDirectory() as tmp:
    for stem, content, line_no, words in bad_files:
        path = Path(tmp) / f"{stem}-ud-test.iob2"
        path.write_bytes(content if isinstance(content, bytes) else ("\n".join(content) + "\n").encode())
        e = raises(lambda: read_iob2(path), words, kind=UNERFormatError)
        assert type(e) is UNERFormatError and str(e).startswith(f"{path}:{line_no}: ") and "\n" not in str(e), (stem, e)

# %% [markdown]
# A UTF-8 byte-order mark at the start (and Windows line ends) read like the plain file.

# %%
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "bom-ud-test.iob2"
    path.write_bytes(codecs.BOM_UTF8 + good.replace("\n", "\r\n").encode())
    assert read_iob2(path) == parse_iob2_lines(toy, str(path))

# %% [markdown]
# A file is parsed once per process while its bytes stay the same (`all` reads every training set a
# second time); new bytes at the same path are parsed anew, and callers get their own list.

# %%
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "cached-ud-test.iob2"
    path.write_text(good)
    first, parses = read_iob2(path), parse_iob2_bytes.cache_info().misses
    again = read_iob2(path)
    assert again == first and again is not first and parse_iob2_bytes.cache_info().misses == parses
    path.write_text(good.replace("Peter", "Petra"))
    assert read_iob2(path)[0].words[0] == "Petra" and parse_iob2_bytes.cache_info().misses == parses + 1


# %% [markdown]
# ## Where the data comes from
#
# `NERConfig.data_path` if set, else `$PICOMAML_DATA/uner` if that directory exists, else the Hub
# dataset `NERConfig.data_hub` (`universalner/universal_ner`, one configuration per dataset, splits
# train/validation/test, `ner_tags` as class ids). A local directory has the layout of the UNER
# GitHub repositories: `<dataset>/<dataset>-ud-<split>.iob2`.

# %%
#| export
def uner_source(cfg: NERConfig) -> Path | str:
    "The local UNER directory to read, or the Hub dataset id when there is none."
    if cfg.data_path:
        path = Path(cfg.data_path)
        if not path.is_dir(): raise FileNotFoundError(f"ner.data_path={cfg.data_path!r} is not a directory; "
                                                      f"set it to a UNER directory or to '' for the Hub")
        return path
    env = local_data_dir()
    if env and (env / "uner").is_dir(): return env / "uner"
    return cfg.data_hub

def load_hub_split(hub_id: str, dataset: str, split: str) -> list[Sentence]:
    "One split of one dataset from the Hub (`datasets.load_dataset`), tags mapped to the 7-label set."
    import datasets  # deferred: a heavy import that only Hub loading needs
    where = f"{hub_id}[{dataset}/{split}]"
    # the except clause lists how datasets answers an empty or absent split, naming neither (a bare StopIteration when
    # it is the only split)
    try: ds = datasets.load_dataset(hub_id, dataset, split={"dev": "validation"}.get(split, split))
    except (ValueError, StopIteration, datasets.exceptions.DatasetGenerationError) as e:
        detail = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise UNERFormatError(f"{where}: datasets could not load this split ({detail}), as happens when it is empty or "
                              "absent; set ner.data_path to a local UNER copy or choose another dataset") from e
    names = ds.features["ner_tags"].feature.names
    return iob2_sentences([Sentence(list(r["tokens"]),
                                    [normalise_tag(names[t], f"{where} row {i}") for t in r["ner_tags"]],
                                    f"{where} row {i}") for i, r in enumerate(ds)], where)


# %%
#| export
def load_split(dataset: str, split: str, cfg: NERConfig) -> list[Sentence]:
    "Sentences of `dataset` (`all`: the nine training sets together) and `split` from the configured source."
    if split not in SPLITS: raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if dataset == "all": return [s for d in IN_LANGUAGE for s in load_split(d, split, cfg)]
    if dataset not in TEST_SETS:
        raise ValueError(f"unknown UNER dataset {dataset!r}; valid: all, {', '.join(TEST_SETS)}")
    if split != "test" and dataset not in IN_LANGUAGE:
        raise ValueError(f"{dataset} has only a test split (it is in the {'PUD' if dataset in PUD else 'other'} group)")
    source = uner_source(cfg)
    hub = isinstance(source, str)
    where = f"{source}[{dataset}/{split}]" if hub else source / dataset / f"{dataset}-ud-{split}.iob2"
    sentences = load_hub_split(source, dataset, split) if hub else read_iob2(where)
    # an empty split would only fail much later, deep in the finetuning loop, without naming the data
    if not sentences:
        raise UNERFormatError(f"{where}: UNER {dataset} {split} has no sentences (no token lines); "
                              f"restore it from a complete UNER copy or leave {dataset} out")
    return sentences


# %% [markdown]
# Our tests read the local copy (`$PICOMAML_DATA/uner`, which the Makefile points at `../shared/data`).
# The Tagalog TRG test set is the smallest file; all 18 test sets load and every tag is one of the seven.

# %%
import os

os.environ.setdefault("PICOMAML_DATA", str(Path("../../shared/data").resolve()))
ner_cfg = NERConfig()
assert uner_source(ner_cfg) == Path(os.environ["PICOMAML_DATA"]) / "uner"
tl = load_split("tl_trg", "test", ner_cfg)
assert len(tl) > 100 and tl[0].words == ["Gumising", "ang", "bata", "."]
tests = {d: load_split(d, "test", ner_cfg) for d in TEST_SETS}
assert all(set(t for s in v for t in s.tags) <= set(LABELS) for v in tests.values())
raises(lambda: load_split("tl_trg", "train", ner_cfg), "only a test split", kind=ValueError)
{d: len(v) for d, v in tests.items()}

# %% [markdown]
# An empty split is an error when it is loaded, naming the dataset, the split and the file, instead of
# an empty batch deep in the finetuning loop. The same holds on the Hub path: `datasets` answers an
# empty split with a bare `StopIteration` (when it is the config's only split) or
# `ValueError: Instruction "train" corresponds to no data!`, and an absent one with "Unknown split".
# A local directory laid out like a Hub dataset (`configs` in its README) shows both, offline.

# %%
from unittest import mock

with tempfile.TemporaryDirectory() as tmp:
    for content in ("", "# sent_id = 1\n# text = \n\n"):
        path = Path(tmp) / "uner" / "tl_trg" / "tl_trg-ud-test.iob2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        e = raises(lambda: load_split("tl_trg", "test", NERConfig(data_path=str(Path(tmp) / "uner"))),
                   kind=UNERFormatError)
        assert str(e).startswith(f"{path}: UNER tl_trg test has no sentences"), e

# %%
import datasets

readme = """---
configs:
- {config_name: tl_trg, data_files: [{split: test, path: tl_trg/test.jsonl}]}
- {config_name: sk_snk, data_files: [{split: test, path: sk_snk/test.jsonl}, {split: train, path: sk_snk/train.jsonl}]}
---
"""
files = {"README.md": readme, "tl_trg/test.jsonl": "", "sk_snk/train.jsonl": "",
         "sk_snk/test.jsonl": '{"tokens": ["Janko"], "ner_tags": [1]}\n'}
with tempfile.TemporaryDirectory() as tmp:
    hub = Path(tmp) / "hub"
    for name, text in files.items():
        (hub / name).parent.mkdir(parents=True, exist_ok=True)
        (hub / name).write_text(text)
    hub_cfg = NERConfig(data_hub=str(hub))
    with mock.patch.dict(os.environ, {"PICOMAML_DATA": tmp}), \
            mock.patch.object(datasets.config, "HF_DATASETS_CACHE", f"{tmp}/cache"):
        assert uner_source(hub_cfg) == str(hub)
        for dataset, split, cause in [("tl_trg", "test", "StopIteration"),
                                      ("sk_snk", "train", "corresponds to no data"),
                                      ("sk_snk", "dev", "Unknown split")]:
            e = raises(lambda: load_split(dataset, split, hub_cfg), kind=UNERFormatError)
            assert (str(e).startswith(f"{hub}[{dataset}/{split}]: datasets could not load this split")
                                                 and cause in str(e)), e
        # a split that datasets does return, but without rows
        no_rows = datasets.Dataset.from_dict({"tokens": [], "ner_tags": []}, features=datasets.Features(
            tokens=datasets.Sequence(datasets.Value("string")),
            ner_tags=datasets.Sequence(datasets.ClassLabel(names=list(LABELS)))))
        with mock.patch.object(datasets, "load_dataset", return_value=no_rows):
            e = raises(lambda: load_split("tl_trg", "test", hub_cfg), kind=UNERFormatError)
            assert str(e).startswith(f"{hub}[tl_trg/test]: UNER tl_trg test has no sentences"), e


# %% [markdown]
# ## Words to sub-tokens
#
# The Pico models read OLMo tokens, so each word is encoded separately and the **first sub-token of
# each word carries the word's tag**; the others get `IGNORE_INDEX` (the usual first-sub-token convention). Our choice for
# word boundaries: every word but the first is encoded with a leading space, as it would appear in
# running text (`" Bratislava"` → `ĠBr at isl ava`) — except words that start with a wide (CJK)
# character. Chinese is written without spaces, and a leading space would make every Chinese word's
# first sub-token the bare space `Ġ`, so the tagged position would carry no information about the
# word itself (the decoder is causal: a position sees only itself and its left context).

# %%
#| export
def spaced(word: str, first: bool) -> str:
    "The word as it is encoded: a leading space unless it opens the sentence or starts with a wide (CJK) character."
    if first or unicodedata.east_asian_width(word[0]) in ("W", "F"): return word
    return " " + word

def encode_words(words: Sequence[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    "Sub-token ids of every word (see `spaced`); a word that encodes to nothing is an error."
    pieces = [list(encode(spaced(w, i == 0))) for i, w in enumerate(words)]
    for w, p in zip(words, pieces):
        if not p: raise ValueError(f"word {w!r} encodes to no sub-tokens")
    return pieces


# %% [markdown]
# The tokenizer is the OLMo tokenizer of `picomaml.tokenizer` (`data.tokenizer_path`, `$PICOMAML_DATA`
# or the Hub); anything with `.encode(text) -> ids` works, so tests can also use a toy encoder.

# %%
from picomaml.config import DataConfig
from picomaml.tokenizer import load_tokenizer

encode = load_tokenizer(DataConfig()).encode
pieces = encode_words(["Peter", "went", "to", "Bratislava"], encode)
assert pieces[0] == encode("Peter") and pieces[3] == encode(" Bratislava") and len(pieces[3]) == 4
assert encode_words(["在", "北京"], encode)[1] == encode("北京") and encode("北京")[0] != encode(" ")[0]
assert encode_words(["在", "Apple"], encode)[1] == encode(" Apple")


# %% [markdown]
# ## Windows: never truncate
#
# A sentence whose sub-tokens exceed the context (`NERConfig.max_len`) is split into windows at
# word boundaries: words are packed greedily, so a window holds as many whole words as fit. Each
# window remembers its sentence and the index of its first word, so word-level predictions of the
# windows concatenate back into the original sentence. A single word longer than the context cannot
# be kept whole: that is an error naming the sentence, not a silent truncation.

# %%
#| export
@dataclass
class Window:
    "Sub-token ids of consecutive words of one sentence; `labels` holds a tag id at each word's first sub-token."
    input_ids: list[int]
    labels: list[int]
    word_starts: list[int]  # position of each word's first sub-token in input_ids
    sentence: int  # index of the sentence in its split
    first_word: int  # index of the window's first word in that sentence

def align_sentence(sentence: Sentence, encode: Callable[[str], list[int]], max_len: int,
                   index: int = 0) -> list[Window]:
    "Encode a sentence and split it at word boundaries into windows of at most `max_len` sub-tokens."
    pieces = encode_words(sentence.words, encode)
    windows, ids, labels, starts, first = [], [], [], [], 0
    for w, (p, tag) in enumerate(zip(pieces, sentence.tags)):
        if len(p) > max_len:
            raise ValueError(f"{sentence.source}: word {w} ({sentence.words[w]!r}) has {len(p)} sub-tokens, "
                             f"more than ner.max_len={max_len}")
        if len(ids) + len(p) > max_len:
            windows.append(Window(ids, labels, starts, index, first))
            ids, labels, starts, first = [], [], [], w
        starts.append(len(ids))
        labels += [LABEL2ID[tag]] + [IGNORE_INDEX] * (len(p) - 1)
        ids += p
    windows.append(Window(ids, labels, starts, index, first))
    return windows


# %%
s = Sentence(["Peter", "went", "to", "Bratislava", "."], ["B-PER", "O", "O", "B-LOC", "O"], "hand:1")
(win,) = align_sentence(s, encode, max_len=64)
assert win.input_ids == sum(encode_words(s.words, encode), [])
assert [win.labels[i] for i in win.word_starts] == [LABEL2ID[t] for t in s.tags]
assert win.labels[win.word_starts[3] + 1:win.word_starts[4]] == [IGNORE_INDEX] * 3  # "at isl ava" are ignored
assert sum(l != IGNORE_INDEX for l in win.labels) == len(s.words)
parts = align_sentence(s, encode, max_len=4)
assert all(len(p.input_ids) <= 4 for p in parts) and [p.first_word for p in parts] == [0, 3, 4]
assert sum((p.input_ids for p in parts), []) == win.input_ids
raises(lambda: align_sentence(s, encode, max_len=3), "hand:1", "Bratislava", kind=ValueError)


# %% [markdown]
# A split encodes every sentence; `n_split` reports how many sentences needed more than one window.
# `rejoin` turns per-window word predictions back into per-sentence predictions.

# %%
#| export
@dataclass
class EncodedSplit:
    "A split's sentences and their windows."
    sentences: list[Sentence]
    windows: list[Window]
    name: str = ""

    @property
    def n_split(self) -> int:
        "Number of sentences longer than the context, i.e. split over several windows."
        return len({w.sentence for w in self.windows if w.first_word > 0})

def encode_split(sentences: list[Sentence], encode: Callable[[str], list[int]], max_len: int,
                 name: str = "") -> EncodedSplit:
    "Align every sentence of a split to sub-tokens, splitting long ones into windows."
    if not sentences:
        raise UNERFormatError(f"{name or 'encode_split'}: no sentences to encode; "
                              f"give at least one (check the data and any cap on the number of sentences)")
    windows = [w for i, s in enumerate(sentences) for w in align_sentence(s, encode, max_len, i)]
    return EncodedSplit(sentences, windows, name)

def rejoin(split: EncodedSplit, window_preds: Sequence[Sequence]) -> list[list]:
    "Concatenate word-level predictions of each window (in `split.windows` order) back into sentences."
    out = [[None] * len(s.words) for s in split.sentences]
    for w, preds in zip(split.windows, window_preds):
        if len(preds) != len(w.word_starts):
            raise ValueError(f"window of sentence {w.sentence} has {len(w.word_starts)} words, "
                             f"got {len(preds)} predictions")
        out[w.sentence][w.first_word:w.first_word + len(preds)] = list(preds)
    missing = [i for i, o in enumerate(out) if None in o]
    if missing: raise ValueError(f"no prediction for some words of sentences {missing[:5]}")
    return out


# %%
long = Sentence(["Janko"] + ["a", "b"] * 10 + ["Nitra"], ["B-PER"] + ["O"] * 20 + ["B-LOC"], "hand:2")
enc = encode_split([s, long], encode, max_len=6)
assert enc.n_split == 2 and len({w.sentence for w in enc.windows}) == 2
gold_as_preds = [[LABELS[w.labels[i]] for i in w.word_starts] for w in enc.windows]
assert rejoin(enc, gold_as_preds) == [s.tags, long.tags]
e = raises(lambda: encode_split([], encode, 64, "tl_trg/test"), kind=UNERFormatError)
assert str(e).startswith("tl_trg/test: no sentences"), e

# %% [markdown]
# On real data: how many sentences of each training set are longer than the papers' 512 sub-tokens
# (`NERConfig.max_len`), and than the released trainer's 128 (`docs/released-trainer.md`, which truncated them)?
# Encoding every training set takes minutes on two cores, so this runs outside the tests.

# %%
#| slow
for d in IN_LANGUAGE:
    train = load_split(d, "train", ner_cfg)
    print(d, len(train), {m: encode_split(train, encode, m).n_split for m in (512, 128)})

# %%
sk_dev = encode_split(load_split("sk_snk", "dev", ner_cfg), encode, ner_cfg.max_len)
assert sum(l != IGNORE_INDEX for w in sk_dev.windows for l in w.labels) == sum(len(s.words) for s in sk_dev.sentences)
print(f"sk_snk dev: {len(sk_dev.sentences)} sentences, {len(sk_dev.windows)} windows, "
      f"{sk_dev.n_split} split at max_len {ner_cfg.max_len}")
print(f"split at 32 sub-tokens: {encode_split(sk_dev.sentences, encode, 32).n_split}")


# %% [markdown]
# ## Span statistics (paper 2 Table 4)
#
# Entity spans from IOB2 tags: a `B-X` opens a span of type X, `I-X` continues it; an `I-X` that does
# not continue an X span opens one (seqeval's default, lenient reading). Per entity type we count the
# spans and the share that are a single word.

# %%
#| export
def tag_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    "Entity spans `(type, start, end)` (end exclusive) of an IOB2 tag sequence."
    spans = []
    for i, tag in enumerate(tags):
        if tag == "O": continue
        bio, kind = tag.split("-", 1)
        if bio == "I" and spans and spans[-1][0] == kind and spans[-1][2] == i: spans[-1] = (kind, spans[-1][1], i + 1)
        else: spans.append((kind, i, i + 1))
    return spans

def span_statistics(sentences: Sequence[Sentence]) -> dict:
    "Per entity type: number of spans and share of single-word spans."
    spans = [sp for s in sentences for sp in tag_spans(s.tags)]
    stats = {}
    for kind in ENTITY_TYPES:
        lengths = [e - b for k, b, e in spans if k == kind]
        stats[kind] = {"spans": len(lengths),
                       "single_token_share": sum(l == 1 for l in lengths) / len(lengths) if lengths else math.nan}
    return stats


# %%
assert tag_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "B-ORG", "I-PER"]) == [("PER", 0, 2), ("LOC", 3, 4),
                                                                                  ("LOC", 4, 5), ("ORG", 5, 6),
                                                                                  ("PER", 6, 7)]
hand = [Sentence(["a"] * 4, ["B-PER", "O", "B-PER", "I-PER"]), Sentence(["a"] * 2, ["B-LOC", "B-PER"])]
st = span_statistics(hand)
assert st["PER"] == {"spans": 3, "single_token_share": 2 / 3} and st["LOC"]["spans"] == 1 and st["ORG"]["spans"] == 0

# %% [markdown]
# Paper 2 reports for sk_snk train: PER 2,277 spans (87.6 % single-token), LOC 277 (75.1 %),
# ORG 153 (56.9 %).

# %%
sk_train = load_split("sk_snk", "train", ner_cfg)
sk_stats = span_statistics(sk_train)
print({k: (v["spans"], round(100 * v["single_token_share"], 1)) for k, v in sk_stats.items()})
assert sk_stats["PER"]["spans"] > 5 * sk_stats["LOC"]["spans"] and sk_stats["LOC"]["spans"] > sk_stats["ORG"]["spans"]

# %% [markdown]
# ## Particle recall (paper 2 Table 5)
#
# Tagalog marks personal names with the case particles *si*/*ni* (and *kay*); *ang*, *ng*, *sa* are
# the common-noun markers (paper 2 §1, App. A). Table 5's "particle recall" is the share of gold PER
# spans whose left neighbour word is a particle, and paper 2's text names *si*/*ni*, so those two are
# the default (`ner.particles`); the six markers are `CASE_MARKERS`, the earlier reading. Neither
# reproduces the paper's 0.113 (Tagalog) and 0.058 (Cebuano) on UNER v1: on its tl_trg + tl_ugnayan
# test sets (21 PER spans) si/ni precede 71 % of PER spans and the six markers 90 %; on ceb_gja (42)
# 88 % and 90 %. Given predictions, we also report how many of those particle-preceded spans the model
# found exactly (same type and boundaries), and its recall on them and on the other PER spans; the
# counts let several test sets (Tagalog's two) be pooled.

# %%
#| export
PARTICLES = ("si", "ni")  # the personal-name case particles paper 2's text names (ner.particles)
CASE_MARKERS = ("si", "ni", "ang", "ng", "sa", "kay")  # with the common-noun markers and kay: the wider reading

def particle_recall(sentences: Sequence[Sentence], predictions: Sequence[Sequence[str]] | None = None,
                    particles: Sequence[str] = PARTICLES, kind: str = "PER") -> dict:
    "Share of gold `kind` spans right after a particle (any case); with predictions, recall on those and the rest."
    after, rest = Counter(), Counter()
    for i, s in enumerate(sentences):
        found = set(tag_spans(predictions[i])) if predictions is not None else set()
        for span in tag_spans(s.tags):
            if span[0] != kind: continue
            bucket = after if span[1] > 0 and s.words[span[1] - 1].lower() in particles else rest
            bucket["spans"] += 1
            bucket["found"] += span in found
    total = after["spans"] + rest["spans"]
    out = {"spans": total, "after_particle": after["spans"], "share": after["spans"] / total if total else math.nan}
    if predictions is not None:
        out["found_after_particle"] = after["found"]
        out["recall_after_particle"] = after["found"] / after["spans"] if after["spans"] else math.nan
        out["recall_elsewhere"] = rest["found"] / rest["spans"] if rest["spans"] else math.nan
    return out


# %%
hand = [Sentence(["Nakita", "ni", "Juan", "si", "Maria", "Cruz"], ["O", "O", "B-PER", "O", "B-PER", "I-PER"]),
        Sentence(["Si", "Pedro", "at", "Jose"], ["O", "B-PER", "O", "B-PER"]),
        Sentence(["sa", "Maynila"], ["O", "B-LOC"])]
pr = particle_recall(hand)
assert pr == {"spans": 4, "after_particle": 3, "share": 0.75}
# sa: no
assert particle_recall([Sentence(["sa", "Juan"], ["O", "B-PER"])]) == {"spans": 1, "after_particle": 0, "share": 0.0}
assert particle_recall([Sentence(["sa", "Juan"], ["O", "B-PER"])], particles=CASE_MARKERS)["after_particle"] == 1
preds = [["O", "O", "B-PER", "O", "B-PER", "O"], ["O", "B-PER", "O", "B-PER"], ["O", "O"]]
pr = particle_recall(hand, preds)
assert pr["recall_after_particle"] == 2 / 3 and pr["recall_elsewhere"] == 1.0  # "Maria Cruz" found only in part
assert pr["found_after_particle"] == 2

# %%
from picomaml.names import OTHER

for d in OTHER: print(d, particle_recall(tests[d]))


# %% [markdown]
# ## OOV rate (paper 2 Table 5)
#
# Our definition: the share of word **tokens** (occurrences) of a test set whose exact surface form
# (case-sensitive, as written in the file) never occurs as a word of the finetuning training set.
# The share of word **types** is reported beside it. Paper 2 measured 0.523 (Tagalog) and 0.534
# (Cebuano) after Slovak finetuning and does not define its measure (tokens or types, case,
# against which vocabulary). Ours does not reproduce it: against sk_snk's train split the token rates
# are 0.745 and 0.723, the type rates 0.950 and 0.950.

# %%
#| export
def oov_rate(test: Sequence[Sentence], train: Sequence[Sentence]) -> dict:
    "Share of test word tokens (and of distinct test words) never seen as a word of the training set."
    seen = {w for s in train for w in s.words}
    words = [w for s in test for w in s.words]
    types = set(words)
    return {"tokens": len(words), "oov_token_rate": sum(w not in seen for w in words) / len(words),
            "types": len(types), "oov_type_rate": sum(w not in seen for w in types) / len(types)}


# %%
train_hand = [Sentence(["Juan", "ang", "bata"], ["B-PER", "O", "O"])]
test_hand = [Sentence(["ang", "bata", "ang", "Bata", "si"], ["O"] * 5)]
assert oov_rate(test_hand, train_hand) == {"tokens": 5, "oov_token_rate": 2 / 5, "types": 4, "oov_type_rate": 2 / 4}

# %%
for d in OTHER: print(d, {k: round(v, 3) for k, v in oov_rate(tests[d], sk_train).items()})

# %% [markdown]
# ## The statistics paper 2's tables read
#
# Tables 4 and 5 describe the data, not a model, and the report notebook reads outputs only, so the
# NER sweep writes these numbers next to its results (`12_ner_sweep`): for every finetuning set of
# its grid the span statistics of its **whole** train split (Table 4), and for every zero-shot
# language whose test sets the grid evaluates — Tagalog (tl_trg + tl_ugnayan, pooled) and Cebuano
# (ceb_gja) — the particle share of its PER spans and its OOV rates against each finetuning set
# (Table 5). A language is keyed by its test sets joined with `+`, as the sweep names `all`'s parts.

# %%
#| export
ZERO_SHOT_LANGUAGES = {"+".join(sets): sets for sets in (TAGALOG, CEBUANO)}

def uner_statistics(train_sets: dict, zero_shot: dict, particles: Sequence[str] = PARTICLES) -> dict:
    "Span statistics per finetuning set; per zero-shot language, particle share and OOV rates (per finetuning set)."
    return {"finetuning": {name: {"sentences": len(s), "spans": span_statistics(s)} for name, s in train_sets.items()},
            "zero_shot": {name: {"sentences": len(s),
                                 "particles": {**particle_recall(s, particles=particles), "particles": list(particles)},
                                 "oov": {source: oov_rate(s, train) for source, train in train_sets.items()}}
                          for name, s in zero_shot.items()}}


# %%
hand_stats = uner_statistics({"hand": train_hand}, {"tl_hand": hand + test_hand})
assert hand_stats["finetuning"]["hand"] == {"sentences": 1, "spans": span_statistics(train_hand)}
assert (hand_stats["zero_shot"]["tl_hand"]["particles"]["share"] == 0.75 and
        hand_stats["zero_shot"]["tl_hand"]["oov"]["hand"]["tokens"] == 17)
assert (list(ZERO_SHOT_LANGUAGES) == ["tl_trg+tl_ugnayan", "ceb_gja"] and
        set(sum(ZERO_SHOT_LANGUAGES.values(), ())) == set(OTHER))

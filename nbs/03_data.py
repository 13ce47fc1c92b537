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
# # Pretokenized data
#
# > Pico's shard format, a `prepare` command that makes it from raw documents, and a loader whose
# > batches are a pure function of (seed, step, micro-step, rank, world size).
#
# Pretraining reads `pico-lm/pretokenized-dolma` (method.md §4; paper 1 §3.3): parquet files with one
# column `input_ids`, each row `seq_len + 1` = 2,049 OLMo ids, so a row gives the inputs (all but the
# last id) and the next-token targets (all but the first). Paloma evaluation reads
# `pico-lm/pretokenized-paloma-tinsy` in the same format.

# %%
#| default_exp data

# %%
#| export
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from picomaml.config import DataConfig
from picomaml.tokenizer import PicoTokenizer, load_tokenizer

# %%
import tempfile

SHARED_DATA = Path(os.environ.get("PICOMAML_DATA", "/work/shared/data"))
tokenizer = load_tokenizer(DataConfig(tokenizer_path=str(SHARED_DATA / "tokenizer" / "olmo-7b-0724-tokenizer.json")))

def raises(fn, *needles):
    "Run `fn`, require an exception whose message contains every needle; return the message."
    try: fn()
    except Exception as e:
        assert all(n in str(e) for n in needles), f"{type(e).__name__}: {e} lacks {needles}"
        return str(e)
    raise AssertionError(f"no error; expected one mentioning {needles}")

# %% [markdown]
# ## Raw documents
#
# `prepare` reads two kinds of source file:
# - **JSON lines** (`.json`, `.jsonl`, optionally `.gz`), one document per line in its `text` field —
#   the format of C4, Dolma and Paloma files. Blank lines are skipped; a line that is not JSON, or
#   has no string `text`, is an error naming `file:line`.
# - **Plain text** (`.txt`). A WikiText file is a sequence of articles, each opening with a
#   top-level heading line ` = Title = ` (sections are ` = = Section = = `); every article, heading
#   line included, is one document, as in Paloma's wikitext_103 subset. A `.txt` file without such
#   headings is one document. Document texts are exact slices of the file: nothing is normalised.

# %%
#| export
JSONL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
TEXT_SUFFIXES = (".txt",)
WIKITEXT_ARTICLE = re.compile(r"^ = [^=].* = $", re.M)  # ` = Title = `, not ` = = Section = = `

def iter_jsonl_documents(path: Path) -> Iterator[tuple[str, str]]:
    "Yield (text, 'file:line') for every document of a JSON-lines file, gzipped or not."
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip(): continue
            try: record = json.loads(line)
            except json.JSONDecodeError as e: raise ValueError(f"{path}:{n}: malformed JSON ({e.msg}); fix or remove the line") from e
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: document has no string 'text' field (keys: {sorted(record) if isinstance(record, dict) else type(record).__name__})")
            yield text, f"{path}:{n}"

# %%
with tempfile.TemporaryDirectory() as tmp:
    good = Path(tmp) / "a.jsonl.gz"
    with gzip.open(good, "wt") as f: f.write('{"text": "first"}\n\n{"text": "second\\nline", "url": "x"}\n')
    assert list(iter_jsonl_documents(good)) == [("first", f"{good}:1"), ("second\nline", f"{good}:3")]
    (Path(tmp) / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n')
    raises(lambda: list(iter_jsonl_documents(Path(tmp) / "bad.jsonl")), "bad.jsonl:2", "malformed JSON")
    (Path(tmp) / "notext.jsonl").write_text('{"text": "ok"}\n{"url": "u"}\n')
    raises(lambda: list(iter_jsonl_documents(Path(tmp) / "notext.jsonl")), "notext.jsonl:2", "'text'", "url")

# %%
#| export
def iter_text_documents(path: Path) -> Iterator[tuple[str, str]]:
    "Yield (text, 'file:line') per WikiText article of a .txt file (the whole file if it has no article headings)."
    text = path.read_text(encoding="utf-8")
    starts = [m.start() for m in WIKITEXT_ARTICLE.finditer(text)]
    if not starts or starts[0] != 0: starts = [0] + starts
    for begin, end in zip(starts, starts[1:] + [len(text)]):
        if text[begin:end].strip():  # a whitespace-only preamble is not a document
            yield text[begin:end], f"{path}:{text.count(chr(10), 0, begin) + 1}"

# %%
with tempfile.TemporaryDirectory() as tmp:
    wiki = Path(tmp) / "w.txt"
    wiki.write_text(" \n = Cat = \n \n A cat . \n = = Diet = = \n Fish . \n = Dog = \n \n Woof . \n")
    docs = list(iter_text_documents(wiki))
    assert [d for d, _ in docs] == [" = Cat = \n \n A cat . \n = = Diet = = \n Fish . \n", " = Dog = \n \n Woof . \n"]
    assert [w for _, w in docs] == [f"{wiki}:2", f"{wiki}:7"]
    (Path(tmp) / "plain.txt").write_text("Just one\n\ndocument.\n")
    assert [d for d, _ in iter_text_documents(Path(tmp) / "plain.txt")] == ["Just one\n\ndocument.\n"]

# %%
#| export
def source_files(src) -> list[Path]:
    "The document files named by `src` (a directory, a file, or a list of them), sorted within each directory."
    files = []
    for item in ([src] if isinstance(src, (str, Path)) else src):
        item = Path(item)
        if not item.exists(): raise FileNotFoundError(f"--src {item} does not exist")
        found = sorted(p for p in item.iterdir() if p.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)) if item.is_dir() else [item]
        if item.is_dir() and not found:
            raise FileNotFoundError(f"--src {item} holds no {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} files")
        files += found
    for f in files:
        if not f.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
            raise ValueError(f"--src {f}: unknown document format; use JSON lines ({', '.join(JSONL_SUFFIXES)}) or .txt")
    return files

def iter_documents(path: Path) -> Iterator[tuple[str, str]]:
    "Documents of one source file as (text, 'file:line')."
    return iter_text_documents(path) if path.name.endswith(TEXT_SUFFIXES) else iter_jsonl_documents(path)

# %%
train_files = source_files(SHARED_DATA / "corpus" / "train")
assert [f.name for f in train_files][:2] == ["c4-sample.00000-of-00001.json.gz", "c4-sample.01.json.gz"]
raises(lambda: source_files("/nonexistent/corpus"), "/nonexistent/corpus", "does not exist")
with tempfile.TemporaryDirectory() as tmp:
    raises(lambda: source_files(tmp), tmp, "holds no")
    (Path(tmp) / "x.csv").write_text("a,b\n")
    raises(lambda: source_files([Path(tmp) / "x.csv"]), "x.csv", "unknown document format")

# %% [markdown]
# ## Rows: concatenate, then cut
#
# As Pico made pretokenized-dolma (pico-dataset `create_dolma_dataset.py`): tokenize each document,
# append EOS (50,279), concatenate, and cut the stream into rows of `seq_len + 1` ids that do **not**
# overlap. The last id of a row is therefore only ever a target, never an input: the transition from
# one row into the next is not trained (1 prediction in 2,049), which is what Pico does. Documents run
# across row boundaries; the incomplete tail of the stream is dropped (Pico drops it per batch of
# documents; we drop it once per `prepare` run, and the manifest records how many ids).

# %%
#| export
class RowCutter:
    "Accumulate token ids and hand out complete, non-overlapping rows of `row_len`."
    def __init__(self, row_len: int): self.row_len, self.pending = row_len, []

    def add(self, ids: list[int]) -> list[list[int]]:
        "Append ids; return the rows that are now complete."
        self.pending.extend(ids)
        n = len(self.pending) // self.row_len
        rows = [self.pending[i * self.row_len:(i + 1) * self.row_len] for i in range(n)]
        self.pending = self.pending[n * self.row_len:]
        return rows

# %%
cutter = RowCutter(4)
assert cutter.add([1, 2, 3]) == [] and cutter.add([4, 5, 6, 7, 8, 9, 10]) == [[1, 2, 3, 4], [5, 6, 7, 8]]
assert cutter.pending == [9, 10]

# %% [markdown]
# ## Writing shards atomically
#
# A shard is written under a temporary name and renamed into place, so a killed `prepare` never
# leaves a truncated `.parquet` that a loader would read. Ids are stored as `int32` lists (the
# loader accepts any integer type).

# %%
#| export
def write_shard(rows: list[list[int]], path: Path) -> Path:
    "Write rows as a parquet file with one `input_ids` list column, atomically."
    table = pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32()))})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path

# %%
with tempfile.TemporaryDirectory() as tmp:
    shard = write_shard([[1, 2, 3], [4, 5, 6]], Path(tmp) / "s.parquet")
    assert pq.read_table(shard)["input_ids"].to_pylist() == [[1, 2, 3], [4, 5, 6]]
    assert sorted(os.listdir(tmp)) == ["s.parquet"]

# %% [markdown]
# ## `prepare`
#
# Tokenize every source file in order (documents in file order, no shuffling: the loader shuffles
# rows), write shards of `rows_per_shard` rows as `shard-00000.parquet`, … and finally
# `manifest.json` (also atomic; its presence means the directory is complete). An output directory
# that already holds shards or a manifest is refused rather than mixed.

# %%
#| export
MANIFEST = "manifest.json"

def prepare(src, out, seq_len: int, tokenizer: PicoTokenizer, rows_per_shard: int = 8192,
            max_documents: int = 0, log=print) -> dict:
    "Pretokenize documents from `src` into parquet shards of seq_len + 1 ids under `out`; return the manifest."
    out = Path(out)
    if out.exists() and (any(out.glob("*.parquet")) or (out / MANIFEST).exists()):
        raise FileExistsError(f"--out {out} already holds shards or a manifest; delete it or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    cutter, pending, shards, sources = RowCutter(seq_len + 1), [], [], []
    def flush(rows):
        shards.append({"file": f"shard-{len(shards):05d}.parquet", "rows": len(rows)})
        write_shard(rows, out / shards[-1]["file"])
    n_docs = n_tokens = 0
    for path in source_files(src):
        docs = [text for text, _ in iter_documents(path)]
        if max_documents: docs = docs[:max(0, max_documents - n_docs)]
        file_tokens = 0
        for start in range(0, len(docs), 256):  # tokenize in parallel batches
            for ids in tokenizer.encode_batch(docs[start:start + 256]):
                pending += cutter.add(ids + [tokenizer.eos_id])
                file_tokens += len(ids) + 1
            while len(pending) >= rows_per_shard: flush(pending[:rows_per_shard]); pending = pending[rows_per_shard:]
        n_docs, n_tokens = n_docs + len(docs), n_tokens + file_tokens
        sources.append({"path": str(path), "documents": len(docs), "tokens": file_tokens})
        log(f"[prepare] {path.name}: {len(docs)} documents, {file_tokens} tokens; total {n_docs} documents, {n_tokens} tokens")
        if max_documents and n_docs >= max_documents: break
    if pending: flush(pending)
    if not shards: raise ValueError(f"--src {src}: {n_tokens} tokens make no complete row of {seq_len + 1}; lower --seq-len or add documents")
    manifest = {"format": "pico pretokenized rows (parquet, input_ids of seq_len + 1)", "seq_len": seq_len, "row_len": seq_len + 1,
                "tokenizer": tokenizer.source, "eos_id": tokenizer.eos_id, "documents": n_docs, "tokens": n_tokens,
                "rows": sum(s["rows"] for s in shards), "dropped_tail_tokens": len(cutter.pending), "sources": sources, "shards": shards}
    (out / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
    os.replace(out / (MANIFEST + ".tmp"), out / MANIFEST)
    log(f"[prepare] wrote {manifest['rows']} rows of {seq_len + 1} ids in {len(shards)} shards to {out}")
    return manifest

# %% [markdown]
# Prepared C4 text decodes back to the documents. We prepare the three 10-document C4 files, cut the
# rows' concatenation at every EOS, and decode each piece: every complete document is its source
# text exactly (the tokenizer's only normalisation is NFC, and this text is already NFC); the
# document cut off by the dropped tail is a prefix of its source.

# %%
c4_files = sorted((SHARED_DATA / "corpus" / "train").glob("c4-sample.0[123].json.gz"))
source_docs = [text for f in c4_files for text, _ in iter_documents(f)]
with tempfile.TemporaryDirectory() as tmp:
    manifest = prepare(c4_files, Path(tmp) / "c4", seq_len=63, tokenizer=tokenizer, rows_per_shard=100, log=lambda m: None)
    stream = np.concatenate([np.concatenate(pq.read_table(Path(tmp) / "c4" / s["file"])["input_ids"].to_numpy()) for s in manifest["shards"]])
    saved_manifest = json.loads((Path(tmp) / "c4" / MANIFEST).read_text())
    assert sorted(os.listdir(Path(tmp) / "c4")) == [MANIFEST] + [s["file"] for s in manifest["shards"]]
    raises(lambda: prepare(c4_files, Path(tmp) / "c4", 63, tokenizer), "already holds shards")
assert saved_manifest == manifest and manifest["documents"] == len(source_docs) == 30
assert len(stream) == manifest["rows"] * 64 == manifest["tokens"] - manifest["dropped_tail_tokens"]
assert [s["rows"] for s in manifest["shards"]][:-1] == [100] * (len(manifest["shards"]) - 1)
ends = np.flatnonzero(stream == tokenizer.eos_id)
pieces = np.split(stream, ends + 1)
decoded = [tokenizer.decode(p[:-1]) for p in pieces[:len(ends)]]
assert decoded == source_docs[:len(ends)] and len(ends) == 29
assert source_docs[len(ends)].startswith(tokenizer.decode(pieces[-1]))
print(f"{manifest['tokens']} tokens -> {manifest['rows']} rows in {len(manifest['shards'])} shards")

# %% [markdown]
# The whole local corpus, as `make demo` prepares it (about 10 s): every complete document of the
# train and eval directories decodes to its source text exactly.

# %%
#|slow
for split in ("train", "eval"):
    with tempfile.TemporaryDirectory() as tmp:
        manifest = prepare(SHARED_DATA / "corpus" / split, tmp, seq_len=128, tokenizer=tokenizer, log=lambda m: None)
        stream = np.concatenate([np.concatenate(pq.read_table(Path(tmp) / s["file"])["input_ids"].to_numpy()) for s in manifest["shards"]])
    docs = [text for f in source_files(SHARED_DATA / "corpus" / split) for text, _ in iter_documents(f)]
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    assert [tokenizer.decode(p[:-1]) for p in np.split(stream, ends + 1)[:len(ends)]] == docs[:len(ends)] and len(ends) == len(docs) - 1

# %% [markdown]
# ## Reading rows, checking them as they come
#
# A row source checks what it reads and names what is wrong: the file (or Hub dataset) and row, the
# expected and actual row length, an id outside the vocabulary. `check_rows` does this for one block
# of rows given as parquet list offsets and flat values (how pyarrow hands them over).

# %%
#| export
def check_rows(offsets: np.ndarray, values: np.ndarray, row_len: int, vocab_size: int, where: str, first_row: int = 0) -> np.ndarray:
    "Validate a block of list rows; return it as an int64 (rows, row_len) array."
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != row_len)
    if len(bad):
        raise ValueError(f"{where}: row {first_row + bad[0]} has {lengths[bad[0]]} ids, expected {row_len} (seq_len + 1); "
                         f"data.seq_len must match the shards")
    values = values[offsets[0]:offsets[-1]].astype(np.int64)
    out_of_range = np.flatnonzero((values < 0) | (values >= vocab_size))
    if len(out_of_range):
        row = first_row + out_of_range[0] // row_len
        raise ValueError(f"{where}: row {row} holds id {values[out_of_range[0]]}, outside the vocabulary 0..{vocab_size - 1}; "
                         f"were these shards made with another tokenizer?")
    return values.reshape(-1, row_len)  # (rows, row_len)

# %%
block = check_rows(np.array([0, 3, 6]), np.array([1, 2, 3, 4, 5, 6]), 3, 10, "x.parquet")
assert block.shape == (2, 3) and block.dtype == np.int64
raises(lambda: check_rows(np.array([0, 3, 5]), np.arange(5), 3, 10, "x.parquet", first_row=7), "x.parquet", "row 8", "has 2 ids, expected 3")
raises(lambda: check_rows(np.array([0, 3, 6]), np.array([1, 2, 3, 4, 50280, 6]), 3, 50280, "x.parquet"), "x.parquet", "row 1", "id 50280")

# %% [markdown]
# ### A local directory of shards
#
# `ShardRows` opens every `*.parquet` in a directory (sorted by name), counts rows from the parquet
# footers without reading data, and reads whole row groups on demand (a few kept in memory). Row `i`
# of the source is the `i`-th row of the shards in name order.

# %%
#| export
class ShardRows:
    "Random access to the rows of a local directory of Pico parquet shards."
    def __init__(self, directory, row_len: int, vocab_size: int = 50280, cached_groups: int = 8):
        self.directory, self.row_len, self.vocab_size = Path(directory), row_len, vocab_size
        if not self.directory.is_dir(): raise FileNotFoundError(f"shard directory {self.directory} does not exist; run `python -m picomaml.data prepare` or set data.train_path/eval_path")
        self.files = sorted(self.directory.glob("*.parquet"))
        if not self.files: raise FileNotFoundError(f"{self.directory} holds no *.parquet shards")
        self.groups = []  # (file index, row group, first global row, rows)
        for fi, f in enumerate(self.files):
            parquet = pq.ParquetFile(f)
            meta, columns = parquet.metadata, parquet.schema_arrow.names
            if meta.num_rows == 0: raise ValueError(f"{f}: empty shard (0 rows); delete it or re-run prepare")
            if "input_ids" not in columns: raise ValueError(f"{f}: no 'input_ids' column (columns: {columns})")
            for g in range(meta.num_row_groups):
                self.groups.append((fi, g, sum(n for *_, n in self.groups), meta.row_group(g).num_rows))
        self.group_starts = np.array([start for _, _, start, _ in self.groups])
        self.cache, self.cached_groups = OrderedDict(), cached_groups

    def __len__(self): return int(self.group_starts[-1] + self.groups[-1][3])

    def _group(self, k: int) -> np.ndarray:
        "Rows of row group `k`, validated, (rows, row_len)."
        if k not in self.cache:
            fi, g, start, _ = self.groups[k]
            column = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=["input_ids"])["input_ids"].combine_chunks()
            first_in_file = start - min(s for f, _, s, _ in self.groups if f == fi)
            self.cache[k] = check_rows(column.offsets.to_numpy(), column.values.to_numpy(), self.row_len, self.vocab_size,
                                       str(self.files[fi]), first_row=first_in_file)
            if len(self.cache) > self.cached_groups: self.cache.popitem(last=False)
        self.cache.move_to_end(k)
        return self.cache[k]

    def rows(self, indices) -> torch.Tensor:
        "The rows at global indices, as a (len(indices), row_len) LongTensor."
        indices = np.asarray(indices, dtype=np.int64)
        groups = np.searchsorted(self.group_starts, indices, side="right") - 1
        return torch.from_numpy(np.stack([self._group(k)[i - self.group_starts[k]] for k, i in zip(groups, indices)]))

# %%
with tempfile.TemporaryDirectory() as tmp:
    d = Path(tmp)
    write_shard([[i, i, i] for i in range(0, 5)], d / "a.parquet")
    write_shard([[i, i, i] for i in range(5, 7)], d / "b.parquet")
    rows = ShardRows(d, row_len=3, vocab_size=100)
    assert len(rows) == 7 and rows.rows([6, 0, 4, 5]).tolist() == [[6] * 3, [0] * 3, [4] * 3, [5] * 3]
    assert rows.rows([1]).dtype == torch.long
    raises(lambda: ShardRows(d / "missing", 3), "missing", "does not exist")
    raises(lambda: ShardRows(d, row_len=4, vocab_size=100).rows([0]), "a.parquet", "row 0", "has 3 ids, expected 4")
    raises(lambda: ShardRows(d, row_len=3, vocab_size=6).rows([5]), "b.parquet", "row 1", "id 6")  # its row group is checked whole
    write_shard([[1, 2, 3], [1, 2]], d / "c.parquet")
    raises(lambda: ShardRows(d, row_len=3, vocab_size=100).rows([8]), "c.parquet", "row 1", "has 2 ids, expected 3")
    write_shard([], d / "c.parquet")
    raises(lambda: ShardRows(d, row_len=3), "c.parquet", "empty shard")
    pq.write_table(pa.table({"tokens": [[1, 2, 3]]}), d / "c.parquet")
    raises(lambda: ShardRows(d, row_len=3), "c.parquet", "no 'input_ids' column", "tokens")
    (d / "empty").mkdir()
    raises(lambda: ShardRows(d / "empty", 3), "empty", "no *.parquet")

# %% [markdown]
# ### A streamed Hub dataset
#
# `StreamedRows` streams a Hub dataset (`datasets.load_dataset(name, split=..., streaming=True)`;
# a local directory of parquet files streams the same way). A stream has no random access, so it
# serves contiguous ranges in increasing order and restarts with `skip` when asked to go back (e.g.
# on resume). Streamed rows are read in the dataset's own order — Pico shuffled pretokenized-dolma
# when it made it — so no seed applies.

# %%
#| export
class StreamedRows:
    "Contiguous, forward-only reads of a streamed dataset's `input_ids` rows."
    def __init__(self, name: str, row_len: int, split: str = "train", vocab_size: int = 50280):
        import datasets  # heavy import, needed only for streaming
        self.name, self.split, self.row_len, self.vocab_size = name, split, row_len, vocab_size
        self.dataset = datasets.load_dataset(name, split=split, streaming=True)
        self.iterator, self.cursor = None, 0

    def read_range(self, start: int, count: int) -> torch.Tensor:
        "Rows start .. start+count-1 of the stream, (count, row_len) LongTensor."
        if self.iterator is None or start < self.cursor:
            self.iterator, self.cursor = iter(self.dataset.skip(start)), start
        for _ in range(start - self.cursor): next(self.iterator)
        rows = []
        for i in range(start, start + count):
            try: rows.append(next(self.iterator)["input_ids"])
            except StopIteration: raise IndexError(f"{self.name} ({self.split}) ended at row {i}; the run asks for more rows than it has") from None
        self.cursor = start + count
        offsets = np.cumsum([0] + [len(r) for r in rows])
        values = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
        return torch.from_numpy(check_rows(offsets, values, self.row_len, self.vocab_size, f"{self.name} ({self.split})", first_row=start))

# %%
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[i, i] for i in range(6)], Path(tmp) / "train-000.parquet")
    stream = StreamedRows(tmp, row_len=2, vocab_size=100)
    assert stream.read_range(1, 2).tolist() == [[1, 1], [2, 2]] and stream.read_range(4, 1).tolist() == [[4, 4]]
    assert stream.read_range(0, 1).tolist() == [[0, 0]]  # going back restarts the stream
    raises(lambda: stream.read_range(5, 3), "ended at row 6")
    raises(lambda: StreamedRows(tmp, row_len=3, vocab_size=100).read_range(0, 1), "row 0", "has 2 ids, expected 3")

# %% [markdown]
# ## Which source
#
# As for the tokenizer: `data.train_path` / `data.eval_path` if set, else
# `$PICOMAML_DATA/pretokenized/{train,eval}` if that directory exists, else the Hub datasets
# `data.train_hub` / `data.eval_hub` (splits `train` and `val`).

# %%
#| export
def resolve_data_source(data_cfg: DataConfig, split: str) -> Path | str:
    "A local shard directory (Path) or a Hub dataset name (str) for split 'train' or 'eval'."
    if split not in ("train", "eval"): raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    path = getattr(data_cfg, f"{split}_path")
    if path:
        if not Path(path).is_dir(): raise FileNotFoundError(f"data.{split}_path: {path} is not a directory; run `python -m picomaml.data prepare --out {path} ...` or leave it empty for the Hub")
        return Path(path)
    local = Path(os.environ.get("PICOMAML_DATA", "")) / "pretokenized" / split
    if os.environ.get("PICOMAML_DATA") and local.is_dir(): return local
    return getattr(data_cfg, f"{split}_hub")

def open_rows(data_cfg: DataConfig, split: str, vocab_size: int = 50280) -> ShardRows | StreamedRows:
    "The row source of a split: local shards or a streamed Hub dataset."
    source = resolve_data_source(data_cfg, split)
    if isinstance(source, Path): return ShardRows(source, data_cfg.seq_len + 1, vocab_size)
    hub_split = data_cfg.eval_hub_split if split == "eval" else "train"
    return StreamedRows(source, data_cfg.seq_len + 1, hub_split, vocab_size)

# %%
with tempfile.TemporaryDirectory() as tmp:
    saved = os.environ.pop("PICOMAML_DATA", None)
    try:
        assert resolve_data_source(DataConfig(), "train") == "pico-lm/pretokenized-dolma"
        assert resolve_data_source(DataConfig(), "eval") == "pico-lm/pretokenized-paloma-tinsy"
        (Path(tmp) / "pretokenized" / "eval").mkdir(parents=True)
        write_shard([[1, 2, 3]], Path(tmp) / "pretokenized" / "eval" / "shard-00000.parquet")
        os.environ["PICOMAML_DATA"] = tmp
        assert resolve_data_source(DataConfig(), "train") == "pico-lm/pretokenized-dolma"
        assert resolve_data_source(DataConfig(), "eval") == Path(tmp) / "pretokenized" / "eval"
        assert len(open_rows(DataConfig(seq_len=2), "eval")) == 1
        raises(lambda: resolve_data_source(DataConfig(train_path=f"{tmp}/nope"), "train"), "data.train_path", "nope")
    finally:
        if saved is None: os.environ.pop("PICOMAML_DATA", None)
        else: os.environ["PICOMAML_DATA"] = saved

# %% [markdown]
# ## Batches as a pure function of the step
#
# Each optimizer step consumes one global batch of G = micro_batch × world_size × accum_steps rows,
# taken from consecutive positions of the data order: step s owns positions [sG, (s+1)G). Inside a
# step, micro-step a of rank r owns the micro_batch positions starting at
# sG + (a·world_size + r)·micro_batch. So ranks get disjoint, fixed rows, the micro-batches of one
# step together are exactly the global batch, and resuming at (step, micro-step) on any rank needs
# no saved loader state: it recomputes the same positions. (The global batch size, not the world
# size, fixes the data order; the same G split differently reads the same rows per step.)
#
# For local shards, the data order is a seeded permutation of all rows, drawn afresh for each pass
# over the data (pass e uses seed `seed·1,000,003 + e`), so a run longer than one epoch keeps
# going; a global batch that straddles two passes may hold a row from each pass twice. A streamed source is read in its own order (positions are stream rows).

# %%
#| export
def micro_batch_start(step: int, accum_index: int, rank: int, world_size: int, micro_batch: int, accum_steps: int) -> int:
    "First data-order position of micro-step `accum_index` of `rank` at optimizer step `step`."
    if not (0 <= rank < world_size and 0 <= accum_index < accum_steps):
        raise ValueError(f"rank {rank} of {world_size} / micro-step {accum_index} of {accum_steps} is out of range")
    return ((step * accum_steps + accum_index) * world_size + rank) * micro_batch

# %%
starts = {(a, r): micro_batch_start(3, a, r, world_size=2, micro_batch=4, accum_steps=2) for a in range(2) for r in range(2)}
assert sorted(starts.values()) == [48, 52, 56, 60] and starts[(1, 0)] == 56  # G = 16: step 3 owns [48, 64)

# %%
#| export
_PERMUTATIONS: dict = {}

def epoch_permutation(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    "The seeded order of all rows for pass `epoch` over the data, (n_rows,) long."
    key = (n_rows, seed, epoch)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 2: _PERMUTATIONS.pop(next(iter(_PERMUTATIONS)))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERMUTATIONS[key] = torch.randperm(n_rows, generator=generator)
    return _PERMUTATIONS[key]

def batch_for_step(rows: ShardRows | StreamedRows, step: int, accum_index: int, rank: int, world_size: int,
                   micro_batch: int, accum_steps: int, seed: int) -> torch.Tensor:
    "The (micro_batch, seq_len + 1) rows of one rank's micro-step, identical however the run got there."
    start = micro_batch_start(step, accum_index, rank, world_size, micro_batch, accum_steps)
    if isinstance(rows, StreamedRows): return rows.read_range(start, micro_batch)
    positions = torch.arange(start, start + micro_batch)  # (B,)
    n = len(rows)
    indices = [int(epoch_permutation(n, seed, int(p) // n)[int(p) % n]) for p in positions]
    return rows.rows(indices)  # (B, seq_len + 1)

# %%
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[i, i] for i in range(0, 15)], Path(tmp) / "a.parquet")
    write_shard([[i, i] for i in range(15, 24)], Path(tmp) / "b.parquet")
    rows = ShardRows(tmp, row_len=2, vocab_size=100)
    kw = dict(micro_batch=2, accum_steps=2, seed=7)
    # ranks × micro-steps of a step: disjoint, and together the global batch; one epoch (3 steps) covers every row once
    epoch_ids = []
    for step in range(6):
        parts = [batch_for_step(rows, step, a, r, 2, **kw)[:, 0].tolist() for a in range(2) for r in range(2)]
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat) == 8
        epoch_ids += flat
    assert sorted(epoch_ids[:24]) == list(range(24)) and sorted(epoch_ids[24:]) == list(range(24))
    assert epoch_ids[:24] != epoch_ids[24:] and epoch_ids[:24] != list(range(24))  # reshuffled each epoch, not in file order
    # the same global batch of 8 split as 1 rank × 4 micro-steps reads the same rows
    single = [i for a in range(4) for i in batch_for_step(rows, 3, a, 0, 1, micro_batch=2, accum_steps=4, seed=7)[:, 0].tolist()]
    assert sorted(single) == sorted(epoch_ids[24:32])
    assert epoch_permutation(20, 7, 0).tolist() != epoch_permutation(20, 8, 0).tolist()  # the seed matters

# %% [markdown]
# ## Resuming
#
# `micro_batches` is the loop a trainer runs: every (step, micro-step, batch) of one rank from a start
# point on. A run resumed at (step, micro-step) yields exactly what the uninterrupted run yields from
# there — also for a streamed source, whose resumed reader skips to the position afresh.

# %%
#| export
def micro_batches(rows: ShardRows | StreamedRows, rank: int, world_size: int, micro_batch: int, accum_steps: int,
                  seed: int, start_step: int = 0, start_accum: int = 0, end_step: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    "Yield (step, micro-step, (micro_batch, seq_len + 1) rows) for one rank, from (start_step, start_accum) on."
    step, accum = start_step, start_accum
    while end_step is None or step < end_step:
        yield step, accum, batch_for_step(rows, step, accum, rank, world_size, micro_batch, accum_steps, seed)
        step, accum = (step, accum + 1) if accum + 1 < accum_steps else (step + 1, 0)

# %%
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[i, i] for i in range(30)], Path(tmp) / "a.parquet")
    for make in (lambda: ShardRows(tmp, row_len=2, vocab_size=100), lambda: StreamedRows(tmp, row_len=2, vocab_size=100)):
        kw = dict(rank=1, world_size=2, micro_batch=2, accum_steps=3, seed=5, end_step=2)
        uninterrupted = [(s, a, b.tolist()) for s, a, b in micro_batches(make(), **kw)]
        resumed = [(s, a, b.tolist()) for s, a, b in micro_batches(make(), start_step=1, start_accum=1, **kw)]
        assert len(uninterrupted) == 6 and resumed == uninterrupted[4:]

# %% [markdown]
# Evaluation reads rows in order, each rank a strided share (rank r of W takes rows r, r+W, …), so
# the ranks together score every row once.

# %%
#| export
def eval_batches(rows: ShardRows | StreamedRows, batch_size: int, max_rows: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[torch.Tensor]:
    "This rank's (<= batch_size, seq_len + 1) evaluation batches over the first `max_rows` rows (0: all; local shards)."
    total = len(rows) if isinstance(rows, ShardRows) else max_rows
    if not total: raise ValueError("a streamed evaluation set has no length: set eval.max_rows")
    total = min(total, max_rows) if max_rows else total
    mine = list(range(rank, total, world_size))
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        yield rows.rows(chunk) if isinstance(rows, ShardRows) else torch.cat([rows.read_range(j, 1) for j in chunk])

# %%
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[i, i] for i in range(7)], Path(tmp) / "a.parquet")
    for source in (ShardRows(tmp, 2, 100), StreamedRows(tmp, 2, vocab_size=100)):
        seen = [i for r in range(2) for b in eval_batches(source, 2, max_rows=7, rank=r, world_size=2) for i in b[:, 0].tolist()]
        assert sorted(seen) == list(range(7))
    assert sum(len(b) for b in eval_batches(ShardRows(tmp, 2, 100), 4, max_rows=5)) == 5

# %% [markdown]
# ## Command line
#
# ```
# python -m picomaml.data prepare --src DIR_OR_FILES... --out DIR --seq-len N [--tokenizer PATH] [--rows-per-shard R] [--max-documents D]
# ```
# Without `--tokenizer`, the tokenizer is resolved as in `load_tokenizer` ($PICOMAML_DATA, then the Hub).

# %%
#| export
def main(argv: list[str] | None = None) -> dict:
    "Entry point of `python -m picomaml.data`."
    parser = argparse.ArgumentParser(prog="python -m picomaml.data", description="Pico pretokenized data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize documents into parquet shards of seq_len + 1 ids")
    p.add_argument("--src", nargs="+", required=True, help="directories or files of JSON lines (.json/.jsonl[.gz], `text` field) or .txt")
    p.add_argument("--out", required=True, help="output directory (must not already hold shards)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence; rows hold seq_len + 1 ids")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: $PICOMAML_DATA/tokenizer, else the Hub)")
    p.add_argument("--rows-per-shard", type=int, default=8192, help="rows per parquet shard")
    p.add_argument("--max-documents", type=int, default=0, help="stop after this many documents (0: all)")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(DataConfig(tokenizer_path=args.tokenizer))
    return prepare(args.src, args.out, args.seq_len, tokenizer, args.rows_per_shard, args.max_documents)

if __name__ == "__main__" and "__file__" in globals():
    try: main()
    except (OSError, ValueError) as e: sys.exit(f"error: {e}")

# %%
with tempfile.TemporaryDirectory() as tmp:
    m = main(["prepare", "--src", str(SHARED_DATA / "corpus" / "eval"), "--out", f"{tmp}/eval", "--seq-len", "128",
              "--tokenizer", tokenizer.source, "--max-documents", "3"])
    assert m["documents"] == 3 and len(ShardRows(f"{tmp}/eval", 129)) == m["rows"]

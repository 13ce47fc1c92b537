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
# # Pretokenized data
#
# > Pico's shard format, a `prepare` command that makes it from raw documents, and a loader whose
# > batches are a pure function of (seed, step, micro-step, rank, world size).
#
# Pretraining reads `pico-lm/pretokenized-dolma` (paper 1 §3.3: Dolma "already tokenised and chunked
# by Pico"; paper 2 App. F, Table 6 names the dataset): parquet files with one column `input_ids`,
# each row `seq_len + 1` = 2,049 OLMo ids, so a row gives the inputs (all but the last id) and the
# next-token targets (all but the first). Paloma evaluation reads `pico-lm/pretokenized-paloma-tinsy`
# (Table 6's evaluation data) in the same format.

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
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from picomaml.cli import ensure_writable, run_command
from picomaml.config import ConfigError, DataConfig, local_data_dir
from picomaml.names import mix_seed
from picomaml.runlog import write_json_atomic
from picomaml.tokenizer import PicoTokenizer, load_tokenizer

# %%
import tempfile

SHARED_DATA = Path(os.environ.get("PICOMAML_DATA", "/work/shared/data"))
tokenizer = load_tokenizer(DataConfig(tokenizer_path=str(SHARED_DATA / "tokenizer" / "olmo-7b-0724-tokenizer.json")))



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
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg}); fix or remove the line") from e
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: document has no string 'text' field "
                                 f"(keys: {sorted(record) if isinstance(record, dict) else type(record).__name__})")
            yield text, f"{path}:{n}"


# %%
from picomaml.devtools import raises

with tempfile.TemporaryDirectory() as tmp:
    good = Path(tmp) / "a.jsonl.gz"
    with gzip.open(good, "wt") as f: f.write('{"text": "first"}\n\n{"text": "second\\nline", "url": "x"}\n')
    assert list(iter_jsonl_documents(good)) == [("first", f"{good}:1"), ("second\nline", f"{good}:3")]

# %%
#| hide
with tempfile.TemporaryDirectory() as tmp:
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
        found = sorted(p for p in item.iterdir()
                       if p.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES)) if item.is_dir() else [item]
        if item.is_dir() and not found:
            raise FileNotFoundError(f"--src {item} holds no {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} files")
        files += found
    for f in files:
        if not f.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
            raise ValueError(f"--src {f}: unknown document format; use JSON lines ({', '.join(JSONL_SUFFIXES)}) "
                             f"or .txt")
    return files

def iter_documents(path: Path) -> Iterator[tuple[str, str]]:
    "Documents of one source file as (text, 'file:line')."
    return iter_text_documents(path) if path.name.endswith(TEXT_SUFFIXES) else iter_jsonl_documents(path)


# %%
train_files = source_files(SHARED_DATA / "corpus" / "train")
assert [f.name for f in train_files][:2] == ["c4-sample.00000-of-00001.json.gz", "c4-sample.01.json.gz"]

# %%
#| hide
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
# loader accepts any integer type). Rows come as Python lists (from `prepare`) or as an Arrow list
# column (when `write_hub_layout` below copies rows between files without converting them).

# %%
#| export
ROW_TYPE = pa.list_(pa.int32())

def write_shard(rows, path: Path, row_group_rows: int | None = None) -> Path:
    "Write rows (lists of ids, or an Arrow list array) as a parquet file with one `input_ids` column, atomically."
    column = rows.cast(ROW_TYPE) if isinstance(rows, (pa.Array, pa.ChunkedArray)) else pa.array(rows, type=ROW_TYPE)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"input_ids": column}), tmp, row_group_size=row_group_rows)
    os.replace(tmp, path)
    return path


# %%
with tempfile.TemporaryDirectory() as tmp:
    shard = write_shard([[1, 2, 3], [4, 5, 6]], Path(tmp) / "s.parquet")
    assert pq.read_table(shard)["input_ids"].to_pylist() == [[1, 2, 3], [4, 5, 6]]
    assert sorted(os.listdir(tmp)) == ["s.parquet"]
    arrow = write_shard(pa.array([[7, 8], [9, 10]], type=pa.list_(pa.int64())), Path(tmp) / "a.parquet")
    assert (pq.read_table(arrow).schema.field("input_ids").type == ROW_TYPE
            and pq.read_table(arrow)["input_ids"].to_pylist() == [[7, 8], [9, 10]])

# %% [markdown]
# ## `prepare`
#
# Tokenize every source file in order (documents in file order, no shuffling: the loader shuffles
# rows), write shards of `rows_per_shard` rows as `shard-00000.parquet`, … and finally
# `manifest.json` (also atomic; its presence means the directory is complete). An output directory
# that already holds shards or a manifest is refused rather than mixed. While it writes, `prepare`
# keeps a `.preparing` marker in the directory: shards beside a marker and no manifest are an
# interrupted `prepare`, which training refuses to read and the next `prepare` of that directory
# (a relaunched pipeline) removes and does again.

# %%
#| export
MANIFEST, PREPARING = "manifest.json", ".preparing"

def unfinished(directory) -> bool:
    "Whether `directory` holds an interrupted prepare's output (its marker, no manifest)."
    return (Path(directory) / PREPARING).exists() and not (Path(directory) / MANIFEST).exists()

def prepare(src, out, seq_len: int, tokenizer: PicoTokenizer, rows_per_shard: int = 8192, *,
            max_documents: int = 0, log=print) -> dict:
    "Pretokenize documents from `src` into parquet shards of seq_len + 1 ids under `out`; return the manifest."
    out = Path(out)
    if unfinished(out):
        log(f"[prepare] {out}: an interrupted prepare left {len(list(out.glob('*.parquet')))} shards and no manifest; "
            f"preparing it again")
        for shard in out.glob("*.parquet"): shard.unlink()
    if out.exists() and (any(out.glob("*.parquet")) or (out / MANIFEST).exists()):
        raise FileExistsError(f"--out {out} already holds shards or a manifest; delete it or choose another directory")
    ensure_writable(out, "--out")
    (out / PREPARING).write_text("shards being written; no manifest yet\n")
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
            if len(docs) > 256:
                log(f"[prepare] {path.name}: {min(start + 256, len(docs))} of {len(docs)} documents tokenized")
        n_docs, n_tokens = n_docs + len(docs), n_tokens + file_tokens
        sources.append({"path": str(path), "documents": len(docs), "tokens": file_tokens})
        log(f"[prepare] {path.name}: {len(docs)} documents, {file_tokens} tokens; "
            f"total {n_docs} documents, {n_tokens} tokens")
        if max_documents and n_docs >= max_documents: break
    if pending: flush(pending)
    if not shards: raise ValueError(f"--src {src}: {n_tokens} tokens make no complete row of {seq_len + 1}; "
                                    f"lower --seq-len or add documents")
    manifest = {"format": "pico pretokenized rows (parquet, input_ids of seq_len + 1)", "seq_len": seq_len,
                "row_len": seq_len + 1, "tokenizer": tokenizer.source, "eos_id": tokenizer.eos_id, "documents": n_docs,
                "tokens": n_tokens, "rows": sum(s["rows"] for s in shards), "dropped_tail_tokens": len(cutter.pending),
                "sources": sources, "shards": shards}
    write_json_atomic(out / MANIFEST, manifest)
    (out / PREPARING).unlink()
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
    manifest = prepare(c4_files, Path(tmp) / "c4", seq_len=63, tokenizer=tokenizer, rows_per_shard=100,
                       log=lambda m: None)
    stream = np.concatenate([np.concatenate(pq.read_table(Path(tmp) / "c4" / s["file"])["input_ids"].to_numpy())
                             for s in manifest["shards"]])
    saved_manifest = json.loads((Path(tmp) / "c4" / MANIFEST).read_text())
    assert sorted(os.listdir(Path(tmp) / "c4")) == [MANIFEST] + [s["file"] for s in manifest["shards"]]
    raises(lambda: prepare(c4_files, Path(tmp) / "c4", 63, tokenizer), "already holds shards")
    # as a prepare killed before its manifest
    (Path(tmp) / "c4" / MANIFEST).unlink(); (Path(tmp) / "c4" / PREPARING).write_text("")
    said = []
    assert prepare(c4_files, Path(tmp) / "c4", seq_len=63, tokenizer=tokenizer, rows_per_shard=100,
                   log=said.append) == manifest
    assert "preparing it again" in said[0] and not (Path(tmp) / "c4" / PREPARING).exists()
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
        stream = np.concatenate([np.concatenate(pq.read_table(Path(tmp) / s["file"])["input_ids"].to_numpy())
                                 for s in manifest["shards"]])
    docs = [text for f in source_files(SHARED_DATA / "corpus" / split) for text, _ in iter_documents(f)]
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    assert ([tokenizer.decode(p[:-1]) for p in np.split(stream, ends + 1)[:len(ends)]] == docs[:len(ends)]
            and len(ends) == len(docs) - 1)


# %% [markdown]
# ## Reading rows, checking them as they come
#
# A row source checks what it reads and names what is wrong: the file (or Hub dataset) and row, the
# expected and actual row length, an id outside the vocabulary. `check_rows` does this for one block
# of rows given as parquet list offsets and flat values (how pyarrow hands them over); `list_rows`
# applies it to an Arrow list column, as both the shard reader and the streamed reader get one.
# `keep` takes the last `keep` ids of each checked row: a source whose rows are longer than a
# training sequence (`data.row_len`; the released trainer read the last 512 ids of pretokenized-dolma's
# 2,049-id rows) is read in its own layout and cropped as it is read, never rewritten.

# %%
#| export
def check_rows(offsets: np.ndarray, values: np.ndarray, row_len: int, vocab_size: int, where: str, first_row: int = 0,
               *, keep: int | None = None) -> np.ndarray:
    "Validate a block of list rows; return it as an int64 (rows, keep or row_len) array of each row's last `keep` ids."
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != row_len)
    if len(bad):
        raise ValueError(f"{where}: row {first_row + bad[0]} has {lengths[bad[0]]} ids, expected {row_len} "
                         f"(data.row_len, or data.seq_len + 1 when it is 0); "
                         f"data.seq_len and data.row_len must match the shards")
    values = values[offsets[0]:offsets[-1]].astype(np.int64)
    out_of_range = np.flatnonzero((values < 0) | (values >= vocab_size))
    if len(out_of_range):
        row = first_row + out_of_range[0] // row_len
        raise ValueError(f"{where}: row {row} holds id {values[out_of_range[0]]}, "
                         f"outside the vocabulary 0..{vocab_size - 1}; were these shards made with another tokenizer?")
    return np.ascontiguousarray(values.reshape(-1, row_len)[:, row_len - (keep or row_len):])  # (rows, keep)

def list_rows(column, row_len: int, vocab_size: int, where: str, first_row: int = 0,
              keep: int | None = None) -> np.ndarray:
    "An Arrow list column of ids (array or chunked) as a validated int64 (rows, keep or row_len) array."
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    # a sliced list array keeps its parent's values; its offsets say which of them are its rows
    return check_rows(column.offsets.to_numpy(), column.values.to_numpy(), row_len, vocab_size, where, first_row,
                      keep=keep)


# %%
block = check_rows(np.array([0, 3, 6]), np.array([1, 2, 3, 4, 5, 6]), 3, 10, "x.parquet")
assert block.shape == (2, 3) and block.dtype == np.int64
column = pa.chunked_array([pa.array([[0, 1], [2, 3], [4, 5]], ROW_TYPE).slice(1), pa.array([[6, 7]], ROW_TYPE)])
assert list_rows(column, 2, 10, "x").tolist() == [[2, 3], [4, 5], [6, 7]]
assert list_rows(column, 2, 10, "x", keep=1).tolist() == [[3], [5], [7]]  # each row's last id
assert check_rows(np.array([0, 5, 10]), np.arange(10), 5, 10, "x", keep=3).tolist() == [[2, 3, 4], [7, 8, 9]]

# %%
#| hide
raises(lambda: check_rows(np.array([0, 3, 5]), np.arange(5), 3, 10, "x.parquet", first_row=7), "x.parquet", "row 8",
       "has 2 ids, expected 3")
raises(lambda: check_rows(np.array([0, 3, 6]), np.array([1, 2, 3, 4, 50280, 6]), 3, 50280, "x.parquet"), "x.parquet",
       "row 1", "id 50280")
raises(lambda: list_rows(column, 2, 7, "x", first_row=10), "x: row 12 holds id 7")


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
    def __init__(self, directory, row_len: int, vocab_size: int = 50280, cached_groups: int = 8,
                 keep: int | None = None):
        self.directory, self.row_len, self.vocab_size, self.keep = Path(directory), row_len, vocab_size, keep
        if not self.directory.is_dir():
            raise FileNotFoundError(f"shard directory {self.directory} does not exist; "
                                    f"run `python -m picomaml.data prepare` or set data.train_path/eval_path")
        if unfinished(self.directory):
            raise ValueError(f"{self.directory} is an interrupted `prepare` (shards, no {MANIFEST}): prepare it "
                             f"again (the same command, or the pipeline's data stage, redoes it)")
        self.files = sorted(self.directory.glob("*.parquet"))
        if not self.files: raise FileNotFoundError(f"{self.directory} holds no *.parquet shards")
        self.groups = []  # (file index, row group, first global row, rows)
        for fi, f in enumerate(self.files):
            try: parquet = pq.ParquetFile(f)
            # pyarrow names no file: "Parquet magic bytes not found in footer..."
            except (pa.ArrowException, OSError) as e:
                raise ValueError(f"{f}: not a readable parquet shard ({e}); delete it or re-run prepare") from None
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
            column = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=["input_ids"])["input_ids"]
            first_in_file = start - min(s for f, _, s, _ in self.groups if f == fi)
            self.cache[k] = list_rows(column, self.row_len, self.vocab_size, str(self.files[fi]),
                                      first_row=first_in_file, keep=self.keep)
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
    assert ShardRows(d, row_len=3, vocab_size=100, keep=2).rows([6, 1]).tolist() == [[6, 6], [1, 1]]


# %% [markdown]
# A shard that cannot be read as rows of the configured length and vocabulary is refused with its file,
# row and the key to change; a directory left by an interrupted `prepare` is refused whole.

# %%
#| hide
with tempfile.TemporaryDirectory() as tmp:
    d = Path(tmp)
    write_shard([[i, i, i] for i in range(0, 5)], d / "a.parquet")
    write_shard([[i, i, i] for i in range(5, 7)], d / "b.parquet")
    raises(lambda: ShardRows(d / "missing", 3), "missing", "does not exist")
    raises(lambda: ShardRows(d, row_len=4, vocab_size=100).rows([0]), "a.parquet", "row 0", "has 3 ids, expected 4",
           "data.row_len")
    # its row group is checked whole
    raises(lambda: ShardRows(d, row_len=3, vocab_size=6).rows([5]), "b.parquet", "row 1", "id 6")
    write_shard([[1, 2, 3], [1, 2]], d / "c.parquet")
    raises(lambda: ShardRows(d, row_len=3, vocab_size=100).rows([8]), "c.parquet", "row 1", "has 2 ids, expected 3")
    write_shard([], d / "c.parquet")
    raises(lambda: ShardRows(d, row_len=3), "c.parquet", "empty shard")
    pq.write_table(pa.table({"tokens": [[1, 2, 3]]}), d / "c.parquet")
    raises(lambda: ShardRows(d, row_len=3), "c.parquet", "no 'input_ids' column", "tokens")
    (d / "empty").mkdir()
    raises(lambda: ShardRows(d / "empty", 3), "empty", "no *.parquet")
    (d / "c.parquet").write_bytes(b"PAR1 torn")
    raises(lambda: ShardRows(d, row_len=3), "c.parquet: not a readable parquet shard", "Parquet magic bytes not found")
    (d / "c.parquet").unlink()
    (d / PREPARING).write_text("")  # shards of a prepare killed before its manifest
    raises(lambda: ShardRows(d, row_len=3), f"{d} is an interrupted `prepare`", "prepare it again")


# %% [markdown]
# ### The Hub layout, made from local shards
#
# Pico's datasets on the Hub are directories of parquet files named `data/<split>-NNNNN-of-NNNNN.parquet`
# (pretokenized-dolma: 10,000 train files of 20,480 rows), which `datasets.load_dataset(name,
# split=..., streaming=True)` streams in name order. A local directory laid out the same way streams
# the same way, through the same code. `write_hub_layout` makes one from prepared shards: their rows
# in order (the order of `ShardRows`), `rows_per_file` rows a file, the last file holding the rest.
# With it, the streamed path below — the one a paper-scale run takes — is tested here and in CI on
# the local corpus, without a network.

# %%
#| export
def write_hub_layout(shards, out, rows_per_file: int, split: str = "train", log=print,
                     row_group_rows: int | None = None) -> dict:
    ("Copy the rows of a shard directory, in order, into `out`/data/<split>-NNNNN-of-NNNNN.parquet files of "
     "`rows_per_file` rows.")
    # row_len unused: only the files, their columns and counts
    shards, data = ShardRows(shards, row_len=0), Path(out) / "data"
    if any(data.glob(f"{split}-*.parquet")):
        raise FileExistsError(f"--out {out} already holds {split} files under data/; "
                              f"delete them or choose another directory")
    total = len(shards)
    n_files = -(-total // rows_per_file)
    data.mkdir(parents=True, exist_ok=True)
    names, column = [], pa.array([], ROW_TYPE)  # column: rows read but not yet written, fewer than rows_per_file
    def flush(rows):
        names.append(f"{split}-{len(names):05d}-of-{n_files:05d}.parquet")
        write_shard(rows, data / names[-1], row_group_rows)
    for f in shards.files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["input_ids"]):
            column = pa.concat_arrays([column, batch.column(0).cast(ROW_TYPE)])
            while len(column) >= rows_per_file:
                flush(column.slice(0, rows_per_file)); column = column.slice(rows_per_file)
    if len(column): flush(column)
    log(f"[hub-layout] wrote {total} rows in {n_files} files of {rows_per_file} rows to {data}")
    return {"split": split, "rows": total, "rows_per_file": rows_per_file, "files": [f"data/{n}" for n in names]}


# %% [markdown]
# The copy round-trips exactly: `datasets` finds the split by the file names and streams every row of
# the shards, in their order.

# %%
import datasets

with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "shards").mkdir()
    write_shard([[i, i + 1] for i in range(0, 9)], Path(tmp) / "shards" / "shard-00000.parquet")
    write_shard([[i, i + 1] for i in range(9, 23)], Path(tmp) / "shards" / "shard-00001.parquet")
    layout = write_hub_layout(Path(tmp) / "shards", Path(tmp) / "hub", rows_per_file=5, split="val", log=lambda m: None)
    assert layout["files"] == [f"data/val-0000{i}-of-00005.parquet" for i in range(5)] and layout["rows"] == 23
    assert [pq.ParquetFile(Path(tmp) / "hub" / f).metadata.num_rows for f in layout["files"]] == [5, 5, 5, 5, 3]
    streamed = [r["input_ids"] for r in datasets.load_dataset(str(Path(tmp) / "hub"), split="val", streaming=True)]
    assert streamed == ShardRows(Path(tmp) / "shards", 2, 100).rows(range(23)).tolist()


# %%
#| hide
with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "shards").mkdir()
    write_shard([[i, i + 1] for i in range(0, 9)], Path(tmp) / "shards" / "shard-00000.parquet")
    write_hub_layout(Path(tmp) / "shards", Path(tmp) / "hub", rows_per_file=5, split="val", log=lambda m: None)
    raises(lambda: write_hub_layout(Path(tmp) / "shards", Path(tmp) / "hub", 5, split="val"), "already holds val files")
    raises(lambda: write_hub_layout(Path(tmp) / "nothing", Path(tmp) / "x", 5), "nothing", "does not exist", "prepare")


# %% [markdown]
# ### A streamed dataset, read file by file and rank by rank
#
# `StreamedRows` reads a dataset in the Hub's parquet layout, the Hub path of paper 1 §3.3's data
# (pico-lm/pretokenized-dolma), for a Hub name and a local directory in its layout alike: `datasets`
# lists the split's files (sorted names, as `load_dataset_builder` lists them) and opens each through
# its own opener (`xopen`: a local path or `hf://`). A stream read from its first row would cost every
# rank the whole stream and a resumed run a replay of everything before its step. But the position of
# a row fixes its file: pretokenized-dolma's files hold 20,480 rows each (`data.rows_per_file`), and
# pico-train resumes by opening the file its step falls in. Position p lies in file p // rows_per_file.
#
# Inside a file, ranks should not read each other's rows. A branch micro-batch of B positions is split
# into W contiguous rank shares of R = B / W; in file order, every rank's share of every micro-batch
# would lie side by side, and since a parquet file is read by row groups (often thousands of rows),
# each rank would decode the whole file. So within a file of F rows, holding K = F / B micro-batches,
# position m·B + j (micro-batch m, place j) is **file row j·K + m**: place j of every micro-batch sits
# in one contiguous run of K rows, and a rank's R places of all K micro-batches lie in one contiguous
# region of R·K = F / W rows. A rank reads that region once, and only the row groups that overlap it,
# when it first needs the file, and serves its K shares from memory. The layout depends on B and F
# only, never on W, so one process and W processes read the same rows per micro-batch (the 1 = 2 ranks
# tests rely on that), and a resumed run reads the region of its file again. F must be a multiple of B
# (20,480 = 80 × 256); the last file may hold fewer rows, and only its whole micro-batches are used.
# Each file's row count is checked against `data.rows_per_file` from its footer (a wrong value would
# silently shift every position). The first rows in file order, `head`, are what evaluation reads.

# %%
#| export
def streamed_file_row(offset: int, block_rows: int, per_file: int) -> int:
    "The file row holding position `offset` of a file that holds `per_file` micro-batches of `block_rows` positions."
    micro_batch, place = divmod(offset, block_rows)
    return place * per_file + micro_batch

class StreamedRows:
    "Rows of a streamed dataset; each rank reads, once per file, only the region of the file that holds its rows."
    def __init__(self, name: str, row_len: int, split: str = "train", vocab_size: int = 50280,
                 rows_per_file: int = 20480, *, block_rows: int | None = None, keep: int | None = None):
        import datasets  # heavy import, needed only for streaming
        self.name, self.split, self.row_len, self.vocab_size, self.rows_per_file = (name, split, row_len, vocab_size,
                                                                                    rows_per_file)
        self.block_rows = block_rows  # positions of one branch micro-batch (or episode pool); None: each read is one
        self.keep = keep  # the last ids of each row that are used; None: all
        try: builder = datasets.load_dataset_builder(name)
        except OSError as e:
            raise FileNotFoundError(f"{name}: {e}; set data.train_hub/eval_hub to a Hub dataset or a local directory "
                                    f"in its layout (`python -m picomaml.data hub-layout`)") from e
        splits = builder.config.data_files or {}
        if split not in splits: raise ValueError(f"{name} has no split {split!r} (it has {sorted(splits)}); "
                                                 f"check data.eval_hub_split or the dataset's file names")
        self.files = list(splits[split])  # in the order the stream reads them
        # what load_dataset(name, split=split, streaming=True) returns
        self.dataset = builder.as_streaming_dataset(split=split)
        # checked row counts; the region held; rows decoded
        self.file_rows, self.region, self.rows_read = {}, (None, None), 0

    def _rows_in(self, i: int) -> int:
        "Rows of file i from its parquet footer, checked against data.rows_per_file (the last file may hold fewer)."
        if i not in self.file_rows:
            from datasets.utils.file_utils import xopen  # the opener datasets streams with: a local path or hf://
            with xopen(self.files[i], "rb") as f:
                parquet = pq.ParquetFile(f)
                n, columns = parquet.metadata.num_rows, parquet.schema_arrow.names
            if "input_ids" not in columns:
                raise ValueError(f"{self.files[i]}: no 'input_ids' column (columns: {columns})")
            if n > self.rows_per_file or (n < self.rows_per_file and i < len(self.files) - 1) or n == 0:
                raise ValueError(f"{self.files[i]} holds {n} rows but data.rows_per_file is {self.rows_per_file}: "
                                 f"set it to the rows of each file of {self.name} (all files but the last hold "
                                 f"exactly that many)")
            self.file_rows[i] = n
        return self.file_rows[i]

    def _read_file_rows(self, i: int, first: int, last: int) -> np.ndarray:
        "Rows first .. last-1 of file i in file order, decoding only the row groups that hold them, validated."
        from datasets.utils.file_utils import xopen
        with xopen(self.files[i], "rb") as f:
            parquet = pq.ParquetFile(f)
            starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            groups = [g for g in range(parquet.num_row_groups) if starts[g] < last and starts[g + 1] > first]
            table = parquet.read_row_groups(groups, columns=["input_ids"])
        self.rows_read += len(table)
        column = table.column("input_ids").slice(first - starts[groups[0]], last - first)
        return list_rows(column, self.row_len, self.vocab_size, self.files[i], first_row=first, keep=self.keep)

    def read_range(self, start: int, count: int) -> torch.Tensor:
        "Rows of positions start .. start+count-1, one rank's share of one micro-batch, (count, row_len) LongTensor."
        block = self.block_rows or count
        if self.rows_per_file % block:
            raise ValueError(f"data.rows_per_file={self.rows_per_file} is not a multiple of the "
                             f"{block}-row micro-batch (train.branch_batch, or smlmt.pool_rows for episode pools): "
                             f"choose one that divides it")
        i, offset = divmod(start, self.rows_per_file)
        if i >= len(self.files) or (offset // block + 1) * block > self._rows_in(i) // block * block:
            raise IndexError(f"{self.name} ({self.split}) has no whole micro-batch of {block} rows at position {start}"
                             f": the run needs more rows than the dataset holds; lower train.steps "
                             f"(or the batch size), or stream a longer dataset")
        per_file, (micro_batch, place) = self._rows_in(i) // block, divmod(offset, block)
        if place + count > block:
            raise ValueError(f"positions {start}..{start + count - 1} span two {block}-row micro-batches")
        key = (i, place, count)
        if self.region[0] != key:
            self.region = (key, self._read_file_rows(i, place * per_file, (place + count) * per_file))
        # (count, row_len): places place.., of this micro-batch
        return torch.from_numpy(self.region[1][micro_batch::per_file])

    def head(self, n: int | None = None) -> torch.Tensor:
        "The first n rows of the stream in order (all if it is shorter, or n is None), (<= n, row_len) LongTensor."
        stream = self.dataset.with_format("arrow")
        tables = list((stream if n is None else stream.take(n)).iter(batch_size=1024))
        if not tables: raise ValueError(f"{self.name} ({self.split}) holds no rows")
        ids = pa.concat_tables(tables).column("input_ids")
        return torch.from_numpy(list_rows(ids, self.row_len, self.vocab_size, f"{self.name} ({self.split})",
                                          keep=self.keep))


# %% [markdown]
# Tests on a local directory in the Hub layout: 40 rows whose ids are their file-order index, files of
# 8 rows written in row groups of 2 (`write_shard`'s `row_group_rows`), branch micro-batches of 4
# positions. One process reading micro-batch by micro-batch and two ranks (each its own reader, as
# in a real run) read the same rows, those of the layout above; each of the two ranks decodes half of
# every file; a reader resumed deep in the stream reads only its file's region.

# %%
hub_tmp = tempfile.TemporaryDirectory()
hub = Path(hub_tmp.name) / "hub"
(Path(hub_tmp.name) / "shards").mkdir()
write_shard([[i, i] for i in range(40)], Path(hub_tmp.name) / "shards" / "shard-00000.parquet")
write_hub_layout(Path(hub_tmp.name) / "shards", hub, rows_per_file=8, log=lambda m: None, row_group_rows=2)
# (40, 2), file order
full = torch.tensor([r["input_ids"] for r in datasets.load_dataset(str(hub), split="train", streaming=True)])
layout = lambda p: 8 * (p // 8) + streamed_file_row(p % 8, block_rows=4, per_file=2)  # position -> file-order row

one = StreamedRows(str(hub), row_len=2, vocab_size=100, rows_per_file=8, block_rows=4)
assert torch.equal(torch.cat([one.read_range(s, 4) for s in range(0, 40, 4)]), full[[layout(p) for p in range(40)]])
# each row once; each file read once
assert sorted(layout(p) for p in range(40)) == list(range(40)) and one.rows_read == 40
ranks = [StreamedRows(str(hub), row_len=2, vocab_size=100, rows_per_file=8, block_rows=4) for _ in range(2)]
two = torch.cat([ranks[r].read_range(s + 2 * r, 2) for s in range(0, 40, 4) for r in range(2)])
# half of every file each
assert torch.equal(two, full[[layout(p) for p in range(40)]]) and [r.rows_read for r in ranks] == [20, 20]
resumed = StreamedRows(str(hub), row_len=2, vocab_size=100, rows_per_file=8, block_rows=4)
# file 3's region of rank 1
assert torch.equal(resumed.read_range(26, 2), full[[layout(26), layout(27)]]) and resumed.rows_read == 4

# %% [markdown]
# Files whose row count disagrees with `data.rows_per_file`, a micro-batch that does not divide it,
# rows past the end, rows of another length and a missing split or dataset are errors that say what to set.

# %%
#| hide
raises(lambda: StreamedRows(str(hub), 2, vocab_size=100, rows_per_file=4, block_rows=4).read_range(0, 1),
       "train-00000-of-00005.parquet", "holds 8 rows", "data.rows_per_file is 4")
raises(lambda: StreamedRows(str(hub), 2, vocab_size=100, rows_per_file=8, block_rows=3).read_range(0, 1),
       "data.rows_per_file=8 is not a multiple of the 3-row micro-batch")
raises(lambda: StreamedRows(str(hub), 2, vocab_size=100, rows_per_file=8, block_rows=4).read_range(40, 2),
       str(hub), "position 40", "train.steps")
raises(lambda: StreamedRows(str(hub), 3, vocab_size=100, rows_per_file=8, block_rows=4).read_range(8, 2),
       "train-00001-of-00005.parquet", "row 0", "has 2 ids, expected 3")
raises(lambda: StreamedRows(str(hub), 2, split="val"), "no split 'val'", "['train']", "data.eval_hub_split")
raises(lambda: StreamedRows(f"{hub_tmp.name}/missing", 2), "missing", "data.train_hub", "hub-layout")
# head reads in file order, any file sizes
assert torch.equal(StreamedRows(str(hub), 2, vocab_size=100).head(7), full[:7])
assert torch.equal(StreamedRows(str(hub), 2, vocab_size=100).head(100), full)  # a shorter stream: all its rows

# %% [markdown]
# A process that exits in the middle of a file (every training process does) exits quietly.

# %%
import subprocess
import sys

with tempfile.TemporaryDirectory() as tmp:
    (Path(tmp) / "shards").mkdir()
    write_shard([[i % 100, 0] for i in range(3000)], Path(tmp) / "shards" / "shard-00000.parquet")
    write_hub_layout(Path(tmp) / "shards", Path(tmp) / "hub", rows_per_file=2048, log=lambda m: None)
    script = (f"from picomaml.data import StreamedRows\n"
              f"rows = StreamedRows({str(Path(tmp) / 'hub')!r}, 2, vocab_size=100, "
              f"rows_per_file=2048, block_rows=256)\n"
              f"rows.read_range(5, 2)\nrows.head(1500)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
assert done.returncode == 0 and "Exception ignored" not in done.stderr and "terminate" not in done.stderr, done.stderr


# %% [markdown]
# ## Which source
#
# With `data.source: auto`, as for the tokenizer: `data.train_path` / `data.eval_path` if set, else
# `$PICOMAML_DATA/pretokenized/{train,eval}` if that directory exists, else the Hub datasets
# `data.train_hub` / `data.eval_hub` (splits `train` and `data.eval_hub_split`). With `data.source:
# hub` the `*_hub` datasets are streamed even where local shards exist — how the paper profile is
# rehearsed on a local directory in the Hub layout.

# %%
#| export
def resolve_data_source(data_cfg: DataConfig, split: str) -> Path | str:
    "A local shard directory (Path) or a streamed dataset, Hub name or local Hub layout (str), for 'train' or 'eval'."
    if split not in ("train", "eval"): raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data_cfg.source == "hub": return getattr(data_cfg, f"{split}_hub")
    path = getattr(data_cfg, f"{split}_path")
    if path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"data.{split}_path: {path} is not a directory; run "
                                    f"`python -m picomaml.data prepare --out {path} ...` or leave it empty for the Hub")
        return Path(path)
    env = local_data_dir()
    if env and (env / "pretokenized" / split).is_dir(): return env / "pretokenized" / split
    return getattr(data_cfg, f"{split}_hub")

def open_rows(data_cfg: DataConfig, split: str, vocab_size: int = 50280, block_rows: int | None = None,
              crop: bool = True) -> ShardRows | StreamedRows:
    "The row source of a split: local shards, or a streamed dataset read in micro-batches of `block_rows` positions."
    source = resolve_data_source(data_cfg, split)
    # a longer stored row is cropped to its last ids
    stored, used = data_cfg.row_len or data_cfg.seq_len + 1, data_cfg.seq_len + 1
    keep = used if crop else None  # crop=False: whole stored rows (the documents they pack)
    if isinstance(source, Path): return ShardRows(source, stored, vocab_size, keep=keep)
    hub_split = data_cfg.eval_hub_split if split == "eval" else "train"
    return StreamedRows(source, stored, hub_split, vocab_size, data_cfg.rows_per_file, block_rows=block_rows, keep=keep)


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
        # source=hub streams the *_hub datasets even with a path set and local shards present
        hub_cfg = DataConfig(source="hub", train_path=tmp, train_hub=str(hub), eval_hub="x/y", seq_len=1,
                             rows_per_file=8)
        assert resolve_data_source(hub_cfg, "train") == str(hub) and resolve_data_source(hub_cfg, "eval") == "x/y"
        streamed = open_rows(hub_cfg, "train", vocab_size=100, block_rows=4)
        assert (isinstance(streamed, StreamedRows) and streamed.rows_per_file == 8
                and torch.equal(streamed.read_range(4, 2), full[[1, 3]]))
        # the eval shard's 3-id row read as a 1-token sequence: stored rows of data.row_len 3,
        # the last seq_len + 1 = 2 ids used
        assert open_rows(DataConfig(seq_len=1, row_len=3), "eval").rows([0]).tolist() == [[2, 3]]
        assert open_rows(DataConfig(seq_len=1, row_len=3), "eval", crop=False).rows([0]).tolist() == [[1, 2, 3]]
        raises(lambda: open_rows(DataConfig(seq_len=1, row_len=4), "eval").rows([0]), "has 3 ids, expected 4",
               "data.row_len")
        raises(lambda: open_rows(DataConfig(seq_len=3, row_len=2), "eval"),
               "data.row_len=2 is shorter than data.seq_len + 1 = 4")
    finally:
        if saved is None: os.environ.pop("PICOMAML_DATA", None)
        else: os.environ["PICOMAML_DATA"] = saved


# %% [markdown]
# ## Batches as a pure function of the step
#
# Each optimizer step consumes one global batch of G = rows_per_rank × world_size × accum_steps rows,
# taken from consecutive positions of the data order: step s owns positions [sG, (s+1)G). A step is
# `accum_steps` branch micro-batches (paper 1 §3.3: micro-batches accumulated into the effective
# batch) of `branch_batch` = rows_per_rank × world_size rows; micro-step a of rank r owns the
# rows_per_rank positions starting at sG + (a·world_size + r)·rows_per_rank. So ranks get disjoint,
# fixed rows, the micro-batches of one step together are exactly the global batch, and resuming at
# (step, micro-step) on any rank needs no saved loader state: it recomputes the same positions.
# (The global batch size, not the world size, fixes the data order; the same G split differently
# reads the same rows per step.)
#
# For local shards, the data order is a seeded permutation of all rows, drawn afresh for each pass
# over the data (pass e uses seed `seed·1,000,003 + e`), so a run longer than one epoch keeps
# going; a global batch that straddles two passes may hold a row from each pass twice. A streamed
# source is read in its files' order, laid out rank by rank inside each file (above; Pico shuffled
# pretokenized-dolma when it made it, so no seed applies).

# %%
#| export
def micro_batch_start(step: int, accum_index: int, rank: int, world_size: int, rows_per_rank: int,
                      accum_steps: int) -> int:
    "First data-order position of micro-step `accum_index` of `rank` at optimizer step `step`."
    if not (0 <= rank < world_size and 0 <= accum_index < accum_steps):
        raise ValueError(f"rank {rank} of {world_size} / micro-step {accum_index} of {accum_steps} is out of range")
    return ((step * accum_steps + accum_index) * world_size + rank) * rows_per_rank


# %%
starts = {(a, r): micro_batch_start(3, a, r, world_size=2, rows_per_rank=4, accum_steps=2)
          for a in range(2) for r in range(2)}
assert sorted(starts.values()) == [48, 52, 56, 60] and starts[(1, 0)] == 56  # G = 16: step 3 owns [48, 64)

# %%
#| export
_PERMUTATIONS: dict = {}

def epoch_permutation(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    "The seeded order of all rows for pass `epoch` over the data, (n_rows,) long."
    key = (n_rows, seed, epoch)
    if key not in _PERMUTATIONS:
        if len(_PERMUTATIONS) > 2: _PERMUTATIONS.pop(next(iter(_PERMUTATIONS)))
        generator = torch.Generator().manual_seed(mix_seed(seed, epoch, "epoch"))
        _PERMUTATIONS[key] = torch.randperm(n_rows, generator=generator)
    return _PERMUTATIONS[key]

def batch_for_step(rows: ShardRows | StreamedRows, step: int, accum_index: int, rank: int, world_size: int, *,
                   rows_per_rank: int, accum_steps: int, seed: int) -> torch.Tensor:
    "The (rows_per_rank, seq_len + 1) rows of one rank's branch micro-batch, identical however the run got there."
    start = micro_batch_start(step, accum_index, rank, world_size, rows_per_rank, accum_steps)
    if isinstance(rows, StreamedRows): return rows.read_range(start, rows_per_rank)
    positions = torch.arange(start, start + rows_per_rank)  # (B,)
    n = len(rows)
    indices = [int(epoch_permutation(n, seed, int(p) // n)[int(p) % n]) for p in positions]
    return rows.rows(indices)  # (B, seq_len + 1)


# %%
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[i, i] for i in range(0, 15)], Path(tmp) / "a.parquet")
    write_shard([[i, i] for i in range(15, 24)], Path(tmp) / "b.parquet")
    rows = ShardRows(tmp, row_len=2, vocab_size=100)
    kw = dict(rows_per_rank=2, accum_steps=2, seed=7)
    # ranks × micro-steps of a step: disjoint, and together the global batch; one epoch (3 steps) covers every row once
    epoch_ids = []
    for step in range(6):
        parts = [batch_for_step(rows, step, a, r, 2, **kw)[:, 0].tolist() for a in range(2) for r in range(2)]
        flat = [i for p in parts for i in p]
        assert len(set(flat)) == len(flat) == 8
        epoch_ids += flat
    assert sorted(epoch_ids[:24]) == list(range(24)) and sorted(epoch_ids[24:]) == list(range(24))
    # reshuffled each epoch, not in file order
    assert epoch_ids[:24] != epoch_ids[24:] and epoch_ids[:24] != list(range(24))
    # the same global batch of 8 split as 1 rank × 4 micro-steps reads the same rows
    single = [i for a in range(4)
              for i in batch_for_step(rows, 3, a, 0, 1, rows_per_rank=2, accum_steps=4, seed=7)[:, 0].tolist()]
    assert sorted(single) == sorted(epoch_ids[24:32])
    assert epoch_permutation(20, 7, 0).tolist() != epoch_permutation(20, 8, 0).tolist()  # the seed matters

# %% [markdown]
# Streamed, a step of two ranks (each its own reader, as in a real run) reads exactly the rows one
# process reads for the same global batch: positions [sG, (s+1)G) of the stream, in the layout above.

# %%
# micro-batches of 2 positions
streamed = lambda: StreamedRows(str(hub), 2, vocab_size=100, rows_per_file=8, block_rows=2)
ranks = [streamed() for _ in range(2)]
two = torch.cat([batch_for_step(ranks[r], 2, a, r, 2, rows_per_rank=1, accum_steps=3, seed=0)
                 for a in range(3) for r in range(2)])
one = torch.cat([batch_for_step(streamed(), 2, a, 0, 1, rows_per_rank=2, accum_steps=3, seed=0) for a in range(3)])
expected = full[[8 * (p // 8) + streamed_file_row(p % 8, block_rows=2, per_file=4) for p in range(12, 18)]]
assert torch.equal(two, expected) and torch.equal(one, expected)

# %% [markdown]
# ## Resuming
#
# A trainer reads every (step, micro-step) of one rank in order from its start point. A run resumed
# at (step, micro-step) reads exactly what the uninterrupted run reads from there — also for a
# streamed source, whose fresh reader reads the rank's region of the file of the resume position
# (above), instead of replaying the stream.

# %%
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[i, i] for i in range(30)], Path(tmp) / "a.parquet")
    positions = [(step, accum) for step in range(3) for accum in range(3)]  # 3 steps of 3 micro-batches
    for make in (lambda: ShardRows(tmp, row_len=2, vocab_size=100), streamed):
        read = lambda source, at: [batch_for_step(source, s, a, 1, 2, rows_per_rank=1, accum_steps=3, seed=5).tolist()
                                   for s, a in at]
        uninterrupted, source = read(make(), positions), make()
        assert read(source, positions[7:]) == uninterrupted[7:]  # resumed at step 2, micro-step 1
        # positions 15 and 17: rank 1's 4-row regions of files 1 and 2, no replay
        assert getattr(source, "rows_read", 8) == 8


# %% [markdown]
# ## Reading ahead
#
# Reading a draw's rows (a parquet region decoded, a permutation looked up, rows validated) costs
# milliseconds to a second, and a GPU step should not wait for it. The training loop knows which rows
# its next draw needs (the branch draws and the positions are functions of the step), so a
# `RowPrefetcher` reads them on one background thread while the current draw trains: `ask` starts the
# read of a key, `take` returns it (or reads it now if it was never asked for). On a CUDA run the rows
# land in pinned memory, so the copy to the GPU (`non_blocking=True`) overlaps with compute. The
# sources are only ever read from the prefetcher's thread, one read at a time, so they need no locks.

# %%
#| export
class RowPrefetcher:
    "The rows of the next draw, read on a background thread (into pinned memory for a CUDA run) while this one trains."
    def __init__(self, pin: bool = False):
        self.pool, self.pending, self.pin = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows"), {}, pin

    def _read(self, read) -> torch.Tensor:
        rows = read()
        return rows.pin_memory() if self.pin else rows

    def ask(self, key, read) -> None:
        "Start reading `read()` for `key` in the background."
        if key not in self.pending: self.pending[key] = self.pool.submit(self._read, read)

    def take(self, key, read) -> torch.Tensor:
        "The rows of `key`: the background read's (its error raised here), or `read()` now if none was asked for."
        future = self.pending.pop(key, None)
        return future.result() if future is not None else self._read(read)

    def close(self) -> None:
        "Drop reads nobody will take and stop the thread."
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


# %% [markdown]
# Tests: what `take` returns equals the direct read; an asked-for read ran on the background thread
# (and a key never asked for is read in the caller's); an error in the background read is raised by
# `take`, in the training thread.

# %%
import threading

readers = []
def read_of(step):
    def read():
        readers.append(threading.current_thread().name)
        return batch_for_step(ShardRows(hub_tmp.name + "/shards", 2, 100), step, 0, 0, 1, rows_per_rank=4,
                              accum_steps=1, seed=3)
    return read

ahead = RowPrefetcher()
ahead.ask(1, read_of(1))
assert (torch.equal(ahead.take(1, read_of(1)), read_of(1)()) and readers[0].startswith("rows")
        and readers[1] == threading.current_thread().name)
assert torch.equal(ahead.take(2, read_of(2)), read_of(2)())  # never asked for: read now
ahead.ask(3, lambda: (_ for _ in ()).throw(OSError("shard unreadable")))
raises(lambda: ahead.take(3, read_of(3)), "shard unreadable")
ahead.close()


# %% [markdown]
# ## The evaluation split, read once
#
# Paloma perplexity (paper 1 §3.3, every 100 steps) is measured the way pico-train measures it: each
# document of the evaluation split scored on its own, truncated at the model's 2,048 tokens, its
# perplexity the exponential of its mean next-token cross-entropy, and the reported value the mean
# over the documents of the whole split (pico-train's `perplexity` metric over the texts of
# `pico-lm/pretokenized-paloma-tinsy`'s `val` split, with `max_length` 2,048 and no start token). The
# split is stored as packed rows (documents, each followed by EOS, cut into rows of seq_len + 1 ids),
# so `packed_documents` recovers the documents: the ids between consecutive EOS, in order, each cut to
# `max_len` ids (the metric's truncation). The EOS is not part of a document (the metric scores a
# text's own tokens); the unfinished document at the end, cut off by the last row, is dropped; a
# one-token document has no target and is skipped.
#
# The split is read once when the run starts (`read_eval_documents`), so a streamed split is not
# streamed again at every evaluation: all of it (`eval.max_documents = 0`, pico-train's choice), or
# its first documents when a run bounds the evaluation on purpose (the CPU demo). The spectra's
# gradients come from the same split's packed rows (`read_eval_rows`: its first `spectra.grad_rows`
# rows, 0 for all, cropped like training rows when `data.row_len` is longer; the documents are always
# read from whole rows). A streamed split is read from its first row, in order, and
# `data.rows_per_file` does not apply.

# %%
#| export
def packed_documents(rows: torch.Tensor, eos_id: int, max_len: int) -> list[torch.Tensor]:
    ("The documents of packed rows (n, T + 1), in order: the ids before each EOS, cut to `max_len`; "
     "the unfinished last one dropped.")
    flat = rows.flatten()  # (n · (T + 1),): the token stream the rows were cut from
    ends = torch.nonzero(flat == eos_id).flatten().tolist()
    starts = [0] + [e + 1 for e in ends[:-1]]
    return [flat[s:e][:max_len] for s, e in zip(starts, ends) if e - s >= 2]  # one token has no next-token target

def read_eval_rows(data_cfg: DataConfig, max_rows: int, vocab_size: int = 50280, crop: bool = True) -> torch.Tensor:
    ("The first `max_rows` rows of the evaluation split (0: all), read once: (n, seq_len + 1) LongTensor "
     "(crop=False: whole rows).")
    source = open_rows(data_cfg, "eval", vocab_size, crop=crop)
    if isinstance(source, ShardRows):
        return source.rows(np.arange(min(max_rows, len(source)) if max_rows else len(source)))
    return source.head(max_rows or None)

def read_eval_documents(data_cfg: DataConfig, max_documents: int, max_len: int,
                        vocab_size: int = 50280) -> list[torch.Tensor]:
    "The first `max_documents` documents of the evaluation split (0: every one), each cut to `max_len` ids, read once."
    rows = 0 if not max_documents else max_documents  # a first guess at the rows that hold them; doubled until they do
    while True:
        read = read_eval_rows(data_cfg, rows, vocab_size, crop=False)  # documents are packed into the whole stored rows
        documents = packed_documents(read, data_cfg.eos_id, max_len)
        if not rows or len(documents) >= max_documents or len(read) < rows: return documents[:max_documents or None]
        rows *= 2

def document_batches(documents: list[torch.Tensor], batch_size: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[tuple]:
    "This rank's document batches, longest first, strided over ranks: (ids (B, L) right-padded with 0, lengths (B,))."
    if not 0 <= rank < world_size: raise ValueError(f"rank {rank} of {world_size} is out of range")
    mine = sorted(range(len(documents)), key=lambda i: (-len(documents[i]), i))[rank::world_size]
    for i in range(0, len(mine), batch_size):
        chosen = [documents[j] for j in mine[i:i + batch_size]]
        lengths = torch.tensor([len(d) for d in chosen])
        ids = torch.zeros(len(chosen), int(lengths.max()), dtype=torch.long)  # (B, L)
        for row, document in enumerate(chosen): ids[row, :len(document)] = document
        yield ids, lengths


# %%
# EOS 9: documents [5 6], [7], [1 2 3 4], then [8 8] unfinished
_rows = torch.tensor([[5, 6, 9, 7], [9, 1, 2, 3], [4, 9, 8, 8]])
assert [d.tolist() for d in packed_documents(_rows, 9, max_len=10)] == [[5, 6], [1, 2, 3, 4]]  # [7] has no target
# cut to max_len, as the metric truncates
assert [d.tolist() for d in packed_documents(_rows, 9, max_len=3)] == [[5, 6], [1, 2, 3]]
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[i, i] for i in range(4)], Path(tmp) / "a.parquet")
    write_shard([[i, i] for i in range(4, 7)], Path(tmp) / "b.parquet")
    local = DataConfig(eval_path=tmp, seq_len=1, eos_id=3)
    assert read_eval_rows(local, 0, 100)[:, 0].tolist() == list(range(7))  # all, in file order (no shuffling)
    assert read_eval_rows(local, 5, 100)[:, 0].tolist() == list(range(5)) and len(read_eval_rows(local, 50, 100)) == 7
    # ids 0 0 1 1 2 2 3 3 4 4 5 5 6 6: EOS 3 closes [0 0 1 1 2 2] and [] (too short), [4 4 5 5 6 6] is unfinished
    assert [d.tolist() for d in read_eval_documents(local, 0, 100, 100)] == [[0, 0, 1, 1, 2, 2]]
# rows of 3 stored ids read as 1-token sequences: the documents come from whole rows
with tempfile.TemporaryDirectory() as tmp:
    write_shard([[0, 1, 3], [4, 5, 3]], Path(tmp) / "a.parquet")
    cropped = DataConfig(eval_path=tmp, seq_len=1, row_len=3, eos_id=3)
    assert read_eval_rows(cropped, 0, 100).tolist() == [[1, 3], [5, 3]]
    assert [d.tolist() for d in read_eval_documents(cropped, 0, 100, 100)] == [[0, 1], [4, 5]]
streamed = DataConfig(source="hub", eval_hub=str(hub), eval_hub_split="train", seq_len=1, eos_id=3)
# 0: the whole split
assert torch.equal(read_eval_rows(streamed, 9, 100), full[:9]) and torch.equal(read_eval_rows(streamed, 0, 100), full)
assert len(read_eval_documents(streamed, 1, 100, 100)) == 1  # read until the first document is closed
raises(lambda: read_eval_rows(DataConfig(source="hub", eval_hub=str(hub), seq_len=1), 4, 100), "no split 'val'",
       "data.eval_hub_split")

_documents = [torch.arange(n) + 1 for n in (3, 5, 2, 4, 6)]
_batches = {r: list(document_batches(_documents, 2, rank=r, world_size=2)) for r in range(2)}
assert ([lengths.tolist() for _, lengths in _batches[0]] == [[6, 4], [2]]
        and [lengths.tolist() for _, lengths in _batches[1]] == [[5, 3]])
_ids, _lengths = _batches[0][0]
# right-padded; the causal model never reads the padding
assert _ids.tolist() == [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 0, 0]]
# every document once
assert sorted(n for bs in _batches.values() for _, lengths in bs for n in lengths.tolist()) == [2, 3, 4, 5, 6]


# %% [markdown]
# ## Command line
#
# ```
# python -m picomaml.data prepare --src DIR_OR_FILES... --out DIR --seq-len N [--tokenizer PATH] [--rows-per-shard R] [--max-documents D]
# python -m picomaml.data hub-layout --shards DIR --out DIR [--rows-per-file R] [--split S]
# ```
# Without `--tokenizer`, the tokenizer is resolved as in `load_tokenizer` ($PICOMAML_DATA, then the Hub).
# `hub-layout` copies prepared shards into a local directory in the Hub layout, for `data.source=hub`
# with `data.train_hub` / `data.eval_hub` set to it (and `data.rows_per_file` to `--rows-per-file`).

# %%
#| export
def main(argv: list[str] | None = None) -> dict:
    "Entry point of `python -m picomaml.data`."
    parser = argparse.ArgumentParser(prog="python -m picomaml.data", description="Pico pretokenized data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize documents into parquet shards of seq_len + 1 ids")
    p.add_argument("--src", nargs="+", required=True,
                   help="directories or files of JSON lines (.json/.jsonl[.gz], `text` field) or .txt")
    p.add_argument("--out", required=True, help="output directory (must not already hold shards)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence; rows hold seq_len + 1 ids")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: $PICOMAML_DATA/tokenizer, else the Hub)")
    p.add_argument("--rows-per-shard", type=int, default=8192, help="rows per parquet shard")
    p.add_argument("--max-documents", type=int, default=0, help="stop after this many documents (0: all)")
    h = commands.add_parser("hub-layout", help="copy prepared shards into a local directory in the Hub layout "
                                               "(data/<split>-NNNNN-of-NNNNN.parquet)")
    h.add_argument("--shards", required=True, help="directory of shards made by `prepare`")
    h.add_argument("--out", required=True, help="output directory; files go under <out>/data/")
    h.add_argument("--rows-per-file", type=int, default=20480,
                   help="rows per file (data.rows_per_file; pretokenized-dolma: 20,480)")
    h.add_argument("--row-group-rows", type=int, default=1024,
                   help="rows per parquet row group (what a rank's read of its region decodes)")
    h.add_argument("--split", default="train",
                   help="split name in the file names (train; the evaluation split: data.eval_hub_split)")
    args = parser.parse_args(argv)
    for key, low in {"seq_len": 1, "rows_per_shard": 1, "max_documents": 0, "rows_per_file": 1,
                     "row_group_rows": 1}.items():
        if getattr(args, key, low) < low:
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least {low}")
    if args.command == "hub-layout":
        return write_hub_layout(args.shards, args.out, args.rows_per_file, args.split,
                                row_group_rows=args.row_group_rows)
    tokenizer = load_tokenizer(DataConfig(tokenizer_path=args.tokenizer))
    return prepare(args.src, args.out, args.seq_len, tokenizer, args.rows_per_shard, max_documents=args.max_documents)

if __name__ == "__main__" and "__file__" in globals(): run_command(main)

# %%
with tempfile.TemporaryDirectory() as tmp:
    m = main(["prepare", "--src", str(SHARED_DATA / "corpus" / "eval"), "--out", f"{tmp}/eval", "--seq-len", "128",
              "--tokenizer", tokenizer.source, "--max-documents", "3"])
    assert m["documents"] == 3 and len(ShardRows(f"{tmp}/eval", 129)) == m["rows"]
    layout = main(["hub-layout", "--shards", f"{tmp}/eval", "--out", f"{tmp}/hub", "--rows-per-file", "16",
                   "--split", "val"])
    assert layout["rows"] == m["rows"] and len(layout["files"]) == -(-m["rows"] // 16)
    cfg = DataConfig(source="hub", eval_hub=f"{tmp}/hub", seq_len=128)
    assert torch.equal(read_eval_rows(cfg, m["rows"]), ShardRows(f"{tmp}/eval", 129).rows(range(m["rows"])))
hub_tmp.cleanup()

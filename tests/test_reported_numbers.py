"""docs/reported_numbers.csv holds every number the two papers report, as data.

Table cells are keyed `p{paper}.t{N}.{row}.{column}` (slugs of the labels as printed, LaTeX's \\text dropped),
claims in the text, abstract and captions `p{paper}.text.{name}`. The shape of each table is written out below from
the papers. Where the papers sit beside the repository (../shared/papers), each table is also read from the paper's
text and every cell compared with the CSV, and every quoted claim is looked up in its paper.
"""
import csv
import re
from itertools import product
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "docs" / "reported_numbers.csv"
PAPERS = ROOT.parent / "shared" / "papers"
PAPER_FILES = {"1": "paper1-learning-dynamics-of-meta-pretraining.md", "2": "paper2-meta-pretraining-philippine-ner.md"}
COLUMNS = ["key", "paper", "source", "row", "column", "value", "low", "high", "unit", "printed", "claim"]

SIZES = ["tiny (%)", "small (%)", "medium (%)", "large (%)"]
LANGUAGES = ["Danish", "English", "Croatian", "Portuguese", "Swedish"]
DATASETS = ["da_ddt", "en_ewt", "hr_set", "pt_bosque", "sk_snk", "sr_set", "sv_talbanken", "zh_gsd", "zh_gsdsimp"]
TABLE_SHAPES = {
    ("1", "Table 2"): (["pico-decoder-tiny", "pico-maml-decoder-tiny", "pico-decoder-small", "pico-maml-decoder-small",
                        "pico-decoder-medium", "pico-maml-decoder-medium", "pico-decoder-large",
                        "pico-maml-decoder-large"],
                       ["Train Loss @6k", "Paloma Perplexity @6k"]),
    ("1", "Table 3"): (SIZES, ["Seen / Head", "Seen / Full", "Test-Only (PUD) / Head", "Test-Only (PUD) / Full",
                               "Test-Only (Other) / Head", "Test-Only (Other) / Full"]),
    ("1", "Table 4"): (["large (%)"], LANGUAGES),
    ("1", "Table 5"): (SIZES, LANGUAGES),
    ("1", "Table 6"): (["tiny / head", "small / head", "medium / head", "large / head",
                        "tiny / full", "small / full", "medium / full", "large / full"],
                       ["Overall", "Cebuano", "Tagalog (TRG)", "Tagalog (Ugnayan)"]),
    ("1", "Table 7"): (["vanilla_tiny", "maml_tiny", "vanilla_small", "maml_small",
                        "vanilla_medium", "maml_medium", "vanilla_large", "maml_large"], DATASETS),
    ("1", "Table 8"): (["Large (%)"], DATASETS),
    ("1", "Table 9"): (SIZES, DATASETS),
    ("2", "Table 2"): (["large / full", "large / head", "medium / full", "medium / head",
                        "small / full", "small / head", "tiny / full", "tiny / head"],
                       ["$\\Delta t_{90}$", "$\\Delta \\text{AUC}$", "$\\Delta \\text{slope}$"]),
    ("2", "Table 4"): (["PER", "LOC", "ORG"], ["# spans", "% single-token"]),
    ("2", "Table 5"): (["Tagalog", "Cebuano"], ["Particle recall", "OOV rate"]),
    ("2", "Table 7"): (["Parameter Count", "Hidden Dimension ( $d_{\\text{model}}$ )", "Feed-forward Dim",
                        "Training Time (6k steps)"], ["tiny", "small", "medium", "large"]),
}
REQUIRED_CLAIMS = [
    "p1.text.abstract-loss-speedup", "p1.text.abstract-ner-gain", "p1.text.loss-speedup",
    "p1.text.ner-gain-medium-large", "p1.text.absolute-f1-low", "p1.text.full-f1-gain",
    "p1.text.fig2-head-per-large", "p1.text.fig2-head-loc-large", "p1.text.fig2-head-org-small-medium",
    "p1.text.fig2-full-per-large", "p1.text.fig2-full-loc-large", "p1.text.fig2-full-org-large",
    "p1.text.t6-small-head-overall-vanilla", "p1.text.t6-small-head-overall-maml",
    "p1.text.t6-medium-head-overall-vanilla", "p1.text.t6-medium-head-overall-maml", "p1.text.phase-window-large",
    "p1.text.query-acc-small-medium", "p1.text.support-acc-small-medium", "p1.text.t6-small-head-overall-gain",
    "p2.text.zero-shot-head-gain", "p2.text.head-only-gain", "p2.text.head-gain-570m", "p2.text.relative-lift-570m",
    "p2.text.tiny-overall-gain", "p2.text.slovak-gain", "p2.text.croatian-gain", "p2.text.convergence-faster",
    "p2.text.full-gain", "p2.text.tiny-head-gain", "p2.text.t90-cut-percent", "p2.text.t90-cut-steps",
    "p2.text.per-single-token", "p2.text.tagalog-particle-rate",
]
NUMBER = re.compile(r"[+\-−–]?\d+(\.\d+)?(e[+-]?\d+)?")


def slug(label): return re.sub(r"[^a-z0-9]+", "-", label.replace("\\text", "").lower()).strip("-")  # drops LaTeX \\text


def number(cell):
    """The number a cell prints: "+151.1%" -> 151.1, "2 277" -> 2277, "0.113 $\\pm$ 0.000" -> 0.113, "11M" -> 11e6"""
    text = cell.replace(" ", "")
    match = NUMBER.match(text)
    if not match: return None
    scale = 1e6 if text[match.end():].startswith("M") else 1
    return float(match.group().replace("−", "-").replace("–", "-")) * scale


def tables(text):
    """{"Table N": its lines' cells}: the run of tab-separated lines just before each caption (blank lines between),
    or just after it where the caption heads its table (paper 1's appendix) and the run before is another's."""
    items = []  # runs of tab-separated lines (lists of cells) and other non-blank lines (str)
    for line in text.splitlines():
        if "\t" in line:
            cells = [cell.strip() for cell in line.split("\t")]
            if items and isinstance(items[-1], list): items[-1].append(cells)
            else: items.append([cells])
        elif line.strip():
            items.append(line.strip())
    found, used = {}, set()
    for i, item in enumerate(items):
        caption = isinstance(item, str) and re.match(r"(Table \d+):", item)
        for j in (i - 1, i + 1) if caption else ():
            if 0 <= j < len(items) and isinstance(items[j], list) and j not in used:
                found[caption.group(1)] = items[j]
                used.add(j)
                break
    return found


def cells(lines):
    """{(row, column): cell}; columns printing no number label the rows (joined with " / ", a blank repeats the one
    above); a second header line with a blank first cell is joined to the first ("Seen / Head")."""
    lines = [line for line in lines if any(line[1:])]  # drops a title line ("<b>...Model Comparison</b>")
    header, rows = lines[0], lines[1:]
    if not rows[0][0] and all(number(cell) is None for cell in rows[0]):
        top = [name or next(n for n in reversed(header[:j]) if n) for j, name in enumerate(header)]
        header, rows = [" / ".join(filter(None, pair)) for pair in zip(top, rows[0])], rows[1:]
    rows = [row + [""] * (len(header) - len(row)) for row in rows]
    labels = [j for j in range(len(header)) if all(number(row[j]) is None for row in rows)]
    out, last = {}, {}
    for row in rows:
        last.update({j: row[j] or last[j] for j in labels})
        name = " / ".join(last[j] for j in labels)
        out.update({(name, header[j]): row[j] for j in range(len(header)) if j not in labels})
    return out


@pytest.fixture(scope="module")
def rows():
    with CSV.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def is_cell(row): return re.fullmatch(r"p[12]\.t\d+\..+", row["key"]) is not None


def test_rows_are_well_formed(rows):
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "duplicate keys"
    for row in rows:
        assert row["paper"] in {"1", "2"} and row["key"].startswith(f"p{row['paper']}."), row["key"]
        assert row["value"] or row["low"] or row["high"] or row["printed"] == "N/A", row["key"]
        assert row["printed"] and row["unit"], row["key"]
        bounds = [float(row[name]) if row[name] else None for name in ("value", "low", "high")]
        assert None in bounds[1:] or bounds[1] <= bounds[2], row["key"]
        if is_cell(row):
            number_ = row["source"].removeprefix("Table ")
            assert row["key"] == f"p{row['paper']}.t{number_}.{slug(row['row'])}.{slug(row['column'])}", row["key"]
            assert not row["claim"], row["key"]
        else:
            assert re.fullmatch(r"p[12]\.text\.[a-z0-9-]+", row["key"]) and 0 < len(row["claim"]) <= 200, row["key"]
            assert not re.fullmatch(r"Table \d+", row["source"]), row["key"]


def test_table_shapes(rows):
    got = {}
    for row in filter(is_cell, rows):
        got.setdefault((row["paper"], row["source"]), []).append((row["row"], row["column"]))
    assert set(got) == set(TABLE_SHAPES)
    for table, (names, columns) in TABLE_SHAPES.items():
        assert sorted(got[table]) == sorted(product(names, columns)), table


def test_required_claims(rows):
    keys = {row["key"] for row in rows}
    assert not [key for key in REQUIRED_CLAIMS if key not in keys]


def papers():
    if not all((PAPERS / name).exists() for name in PAPER_FILES.values()):
        pytest.skip(f"needs the papers in {PAPERS}")
    return {paper: (PAPERS / name).read_text(encoding="utf-8") for paper, name in PAPER_FILES.items()}


def test_cells_match_the_papers(rows):
    by_cell = {(row["paper"], row["source"], row["row"], row["column"]): row for row in filter(is_cell, rows)}
    for paper, text in papers().items():
        found = tables(text)
        for (paper_, source), (names, columns) in TABLE_SHAPES.items():
            if paper_ != paper: continue
            table = cells(found[source])
            assert set(table) == set(product(names, columns)), (paper, source)
            for (name, column), cell in table.items():
                row = by_cell.get((paper, source, name, column))
                assert row and row["printed"] == cell, (paper, source, name, column)
                if number(cell) is None: assert row["value"] == "", row["key"]
                else: assert float(row["value"]) == pytest.approx(number(cell), abs=1e-12), row["key"]


def test_claims_quote_the_papers(rows):
    text = {paper: " ".join(body.split()) for paper, body in papers().items()}
    for row in rows:
        if is_cell(row): continue
        for quote in [row["printed"], *row["claim"].split(" … ")]:
            assert " ".join(quote.split()) in text[row["paper"]], (row["key"], quote)

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
# # The reproduction scorecard
#
# > One row per number the papers report: the paper's value, ours with its interval, and a verdict.
#
# The artifact exists to answer one question: do the papers' claims hold when their method is run
# again? This notebook answers it cell by cell. It reads two things: the papers' numbers
# (`docs/reported_numbers.csv`, every table cell and every quantitative claim of the text) and our
# regenerated tables (the `paper_tables/` that 21–24 just wrote), joined by the map
# `picomaml.report.PAPER_TABLES` (which of our rows and columns is which of the paper's). It writes
# `scorecard.md` and `scorecard.csv` beside those tables and prints a one-line summary; the pipeline
# runs it last, after every other analysis notebook.

# %% tags=["parameters"]
tables_dir = "../paper_tables"  # our regenerated tables; the scorecard is written here too
sizes = ["demo"]  # the sizes of the runs behind the tables (for the summary line)
paper_scale = False  # True when the runs are the papers' models (make paper, make released), not a demo or a rehearsal

# %%
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from picomaml.names import NEAR_ZERO_BASE
from picomaml.report import MISSING, PAPER_ROW, PAPER_TABLES, PaperTable, markdown_table, reported_numbers

# %% [markdown]
# Under `nbdev_test` (which sets `IN_TEST`) the notebook scores the committed demo tables and writes
# the scorecard to a scratch directory, so a test run never overwrites the committed one.

# %%
scorecard_dir = tempfile.mkdtemp(prefix="scorecard_") if os.environ.get("IN_TEST") else tables_dir

# %% [markdown]
# ## Reading a cell
#
# Our cells come in three shapes: `mean [low, high]` (a 95 % bootstrap interval over seeds and test
# sentences; a relative change may carry `(F1 m vs v)` after it), `mean ± sd (n=k)` (a spread over
# checkpoints), and a bare number (one run, or a property of the data). `our_interval` reads any of
# them as (mean, low, high); a bare number is taken as exact to `TOLERANCE` (5 %, relative), the
# precision at which the papers print their single runs. Anything else (`missing`, `n/a`, `not
# reached`) has no interval.

# %%
TOLERANCE = 0.05
_NUMBER = r"([+\-−]?[\d,]*\.?\d+(?:e[+\-]?\d+)?)"

def number(text: str) -> float:
    "A printed number as a float ('+1,234.5' and '−3' included)."
    return float(text.replace(",", "").replace("−", "-").replace(" ", ""))

def our_interval(cell: str) -> tuple | None:
    "(mean, low, high) of one of our cells, or None if it holds no number."
    cell = str(cell).strip()
    if m := re.match(rf"^{_NUMBER} \[{_NUMBER}, {_NUMBER}\]", cell): return tuple(number(g) for g in m.groups())
    if m := re.match(rf"^{_NUMBER} ± {_NUMBER}", cell):
        return (number(m[1]), number(m[1]) - number(m[2]), number(m[1]) + number(m[2]))
    if re.fullmatch(_NUMBER + r" ?%?", cell):
        value = number(cell.rstrip("% "))
        return (value, value - abs(value) * TOLERANCE, value + abs(value) * TOLERANCE)
    return None


# %%
assert our_interval("-13.4 [-46.7, +31.6] (F1 0.120 vs 0.140)") == (-13.4, -46.7, 31.6)
assert our_interval("0.053 ± 0.056 (n=8)") == (0.053, 0.053 - 0.056, 0.053 + 0.056)
assert our_interval("2,277") == (2277, 2277 * 0.95, 2277 * 1.05) and our_interval("87.6 %")[0] == 87.6
assert our_interval("0.000060 [0.000050, 0.000070]") == (6e-05, 5e-05, 7e-05)
assert all(our_interval(c) is None for c in (MISSING, "n/a", "not reached", "", "missing: pico-large-maml", "nan"))

# %% [markdown]
# The paper's side is a value or a range (`low`–`high`; "above 40 %" has a low end only), read from
# the transcription: `paper_range` gives the closed interval the paper claims, or None where it
# prints N/A.

# %%
def paper_range(record: dict) -> tuple | None:
    "(low, high) of a reported number (a value is its own range; an open end is infinite), or None."
    value, low, high = (record.get(k, "") for k in ("value", "low", "high"))
    if value: return (number(value), number(value))
    if not (low or high): return None
    return (number(low) if low else -np.inf, number(high) if high else np.inf)


# %%
assert paper_range({"value": "-8.3", "low": "", "high": ""}) == (-8.3, -8.3)
assert paper_range({"value": "", "low": "1.3", "high": "1.6"}) == (1.3, 1.6)
assert paper_range({"value": "", "low": "40", "high": ""}) == (40.0, np.inf) and paper_range({"value": ""}) is None

# %% [markdown]
# ## The verdict
#
# The rule, which the scorecard file states too:
#
# - **reproduced**: the paper's value (or range) lies in our interval, or overlaps it; for an effect
#   (a change of MAML over vanilla, or a speed-up), the reason notes when our interval also holds
#   "no effect", i.e. when our runs agree with the paper without showing the effect on their own;
# - **not reproduced**: our interval excludes the paper's value, or MAML never reached what the
#   paper says it reaches sooner;
# - **not comparable**: our runs are of another scale (the demo, the rehearsal) and the number
#   depends on scale, we have no run of that size, our cell holds no number or rests on a vanilla F1 of
#   about zero (a relative change of nothing), the paper prints N/A, or no output of the artifact
#   measures the claim.

# %%
RULE = ("Verdicts: reproduced = the paper's value (or range) lies in, or overlaps, our interval "
        "(a 95 % bootstrap interval over "
        f"seeds and test sentences; a bare number of ours is taken as exact to {TOLERANCE:.0%}); "
        "not reproduced = our interval "
        "excludes it (or MAML never reached the loss it reaches sooner in the paper); "
        "not comparable = our runs are of another "
        "scale, we have no run of that size, our cell holds no number or its vanilla F1 is about zero, "
        "the paper prints N/A, or no "
        "output of the artifact measures the claim.")

def verdict(ours: str, record: dict, spec: PaperTable, comparable: bool) -> tuple[str, str]:
    "(verdict, reason) for one of our cells against the paper's record (in our units: `spec.unit`), by RULE."
    claimed, interval = paper_range(record), our_interval(ours)
    claimed = claimed and (claimed[0] * spec.unit, claimed[1] * spec.unit)
    if claimed is None: return "not comparable", "the paper prints N/A"
    if NEAR_ZERO_BASE in str(ours):
        return "not comparable", "our vanilla F1 is about zero: the relative change is of nothing"
    if not comparable: return "not comparable", "our runs are of another scale"
    if str(ours).strip() == "not reached": return "not reproduced", "MAML never reached the vanilla arm's final loss"
    if interval is None: return "not comparable", f"our cell is {ours!r}" if ours else "our cell is empty"
    _, low, high = interval
    if claimed[1] < low or claimed[0] > high: return "not reproduced", "our interval excludes the paper's value"
    weak = spec.null is not None and low <= spec.null <= high and claimed != (spec.null, spec.null)
    return "reproduced", "our interval holds the paper's value" + (" and also no effect" if weak else "")


# %%
_change = PaperTable("1", "Table 3", {}, lambda key: key[0], null=0.0)
_rec = lambda value="", low="", high="": {"value": value, "low": low, "high": high}
assert verdict("-13.4 [-46.7, +31.6]", _rec("-8.3"), _change, True) == (
    "reproduced", "our interval holds the paper's value and also no effect")
assert verdict("+4.0 [+2.0, +6.0]", _rec("+4.8"), _change, True) == (
    "reproduced", "our interval holds the paper's value")
assert verdict("+4.0 [+2.0, +6.0]", _rec("-8.3"), _change, True)[0] == "not reproduced"
assert verdict("+4.0 [+2.0, +6.0]", _rec("+4.8"), _change, False) == ("not comparable", "our runs are of another scale")
assert verdict("2.25 [1.50, 3.00]", _rec(low="1.3", high="1.6"), _change, True)[0] == "reproduced"
assert verdict("not reached", _rec(low="1.3", high="1.6"), _change, True)[0] == "not reproduced"
# a rehearsal's outcome says nothing
assert verdict("not reached", _rec(low="1.3", high="1.6"), _change, False)[0] == "not comparable"
assert verdict(f"n/a (F1 0.2 vs 0.0; {NEAR_ZERO_BASE})", _rec("151.1"), _change, True)[0] == "not comparable"
_percent = PaperTable("1", "text", {}, lambda key: key[0], unit=0.01)  # the paper's "above 40 %", our fractions
assert verdict("0.450 [0.400, 0.500]", _rec(low="40"), _percent, True)[0] == "reproduced"
assert verdict("0.031", _rec(low="40"), _percent, True)[0] == "not reproduced"
assert (verdict("87.6", _rec("87.6"), _change, False)[0] == "not comparable"
        and verdict("5.0", _rec(), _change, True)[0] == "not comparable")

# %% [markdown]
# ## Every reported number, scored
#
# `our_cells` reads one of our tables and yields, for each of its rows with a counterpart in the
# paper, the paper's row label, our row's name and its cells; the paper's own rows (`paper: ...`,
# which `save_table` appends) are skipped. `score` then walks the transcription: a cell of a mapped
# table is scored against each of our rows that names its row (a text claim about every size, such
# as "1.3–1.6× sooner", against each size's row); a number no output of ours measures is listed as
# not comparable, so the scorecard has a row for every number the papers report.

# %%
def our_cells(spec: PaperTable, path: Path) -> list[tuple]:
    "(the paper's row label, our row's name, {column: cell}) for our rows of a table that have a counterpart."
    if not path.exists(): return []
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    ours = df[~df.iloc[:, 0].str.startswith(PAPER_ROW)]
    keys = lambda r: tuple(r[: spec.keys])
    return [(spec.row(keys(r)), " / ".join(keys(r)), dict(zip(df.columns, r))) for r in ours.itertuples(index=False)]

def score(tables_dir, paper_scale: bool) -> pd.DataFrame:
    "The scorecard: one row per reported number (and per our row that a text claim covers)."
    rows, scored = [], set()
    for name, spec in PAPER_TABLES.items():
        cells = our_cells(spec, Path(tables_dir) / f"{name}.csv")
        for record in spec.reported().to_dict("records"):
            theirs = record["key"] if spec.source == "text" else record["column"]
            column = next((c for c, label in spec.columns.items() if label == theirs), None)
            if column is None: continue  # a column of the paper's table that no output of ours measures
            scored.add(record["key"])
            mine = [(ours, values) for label, ours, values in cells if spec.covers(record, label)]
            if not mine:
                rows.append({**record, "our table": name, "our row": "", "ours": "", "verdict": "not comparable",
                             "reason": "we have no run of this row"})
            for ours, values in mine:
                v, why = verdict(values.get(column, ""), record, spec, paper_scale or column in spec.scale_free)
                rows.append({**record, "our table": name, "our row": ours, "ours": values.get(column, ""), "verdict": v,
                             "reason": why})
    unscored = reported_numbers()[~reported_numbers().key.isin(scored)].to_dict("records")
    rows += [{**r, "our table": "", "our row": "", "ours": "", "verdict": "not comparable",
              "reason": "no output of the artifact measures it"}
             for r in unscored]
    return pd.DataFrame(rows)

def summary(card: pd.DataFrame, sizes) -> str:
    "One line: how many comparisons were reproduced, not reproduced, and not comparable."
    n = card.verdict.value_counts()
    weak = card.reason.str.endswith("also no effect").sum()
    return (f"Scorecard ({', '.join(sizes)} runs): {n.get('reproduced', 0)} of {len(card)} comparisons reproduced "
            f"({weak} of them with an "
            f"interval that also holds no effect), {n.get('not reproduced', 0)} not reproduced, "
            f"{n.get('not comparable', 0)} not comparable "
            f"at this scale; {card.key.nunique()} reported numbers, a claim about several sizes compared once per size")


# %% [markdown]
# A toy check of the walk: a table 3 of ours with a `tiny (%)` row at the papers' scale scores its
# six cells against the paper's, and every other number the papers report still has its row.

# %%
with tempfile.TemporaryDirectory() as tmp:
    toy = pd.DataFrame({"model": ["tiny (%)", "demo (%)", PAPER_ROW + "tiny (%)"],
                        "seen head": ["-9.0 [-12.0, -6.0]", "+1.0", "-8.3"],
                        "seen full": ["+5.0 [+4.0, +6.0]", "+1.0", "-3.0"], "PUD head": [MISSING] * 3,
                        "PUD full": ["n/a"] * 3,
                        "other head": ["+0.0 [-50.0, +50.0]"] * 3, "other full": ["+1.0"] * 3})
    toy.to_csv(Path(tmp) / "p1_table3_relative_f1_by_group.csv", index=False)
    _card = score(tmp, paper_scale=True).set_index("key")
    assert (_card.loc["p1.t3.tiny.seen-head", "verdict"] == "reproduced"
            and _card.loc["p1.t3.tiny.seen-full", "verdict"] == "not reproduced")
    assert _card.loc["p1.t3.tiny.test-only-pud-head", "verdict"] == "not comparable"
    assert _card.loc["p1.t3.small.seen-head", "reason"] == "we have no run of this row"
    assert _card.loc["p1.t3.tiny.test-only-other-head", "reason"].endswith("also no effect") and _card.index.is_unique
    assert set(reported_numbers().key) <= set(_card.index) and len(_card) == len(reported_numbers())
    assert (score(tmp, paper_scale=False).set_index("key")
            .loc["p1.t3.tiny.seen-head", "reason"]) == "our runs are of another scale"

# %% [markdown]
# ## The scorecard of these runs

# %%
card = score(tables_dir, paper_scale)
line = summary(card, sizes)
columns = ["key", "paper", "source", "row", "column", "printed", "unit", "our table", "our row", "ours", "verdict",
           "reason"]
out = Path(scorecard_dir)
out.mkdir(parents=True, exist_ok=True)
shown = card[columns].rename(columns={"printed": "paper's value"})
shown.to_csv(out / "scorecard.csv", index=False, lineterminator="\n")
(out / "scorecard.md").write_text(f"# Reproduction scorecard\n\n**{line}**\n\n{RULE}\n\n{markdown_table(shown)}\n")
print(line)
card.groupby(["paper", "source", "verdict"]).size().unstack(fill_value=0)

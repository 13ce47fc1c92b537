"""docs/settings.md cannot drift from the configuration: every key it lists exists, every default it
states is the configuration's, and every configuration key is accounted for on the page."""
import dataclasses
import re
from pathlib import Path

import yaml

from picomaml.config import Config, coerce_value, flat_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))
KEY = re.compile(rf"`((?:{'|'.join(SECTIONS)})\.\w+)`")


def fields_by_key() -> dict:
    "`{'section.key': dataclasses.Field}` of the configuration."
    cfg = Config()
    return {f"{sec.name}.{f.name}": f
            for sec in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, sec.name))}


def keyed_rows(text: str) -> list[tuple[str, str]]:
    "(config key, value cell) of every table row whose last cell is one backticked key."
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) >= 2 and (m := re.fullmatch(KEY, cells[-1])): rows.append((m.group(1), cells[1]))
    return rows


def test_listed_defaults_are_the_configs():
    fields, defaults = fields_by_key(), flat_config(Config())
    rows = keyed_rows(DOC.read_text())
    assert len(rows) > 60, f"only {len(rows)} keyed rows parsed from {DOC}"
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)), f"keys listed twice: {sorted({k for k in keys if keys.count(k) > 1})}"
    for key, cell in rows:
        assert key in fields, f"{DOC.name} lists {key}, which the configuration does not have"
        literal = re.search(r"`([^`]*)`", cell)
        assert literal, f"{DOC.name}: the row of {key} states no default in backticks"
        listed = coerce_value(key, yaml.safe_load(literal.group(1)), fields[key])
        assert listed == defaults[key], (f"{DOC.name} says {key} defaults to {listed!r}; "
                                         f"the configuration says {defaults[key]!r}")


def test_every_key_is_accounted_for():
    text = DOC.read_text()
    mentioned, keys = set(KEY.findall(text)), set(flat_config(Config()))
    assert mentioned <= keys, f"{DOC.name} names keys the configuration does not have: {sorted(mentioned - keys)}"
    assert keys <= mentioned, (f"{DOC.name} does not mention {sorted(keys - mentioned)}: "
                               "add each to the table of unstated "
                               "settings (with its source), the table of stated ones, "
                               "or the list of settings that cannot change a result")

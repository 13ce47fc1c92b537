"""docs/released-trainer.md and the `released-*` presets cannot drift apart: every setting a row says a
`released-*` preset reproduces is what each preset resolves to, and every way a `released-*` preset differs
from its `pico-*` parent is named by some row."""
import re
from pathlib import Path

import pytest
import yaml

from picomaml.config import PRESETS_DIR, flat_config, load_config
from picomaml.names import PAPER_SIZES
from picomaml.plan import step_cost

DOC = Path(__file__).resolve().parent.parent / "docs" / "released-trainer.md"
# `section.key: value`, optionally followed by the sizes it applies to: `train.branch_batch: 64` (tiny)
SETTING = re.compile(r"`(\w+\.\w+): ([^`]+)`(?: \(([a-z, ]+)\))?")


def released_rows() -> list[list[str]]:
    "The cells of every departure row that a `released-*` preset reproduces."
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in DOC.read_text().splitlines()
            if re.match(r"\| \d+ \|", line)]
    return [r for r in rows if "`released-*`" in r[3]]


def documented(size: str) -> dict:
    "`{key: value}` of the settings the rows name for `size`."
    settings = {}
    for row in released_rows():
        for key, value, sizes in SETTING.findall(row[4]):
            if not sizes or size in [s.strip() for s in sizes.split(",")]: settings[key] = yaml.safe_load(value)
    return settings


def test_the_document_names_settings():
    assert len(released_rows()) >= 10 and all(len(documented(size)) >= 14 for size in PAPER_SIZES)
    assert documented("tiny")["train.branch_batch"] == 64 and documented("large")["train.branch_batch"] == 32


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_each_documented_setting_is_the_presets(size):
    resolved = flat_config(load_config(PRESETS_DIR / f"released-{size}-maml.yaml"))
    for key, value in documented(size).items():
        assert resolved[key] == value, f"released-{size}-maml: {key} is {resolved[key]!r}, {DOC.name} says {value!r}"


@pytest.mark.parametrize("size", PAPER_SIZES)
def test_every_departure_of_the_preset_is_documented(size):
    released = flat_config(load_config(PRESETS_DIR / f"released-{size}-maml.yaml"))
    paper = flat_config(load_config(PRESETS_DIR / f"pico-{size}-maml.yaml"))
    changed = {k for k in released if released[k] != paper[k]} - {"logging.run_name"}
    assert changed and changed <= set(documented(size)), (f"released-{size}-maml changes "
                                                          f"{sorted(changed - set(documented(size)))} undocumented")


def test_the_released_arm_is_a_small_share_of_a_paper_run():
    "docs/settings.md: the planner puts a released run under 10 % of the FLOPs of the same size's as-written MAML run."
    shares = {}
    for size in PAPER_SIZES:
        released, paper = (load_config(PRESETS_DIR / f"{family}-{size}-maml.yaml") for family in ("released", "pico"))
        assert released.train.steps == paper.train.steps
        shares[size] = step_cost(released, 4)[2] / step_cost(paper, 4)[2]
    assert all(0.03 < share < 0.10 for share in shares.values()), shares
    # the numbers docs/settings.md quotes
    assert [round(100 * shares[s], 1) for s in PAPER_SIZES] == [5.6, 5.8, 7.4, 8.8]

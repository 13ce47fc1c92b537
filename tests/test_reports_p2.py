"""Paper 2's analysis notebooks (nbs/23_paper2_ner, nbs/24_paper2_indicators) run by papermill:
every output is written with missing markers on an empty runs directory, a table equals a
recomputation from hand-written results, and a rerun is byte-identical."""
import json
import os
from pathlib import Path

import pandas as pd
import papermill
import pytest

from picomaml.names import OUTPUTS
from picomaml.report import PAPER_ROW

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
PH = ("tl_trg", "tl_ugnayan", "ceb_gja")
P2_FIGURES = [stem for key, stem in OUTPUTS.items() if key.startswith("p2_fig")]  # 23's and 24's figures
P2_TABLES = [stem for key, stem in OUTPUTS.items() if key.startswith("p2_table")]


@pytest.fixture(scope="module", autouse=True)
def kernel_env():
    # the kernel imports picomaml from this checkout even where the package is not pip-installed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        mp.delenv("IN_TEST", raising=False)
        yield


def execute(name, out_dir, **parameters):
    out = Path(out_dir) / "executed"
    out.mkdir(parents=True, exist_ok=True)
    # as the pipeline does: each notebook gets the parameters it declares
    declared = papermill.inspect_notebook(str(NBS / name))
    papermill.execute_notebook(str(NBS / name), str(out / name),
                               parameters={k: v for k, v in parameters.items() if k in declared},
                               kernel_name="python3", cwd=str(NBS), progress_bar=False)
    return out / name


def outputs(tmp):
    figs = [Path(tmp, "figures", f"{n}.{e}") for n in P2_FIGURES for e in ("png", "pdf")]
    tables = [Path(tmp, "tables", f"{n}.{e}") for n in P2_TABLES for e in ("md", "tex", "csv")]
    return figs, tables


def test_empty_runs_dir_writes_every_output_marked_missing(tmp_path):
    params = dict(runs_dir=str(tmp_path / "runs"), ner_dir=str(tmp_path / "runs" / "ner"),
                  figures_dir=str(tmp_path / "figures"), tables_dir=str(tmp_path / "tables"), sizes=["tiny", "large"])
    for nb in ("23_paper2_ner.ipynb", "24_paper2_indicators.ipynb"):
        execute(nb, tmp_path, **params)
    figs, tables = outputs(tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in figs + tables), \
        [p.name for p in figs + tables if not p.is_file()]
    for name in P2_TABLES:
        csv = pd.read_csv(tmp_path / "tables" / f"{name}.csv", dtype=str)
        csv = csv[~csv.iloc[:, 0].str.startswith(PAPER_ROW)]  # our rows; the paper's follow them
        assert (csv.drop(columns=[c for c in ("size", "regime", "entity", "language") if c in csv])
                .map(lambda c: c.startswith("missing")).all().all()), name
    t2 = pd.read_csv(tmp_path / "tables" / "p2_table2_finetuning_speed.csv")
    assert t2["size"].tolist()[:4] == ["tiny", "tiny", "large", "large"]  # the injected sizes, not the default ["demo"]
    assert t2["size"].tolist()[4:] == [PAPER_ROW + s for s in ("large", "large", "medium", "medium", "small", "small",
                                                               "tiny", "tiny")]


def record(arm, dataset, regime, t90, auc, slope, step=60, f1=0.2, **extra):
    return {"pretraining_run": f"pico-tiny-{arm}", "checkpoint": f"step_{step:06d}", "head": "crf", "regime": regime,
            "dataset": dataset, "dev_f1": 0.5, "test_f1": {s: f1 for s in PH}, "t90": t90, "auc": auc, "slope": slope,
            **extra}


# Hand-written results: Table 2's full-finetuning row for tiny is the mean over sk_snk and en_ewt of
# MAML − vanilla: t90 ((100 − 150) + (80 − 90)) / 2 = −30, AUC ((0.5 − 0.6) + (0.7 − 0.4)) / 2 = 0.1,
# slope ((−0.2 + 0.1) + (−0.1 + 0.1)) / 2 = −0.05. da_ddt has no vanilla run: it must not count.
# F1 0.5 on each set
COUNTS = {s: {"n": 4, "sentences": [[0, 1, 1, 1, 0, 0, 0, 0, 0, 0], [3, 0, 1, 1, 0, 0, 0, 0, 0, 0]]} for s in PH}
HAND = [record("maml", "sk_snk", "full", 100, 0.5, -0.2, f1=0.5, sentence_counts=COUNTS),
        record("vanilla", "sk_snk", "full", 150, 0.6, -0.1),
        record("maml", "en_ewt", "full", 80, 0.7, -0.1), record("vanilla", "en_ewt", "full", 90, 0.4, -0.1),
        record("maml", "da_ddt", "full", 1, 9.0, 9.0),
        record("maml", "sk_snk", "head", 40, 0.3, 0.0), record("vanilla", "sk_snk", "head", 20, 0.2, 0.0)]


# The sweep's UNER statistics (picomaml.ner_data.uner_statistics) with paper 2's numbers.
STATISTICS = {"finetuning": {"sk_snk": {"sentences": 8483,
                                        "spans": {"PER": {"spans": 2277, "single_token_share": 0.876},
                                                  "LOC": {"spans": 277, "single_token_share": 0.751},
                                                  "ORG": {"spans": 153, "single_token_share": 0.569}}}},
              "zero_shot": {"tl_trg+tl_ugnayan": {"particles": {"share": 0.113},
                                                  "oov": {"sk_snk": {"oov_token_rate": 0.523, "oov_type_rate": 0.6}}},
                            "ceb_gja": {"particles": {"share": 0.058},
                                        "oov": {"sk_snk": {"oov_token_rate": 0.534, "oov_type_rate": 0.6}}}}}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2")
    ner = tmp / "runs" / "ner"
    ner.mkdir(parents=True)
    side = {"tl_trg": {"words": [["Inahit", "ni", "John", "ang", "sarili", "niya", "."]],
                       "tags": [["O", "O", "B-PER", "O", "O", "O", "O"]],
                       "pred": [["O", "O", "B-PER", "O", "O", "O", "O"]],
                       "gold_prob": [[0.9, 0.9, 0.6, 0.9, 0.8, 0.8, 0.99]]}}
    (ner / "side.json").write_text(json.dumps(side))
    sweep = [record("maml", "sk_snk", "head", 40, 0.3, 0.0, step=s, f1=0.1 + s / 1000,
                    loss_curve=[2.0, 1.0, 0.5 + s / 1000],
                    dev_f1_curve=[0.1, 0.2], dev_f1_steps=[[1, 0.1], [2, 0.15], [3, 0.2]],
                    per_tag_f1={t: {"PER": 0.5, "LOC": 0.0, "ORG": 0.0} for t in PH}, predictions="side.json",
                    particle_recall={"tl_trg": {"after_particle": 1, "found_after_particle": 1},
                                     "tl_ugnayan": {"after_particle": 0, "found_after_particle": 0}})
             for s in (0, 20, 40)]
    (ner / "hand-results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in HAND + sweep))
    (ner / "hand-results-uner-statistics.json").write_text(json.dumps(STATISTICS))
    run = tmp / "runs" / "pico-tiny-maml"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5 - s / 10, "query_acc": s / 100}) + "\n"
                                                for s in range(1, 11)))
    params = dict(runs_dir=str(tmp / "runs"), ner_dir=str(ner), sizes=["tiny"], sweep_size="tiny", smoke=True)
    digests = []
    for rerun in range(2):
        for nb in ("23_paper2_ner.ipynb", "24_paper2_indicators.ipynb"):
            execute(nb, tmp, figures_dir=str(tmp / "figures"), tables_dir=str(tmp / "tables"), **params)
        figs, tables = outputs(tmp)
        digests.append({p.name: p.read_bytes() for p in figs + tables if p.suffix != ".pdf"})
    return tmp, digests


def test_table2_equals_recomputation_from_hand_written_results(filled):
    tmp, _ = filled
    t2 = pd.read_csv(tmp / "tables" / "p2_table2_finetuning_speed.csv", dtype=str).set_index(["size", "regime"])
    full = t2.loc[("tiny", "full")]
    # brackets: the bootstrap over the (task, seed) pairs; two pairs resample to means between their two deltas
    assert (full["tasks"], full["Δt90"], full["Δauc"], full["Δslope"]) == (
        "2", "-30.0 [-50.0, -10.0]", "0.100 [-0.100, 0.300]", "-0.050000 [-0.100000, 0.000000]")
    head = t2.loc[("tiny", "head")]  # the sweep's records at earlier checkpoints are not the final one
    assert (head["tasks"], head["Δt90"]) == ("1", "20.0")


def test_rerun_is_byte_identical(filled):
    _, (first, second) = filled
    assert first.keys() == second.keys() and len(first) == len(P2_FIGURES) + 3 * len(P2_TABLES)
    assert [k for k in first if first[k] != second[k]] == []


def test_filled_outputs_use_the_results(filled):
    tmp, _ = filled
    assert "checkpoint sweep: 4 record(s)" in (tmp / "executed" / "23_paper2_ner.ipynb").read_text()
    t5 = pd.read_csv(tmp / "tables" / "p2_table5_particles_oov.csv", dtype=str).set_index("language")
    # "ni John" found by the 3 sweep records
    assert t5.loc["Tagalog", "model recall after particle"] == "1.000 ± 0.000 (n=3)"
    assert t5.loc["Cebuano", "model recall after particle"] == "missing"  # the records have no ceb_gja counts
    assert (t5.loc["Tagalog", "OOV token rate"] == "0.523"
            and t5.loc["Cebuano", "particle share of PER spans"] == "0.058")
    t4 = pd.read_csv(tmp / "tables" / "p2_table4_span_statistics.csv", dtype=str).set_index("entity")
    assert t4.loc["PER"].tolist() == ["2,277", "87.6"]  # from the statistics file, not the UNER data

"""Paper 1 analysis notebooks run under papermill: every output with missing markers on an empty runs
directory, numbers equal to a recomputation from hand-written raw results, byte-identical reruns."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"pretraining": "21_paper1_pretraining.ipynb", "ner": "22_paper1_ner.ipynb"}
FIGURES = ["p1_fig1_loss_paloma", "p1_fig2_delta_f1_by_tag", "p1_fig3_support_query_acc", "p1_fig4_head_weights",
           "p1_fig5_per", "p1_fig6_phase_transition"]
TABLES = ["p1_table2_loss_paloma", "p1_table3_relative_f1_by_group", "p1_table4_relative_f1_head_per_language",
          "p1_table5_relative_f1_full_per_language", "p1_table6_zero_shot_ceb_tl", "p1_table7_head_only_f1",
          "p1_table8_relative_f1_head_per_language", "p1_table9_relative_f1_full_per_language", "p1_text_speedup",
          "p1_text_episode_accuracy"]
F1 = {  # (arm, regime, finetuning set) -> test-set micro-F1, chosen by hand
    ("maml", "head", "en_ewt"): {"en_ewt": 0.50, "da_ddt": 0.20, "de_pud": 0.30, "ceb_gja": 0.12, "tl_trg": 0.30},
    ("vanilla", "head", "en_ewt"): {"en_ewt": 0.40, "da_ddt": 0.25, "de_pud": 0.20, "ceb_gja": 0.10, "tl_trg": 0.00},
    ("maml", "head", "da_ddt"): {"en_ewt": 0.10, "da_ddt": 0.33, "de_pud": 0.10, "ceb_gja": 0.05, "tl_trg": 0.10},
    ("vanilla", "head", "da_ddt"): {"en_ewt": 0.10, "da_ddt": 0.30, "de_pud": 0.10, "ceb_gja": 0.05, "tl_trg": 0.10},
    ("maml", "full", "en_ewt"): {"en_ewt": 0.60, "da_ddt": 0.30, "de_pud": 0.40, "ceb_gja": 0.20, "tl_trg": 0.25},
    ("vanilla", "full", "en_ewt"): {"en_ewt": 0.60, "da_ddt": 0.20, "de_pud": 0.40, "ceb_gja": 0.25, "tl_trg": 0.25},
}


def counts(f1: float) -> dict:
    """Per-sentence counts (picomaml.crf_metrics.sentence_counts) of 20 sentences with one gold and one predicted PER
    each, round(20 f1) correct: F1 = f1."""
    return {"n": 20, "sentences": [[i, int(i < round(20 * f1)), 1, 1, 0, 0, 0, 0, 0, 0] for i in range(20)]}


PARAMETERS = {"pretraining": lambda runs: {"loss_window": 4, "smooth": 3},
              "ner": lambda runs: {"ner_results": [str(runs / "ner" / "*-results.jsonl")]}}


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_runs(root: Path) -> Path:
    """A runs directory with the demo arms' metrics and a NER results file of known values."""
    for arm, offset in [("maml", 0.0), ("vanilla", 1.0)]:
        write_jsonl(root / f"demo-{arm}" / "metrics.jsonl", [
            {"step": s, "loss": 9.0 - s / 10 + offset,
             "next_token_loss": None if (arm == "maml" and s % 2) else 9.0 - s / 10 + offset,
             "query_acc": 0.03 + s / 1000 if arm == "maml" else None, "support_acc": 0.05 if arm == "maml" else None,
             "head_weight_mean": 0.0 if arm == "maml" else None, "head_weight_std": 0.1 if arm == "maml" else None,
             **({"paloma_ppl": 500.0 - s - 100 * offset, "paloma_doc_ppl": 510.0 - s - 100 * offset}
                if s % 10 == 0 else {})}
            for s in range(1, 41)])
    records = [{"pretraining_run": f"demo-{arm}", "checkpoint": f"runs/demo-{arm}/checkpoints/step_{step:06d}",
                "head": "linear", "regime": regime, "dataset": dataset, "dev_f1": 0.5,
                "test_f1": f1 if step == 40 else {k: 0.99 for k in f1}, "test_strict_f1": f1,
                "per_tag_f1": {k: {"PER": v, "LOC": v / 2, "ORG": 0.0} for k, v in f1.items()},
                **({"sentence_counts": {k: counts(v) for k, v in f1.items()}}
                   if regime == "full" else {})}  # intervals for the full runs
               for (arm, regime, dataset), f1 in F1.items()
               for step in (20, 40)]  # step 20: an earlier checkpoint, ignored
    write_jsonl(root / "ner" / "demo-results.jsonl", records)
    return root


def execute(name: str, runs: Path, out: Path) -> None:
    # the kernel imports picomaml
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.pop("IN_TEST", None)
    notebook = str(ROOT / "nbs" / NOTEBOOKS[name])
    parameters = {"runs_dir": str(runs), "figures_dir": str(out / "figures"), "tables_dir": str(out / "tables"),
                  "smoke": True, **PARAMETERS[name](runs)}
    # as the pipeline does: each notebook gets the parameters it declares
    declared = papermill.inspect_notebook(notebook)
    papermill.execute_notebook(notebook, str(out / f"{name}.ipynb"), kernel_name="python3", cwd=str(ROOT / "nbs"),
                               progress_bar=False, parameters={k: v for k, v in parameters.items() if k in declared})


def outputs(out: Path) -> dict:
    files = sorted((out / "figures").glob("*.png")) + sorted((out / "tables").iterdir())
    return {p.name: p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    out = tmp_path_factory.mktemp("empty")
    for name in NOTEBOOKS: execute(name, out / "runs", out)
    return out


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    out, again = tmp_path_factory.mktemp("filled"), tmp_path_factory.mktemp("again")
    runs = make_runs(tmp_path_factory.mktemp("runs"))
    for name in NOTEBOOKS: execute(name, runs, out); execute(name, runs, again)
    return out, again


def test_empty_runs_dir_writes_every_output_marked_missing(empty):
    for name in FIGURES:
        assert ((empty / "figures" / f"{name}.png").stat().st_size > 0
                and (empty / "figures" / f"{name}.pdf").stat().st_size > 0)
    for name in TABLES:
        for ext in ("md", "tex", "csv"):
            assert "missing" in (empty / "tables" / f"{name}.{ext}").read_text(), (name, ext)
    assert not (ROOT / "nbs" / "runs").exists()  # the injected runs_dir was used, not the default


def test_injected_parameters_override_defaults(empty):
    executed = json.loads((empty / "ner.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and str(empty / "runs") in "".join(injected[0]["source"])
    # the default sizes=["demo"] still apply
    assert "demo-maml" in (empty / "tables" / "p1_table2_loss_paloma.md").read_text()


def test_table7_and_table3_equal_a_recomputation_from_the_raw_results(filled):
    out, _ = filled
    table7 = pd.read_csv(out / "tables" / "p1_table7_head_only_f1.csv", dtype=str,
                         keep_default_na=False).set_index("model")
    # not the step-20 0.99
    assert table7.loc["maml_demo", "en_ewt"] == f"{F1[('maml', 'head', 'en_ewt')]['en_ewt']:.3f}"
    assert table7.loc["vanilla_demo", "da_ddt"] == f"{F1[('vanilla', 'head', 'da_ddt')]['da_ddt']:.3f}"
    assert table7.loc["maml_demo", "sk_snk"] == "missing"
    seen = lambda arm, regime: np.mean([f1[t] for (a, r, _), f1 in F1.items() if (a, r) == (arm, regime)
                                        for t in ("en_ewt", "da_ddt")])
    table3 = pd.read_csv(out / "tables" / "p1_table3_relative_f1_by_group.csv", dtype=str,
                         keep_default_na=False).set_index("model")
    change = lambda cell: float(cell.split(" (F1 ")[0])  # a relative cell: 'change (F1 maml vs vanilla[; base ≈ 0])'
    absolute = lambda cell: tuple(float(x) for x in cell.split(" (F1 ")[1].split(";")[0].rstrip(")").split(" vs "))
    seen_head = table3.loc["demo (%)", "seen head"]
    assert change(seen_head) == pytest.approx(100 * (seen("maml", "head") / seen("vanilla", "head") - 1), abs=0.05)
    assert absolute(seen_head) == pytest.approx((seen("maml", "head"), seen("vanilla", "head")), abs=6e-4)  # 3 decimals
    pud = 100 * (np.mean([0.30, 0.10]) / np.mean([0.20, 0.10]) - 1)
    assert change(table3.loc["demo (%)", "PUD head"]) == pytest.approx(pud, abs=0.05)
    table6 = pd.read_csv(out / "tables" / "p1_table6_zero_shot_ceb_tl.csv", dtype=str,
                         keep_default_na=False).set_index(["model", "regime"])
    assert (table6.loc[("demo", "head"), "Tagalog (TRG)"].startswith("n/a (F1 ")
            and "base ≈ 0" in table6.loc[("demo", "head"), "Tagalog (TRG)"])
    assert table6.loc[("demo", "head"), "Tagalog (Ugnayan)"] == "missing"
    cell = table6.loc[("demo", "full"), "Cebuano"]  # full runs kept per-sentence counts: the value and its interval
    point, low, high = (float(x)
                        for x in cell.split(" (F1 ")[0].replace("[", "").replace("]", "").replace(",", "").split())
    # MAML's correct sentences are vanilla's minus one
    assert point == pytest.approx(-20.0) and cell.startswith("-20.0 [") and low <= point <= high <= 0
    assert "[" not in table6.loc[("demo", "head"), "Cebuano"]  # no counts, one seed: no interval
    assert "Brackets: 95 % percentile interval" in (out / "tables" / "p1_table6_zero_shot_ceb_tl.md").read_text()


def test_table2_equals_a_recomputation_from_the_metrics(filled):
    out, _ = filled
    table2 = pd.read_csv(out / "tables" / "p1_table2_loss_paloma.csv", dtype=str,
                         keep_default_na=False).set_index("model")
    maml_loss = np.mean([9.0 - s / 10 for s in (38, 40)])  # next-token steps among the last 4 (odd steps were episodes)
    objective = np.mean([9.0 - s / 10 for s in (37, 38, 39, 40)])  # the logged objective of every step
    assert table2.loc["demo-maml", "train loss: next-token CE (language modelling)"] == f"{maml_loss:.2f}"
    assert table2.loc["demo-maml", "train loss: logged objective (the paper's)"] == f"{objective:.2f}"
    assert table2.loc["demo-maml", "Paloma ppl: token-weighted"] == "460.00"
    assert table2.loc["demo-maml", "Paloma ppl: per-document mean (the paper's)"] == "470.00"
    assert (table2.loc["demo-vanilla", "step"] == "40"
            and table2.loc["demo-vanilla", "Paloma ppl: token-weighted"] == "360.00")


def test_rerun_on_unchanged_inputs_is_byte_identical(filled):
    out, again = filled
    first, second = outputs(out), outputs(again)
    assert len(first) == len(FIGURES) + 3 * len(TABLES) and first == second

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
# # Names
#
# > One home for every name that more than one stage uses: model sizes and arms, run directory
# > names, the Universal NER dataset groups and entity types, and the files the two papers' outputs
# > are written to.
#
# Pretraining writes `runs/<run name>/`, the NER grids read checkpoints from there, and the report
# notebooks find the runs again by parsing the same names. When two places spelled a name each in
# their own way, a run made with `--seeds 1 2 3` was named one way by the pipeline and looked for
# under another by the grids. Everything below is plain data and string functions with no heavy
# imports, so the analysis notebooks can use it without pulling in the model or the data code.

# %%
#| default_exp names

# %%
#| export
from __future__ import annotations

import hashlib
import re

# %% [markdown]
# ## Sizes, arms, seeds
#
# Paper 1 §3.1: four Pico sizes, d = 96/384/768/1536. Each is pretrained twice, the **maml** arm
# (rho = 0.5) and the matched **vanilla** arm (rho = 0). `demo` is the CPU demo's architecture (the
# tiny model on 128-token rows). A run's pretraining seed is `train.seed`, 42 in every preset.

# %%
#| export
PAPER_SIZES = ("tiny", "small", "medium", "large")
SIZES = ("demo", *PAPER_SIZES)
ARMS = ("maml", "vanilla")
FAMILIES = ("pico", "released", "demo")  # the paper presets, the released trainer's presets, the CPU demo
DEFAULT_SEED = 42  # TrainConfig.seed: the presets' own seed, whose runs carry no seed suffix

# %% [markdown]
# Every random stream of a run (the data order of each epoch, the SMLMT episode of each step, the
# hybrid branch draws, the shuffle of the pretraining pool, the inner loop's dropout) is seeded by
# one function of its coordinates: a hash of `(seed, step, ..., tag)`. Neighbouring seeds and steps
# give unrelated streams (a sum like `seed + step` would make seed 1 step 0 equal seed 0 step 1),
# the tag keeps two streams of one step apart, and no process needs another's RNG state.

# %%
#| export
def mix_seed(*parts) -> int:
    "A 63-bit seed from (seed, step, micro-step, tag, ...), stable across processes and runs."
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

# %%
assert mix_seed(42, 7, "smlmt") == mix_seed(42, 7, "smlmt") < 2**63
assert len({mix_seed(1, 0), mix_seed(0, 1), mix_seed(0, 1, "branch"), mix_seed(0, 1, "smlmt")}) == 4

# %% [markdown]
# ## Run names
#
# `pico-<size>-<arm>` for the paper presets, `released-<size>-maml` for the released trainer's,
# `demo-<arm>` for the CPU demo. A run with another pretraining seed than the presets' 42 carries
# `-seed<k>`, and `k` *is* its `train.seed`; so `pipeline paper --seeds 42 1 2` makes `pico-tiny-maml`,
# `pico-tiny-maml-seed1` and `pico-tiny-maml-seed2`, and no two names can hold the same run.
# `parse_run_name` is the exact inverse.

# %%
#| export
RUN_NAME = re.compile(r"^(?P<family>pico|released|demo)-(?:(?P<size>tiny|small|medium|large)-)?"
                      r"(?P<arm>maml|vanilla)(?:-seed(?P<seed>\d+))?$")

def run_name(size: str, arm: str, seed: int = DEFAULT_SEED, family: str | None = None) -> str:
    "The run directory name of a size, arm and pretraining seed (the inverse of `parse_run_name`)."
    family = family or ("demo" if size == "demo" else "pico")
    base = f"{family}-{arm}" if family == "demo" else f"{family}-{size}-{arm}"
    return base + ("" if seed == DEFAULT_SEED else f"-seed{seed}")

def parse_run_name(name: str) -> dict | None:
    "`{family, size, arm, seed}` of a run directory name, or None if it is not a run name."
    m = RUN_NAME.match(name)
    # demo has no size; the others need one
    if m is None or (m["family"] == "demo") == (m["size"] is not None): return None
    seed = int(m["seed"]) if m["seed"] else DEFAULT_SEED
    if m["seed"] and seed == DEFAULT_SEED: return None  # `-seed42` would be a second name for the unsuffixed run
    return {"family": m["family"], "size": m["size"] or "demo", "arm": m["arm"], "seed": seed}


# %%
assert run_name("large", "maml") == "pico-large-maml" and run_name("demo", "vanilla", 2) == "demo-vanilla-seed2"
assert run_name("small", "maml", 42, family="released") == "released-small-maml"
assert all(parse_run_name(run_name(s, a, k)) == {"family": "demo" if s == "demo" else "pico", "size": s, "arm": a,
                                                 "seed": k}
           for s in SIZES for a in ARMS for k in (DEFAULT_SEED, 0, 3))
assert parse_run_name("pico-large-maml")["seed"] == 42 and parse_run_name("pico-large-maml-seed0")["seed"] == 0
assert parse_run_name("pico-large-maml-seed42") is None  # one name per run
assert (parse_run_name("demo-tiny-maml") is None and parse_run_name("pico-maml") is None
        and parse_run_name("ner") is None)

# %% [markdown]
# ## Universal NER datasets
#
# Paper 1 §3.4 and paper 2 §2.5: nine treebanks with train/dev/test splits (the in-language sets,
# also the finetuning sources, with `all` their union), six test-only Parallel UD sets, and three
# test-only sets in Cebuano and Tagalog, the zero-shot targets. Entity types are PER, LOC and ORG
# (UNER's OTH is mapped to O).

# %%
#| export
IN_LANGUAGE = ("da_ddt", "en_ewt", "hr_set", "pt_bosque", "sk_snk", "sr_set", "sv_talbanken", "zh_gsd", "zh_gsdsimp")
PUD = ("de_pud", "en_pud", "pt_pud", "ru_pud", "sv_pud", "zh_pud")
TAGALOG, CEBUANO = ("tl_trg", "tl_ugnayan"), ("ceb_gja",)
PHILIPPINE = ("ceb_gja", "tl_trg", "tl_ugnayan")  # paper 1's "other" group: the zero-shot targets
OTHER = PHILIPPINE
GROUPS = {"in-language": IN_LANGUAGE, "pud": PUD, "other": OTHER}
TEST_SETS = IN_LANGUAGE + PUD + OTHER
SOURCES = IN_LANGUAGE + ("all",)  # finetuning sources; `all` is the nine training sets together
ENTITY_TYPES = ("PER", "LOC", "ORG")

# %%
assert len(TEST_SETS) == len(set(TEST_SETS)) == 18 and set(TAGALOG + CEBUANO) == set(PHILIPPINE)

# %% [markdown]
# ## The papers' outputs
#
# Every generated table and figure of both papers (paper 2's Tables 1 and 3 and Figure 8 are
# hand-written linguistics), by the file stem the report notebooks write: `<stem>.png`/`.pdf` for a
# figure, `<stem>.md`/`.tex`/`.csv` for a table. 31 in all.

# %%
#| export
OUTPUTS = {
    "p1_fig1": "p1_fig1_loss_paloma", "p1_fig2": "p1_fig2_delta_f1_by_tag", "p1_fig3": "p1_fig3_support_query_acc",
    "p1_fig4": "p1_fig4_head_weights", "p1_fig5": "p1_fig5_per", "p1_fig6": "p1_fig6_phase_transition",
    "p1_table2": "p1_table2_loss_paloma", "p1_table3": "p1_table3_relative_f1_by_group",
    "p1_table4": "p1_table4_relative_f1_head_per_language", "p1_table5": "p1_table5_relative_f1_full_per_language",
    "p1_table6": "p1_table6_zero_shot_ceb_tl", "p1_table7": "p1_table7_head_only_f1",
    "p1_table8": "p1_table8_relative_f1_head_per_language", "p1_table9": "p1_table9_relative_f1_full_per_language",
    "p2_fig1": "p2_fig1_scale_curve", "p2_fig2": "p2_fig2_regime", "p2_fig3": "p2_fig3_zero_shot_by_language",
    "p2_fig4": "p2_fig4_learning_curve_fan", "p2_fig5": "p2_fig5_checkpoint_metrics",
    "p2_fig6": "p2_fig6_per_entity_f1",
    "p2_fig7": "p2_fig7_token_confidence", "p2_fig9": "p2_fig9_case_studies", "p2_fig10": "p2_fig10_train_loss",
    "p2_fig11": "p2_fig11_paloma", "p2_fig12": "p2_fig12_query_acc", "p2_fig13": "p2_fig13_support_acc",
    "p2_fig14": "p2_fig14_head_weight_mean", "p2_fig15": "p2_fig15_head_weight_std",
    "p2_table2": "p2_table2_finetuning_speed", "p2_table4": "p2_table4_span_statistics",
    "p2_table5": "p2_table5_particles_oov",
}
FIGURE_SUFFIXES, TABLE_SUFFIXES = (".png", ".pdf"), (".md", ".tex", ".csv")

def output_files(output: str) -> list[str]:
    "The file names an output (`p1_fig1`, `p2_table4`, ...) is written as."
    stem = OUTPUTS[output]
    return [stem + s for s in (FIGURE_SUFFIXES if "_fig" in output else TABLE_SUFFIXES)]


# %%
assert len(OUTPUTS) == 31 and all(stem.startswith(key + "_") for key, stem in OUTPUTS.items())
assert output_files("p1_table2") == ["p1_table2_loss_paloma.md", "p1_table2_loss_paloma.tex",
                                     "p1_table2_loss_paloma.csv"]

# %% [markdown]
# A relative-change cell (paper 1's "(%)" tables) carries the two absolute F1 it was computed from,
# `(F1 <maml> vs <vanilla>)`, and the mark `NEAR_ZERO_BASE` when the vanilla F1's 95 % interval
# reaches below `NEAR_ZERO_F1`: there one entity span more or less moves the ratio by tens of percent,
# so the report and `make compare` read such a cell by its absolute F1, not its ratio. Both live here
# because the report notebooks write the mark and the dev tools (which import no plotting) read it.

# %%
#| export
NEAR_ZERO_F1 = 0.02  # absolute F1: a vanilla base whose interval reaches below it is within noise of zero
NEAR_ZERO_BASE = "base ≈ 0"

# %% [markdown]
# ## Checkpoint directories
#
# A run's checkpoints are `checkpoints/step_NNNNNN/` (six digits, zero-padded, so names sort by
# step); `picomaml.checkpoints` owns what is inside them. Parsing a step back from a name is needed
# by readers that must not import torch (the reports), so it lives here.

# %%
#| export
STEP_DIR = re.compile(r"^step_(\d{6,})$")

def step_dir_name(step: int) -> str:
    "The checkpoint directory name of optimizer step `step`."
    return f"step_{step:06d}"

def step_of(path) -> int | None:
    "The step of a checkpoint directory name or a path ending in one, else None."
    m = STEP_DIR.match(str(path).rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


# %%
assert step_dir_name(100) == "step_000100" and step_of("runs/x/checkpoints/step_000100/") == 100
assert (step_of("step_1") is None and step_of("runs/x/checkpoints") is None
        and step_of(step_dir_name(1234567)) == 1234567)


# %% [markdown]
# ## Spectra records
#
# `spectra.jsonl` holds one record per step, layer, matrix and kind (weights or gradients), written
# by `picomaml.spectra` and read by the reports.

# %%
#| export
SPECTRA_KEY = ["step", "layer", "matrix", "kind"]

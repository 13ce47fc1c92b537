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
# # Configuration
#
# > Nested dataclasses whose defaults are the papers' values; YAML presets and `section.key=value`
# > overrides change them, and nothing else can.
#
# Every hyperparameter of both papers lives here, with the section of the paper that states it;
# `docs/settings.md` lists every setting the papers leave unstated, with the source of our value.
# The released trainer (pico-maml-train) silently dropped YAML keys it did not know (its
# `fabric.devices` and, in some versions, `n_way`/`k_shot` among them; `docs/released-trainer.md`), and
# loaded others it never used (the head dropout, departure 7). Here an unknown or
# mistyped key is an error that names the key and lists the valid ones, a value of the wrong type is
# an error that names the expected type, and every run saves the configuration it actually resolved.

# %%
#| default_exp config

# %%
#| export
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from picomaml.runlog import write_text_atomic


# %% [markdown]
# ## One option, one comment
#
# `opt` is a dataclass field that carries its own help text, so `--help` can print every option
# with the comment that explains it; `choices` restricts a string option to a fixed set, and `ge`,
# `gt`, `le` bound a number (`maml.rho=1.5` or a negative learning rate is an error naming the key,
# not a silently different run or a torch traceback at step 1).

# %%
#| export
def opt(default, help: str, choices: tuple | None = None, *, ge=None, gt=None, le=None, name: bool = False):
    ("A dataclass field with a default, a help comment, optional allowed values, numeric bounds, "
     "or `name`: one directory name.")
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "name": name}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# %% [markdown]
# ## The sections
#
# **model** — the Pico decoder (paper 1 §3.1, paper 2 §2.2 and Table 6). The defaults are the medium
# size; the `pico-{tiny,small,medium,large}` presets set `d_model` and `ffn_hidden` to 96/384/768/1536
# and 4d. Neither paper states an initialisation, and paper 1 §3.1 keeps "the design choices and
# hyperparameter choices of the original Pico decoder models", so `init` defaults to pico-train's,
# which is PyTorch's own module initialisation (`01_model` says what that is and tests it); `normal`
# (N(0, 0.02), the GPT-2/LLaMA convention) remains an option. Every setting the papers leave unstated
# is listed, with its source, in `docs/settings.md`.

# Every section is made checked: `Section.__post_init__` checks each value against its field (type,
# choices, bounds: `check_value`, below) and then the section's own rules between its keys, so a
# `TrainConfig(global_batch=100)` built in code fails as `train.global_batch=100` on the command line
# does, and no module downstream needs to check a range again.

# %%
#| export
class Section:
    ("Base of the config sections: made checked (every value, then the section's `rules`); "
     "its key is its class name's stem.")
    def __post_init__(self): check_section(self)

    def rules(self) -> str:
        "Why this section's values cannot go together (naming the keys and what to change), or ''."
        return ""

def section_key(section) -> str:
    "The section's name in `section.key=value`: ModelConfig -> model, SMLMTConfig -> smlmt."
    return type(section).__name__.removesuffix("Config").lower()


# %%
#| export
@dataclass
class ModelConfig(Section):
    d_model: int = opt(768, "hidden size d (tiny 96, small 384, medium 768, large 1536)", ge=1)
    n_layers: int = opt(12, "decoder blocks", ge=1)
    n_heads: int = opt(12, "query heads of grouped-query attention", ge=1)
    n_kv_heads: int = opt(4, "key/value heads (each serves n_heads / n_kv_heads query heads)", ge=1)
    ffn_hidden: int = opt(3072, "SwiGLU hidden size, 4d in the papers", ge=1)
    vocab_size: int = opt(50304, "embedding rows: the OLMo tokenizer's 50,280 ids padded to 50,304", ge=1)
    max_seq_len: int = opt(2048, "longest sequence the RoPE cache covers", ge=1)
    rope_theta: float = opt(10000.0, "RoPE base frequency", gt=0)
    norm_eps: float = opt(1e-6, "RMSNorm epsilon (computed in float32)", gt=0)
    init: str = opt("pytorch", "weight initialisation. pytorch: PyTorch's module defaults, as pico-train (nn.Linear "
                    "U(-1/sqrt(fan_in), 1/sqrt(fan_in)), nn.Embedding N(0, 1)); normal: every linear and embedding "
                    "weight N(0, init_std)",
                    choices=("pytorch", "normal"))
    init_std: float = opt(0.02, "standard deviation of init=normal (the GPT-2/LLaMA value); unused by init=pytorch",
                          gt=0)

    def rules(self) -> str:
        if self.d_model % self.n_heads:
            return f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
        if self.n_heads % self.n_kv_heads:
            return f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}"
        if (self.d_model // self.n_heads) % 2:
            return f"head dim model.d_model/model.n_heads={self.d_model // self.n_heads} must be even for RoPE"
        return ""


# %% [markdown]
# **data** — pretokenized rows in Pico's format (paper 1 §3.3: Dolma "already tokenised and chunked
# by Pico"; the dataset and tokenizer names are paper 2 App. F, Table 6). `source: auto` takes a
# local path if one is set, else `$PICOMAML_DATA/pretokenized/<split>` if it exists, else streams
# the Hub dataset named next to it; `source: hub` always streams, and `train_hub`/`eval_hub` may
# also name a local directory laid out like the Hub dataset (parquet files under `data/`), which is
# how the rehearsal tests the streaming path without a network.

# %%
#| export
@dataclass
class DataConfig(Section):
    source: str = opt("auto", "auto: local path, else $PICOMAML_DATA, else the Hub; hub: always stream `*_hub`",
                      choices=("auto", "hub"))
    train_path: str = opt("", "local directory of parquet shards for pretraining; empty: the Hub dataset `train_hub`")
    train_hub: str = opt("pico-lm/pretokenized-dolma",
                         "Hub dataset (or a local directory in its layout) of pretraining rows")
    rows_per_file: int = opt(20480, "rows in each parquet file of a streamed dataset (pretokenized-dolma: 20,480); "
                             "a row's file is its position // rows_per_file, so a resumed run opens that file", ge=1)
    eval_path: str = opt("", "local directory of parquet shards for Paloma evaluation; "
                             "empty: the Hub dataset `eval_hub`")
    eval_hub: str = opt("pico-lm/pretokenized-paloma-tinsy",
                        "Hub dataset (or a local directory in its layout) of Paloma rows")
    eval_hub_split: str = opt("val", "split of `eval_hub` to stream")
    tokenizer_path: str = opt("", "local tokenizer.json; empty: $PICOMAML_DATA/tokenizer, else the Hub tokenizer")
    tokenizer_hub: str = opt("allenai/OLMo-7B-0724-hf", "Hub repository of the OLMo tokenizer")
    seq_len: int = opt(2048, "tokens per training sequence; shard rows hold seq_len + 1 ids", ge=1)
    row_len: int = opt(0, "ids per stored row; 0: seq_len + 1. Longer rows are read cropped to their last "
                          "seq_len + 1 ids (the released trainer: the last 512 of pretokenized-dolma's 2,049)", ge=0)
    eos_id: int = opt(50279, "end-of-document id of the OLMo tokenizer", ge=0)
    mask_id: int = opt(50280, "[MASK] id: the first free padded embedding row (no vocabulary resize)", ge=0)

    def rules(self) -> str:
        if 0 < self.row_len <= self.seq_len:
            return (f"data.row_len={self.row_len} is shorter than data.seq_len + 1 = {self.seq_len + 1}: "
                    f"a row must hold a whole "
                    f"training sequence and its last target; set data.row_len to the ids of each stored row, or 0")
        return ""


# %% [markdown]
# **train** — the outer optimisation (paper 1 §3.3: "micro batches of 256 sequences are accumulated
# eight times giving an effective batch of 2048 (1024 for the 11M model)"; paper 2 §2.4 says the
# same). The 256 sequences are those of all four GPUs together, which is what makes 8 × 256 = 2,048
# (`docs/settings.md` explains this reading of paper 1 §3.3's "each GPU streams micro batches of
# 256"). Two things are kept apart. The **branch micro-batch** (`branch_batch`, counted over all
# ranks) is the unit of the hybrid rule: each one is drawn MAML or next-token, and it is also an
# episode's pool; an optimizer step takes `global_batch / branch_batch` of them (8, or 4 for tiny).
# The **memory chunk** (`chunk_rows`, per rank) is how many rows a device runs forward and backward
# at once: a matter of memory that never changes the gradient (`06_lm_loss` tests this), chosen by the
# planner (`06_plan`) to fit the device when left at 0.
#
# The papers state AdamW, peak lr 3e-4, 2,500 warmup steps, cosine decay and bf16 mixed precision
# (paper 1 §3.3, paper 2 §2.4 and Table 6), nothing more of the optimiser. The vanilla arm is meant to
# be the Pico model they compare against, so the rest is pico-train's `torch.optim.AdamW(params, lr)`:
# PyTorch's betas (0.9, 0.999), eps 1e-8 and weight decay 0.01, and no gradient clipping. The common
# LLM choices (beta2 0.95, clipping at 1.0) stay reachable as `train.beta2=0.95 train.grad_clip=1.0`.

# %%
#| export
@dataclass
class TrainConfig(Section):
    steps: int = opt(6000, "optimizer steps", ge=1)
    global_batch: int = opt(2048, "sequences per optimizer step, over all ranks (1,024 for tiny)", ge=1)
    branch_batch: int = opt(256, "sequences of one hybrid draw over all ranks: a next-token micro-batch or "
                                 "an episode's pool", ge=1)
    chunk_rows: int = opt(0, "rows each rank runs forward/backward at once (memory only); "
                             "0: the largest the device fits", ge=0)
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward: "
                                                "less memory, ~1/3 more compute")
    lr: float = opt(3e-4, "peak AdamW learning rate", gt=0)
    warmup_steps: int = opt(2500, "linear warmup steps", ge=0)
    schedule: str = opt("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    decay_steps: int = opt(0, "steps over which the schedule decays; 0: `steps`", ge=0)
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak", ge=0, le=1)
    weight_decay: float = opt(0.01, "AdamW weight decay (torch.optim.AdamW's default, as pico-train)", ge=0)
    beta1: float = opt(0.9, "AdamW beta1 (PyTorch's default, as pico-train)", ge=0, le=0.999999)
    beta2: float = opt(0.999, "AdamW beta2 (PyTorch's default, as pico-train; 0.95 is the common LLM choice)",
                       ge=0, le=0.999999)
    eps: float = opt(1e-8, "AdamW epsilon (PyTorch's default, as pico-train)", gt=0)
    grad_clip: float = opt(0.0, "max global gradient norm; 0: no clipping "
                                "(pico-train and the released trainer clip nothing)", ge=0)
    device: str = opt("auto", "auto: the launch's GPUs when CUDA is usable, else CPU processes (said on one line); "
                      "cuda: GPUs, or a one-line error naming why CUDA is unusable; cpu: CPU processes",
                      choices=("auto", "cuda", "cpu"))
    precision: str = opt("auto", "auto: bf16-mixed on GPUs of compute capability 8.0 or newer, else 32-true",
                         choices=("auto", "bf16-mixed", "32-true", "16-mixed"))
    collective_timeout_s: float = opt(1800.0, "seconds a collective (NCCL, gloo) waits for the other ranks "
                                      "before the job fails (PyTorch's default, 30 minutes)", gt=0)
    seed: int = opt(42, "seed of data order, episodes, branch draws and initialisation", ge=0)

    def rules(self) -> str:
        if self.global_batch % self.branch_batch:
            return (f"train.global_batch={self.global_batch} must be a multiple of "
                    f"train.branch_batch={self.branch_batch} "
                    f"(paper: 2048 = 8 × 256); change one of them")
        return ""


# %% [markdown]
# **checkpoint** — what a run keeps (paper 2 App. F, Table 6: every 100 steps). Every scheduled step
# keeps its weights, which the spectra and paper 2's checkpoint sweep read; step 0 (the
# initialisation) is always written, since paper 2 sweeps from it. The full training state (AdamW
# moments, about 8 bytes a parameter, and every rank's RNG) is what a resume needs and nothing else
# does, so only the newest `keep_state` checkpoints hold it: 61 checkpoints × 8 runs of optimizer
# state would be on the order of a terabyte.

# %%
#| export
@dataclass
class CheckpointConfig(Section):
    every: int = opt(100, "write a checkpoint every this many optimizer steps (step 0 and the last step always)", ge=1)
    log_spaced: bool = opt(False, "also checkpoint at steps 1, 2, 4, 8, ... (as Pythia)")
    keep_state: int = opt(2, "newest checkpoints that keep the optimizer and RNG state for resuming; "
                             "older ones keep weights", ge=1)
    resume: bool = opt(True, "resume from the run directory's newest valid checkpoint")
    resume_from: str = opt("", "resume from this checkpoint (e.g. step_000400) instead of the newest; "
                               "later steps are redone")


# %% [markdown]
# **smlmt** — subset-masked LM episodes (paper 1 §3.2, paper 2 §2.3; Bansal et al. 2020). Both
# papers use N = 32 and K = 4, with a query set disjoint from the support set. How an episode is cut
# from pretokenized rows they leave open: `docs/settings.md` lists our choices, `04_smlmt` makes them.

# %%
#| export
@dataclass
class SMLMTConfig(Section):
    n_way: int = opt(32, "classes (masked words) per episode", ge=2)
    k_shot: int = opt(4, "support windows per class", ge=1)
    q_query: int = opt(4, "query windows per class, disjoint from the support windows", ge=1)
    window: int = opt(64, "tokens per episode window around each occurrence", ge=2)
    readout: str = opt("last", "feature position: last window token, or the [MASK] itself", choices=("last", "mask"))
    pool_rows: int = opt(0, "rows (over all ranks) an episode draws from; 0: the branch micro-batch itself "
                            "(the papers)", ge=0)
    episode_scope: str = opt("gathered", "one episode from the pool gathered over ranks (paper 1 Algorithm 1), "
                                         "or one per rank from its own rows (the released trainer)",
                             choices=("gathered", "rank"))
    query_source: str = opt("disjoint", "query windows at other occurrences than the support's (the papers), "
                                        "or the support windows themselves (the released trainer; "
                                        "needs q_query = k_shot)", choices=("disjoint", "support"))
    min_word_chars: int = opt(3, "shortest eligible class word, in characters", ge=1)
    exclude_top: int = opt(100, "the most frequent ids of the pool (stop words) are never classes", ge=0)

    def rules(self) -> str:
        if self.query_source == "support" and self.q_query != self.k_shot:
            return (f"smlmt.query_source=support makes the query set the support set, so smlmt.q_query "
                    f"({self.q_query}) must equal smlmt.k_shot ({self.k_shot})")
        return ""


# %% [markdown]
# **maml** — the first-order MAML hybrid step (paper 2 §2.3 and App. F, Table 6; paper 1 App. A,
# Algorithm 1). With probability `rho` a micro-batch is an episode, else next-token loss; `rho` = 0
# is the vanilla arm.

# %%
#| export
@dataclass
class MAMLConfig(Section):
    rho: float = opt(0.5, "probability that a micro-batch is a MAML episode (0: vanilla)", ge=0, le=1)
    inner_steps: int = opt(10, "inner-loop SGD steps T on the support loss", ge=0)
    inner_lr: float = opt(1e-3, "inner-loop learning rate alpha (the released trainer used 0.01)", ge=0)
    head_layers: int = opt(4, "layers of the MLP head adapted in the inner loop", ge=1)
    head_hidden: int = opt(128, "hidden width of the MLP head", ge=1)
    head_dropout: float = opt(0.1, "dropout in the MLP head (never applied by the released trainer)", ge=0, le=0.999999)
    head_init: str = opt("xavier", "initialisation of the head's linear layers", choices=("xavier", "default"))
    head_output: str = opt("classes", "N-way outputs, or the released trainer's vocabulary-indexed head",
                           choices=("classes", "vocab"))


# %% [markdown]
# **eval** — Paloma perplexity every 100 steps and at step 0 (paper 1 §3.3, paper 2 §2.4), as
# pico-train measures it: every document of the split on its own, read once at the start of the run
# (`03_data`); `max_documents` bounds it where a run must be cheap (the CPU demo).

# %%
#| export
@dataclass
class EvalConfig(Section):
    every: int = opt(100, "evaluate every this many optimizer steps; 0 disables", ge=0)
    max_documents: int = opt(0, "Paloma documents evaluated (the split's first), each on its own; "
                                "0: the whole split, as pico-train", ge=0)
    batch_size: int = opt(16, "evaluation documents per device per forward", ge=1)


# %% [markdown]
# **spectra** — singular values and proportional effective rank (paper 1 §6) every 100 steps
# (paper 1 §3.3, paper 2 §2.4), of the matrices that paper 2 App. F, Table 6 names.

# %%
#| export
@dataclass
class SpectraConfig(Section):
    every: int = opt(100, "record spectra every this many optimizer steps; 0 disables", ge=0)
    layers: list = opt(["attention.v_proj", "attention.o_proj", "swiglu.w_2"], "matrices analysed in every block")
    grad_rows: int = opt(0, "rows of the evaluation split (its first) whose mean next-token loss gives the gradients; "
                         "0: every row of the split, as pico-train's learning-dynamics gradient", ge=0)
    grad_batch: int = opt(0, "rows per forward/backward of the gradient pass, accumulated over grad_rows "
                          "(memory only); 0: the largest the device fits", ge=0)


# %% [markdown]
# **ner** — Universal NER finetuning (paper 1 §3.4, paper 2 §2.5).

# %%
#| export
@dataclass
class NERConfig(Section):
    data_path: str = opt("", "local UNER directory (<dataset>/<dataset>-ud-<split>.iob2); "
                             "empty: $PICOMAML_DATA/uner, else the Hub")
    data_hub: str = opt("universalner/universal_ner", "Hub dataset of Universal NER")
    head: str = opt("linear", "token classifier: linear (paper 1) or linear-chain CRF (paper 2)",
                    choices=("linear", "crf"))
    regime: str = opt("head", "head: backbone frozen; full: every weight trains", choices=("head", "full"))
    train_sets: list = opt(["sk_snk"], "finetuning sources; `all` is the nine training sets together")
    lr: float = opt(3e-5, "AdamW learning rate (0: nothing trains, as the early-stopping test uses)", ge=0)
    epochs: int = opt(10, "at most this many epochs", ge=1)
    patience: int = opt(2, "stop after this many epochs without a better dev micro-F1", ge=1)
    dev_every: int = opt(100, "also score dev micro-F1 every this many optimizer steps (a step-wise learning curve); "
                              "0: per epoch only", ge=0)
    batch_size: int = opt(16, "sentences per step", ge=1)
    max_len: int = opt(512, "sub-tokens per window; longer sentences are split, never truncated", ge=2)
    seed: int = opt(0, "seed of the head initialisation and the batch order", ge=0)
    cache_features: bool = opt(True, "head-only: compute the frozen backbone's features once and train on the cache")
    particles: list = opt(["si", "ni"], "case particles before a PER span that paper 2 Table 5 counts "
                          "(its text names si/ni; "
                          "[si, ni, ang, ng, sa, kay] adds the common-noun markers and kay)")
    precision: str = opt("auto", "backbone passes: auto is bf16 autocast on GPUs of compute capability 8.0 or newer, "
                         "else 32-true; "
                         "the heads and the CRF always compute in float32", choices=("auto", "bf16-mixed", "32-true"))


# %% [markdown]
# **logging** — where a run writes and what it reports.

# %%
#| export
@dataclass
class LoggingConfig(Section):
    runs_dir: str = opt("runs", "parent directory of run directories")
    run_name: str = opt("pico-maml", "this run's directory under runs_dir (one name: no '/', not '..')", name=True)
    log_every: int = opt(1, "write a metrics line every this many optimizer steps", ge=1)
    progress_bar: bool = opt(True, "a progress bar on rank 0")
    wandb_project: str = opt("", "log to this Weights & Biases project; empty: off")
    tensorboard: bool = opt(False, "also write TensorBoard logs")
    hub_repo: str = opt("", "upload every checkpoint to this Hub model repository as a revision; empty: off")


# %%
#| export
@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    smlmt: SMLMTConfig = field(default_factory=SMLMTConfig)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    spectra: SpectraConfig = field(default_factory=SpectraConfig)
    ner: NERConfig = field(default_factory=NERConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self): check_config(self)


# %% [markdown]
# ## Checking one value
#
# A value is checked against its field's type; an `int` is accepted where a `float` is expected
# (YAML 1.1 reads `1e-3` as a string and `3` as an int, so numeric strings are parsed first).

# %%
#| export
class ConfigError(ValueError):
    "A configuration key or value that cannot be used; the message says which and what to do."

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list}

def coerce_value(key: str, value, f: dataclasses.Field):
    "Return `value` as field `f`'s type, or raise ConfigError naming `key`."
    want = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
    if isinstance(value, str) and want in (int, float):
        try: value = want(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        except ValueError: pass
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool): value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{key}: expected {want.__name__}, got {value!r} ({type(value).__name__})")
    if f.metadata.get("name") and (value in ("", ".", "..") or "/" in value or "\\" in value):
        raise ConfigError(f"{key}={value!r} must be one directory name (no '/', not '..'): the run is written to "
                          f"<logging.runs_dir>/<{key.split('.')[-1]}>, and a path would put it elsewhere")
    if f.metadata.get("name") and len(value.encode()) > 255:  # NAME_MAX of Linux and macOS file systems
        raise ConfigError(f"{key} is {len(value.encode())} bytes long: a directory name may have at most 255; "
                          f"choose a shorter one")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    bounds = [(name, limit) for name, limit in (("ge", f.metadata.get("ge")), ("gt", f.metadata.get("gt")),
                                                ("le", f.metadata.get("le")))
              if limit is not None]
    for name, limit in bounds:
        if not {"ge": value >= limit, "gt": value > limit, "le": value <= limit}[name]:
            allowed = " and ".join(f"{_BOUND_WORDS[n]} {lim}" for n, lim in bounds)
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")
    return value

_BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<="}

# %%
from picomaml.devtools import raises

_f = {f.name: f for f in dataclasses.fields(TrainConfig)}
assert coerce_value("train.lr", "1e-3", _f["lr"]) == 1e-3
assert coerce_value("train.lr", 3, _f["lr"]) == 3.0
for bad in ("fast", True):
    raises(lambda: coerce_value("train.steps", bad, _f["steps"]), "train.steps: expected int", kind=ConfigError)
_name = {f.name: f for f in dataclasses.fields(LoggingConfig)}["run_name"]
assert coerce_value("logging.run_name", "pico-tiny-maml-seed1", _name) == "pico-tiny-maml-seed1"
for bad in ("../elsewhere", "a/b", "..", ""):
    raises(lambda: coerce_value("logging.run_name", bad, _name), "must be one directory name", kind=ConfigError)
raises(lambda: coerce_value("logging.run_name", "x" * 256, _name), "logging.run_name is 256 bytes long")
raises(lambda: coerce_value("train.schedule", "cosin", _f["schedule"]), "'cosine'", kind=ConfigError)
_m = {f.name: f for f in dataclasses.fields(MAMLConfig)}
for key, field_, bad in (("maml.rho", _m["rho"], 1.5), ("maml.rho", _m["rho"], -0.1), ("train.lr", _f["lr"], -1e-3),
                         ("train.lr", _f["lr"], 0.0)):
    e = raises(lambda: coerce_value(key, bad, field_), kind=ConfigError)
    assert str(e).startswith(f"{key}={bad!r} is out of range"), e
assert coerce_value("maml.rho", 1, _m["rho"]) == 1.0 and coerce_value("maml.rho", 0, _m["rho"]) == 0.0


# %% [markdown]
# ## Checking a section and the whole configuration
#
# A section is checked when it is made (`Section.__post_init__`): every value as above, then its own
# rules (the model's head shapes, the batch that must split into branch micro-batches, a query set
# that is the support set). The `Config` then checks the rules that span sections: an episode's
# window must fit in a training row. Overrides set one value at a time (`d_model` before `n_heads`
# may pass through a shape that does not divide), so `load_config` checks the rules once more when
# every override is in, and the error names the keys to change.

# %%
#| export
def check_section(section: Section) -> None:
    "Check every value of `section` (type, choices, bounds), then its rules; ConfigError naming the key."
    key = section_key(section)
    for f in dataclasses.fields(section):
        setattr(section, f.name, coerce_value(f"{key}.{f.name}", getattr(section, f.name), f))
    if problem := section.rules(): raise ConfigError(problem)

def config_rules(cfg: Config) -> str:
    "Why values of different sections cannot go together, or ''."
    if cfg.maml.rho > 0 and cfg.smlmt.window > cfg.data.seq_len + 1:
        return (f"smlmt.window={cfg.smlmt.window} is longer than a training row "
                f"(data.seq_len + 1 = {cfg.data.seq_len + 1}); "
                f"lower smlmt.window or raise data.seq_len")
    return ""

def check_config(cfg: Config) -> None:
    "Every section's rules, then the rules across sections; ConfigError naming the keys."
    for f in dataclasses.fields(cfg):
        if problem := getattr(cfg, f.name).rules(): raise ConfigError(problem)
    if problem := config_rules(cfg): raise ConfigError(problem)


# %%
cfg = Config()
assert cfg.model.d_model == 768 and cfg.maml.rho == 0.5 and cfg.smlmt.n_way == 32
assert cfg.spectra.layers is not Config().spectra.layers  # list defaults are not shared between configs
# made like an override: an int read as a float
assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)
raises(lambda: MAMLConfig(rho=1.5), "maml.rho=1.5 is out of range", kind=ConfigError)
raises(lambda: TrainConfig(global_batch=100, branch_batch=64), "train.global_batch=100 must be a multiple",
       kind=ConfigError)
raises(lambda: ModelConfig(d_model=100, n_heads=12), "model.d_model=100 is not divisible by model.n_heads=12",
       kind=ConfigError)
raises(lambda: SMLMTConfig(query_source="support", q_query=2), "smlmt.q_query (2) must equal smlmt.k_shot (4)",
       kind=ConfigError)
raises(lambda: DataConfig(seq_len=511, row_len=500), "data.row_len=500 is shorter", kind=ConfigError)
raises(lambda: Config(smlmt=SMLMTConfig(window=64), data=DataConfig(seq_len=32)), "smlmt.window=64", kind=ConfigError)
# no episodes
assert Config(smlmt=SMLMTConfig(window=64), data=DataConfig(seq_len=32), maml=MAMLConfig(rho=0)).data.seq_len == 32


# %% [markdown]
# ## Applying overrides
#
# Presets and the command line both become a nested dict `{section: {key: value}}` that is applied
# on top of the defaults. An unknown section or key is an error listing the valid names and the
# closest match.

# %%
#| export
def _unknown(kind: str, name: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"unknown {kind} {name!r}{where}.{hint} Valid: {', '.join(valid)}")

def apply_overrides(cfg: Config, overrides: dict, source: str = "") -> Config:
    "Apply a nested `{section: {key: value}}` dict to `cfg` in place, checking every key and type."
    where = f" in {source}" if source else ""
    sections = [f.name for f in dataclasses.fields(cfg)]
    for sec, values in (overrides or {}).items():
        if sec not in sections: raise _unknown("section", sec, sections, where)
        if not isinstance(values, dict): raise ConfigError(f"section {sec!r}{where} must be a mapping of key: value")
        obj = getattr(cfg, sec)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in fields: raise _unknown("key", f"{sec}.{key}", [f"{sec}.{k}" for k in fields], where)
            try: setattr(obj, key, coerce_value(f"{sec}.{key}", value, fields[key]))
            except ConfigError as e: raise ConfigError(f"{e} (set{where})") from None  # which file holds the bad value
    return cfg


# %%
cfg = apply_overrides(Config(), {"model": {"d_model": 96, "ffn_hidden": 384}, "maml": {"rho": 0}})
assert (cfg.model.d_model, cfg.maml.rho) == (96, 0.0)
raises(lambda: apply_overrides(Config(), {"maml": {"head_droput": 0.0}}, "x.yaml"),
       "maml.head_droput", "x.yaml", "maml.head_dropout", kind=ConfigError)
raises(lambda: apply_overrides(Config(), {"optim": {"lr": 1}}), "unknown section 'optim'", "train", kind=ConfigError)


# %% [markdown]
# ## Presets
#
# A preset is a YAML file of overrides. It may start from another preset with `extends: other.yaml`
# (a path relative to the preset), so `released-small-maml.yaml` is `pico-small-maml.yaml` plus the
# released trainer's departures. A file that is not valid YAML or not a mapping is an error naming it.

# %%
#| export
def read_preset(path) -> dict:
    "Read a YAML preset (following `extends:`) into one nested override dict."
    path = Path(path)
    if not path.is_file(): raise ConfigError(f"config file {path} does not exist")
    try: data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e: raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict): raise ConfigError(f"config file {path} must be a mapping of section: {{key: value}}")
    parent = data.pop("extends", None)
    merged = read_preset(path.parent / parent) if parent else {}
    for sec, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(sec), dict): merged[sec] = {**merged[sec], **values}
        else: merged[sec] = values
    return merged


# %% [markdown]
# ## Command-line overrides
#
# `section.key=value`; the value is parsed as YAML (`[a, b]` is a list, `1e-3` a number).

# %%
#| export
def parse_override(arg: str) -> dict:
    "Turn `section.key=value` into `{section: {key: value}}`."
    name, sep, raw = arg.partition("=")
    if not sep or name.count(".") != 1:
        raise ConfigError(f"override {arg!r} must look like section.key=value (e.g. train.steps=100)")
    sec, key = name.split(".")
    try: value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError: value = raw
    return {sec: {key: value}}


# %%
assert parse_override("train.steps=10") == {"train": {"steps": 10}}
assert parse_override("spectra.layers=[attention.q_proj]") == {"spectra": {"layers": ["attention.q_proj"]}}
assert parse_override("logging.run_name=abc") == {"logging": {"run_name": "abc"}}


# %% [markdown]
# ## Loading, saving, help
#
# `load_config` is what every entry point calls: defaults, then the preset, then the command line.
# `save_config` writes the resolved configuration next to a run's outputs; reading that file back as
# a preset reproduces the run's configuration exactly.

# %%
#| export
def load_config(preset=None, overrides: typing.Sequence[str] = ()) -> Config:
    "Defaults, then a YAML preset, then `section.key=value` overrides."
    cfg = Config()
    if preset: apply_overrides(cfg, read_preset(preset), str(preset))
    for arg in overrides: apply_overrides(cfg, parse_override(arg), "the command line")
    check_config(cfg)  # the rules between keys, once every value is in
    return cfg

def config_dict(cfg: Config) -> dict:
    "The configuration as a plain nested dict."
    return dataclasses.asdict(cfg)

def save_config(cfg: Config, path) -> Path:
    "Write the resolved configuration as YAML, atomically."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, yaml.safe_dump(config_dict(cfg), sort_keys=False))


# %%
import tempfile

with tempfile.TemporaryDirectory() as tmp:
    cfg = load_config(None, ["model.d_model=96", "maml.rho=0", "train.lr=1e-3", "spectra.layers=[attention.q_proj]"])
    assert (cfg.model.d_model, cfg.maml.rho, cfg.train.lr) == (96, 0.0, 1e-3)
    assert load_config(save_config(cfg, Path(tmp) / "config.yaml")) == cfg
    (Path(tmp) / "base.yaml").write_text("train: {steps: 10, lr: 1.0e-3}\n")
    (Path(tmp) / "child.yaml").write_text("extends: base.yaml\ntrain: {steps: 20}\n")
    child = load_config(Path(tmp) / "child.yaml")
    assert (child.train.steps, child.train.lr) == (20, 1e-3)

# %%
#| hide
with tempfile.TemporaryDirectory() as tmp:
    save_config(cfg, Path(tmp) / "config.yaml")
    (Path(tmp) / "config.yaml").write_text((Path(tmp) / "config.yaml").read_text().replace("rho: 0.0", "rho: 5.0"))
    raises(lambda: load_config(Path(tmp) / "config.yaml"),
           f"maml.rho=5.0 is out of range: it must be >= 0 and <= 1 (set in {tmp}")
    (Path(tmp) / "bad.yaml").write_text("train: [1, 2\n")
    raises(lambda: load_config(Path(tmp) / "bad.yaml"), "bad.yaml", kind=ConfigError)


# %%
#| export
def format_help(cfg: Config | None = None) -> str:
    "Every option as `section.key (type, default): comment`."
    cfg = cfg or Config()
    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            choices = f.metadata.get("choices")
            extra = f" one of {'|'.join(choices)}" if choices else ""
            default = getattr(getattr(cfg, sec.name), f.name)
            lines.append(f"  {sec.name}.{f.name} ({f.type}, {default!r}{extra}): {f.metadata['help']}")
    return "\n".join(lines)


# %%
help_text = format_help()
n_options = sum(len(dataclasses.fields(getattr(Config(), s.name))) for s in dataclasses.fields(Config))
assert help_text.count("\n  ") == n_options and "maml.head_dropout (float, 0.1)" in help_text
print("\n".join(help_text.splitlines()[:12]))

# %% [markdown]
# ## What a resumed run may change
#
# A run continues bit for bit only under the configuration it started with. Relaunching it with, say,
# `maml.rho=0 train.lr=0.1` would silently continue as a different run whose first steps were
# trained otherwise. So a resume compares the new configuration with the run's `config.yaml`: keys
# that cannot alter the training trajectory (where and how often it logs, evaluates, records spectra
# and checkpoints, how rows are chunked in memory, which device it runs on, how many steps it runs, the NER settings that
# pretraining never reads) may change, and every other difference is refused with the list of
# differences. `train.steps` may grow: with the default cosine schedule over `steps` the remaining
# learning rates then follow the longer schedule, which is what extending a run means. A deliberate
# branch from an earlier checkpoint (`checkpoint.resume_from`) may change anything; the change is
# recorded with the step it took effect.

# %%
#| export
RESUME_MAY_CHANGE = ("logging.", "eval.", "spectra.every", "spectra.grad_batch", "checkpoint.", "train.chunk_rows",
                     "train.activation_checkpointing", "train.device", "train.collective_timeout_s", "train.steps",
                     "ner.")

def flat_config(cfg) -> dict:
    "`{'section.key': value}` of a Config or of its nested dict."
    tree = cfg if isinstance(cfg, dict) else config_dict(cfg)
    return {f"{sec}.{key}": value for sec, values in tree.items() for key, value in values.items()}

def config_changes(old, new) -> tuple[dict, dict]:
    "(changes that alter the training trajectory, changes that may be made on resume), each `{key: (old, new)}`."
    before, after = flat_config(old), flat_config(new)
    changed = {k: (before.get(k), after[k]) for k in after if before.get(k) != after[k]}
    safe = {k: v for k, v in changed.items() if k.startswith(RESUME_MAY_CHANGE)}
    return {k: v for k, v in changed.items() if k not in safe}, safe


# %%
_old = load_config(None, ["maml.rho=0.5"])
_bad, _ok = config_changes(_old, load_config(None, ["maml.rho=0", "train.lr=0.1", "train.seed=7", "eval.every=50",
                                                    "train.steps=8000"]))
assert _bad == {"maml.rho": (0.5, 0.0), "train.lr": (3e-4, 0.1), "train.seed": (42, 7)}
assert _ok == {"eval.every": (100, 50), "train.steps": (6000, 8000)}
assert config_changes(config_dict(_old), _old) == ({}, {})  # a saved config.yaml read back compares equal


# %% [markdown]
# ## Where local data lives
#
# `$PICOMAML_DATA` names a local directory of the Hub's formats (pretokenized rows, the tokenizer,
# Universal NER) that every reader prefers to the Hub; set to anything but a directory, it is an
# error rather than a silent fall-back to the network.

# %%
#| export
def local_data_dir() -> Path | None:
    ("`$PICOMAML_DATA` as a directory, None when unset; set to anything but a directory is an error, "
     "never a silent fall-back.")
    env = os.environ.get("PICOMAML_DATA")
    if not env: return None
    if not Path(env).is_dir():
        raise ConfigError(f"PICOMAML_DATA={env} is not a directory: point it at a directory with pretokenized/, "
                          f"tokenizer/ and uner/ "
                          f"(see the README, 'Where data comes from'), or unset it to read the Hub")
    return Path(env)


# %%
with tempfile.TemporaryDirectory() as _tmp:
    _before = os.environ.get("PICOMAML_DATA")
    try:
        os.environ["PICOMAML_DATA"] = _tmp
        assert local_data_dir() == Path(_tmp)
        os.environ["PICOMAML_DATA"] = str(Path(_tmp) / "missing")
        raises(local_data_dir, "is not a directory", kind=ConfigError)
    finally:
        if _before is None: os.environ.pop("PICOMAML_DATA", None)
        else: os.environ["PICOMAML_DATA"] = _before

# %% [markdown]
# ## The presets in `configs/`
#
# Every preset in the repository loads without error (so a typo in a preset fails the tests, not a
# four-GPU run), and the paper presets set the widths of paper 1 §3.1 (d = 96/384/768/1536).

# %%
#| export
# the exported module sits in picomaml/, the notebook runs in nbs/: both find configs/ one level up
PRESETS_DIR = (Path(__file__).resolve().parent.parent / "configs" if "__file__" in globals()
               else Path("../configs").resolve())

# %%
import glob

preset_files = sorted(glob.glob(str(PRESETS_DIR / "*.yaml")))
for p in preset_files: load_config(p)
sizes = {s: load_config(PRESETS_DIR / f"pico-{s}-maml.yaml").model.d_model
         for s in ("tiny", "small", "medium", "large")}
assert sizes == {"tiny": 96, "small": 384, "medium": 768, "large": 1536}, sizes
for s in sizes:
    maml, van = load_config(PRESETS_DIR / f"pico-{s}-maml.yaml"), load_config(PRESETS_DIR / f"pico-{s}-vanilla.yaml")
    assert van.maml.rho == 0 and maml.maml.rho == 0.5
    van.maml.rho, van.logging.run_name = maml.maml.rho, maml.logging.run_name
    assert van == maml, f"the {s} vanilla arm must differ from the MAML arm only in rho"
    tc = maml.train  # the settings the papers leave to pico-train (docs/settings.md)
    assert maml.model.init == "pytorch" and ((tc.beta1, tc.beta2, tc.eps, tc.weight_decay, tc.grad_clip)
                                             == (0.9, 0.999, 1e-8, 0.01, 0.0))
len(preset_files)

"""Issue 12: every mistake a user can make with the real commands (`launch`, `sweep`, `spectra`, `data`, `pipeline`,
`plan`) ends with one line `error: ...` that names what is wrong, where and what to do (exit status 2, no traceback),
and nothing already on disk is lost. One table, one row per mistake."""
import shutil

import pytest
import yaml
from commands import SHARED, TOKENIZER, prepare_rows, run, snapshot, tiny

pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"local data {SHARED} not found (set PICOMAML_DATA)")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    "A workspace: prepared rows, one finished run, a corrupt copy, a copy of another width, a broken UNER set, a grid."
    ws = tmp_path_factory.mktemp("mistakes")
    prepare_rows(ws)
    done = run(["picomaml.launch", *tiny(ws)])
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(ws / "runs" / "run", ws / "runs" / "corrupt")
    for f in (ws / "runs" / "corrupt" / "checkpoints").glob("step_*/model.safetensors"):
        f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    shutil.copytree(ws / "runs" / "run", ws / "runs" / "wider")
    wider = ws / "runs" / "wider" / "config.yaml"
    wider.write_text(wider.read_text().replace("d_model: 24", "d_model: 32"))
    uner = ws / "uner" / "sk_snk"
    uner.mkdir(parents=True)
    for split in ("train", "dev", "test"): shutil.copy(SHARED / "uner" / "sk_snk" / f"sk_snk-ud-{split}.iob2", uner)
    lines = (uner / "sk_snk-ud-train.iob2").read_text().splitlines()
    token = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    lines[token] = "\t".join(lines[token].split("\t")[:2] + ["B-PERSON"] + lines[token].split("\t")[3:])
    (uner / "sk_snk-ud-train.iob2").write_text("\n".join(lines) + "\n")
    grid = {"grids": [{"heads": ["linear"], "datasets": ["sk_snk"], "test_sets": ["sk_snk"],
                       "max_train_sentences": 4, "max_eval_sentences": 4,
                       "runs": [{"run": "run", "arm": "vanilla", "size": "tiny",
                                 "checkpoint": str(ws / "runs/run/checkpoints/step_000002")}]}]}
    (ws / "grid-long.yaml").write_text(yaml.safe_dump(grid))  # windows of ner.max_len's default, 512 sub-tokens
    grid["grids"][0]["ner"] = {"max_len": 32}  # the tiny run's positions
    (ws / "grid.yaml").write_text(yaml.safe_dump(grid))
    (ws / "broken.yaml").write_text("grids: [{heads: [linear\n")
    for name, change in (("rundir", {"checkpoint": str(ws / "runs/run")}), ("badhead", {"heads": ["linear", "crff"]})):
        bad = yaml.safe_load(yaml.safe_dump(grid))
        bad["grids"][0].update(change) if "heads" in change else bad["grids"][0]["runs"][0].update(change)
        (ws / f"grid-{name}.yaml").write_text(yaml.safe_dump(bad))
    shutil.copytree(ws / "runs" / "run", ws / "runs" / "badcfg")  # a value out of range in the run's own config.yaml
    badcfg = ws / "runs/badcfg/config.yaml"
    badcfg.write_text(badcfg.read_text().replace("rho: 0.0", "rho: 5.0"))
    shutil.copytree(ws / "data/train", ws / "data/garbled")
    next(iter(sorted((ws / "data/garbled").glob("*.parquet")))).write_bytes(b"PAR1 not a parquet file")
    shutil.copytree(ws / "data/train", ws / "data/unfinished")  # as a prepare killed before its manifest leaves it
    (ws / "data/unfinished/manifest.json").unlink()
    (ws / "data/unfinished/.preparing").write_text("")
    (ws / "empty-data").mkdir()
    return ws


# (name, command + arguments, extra environment, words the one line must hold, directory that must not change)
MISTAKES = [
    ("rho out of range", lambda ws: ["picomaml.launch", *tiny(ws, "new"), "maml.rho=1.5"], {},
     ["maml.rho=1.5 is out of range", "<= 1"], None),
    ("negative learning rate", lambda ws: ["picomaml.launch", *tiny(ws, "new"), "train.lr=-0.001"], {},
     ["train.lr=-0.001 is out of range"], None),
    ("mistyped key", lambda ws: ["picomaml.launch", *tiny(ws, "new"), "maml.head_droput=0"], {},
     ["maml.head_droput", "Did you mean 'maml.head_dropout'"], None),
    ("no tokenizer anywhere",
     lambda ws: ["picomaml.launch", *[a for a in tiny(ws, "new") if not a.startswith("data.tokenizer")], "maml.rho=0.5",
                 "smlmt.n_way=2", "smlmt.k_shot=1", "smlmt.q_query=1", "smlmt.window=8", "smlmt.pool_rows=64"],
     {"PICOMAML_DATA": "{ws}/empty-data"}, ["no tokenizer", "PICOMAML_DATA=", "data.tokenizer_path"], None),
    ("resume with other settings",
     lambda ws: ["picomaml.launch", *tiny(ws), "maml.rho=0.5", "train.lr=0.1", "train.seed=7"], {},
     ["was trained with other settings", "maml.rho: 0.0 -> 0.5", "train.seed: 42 -> 7", "checkpoint.resume_from"],
     "runs/run"),
    ("every checkpoint corrupt", lambda ws: ["picomaml.launch", *tiny(ws, "corrupt")], {},
     ["none can be resumed from", "SHA-256", "logging.run_name"], "runs/corrupt"),
    ("checkpoint of another width", lambda ws: ["picomaml.launch", *tiny(ws, "wider"), "model.d_model=32"], {},
     ["model.safetensors", "the run configuration", "belong to another model"], "runs/wider"),
    ("resume_from a missing step", lambda ws: ["picomaml.launch", *tiny(ws), "checkpoint.resume_from=step_000009"], {},
     ["checkpoint.resume_from=step_000009", "those with one: step_000001, step_000002"], "runs/run"),
    ("unwritable runs directory",
     lambda ws: ["picomaml.launch", *tiny(ws, "new"), "logging.runs_dir=/proc/picomaml"], {},
     ["logging.runs_dir: cannot write to /proc/picomaml"], None),
    ("diverging learning rate",
     lambda ws: ["picomaml.launch", *tiny(ws, "diverges"), "train.lr=1e9", "train.steps=6"], {},
     ["is nan", "checkpoint.resume_from=step_000000", "train.lr"], None),
    ("sweep over runs never trained",
     lambda ws: ["picomaml.ner_sweep", "--grid", "configs/sweeps/paper1.yaml", "--out", "{ws}/ner/p1.jsonl",
                 "--runs-dir", "{ws}/nowhere"], {}, ["missing checkpoint", "--stages pretrain"], None),
    ("a bad UNER tag",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid.yaml", "--out", "{ws}/ner/bad-tag.jsonl",
                 "ner.data_path={ws}/uner", f"data.tokenizer_path={TOKENIZER}"], {},
     ["sk_snk-ud-train.iob2:", "B-PERSON"], "uner"),
    ("a grid that is not YAML",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/broken.yaml", "--out", "{ws}/ner/x.jsonl"], {},
     ["broken.yaml", "not valid YAML"], None),
    ("sweep results on an unwritable path",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid.yaml", "--out", "/proc/picomaml/r.jsonl"], {},
     ["--out: cannot write to /proc/picomaml"], None),
    ("spectra of no checkpoints",
     lambda ws: ["picomaml.spectra", "--checkpoints", "{ws}/runs/none/checkpoints", "--batch", "{ws}/data/eval",
                 "--out", "{ws}/spectra.jsonl"], {}, ["checkpoint directory", "does not exist"], None),
    ("prepare from nothing",
     lambda ws: ["picomaml.data", "prepare", "--src", "{ws}/no-corpus", "--out", "{ws}/data/x", "--seq-len", "32"], {},
     ["--src", "no-corpus does not exist"], None),
    ("prepare over prepared shards",
     lambda ws: ["picomaml.data", "prepare", "--src", str(SHARED / "corpus/eval"), "--out", "{ws}/data/train",
                 "--seq-len", "32"], {}, ["already holds shards", "choose another directory"], "data"),
    ("plan with a mistyped key",
     lambda ws: ["picomaml.plan", "--config", "configs/pico-tiny-maml.yaml", "--gpus", "4", "--gpu-memory-gb", "80",
                 "train.globl_batch=8"], {}, ["train.globl_batch", "train.global_batch"], None),
    ("plan that cannot fit",
     lambda ws: ["picomaml.plan", "--config", "configs/pico-large-maml.yaml", "--gpus", "4", "--gpu-memory-gb", "16"],
     {}, [" set "], None),
    ("run name outside runs_dir", lambda ws: ["picomaml.launch", *tiny(ws, "../escape")], {},
     ["logging.run_name='../escape' must be one directory name"], None),
    ("train.steps below the step resumed from", lambda ws: ["picomaml.launch", *tiny(ws), "train.steps=1"], {},
     ["train.steps=1 is below step 2", "resumes from: nothing would be trained"], "runs/run"),
    ("prepare rows of no tokens",
     lambda ws: ["picomaml.data", "prepare", "--src", str(SHARED / "corpus/eval"), "--out", "{ws}/data/zero",
                 "--seq-len", "0"], {}, ["--seq-len 0: must be at least 1"], None),
    ("a negative sweep limit",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid.yaml", "--out", "{ws}/ner/limit.jsonl", "--limit", "-1"],
     {}, ["--limit -1: must be 0 or more"], None),
    ("PICOMAML_DATA that is a file",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid.yaml", "--out", "{ws}/ner/nodata.jsonl",
                 f"data.tokenizer_path={TOKENIZER}"], {"PICOMAML_DATA": "{ws}/grid.yaml"},
     ["PICOMAML_DATA=", "grid.yaml is not a directory", "unset it to read the Hub"], None),
    ("a bad value in the run's own config.yaml", lambda ws: ["picomaml.launch", *tiny(ws, "badcfg")], {},
     ["maml.rho=5.0 is out of range", "(set in", "runs/badcfg/config.yaml)"], "runs/badcfg"),
    ("a run name too long for a directory", lambda ws: ["picomaml.launch", *tiny(ws, "x" * 300)], {},
     ["logging.run_name is 300 bytes long"], None),
    ("a run directory where a checkpoint belongs",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid-rundir.yaml", "--out",
                 "{ws}/ner/rundir.jsonl", f"data.tokenizer_path={TOKENIZER}"], {},
     ["runs/run is a run directory, not a checkpoint", "runs/run/checkpoints/step_000002"], "runs/run"),
    ("spectra of a run directory",
     lambda ws: ["picomaml.spectra", "--checkpoints", "{ws}/runs/run", "--batch", "{ws}/data/eval",
                 "--out", "{ws}/rundir-spectra.jsonl"], {},
     ["runs/run is a run directory", "runs/run/checkpoints"], None),
    ("a grid with an unknown head",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid-badhead.yaml", "--out", "{ws}/ner/badhead.jsonl",
                 f"data.tokenizer_path={TOKENIZER}"], {},
     ["'crff' is not one of linear, crf", "nothing was run"], None),
    ("windows longer than the checkpoint's positions",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid-long.yaml", "--out",
                 "{ws}/ner/long.jsonl", f"data.tokenizer_path={TOKENIZER}"], {},
     ["ner.max_len=512 is longer than the 32 positions checkpoint", "set ner.max_len=32 or lower"], None),
    ("a shard that is not parquet",
     lambda ws: ["picomaml.launch", *tiny(ws, "garbled", "data.train_path={ws}/data/garbled")], {},
     ["shard-00000.parquet: not a readable parquet shard"], "data/garbled"),
    ("the shards of an interrupted prepare",
     lambda ws: ["picomaml.launch", *tiny(ws, "unfinished", "data.train_path={ws}/data/unfinished")],
     {}, ["data/unfinished is an interrupted `prepare`", "prepare it again"], "data/unfinished"),
    ("pipeline without data",
     lambda ws: ["picomaml.pipeline", "demo", "--stages", "data"], {"PICOMAML_DATA": "{ws}/no-data"},
     ["PICOMAML_DATA=", "is not a directory"], None),
    # GPUs asked for where CUDA is unusable (CUDA_VISIBLE_DEVICES empty makes any machine one):
    # one line, before any work
    ("the paper profile without usable CUDA",
     lambda ws: ["picomaml.pipeline", "paper", "--nproc", "4"], {"CUDA_VISIBLE_DEVICES": ""},
     ["the paper profile runs on 4 CUDA GPUs, but", "To run on CPU anyway", "--device cpu", "make rehearse"], None),
    ("a paper preset without usable CUDA",
     lambda ws: ["picomaml.launch", "--config", "configs/pico-tiny-maml.yaml", "logging.runs_dir={ws}/gpu"],
     {"CUDA_VISIBLE_DEVICES": ""},
     ["train.device=cuda runs on 1 CUDA GPU, but", "To run on CPU anyway: train.device=cpu"], None),
    ("NER sweep on GPUs that are not there",
     lambda ws: ["picomaml.ner_sweep", "--grid", "{ws}/grid.yaml", "--out", "{ws}/ner/gpu.jsonl",
                 "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""},
     ["--device cuda runs on 1 CUDA GPU, but", "--device cpu"], None),
    ("spectra on a GPU that is not there",
     lambda ws: ["picomaml.spectra", "--checkpoints", "{ws}/runs/run/checkpoints", "--batch",
                 "{ws}/data/eval", "--out", "{ws}/gpu-spectra.jsonl", "--device", "cuda:0"],
     {"CUDA_VISIBLE_DEVICES": ""}, ["--device cuda:0 runs on 1 CUDA GPU, but", "--device cpu"], "runs/run"),
]


@pytest.mark.parametrize("name,args,env,words,keep", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_gets_one_line_and_loses_nothing(ws, name, args, env, words, keep):
    fill = lambda a: a.replace("{ws}", str(ws))
    before = snapshot(ws / keep) if keep else None
    proc = run([fill(a) for a in args(ws)], env={k: fill(v) for k, v in env.items()})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(w in errors[0] for w in words), errors[0]
    if keep: assert snapshot(ws / keep) == before, f"{keep} changed"


def test_the_gpu_commands_offer_a_device():
    "`--help` of the NER sweep and of the spectra command shows `--device` (and the sweep's `--workers`)."
    sweep, spectra = run(["picomaml.ner_sweep", "--help"]), run(["picomaml.spectra", "--help"])
    assert sweep.returncode == spectra.returncode == 0
    assert "--device" in sweep.stdout and "--workers" in sweep.stdout
    assert "--device" in spectra.stdout and "--batch-rows" in spectra.stdout

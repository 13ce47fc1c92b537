"""GPU check: the paper path on a GPU node, run and measured against the planner, in at most 8 minutes.

    bash benchmarks/gpu_check.sh                                  # on a GPU machine: writes benchmarks/results-gpu.md
    bash benchmarks/gpu_check.sh --dry --out /tmp/check.md        # the same code on CPU (benchmarks/test_gpu_check.py)

(a) Paper-scale steps. A few optimizer steps of each Pico size at the shapes of the papers' run on four GPUs:
    one rank's 64 rows of 2,048 tokens per next-token draw, in the memory chunks the planner chooses for this
    GPU, and one 32-way 4+4-shot episode on a 256-row pool; then one evaluation batch and the spectra's float32
    gradient pass in the planner's groups. Eager and with torch.compile (the decoder blocks of the next-token
    draws). Tokens/s, MFU, the peak memory of every phase (`torch.cuda.max_memory_allocated`, reset when the
    phase starts) against `picomaml.plan.phase_bytes` for the same shapes, and the attention kernel PyTorch
    actually ran, profiled, under bf16 autocast and in float32. Random token ids stand in for data.
(b) The rehearsal on one GPU. The rehearsal's shrunk paper profile (`picomaml.pipeline.shrink`) for one size,
    through the real commands: `prepare` and `hub-layout` of the local corpus, `python -m picomaml.launch` on
    the GPU with evaluation, spectra and a checkpoint every step, killed (SIGKILL) after its first checkpoint and
    relaunched, which must resume and finish; then `python -m picomaml.ner_sweep --device` with linear and CRF
    heads, head-only and full, on the run's final checkpoint. Every phase's peak (the loop records them on
    CUDA) against the plan of that run. Needs $PICOMAML_DATA (corpus, tokenizer, Universal NER).
(c) Two processes against one (with two or more GPUs; --dry: two CPU processes over gloo). The shrunk run on
    two processes (NCCL) and on one: the final weights must agree within what AdamW can move a weight in the
    run's steps (lr per step), the tolerance of bf16 arithmetic summed in another order. (The head's dropout is
    off for this comparison: which rank holds a query row decides its dropout mask.)

Every (a) run is a fresh process, so a failure costs one row; no (a) run starts after --budget seconds
(eager rows first, so a slow compile loses compiled rows only). The tables go to benchmarks/results-gpu.md.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from picomaml.config import load_config
from picomaml.data import ShardRows, batch_for_step, write_shard
from picomaml.device import cuda_capability, resolve_precision
from picomaml.lm_loss import document_sums, next_token_backward
from picomaml.maml import maml_step
from picomaml.pipeline import PAPER, SHRINK, launch_command, pretraining_runs, shrink
from picomaml.plan import GIB, device_memory_gb, episode_flops, next_token_flops, peak_flops, phase_bytes, plan_run
from picomaml.smlmt import build_episode
from picomaml.spectra import loss_gradients, select_matrices
from picomaml.train import build_model

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small", "medium", "large")
PAPER_GPUS = 4  # the papers' node: the planner's chunk for one of its four ranks
GPU_DATA = ["smlmt.pool_rows=256"]  # one gathered branch micro-batch of the paper: the episode's pool
DRY_DATA = ["model.n_layers=2", "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=64", "data.eos_id=509",
            "data.mask_id=510", "smlmt.n_way=4", "smlmt.k_shot=2", "smlmt.q_query=2", "smlmt.window=16",
            "smlmt.pool_rows=32", "smlmt.exclude_top=10", "maml.head_hidden=16", "train.branch_batch=16",
            "train.chunk_rows=2", "eval.batch_size=2", "spectra.grad_rows=4", "spectra.grad_batch=2"]
DRY_WIDTH = {"tiny": 24, "small": 48, "medium": 96, "large": 192}
WORDS = {False: (1000, 3000), True: (100, 300)}  # synthetic token ids (GPU, dry): clear of EOS and [MASK]
PHASES = ("next-token chunk", "episode", "optimizer step", "evaluation", "spectra")
REHEARSAL_SIZE = "small"


# --- (a) paper-scale steps ---------------------------------------------------------------------------------------

def check_config(size: str, dry: bool, data_dir, device: torch.device):
    "(config, plan) of configs/pico-<size>-maml.yaml for one rank of the papers' four-GPU run on this device."
    shrink_width = [f"model.d_model={DRY_WIDTH[size]}", f"model.ffn_hidden={4 * DRY_WIDTH[size]}",
                    *DRY_DATA] if dry else GPU_DATA
    cfg = load_config(ROOT / "configs" / f"pico-{size}-maml.yaml",
                      [*shrink_width, f"data.train_path={data_dir}", f"train.device={device.type}"])
    plan = plan_run(cfg, PAPER_GPUS, device_memory_gb(device) * (PAPER_GPUS if device.type == "cpu" else 1),
                    device=device.type, capability=cuda_capability(device))
    return cfg, plan


def write_data(directory: Path, seq_len: int, dry: bool, n_rows: int = 512) -> Path:
    "A parquet shard of random rows (seq_len + 1 ids) in the project's format."
    directory.mkdir(parents=True, exist_ok=True)
    low, high = WORDS[dry]
    ids = torch.randint(low, high, (n_rows, seq_len + 1), generator=torch.Generator().manual_seed(0))
    write_shard(ids.tolist(), directory / "shard-00000.parquet")
    return directory


def synthetic_tables(cfg) -> tuple:
    "SMLMT word tables in which every id is a whole word of five letters; EOS is the special id."
    V = cfg.model.vocab_size
    return torch.ones(V, dtype=torch.bool), torch.full((V,), 5, dtype=torch.long), [cfg.data.eos_id]


@contextlib.contextmanager
def using_blocks(model, blocks):
    "Run the model with `blocks` (e.g. the compiled ones) in place of its own."
    own, model.layers = model.layers, blocks
    try: yield
    finally: model.layers = own


def phase_peak(device, fn):
    "(fn's result, (peak bytes allocated, peak bytes reserved) during it on a CUDA device, else None)."
    if device.type != "cuda": return fn(), None
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    return out, (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))


def attention_kernel(model, ids, autocast) -> str:
    "The scaled_dot_product_attention kernel one forward of `model` actually ran (from the profiler's op names)."
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, torch.no_grad(), autocast():
        model.hidden(ids)
    ops = " ".join(e.name for e in prof.events() if "scaled_dot_product" in e.name)
    return next((name for key, name in (("cudnn", "cuDNN"), ("flash", "flash"), ("efficient", "memory-efficient"),
                                        ("math", "math"))
                 if key in ops), ops or "none")


def optimizer_step(cfg, parts, step: int) -> dict:
    "One optimizer step: a next-token draw and an episode draw, then AdamW; seconds and each phase's peak."
    model, head, optimizer, blocks, rows, tables, device, autocast = parts
    tc, pool_rows, rows_per_rank = cfg.train, cfg.smlmt.pool_rows, cfg.train.branch_batch // PAPER_GPUS
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync(); start = time.perf_counter()
    batch = batch_for_step(rows, step, 0, 0, 1, rows_per_rank=rows_per_rank, accum_steps=2, seed=tc.seed)
    with using_blocks(model, blocks):
        _, ar = phase_peak(device, lambda: next_token_backward(model, batch, tc.chunk_rows, 2 * batch[:, 1:].numel(),
                                                               autocast, device))
    pool = batch_for_step(rows, step, 1, 0, 1, rows_per_rank=pool_rows, accum_steps=2, seed=tc.seed + 1).to(device)
    def episode_draw():
        episode = build_episode(pool, cfg.smlmt, *(t.to(device) for t in tables[:2]), tables[2], cfg.data.mask_id,
                                seed=tc.seed, step=2 * step + 1)
        with autocast(): maml_step(model, head, episode, cfg.maml, loss_scale=0.5, inner_seed=step)
        return episode
    episode, ep = phase_peak(device, episode_draw)
    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _, st = phase_peak(device, update)
    sync()
    return {"seconds": time.perf_counter() - start,
            "peaks": {"next-token chunk": ar, "episode": ep, "optimizer step": st},
            "support_tokens": episode.support_ids.numel(), "query_tokens": episode.query_ids.numel()}


def monitoring_peaks(cfg, plan, model, rows, device, autocast) -> dict:
    ("Peaks of one evaluation batch (autocast, no graph) and of the spectra's float32 gradient pass "
     "in the plan's groups.")
    documents = batch_for_step(rows, 0, 0, 0, 1, rows_per_rank=cfg.eval.batch_size, accum_steps=1,
                               seed=cfg.train.seed + 2).to(device)  # documents of seq_len + 1
    lengths = torch.full((len(documents),), documents.shape[1])
    def evaluate():
        with torch.no_grad(), autocast(): document_sums(model.eval(), documents, lengths)
        model.train()
    spectra_rows = batch_for_step(rows, 0, 0, 0, 1, rows_per_rank=cfg.spectra.grad_rows, accum_steps=1,
                                  seed=cfg.train.seed + 3)
    params = select_matrices(model, cfg.spectra.layers)
    return {"evaluation": phase_peak(device, evaluate)[1],
            "spectra": phase_peak(device, lambda: loss_gradients(model, spectra_rows, params, plan.spectra_batch))[1]}


def run_one(spec: dict) -> dict:
    "The measurement of one (size, mode), in this process."
    device = torch.device(spec["device"])
    cfg, plan = check_config(spec["size"], spec["dry"], spec["data"], device)
    if not plan.fits: raise SystemExit(f"the planner refuses this GPU: {plan.reason}")
    cfg.train.chunk_rows = plan.chunk_rows
    precision = resolve_precision(cfg.train.precision, device.type, cuda_capability(device))
    rows = ShardRows(cfg.data.train_path, cfg.data.seq_len + 1, cfg.model.vocab_size)
    model, head, optimizer = build_model(cfg, device)  # backbone, head and AdamW exactly as the trainer builds them
    blocks = torch.nn.ModuleList(torch.compile(b, backend=spec["backend"]) for b in model.layers) \
        if spec["compile"] else model.layers
    bf16 = precision == "bf16-mixed"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    parts = (model, head, optimizer, blocks, rows, synthetic_tables(cfg), device, autocast)
    steps = [optimizer_step(cfg, parts, step) for step in range(spec["steps"])]
    monitoring = monitoring_peaks(cfg, plan, model, rows, device, autocast)
    probe = batch_for_step(rows, 0, 0, 0, 1, rows_per_rank=1, accum_steps=1, seed=cfg.train.seed)[:, :-1].to(device)
    kernels = {"autocast" if bf16 else "training": attention_kernel(model, probe, autocast),
               "float32": attention_kernel(model, probe, contextlib.nullcontext)}
    timed, T, window, on_gpu = steps[1:], cfg.data.seq_len, cfg.smlmt.window, device.type == "cuda"
    seconds = sum(s["seconds"] for s in timed) / len(timed)
    ar_tokens, (support, query) = plan.rows_per_rank * T, (timed[-1]["support_tokens"], timed[-1]["query_tokens"])
    flops = next_token_flops(cfg.model, ar_tokens, T) + episode_flops(cfg.model, support, query, window)
    peak = peak_flops(device)
    measured = {k: max((s["peaks"][k] for s in timed), default=None) if on_gpu else None for k in timed[0]["peaks"]}
    measured.update({k: v if on_gpu else None for k, v in monitoring.items()})
    largest = max((v for v in measured.values() if v), default=None)
    predicted = phase_bytes(cfg, PAPER_GPUS, device.type, plan.chunk_rows, cuda_capability(device), plan.spectra_batch)
    return {"size": spec["size"], "compile": spec["compile"], "chunk": plan.chunk_rows, "rows": plan.rows_per_rank,
            "spectra_batch": plan.spectra_batch, "precision": precision, "kernels": kernels,
            "seconds": seconds, "first_seconds": steps[0]["seconds"],
            "tokens_per_s": (ar_tokens + support + query) / seconds,
            "mfu": flops / seconds / peak if peak else None, "measured": {k: v and v[0] for k, v in measured.items()},
            "predicted": predicted, "reserved_ratio": largest[1] / largest[0] if largest else None,
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "torch": torch.__version__}


def run_in_process(spec: dict, timeout: float) -> dict:
    "run_one in a fresh interpreter; a failure or timeout comes back as {'error': ...}."
    try:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"exit {out.returncode}: {last[:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib_pair(measured, predicted) -> str:
    "'measured / predicted GiB (ratio)', or the prediction alone where nothing was measured (in MiB below 1 GiB)."
    if predicted is None: return "–" if measured is None else f"{measured / GIB:.2f} / –"
    unit, name = (GIB, "") if predicted >= GIB else (2**20, " MiB")
    if measured is None: return f"– / {predicted / unit:.2f}{name}"
    return f"{measured / unit:.2f} / {predicted / unit:.2f}{name} ({measured / predicted:.2f})"


def table(results: list) -> str:
    "Markdown table of the (a) results."
    lines = ["| size | mode | chunk / rows, spectra group | precision, attention kernel | s / step | first step s | "
             "tokens/s | MFU % | "
             + " | ".join(f"{p} GiB: measured / planned (ratio)" for p in PHASES) + " | reserved / allocated |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for r in results:
        mode = "torch.compile" if r["compile"] else "eager"
        if "error" in r:
            lines.append(f"| {r['size']} | {mode} | {r['error']} |" + " – |" * (6 + len(PHASES))); continue
        mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] else "–"
        reserved = f"{r['reserved_ratio']:.2f}" if r["reserved_ratio"] else "–"
        kernels = ", ".join(f"{k}: {v}" for k, v in r["kernels"].items())
        lines.append(f"| {r['size']} | {mode} | {r['chunk']} / {r['rows']}, {r['spectra_batch']} | "
                     f"{r['precision']}; {kernels} | "
                     f"{r['seconds']:.3f} | {r['first_seconds']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     + " | ".join(gib_pair(r["measured"][p], r["predicted"][p]) for p in PHASES) + f" | {reserved} |")
    return "\n".join(lines)


# --- (b) the rehearsal on one device, through the real commands -----------------------------------------------------

def local_data() -> Path | None:
    "The local data directory ($PICOMAML_DATA, else ../shared/data beside the clone), or None."
    for candidate in (os.environ.get("PICOMAML_DATA"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "tokenizer").is_dir() and (Path(candidate) / "uner").is_dir():
            return Path(candidate)
    return None


def rehearsal_run(device: str, dry: bool, work: Path, steps: int, runs_dir: Path | None = None):
    ("(profile, preset, overrides, run directory) of the rehearsal's shrunk MAML run of REHEARSAL_SIZE "
     "on `device`, `steps` steps.")
    profile = dataclasses.replace(shrink(PAPER, runs_dir=str(work / "rehearse")), sizes=[REHEARSAL_SIZE], seeds=[42],
                                  device=device)
    preset, overrides, name = next(run for run in pretraining_runs(profile) if run[2].endswith("-maml"))
    runs_dir = runs_dir or Path(profile.runs_dir)
    extra = [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 4)}", f"logging.runs_dir={runs_dir}"]
    return profile, preset, [*overrides, *extra], runs_dir / name


def run_command(cmd: list, env: dict, timeout: float) -> subprocess.CompletedProcess:
    "A command of the check, to completion."
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def kill_after_first_checkpoint(cmd: list, env: dict, run_dir: Path, timeout: float) -> str:
    "Start a launch and SIGKILL it once its step-1 checkpoint is on disk; how it ended."
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not (run_dir / "checkpoints" / "step_000001").is_dir() \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is not None: return f"finished before it could be killed (exit {proc.returncode})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"killed (SIGKILL) at {(run_dir / 'checkpoints' / 'latest').read_text().strip()}"


def rehearsal_check(device: str, dry: bool, work: Path, timeout: float) -> dict:
    ("(b): prepare, launch, kill, resume, NER on `device` through the real commands; "
     "every phase's peak against the plan.")
    from picomaml.pipeline import prepare_stages  # runs the real `prepare` and `hub-layout` commands
    data = local_data()
    if data is None: return {"error": "skipped: no local data ($PICOMAML_DATA with corpus/, tokenizer/ and uner/)"}
    env = {**os.environ, "PICOMAML_DATA": str(data), "HF_HUB_OFFLINE": "1"}
    os.environ["PICOMAML_DATA"] = str(data)
    profile, preset, overrides, run_dir = rehearsal_run(device, dry, work, steps=6 if dry else 12)
    started = time.monotonic()
    prepare_stages(profile, {})
    cmd = launch_command(preset, overrides, 1)
    killed = kill_after_first_checkpoint(cmd, env, run_dir, timeout / 3)
    resumed = run_command(cmd, env, timeout / 3)
    if resumed.returncode:
        return {"error": f"the relaunch failed: {(resumed.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(preset, overrides)
    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    plan = plan_run(cfg, 1, device_memory_gb(torch_device), device=torch_device.type,
                    capability=cuda_capability(torch_device))
    tensors = phase_bytes(cfg, 1, torch_device.type, plan.chunk_rows, cuda_capability(torch_device), plan.spectra_batch)
    # dry: the NER jobs' bf16 path on CPU
    ner_settings = {**SHRINK["ner"]["ner"], **({"precision": "bf16-mixed"} if dry else {})}
    grid = {"defaults": {**SHRINK["ner"], "test_sets": ["sk_snk", "tl_trg"], "ner": ner_settings},
            "grids": [{"heads": ["linear", "crf"], "regimes": ["head", "full"], "datasets": ["sk_snk"],
                       "runs": [{"size": REHEARSAL_SIZE, "arm": "maml", "step": "final"}]}]}
    (work / "grid.yaml").write_text(yaml.safe_dump(grid))
    ner = run_command([sys.executable, "-m", "picomaml.ner_sweep", "--grid", work / "grid.yaml", "--out",
                       work / "ner.jsonl", "--runs-dir", profile.runs_dir, "--device", device, "--workers", "1"],
                      env, timeout / 3)
    if ner.returncode: return {"error": f"the NER sweep failed: {(ner.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    rows = [json.loads(line) for line in (work / "ner.jsonl").read_text().splitlines()]
    return {"killed": killed, "resumed": "resuming from" in resumed.stdout,
            "steps": sorted({r["step"] for r in records if "loss" in r}),
            "evaluations": sum("paloma_ppl" in r for r in records),
            "spectra_steps": len({json.loads(line)["step"]
                                  for line in (run_dir / "spectra.jsonl").read_text().splitlines()}),
            "finite": all(math.isfinite(r["loss"]) for r in records if "loss" in r), "train_steps": cfg.train.steps,
            "peaks": {"training step": max((r.get("peak_gib") or 0) for r in records) or None,
                      "evaluation": max((r.get("eval_peak_gib") or 0) for r in records) or None,
                      "spectra": max((r.get("spectra_peak_gib") or 0) for r in records) or None},
            "planned": {"training step": max(tensors[p] for p in ("next-token chunk", "episode",
                                                                  "optimizer step")) / GIB,
                        "evaluation": tensors["evaluation"] / GIB, "spectra": tensors["spectra"] / GIB},
            "ner": [{"job": f"{r['head']} {r['regime']}", "device": r["device"], "precision": r["precision"],
                     "dev_f1": r["dev_f1"], "peak_gib": r.get("peak_gib"), "seconds": r["seconds"]} for r in rows],
            "seconds": time.monotonic() - started}


def rehearsal_table(b: dict) -> str:
    "Markdown of the (b) results."
    if "error" in b: return f"(b) {b['error']}"
    ok = lambda flag: "yes" if flag else "**no**"
    lines = [f"Launch {b['killed']}; relaunch resumed: {ok(b['resumed'])}; "
             f"steps logged: {b['steps'][0]}–{b['steps'][-1]} of "
             f"{b['train_steps']} ({ok(b['steps'] == list(range(1, b['train_steps'] + 1)))} each once), "
             f"all losses finite: {ok(b['finite'])}; "
             f"{b['evaluations']} evaluations, spectra at {b['spectra_steps']} steps; {b['seconds']:.0f} s in all.", "",
             "| phase | peak GiB measured | planned GiB (tensors; the plan adds 10 % and a fixed reserve) |",
             "|---|---|---|"]
    gib = lambda value: "–" if value is None else f"{value:.2f}"
    lines += [f"| {k} | {gib(b['peaks'][k])} | {b['planned'][k]:.2f} |" for k in b["planned"]]
    lines += ["", "| NER job | device | precision | dev micro-F1 | peak GiB | seconds |", "|---|---|---|---|---|---|"]
    lines += [f"| {j['job']} | {j['device']} | {j['precision']} | {j['dev_f1']:.3f} | {gib(j['peak_gib'])} | "
              f"{j['seconds']:.1f} |"
              for j in b["ner"]]
    return "\n".join(lines)


# --- (c) two processes against one ---------------------------------------------------------------------------------

def two_against_one(device: str, dry: bool, work: Path, timeout: float) -> dict:
    ("(c): the shrunk run on two processes and on one; "
     "the largest difference of a final weight against AdamW's lr bound.")
    from safetensors.torch import load_file
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finals = []
    for nproc in (2, 1):  # the data (b) prepared, the run in a directory of its own
        _, preset, overrides, run_dir = rehearsal_run(device, dry, work, steps=3, runs_dir=work / f"nproc-{nproc}")
        overrides.append("maml.head_dropout=0")  # a query row's dropout mask depends on the rank that holds it
        done = run_command(launch_command(preset, overrides, nproc), env, timeout / 2)
        if done.returncode:
            return {"error": f"{nproc} processes failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
        finals.append(load_file(run_dir / "checkpoints" / "step_000003" / "model.safetensors"))
    worst = max((finals[0][k] - finals[1][k]).abs().max().item() for k in finals[1])
    bound = 3 * load_config(preset, overrides).train.lr  # AdamW moves a weight by about lr per step
    return {"backend": "nccl" if device == "cuda" else "gloo", "max_abs_difference": worst, "bound": bound,
            "within": worst <= bound}


def two_table(c: dict) -> str:
    if "error" in c: return f"(c) {c['error']}"
    return (f"2 processes ({c['backend']}) against 1, the final weights after 3 steps: largest difference "
            f"{c['max_abs_difference']:.2e}, "
            f"bound {c['bound']:.1e} (3 steps × lr): {'within' if c['within'] else '**outside**'}.")


# --- the check -----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GPU check of the paper path against the planner (see the module docstring).")
    p.add_argument("--dry", action="store_true",
                   help="CPU, tiny shapes: checks the script and the code paths, not the numbers")
    p.add_argument("--out", default=None,
                   help="Markdown file to write (default: benchmarks/results-gpu.md; --dry: a temporary file)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per (a) run, the first a warm-up")
    p.add_argument("--budget", type=float, default=450, help="seconds after which no further run starts")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; --dry: aot_eager, no C++ build)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    "(b), (c), then every (a) run in its own process within the budget; write and print the tables."
    args, start = parse_args(argv), time.monotonic()
    if args.steps < 2: sys.exit("error: --steps must be at least 2 (the first is a warm-up)")
    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; use --dry to check the script on CPU")
    backend = args.compile_backend or ("aot_eager" if args.dry else "inductor")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "results-gpu-dry.md" if args.dry
                                           else ROOT / "benchmarks" / "results-gpu.md")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    left = lambda: args.budget - (time.monotonic() - start)
    b = rehearsal_check(device, args.dry, work, timeout=min(240, left()))
    print(rehearsal_table(b), flush=True)
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    c = two_against_one(device, args.dry, work, timeout=min(120, left())) if gpus >= 2 and "error" not in b else \
        {"error": "skipped: one GPU" if gpus < 2 else "skipped: (b) failed"}
    print(two_table(c), flush=True)
    data = write_data(work / "synthetic", 64 if args.dry else 2048, args.dry)
    results = []
    for compiled in (False,) if args.no_compile else (False, True):
        for size in args.sizes:
            spec = {"size": size, "compile": compiled, "backend": backend, "device": device, "steps": args.steps,
                    "dry": args.dry, "data": str(data)}
            results.append(run_in_process(spec, left()) if left() > 10
                           else {**spec, "error": "skipped: out of time budget"})
            print(table(results[-1:]).splitlines()[-1], flush=True)
    device_name = next((r["device"] for r in results if "device" in r), device)
    text = (f"# GPU check\n\n{device_name}, torch {torch.__version__}, "
            f"`bash benchmarks/gpu_check.sh {' '.join(argv or sys.argv[1:])}`, "
            f"{time.monotonic() - start:.0f} s\n\n"
            f"## (a) Paper-scale steps: one rank of four, the planner's chunk on this device\n\n"
            f"Timed: {args.steps - 1} optimizer "
            f"step(s) after a warm-up; then one evaluation batch and the spectra's gradient pass. Planned: tensors, as "
            f"`picomaml.plan.phase_bytes`.\n\n{table(results)}\n\n"
            f"## (b) The rehearsal's shrunk paper profile on one device, through the real commands\n\n"
            f"{rehearsal_table(b)}\n\n"
            f"## (c) Two processes against one\n\n{two_table(c)}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    cli = parse_args()
    if cli.one: print(json.dumps(run_one(json.loads(cli.one))))
    else: main()

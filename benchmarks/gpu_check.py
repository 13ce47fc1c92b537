"""GPU check (issue 11): a few optimizer steps of each Pico size on one GPU in bf16, eager and with
torch.compile, through the trainer's own pieces; tokens/s, MFU and each phase's peak memory against
picomaml.plan's prediction, written as a Markdown table to benchmarks/results-gpu.md.

    bash benchmarks/gpu_check.sh                                  # on a GPU machine, at most 8 minutes
    python benchmarks/gpu_check.py --dry --out /tmp/check.md      # the same code on CPU: tiny shapes, float32

No dataset is needed: random token ids over a 2,000-id "vocabulary" are written as a parquet shard in
the project's format (`picomaml.data.write_shard`, read back by `ShardRows`), and the SMLMT word tables
call every id a whole word. An optimizer step is one next-token draw (`picomaml.lm_loss.next_token_backward`,
in memory chunks) and one episode draw (`picomaml.smlmt.build_episode` on a pool read by
`picomaml.data.batch_for_step`, then `picomaml.maml.maml_step`), then clipping and AdamW as in
`picomaml.train`. The first step is a warm-up (and compiles) and is not timed. Every (size, mode) runs in
a fresh process, so a failure costs one row of the table, and runs that would start after `--budget`
seconds are skipped (eager rows first, so a slow compile loses compiled rows only).

With torch.compile the decoder blocks of the next-token draws are compiled (`torch.compile` of each
block, sharing its parameters); the episode stays eager: its shapes differ (64-token windows, a
support pass without a graph), it is a few per cent of a step's FLOPs, and compiling it too would
double the compile time inside the 8-minute budget.

Memory: `torch.cuda.max_memory_allocated` over each phase of the timed steps (the peak counter reset
before the phase), against `picomaml.plan.phase_bytes` for the same shapes (tensors only, without the
plan's reserve); `max_memory_reserved / max_memory_allocated` shows the allocator's overhead, which the
plan's 10 % fragmentation reserve is meant to cover. MFU divides the PaLM FLOP counts of
`picomaml.plan` by `picomaml.plan.peak_flops` of the device.
"""
import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from picomaml.config import load_config
from picomaml.data import ShardRows, batch_for_step, write_shard
from picomaml.lm_loss import next_token_backward
from picomaml.maml import maml_step
from picomaml.plan import ar_flops, episode_flops, peak_flops, phase_bytes
from picomaml.smlmt import build_episode
from picomaml.train import build_model

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("tiny", "small", "medium", "large")
GPU_SHAPES = {"tiny": (32, 64), "small": (16, 32), "medium": (8, 16), "large": (8, 16)}  # (rows per chunk, rows per next-token draw)
GPU_DATA = ["smlmt.pool_rows=64"]  # 131k pool tokens; the papers' 32-way 4+4-shot episode of 64-token windows
DRY_DATA = ["model.n_layers=2", "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=64", "data.eos_id=509",
            "data.mask_id=510", "smlmt.n_way=4", "smlmt.k_shot=2", "smlmt.q_query=2", "smlmt.window=16",
            "smlmt.pool_rows=32", "smlmt.exclude_top=10", "maml.head_hidden=16"]
DRY_WIDTH = {"tiny": 24, "small": 48, "medium": 96, "large": 192}
WORDS = {False: (1000, 3000), True: (100, 300)}  # synthetic token ids (GPU, dry): clear of EOS and [MASK]


def check_config(size: str, dry: bool, data_dir) -> list:
    "Overrides of configs/pico-<size>-maml.yaml for the check: two draws a step, chunks, no evaluation or spectra."
    chunk, rows = (2, 4) if dry else GPU_SHAPES[size]
    shrink = [f"model.d_model={DRY_WIDTH[size]}", f"model.ffn_hidden={4 * DRY_WIDTH[size]}", *DRY_DATA] if dry else GPU_DATA
    return [*shrink, f"data.train_path={data_dir}", f"train.chunk_rows={chunk}", f"train.branch_batch={rows}",
            f"train.global_batch={2 * rows}", "eval.every=0", "spectra.every=0"]


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


def optimizer_step(cfg, parts, step: int) -> dict:
    "One optimizer step: a next-token draw and an episode draw, then clipping and AdamW; seconds and each phase's peak."
    model, head, optimizer, blocks, rows, tables, device, autocast = parts
    tc, pool_rows = cfg.train, cfg.smlmt.pool_rows
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync(); start = time.perf_counter()
    batch = batch_for_step(rows, step, 0, 0, 1, tc.branch_batch, 2, tc.seed)
    with using_blocks(model, blocks):
        _, ar = phase_peak(device, lambda: next_token_backward(model, batch, tc.chunk_rows, 2 * batch[:, 1:].numel(), autocast, device))
    pool = batch_for_step(rows, step, 1, 0, 1, pool_rows, 2, tc.seed + 1).to(device)
    def episode_draw():
        episode = build_episode(pool, cfg.smlmt, *(t.to(device) for t in tables[:2]), tables[2], cfg.data.mask_id, tc.seed, 2 * step + 1)
        with autocast(): maml_step(model, head, episode, cfg.maml, loss_scale=0.5, inner_seed=step)
        return episode
    episode, ep = phase_peak(device, episode_draw)
    def update():
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], tc.grad_clip if tc.grad_clip > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _, st = phase_peak(device, update)
    sync()
    return {"seconds": time.perf_counter() - start, "peaks": {"next-token chunk": ar, "episode": ep, "optimizer step": st},
            "support_tokens": episode.support_ids.numel(), "query_tokens": episode.query_ids.numel()}


def run_one(spec: dict) -> dict:
    "The measurement of one (size, mode), in this process."
    device = torch.device(spec["device"])
    cfg = load_config(ROOT / "configs" / f"pico-{spec['size']}-maml.yaml", spec["overrides"])
    rows = ShardRows(cfg.data.train_path, cfg.data.seq_len + 1, cfg.model.vocab_size)
    model, head, optimizer = build_model(cfg, device)  # backbone, head and AdamW exactly as the trainer builds them
    blocks = torch.nn.ModuleList(torch.compile(b, backend=spec["backend"]) for b in model.layers) if spec["compile"] else model.layers
    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else contextlib.nullcontext
    parts = (model, head, optimizer, blocks, rows, synthetic_tables(cfg), device, autocast)
    steps = [optimizer_step(cfg, parts, step) for step in range(spec["steps"])]
    timed, T, window = steps[1:], cfg.data.seq_len, cfg.smlmt.window
    seconds = sum(s["seconds"] for s in timed) / len(timed)
    ar_tokens, (support, query) = cfg.train.branch_batch * T, (timed[-1]["support_tokens"], timed[-1]["query_tokens"])
    flops = ar_flops(cfg.model, ar_tokens, T) + episode_flops(cfg.model, support, query, window)
    peak = peak_flops(device)
    measured = {k: max((s["peaks"][k] for s in timed), default=None) if on_gpu else None for k in timed[0]["peaks"]}
    largest = max(measured.values()) if on_gpu else None
    reserved = largest[1] / largest[0] if largest else None  # the allocator's overhead at the largest phase
    return {"size": spec["size"], "compile": spec["compile"], "chunk": cfg.train.chunk_rows, "rows": cfg.train.branch_batch,
            "seconds": seconds, "first_seconds": steps[0]["seconds"], "tokens_per_s": (ar_tokens + support + query) / seconds,
            "mfu": flops / seconds / peak if peak else None, "measured": {k: v and v[0] for k, v in measured.items()},
            "predicted": phase_bytes(cfg, 1, device.type, cfg.train.chunk_rows), "reserved_ratio": reserved,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}


def run_in_process(spec: dict, timeout: float) -> dict:
    "run_one in a fresh interpreter; a failure or timeout comes back as {'error': ...}."
    try:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {**spec, "error": f"exit {out.returncode}: {last[:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib_pair(measured, predicted) -> str:
    "'measured / predicted GiB (ratio)', or the prediction alone where nothing was measured (in MiB below 1 GiB)."
    unit, name = (2**30, "") if predicted >= 2**30 else (2**20, " MiB")
    if measured is None: return f"– / {predicted / unit:.2f}{name}"
    return f"{measured / unit:.2f} / {predicted / unit:.2f}{name} ({measured / predicted:.2f})"


def table(results: list) -> str:
    "Markdown table of the results."
    phases = ("next-token chunk", "episode", "optimizer step")
    lines = ["| size | mode | chunk / rows | s / step | first step s | tokens/s | MFU % | "
             + " | ".join(f"{p} GiB: measured / planned (ratio)" for p in phases) + " | reserved / allocated |",
             "|---|---|---|---|---|---|---|" + "---|" * len(phases) + "---|"]
    for r in results:
        mode = "torch.compile" if r["compile"] else "eager"
        if "error" in r:
            lines.append(f"| {r['size']} | {mode} | {r['error']} |" + " – |" * (5 + len(phases))); continue
        mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] else "–"
        reserved = f"{r['reserved_ratio']:.2f}" if r["reserved_ratio"] else "–"
        lines.append(f"| {r['size']} | {mode} | {r['chunk']} / {r['rows']} | {r['seconds']:.3f} | {r['first_seconds']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {mfu} | " + " | ".join(gib_pair(r["measured"][p], r["predicted"][p]) for p in phases)
                     + f" | {reserved} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="GPU check of the planner and the training step (see the module docstring).")
    p.add_argument("--dry", action="store_true", help="CPU, tiny shapes, float32: checks the script, not the numbers")
    p.add_argument("--out", default=None, help="Markdown file to write (default: benchmarks/results-gpu.md; --dry: a temporary file)")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run, the first a warm-up")
    p.add_argument("--budget", type=float, default=450, help="seconds after which no further run starts")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; --dry: aot_eager, no C++ build)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    "Run every (size, mode) in its own process within the budget; write and print the table."
    args, start = parse_args(argv), time.monotonic()
    if args.steps < 2: sys.exit("error: --steps must be at least 2 (the first is a warm-up)")
    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available(): sys.exit("error: no CUDA device; use --dry to check the script on CPU")
    backend = args.compile_backend or ("aot_eager" if args.dry else "inductor")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "results-gpu-dry.md" if args.dry else ROOT / "benchmarks" / "results-gpu.md")
    data = write_data(Path(tempfile.mkdtemp()) / "train", 64 if args.dry else 2048, args.dry)
    modes = (False,) if args.no_compile else (False, True)
    results = []
    for compiled in modes:
        for size in args.sizes:
            spec = {"size": size, "compile": compiled, "backend": backend, "device": device, "steps": args.steps,
                    "overrides": check_config(size, args.dry, data)}
            left = args.budget - (time.monotonic() - start)
            results.append(run_in_process(spec, left) if left > 10 else {**spec, "error": "skipped: out of time budget"})
            print(table(results[-1:]).splitlines()[-1], flush=True)
    device_name = next((r["device"] for r in results if "device" in r), device)
    text = (f"# GPU check\n\n{device_name}, torch {torch.__version__}, {'float32 (dry run)' if args.dry else 'bf16 autocast'}, "
            f"{args.steps - 1} timed optimizer steps after a warm-up, "
            f"`python benchmarks/gpu_check.py {' '.join(argv or sys.argv[1:])}`\n\n{table(results)}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    cli = parse_args()
    if cli.one: print(json.dumps(run_one(json.loads(cli.one))))
    else: main()

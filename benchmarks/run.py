"""picomaml benchmarks: one table of costs measured side by side in one run (see benchmarks/README.md).

    HF_HUB_OFFLINE=1 PICOMAML_DATA=../shared/data python benchmarks/run.py [--sizes tiny small] [--quick] [--baseline]

Needs the prepared rows data/pretokenized/{train,eval} (`make demo` writes them). Every measurement runs
in a fresh subprocess, so its peak memory is its own: `resource.getrusage` max-RSS growth over the
measurement on CPU (tracemalloc does not see torch's allocations), `torch.cuda.max_memory_allocated`
on a GPU. Absolute times on a shared CPU drift; the ratios between rows of one run hold. On a GPU the
steps run under bf16 autocast and the AR and MAML rows report MFU (picomaml.plan's FLOP counts over
its `peak_flops`). The table is printed and written to benchmarks/results-<device>.md.
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from picomaml.maml import readout_features

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": [], "small": ["model.d_model=384", "model.ffn_hidden=1536"]}  # 12 blocks each (paper 1 §3.1)
QUICK = ["smlmt.n_way=8", "smlmt.k_shot=2", "smlmt.q_query=2", "smlmt.window=16", "smlmt.pool_rows=64"]


# --- the released trainer's episode: a benchmark baseline, NOT part of the package ----------------------

def released_style_episode(backbone, head, episode, inner_lr: float, inner_steps: int = 10,
                           every_position: bool = True) -> float:
    """BASELINE ONLY. An episode the way the released trainer ran it (docs/released-trainer.md, departures
    7, 9, 10 and 11): the backbone re-run, with a graph, for each of the inner steps; the head's last layer
    spans the whole vocabulary and is read at the class ids; the head is evaluated at every window
    position, each labelled with its class at the readout and class 0 elsewhere (our reading of "non-class
    tokens clamped to class 0"); inner SGD on the head only (its .grad keeps the last support gradient, as
    the released trainer's did); then the query loss backward and the head restored.
    `every_position=False` reads the head at the readout only (nbs/05_maml's recompute reference with the
    vocabulary head)."""
    def loss_of(ids, readout, labels):
        hidden = backbone.hidden(ids)  # (B, W, d), with a graph, at every inner step
        if not every_position:
            return F.cross_entropy(head(readout_features(hidden, readout), episode.class_ids), labels)
        logits = head.mlp(hidden)[..., episode.class_ids]  # (B, W, N) from (B, W, vocab)
        targets = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)  # (B, W): class 0 ...
        targets[torch.arange(len(ids)), readout] = labels  # ... except the readout position
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    params = list(head.parameters())
    snapshot = [p.detach().clone() for p in params]
    inner = torch.optim.SGD(params, lr=inner_lr)
    for _ in range(inner_steps):
        inner.zero_grad()
        loss_of(episode.support_ids, episode.support_readout, episode.support_labels).backward(inputs=params)
        inner.step()
    loss = loss_of(episode.query_ids, episode.query_readout, episode.query_labels)
    loss.backward()
    with torch.no_grad():
        for p, p0 in zip(params, snapshot): p.copy_(p0)
    return loss.item()


def plain_next_token_loss_sum(model, rows):
    "BASELINE ONLY (--baseline): the AR loss before §3's change, whole (B, T, V) logits cast to float32."
    return F.cross_entropy(model(rows[:, :-1]).flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum")


# --- one measurement, run in its own process -------------------------------------------------------------

def setup(size: str, quick: bool, device):
    "Config, model, head, an SMLMT episode and an AR micro-batch of the episode's token count."
    from picomaml.config import load_config
    from picomaml.data import ShardRows
    from picomaml.smlmt import build_episode
    from picomaml.train import build_model, episode_tables
    train_dir = ROOT / "data" / "pretokenized" / "train"
    if not (train_dir / "manifest.json").is_file():
        sys.exit(f"{train_dir} is missing: prepare the rows first (`make demo` does, or "
                 f"`python -m picomaml.data prepare --src $PICOMAML_DATA/corpus/train --out {train_dir} "
                 f"--seq-len 128`, same for eval)")
    cfg = load_config(ROOT / "configs" / "demo.yaml",
                      [f"data.train_path={train_dir}", *SIZES[size], *(QUICK if quick else [])])
    model, head, _ = build_model(cfg, device)
    # (R, 129)
    pool = ShardRows(train_dir, cfg.data.seq_len + 1, cfg.model.vocab_size).rows(range(cfg.smlmt.pool_rows))
    word_start, alpha_len, special = episode_tables(cfg)
    make_episode = lambda: build_episode(pool.to(device), cfg.smlmt, word_start.to(device), alpha_len.to(device),
                                         special, cfg.data.mask_id, seed=cfg.train.seed, step=0)
    episode = make_episode()
    tokens = episode.support_ids.numel() + episode.query_ids.numel()
    ar_rows = pool[: tokens // cfg.data.seq_len].to(device)  # (tokens / T, T + 1): the episode's token count
    return cfg, model, head, episode, ar_rows, make_episode


def step_and_count(job: dict, device):
    "(one-step callable, tokens, FLOPs or None) of a model measurement."
    from picomaml.lm_loss import next_token_loss_sum
    from picomaml.maml import MAMLHead, maml_step
    from picomaml.plan import episode_flops, next_token_flops
    cfg, model, head, episode, ar_rows, make_episode = setup(job["size"], job["quick"], device)
    ep_tokens, window = episode.support_ids.numel() + episode.query_ids.numel(), episode.support_ids.shape[1]
    ar_tokens, T = ar_rows[:, 1:].numel(), ar_rows.shape[1] - 1
    zero = lambda: [m.zero_grad(set_to_none=True) for m in (model, head)]
    case = job["case"]
    if case in ("ar", "ar-plain"):
        loss_fn = next_token_loss_sum if case == "ar" else plain_next_token_loss_sum
        return (lambda: (loss_fn(model, ar_rows).backward(), zero()), ar_tokens,
                next_token_flops(cfg.model, ar_tokens, T))
    if case == "maml":
        flops = episode_flops(cfg.model, episode.support_ids.numel(), episode.query_ids.numel(), window)
        return lambda: (maml_step(model, head, episode, cfg.maml, inner_seed=0), zero()), ep_tokens, flops
    if case in ("released", "released-readout"):
        # configs/released-*.yaml
        released = dataclasses.replace(cfg.maml, head_output="vocab", head_dropout=0.0, inner_lr=0.01)
        vocab_head = MAMLHead(cfg.model.d_model, cfg.smlmt.n_way, released, cfg.model.vocab_size).to(device)
        every_position = case == "released"
        return lambda: (released_style_episode(model, vocab_head, episode, released.inner_lr, released.inner_steps,
                                               every_position),
                        zero(), vocab_head.zero_grad()), ep_tokens, None
    if case == "episode-build":
        return make_episode, ep_tokens, None
    if case == "forward":
        return lambda: torch.no_grad()(model)(ar_rows[:, :-1]), ar_tokens, None
    raise ValueError(f"unknown case {case!r}")


READ_FILE_ROWS, READ_BLOCK, READ_RANKS = 1024, 256, 4  # a streamed file, the paper's branch micro-batch, its four GPUs


def read_step(job: dict):
    ("(callable, tokens): rank 1 of 4 reading every draw of one streamed file "
     "(a fresh reader: its region's decode included).")
    import tempfile

    from picomaml.data import StreamedRows, batch_for_step, write_hub_layout, write_shard
    row_len = 129 if job["quick"] else 2049  # the paper's 2,048-token rows
    work = Path(tempfile.mkdtemp())
    (work / "shards").mkdir()
    ids = torch.randint(1000, 50000, (READ_FILE_ROWS, row_len), generator=torch.Generator().manual_seed(0))
    write_shard(ids.tolist(), work / "shards" / "shard-00000.parquet")
    write_hub_layout(work / "shards", work / "hub", READ_FILE_ROWS, log=lambda m: None, row_group_rows=128)
    rows_per_rank = READ_BLOCK // READ_RANKS
    def read_file():
        rows = StreamedRows(str(work / "hub"), row_len, vocab_size=50304, rows_per_file=READ_FILE_ROWS,
                            block_rows=READ_BLOCK)
        for step in range(READ_FILE_ROWS // READ_BLOCK):
            batch_for_step(rows, step, 0, 1, READ_RANKS, rows_per_rank=rows_per_rank, accum_steps=1, seed=0)
        return rows
    return read_file, READ_FILE_ROWS // READ_RANKS * (row_len - 1)


def other_step(job: dict, device):
    "(callable, tokens) of the NER, spectra and reading measurements, which time a whole job once."
    if job["case"] == "read": return read_step(job)
    if job["case"] == "spectra":
        from picomaml.spectra import compute_spectra
        cfg, model, *_ = setup(job["size"], job["quick"], device)
        from picomaml.data import ShardRows
        eval_rows = ShardRows(ROOT / "data" / "pretokenized" / "eval", cfg.data.seq_len + 1, cfg.model.vocab_size)
        batch = eval_rows.rows(range(cfg.spectra.grad_rows))
        return lambda: compute_spectra(model, batch, cfg.spectra.layers, 0), batch[:, 1:].numel()
    from picomaml.config import DataConfig, ModelConfig, NERConfig
    from picomaml.model import PicoDecoder
    from picomaml.ner_data import encode_split, load_split
    from picomaml.ner_finetune import finetune
    from picomaml.tokenizer import load_tokenizer
    sentences, epochs = (100, 2) if job["quick"] else (2000, 10)
    ner = dataclasses.replace(NERConfig(), head=job["head"], epochs=epochs, patience=epochs)  # no early stopping
    encode = load_tokenizer(DataConfig()).encode
    train = encode_split(load_split("sk_snk", "train", ner)[:sentences], encode, ner.max_len)
    dev = encode_split(load_split("sk_snk", "dev", ner)[:sentences], encode, ner.max_len)
    torch.manual_seed(0)
    backbone = PicoDecoder(ModelConfig(d_model=96, ffn_hidden=384)).to(device)  # tiny Pico
    return lambda: finetune(backbone, train, dev, ner, cache=job["cached"]), None


def measure(job: dict) -> dict:
    "Median seconds of `job` over its repeats (after one warm-up), its peak memory growth, tokens and MFU."
    from picomaml.plan import peak_flops
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    flops, repeats = None, job["repeats"]
    if job["case"] in ("spectra", "ner", "read"): (fn, tokens), repeats = other_step(job, device), 1
    else: fn, tokens, flops = step_and_count(job, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else: base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with autocast:
        if job.get("warmup", True) and repeats > 1: fn(); sync()
        for _ in range(repeats):
            start = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else \
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB on Linux
    seconds, peak_flops_s = statistics.median(times), peak_flops(device)
    return {"seconds": seconds, "tokens": tokens, "peak_mib": peak,
            "mfu": flops / seconds / peak_flops_s if flops and peak_flops_s else None}


def run_job(job: dict) -> dict:
    "Measure `job` in a fresh Python process (its own peak memory); stop naming the job if it fails."
    proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"benchmark {job} failed:\n{proc.stderr[-3000:]}")
    print(f"  {job['size']:<5} {job['case']:<14} done", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the table ---------------------------------------------------------------------------------------------

def fmt(x, spec): return "–" if x is None else format(x, spec)

def row(size, what, r, ratio="", target=""):
    "One Markdown row from a measurement."
    tps = r["tokens"] / r["seconds"] if r.get("tokens") else None
    mfu = None if r.get("mfu") is None else 100 * r["mfu"]
    return (f"| {size} | {what} | {fmt(r.get('tokens'), ',')} | {r['seconds']:.3f} | {fmt(tps, ',.0f')} | "
            f"{fmt(r.get('peak_mib'), ',.0f')} | {fmt(mfu, '.1f')} | {ratio} | {target} |")

def verdict(ok: bool) -> str: return "**met**" if ok else "**NOT met**"

STAGE_FILES = {"make demo": "timings-demo.json", "make test": "timings-test.json"}  # under runs/, by the command


def stage_rows(runs_dir: Path = ROOT / "runs") -> list[str]:
    "Rows of the README commands' stage wall times, from the runs/timings-*.json they write (\"not run\" if absent)."
    rows = []
    for command, name in STAGE_FILES.items():
        path = runs_dir / name
        if not path.is_file():
            rows.append(f"| – | `{command}` | – | not run | – | – | – | – | – |")
            continue
        stages = json.loads(path.read_text())
        rows += [f"| – | `{command}`: {stage} | – | {sec:.1f} | – | – | – | – | – |" for stage, sec in stages.items()]
        rows.append(f"| – | `{command}`: total | – | {sum(stages.values()):.1f} | – | – | – | – | – |")
    return rows


def replace_stage_rows(path: Path, runs_dir: Path = ROOT / "runs") -> str:
    "The results table at `path` with its stage rows replaced by the current ones (the measured rows kept)."
    kept = [line for line in path.read_text().splitlines()
            if not line.startswith(tuple(f"| – | `{command}`" for command in STAGE_FILES))]
    return "\n".join(kept + stage_rows(runs_dir))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    p.add_argument("--quick", action="store_true", help="toy shapes, one repeat: checks the script, not the numbers")
    p.add_argument("--baseline", action="store_true",
                   help="also time the AR step before §3's fused output layer + loss")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per model measurement (median)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--stages-only", action="store_true",
                   help="only refresh the `make demo` and `make test` stage rows of the results file")
    args = p.parse_args(argv)
    if args.measure: return print(json.dumps(measure(json.loads(args.measure))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = ROOT / "benchmarks" / f"results-{'gpu' if device == 'cuda' else 'cpu'}{'-quick' if args.quick else ''}.md"
    if args.stages_only:
        if not out.is_file(): sys.exit(f"{out.relative_to(ROOT)} is missing: run python benchmarks/run.py first")
        table = replace_stage_rows(out)
        out.write_text(table + "\n")
        return print(table)
    name = torch.cuda.get_device_name() if device == "cuda" else \
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    repeats = 1 if args.quick else args.repeats
    job = lambda size, case, **kw: run_job({"size": size, "case": case, "quick": args.quick, "repeats": repeats, **kw})
    lines = [f"picomaml benchmarks on {name}{' (--quick: toy shapes)' if args.quick else ''}; "
             f"median of {repeats}, seconds per call\n",
             "| size | measurement | tokens | seconds | tokens/s | peak MiB | MFU % | ratio | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        ar, maml = job(size, "ar"), job(size, "maml")
        # one call: it is the slowest
        released = run_job({"size": size, "case": "released", "quick": args.quick, "repeats": 1})
        lines.append(row(size, "AR micro-batch (fwd + bwd)", ar, "1.00 × AR"))
        if args.baseline:
            plain = job(size, "ar-plain")
            lines.append(row(size, "AR micro-batch, --baseline: plain (B,T,V) logits + CE", plain,
                             f"{plain['seconds'] / ar['seconds']:.2f} × AR"))
        lines.append(row(size, "MAML micro-batch, cached support features", maml,
                         f"{maml['seconds'] / ar['seconds']:.2f} × AR",
                         f"≤ 1.5 × AR: {verdict(maml['seconds'] <= 1.5 * ar['seconds'])}"))
        lines.append(row(size, "released-style episode (BASELINE: backbone 10× re-run, vocab head)", released,
                         f"{released['seconds'] / maml['seconds']:.1f} × MAML",
                         f"≥ 4 × MAML: {verdict(released['seconds'] >= 4 * maml['seconds'])}"))
        readout = run_job({"size": size, "case": "released-readout", "quick": args.quick, "repeats": 1})
        lines.append(row(size, "… the same, vocab head read at the readout only (lower bound)", readout,
                         f"{readout['seconds'] / maml['seconds']:.1f} × MAML"))
        build, forward = job(size, "episode-build"), job(size, "forward")
        lines.append(row(size, "forward pass of the AR micro-batch (no grad)", forward, "1.00 × fwd"))
        lines.append(row(size, "building the SMLMT episode from the pool", build,
                         f"{build['seconds'] / forward['seconds']:.2f} × fwd"))
    spectra = job("tiny", "spectra")
    lines.append(row("tiny", "spectra of one checkpoint (weights + gradients)", spectra))
    for head in ("linear", "crf"):
        cached, recomputed = (job("tiny", "ner", head=head, cached=c) for c in (True, False))
        epochs = "2 epochs" if args.quick else "10 epochs"
        lines.append(row("tiny", f"NER head-only {head}, {epochs}: backbone every epoch", recomputed,
                         "1.00 × recompute"))
        lines.append(row("tiny", f"NER head-only {head}, {epochs}: feature cache", cached,
                         f"{recomputed['seconds'] / cached['seconds']:.1f} × faster",
                         f"≥ 5 ×: {verdict(recomputed['seconds'] >= 5 * cached['seconds'])}"))
    read = job("small", "read")
    draws = READ_FILE_ROWS // READ_BLOCK
    from picomaml.config import PRESETS_DIR, load_config
    from picomaml.plan import plan_run
    cfg = load_config(PRESETS_DIR / "pico-small-vanilla.yaml")
    # one draw
    planned = plan_run(cfg, 4, 80, 312, 0.4).est_seconds_per_step / (cfg.train.global_batch // cfg.train.branch_batch)
    per_draw = {**read, "seconds": read["seconds"] / draws, "tokens": read["tokens"] // draws}
    lines.append(row("–", f"reading one draw's rows for one rank of four (batch_for_step, streamed, "
                          f"{READ_BLOCK // READ_RANKS} rows)", per_draw,
                     f"{per_draw['seconds'] / planned:.3f} × a planned draw of pico-small-vanilla "
                     f"(4 × A100, 40 % MFU: {planned:.2f} s)",
                     f"≤ 0.1 × (hidden by the read-ahead): {verdict(per_draw['seconds'] <= 0.1 * planned)}"))
    lines += stage_rows()
    table = "\n".join(lines)
    print(table)
    out.write_text(table + "\n")
    print(f"\nwritten to {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

"The benchmark baselines compute what they claim: `pytest benchmarks` (tiny float64 shapes, seconds)."
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402

from picomaml.config import MAMLConfig, ModelConfig
from picomaml.lm_loss import next_token_loss_sum
from picomaml.maml import MAMLHead, maml_step
from picomaml.model import PicoDecoder


def tiny_setup():
    "A 2-block float64 Pico decoder, a vocabulary-indexed head (no dropout) and a 3-way 2+2-shot episode."
    torch.manual_seed(0)
    backbone = PicoDecoder(ModelConfig(d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=48, vocab_size=40,
                                       max_seq_len=16)).double()
    cfg = MAMLConfig(head_output="vocab", head_dropout=0.0, inner_lr=0.5, head_layers=3, head_hidden=16)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(2)
    episode = SimpleNamespace(support_ids=torch.randint(40, (6, 5), generator=g), support_labels=labels,
                              support_readout=torch.randint(5, (6,), generator=g),
                              query_ids=torch.randint(40, (6, 5), generator=g), query_labels=labels,
                              query_readout=torch.randint(5, (6,), generator=g),
                              class_ids=torch.tensor([7, 2, 30]))
    return backbone, MAMLHead(24, 3, cfg, vocab_size=40).double(), episode, cfg


def grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_released_style_at_the_readout_equals_maml_step():
    """Re-running the backbone every inner step changes the cost, not the result: same loss and backbone
    gradients. The head's .grad differs: like the released trainer, it keeps the last support gradient."""
    backbone, head, episode, cfg = tiny_setup()
    phi_0 = [p.detach().clone() for p in head.parameters()]
    loss = run.released_style_episode(backbone, head, episode, cfg.inner_lr, cfg.inner_steps, every_position=False)
    want_backbone, released_head = grads(backbone), grads(head)
    assert all(torch.equal(p, p0) for p, p0 in zip(head.parameters(), phi_0))  # head restored
    backbone.zero_grad(set_to_none=True); head.zero_grad(set_to_none=True)
    out = maml_step(backbone, head, episode, cfg)
    assert abs(out["loss"] - loss) < 1e-9
    for got, want in zip(grads(backbone), want_backbone):
        assert (got is None) == (want is None) and (got is None or torch.allclose(got, want, atol=1e-6))
    assert not all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads(head), released_head))


def test_released_style_every_position_is_a_different_loss():
    "With the head at every position (class 0 off the readout) the loss is another one, and still finite."
    backbone, head, episode, cfg = tiny_setup()
    every = run.released_style_episode(backbone, head, episode, cfg.inner_lr, cfg.inner_steps, every_position=True)
    readout = run.released_style_episode(backbone, head, episode, cfg.inner_lr, cfg.inner_steps, every_position=False)
    assert every == every and abs(every - readout) > 1e-3


def test_plain_baseline_equals_the_fused_ar_loss():
    backbone, *_ = tiny_setup()
    rows = torch.randint(0, 40, (3, 9))
    assert torch.allclose(run.plain_next_token_loss_sum(backbone, rows), next_token_loss_sum(backbone, rows, 5),
                          rtol=1e-6)


def test_reading_a_draw_reads_only_the_ranks_rows():
    ("The reading benchmark's job: rank 1 of 4 decodes a quarter of its streamed file (its region), "
     "every draw served from it.")
    read_file, tokens = run.read_step({"quick": True})
    assert (read_file().rows_read == run.READ_FILE_ROWS // run.READ_RANKS
            and tokens == run.READ_FILE_ROWS // run.READ_RANKS * 128)


def test_stages_only_replaces_the_stage_rows_and_keeps_the_measured_ones(tmp_path):
    "`--stages-only`: the two commands' rows come from the runs' timings files; measured rows are kept as they are."
    measured = "| tiny | AR micro-batch (fwd + bwd) | 8,192 | 7.949 | 1,031 | 1,661 | – | 1.00 × AR |  |"
    results = tmp_path / "results-cpu.md"
    stale = ["| – | `make demo`: pretrain demo-maml | – | 135.1 | – | – | – | – | – |",
             "| – | `make demo`: total | – | 788.9 | – | – | – | – | – |"]
    results.write_text("\n".join(["header", measured, *stale]) + "\n")
    (tmp_path / "timings-demo.json").write_text('{"pretrain demo-maml": 100.0, "ner sweep demo": 50.5}')
    assert run.replace_stage_rows(results, tmp_path).splitlines() == [
        "header", measured,
        "| – | `make demo`: pretrain demo-maml | – | 100.0 | – | – | – | – | – |",
        "| – | `make demo`: ner sweep demo | – | 50.5 | – | – | – | – | – |",
        "| – | `make demo`: total | – | 150.5 | – | – | – | – | – |",
        "| – | `make test` | – | not run | – | – | – | – | – |"]

"""How close editing and scoring come to this CPU's matmul peak.

1. Peak: the rate of a 2048 x 2048 matmul in fp32 and in bf16, with torch's threads as set.
2. Work: forward hooks on every ``nn.Linear`` (the LM head included) count the matmul FLOPs a run executes
   from the weight shapes and the tokens that actually pass (padding included, since it is computed):
   ``2 * in * out`` per token forward; backward adds ``2 * in * out`` for the input gradient when the input
   needs one, and another ``2 * in * out`` for the weight gradient when the weight trains. So the frozen blocks
   above the trained layer cost a forward and an input-gradient pass each (about 2x forward), the trained
   projection 3x, and the blocks below it nothing after their activations are cached. Attention's
   score/value products (``4 * T * heads * head_dim`` per token and block) are added; norms, activations and
   softmax (memory-bound) are not counted.
3. Time: a short real edit (``locft-bf`` at layer 1 up, a few steps of 32 edits) and a scoring pass over
   COUNTERFACT records, each under ``--dtype auto`` (bf16 autocast where the CPU has bf16 units) and fp32.

The fraction of peak is the counted FLOPs over the wall time, against the peak of the precision the run used;
the same per CPU second is printed too (steadier when other jobs share the cores).

    python benchmarks/roofline.py                     # demo model (gemma-3-270m), about 2 minutes
    python benchmarks/roofline.py --tiny              # tiny random model: a quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from _models import load_bench_model
from ftedit.atomic import write_json_atomic
from ftedit.config import resolve_config
from ftedit.data.loaders import load_requests
from ftedit.editor import edit
from ftedit.evaluate import evaluate_requests
from ftedit.params import find_blocks
from ftedit.precision import scoring_autocast, set_requested, train_autocast

logger = logging.getLogger("roofline")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact" / "easyedit" / "counterfact-edit.json"


def matmul_peak(dtype: torch.dtype, n: int = 2048, min_seconds: float = 3.0) -> tuple[float, float]:
    """FLOP per wall second and per CPU second (all threads) of repeated ``n x n`` matmuls in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < min_seconds:
        a @ b
        reps += 1
    flops = 2 * n ** 3 * reps
    return flops / (time.perf_counter() - start), flops / (time.process_time() - cpu)


@dataclass
class Counter:
    forward: float = 0.0
    backward: float = 0.0
    block_tokens: int = 0
    head_rows: int = 0

    @property
    def total(self) -> float:
        return self.forward + self.backward


def _linear_hook(counter: Counter, is_head: bool):
    def hook(module: nn.Linear, args):
        x = args[0]
        tokens = x.numel() // module.in_features
        flops = 2 * tokens * module.in_features * module.out_features
        counter.forward += flops
        if torch.is_grad_enabled():
            counter.backward += flops * (int(x.requires_grad) + int(module.weight.requires_grad))
        if is_head:
            counter.head_rows += tokens
    return hook


def _block_hook(counter: Counter, attn_width: int):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        batch, length = x.shape[0], x.shape[1]
        counter.block_tokens += batch * length
        flops = 4 * batch * length * length * attn_width  # Q K^T and attention x V
        counter.forward += flops
        if torch.is_grad_enabled() and x.requires_grad:
            counter.backward += 2 * flops
    return hook


@contextlib.contextmanager
def counting(model):
    """Count the matmul FLOPs of every forward (and the backward it implies) while inside."""
    counter = Counter()
    head = model.get_output_embeddings()
    cfg = model.config.get_text_config()
    attn_width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    handles = [m.register_forward_pre_hook(_linear_hook(counter, m is head))
               for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [b.register_forward_pre_hook(_block_hook(counter, attn_width), with_kwargs=True)
                for b in find_blocks(model)[1]]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


def timed_edit(model, tok, requests, args) -> tuple[float, Counter, dict]:
    config = resolve_config("locft-bf", overrides=["params.layers=1", "params.modules=up",
                                                   f"train.epochs={args.steps}", "train.batch_size=32"])
    with counting(model) as counter:
        start, cpu = time.perf_counter(), time.process_time()
        result = edit(model, tok, requests, config, progress=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result.restore()
    return seconds, counter, {"cpu_seconds": cpu, "steps": sum(t.steps for t in result.train),
                              "train_seconds": result.seconds["train"]}


def timed_scoring(model, tok, requests, args) -> tuple[float, Counter, dict]:
    evaluate_requests(model, tok, requests[:2], progress=False)  # warm-up
    with counting(model) as counter:
        start, cpu = time.perf_counter(), time.process_time()
        result = evaluate_requests(model, tok, requests, batch_size=args.batch_size, progress=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, counter, {"cpu_seconds": cpu, "records": len(requests),
                              "rescored": result.config["pairs_rescored_fp32"]}


def load(args):
    return load_bench_model(args.model, tiny=args.tiny, dtype="auto")


def measure(model, tok, args) -> list[dict]:
    edits = load_requests(args.data, n=32).requests
    records = load_requests(args.data, n=args.records, offset=32).requests
    rows = []
    for precision in ("auto", "fp32"):
        set_requested(model, precision)
        timed_edit(model, tok, edits[:4], argparse.Namespace(steps=1))  # warm-up: one-time checks, caches
        for name, run, data, bf16 in (("edit", timed_edit, edits, train_autocast(model)),
                                      ("scoring", timed_scoring, records, scoring_autocast(model))):
            seconds, counter, extra = run(model, tok, data, args)
            rows.append({"run": name, "dtype": precision, "compute": "bf16" if bf16 else "fp32", "seconds": seconds,
                         "gflop_forward": counter.forward / 1e9, "gflop_backward": counter.backward / 1e9,
                         "block_tokens": counter.block_tokens, "head_rows": counter.head_rows, **extra})
    return rows


def report(rows: list[dict], peaks: dict[str, tuple[float, float]]) -> None:
    """Fractions of peak per wall second and per CPU second (the second is steadier when other jobs share
    the cores: a process that gets half the cores has half the wall rate, not half the CPU rate)."""
    fp32, bf16 = peaks["fp32"], peaks["bf16"]
    logger.info("peak (2048^2 matmul, %d threads): fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s (%.2fx); per CPU second: "
                "fp32 %.1f, bf16 %.1f GFLOP", torch.get_num_threads(), fp32[0] / 1e9, bf16[0] / 1e9,
                bf16[0] / fp32[0], fp32[1] / 1e9, bf16[1] / 1e9)
    logger.info("%-8s %-6s %-7s %8s %8s %10s %10s %12s %10s %9s %9s", "run", "dtype", "compute", "wall s", "CPU s",
                "GFLOP fwd", "GFLOP bwd", "block tok", "GFLOP/s", "of peak", "(CPU s)")
    for r in rows:
        flops = (r["gflop_forward"] + r["gflop_backward"]) * 1e9
        r["fraction_of_peak"] = flops / r["seconds"] / peaks[r["compute"]][0]
        r["fraction_of_peak_cpu"] = flops / r["cpu_seconds"] / peaks[r["compute"]][1]
        logger.info("%-8s %-6s %-7s %8.1f %8.1f %10.1f %10.1f %12d %10.1f %8.1f%% %8.1f%%", r["run"], r["dtype"],
                    r["compute"], r["seconds"], r["cpu_seconds"], r["gflop_forward"], r["gflop_backward"],
                    r["block_tokens"], flops / r["seconds"] / 1e9, 100 * r["fraction_of_peak"],
                    100 * r["fraction_of_peak_cpu"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tiny", action="store_true", help="tiny random Gemma-3 model (smoke run)")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the edit (32 edits a step)")
    parser.add_argument("--records", type=int, default=100, help="COUNTERFACT records scored")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    start = time.perf_counter()
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    model, tok = load(args)
    rows = measure(model, tok, args)
    report(rows, peaks)
    logger.info("total %.0f s", time.perf_counter() - start)
    if args.out:
        write_json_atomic(args.out, {"threads": torch.get_num_threads(), "peak_flops": peaks, "runs": rows})


if __name__ == "__main__":
    main()

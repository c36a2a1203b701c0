"""How fast the PPO update's own matrix products can run on this machine, alone: the ceiling of its MFU.

``python benchmarks/gemm_ceiling.py [--rows 1024] [--precision bf16]`` times, in one process, the
three products of every linear layer of the benchmarks' GPT-2 (:data:`common.SPEC`) at ``rows``
token rows (batch x sequence): the forward ``x W^T``, the input gradient ``g W`` and the weight
gradient ``g^T x``, then the square-matrix peak (:func:`common.matmul_peak`) beside them. The
update's MFU cannot pass the products' combined rate over that peak; when the measured update MFU
is far below it, the time goes to the other kernels (elementwise, normalisation, casts), not
to the matmuls.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SPEC, ModelSpec, machine_info, matmul_peak, set_threads  # noqa: E402


def linear_shapes(spec: ModelSpec = SPEC) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of each distinct linear layer of a GPT-2 block, and the LM head."""
    d = spec.n_embd
    return [("attn.c_attn", d, 3 * d), ("attn.c_proj", d, d), ("mlp.c_fc", d, 4 * d), ("mlp.c_proj", 4 * d, d),
            ("lm_head", d, spec.vocab)]


def rate(fn, flops: float, seconds: float) -> float:
    """FLOP/s of ``fn`` repeated for about ``seconds`` after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - t0)


def ceiling(rows: int, precision: str, seconds: float = 0.5, spec: ModelSpec = SPEC) -> dict:
    """Per-layer FLOP/s of the three products, their combined rate (total FLOPs / total time), the peak."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    layers, flops, secs = {}, 0.0, 0.0
    for name, k, n in linear_shapes(spec):
        x, w, g = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(rows, n, dtype=dtype)
        f = 2.0 * rows * k * n
        got = {"forward": rate(lambda: torch.nn.functional.linear(x, w), f, seconds),
               "input_grad": rate(lambda: g @ w, f, seconds),
               "weight_grad": rate(lambda: g.t() @ x, f, seconds)}
        layers[name] = got
        flops += 3 * f
        secs += sum(f / r for r in got.values())
    peak = matmul_peak(precision)
    return {"rows": rows, "precision": precision, "layers": layers, "combined_flops": flops / secs, "peak_flops": peak,
            "ceiling_mfu": flops / secs / peak}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16 * 64, help="token rows per product (batch x sequence; default "
                                                               "the quick PPO benchmark's 16 x 64)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per product")
    a = ap.parse_args(argv)
    threads = set_threads()
    m = machine_info()
    print(f"{m['cpu']}, {m['nproc']} cpus, torch {m['torch']}, {threads} threads; {a.rows} rows, {a.precision}")
    c = ceiling(a.rows, a.precision, a.seconds)
    for name, got in c["layers"].items():
        print(f"  {name:12s} " + "  ".join(f"{k} {v / 1e9:7.0f}" for k, v in got.items()) + "  GFLOP/s")
    print(f"products together {c['combined_flops'] / 1e9:.0f} GFLOP/s; square-matrix peak {c['peak_flops'] / 1e9:.0f} "
          f"GFLOP/s; ceiling of the update's MFU {c['ceiling_mfu']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

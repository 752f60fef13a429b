"""Benchmark: one linear layer, `F.linear` against the weight packed for oneDNN (what the in-process
back-end does in fp32 on a CPU, `cai.lm.hf_engine._PackedWeights`), for the embedded model's shapes
at the row counts of a decoding step and of a prefill.

    python bench/bench_linear.py                 # rows 17, 32, 256; every shape of the embedded model
    python bench/bench_linear.py --rows 8 16     # other row counts
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cai.models import cpu_description

# (name, out_features, in_features) of SmolLM2-135M's linear layers
SHAPES = [("q, o", 576, 576), ("k, v", 192, 576), ("gate, up", 1536, 576), ("down", 576, 1536),
          ("output layer", 49152, 576)]


def per_call(f, repeat: int) -> float:
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(repeat):
        f()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[17, 32, 256])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch build has no oneDNN: nothing to compare")
    print(f"{cpu_description()}; {torch.get_num_threads()} threads; fp32")
    print(f"{'layer':>13} {'rows':>5} {'F.linear ms':>12} {'packed ms':>10} {'GFLOP/s':>16} {'speed-up':>9}")
    torch.manual_seed(0)
    for rows in args.rows:
        for name, n, k in SHAPES:
            w, x = torch.randn(n, k), torch.randn(rows, k)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            a = per_call(lambda x=x, w=w: F.linear(x, w), args.repeat)
            b = per_call(lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
                         args.repeat)
            err = float((F.linear(x, w) - torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")).abs().max())
            gf = 2 * rows * n * k / 1e9
            print(f"{name:>13} {rows:>5} {a * 1e3:>12.3f} {b * 1e3:>10.3f} {gf / a:>7.0f} -> {gf / b:>5.0f} "
                  f"{a / b:>8.2f}x  (max difference {err:.1e})")


if __name__ == "__main__":
    main()

"""
Where a CPU training step of the demo's ResNet-18 at 64 px goes, and why bfloat16 buys less there
than a GEMM benchmark promises: GEMM throughput in float32 and bfloat16, then every distinct
convolution of the ResNet-18 at the demo's batch (64 images of 64 px), forward plus both backward
products, timed alone in both precisions.

  python dev/cpu_kernels.py                   # ~1 minute on 2 cores; run nothing else meanwhile

On CPUs with AMX, oneDNN's bf16 GEMMs run many times faster than float32, but the convolutions of
the last two stages work on 4x4 and 2x2 grids, where the kernels (above all the weight gradients)
reach a small fraction of it.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------------------------
batch = 64
repeats = 5
# ----------------------------------------------------------------------------------------------
configure(globals())
torch.manual_seed(0)


def timed(fn):
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print("\nGEMM (M x K) @ (K x N)            float32 GFLOP/s   bfloat16 GFLOP/s")
for m, k, n in ((4096, 4096, 4096), (256, 4608, 512), (1024, 1024, 1024)):
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        rates.append(2 * m * k * n / timed(lambda: a @ b) / 1e9)
    print(f"{m:>5} x {k:>5} @ {k:>5} x {n:>5}       {rates[0]:>8.0f}          {rates[1]:>8.0f}")

# the distinct convolutions of a ResNet-18 at 64 px: (in, out, input grid, kernel, stride, how many)
CONVS = [(3, 64, 64, 7, 2, 1), (64, 64, 16, 3, 1, 4), (64, 128, 16, 3, 2, 1),
         (128, 128, 8, 3, 1, 3), (64, 128, 16, 1, 2, 1), (128, 256, 8, 3, 2, 1),
         (256, 256, 4, 3, 1, 3), (128, 256, 8, 1, 2, 1), (256, 512, 4, 3, 2, 1),
         (512, 512, 2, 3, 1, 3), (256, 512, 4, 1, 2, 1)]
print(f"\nconvolution, batch {batch}, channels-last,       GFLOP   float32 ms  bfloat16 ms  "
      "bfloat16 GFLOP/s  count")
print("forward + input and weight gradients")
totals = [0.0, 0.0]
for c_in, c_out, grid, kernel, stride, count in CONVS:
    out_grid = (grid + 2 * (kernel // 2) - kernel) // stride + 1
    # three products of the same size
    flops = 3 * 2 * batch * out_grid ** 2 * c_out * c_in * kernel ** 2
    ms = []
    for dtype in (torch.float32, torch.bfloat16):
        conv = torch.nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False).to(
            dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(batch, c_in, grid, grid,
                        dtype=dtype).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(c_in != 3)  # the stem's input needs no gradient

        def step():
            y = conv(x)
            y.backward(torch.ones_like(y))
        ms.append(1000 * timed(step))
    totals = [t + count * v for t, v in zip(totals, ms)]
    name = f"{c_in:>3} -> {c_out:>3}, {grid:>2}x{grid:<2} k{kernel} s{stride}"
    print(f"{name:<40}{flops / 1e9:>8.2f}{ms[0]:>12.1f}{ms[1]:>13.1f}"
          f"{flops / ms[1] / 1e6:>18.0f}{count:>7}")
print(f"{'all convolutions of one step':<40}{'':>8}{totals[0]:>12.1f}{totals[1]:>13.1f}")

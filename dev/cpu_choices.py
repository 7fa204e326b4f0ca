"""
Dev: the demo's speed choices on the CPU this runs on, each timed alone: channels-last against
contiguous memory, fused against foreach AdamW, 1 against 2 threads, float32 against bfloat16
(where the CPU has it), the demo's image size against smaller ones, and 0, 1 and 2 DataLoader
workers feeding the shapes world's JPEGs; then where a float32 step's time goes (a profile of the
convolutions, the decoder's matrix products and the optimizer) and the fraction of the CPU's
float32 matrix-product rate (a large GEMM's, measured) that the step reaches.

  python dev/cpu_choices.py                     # this CPU's own kernels; ~5 minutes on 2 cores
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python dev/cpu_choices.py
                                                # an AVX-512 machine's stand-in for an AVX2 laptop

The step is train.py's on config/shapes.py's model (R-18, L1 H256, batch 64): forward, backward,
clipping, AdamW inside LookAhead. Run nothing else meanwhile.
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from coco import CocoCaptions, collate, to_device  # noqa: E402
from configurator import configure  # noqa: E402
from evaluate import native_bf16  # noqa: E402
from lookahead import LookAhead  # noqa: E402
from model import VirTex, VirTexConfig, flops_per_image  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# ----------------------------------------------------------------------------------------------
data = 'data/shapes'        # the world whose JPEGs the loader rows read (python demo.py makes it)
batch = 64                  # config/shapes.py's
steps = 12                  # timed steps per row, after warmup ones
warmup = 3                  # untimed steps first
rounds = 3                  # every row is timed once a round; a row's time is its median
sizes = '64,48,32'          # image sizes of the size rows (the world is drawn at 64 px)
# ----------------------------------------------------------------------------------------------
configure(globals())
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
capability = torch.backends.cpu.get_cpu_capability()


def model_and_optimizer(channels_last=True, fused=True):
    torch.manual_seed(0)
    cfg = VirTexConfig(visual='resnet18', vocab_size=256, n_layer=1, n_embd=256, n_head=4,
                       dropout=0.0, zero_init_residual=False, init_std=0.0566)
    model = VirTex(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = model.param_groups(0.01, 2e-3, 5e-4)
    inner = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.999), fused=fused,
                              foreach=None if fused else True)
    return model, LookAhead(inner, 5, 0.5)


def synthetic(size, channels_last=True):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(4, 256, (batch, 16), generator=g)
    tokens[:, 0], tokens[:, -1] = 1, 2
    return images.contiguous(memory_format=torch.channels_last if channels_last else
                             torch.contiguous_format), tokens


def step(model, optimizer, images, tokens, dtype):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
        loss, _ = model(images, tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(batches, dtype='float32', channels_last=True, fused=True, threads=2):
    """ms per step over `steps` steps after `warmup`, each step's batch from batches()."""
    torch.set_num_threads(threads)
    model, optimizer = model_and_optimizer(channels_last, fused)
    for _ in range(warmup):
        step(model, optimizer, *next(batches), dtype)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, *next(batches), dtype)
    torch.set_num_threads(2)
    return 1000 * (time.perf_counter() - t0) / steps


def repeat(size, channels_last=True):
    images, tokens = synthetic(size, channels_last)
    while True:
        yield images, tokens


def loaded(workers):
    """The shapes world's training JPEGs through CocoCaptions and `workers` DataLoader workers, as
    train.py reads them (the uint8 batch normalized and made channels-last)."""
    tok = Tokenizer(os.path.join(HERE, data, 'vocab.model'))
    dataset = CocoCaptions(os.path.join(HERE, data, 'coco'), 'train2017', tok, 64, 30, train=True,
                           seed=0, min_crop_scale=1.0, color_jitter=0.0)
    loader = torch.utils.data.DataLoader(dataset, batch, sampler=[(0, i) for i in range(
        batch * (steps + warmup + 1))], num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0)
    for images, tokens, _ in loader:
        yield to_device(images, tokens, 'cpu')


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels for {capability}; "
      f"native bf16: {native_bf16('cpu')}; batch {batch}, {steps} steps a row", flush=True)
rows = [('the demo (channels-last, fused AdamW, 2 threads), float32, 64 px',
         lambda: time_steps(repeat(64)))]
if native_bf16('cpu'):
    rows += [('... bfloat16 autocast', lambda: time_steps(repeat(64), 'bfloat16')),
             ('... bfloat16 autocast, contiguous memory',
              lambda: time_steps(repeat(64, False), 'bfloat16', channels_last=False))]
rows += [('... contiguous memory', lambda: time_steps(repeat(64, False), channels_last=False)),
         ('... foreach AdamW', lambda: time_steps(repeat(64), fused=False)),
         ('... 1 thread', lambda: time_steps(repeat(64), threads=1))]
for size in [int(size) for size in sizes.split(',') if int(size) != 64]:
    rows += [(f'... {size} px', lambda size=size: time_steps(repeat(size))),
             (f'... {size} px, contiguous memory',
              lambda size=size: time_steps(repeat(size, False), channels_last=False))]
rows += [(f'... fed by {w} DataLoader worker(s) (64 px JPEGs)', lambda w=w: time_steps(loaded(w)))
         for w in (0, 1, 2)]
times = {name: [] for name, _ in rows}
for round_ in range(rounds):  # rounds, so that a slow minute of the machine hits every row alike
    for name, measure in rows:
        times[name].append(measure())
    print(f"round {round_ + 1} of {rounds} timed", flush=True)
for name, _ in rows:
    print(f"{name:<58} {sorted(times[name])[rounds // 2]:7.0f} ms/step  (rounds: "
          f"{', '.join(f'{t:.0f}' for t in times[name])})", flush=True)

# where a float32 step goes, and how near the CPU's matrix-product rate it runs
model, optimizer = model_and_optimizer()
images, tokens = synthetic(64)
for _ in range(warmup):
    step(model, optimizer, images, tokens, 'float32')
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    for _ in range(3):
        step(model, optimizer, images, tokens, 'float32')
share = {'convolutions (forward and backward)': 0.0, 'matrix products (the decoder)': 0.0,
         'the optimizer (AdamW, LookAhead)': 0.0, 'the rest': 0.0}
total = sum(e.self_cpu_time_total for e in profile.key_averages())
for e in profile.key_averages():
    kind = 'convolutions (forward and backward)' if 'conv' in e.key else \
        'matrix products (the decoder)' if any(k in e.key for k in ('mm', 'linear', 'matmul')) \
        else 'the optimizer (AdamW, LookAhead)' if 'adam' in e.key or 'lerp' in e.key \
        else 'the rest'
    share[kind] += e.self_cpu_time_total / total
print('a float32 step, by its kernels\' own time: ' + ', '.join(
    f"{name} {100 * part:.0f} %" for name, part in share.items()), flush=True)


def rate(flops, work, repeats=5):
    """FLOP/s of work() (run once untimed first)."""
    work()
    t0 = time.perf_counter()
    for _ in range(repeats):
        work()
    return repeats * flops / (time.perf_counter() - t0)


# the peak as the two libraries reach it: a large GEMM (MKL, which may not use AVX-512 on AMD
# CPUs) and the same product as a 1x1 convolution (oneDNN, which runs the ResNet's convolutions)
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
gemm = rate(2 * 2048 ** 3, lambda: a @ b)
x = torch.randn(1, 2048, 32, 64).to(memory_format=torch.channels_last)
w = torch.randn(2048, 2048, 1, 1)
conv = rate(2 * 2048 ** 3, lambda: torch.nn.functional.conv2d(x, w))
ms = sorted(time_steps(repeat(64)) for _ in range(rounds))[rounds // 2]
achieved = flops_per_image(model_and_optimizer()[0], 64) * batch / (ms / 1000)
peak = max(gemm, conv)
print(f"float32 peak as measured: a 2048x2048 GEMM {gemm / 1e9:.0f} GFLOP/s, the same as a 1x1 "
      f"convolution {conv / 1e9:.0f} GFLOP/s; the demo's float32 step ({ms:.0f} ms) runs at "
      f"{achieved / 1e9:.0f} GFLOP/s, {100 * achieved / peak:.0f} % of the higher", flush=True)

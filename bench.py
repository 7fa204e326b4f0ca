"""
Measure every stage's speed and peak memory, for the CPU demo model and the paper's model.

  # CPU, a few minutes: shapes config and R-50 L1 H2048 at 224
  python bench.py
  # GPU: bf16 autocast + torch.compile, paper batch 32 per GPU
  python bench.py --device=cuda
  # a subset: train, train_data, data, caption, svm, torchrun
  python bench.py --stages=train,svm
  # on a machine with one GPU: every GPU measurement in at most 4 minutes, row by row
  bash dev/gpu_check.sh

Stages: train, a training step (forward, backward, clipping, SGD + LookAhead) on a synthetic batch,
in images/s and, on a GPU, MFU, in each of `dtypes` (on a CPU with native bfloat16: float32 and
bfloat16 side by side); train_data, the same step fed by the real data path (640x480 JPEGs read by
`data_workers` DataLoader workers, decoded and augmented there or, with decode_on=device, on the
device), so the pipeline's ceiling shows; data, the images/s that one worker delivers (decode,
augment, tokenize, batch; 640x480 JPEGs to 224 px and the shapes world's 64 px JPEGs), and the
device's own decode and augmentation of whole batches; caption, beam search (beam 5) in captions/s
with the backbone's share; svm, the 320 SVMs of a VOC07-sized evaluation (5011 x 2048 trainval,
4952 x 2048 test, 20 classes, 4 costs, 3 folds + refit) in seconds; torchrun, train.py under a
1-process torchrun on a small shapes world (DDP, NCCL on a GPU, and compile where it is on).
Each row is printed the moment it is measured (and appended to --rows_file), then the whole table.
"""

import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from typing import Annotated

import numpy as np
import torch
from PIL import Image, ImageDraw

from coco import CocoCaptions, collate, to_device
from configurator import DEVICE, NON_NEGATIVE, POSITIVE, CommaList, Interval, configure
from evaluate import native_bf16, svm_products_dtype
from gpu_augment import decode_and_augment
from lookahead import LookAhead
from model import VirTex, VirTexConfig, flops_per_image

STAGES = ('train', 'train_data', 'data', 'caption', 'svm', 'torchrun')
# ----------------------------------------------------------------------------------------------
device: DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'  # cpu, cuda, cuda:1, ...
# training precisions to time, e.g. float32,bfloat16; auto: float32 and, where the hardware has it,
# bfloat16 on a CPU; bfloat16 (else float16) on a GPU
dtypes: Annotated[str, CommaList('auto', 'float32', 'bfloat16', 'float16')] = 'auto'
compile = torch.cuda.is_available()  # torch.compile the training step (GPU default)
stages: Annotated[str, CommaList(*STAGES)] = 'train,data,caption,svm'
# which model configs to time for train and caption
models: Annotated[str, CommaList('shapes', 'paper')] = 'shapes,paper'
paper_batch: NON_NEGATIVE = 0  # 0: 32 on a GPU (per GPU, as in the paper), 8 on a CPU
shapes_batch: POSITIVE = 64  # config/shapes.py
warmup_steps: NON_NEGATIVE = 3  # untimed steps first (compilation, allocator warm-up)
timed_steps: POSITIVE = 5
# images per data-pipeline measurement (the first batch of 32 is not timed)
data_images: Annotated[int, Interval('(32, inf)')] = 256
data_workers: NON_NEGATIVE = min(8, os.cpu_count() or 1)  # DataLoader workers of train_data
# where train_data's JPEGs are decoded and augmented: workers, device, or both in turn
decode_on: Annotated[str, CommaList('workers', 'device')] = 'workers'
torchrun_iters: POSITIVE = 40  # iterations of the torchrun stage's run
caption_images: POSITIVE = 8  # images per beam-search batch
caption_steps: POSITIVE = 13  # decoding steps per caption (a COCO caption is ~12 words + [EOS])
svm_images: Annotated[int, Interval('[60, inf)')] = 5011  # trainval images of the SVM stage
peak_tflops: POSITIVE = 989.0  # per-GPU bf16 dense peak for MFU (H100/H200 989, A100 312)
rows_file = ''              # also append each row here, as a markdown table line, when measured
seed = 0                    # the synthetic batches and images
# ----------------------------------------------------------------------------------------------


def device_type():
    return 'cuda' if device.startswith('cuda') else 'cpu'


def autocast(dtype):
    return nullcontext() if dtype == 'float32' else torch.autocast(device_type(),
                                                                   dtype=getattr(torch, dtype))


def model_config(name):
    """(model config, image size, training batch) of the CPU demo's model or the paper's."""
    if name == 'shapes':  # config/shapes.py
        return VirTexConfig(visual='resnet18', vocab_size=256, n_layer=1, n_embd=256,
                            n_head=4), 64, shapes_batch
    return VirTexConfig(visual='resnet50', vocab_size=10000, n_layer=1, n_embd=2048,
                        n_head=32), 224, paper_batch or (32 if device_type() == 'cuda' else 8)


def reset_peak_memory(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
        except OSError:
            pass


def peak_memory_gb(device) -> float:
    """The GPU's peak allocation, or the process's peak resident set (since reset_peak_memory)."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def sync():
    if device_type() == 'cuda':
        torch.cuda.synchronize()


def random_batch(cfg, size, B):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, size, size, generator=g)
    tokens = torch.randint(4, cfg.vocab_size, (B, 16), generator=g)  # about a COCO caption's length
    tokens[:, 0], tokens[:, -1] = cfg.sos_id, cfg.eos_id
    return images.to(device).contiguous(memory_format=torch.channels_last), tokens.to(device)


rows = []  # (stage, what, setting, result, time, peak memory in GB)


def add_row(*row):
    """A measured row: kept for the table, printed at once, and appended to rows_file (a killed run
    keeps every row it finished)."""
    rows.append(row)
    line = '| ' + ' | '.join([*row[:5], f"{row[5]:.2f} GB" if row[5] else '']) + ' |'
    print(line, flush=True)
    if rows_file:
        with open(rows_file, 'a') as f:
            f.write(line + '\n')


def bench_train(name, dtype, loader=None, decode=False):
    """Time training steps of a model_config in `dtype`: on one synthetic batch, or on the loader's
    batches (decode: JPEG files, decoded and augmented on the device)."""
    cfg, size, B = model_config(name)
    torch.manual_seed(seed)
    model = VirTex(cfg).to(device, memory_format=torch.channels_last)
    flops = flops_per_image(model, size) if device_type() == 'cuda' else None
    # as train.py
    sgd = torch.optim.SGD(model.param_groups(1e-4, 0.2, 0.001), momentum=0.9, fused=True)
    optimizer = LookAhead(sgd, 5, 0.5)
    step_model = torch.compile(model) if compile else model
    images, tokens = random_batch(cfg, size, B)
    batches = iter(loader) if loader is not None else None

    def step():
        nonlocal images, tokens
        if batches is not None:  # uint8 from the workers, normalized on the device, as train.py
            images, tokens, _ = next(batches)
            if decode:
                images = decode_and_augment(images, device)[0]
            images, tokens = to_device(images, tokens, device)
        with autocast(dtype):
            loss, _ = step_model(images, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    sync()
    reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in range(timed_steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / timed_steps
    mfu = f", mfu {100 * flops * B / dt / (peak_tflops * 1e12):.1f}%" if flops else ''
    source = '' if loader is None else f", JPEGs, {loader.num_workers} workers"
    source += f", decoded on {device}" if decode else ''
    add_row('train step', name, f"batch {B}, {dtype}{', compiled' if compile else ''}{source}",
            f"{B / dt:.1f} img/s{mfu}", f"{1000 * dt:.0f} ms/step", peak_memory_gb(device))


def bench_train_data(name, dtype):
    """The training step fed by the real data path: 640x480 JPEGs through CocoCaptions and
    data_workers workers, decoded and augmented where decode_on says."""
    cfg, size, B = model_config(name)
    n = B * (warmup_steps + timed_steps + 2)
    with tempfile.TemporaryDirectory() as folder:
        write_jpegs(folder, n, 640, 480)
        for where in decode_on.split(','):
            dataset = CocoCaptions(folder, 'train2017', WordTokenizer(), size, cfg.max_len,
                                   train=True, seed=seed, decode_on_device=where == 'device')
            loader = torch.utils.data.DataLoader(
                dataset, sampler=[(0, i) for i in range(n)], batch_size=B,
                num_workers=data_workers, drop_last=True, pin_memory=device_type() == 'cuda',
                collate_fn=partial(collate, pad_to=cfg.max_len if compile else 0))
            bench_train(name, dtype, loader, decode=where == 'device')


def bench_torchrun():
    """train.py under a 1-process torchrun on a small shapes world: DDP (NCCL on a GPU) and, where
    on, compile."""
    with tempfile.TemporaryDirectory() as folder:
        def script(*args):
            proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__)))
            if proc.returncode:
                raise SystemExit(f"error: {' '.join(args[:3])} "
                                 f"failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            return proc.stdout
        script('data/shapes/prepare.py', f'--out={folder}', '--n_voc_trainval=20',
               f'--n_train={max(64, min(640, shapes_batch * torchrun_iters))}', '--n_val=64',
               '--n_voc_test=20', '--n_folder_train=20', '--n_folder_val=10')
        script('tokenizer.py', f'--captions={folder}/coco/annotations/captions_train2017.json',
               '--vocab_size=96', f'--out={folder}/vocab')
        t0 = time.perf_counter()
        out = script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
                     'train.py', 'config/shapes.py', f'--data_root={folder}/coco',
                     f'--tokenizer={folder}/vocab.model', f'--out_dir={folder}/run',
                     f'--device={device}', f'--compile={compile}', f'--max_iters={torchrun_iters}',
                     f'--eval_interval={torchrun_iters}', '--log_interval=2',
                     f'--batch_size={shapes_batch}', '--num_workers=2')
        done = re.search(r'done: .*?([\d.]+) ms/iter and ([\d.]+) img/s', out)
        what = (f"{torchrun_iters} iterations of {shapes_batch}, "
                f"{device}{', compiled' if compile else ''}")
        add_row('torchrun, 1 process', 'shapes', what, f"{done.group(2)} img/s after warm-up",
                f"{time.perf_counter() - t0:.0f} s in all", 0.0)


def write_jpegs(folder, n, width, height):
    """COCO-layout folder of smooth random pictures with a few shapes (JPEG decoding cost depends on
    content)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'train2017'))
    os.makedirs(os.path.join(folder, 'annotations'))
    images, annotations = [], []
    for i in range(n):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, width - 60), rng.integers(0, height - 60)
            draw.ellipse((x, y, x + 60, y + 40),
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        name = f'{i:012d}.jpg'
        image.save(os.path.join(folder, 'train2017', name), quality=90)
        images.append({'id': i, 'file_name': name, 'width': width, 'height': height})
        annotations.append({'id': i, 'image_id': i, 'caption': 'a red ball to the left of a blue '
                                                               'box on a table'})
    with open(os.path.join(folder, 'annotations', 'captions_train2017.json'), 'w') as f:
        json.dump({'images': images, 'annotations': annotations}, f)


class WordTokenizer:
    """Stands in for the SentencePiece tokenizer in the data benchmark (no trained vocabulary
    needed)."""
    sos_id, eos_id = 1, 2

    def encode(self, text):
        return [4 + len(w) for w in text.split()]


def bench_data():
    """Images/s that one DataLoader worker delivers to the training loop, as train.py runs it
    (decode, augment, tokenize, batch, hand over), from the second batch on; and the device's own
    decode and augmentation of batches of 32 whose JPEGs data_workers workers only read."""
    with tempfile.TemporaryDirectory() as folder:
        for (width, height), size in (((640, 480), 224), ((64, 64), 64)):
            root = os.path.join(folder, f'{width}x{height}')
            write_jpegs(root, data_images, width, height)
            for where, workers in (('workers', 1), ('device', data_workers)):
                dataset = CocoCaptions(root, 'train2017', WordTokenizer(), size, 30, train=True,
                                       seed=seed, decode_on_device=where == 'device')
                for i in range(data_images):
                    dataset[(0, i)]  # warm the file cache
                loader = torch.utils.data.DataLoader(
                    dataset, sampler=[(1, i) for i in range(data_images)], batch_size=32,
                    num_workers=workers, collate_fn=collate)
                batches = iter(loader)
                next(batches)  # the workers' start-up
                t0, count = time.perf_counter(), 0
                for images, tokens, _ in batches:
                    if where == 'device':
                        decode_and_augment(images, device)
                    count += len(tokens)
                sync()
                dt = (time.perf_counter() - t0) / count
                what = f"-> {size} px, 1 worker" if where == 'workers' else \
                    f"-> {size} px, decoded on {device}, {workers} workers reading"
                add_row('data pipeline', f'{width}x{height} JPEG', what, f"{1 / dt:.0f} img/s",
                        f"{1000 * dt:.2f} ms/img", peak_memory_gb(device))


def bench_caption(name):
    from caption import beam_search
    cfg, size, _ = model_config(name)
    torch.manual_seed(seed)
    model = VirTex(cfg).to(device, memory_format=torch.channels_last).eval()
    with torch.no_grad():
        # an untrained head ends captions at random lengths: forbid [EOS] and decode a fixed
        # caption_steps steps, a COCO caption's length, so that runs are comparable
        model.lm_head.bias[cfg.eos_id] = -1e4
    images, _ = random_batch(cfg, size, caption_images)
    with torch.no_grad():  # caption.py decodes in float32
        for _ in range(2):
            beam_search(model, model.project(model.encode_images(images)), max_steps=caption_steps)
        sync()
        reset_peak_memory(device)
        t0 = time.perf_counter()
        grid = model.encode_images(images)
        sync()
        t_backbone = time.perf_counter() - t0
        words = beam_search(model, model.project(grid), max_steps=caption_steps)
        sync()
        dt = time.perf_counter() - t0
    assert all(len(w) == caption_steps for w in words)
    add_row('caption (beam 5)', name, f"batch {caption_images}, {caption_steps} steps",
            f"{caption_images / dt:.2f} captions/s, backbone {100 * t_backbone / dt:.0f}%",
            f"{1000 * dt:.0f} ms/batch", peak_memory_gb(device))


def bench_svm():
    from svm import train_and_test_svms
    g = torch.Generator().manual_seed(seed)
    C, D = 20, 2048
    # VOC07-like stand-ins: nonnegative, L2-normalized, correlated features with a class signal
    def features(n):
        labels = torch.where(torch.rand(n, C, generator=g) < torch.linspace(0.03, 0.3, C), 1, -1)
        labels[torch.rand(n, C, generator=g) < 0.02] = 0
        signal = (labels == 1).float() @ torch.randn(C, D, generator=g)
        x = torch.relu(1.0 + 0.6 * signal + torch.randn(n, D, generator=g))
        return torch.nn.functional.normalize(x, dim=1).to(device), labels.to(device)
    train_x, train_y = features(svm_images)
    test_x, test_y = features(svm_images * 4952 // 5011)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    products = svm_products_dtype(device)  # as evaluate.py's default
    test_ap, _, _ = train_and_test_svms(train_x, train_y, test_x, test_y, cg_dtype=products)
    sync()
    dt = time.perf_counter() - t0
    add_row('svm (VOC07 size)', '320 SVMs',
            f"{svm_images} x 2048, 20 classes, CG in {str(products)[6:]}",
            f"mAP {100 * test_ap.mean():.1f}", f"{dt:.1f} s", peak_memory_gb(device))


def main():
    if rows_file and (os.path.isdir(rows_file) or
                      not os.path.isdir(os.path.dirname(os.path.abspath(rows_file)))):
        raise SystemExit(f"error: --rows_file={rows_file}: not a file in a folder that exists")
    dtype_list = dtypes.split(',')
    if dtypes == 'auto':  # bf16 where native, beside float32 on a CPU; else fp16 on a GPU
        dtype_list = ['bfloat16' if native_bf16(device) else 'float16'] if device_type() == 'cuda' \
            else ['float32', 'bfloat16'] if native_bf16(device) else ['float32']
    if device_type() == 'cuda':  # as train.py
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    chosen = stages.split(',')
    print(f"bench: {device} ({', '.join(dtype_list)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    for name in models.split(','):
        for dtype in dtype_list if 'train' in chosen else []:
            bench_train(name, dtype)
        if 'train_data' in chosen:
            bench_train_data(name, dtype_list[-1])
        if 'caption' in chosen:
            bench_caption(name)
    if 'data' in chosen:
        bench_data()
    if 'svm' in chosen:
        bench_svm()
    if 'torchrun' in chosen:
        bench_torchrun()

    if rows_file:  # each row was printed as it came
        return
    header = ('stage', 'what', 'setting', 'result', 'time', 'peak mem')
    table = [header] + [(*row[:5], f"{row[5]:.2f} GB" if row[5] else '') for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print()
    for r in table:
        print(' | '.join(cell.ljust(w) for cell, w in zip(r, widths)))


if __name__ == '__main__':
    configure(globals())
    main()

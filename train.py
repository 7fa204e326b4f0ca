"""
Pretrain VirTex: a ResNet plus forward and backward caption decoders, trained from scratch on COCO
captions (or with one of the paper's other pretext tasks, or CapPa's: --pretext, see model.py).

  CPU demo (minutes):  python train.py config/shapes.py
  one GPU:             python train.py config/virtex_r50_l1_h2048.py
  8 GPUs:              torchrun --standalone --nproc_per_node=8 train.py config/virtex_r50_l1_h2048.py
  resume:              python train.py config/shapes.py --init_from=resume   (auto: resume if there is a checkpoint)

Reads <data_root>/ (COCO layout: train2017/, val2017/, annotations/captions_{train,val}2017.json)
and <tokenizer> (a .model from tokenizer.py), and annotations/instances_{train,val}2017.json for the
multilabel pretext; writes <out_dir>/ckpt.pt, <out_dir>/log.jsonl and, with --voc_root,
<out_dir>/best.pt.
The defaults are the paper's best run (R-50, L1, H2048, batch 256, 500k iterations).

Long runs: a scratch run refuses an out_dir that holds a run (--overwrite=True replaces it), and a
second run into the same out_dir is refused while the first holds out_dir/.lock. SIGTERM, SIGINT
(Ctrl-C) and SIGUSR1 (Slurm's --signal) finish the current iteration, save the checkpoint and exit
with status 128 + the signal's number (143, 130, 138), as the signal itself would have, so
schedulers see an interrupted job; a second Ctrl-C stops at once. Every file is written whole or not
at all (a full disk leaves the previous checkpoint).
"""

import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Annotated, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from checkpoints import claim_run_folder, load_for_resume
from coco import BadImages, CocoCaptions, EpochKeys, collate, normalize, read_instances
from evaluate import extract_features, read_voc_task, svm_products_dtype, train_and_test_svms
from configurator import (FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Interval, JsonLog,
                          check_outputs, config_keys, configure, one_line_errors, write_atomically)
from lookahead import LookAhead, warmup_cosine
from model import LOSS_PARTS, PRETEXTS, VISUALS, VirTex, VirTexConfig, check_device, native_bf16
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# config: defaults = the paper's best run; then a config/*.py file, then --key=value flags
data_root = 'data/coco'       # COCO layout, see the header
tokenizer = 'data/coco/coco_10k.model'  # from tokenizer.py; the vocabulary size comes from it
out_dir = 'out'
overwrite = False             # True: a scratch run may replace the run already in out_dir
# model
visual: Literal[VISUALS] = 'resnet50'  # torchvision ResNet, random init
n_layer: POSITIVE = 1         # L
n_embd: POSITIVE = 2048       # H
n_head: POSITIVE = 32         # H / 64
max_len: Annotated[int, Interval('[3, inf)')] = 30  # caption ids, [SOS] and [EOS] included
dropout: Annotated[float, Interval('[0, 1)')] = 0.1
pretext: Literal[PRETEXTS] = 'bicaptioning'  # the paper; or another pretext of model.py
# cappa: share of captions predicted in parallel (default 0.75)
parallel_fraction: PROBABILITY = None
norm_first = False            # post-norm Transformer layers, as in the paper
zero_init_residual = True     # each ResNet block starts as the identity, as in the paper
# textual weights at init ~ N(0, init_std), as in the paper (BERT's init)
init_std: POSITIVE = 0.02
# data
image_size: POSITIVE = 224    # random-resized-crop size
min_crop_scale: FRACTION = 0.2  # random-resized-crop keeps (min_crop_scale, 1) of the image area
# probability of the colour jitter (brightness/contrast/saturation .4, hue .1)
color_jitter: PROBABILITY = 0.8
batch_size: POSITIVE = 256    # global; each of N processes gets batch_size // N (paper: 8 x 32)
# micro-batches per step per process, when a GPU can't hold its share
gradient_accumulation_steps: POSITIVE = 1
num_workers: NON_NEGATIVE = 4  # DataLoader workers per process
# unreadable images are skipped and counted; the run stops past this many
max_bad_images: NON_NEGATIVE = 100
# train on this share of the images, drawn with `seed` (data efficiency)
train_fraction: FRACTION = 1.0
# optimization
max_iters: POSITIVE = 500_000
warmup_iters: NON_NEGATIVE = 10_000  # linear warmup from 0, then cosine decay to 0 at max_iters
# inside LookAhead: sgd (the paper) or adamw (momentum = beta1)
optimizer: Literal['sgd', 'adamw'] = 'sgd'
cnn_lr: NON_NEGATIVE = 0.2    # lr of the backbone (upstream OPTIM.CNN_LR)
lr: NON_NEGATIVE = 0.001      # lr of the textual head (upstream OPTIM.LR)
momentum: NON_NEGATIVE = 0.9
weight_decay: NON_NEGATIVE = 1e-4  # not on the textual embedding/decoder norms and biases
lookahead_k: POSITIVE = 5     # slow weights sync every k steps ...
lookahead_alpha: FRACTION = 0.5  # ... moving alpha of the way to the fast weights (1: no LookAhead)
grad_clip: NON_NEGATIVE = 10.0  # max global grad norm; 0 turns clipping off
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# auto: bfloat16 where the hardware has it
dtype: Literal['auto', 'float32', 'bfloat16', 'float16'] = 'auto'
compile = torch.cuda.is_available()  # torch.compile: worth it on GPUs, not for short CPU runs
seed = 0
# True: deterministic kernels, no TF32, no cudnn autotuning (bitwise resume on GPUs too)
deterministic = False
# resume from <out_dir>/ckpt.pt; auto: if it exists
init_from: Literal['scratch', 'resume', 'auto'] = 'scratch'
eval_interval: NON_NEGATIVE = 2000  # validation loss every this many iterations (0: never)
eval_iters: NON_NEGATIVE = 20  # validation batches per evaluation
# a VOC2007 folder: judge the backbone by its VOC mAP, keep the best in best.pt
voc_root = ''
voc_interval: NON_NEGATIVE = 0  # with voc_root: every this many iterations (0: only at the end)
ckpt_interval: POSITIVE = 2000  # checkpoint every this many iterations (and at the end)
log_interval: POSITIVE = 20
peak_tflops: POSITIVE = 989.0  # per-GPU peak for MFU (bf16 dense: H100/H200 989, A100 312)
# ----------------------------------------------------------------------------------------------
configurable = config_keys(globals())
rest = configure(globals())
if rest:
    raise SystemExit(f"error: unexpected arguments {rest} (config files end in .py, flags are "
                     "--key=value)")
if parallel_fraction is not None and pretext != 'cappa':
    raise SystemExit(f"error: --parallel_fraction is for --pretext=cappa only, not {pretext}")
if eval_interval and not eval_iters:
    raise SystemExit("error: --eval_iters=0 with --eval_interval > 0: give eval_iters > 0 or "
                     "eval_interval=0")
if voc_interval and not voc_root:
    raise SystemExit("error: --voc_interval needs --voc_root (a VOC2007 folder)")
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise SystemExit(f"error: --out_dir={out_dir} is a file, not a folder")
with one_line_errors():
    check_device(device)
    # n_embd % n_head, before any work
    VirTexConfig(visual=visual, n_embd=n_embd, n_head=n_head, max_len=max_len)
config = {k: globals()[k] for k in configurable}  # resolved; saved in every checkpoint
config['tokenizer'] = os.path.abspath(tokenizer)  # so caption.py finds it from any folder

# distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = 'RANK' in os.environ
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    ddp_rank, ddp_local_rank, ddp_world_size = (dist.get_rank(), int(os.environ['LOCAL_RANK']),
                                                dist.get_world_size())
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
else:
    ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
master_process = ddp_rank == 0
if batch_size % (ddp_world_size * gradient_accumulation_steps):
    raise SystemExit(f"error: batch_size={batch_size} is not divisible by {ddp_world_size} "
                     f"processes x {gradient_accumulation_steps} accumulation steps")
micro_batch = batch_size // (ddp_world_size * gradient_accumulation_steps)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
# bf16 where the hardware multiplies it natively; else fp16 on GPUs, fp32 on CPUs
if dtype == 'auto':
    dtype = 'bfloat16' if native_bf16(device) else 'float16' if device_type == 'cuda' else 'float32'
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type,
                                                                   dtype=getattr(torch, dtype))
# fast by default; a resumed GPU run then matches an unbroken one closely, not bitwise
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.benchmark = not deterministic
if deterministic:
    # cuBLAS needs it for deterministic GEMMs
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True)


def print0(*args):
    if master_process:
        print(*args, flush=True)


if device_type == 'cpu' and (dtype == 'float16' or dtype == 'bfloat16' and not native_bf16(device)):
    print0(f"warning: --dtype={dtype} is emulated on this CPU, slower than float32 (float16 ~25x "
           f"on the development machine); use float32, or bfloat16 where the CPU has it")

# ----------------------------------------------------------------------------------------------
# the out_dir: one run at a time, and never a run replaced by mistake
ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
log_path, lock_path = os.path.join(out_dir, 'log.jsonl'), os.path.join(out_dir, '.lock')
auto_start = init_from == 'auto'
if auto_start:
    init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'


# ----------------------------------------------------------------------------------------------
# data: COCO captions (coco.py: the dataset, its augmentation and the eval transform)

for path, what in ((data_root, 'data_root'), (tokenizer, 'tokenizer')):
    if not os.path.exists(path):
        raise SystemExit(f"error: {what}={path}: no such file or folder")
with one_line_errors():
    check_outputs({'out_dir': [ckpt_path, best_path, log_path]}, {'--tokenizer': tokenizer})
    if voc_root:  # now, not when the backbone is first judged, maybe at the end of the run
        read_voc_task(voc_root)
    tok = Tokenizer(tokenizer)
    # multilabel_classification: its targets are COCO categories, not words
    labels, n_classes = {}, len(tok)
    if pretext == 'multilabel_classification':
        for split in ('train2017', 'val2017') if eval_interval else ('train2017',):
            # annotations/instances_<split>.json
            names, labels[split] = read_instances(data_root, split)
        n_classes = len(names) + 1  # index 0 is background / padding
    train_set = CocoCaptions(data_root, 'train2017', tok, image_size, max_len, train=True,
                             seed=seed, min_crop_scale=min_crop_scale, color_jitter=color_jitter,
                             labels=labels.get('train2017'))
    val_set = CocoCaptions(data_root, 'val2017', tok, image_size, max_len, train=False, seed=seed,
                           labels=labels.get('val2017')) if eval_interval else None
subset = f" ({train_fraction:g} of {len(train_set)})" if train_fraction < 1 else ''
# indices kept (None: all), saved in checkpoints
train_subset = train_set.keep_fraction(train_fraction, seed)
# the sampler shuffles with (seed, epoch); each process takes every N-th index of the permutation
sampler = DistributedSampler(train_set, ddp_world_size, ddp_rank, shuffle=True, seed=seed,
                             drop_last=True)
batches_per_epoch = len(sampler) // micro_batch
if batches_per_epoch == 0:
    raise SystemExit(f"error: {len(train_set)} training images{subset} are fewer than one batch of "
                     f"{micro_batch} per process")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C (sent to the terminal's whole process group) and SIGUSR1 to
    the main process, which stops them after saving. SIGTERM keeps its default: it is how the
    workers are shut down."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


# one loader per split for the run, its workers kept between epochs; a private generator: iterating
# a loader must not draw from the global RNG (dropout uses it). The images' randomness comes from
# their (seed, epoch, index) keys. With compile, captions are padded to max_len: one shape, one
# compiled graph.
loader_args = dict(batch_size=micro_batch, num_workers=num_workers, drop_last=True,
                   collate_fn=partial(collate, pad_to=max_len if compile else 0),
                   pin_memory=device_type == 'cuda', persistent_workers=num_workers > 0,
                   worker_init_fn=ignore_stop_signals,
                   generator=torch.Generator().manual_seed(seed))
train_keys = EpochKeys()
train_loader = DataLoader(train_set, sampler=train_keys, **loader_args)
if val_set is not None:
    val_keys = [(0, i)
                for i in DistributedSampler(val_set, ddp_world_size, ddp_rank, shuffle=False)]
    val_loader = DataLoader(val_set, sampler=val_keys[:eval_iters * micro_batch],
                            **{**loader_args, 'drop_last': False})


def batch_stream(epoch, batch):
    """Yield ((epoch, batches done in it), (images, tokens, errors)) forever, from a given
    position."""
    while True:
        sampler.set_epoch(epoch)
        train_keys.keys = [(epoch, i) for i in list(sampler)[batch * micro_batch:]]
        for batch, data in enumerate(train_loader, start=batch + 1):
            yield (epoch, batch), data
        epoch, batch = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# model and optimizer, from scratch or from the checkpoint
PART_NAMES = LOSS_PARTS[pretext]  # the terms of the loss, logged beside it
model_args = dict(visual=visual, vocab_size=n_classes, n_layer=n_layer, n_embd=n_embd,
                  n_head=n_head, max_len=max_len, dropout=dropout, pretext=pretext,
                  norm_first=norm_first, zero_init_residual=zero_init_residual, init_std=init_std,
                  pad_id=tok.pad_id, sos_id=tok.sos_id, eos_id=tok.eos_id, mask_id=tok.mask_id)
if parallel_fraction is not None:
    model_args['parallel_fraction'] = parallel_fraction
ckpt = None
torch.manual_seed(seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
if init_from == 'resume':
    with one_line_errors():  # refused if the file cannot continue this run
        model, ckpt = load_for_resume(ckpt_path, model_args, tokenizer, tok.pieces_hash(),
                                      train_subset, optimizer, max_iters, seed)
else:
    model = VirTex(VirTexConfig(**model_args))
# channels_last: cuDNN and oneDNN convolutions both run faster on NHWC (4x on a 2-core CPU for R-18
# at 64 px)
model = model.to(device, memory_format=torch.channels_last)
raw_model = model  # the plain module: its state_dict is what checkpoints hold
flops_per_image = raw_model.flops_per_image(image_size) if device_type == 'cuda' else None
torch.manual_seed(seed + ddp_rank)  # a different dropout stream per process

groups = model.param_groups(weight_decay, cnn_lr, lr)
for group in groups:
    group['base_lr'] = group['lr']  # the schedule gives a multiplier: we have two base lrs
# fused: one kernel for the whole update, on GPUs and CPUs (on a 2-core CPU half the time of
# foreach's)
if optimizer == 'sgd':
    inner = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
else:  # each group keeps its weight decay (0 on norms and biases), applied decoupled as AdamW does
    inner = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=True)
lookahead = LookAhead(inner, lookahead_k, lookahead_alpha)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
iter_num, data_position, bad_images, best_voc = (0, (0, 0), BadImages(max_bad_images),
                                                 {'map': -1.0, 'iter': 0})
if ckpt is not None:
    settings = [{k: v for k, v in group.items() if k != 'params'}
                for group in lookahead.param_groups]
    try:
        lookahead.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: {ckpt_path}: its optimizer state does not fit this run "
                         f"({type(e).__name__}: {e})") from None
    for group, setting in zip(lookahead.param_groups, settings):
        # lrs, momentum and weight decay come from this run's config, not the file
        group.update(setting)
    scaler.load_state_dict(ckpt['scaler'])
    iter_num, data_position, best_voc = (ckpt['iter_num'], tuple(ckpt['data_position']),
                                         ckpt['best_voc'])
    bad_images.count = ckpt['bad_images']
    if ckpt['world_size'] == ddp_world_size:
        torch.set_rng_state(ckpt['rng_state'][ddp_rank])
        if device_type == 'cuda':
            torch.cuda.set_rng_state(ckpt['cuda_rng_state'][ddp_rank])
    else:
        # the same images per iteration, split over other processes: close to, not bitwise, an
        # unbroken run
        epoch, batch = data_position
        data_position = (epoch, batch * ckpt['world_size'] // ddp_world_size)
        print0(f"note: {ckpt_path} was written by {ckpt['world_size']} process(es), this run has "
               f"{ddp_world_size}: the global batch stays {batch_size}, each process now takes "
               f"{micro_batch} x {gradient_accumulation_steps}, and the data order and dropout "
               "differ from an unbroken run")
    print0(f"resuming from {ckpt_path} at iteration {iter_num}")
    del ckpt
if compile:
    print0("compiling the model (the first iterations are slow)...")
    model = torch.compile(model)
if ddp:
    # BatchNorm stats stay per GPU (micro_batch images each); upstream never converts to
    # SyncBatchNorm
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)

params = raw_model.num_params()
head = f"L{n_layer} H{n_embd} decoder(s)" if raw_model.config.has_decoder else 'linear classifier'
print0(f"model: {pretext}, {visual} + {head}, {params['visual'] / 1e6:.1f}M backbone + "
       f"{params['textual'] / 1e6:.1f}M head parameters; {n_classes} "
       f"{'classes' if pretext == 'multilabel_classification' else 'pieces'}")
print0(f"data: {len(train_set):,} training images{subset}, {batches_per_epoch} steps per epoch; "
       f"{ddp_world_size} process(es) x {gradient_accumulation_steps} micro-batches x "
       f"{micro_batch} = {batch_size} images per iteration; "
       f"{max_iters * batch_size / len(train_set):.1f} epochs in all; {device} {dtype}")


def to_device(images, tokens):
    """uint8 images leave the workers (4x less to copy) and are normalized on the device."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return normalize(images), tokens.to(device, non_blocking=True)


def draws(step, micro_step):
    """cappa's per-caption choice of mode: a generator seeded by (seed, rank, step, micro-step), so
    that a resumed run draws what an unbroken one would, without touching the global RNG
    (dropout's)."""
    key = np.random.SeedSequence([seed, ddp_rank, step, micro_step]).generate_state(1)[0]
    return torch.Generator(device).manual_seed(int(key))


@torch.no_grad()
def estimate_val_loss():
    """Validation losses, and the same captions scored against other images (each batch's images
    rolled by one): the gap says how much the model reads from the image, the first number to watch
    in pretraining.
    Returns ({'loss': .., and each part}, the same with shuffled images, and for cappa the loss of
    the best image-blind parallel predictor: each position's word frequencies in these captions)."""
    raw_model.eval()
    # (true, shuffled) x (loss, parts)
    totals, batches = torch.zeros(2, 1 + len(PART_NAMES), device=device), 0
    # cappa: (position, word) counts
    position_counts = torch.zeros(max_len, len(tok), device=device)
    for batch, (images, tokens, errors) in enumerate(val_loader):
        with one_line_errors():
            bad_images.add(errors)
        if images is None:
            continue
        images, tokens = to_device(images, tokens)
        with autocast:
            features = raw_model.visual_features(images)  # (B, N, H) or pooled (B, C)
            # then every caption with another image
            for row, paired in enumerate((features, features.roll(1, 0))):
                # masked_lm hides the same words in both passes, and never draws from the training
                # RNG
                generator = torch.Generator(device).manual_seed(seed + batch)
                loss, parts = raw_model.losses(paired, tokens, generator)
                totals[row] += torch.stack([loss, *parts.values()]).float()
        if pretext == 'cappa':
            targets = tokens[:, 1:]
            positions = torch.arange(targets.shape[1], device=device).expand_as(targets)
            real = targets != tok.pad_id
            position_counts.index_put_((positions[real], targets[real]),
                                       torch.ones((), device=device), accumulate=True)
        batches += 1
    counts = torch.cat([totals.flatten(),
                        torch.tensor([batches], device=device, dtype=totals.dtype)])
    if ddp:
        dist.all_reduce(counts)
        dist.all_reduce(position_counts)
    totals, batches = counts[:-1].view(2, -1), counts[-1].item()
    raw_model.train()
    if batches == 0:  # every process knows: the counts were summed
        raise ValueError(f"no image of {data_root}/val2017 could be read for validation (see the "
                         "warnings)")
    true, shuffled = (totals / batches).tolist()
    frequencies = position_counts / position_counts.sum(1, keepdim=True).clamp(min=1)
    text_only = (-(position_counts * frequencies.clamp(min=1e-12).log()).sum()
                 / position_counts.sum().clamp(min=1))
    names = ('loss', *PART_NAMES)
    return dict(zip(names, true)), dict(zip(names, shuffled)), text_only.item()


def voc_map():
    """The backbone's VOC07 mAP, as evaluate.py computes it: pooled features of trainval and test
    with the eval transform (each process extracts its share), then the SVMs on rank 0. Returns
    (mAP, {class: AP}) on rank 0."""
    raw_model.eval()
    splits, task = {}, read_voc_task(voc_root)
    for split in ('trainval', 'test'):
        paths, split_labels = task[split]
        try:
            mine = extract_features(lambda x: raw_model.encode_images(x).mean((2, 3)),
                                    paths[ddp_rank::ddp_world_size], image_size, split,
                                    batch_size=micro_batch, num_workers=num_workers,
                                    device=device, log_interval=0)
        except (ValueError, OSError) as e:  # an image gone bad since start-up: told to all
            mine = str(e)
        shares = [mine]
        if ddp:
            shares = [None] * ddp_world_size
            dist.all_gather_object(shares, mine)
        failures = [share for share in shares if isinstance(share, str)]
        if failures:
            raw_model.train()
            raise ValueError(failures[0])
        # the shares back in order: image i is in share i % world_size
        features = torch.empty(len(paths), shares[0].shape[1])
        for rank, share in enumerate(shares):
            features[rank::ddp_world_size] = share
        splits[split] = (features.to(device), torch.from_numpy(split_labels).to(device))
    raw_model.train()
    if not master_process:
        return None, None
    test_ap, _, _ = train_and_test_svms(*splits['trainval'], *splits['test'],
                                        cg_dtype=svm_products_dtype(device))
    return 100 * test_ap.mean().item(), {name: 100 * ap
                                         for name, ap in zip(task['classes'], test_ap.tolist())}


def memory_gb():
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**30
    # peak RSS (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save_checkpoint(path, step, full=True):
    """The run at `step`, written whole or not at all: the model, and with full=True all the state a
    resume needs (optimizer, data position, every process's RNG). Rank 0 writes; every process must
    call it."""
    rng_states = [torch.get_rng_state()]
    cuda_rng_states = [torch.cuda.get_rng_state()] if device_type == 'cuda' else []
    if ddp and full:  # every process's RNG state, so each one resumes its own dropout stream
        rng_states, cuda_rng_states = [None] * ddp_world_size, [None] * ddp_world_size
        dist.all_gather_object(rng_states, torch.get_rng_state())
        if device_type == 'cuda':
            dist.all_gather_object(cuda_rng_states, torch.cuda.get_rng_state())
    if not master_process:
        return
    checkpoint = {'model': raw_model.state_dict(), 'model_args': model_args, 'config': config,
                  'iter_num': step, 'tokenizer_pieces': tok.pieces_hash(), 'best_voc': best_voc}
    if full:
        checkpoint.update(optimizer=lookahead.state_dict(), scaler=scaler.state_dict(),
                          world_size=ddp_world_size, data_position=list(data_position),
                          bad_images=bad_images.count, rng_state=rng_states,
                          cuda_rng_state=cuda_rng_states, train_subset=train_subset)
    try:
        write_atomically(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:
        raise SystemExit(f"error: {e}; the previous file stays as it was") from None
    print0(f"iter {step}: saved {path}")
    log({'event': 'checkpoint', 'iter': step, 'path': path})


# ----------------------------------------------------------------------------------------------
# every input is checked: now the run folder is claimed (and with --overwrite=True, emptied), and
# the log opened: one JSON record per line, never left cut (configurator.JsonLog)
if master_process:
    try:
        note = claim_run_folder(out_dir, scratch=init_from == 'scratch', overwrite=overwrite,
                                auto=auto_start)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if note:  # a stale lock taken over
        print0(f"note: {note}")
log_file = JsonLog(log_path) if master_process else None


def log(record):
    if master_process:
        try:
            log_file.append(record)
        except OSError as e:
            raise SystemExit(f"error: {e}; {ckpt_path} holds the last checkpoint") from None


stop_signal = 0


def request_stop(signum, frame):
    """The first stop signal asks the loop to save after this iteration; a second Ctrl-C stops at
    once (even in the middle of a save, which only ever writes a temporary file until it is
    whole)."""
    global stop_signal
    if stop_signal and signum == signal.SIGINT:
        kept = f"{ckpt_path} holds the last checkpoint" if os.path.exists(ckpt_path) else \
            "no checkpoint was written"
        print(f"\nerror: interrupted again: stopped at once; {kept}", file=sys.stderr, flush=True)
        if master_process:  # what atexit and write_atomically would have removed
            for name in os.listdir(out_dir):
                if name == '.lock' or name.endswith(f'.tmp{os.getpid()}'):
                    os.remove(os.path.join(out_dir, name))
        os._exit(1)  # not an exception: raised inside torch.save it would become a traceback
    stop_signal = stop_signal or signum
    print0(f"\n{signal.Signals(signum).name}: stopping after this iteration, saving {ckpt_path}")


for signum in STOP_SIGNALS:
    signal.signal(signum, request_stop)


def agreed_stop(it):
    """The signal to stop on at iteration `it`, the same on every process: under DDP they compare
    notes every log_interval iterations, with one tiny all-reduce where the loop waits for the
    device anyway."""
    if not ddp:
        return stop_signal
    if it % log_interval:
        return 0
    flag = torch.tensor(stop_signal, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item()


def due(interval, it):
    """True at every `interval`-th iteration of this run (0: none) and at the end."""
    return it > start_iter and (it == max_iters or (interval > 0 and it % interval == 0))

# ----------------------------------------------------------------------------------------------
# the loop
stream = batch_stream(*data_position)
start_iter = iter_num
log({'event': 'resume' if start_iter else 'start', 'iter': start_iter,
     'world_size': ddp_world_size})
# checked at log and checkpoint time only
nonfinite = torch.zeros((), dtype=torch.bool, device=device)
window_time, window_steps, run_time, run_steps = 0.0, 0, 0.0, 0
run_start = time.time()
for iter_num in range(start_iter, max_iters + 1):
    stopping = agreed_stop(iter_num)
    last_step = iter_num == max_iters or stopping
    # evaluation and checkpointing first, on their schedule; their time is not part of ms/iter. An
    # evaluation that fails (its images gone bad) never costs the training state: saved, then stop
    failed = ''
    if val_set is not None and not stopping and due(eval_interval, iter_num):
        try:
            val, shuffled, text_only = estimate_val_loss()
        except ValueError as e:
            failed = f"validation failed: {e}"
        else:
            # what the image is worth, per term
            gaps = {name: shuffled[name] - val[name] for name in PART_NAMES}
            image_gap = sum(gaps.values()) / len(gaps)  # per target of one term (one direction)
            terms = ' '.join(f"{name} {val[name]:.3f}" for name in PART_NAMES)
            unit = 'label' if pretext.endswith('classification') else 'token'
            worth = f"{image_gap:.3f} nats/{unit}"
            if pretext == 'cappa':
                worth = (f"{gaps['parallel']:.3f} nats/token in parallel (text-only "
                         f"{text_only:.3f}), {gaps['autoregressive']:.3f} autoregressive")
            print0(f"iter {iter_num}: val loss {val['loss']:.4f} ({terms}) | shuffled images "
                   f"{shuffled['loss']:.4f}: the image is worth {worth}")
            log({'event': 'val', 'iter': iter_num, 'loss': val['loss'],
                 **{f'loss_{n}': val[n] for n in PART_NAMES}, 'loss_shuffled': shuffled['loss'],
                 **{f'loss_shuffled_{n}': shuffled[n] for n in PART_NAMES}, 'image_gap': image_gap,
                 **({'text_only_parallel': text_only} if pretext == 'cappa' else {})})
    if voc_root and not stopping and due(voc_interval, iter_num) and not failed:
        t0 = time.time()
        try:
            voc, class_aps = voc_map()
        except ValueError as e:
            failed = f"the VOC evaluation failed: {e}"
        else:
            if master_process:
                if voc > best_voc['map']:
                    best_voc = {'map': voc, 'iter': iter_num}
                    save_checkpoint(best_path, iter_num, full=False)
                print0(f"iter {iter_num}: VOC mAP {voc:.2f} (best {best_voc['map']:.2f} at iter "
                       f"{best_voc['iter']}; {time.time() - t0:.0f}s)")
                log({'event': 'voc', 'iter': iter_num, 'map': voc, 'classes': class_aps,
                     'best_map': best_voc['map'], 'best_iter': best_voc['iter'],
                     'seconds': time.time() - t0})
    if due(ckpt_interval, iter_num) or (stopping and iter_num > start_iter) or failed:
        # never replace a good checkpoint with a diverged model: check the losses and the weights
        weight_norm = torch.stack([p.detach().float().norm() for p in raw_model.parameters()]).sum()
        bad = nonfinite | ~torch.isfinite(weight_norm)
        if ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            kept = f"{ckpt_path} still holds the last good checkpoint" \
                if os.path.exists(ckpt_path) else "no checkpoint was written"
            raise SystemExit("error: the loss or the weights became non-finite before iteration "
                             f"{iter_num}; {kept}")
        save_checkpoint(ckpt_path, iter_num)
    if failed:
        raise SystemExit(f"error: iteration {iter_num}: {failed}; {ckpt_path} holds this "
                         "iteration: mend the data and continue with --init_from=resume")
    if last_step:
        break

    # ------------------------------------------------------------------------------------------
    # training step
    t0 = time.perf_counter()
    lr_mult = warmup_cosine(iter_num, warmup_iters, max_iters)
    for group in lookahead.param_groups:
        group['lr'] = group['base_lr'] * lr_mult
    loss_sum = torch.zeros(1 + len(PART_NAMES), device=device)  # loss, its terms
    for micro_step in range(gradient_accumulation_steps):
        data_position, (images, tokens, errors) = next(stream)
        with one_line_errors():
            bad_images.add(errors)
        if images is None:
            raise SystemExit(f"error: every image of a batch failed to load; last: {errors[-1]}")
        # all-reduce the gradients only on the last micro-step (set before the forward pass)
        if ddp:
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        generator = draws(iter_num, micro_step) if pretext == 'cappa' else None
        with autocast:
            loss, parts = model(*to_device(images, tokens), generator)
        scaler.scale(loss / gradient_accumulation_steps).backward()
        loss_sum += torch.stack([loss.detach(), *parts.values()]).float()
    nonfinite |= ~torch.isfinite(loss_sum[0])
    scaler.unscale_(lookahead)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                               grad_clip if grad_clip > 0 else float('inf'))
    scaler.step(lookahead)
    scaler.update()
    lookahead.zero_grad(set_to_none=True)
    step = iter_num + 1
    if step % log_interval and step != max_iters:  # not a log step: count its time and go on
        window_time, window_steps = window_time + time.perf_counter() - t0, window_steps + 1
        continue

    # ------------------------------------------------------------------------------------------
    # logging, every log_interval steps: the losses of this step, the time of the steps since the
    # last log
    losses = loss_sum / gradient_accumulation_steps
    if ddp:  # a cappa mode that drew no caption on some process is NaN in the mean: shown as '-'
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        dist.all_reduce(losses, op=dist.ReduceOp.AVG)
    # .tolist() waits for the device: the window's time is honest
    loss_value, *terms = losses.tolist()
    if nonfinite.item():
        kept = f"the last good checkpoint stays at {ckpt_path}" if os.path.exists(ckpt_path) else \
            "no checkpoint was written"
        raise SystemExit(f"error: non-finite loss ({loss_value}) by iteration {step}; {kept}")
    window_time, window_steps = window_time + time.perf_counter() - t0, window_steps + 1
    ms = 1000 * window_time / window_steps
    # the first window holds warm-up and compilation: not in the mean
    if step - start_iter > log_interval:
        run_time, run_steps = run_time + window_time, run_steps + window_steps
    window_time, window_steps = 0.0, 0
    images_per_s = batch_size * 1000 / ms
    mfu = '-'
    if flops_per_image and run_steps:
        mfu = f"{100 * flops_per_image * images_per_s / (peak_tflops * 1e12 * ddp_world_size):.1f}%"
    eta_s = (run_time / run_steps if run_steps else ms / 1000) * (max_iters - step)
    # NaN: no caption of a mode
    cut = {n: None if math.isnan(v) else v for n, v in zip(PART_NAMES, terms)}
    terms_text = ' '.join(f"{n} {'-' if v is None else f'{v:.3f}'}" for n, v in cut.items())
    print0(f"iter {step}/{max_iters} | loss {loss_value:.3f} ({terms_text}) | lr cnn "
           f"{cnn_lr * lr_mult:.2e} head {lr * lr_mult:.2e} | gnorm {grad_norm.item():.2f} | "
           f"{ms:.0f}ms | {images_per_s:.0f} img/s | mfu {mfu} | mem {memory_gb():.1f}G | eta "
           f"{int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m")
    log({'event': 'train', 'iter': step, 'loss': loss_value,
         **{f'loss_{n}': v for n, v in cut.items()}, 'lr_cnn': cnn_lr * lr_mult,
         'lr_head': lr * lr_mult, 'grad_norm': grad_norm.item(), 'ms': ms, 'img_s': images_per_s,
         'mem_gb': memory_gb(), 'time': time.time() - run_start})

steps = iter_num - start_iter
if steps and master_process:
    mean_ms = 1000 * run_time / run_steps if run_steps else 1000 * (time.time() - run_start) / steps
    print0(f"done: {steps} iterations in {time.time() - run_start:.0f}s; {mean_ms:.0f} ms/iter and "
           f"{batch_size * 1000 / mean_ms:.1f} img/s after the first {log_interval}; peak memory "
           f"{memory_gb():.2f}G; {bad_images.count} images skipped")
if ddp:
    # rank 0 may still be writing the last checkpoint: a rank that leaves early aborts the others
    dist.barrier()
    dist.destroy_process_group()
if stopping:
    saved = f"{ckpt_path} holds iteration {iter_num}: continue with --init_from=resume" \
        if iter_num > start_iter or start_iter else "nothing was trained yet"
    print0(f"stopped by {signal.Signals(stopping).name} at iteration {iter_num}; {saved}")
    raise SystemExit(128 + stopping)

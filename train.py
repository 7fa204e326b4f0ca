"""
Pretrain VirTex: a ResNet plus forward and backward caption decoders, trained from scratch on COCO captions
(or with one of the paper's other pretext tasks: --pretext, see model.py).

  CPU demo (minutes):  python train.py config/shapes.py
  one GPU:             python train.py config/virtex_r50_l1_h2048.py
  8 GPUs:              torchrun --standalone --nproc_per_node=8 train.py config/virtex_r50_l1_h2048.py
  several machines:    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
  resume:              python train.py config/shapes.py --init_from=resume

Reads <data_root>/ (COCO layout: train2017/, val2017/, annotations/captions_{train,val}2017.json) and
<tokenizer> (a .model from tokenizer.py), and annotations/instances_{train,val}2017.json for the multilabel
pretext; writes <out_dir>/ckpt.pt and <out_dir>/log.jsonl.
The defaults are the paper's best run (R-50, L1, H2048, batch 256, 500k iterations).
"""

import json
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from coco import CocoCaptions, EpochKeys, collate, normalize, read_instances
from configurator import config_keys, configure, one_line_errors
from checkpoints import load_checkpoint
from lookahead import LookAhead
from model import LOSS_PARTS, PRETEXTS, VirTex, VirTexConfig
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# config: defaults = the paper's best run; then a config/*.py file, then --key=value flags
data_root = 'data/coco'       # COCO layout, see the header
tokenizer = 'data/coco/coco_10k.model'  # from tokenizer.py; the vocabulary size comes from it
out_dir = 'out'
# model
visual = 'resnet50'           # torchvision ResNet, random init
n_layer = 1                   # L
n_embd = 2048                 # H
n_head = 32                   # H / 64
max_len = 30                  # caption ids, [SOS] and [EOS] included
dropout = 0.1
pretext = 'bicaptioning'      # the paper; or captioning, masked_lm, token_classification, multilabel_classification
norm_first = False            # post-norm Transformer layers, as in the paper
zero_init_residual = True     # each ResNet block starts as the identity, as in the paper
init_std = 0.02               # textual weights at init ~ N(0, init_std), as in the paper (BERT's init)
# data
image_size = 224              # random-resized-crop size
min_crop_scale = 0.2          # random-resized-crop keeps (min_crop_scale, 1) of the image area
color_jitter = 0.8            # probability of the colour jitter (brightness/contrast/saturation 0.4, hue 0.1)
batch_size = 256              # global; each of N processes gets batch_size // N (paper: 8 x 32)
gradient_accumulation_steps = 1  # micro-batches per step per process, when a GPU can't hold its share
num_workers = 4               # DataLoader workers per process
max_bad_images = 100          # unreadable images are skipped and counted; the run stops past this many
train_fraction = 1.0          # train on this share of the images, a subset drawn with `seed` (data-efficiency runs)
# optimization
max_iters = 500_000
warmup_iters = 10_000         # linear warmup from 0, then cosine decay to 0 at max_iters
optimizer = 'sgd'             # inside LookAhead: 'sgd' (the paper) or 'adamw' (faster for short runs; momentum = beta1)
cnn_lr = 0.2                  # lr for the backbone (upstream OPTIM.CNN_LR)
lr = 0.001                    # lr for the textual head (upstream OPTIM.LR)
momentum = 0.9
weight_decay = 1e-4           # not on the textual embedding/decoder norms and biases
lookahead_k = 5               # slow weights sync every k steps ...
lookahead_alpha = 0.5         # ... moving alpha of the way to the fast weights
grad_clip = 10.0              # max global grad norm; 0 turns clipping off
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'auto'                # auto: bfloat16 on GPUs that have it, else float16 (+GradScaler); float32 on CPU
compile = torch.cuda.is_available()  # torch.compile: worth it on GPUs, slower than eager for short CPU runs
seed = 0
deterministic = False         # True: deterministic kernels, no TF32, no cudnn autotuning (bitwise resume on GPUs too)
init_from = 'scratch'         # 'scratch' or 'resume' (from <out_dir>/ckpt.pt)
eval_interval = 2000          # validation loss every this many iterations (0: never)
eval_iters = 20               # validation batches per evaluation
ckpt_interval = 2000          # checkpoint every this many iterations (and at the end)
log_interval = 20
peak_tflops = 989.0           # per-GPU peak for MFU (bf16 dense: H100/H200 989, A100 312)
# ----------------------------------------------------------------------------------------------
configurable = config_keys(globals())
rest = configure(globals())
if rest:
    raise SystemExit(f"error: unexpected arguments {rest} (config files end in .py, flags are --key=value)")
config = {k: globals()[k] for k in configurable}  # resolved; saved in every checkpoint
config['tokenizer'] = os.path.abspath(tokenizer)  # so caption.py finds it from any folder
choices = {'init_from': ('scratch', 'resume'), 'dtype': ('auto', 'float32', 'bfloat16', 'float16'),
           'optimizer': ('sgd', 'adamw'), 'pretext': PRETEXTS}
for key, allowed in choices.items():
    if config[key] not in allowed:
        raise SystemExit(f"error: --{key}={config[key]!r}: choose one of {', '.join(allowed)}")
# every count and interval, checked here rather than as a ZeroDivisionError deep in the loop
for key in ('batch_size', 'max_iters', 'image_size', 'log_interval', 'ckpt_interval', 'gradient_accumulation_steps',
            'lookahead_k', 'n_layer', 'n_embd', 'n_head', 'max_len'):
    if config[key] <= 0:
        raise SystemExit(f"error: --{key}={config[key]} must be positive")
for key in ('eval_interval', 'eval_iters', 'warmup_iters', 'num_workers', 'max_bad_images', 'cnn_lr', 'lr',
            'weight_decay', 'grad_clip', 'momentum'):
    if config[key] < 0:
        raise SystemExit(f"error: --{key}={config[key]} must be >= 0" + (' (0: never)' if key == 'eval_interval' else ''))
if eval_interval and not eval_iters:
    raise SystemExit("error: --eval_iters=0 with --eval_interval > 0: give eval_iters > 0 or eval_interval=0")
if not 0 < train_fraction <= 1:
    raise SystemExit(f"error: --train_fraction={train_fraction} must be in (0, 1]")
if not (0 < min_crop_scale <= 1 and 0 <= color_jitter <= 1 and 0 < lookahead_alpha <= 1 and 0 <= dropout < 1):
    raise SystemExit(f"error: need 0 < min_crop_scale <= 1, 0 <= color_jitter <= 1, 0 < lookahead_alpha <= 1, "
                     f"0 <= dropout < 1 (got {min_crop_scale}, {color_jitter}, {lookahead_alpha}, {dropout})")

# distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = 'RANK' in os.environ
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    ddp_rank, ddp_local_rank, ddp_world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
else:
    ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
master_process = ddp_rank == 0
if batch_size % (ddp_world_size * gradient_accumulation_steps):
    raise SystemExit(f"error: batch_size={batch_size} is not divisible by {ddp_world_size} processes "
                     f"x {gradient_accumulation_steps} accumulation steps")
micro_batch = batch_size // (ddp_world_size * gradient_accumulation_steps)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
if dtype == 'auto':
    dtype = 'float32' if device_type == 'cpu' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
autocast = nullcontext() if dtype == 'float32' else torch.autocast(device_type, dtype=getattr(torch, dtype))
if device_type == 'cuda':  # fast by default; a resumed GPU run then matches an unbroken one closely, not bitwise
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.benchmark = not deterministic
if deterministic:
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS needs it for deterministic GEMMs
    torch.use_deterministic_algorithms(True)


def print0(*args):
    if master_process:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# data: COCO captions (coco.py: the dataset, its augmentation and the eval transform)

for path, what in ((data_root, 'data_root'), (tokenizer, 'tokenizer')):
    if not os.path.exists(path):
        raise SystemExit(f"error: {what}={path}: no such file or folder")
with one_line_errors():
    tok = Tokenizer(tokenizer)
    labels, n_classes = {}, len(tok)  # multilabel_classification: its targets are COCO categories, not words
    if pretext == 'multilabel_classification':
        for split in ('train2017', 'val2017') if eval_interval else ('train2017',):
            names, labels[split] = read_instances(data_root, split)  # annotations/instances_<split>.json
        n_classes = len(names) + 1  # index 0 is background / padding
    train_set = CocoCaptions(data_root, 'train2017', tok, image_size, max_len, train=True, seed=seed,
                             min_crop_scale=min_crop_scale, color_jitter=color_jitter, labels=labels.get('train2017'))
    val_set = CocoCaptions(data_root, 'val2017', tok, image_size, max_len, train=False, seed=seed,
                           labels=labels.get('val2017')) if eval_interval else None
subset = f" ({train_fraction:g} of {len(train_set)})" if train_fraction < 1 else ''
train_subset = train_set.keep_fraction(train_fraction, seed)  # indices kept (None: all), saved in checkpoints
if pretext == 'masked_lm':  # a caption with no word to hide would stop the run at its batch: refuse it now
    empty = next(filter(None, (data.wordless_caption() for data in (train_set, val_set) if data)), None)
    if empty:
        raise SystemExit(f"error: --pretext=masked_lm: {empty} has a caption without words (nothing to mask)")
# the sampler shuffles with (seed, epoch); each process takes every N-th index of the permutation
sampler = DistributedSampler(train_set, ddp_world_size, ddp_rank, shuffle=True, seed=seed, drop_last=True)
batches_per_epoch = len(sampler) // micro_batch
if batches_per_epoch == 0:
    raise SystemExit(f"error: {len(train_set)} training images{subset} are fewer than one batch of {micro_batch} per process")
loader_args = dict(batch_size=micro_batch, num_workers=num_workers, collate_fn=collate, drop_last=True,
                   pin_memory=device_type == 'cuda')
# one loader for the run, its workers kept between epochs; a private generator: iterating a loader must not draw
# from the global RNG (dropout uses it). The images' randomness comes from their (seed, epoch, index) keys.
train_keys = EpochKeys()
train_loader = DataLoader(train_set, sampler=train_keys, generator=torch.Generator().manual_seed(seed),
                          persistent_workers=num_workers > 0, **loader_args)


def batch_stream(epoch, batch):
    """Yield ((epoch, batches done in it), (images, tokens, errors)) forever, from a given position."""
    while True:
        sampler.set_epoch(epoch)
        train_keys.keys = [(epoch, i) for i in list(sampler)[batch * micro_batch:]]
        for batch, data in enumerate(train_loader, start=batch + 1):
            yield (epoch, batch), data
        epoch, batch = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# model and optimizer
PART_NAMES = LOSS_PARTS[pretext]  # the terms of the loss, logged beside it
RESUME_KEYS = ('optimizer', 'scaler', 'iter_num', 'data_position', 'bad_images', 'rng_state', 'cuda_rng_state')

model_args = dict(visual=visual, vocab_size=n_classes, n_layer=n_layer, n_embd=n_embd, n_head=n_head, max_len=max_len,
                  dropout=dropout, pretext=pretext, norm_first=norm_first, zero_init_residual=zero_init_residual,
                  init_std=init_std, pad_id=tok.pad_id, sos_id=tok.sos_id, eos_id=tok.eos_id, mask_id=tok.mask_id)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
ckpt = None
torch.manual_seed(seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: --init_from=resume: {ckpt_path} does not exist")
    with one_line_errors():  # the loading path of every stage: a bad file is one line, not a traceback
        model, ckpt = load_checkpoint(ckpt_path)
    saved = asdict(model.config)  # keys added since the file was written hold their defaults
    changed = [f"{k}={saved[k]!r} in the checkpoint, {v!r} now" for k, v in model_args.items() if saved[k] != v]
    if changed:
        raise SystemExit(f"error: {ckpt_path}: the model differs from the config: {'; '.join(changed)}")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise SystemExit(f"error: {ckpt_path}: cannot resume from it: no {', '.join(missing)} (a model-only file?)")
    if ckpt.get('train_subset') != train_subset:  # --train_fraction or --seed changed: other images
        raise SystemExit(f"error: {ckpt_path}: was trained on other images (--train_fraction="
                         f"{model.train_config.get('train_fraction', 1.0)}, --seed={model.train_config.get('seed')})")
    saved_optimizer = model.train_config.get('optimizer', 'sgd')  # files from before the knob were SGD
    if saved_optimizer != optimizer:
        raise SystemExit(f"error: {ckpt_path}: was trained with --optimizer={saved_optimizer}, not {optimizer}")
else:
    model = VirTex(VirTexConfig(**model_args))
# channels_last: cuDNN and oneDNN convolutions both run faster on NHWC (4x on a 2-core CPU for R-18 at 64 px)
model = model.to(device, memory_format=torch.channels_last)
raw_model = model  # the plain module: its state_dict is what checkpoints hold
flops_per_image = raw_model.flops_per_image(image_size) if device_type == 'cuda' else None
torch.manual_seed(seed + ddp_rank)  # a different dropout stream per process

groups = model.param_groups(weight_decay, cnn_lr, lr)
for group in groups:
    group['base_lr'] = group['lr']  # get_lr returns a multiplier: we have two base lrs
fast = {'fused': True} if device_type == 'cuda' else {'foreach': True}
if optimizer == 'sgd':
    inner = torch.optim.SGD(groups, lr=lr, momentum=momentum, **fast)
else:  # each group keeps its weight decay (0 on norms and biases), applied decoupled as AdamW does
    inner = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), **fast)
lookahead = LookAhead(inner, lookahead_k, lookahead_alpha)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
iter_num, data_position, bad_images = 0, (0, 0), 0
if ckpt is not None:
    settings = [{k: v for k, v in group.items() if k != 'params'} for group in lookahead.param_groups]
    try:
        lookahead.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise SystemExit(f"error: {ckpt_path}: its optimizer state does not fit this run ({type(e).__name__}: {e})") from None
    for group, setting in zip(lookahead.param_groups, settings):
        group.update(setting)  # lrs, momentum and weight decay come from this run's config, not the file
    scaler.load_state_dict(ckpt['scaler'])
    iter_num, data_position, bad_images = ckpt['iter_num'], tuple(ckpt['data_position']), ckpt['bad_images']
    torch.set_rng_state(ckpt['rng_state'][ddp_rank])
    if device_type == 'cuda':
        torch.cuda.set_rng_state(ckpt['cuda_rng_state'][ddp_rank])
    print0(f"resuming from {ckpt_path} at iteration {iter_num}")
    del ckpt
if compile:
    print0("compiling the model (the first iterations are slow)...")
    model = torch.compile(model)
if ddp:
    # BatchNorm stats stay per GPU (micro_batch images each); upstream never converts to SyncBatchNorm
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)

params = raw_model.num_params()
head = f"L{n_layer} H{n_embd} decoders" if raw_model.config.decoders else 'linear classifier'
print0(f"model: {pretext}, {visual} + {head}, {params['visual'] / 1e6:.1f}M backbone + {params['textual'] / 1e6:.1f}M "
       f"head parameters; {n_classes} {'classes' if pretext == 'multilabel_classification' else 'pieces'}")
print0(f"data: {len(train_set):,} training images{subset}, {batches_per_epoch} steps per epoch; {ddp_world_size} process(es) "
       f"x {gradient_accumulation_steps} micro-batches x {micro_batch} = {batch_size} images per iteration; "
       f"{max_iters * batch_size / len(train_set):.1f} epochs in all; {device} {dtype}")


def get_lr(it):
    """LR multiplier at iteration it: linear warmup from 0, then cosine decay to 0 (upstream's schedule)."""
    if it < warmup_iters:
        return it / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def to_device(images, tokens):
    """uint8 images leave the workers (4x less to copy) and are normalized on the device."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return normalize(images), tokens.to(device, non_blocking=True)


@torch.no_grad()
def estimate_val_loss():
    """Validation losses, and the same captions scored against other images (each batch's images rolled by
    one): the gap says how much the model reads from the image, the first number to watch in pretraining.
    Returns ({'loss': .., and each part}, the same with shuffled images)."""
    raw_model.eval()
    val_sampler = DistributedSampler(val_set, ddp_world_size, ddp_rank, shuffle=False)
    keys = [(0, i) for i in val_sampler][:eval_iters * micro_batch]
    loader = DataLoader(val_set, sampler=keys, generator=torch.Generator(), **{**loader_args, 'drop_last': False})
    totals, batches = torch.zeros(2, 1 + len(PART_NAMES), device=device), 0  # (true, shuffled) x (loss, parts)
    for batch, (images, tokens, _) in enumerate(loader):
        if images is None:
            continue
        images, tokens = to_device(images, tokens)
        with autocast:
            features = raw_model.visual_features(images)  # (B, N, H) or pooled (B, C)
            for row, paired in enumerate((features, features.roll(1, 0))):  # then every caption with another image
                # masked_lm hides the same words in both passes, and never draws from the training RNG
                generator = torch.Generator(device).manual_seed(seed + batch)
                loss, parts = raw_model.losses(paired, tokens, generator)
                totals[row] += torch.stack([loss, *parts.values()]).float()
        batches += 1
    if ddp:
        totals = torch.cat([totals.flatten(), torch.tensor([batches], device=device, dtype=totals.dtype)])
        dist.all_reduce(totals)
        totals, batches = totals[:-1].view(2, -1), totals[-1].item()
    raw_model.train()
    true, shuffled = (totals / max(batches, 1)).tolist()
    names = ('loss', *PART_NAMES)
    return dict(zip(names, true)), dict(zip(names, shuffled))


def memory_gb():
    if device_type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (Linux reports KiB)


# ----------------------------------------------------------------------------------------------
# the loop
if master_process:
    os.makedirs(out_dir, exist_ok=True)
log_file = open(os.path.join(out_dir, 'log.jsonl'), 'a') if master_process else None


def log(record):
    if master_process:
        log_file.write(json.dumps(record) + '\n')
        log_file.flush()


stream = batch_stream(*data_position)
start_iter = iter_num
nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # checked at log and checkpoint time only
window_time, window_iters, step_times, dt_ema = 0.0, 0, [], None
run_start = time.time()
for iter_num in range(start_iter, max_iters + 1):
    last_step = iter_num == max_iters
    # evaluation and checkpointing first, on their schedule; their time is not part of ms/iter
    if val_set is not None and (iter_num % eval_interval == 0 or last_step) and iter_num > 0:
        val, shuffled = estimate_val_loss()
        image_gap = (shuffled['loss'] - val['loss']) / len(PART_NAMES)  # per target of one term (one direction)
        terms = ' '.join(f"{name} {val[name]:.3f}" for name in PART_NAMES)
        print0(f"iter {iter_num}: val loss {val['loss']:.4f} ({terms}) | shuffled images {shuffled['loss']:.4f}: "
               f"the image is worth {image_gap:.3f} nats/{'label' if 'classification' in PART_NAMES else 'token'}")
        log({'event': 'val', 'iter': iter_num, 'loss': val['loss'], **{f'loss_{n}': val[n] for n in PART_NAMES},
             'loss_shuffled': shuffled['loss'], **{f'loss_shuffled_{n}': shuffled[n] for n in PART_NAMES},
             'image_gap': image_gap})
    if (iter_num % ckpt_interval == 0 or last_step) and iter_num > start_iter:
        # never replace a good checkpoint with a diverged model: check the losses and the weights
        weight_norm = torch.stack([p.detach().float().norm() for p in raw_model.parameters()]).sum()
        bad = nonfinite | ~torch.isfinite(weight_norm)
        if ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise SystemExit(f"error: the loss or the weights became non-finite before iteration {iter_num}; "
                             f"{ckpt_path} still holds the last good checkpoint")
        rng_states = [torch.get_rng_state()]
        cuda_rng_states = [torch.cuda.get_rng_state()] if device_type == 'cuda' else []
        if ddp:  # every process's RNG state, so each one resumes its own dropout stream
            rng_states, cuda_rng_states = [None] * ddp_world_size, [None] * ddp_world_size
            dist.all_gather_object(rng_states, torch.get_rng_state())
            if device_type == 'cuda':
                dist.all_gather_object(cuda_rng_states, torch.cuda.get_rng_state())
        if master_process:
            checkpoint = {'model': raw_model.state_dict(), 'model_args': model_args, 'optimizer': lookahead.state_dict(),
                          'scaler': scaler.state_dict(), 'iter_num': iter_num, 'data_position': list(data_position),
                          'bad_images': bad_images, 'rng_state': rng_states, 'cuda_rng_state': cuda_rng_states,
                          'train_subset': train_subset, 'config': config}
            # written to a temporary file and renamed: a crash mid-save leaves the previous checkpoint intact
            torch.save(checkpoint, ckpt_path + '.tmp')
            os.replace(ckpt_path + '.tmp', ckpt_path)
            print0(f"iter {iter_num}: saved {ckpt_path}")
            log({'event': 'checkpoint', 'iter': iter_num, 'path': ckpt_path})
    if last_step:
        break

    # ------------------------------------------------------------------------------------------
    # training step
    t0 = time.perf_counter()
    lr_mult = get_lr(iter_num)
    for group in lookahead.param_groups:
        group['lr'] = group['base_lr'] * lr_mult
    loss_sum = torch.zeros(1 + len(PART_NAMES), device=device)  # loss, its terms
    for micro_step in range(gradient_accumulation_steps):
        data_position, (images, tokens, errors) = next(stream)
        for error in errors:
            bad_images += 1
            print(f"warning: skipped {error} ({bad_images} skipped so far)", flush=True)
            if bad_images > max_bad_images:
                raise SystemExit(f"error: more than max_bad_images={max_bad_images} images failed to load; "
                                 f"last: {error}")
        if images is None:
            raise SystemExit(f"error: every image of a batch failed to load; last: {errors[-1]}")
        if ddp:  # all-reduce the gradients only on the last micro-step (set before the forward pass)
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with autocast:
            loss, parts = model(*to_device(images, tokens))
        scaler.scale(loss / gradient_accumulation_steps).backward()
        loss_sum += torch.stack([loss.detach(), *parts.values()]).float()
    nonfinite |= ~torch.isfinite(loss_sum[0])
    scaler.unscale_(lookahead)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    scaler.step(lookahead)
    scaler.update()
    lookahead.zero_grad(set_to_none=True)
    # ------------------------------------------------------------------------------------------
    step = iter_num + 1
    if step % log_interval == 0 or step == max_iters:
        losses = loss_sum / gradient_accumulation_steps
        if ddp:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        loss_value, *terms = losses.tolist()  # .tolist() waits for the device: dt is honest
        if nonfinite.item():
            raise SystemExit(f"error: non-finite loss ({loss_value}) by iteration {step}; "
                             f"the last good checkpoint stays at {ckpt_path}")
    dt = time.perf_counter() - t0
    window_time, window_iters = window_time + dt, window_iters + 1
    step_times.append(dt)
    if step % log_interval == 0 or step == max_iters:
        ms = 1000 * window_time / window_iters
        # the first iterations include compilation and warm-up: keep them out of the ETA's average
        if step - start_iter > 5:
            dt_ema = ms if dt_ema is None else 0.9 * dt_ema + 0.1 * ms
        images_per_s = batch_size * 1000 / ms
        mfu = f"{100 * flops_per_image * images_per_s / (peak_tflops * 1e12 * ddp_world_size):.1f}%" \
            if flops_per_image and step - start_iter > 5 else '-'
        eta_s = (dt_ema or ms) / 1000 * (max_iters - step)
        print0(f"iter {step}/{max_iters} | loss {loss_value:.3f} ({' '.join(f'{n} {v:.3f}' for n, v in zip(PART_NAMES, terms))}) | "
               f"lr {cnn_lr * lr_mult:.4f} | gnorm {grad_norm.item():.2f} | {ms:.0f}ms | {images_per_s:.0f} img/s | "
               f"mfu {mfu} | mem {memory_gb():.1f}G | eta {int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m")
        log({'event': 'train', 'iter': step, 'loss': loss_value, **{f'loss_{n}': v for n, v in zip(PART_NAMES, terms)},
             'lr': cnn_lr * lr_mult, 'grad_norm': grad_norm.item(), 'ms': ms, 'img_s': images_per_s,
             'mem_gb': memory_gb(), 'time': time.time() - run_start})
        window_time, window_iters = 0.0, 0

if step_times:
    last = step_times[-20:]
    print0(f"done: {len(step_times)} iterations in {time.time() - run_start:.0f}s; mean {1000 * sum(last) / len(last):.0f} "
           f"ms/iter over the last {len(last)}; {batch_size * len(last) / sum(last):.1f} img/s; "
           f"peak memory {memory_gb():.2f}G; {bad_images} images skipped")
if ddp:
    dist.barrier()  # rank 0 may still be writing the last checkpoint: a rank that leaves early aborts the others
    dist.destroy_process_group()

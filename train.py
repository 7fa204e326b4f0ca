"""
Pretrain VirTex: a ResNet plus forward and backward caption decoders, trained from scratch on COCO
captions (or with one of the paper's other pretext tasks, or CapPa's: --pretext, see pretexts.py).

  CPU demo:  python train.py config/shapes.py                  (minutes)
  one GPU:   python train.py config/virtex_r50_l1_h2048.py
  8 GPUs:    torchrun --standalone --nproc_per_node=8 train.py config/virtex_r50_l1_h2048.py
  resume:    python train.py config/shapes.py --init_from=resume  (auto: if there is a checkpoint)

Reads <data_root>/ (COCO layout: train2017/, val2017/, annotations/captions_{train,val}2017.json,
and instances_*.json for the multilabel pretext) and <tokenizer> (tokenizer.py's .model); writes
<out_dir>/ckpt.pt, log.jsonl and, with --voc_root, best.pt. The defaults are the paper's best run
(R-50, L1, H2048, batch 256, 500k iterations). Every input is checked before out_dir is claimed, and
nothing in it is lost to a mistake, a signal or a full disk (run_folder.py says how).
"""

import math
import os
import time
from functools import partial
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bench import flops_per_image, peak_memory_gb
from checkpoints import load_for_resume, restore_training_state, save_checkpoint
from coco import BadImages, CocoCaptions, TrainBatches, collate, read_instances, to_device
from configurator import (FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Interval, JsonLog, Needs,
                          check_device, check_outputs, config_keys, configure, one_line_errors,
                          precision)
from evaluate import read_voc_task
from lookahead import LookAhead, warmup_cosine
from model import PRETEXTS, VISUALS, VirTexConfig
from pretexts import LOSS_PARTS, draws_of, pretext_model
from run_folder import StopSignals, claim_run_folder, ignore_stop_signals
from tokenizer import Tokenizer
from validation import image_gap, val_loader, voc_map

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
pretext: Literal[PRETEXTS] = 'bicaptioning'  # the paper; or another of pretexts.py
# cappa: the share of captions predicted all at once (None: 0.75)
parallel_fraction: Annotated[PROBABILITY, Needs('pretext', 'cappa')] = None
norm_first = False            # post-norm Transformer layers, as in the paper
zero_init_residual = True     # each ResNet block starts as the identity, as in the paper
init_std: POSITIVE = 0.02     # textual weights at init ~ N(0, init_std): the paper's (BERT's)
# data
image_size: POSITIVE = 224    # random-resized-crop size
min_crop_scale: FRACTION = 0.2  # random-resized-crop keeps (min_crop_scale, 1) of the image area
color_jitter: PROBABILITY = 0.8  # p of jitter: brightness/contrast/saturation .4, hue .1
batch_size: POSITIVE = 256    # global; each of N processes gets batch_size // N (paper: 8 x 32)
gradient_accumulation_steps: POSITIVE = 1  # micro-batches per step, if a GPU can't hold its share
num_workers: NON_NEGATIVE = 4  # DataLoader workers per process
# device: the workers only read the JPEGs; the batch is decoded (nvJPEG) and augmented on `device`
decode_on: Literal['workers', 'device'] = 'workers'
max_bad_images: NON_NEGATIVE = 100  # unreadable images are skipped; the run stops past this many
train_fraction: FRACTION = 1.0  # train on this share of the images, drawn with `seed`
# multilabel: only these categories (instances_*.json) ('': all)
label_categories: Annotated[str, Needs('pretext', 'multilabel_classification')] = ''
# optimization
max_iters: POSITIVE = 500_000
warmup_iters: NON_NEGATIVE = 10_000  # linear warmup from 0, then cosine decay to 0 at max_iters
optimizer: Literal['sgd', 'adamw'] = 'sgd'  # inside LookAhead; adamw's beta1 is momentum
cnn_lr: NON_NEGATIVE = 0.2    # lr of the backbone (upstream OPTIM.CNN_LR)
lr: NON_NEGATIVE = 0.001      # lr of the textual head (upstream OPTIM.LR)
momentum: NON_NEGATIVE = 0.9
weight_decay: NON_NEGATIVE = 1e-4  # not on the textual embedding/decoder norms and biases
lookahead_k: POSITIVE = 5     # slow weights sync every k steps ...
lookahead_alpha: FRACTION = 0.5  # ... moving alpha of the way to the fast weights (1: no LookAhead)
grad_clip: NON_NEGATIVE = 10.0  # max global grad norm; 0 turns clipping off
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype: Literal['auto', 'float32', 'bfloat16', 'float16'] = 'auto'  # auto: bf16 where native
compile = torch.cuda.is_available()  # torch.compile: worth it on GPUs, not for short CPU runs
seed = 0
deterministic = False         # True: no TF32, no autotuning: a bitwise resume on GPUs too
init_from: Literal['scratch', 'resume', 'auto'] = 'scratch'  # resume: from out_dir/ckpt.pt
eval_interval: NON_NEGATIVE = 2000  # validation loss every this many iterations (0: never)
eval_iters: POSITIVE = 20  # validation batches per evaluation
voc_root = ''                 # a VOC2007 folder: judge the backbone by its mAP, keep the best
# with voc_root: every this many iterations (0: only at the end)
voc_interval: Annotated[NON_NEGATIVE, Needs('voc_root', why=' (a VOC2007 folder)')] = 0
ckpt_interval: POSITIVE = 2000  # checkpoint every this many iterations (and at the end)
log_interval: POSITIVE = 20
peak_tflops: POSITIVE = 989.0  # per-GPU peak for MFU (bf16 dense: H100/H200 989, A100 312)
# ----------------------------------------------------------------------------------------------
configurable = config_keys(globals())
rest = configure(globals())
if rest:
    raise SystemExit(f"error: unexpected arguments {rest} (config files end in .py, flags are "
                     "--key=value)")
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise SystemExit(f"error: --out_dir={out_dir} is a file, not a folder")
with one_line_errors():
    check_device(device)
    VirTexConfig(visual=visual, n_embd=n_embd, n_head=n_head, max_len=max_len)  # n_embd % n_head
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
dtype, autocast, warning = precision(device, dtype, deterministic)


def print0(*args):
    if master_process:
        print(*args, flush=True)


if warning:
    print0(warning)

# ----------------------------------------------------------------------------------------------
# data: COCO captions (coco.py: the dataset and its batches; augment.py: the augmentation)
ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
log_path = os.path.join(out_dir, 'log.jsonl')
auto_start = init_from == 'auto'
if auto_start:
    init_from = 'resume' if os.path.exists(ckpt_path) else 'scratch'
for path, what in ((data_root, 'data_root'), (tokenizer, 'tokenizer')):
    if not os.path.exists(path):
        raise SystemExit(f"error: {what}={path}: no such file or folder")
with one_line_errors():
    check_outputs({'out_dir': [ckpt_path, best_path, log_path]}, {'--tokenizer': tokenizer})
    if voc_root:  # now, not when the backbone is first judged, maybe at the end of the run
        read_voc_task(voc_root)
    tok = Tokenizer(tokenizer)
    labels, n_classes = {}, len(tok)
    if pretext == 'multilabel_classification':
        for split in ('train2017', 'val2017') if eval_interval else ('train2017',):
            names, labels[split] = read_instances(data_root, split, label_categories)
        n_classes = len(names) + 1  # index 0 is background / padding
    train_set = CocoCaptions(data_root, 'train2017', tok, image_size, max_len, train=True,
                             seed=seed, min_crop_scale=min_crop_scale, color_jitter=color_jitter,
                             labels=labels.get('train2017'), decode_on_device=decode_on == 'device')
    val_set = CocoCaptions(data_root, 'val2017', tok, image_size, max_len, train=False, seed=seed,
                           labels=labels.get('val2017')) if eval_interval else None
subset = f" ({train_fraction:g} of {len(train_set)})" if train_fraction < 1 else ''
train_subset = train_set.keep_fraction(train_fraction, seed)  # indices kept (None: all)
# the loaders keep their workers for the run; a private generator: iterating a loader must not draw
# from the global RNG (dropout uses it), the images' randomness comes from their (seed, epoch,
# index) keys. With compile, captions are padded to max_len: one shape, one compiled graph.
loader_args = dict(num_workers=num_workers, persistent_workers=num_workers > 0,
                   collate_fn=partial(collate, pad_to=max_len if compile else 0),
                   pin_memory=device_type == 'cuda', worker_init_fn=ignore_stop_signals,
                   generator=torch.Generator().manual_seed(seed))
train_batches = TrainBatches(train_set, micro_batch, ddp_rank, ddp_world_size, seed,
                             decode_on=device if decode_on == 'device' else None, **loader_args)
if len(train_batches) == 0:
    raise SystemExit(f"error: {len(train_set)} training images{subset} are fewer than one batch of "
                     f"{micro_batch} per process")
if val_set is not None:
    val_batches = val_loader(val_set, micro_batch, eval_iters, **loader_args)

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
        model, ckpt = load_for_resume(ckpt_path, model_args, config, tok.pieces_hash(),
                                      train_subset)
else:
    model = pretext_model(VirTexConfig(**model_args))
# channels_last: cuDNN and oneDNN convolutions run faster on NHWC (4x on 2 CPU cores, R-18, 64 px)
model = model.to(device, memory_format=torch.channels_last)
raw_model = model  # the plain module: its state_dict is what checkpoints hold
flops = flops_per_image(raw_model, image_size) if device_type == 'cuda' else None  # for MFU
torch.manual_seed(seed + ddp_rank)  # a different dropout stream per process

groups = model.param_groups(weight_decay, cnn_lr, lr)  # the backbone's and the head's base lrs
# fused: one kernel for the whole update, on GPUs and CPUs (on 2 CPU cores, half foreach's time)
if optimizer == 'sgd':
    inner = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
else:  # each group keeps its weight decay (0 on norms and biases), applied decoupled as AdamW does
    inner = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=True)
lookahead = LookAhead(inner, lookahead_k, lookahead_alpha)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
iter_num, data_position, best_voc = 0, (0, 0), {'map': -1.0, 'iter': 0}
time_before = 0.0  # seconds the run trained before this process (a resume): the log's goes on
bad_images = BadImages(max_bad_images)
if ckpt is not None:
    with one_line_errors():
        (iter_num, data_position, best_voc, bad_images.count, time_before,
         note) = restore_training_state(ckpt_path, ckpt, lookahead, scaler, ddp_rank,
                                        ddp_world_size)
    if note:
        print0(f"note: {note}")
    print0(f"resuming from {ckpt_path} at iteration {iter_num}")
    del ckpt
if compile:
    print0("compiling the model (the first iterations are slow)...")
    model = torch.compile(model)
if ddp:  # BatchNorm statistics stay per GPU: upstream never converts to SyncBatchNorm
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)
params = raw_model.num_params()
print0(f"model: {pretext}, {visual} ({params['visual'] / 1e6:.1f}M parameters) + a head of "
       f"{params['textual'] / 1e6:.1f}M; {n_classes} {'labels' if labels else 'pieces'}")
print0(f"data: {len(train_set):,} training images{subset}, {len(train_batches)} steps per epoch; "
       f"{ddp_world_size} process(es) x {gradient_accumulation_steps} micro-batches x "
       f"{micro_batch} = {batch_size} images per iteration; "
       f"{max_iters * batch_size / len(train_set):.1f} epochs in all; {device} {dtype}")

# ----------------------------------------------------------------------------------------------
# every input is checked: now the run folder is claimed (and with --overwrite=True, emptied), and
# the log opened: one JSON record per line, never left cut (configurator.JsonLog)
if master_process:
    with one_line_errors():
        claim_run_folder(out_dir, scratch=init_from == 'scratch', overwrite=overwrite,
                         auto=auto_start)
log_file = JsonLog(log_path) if master_process else None


def log(record):
    if master_process:
        try:
            log_file.append(record)
        except OSError as e:
            raise SystemExit(f"error: {e}; {ckpt_path} holds the last checkpoint") from None


def last_good():
    return f"{ckpt_path} holds the last good checkpoint" if os.path.exists(ckpt_path) else \
        "no checkpoint was written"


def save(path, step, full=True):
    """The run at `step`: the model and, with full=True, all a resume needs. Every process calls it.
    (checkpoints.save_checkpoint refuses a diverged model: a good checkpoint is never replaced.)"""
    state = {'model_args': model_args, 'config': config, 'iter_num': step,
             'tokenizer_pieces': tok.pieces_hash(), 'best_voc': best_voc,
             'time': time.time() - clock_start}
    if full:
        state.update(data_position=list(data_position), bad_images=bad_images.count,
                     train_subset=train_subset)
    try:
        save_checkpoint(path, raw_model, state, *((lookahead, scaler, nonfinite) if full else ()))
    except OSError as e:
        raise SystemExit(f"error: {e}; the previous file stays as it was") from None
    except ValueError:
        raise SystemExit("error: the loss or the weights became non-finite before iteration "
                         f"{step}; {last_good()}") from None
    print0(f"iter {step}: saved {path}")
    log({'event': 'checkpoint', 'iter': step, 'path': path})


def due(interval, it):
    """True at every `interval`-th iteration of this run (0: none) and at the end."""
    return it > start_iter and (it == max_iters or (interval > 0 and it % interval == 0))

# ----------------------------------------------------------------------------------------------
# the loop: evaluations and checkpoints first, on their schedule (their time is not part of
# ms/iter), then the training step, then the log
stream = train_batches.stream(*data_position)
start_iter = iter_num
log({'event': 'resume' if start_iter else 'start', 'iter': start_iter,
     'world_size': ddp_world_size})
nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # checked at log and save time only
window_time, window_steps, run_time, run_steps = 0.0, 0, 0.0, 0
run_start = time.time()
clock_start = run_start - time_before  # for the log's and checkpoint's 'time'
stop = StopSignals(out_dir, ckpt_path, master_process)  # SIGTERM, SIGINT, SIGUSR1: save, then stop
for iter_num in range(start_iter, max_iters + 1):
    stopping = stop.agreed(iter_num, log_interval, device)
    try:  # an evaluation whose images went bad raises on every process: saved, then stopped
        if val_set is not None and not stopping and due(eval_interval, iter_num):
            line, record = image_gap(iter_num, raw_model, val_batches, autocast, seed, bad_images,
                                     f'{data_root}/val2017')
            print0(line)
            log(record)
        if voc_root and not stopping and due(voc_interval, iter_num):
            voc, line, record = voc_map(iter_num, raw_model, voc_root, image_size, micro_batch,
                                        num_workers, best_voc)
            if master_process:
                if voc > best_voc['map']:
                    best_voc = {'map': voc, 'iter': iter_num}
                    save(best_path, iter_num, full=False)
                print0(line)
                log(record)
    except ValueError as e:
        save(ckpt_path, iter_num)
        raise SystemExit(f"error: iteration {iter_num}: {e}; {ckpt_path} holds this iteration: "
                         "mend the data and continue with --init_from=resume") from None
    if due(ckpt_interval, iter_num) or (stopping and iter_num > start_iter):
        save(ckpt_path, iter_num)
    if iter_num == max_iters or stopping:
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
        generator = draws_of(pretext, seed, ddp_rank, iter_num, micro_step, device)
        with autocast:
            loss, parts = model(*to_device(images, tokens, device), generator)
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
    # logging, every log_interval steps: this step's losses, the mean time of the last steps
    losses = loss_sum / gradient_accumulation_steps
    if ddp:  # a cappa mode that drew no caption on some process is NaN in the mean: shown as '-'
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        dist.all_reduce(losses, op=dist.ReduceOp.AVG)
    loss_value, *terms = losses.tolist()  # waits for the device: the window's time is honest
    if nonfinite.item():
        raise SystemExit(f"error: non-finite loss ({loss_value}) by iteration {step}; "
                         f"{last_good()}")
    window_time, window_steps = window_time + time.perf_counter() - t0, window_steps + 1
    ms = 1000 * window_time / window_steps
    if step - start_iter > log_interval:  # the first window holds warm-up and compilation
        run_time, run_steps = run_time + window_time, run_steps + window_steps
    window_time, window_steps = 0.0, 0
    images_per_s = batch_size * 1000 / ms
    mfu = flops * images_per_s / (peak_tflops * 1e12 * ddp_world_size) if flops and run_steps \
        else None
    eta_s = (run_time / run_steps if run_steps else ms / 1000) * (max_iters - step)
    terms = {n: None if math.isnan(v) else v for n, v in zip(PART_NAMES, terms)}  # NaN: no caption
    terms_text = ' '.join(f"{n} {'-' if v is None else f'{v:.3f}'}" for n, v in terms.items())
    print0(f"iter {step}/{max_iters} | loss {loss_value:.3f} ({terms_text}) | lr cnn "
           f"{cnn_lr * lr_mult:.2e} head {lr * lr_mult:.2e} | gnorm {grad_norm.item():.2f} | "
           f"{ms:.0f}ms | {images_per_s:.0f} img/s | mfu {'-' if mfu is None else f'{mfu:.1%}'} | "
           f"mem {peak_memory_gb(device):.1f}G | eta {int(eta_s // 3600)}h"
           f"{int(eta_s % 3600 // 60):02d}m")
    log({'event': 'train', 'iter': step, 'loss': loss_value,
         **{f'loss_{n}': v for n, v in terms.items()}, 'lr_cnn': cnn_lr * lr_mult,
         'lr_head': lr * lr_mult, 'grad_norm': grad_norm.item(), 'ms': ms, 'img_s': images_per_s,
         'mem_gb': peak_memory_gb(device), 'time': time.time() - clock_start})

steps = iter_num - start_iter
if steps and master_process:
    mean_ms = 1000 * run_time / run_steps if run_steps else 1000 * (time.time() - run_start) / steps
    print0(f"done: {steps} iterations in {time.time() - run_start:.0f}s; {mean_ms:.0f} ms/iter and "
           f"{batch_size * 1000 / mean_ms:.1f} img/s after the first {log_interval}; peak memory "
           f"{peak_memory_gb(device):.2f}G; {bad_images.count} images skipped")
if ddp:
    # rank 0 may still be writing the last checkpoint: a rank that leaves early aborts the others
    dist.barrier()
    dist.destroy_process_group()
if stopping:
    stop.exit(stopping, iter_num, trained=iter_num > start_iter or start_iter > 0)

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
(R-50, L1, H2048, batch 256, 500k iterations); model.py, coco.py and lookahead.py hold the rest
of the paper's path. Every input is checked before out_dir is claimed, and nothing in it is lost to
a mistake, a signal or a full disk (safety.py says how).
"""

import math
import os
import resource
import time
from functools import partial
from typing import Annotated, Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from coco import BadImages, CocoCaptions, TrainBatches, collate, read_instances, to_device, \
    val_batches
from configurator import (DEVICE, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, Interval, Needs,
                          config_keys, configure)
from evaluate import precision, read_voc_task, voc_map
from lookahead import LookAhead, warmup_cosine
from model import VISUALS, VirTexConfig, flops_per_image
from pretexts import PRETEXTS, draws_of, freeze_backbone, image_gap, pretext_model
from safety import (JsonLog, StopSignals, check_outputs, claim_run_folder, ignore_stop_signals,
                    kept_checkpoints, one_line_errors, resume_run, run_checkpoint,
                    save_checkpoint)
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# config: defaults = the paper's best run; then a config/*.py file, then --key=value flags
data_root = 'data/coco'       # COCO layout, see the header
tokenizer = 'data/coco/coco_10k.model'  # from tokenizer.py; the vocabulary size comes from it
out_dir = 'out'               # the run's folder: ckpt.pt, log.jsonl, best.pt
overwrite = False             # True: a scratch run may replace the run already in out_dir
visual: Literal[VISUALS] = 'resnet50'  # torchvision ResNet, random init
n_layer: POSITIVE = 1         # L, decoder layers per direction
n_embd: POSITIVE = 2048       # H, the textual width
n_head: POSITIVE = 32         # H / 64
max_len: Annotated[int, Interval('[3, inf)')] = 30  # caption ids, [SOS] and [EOS] included
dropout: Annotated[float, Interval('[0, 1)')] = 0.1  # in the textual head
pretext: Literal[tuple(PRETEXTS)] = 'bicaptioning'  # the paper; or another of pretexts.py
# cappa: the share of captions predicted all at once (None: 0.75)
parallel_fraction: Annotated[PROBABILITY, Needs('pretext', 'cappa')] = None
norm_first = False            # post-norm Transformer layers, as in the paper
zero_init_residual = True     # each ResNet block starts as the identity, as in the paper
init_std: POSITIVE = 0.02     # textual weights at init ~ N(0, init_std): the paper's (BERT's)
image_size: POSITIVE = 224    # random-resized-crop size
min_crop_scale: FRACTION = 0.2  # random-resized-crop keeps (min_crop_scale, 1) of the image area
color_jitter: PROBABILITY = 0.8  # p of jitter: brightness/contrast/saturation .4, hue .1
batch_size: POSITIVE = 256    # global; each of N processes gets batch_size // N (paper: 8 x 32)
gradient_accumulation_steps: POSITIVE = 1  # micro-batches per step, if a GPU can't hold its share
num_workers: NON_NEGATIVE = 4  # DataLoader workers per process
# device: the workers only read the JPEGs; they are decoded (nvJPEG) and augmented on `device`
decode_on: Literal['workers', 'device'] = 'workers'
max_bad_images: NON_NEGATIVE = 100  # unreadable images are skipped; the run stops past this many
train_fraction: FRACTION = 1.0  # train on this share of the images, drawn with `seed`
# multilabel: only these categories (instances_*.json) ('': all)
label_categories: Annotated[str, Needs('pretext', 'multilabel_classification')] = ''
max_iters: POSITIVE = 500_000  # optimizer steps
warmup_iters: NON_NEGATIVE = 10_000  # linear warmup from 0, then cosine decay to 0 at max_iters
optimizer: Literal['sgd', 'adamw'] = 'sgd'  # inside LookAhead; adamw's beta1 is momentum
cnn_lr: NON_NEGATIVE = 0.2    # lr of the backbone (upstream OPTIM.CNN_LR)
lr: NON_NEGATIVE = 0.001      # lr of the textual head (upstream OPTIM.LR)
momentum: NON_NEGATIVE = 0.9  # SGD's momentum, AdamW's beta1
weight_decay: NON_NEGATIVE = 1e-4  # not on the textual embedding/decoder norms and biases
lookahead_k: POSITIVE = 5     # slow weights sync every k steps ...
lookahead_alpha: FRACTION = 0.5  # ... moving alpha of the way to the fast weights (1: no LookAhead)
grad_clip: NON_NEGATIVE = 10.0  # max global grad norm; 0 turns clipping off
device: DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'  # cpu, cuda, cuda:1, ...
dtype: Literal['auto', 'float32', 'bfloat16', 'float16'] = 'auto'  # auto: bf16 where native
compile = torch.cuda.is_available()  # torch.compile: worth it on GPUs, not for short CPU runs
seed = 0                      # the weights' init, the data order, the augmentation, dropout
deterministic = False         # True: no TF32, no autotuning: a bitwise resume on GPUs too
init_from = 'scratch'  # scratch | resume | auto | FILE: a model to start from (virtex:FILE too)
init_backbone = ''     # or a backbone alone, from FILE or torchvision:/moco:/vissl:/virtex:FILE
eval_interval: NON_NEGATIVE = 2000  # validation loss every this many iterations (0: never)
eval_iters: POSITIVE = 20     # validation batches per evaluation
voc_root = ''                 # a VOC2007 folder: judge the backbone by its mAP, keep the best
# with voc_root: every this many iterations (0: only at the end)
voc_interval: Annotated[NON_NEGATIVE, Needs('voc_root', why=' (a VOC2007 folder)')] = 0
ckpt_interval: POSITIVE = 2000  # checkpoint every this many iterations (and at the end)
log_interval: POSITIVE = 20   # a progress line and a log record every this many iterations
peak_tflops: POSITIVE = 989.0  # per-GPU peak for MFU (bf16 dense: H100/H200 989, A100 312)
# ----------------------------------------------------------------------------------------------


def peak_memory_gb(device) -> float:
    """The GPU's peak allocation, or the process's peak resident set (Linux counts it in KiB)."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
    config = {k: globals()[k] for k in config_keys(globals())}  # saved in every checkpoint
    config['tokenizer'] = os.path.abspath(tokenizer)  # so caption.py finds it from any folder
    with one_line_errors():  # n_embd % n_head, before any work
        VirTexConfig(visual=visual, n_embd=n_embd, n_head=n_head, max_len=max_len)

    # distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = 'RANK' in os.environ
    if ddp:
        if device.startswith('cuda:'):
            raise SystemExit(f"error: --device={device}: under torchrun each process takes the GPU "
                             "of its local rank: give --device=cuda")
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
        ddp_rank, ddp_local_rank, ddp_world_size = (dist.get_rank(), int(os.environ['LOCAL_RANK']),
                                                    dist.get_world_size())
        if device == 'cuda':
            torch.cuda.set_device(ddp_local_rank)  # from now on 'cuda' is this process's GPU
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
    master_process = ddp_rank == 0
    if batch_size % (ddp_world_size * gradient_accumulation_steps):
        raise SystemExit(f"error: batch_size={batch_size} is not divisible by {ddp_world_size} "
                         f"processes x {gradient_accumulation_steps} accumulation steps")
    micro_batch = batch_size // (ddp_world_size * gradient_accumulation_steps)
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'

    print0 = partial(print, flush=True) if master_process else lambda *args: None

    # precision (evaluate.precision: bf16 where native). TF32 and cuDNN's autotuning make a resumed
    # GPU run close to an unbroken one, not bitwise, unless `deterministic`
    amp_dtype, autocast, warning = precision(device, dtype)
    if warning:
        print0(warning)
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
        torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS's deterministic GEMMs
        torch.use_deterministic_algorithms(True)

    # ------------------------------------------------------------------------------------------
    # data: COCO captions (coco.py: the dataset, its batches and its augmentation)
    ckpt_path, best_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'best.pt')
    log_path = os.path.join(out_dir, 'log.jsonl')
    resume = init_from == 'resume' or init_from == 'auto' and bool(run_checkpoint(ckpt_path))
    for path, what in ((data_root, 'data_root'), (tokenizer, 'tokenizer')):
        if not os.path.exists(path):
            raise SystemExit(f"error: {what}={path}: no such file or folder")
    weights = '' if init_from in ('scratch', 'resume', 'auto') else init_from  # a model's file
    with one_line_errors():
        check_outputs({'out_dir': [ckpt_path, best_path, log_path]}, {'--tokenizer': tokenizer})
        # checked now, not when the backbone is first judged, maybe at the end of the run
        voc_task = read_voc_task(voc_root)['summary'] if voc_root else None  # best.pt's
        tok = Tokenizer(tokenizer)
        labels, n_classes = {}, len(tok)
        if pretext == 'multilabel_classification':
            for split in ('train2017', 'val2017') if eval_interval else ('train2017',):
                names, labels[split] = read_instances(data_root, split, label_categories)
            n_classes = len(names) + 1  # index 0 is background / padding
        train_set = CocoCaptions(data_root, 'train2017', tok, image_size, max_len, train=True,
                                 seed=seed, min_crop_scale=min_crop_scale,
                                 color_jitter=color_jitter, labels=labels.get('train2017'),
                                 decode_on_device=decode_on == 'device')
        val_set = CocoCaptions(data_root, 'val2017', tok, image_size, max_len, train=False,
                               seed=seed, labels=labels.get('val2017')) if eval_interval else None
    subset = f" ({train_fraction:g} of {len(train_set)})" if train_fraction < 1 else ''
    train_subset = train_set.keep_fraction(train_fraction, seed)  # indices kept (None: all)
    # the loaders keep their workers for the run; a private generator: iterating a loader must not
    # draw from the global RNG (dropout uses it), the images' randomness comes from their (seed,
    # epoch, index) keys. With compile, captions are padded to max_len: one shape, one graph.
    loader_args = dict(num_workers=num_workers, persistent_workers=num_workers > 0,
                       collate_fn=partial(collate, pad_to=max_len if compile else 0),
                       pin_memory=device_type == 'cuda', worker_init_fn=ignore_stop_signals,
                       generator=torch.Generator().manual_seed(seed))
    train_batches = TrainBatches(train_set, micro_batch, ddp_rank, ddp_world_size, seed,
                                 decode_on=device if decode_on == 'device' else None, **loader_args)
    if len(train_batches) == 0:
        raise SystemExit(f"error: {len(train_set)} training images{subset} are fewer than one "
                         f"batch of {micro_batch} per process")
    val_loader = val_batches(val_set, micro_batch, eval_iters, ddp_rank, ddp_world_size,
                             **loader_args) if val_set is not None else None

    # ------------------------------------------------------------------------------------------
    # model and optimizer, from scratch or from the checkpoint
    part_names = PRETEXTS[pretext][1]  # the terms of the loss, logged beside it
    model_args = dict(visual=visual, vocab_size=n_classes, n_layer=n_layer, n_embd=n_embd,
                      n_head=n_head, max_len=max_len, dropout=dropout, pretext=pretext,
                      norm_first=norm_first, zero_init_residual=zero_init_residual,
                      init_std=init_std, pad_id=tok.pad_id, sos_id=tok.sos_id, eos_id=tok.eos_id,
                      mask_id=tok.mask_id)
    if parallel_fraction is not None:
        model_args['parallel_fraction'] = parallel_fraction
    torch.manual_seed(seed)  # the same initial weights on every process (DDP broadcasts rank 0's)
    model = pretext_model(VirTexConfig(**model_args))
    if cnn_lr == 0:  # a frozen backbone: its weights and BatchNorm statistics stay as they are
        freeze_backbone(model)
    # channels_last: cuDNN's tensor-core convolutions want NHWC; on CPUs oneDNN's bf16 ones gain
    # from it and its float32 ones lose a little at 64 px (RESULTS.md, speed): one layout for all
    model = model.to(device, memory_format=torch.channels_last)
    raw_model = model  # the plain module: its state_dict is what checkpoints hold
    flops = flops_per_image(raw_model, image_size) if device_type == 'cuda' else None  # for MFU
    torch.manual_seed(seed + ddp_rank)  # a different dropout stream per process

    groups = model.param_groups(weight_decay, cnn_lr, lr)  # the backbone's and the head's base lrs
    # fused: one kernel for the whole update instead of a few per parameter group, on GPUs and CPUs
    if optimizer == 'sgd':
        inner = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    else:  # each group keeps its weight decay (0 on norms and biases), applied decoupled as AdamW
        inner = torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=True)
    lookahead = LookAhead(inner, lookahead_k, lookahead_alpha)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == 'float16')
    iter_num, data_position, time_before, started_from = 0, (0, 0), 0.0, ''  # below, if given
    best_voc = {'map': -1.0, 'iter': 0, 'task': voc_task}
    bad_images = BadImages(max_bad_images)
    if resume:  # the weights and the training state of a checkpoint that can continue this run
        with one_line_errors():
            (iter_num, data_position, best_voc, bad_images.count, time_before, started_from,
             notes) = resume_run(ckpt_path, model, lookahead, scaler, model_args, config,
                                 tok.pieces_hash(), train_subset, voc_task)
        for note in notes:
            print0(f"note: {note}")
        print0(f"resuming from {ckpt_path} at iteration {iter_num}")
    elif weights or init_backbone:  # weights one has, with a new optimizer and schedule
        from checkpoints import start_from  # weight files: read only when one is asked for
        with one_line_errors():
            started_from = start_from(raw_model, weights, init_backbone, tok.pieces_hash())
        print0(f"starting from {started_from}")
    if compile:
        print0("compiling the model (the first iterations are slow)...")
        model = torch.compile(model)
    if ddp:  # BatchNorm statistics stay per GPU: upstream never converts to SyncBatchNorm
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None)
    params = raw_model.num_params()
    print0(f"model: {pretext}, {visual} ({params['visual'] / 1e6:.1f}M parameters) + a head of "
           f"{params['textual'] / 1e6:.1f}M; {n_classes} {'labels' if labels else 'pieces'}")
    print0(f"data: {len(train_set):,} training images{subset}, {len(train_batches)} steps per "
           f"epoch; {ddp_world_size} process(es) x {gradient_accumulation_steps} micro-batches x "
           f"{micro_batch} = {batch_size} images per iteration; "
           f"{max_iters * batch_size / len(train_set):.1f} epochs in all; {device} {amp_dtype}")

    # ------------------------------------------------------------------------------------------
    # every input is checked: now the run folder is claimed, and its log opened (safety.py)
    if master_process:
        with one_line_errors():
            claim_run_folder(out_dir, scratch=not resume, overwrite=overwrite,
                             auto=init_from == 'auto')
    log_file = JsonLog(log_path) if master_process else None

    def log(record):
        if master_process:
            try:
                log_file.append(record)
            except OSError as e:
                raise SystemExit(f"error: {e}; {ckpt_path} holds the last checkpoint") from None

    def save(path, step, full=True):  # every process calls it; rank 0 writes
        """The run at `step`: the model and, with full=True, all a resume needs."""
        state = {'model_args': model_args, 'config': config, 'iter_num': step,
                 'tokenizer_pieces': tok.pieces_hash(), 'best_voc': best_voc,
                 'started_from': started_from, 'time': time.time() - clock_start}
        if full:
            state.update(data_position=list(data_position), bad_images=bad_images.count,
                         train_subset=train_subset)
        training = (lookahead, scaler, nonfinite) if full else ()
        with one_line_errors():  # never a diverged one, never half a file
            save_checkpoint(path, raw_model, state, *training)
        print0(f"iter {step}: saved {path}")
        log({'event': 'checkpoint', 'iter': step, 'path': path})

    def due(interval, it):  # at every interval-th iteration of this run (0: none), and the last
        return it > start_iter and (it == max_iters or (interval > 0 and it % interval == 0))

    # ------------------------------------------------------------------------------------------
    # the loop: evaluations and checkpoints first, on their schedule (their time is not part of
    # ms/iter), then the training step, then the log
    stream = train_batches.stream(*data_position)
    start_iter = iter_num
    log({'event': 'resume' if start_iter else 'start', 'iter': start_iter,
         'world_size': ddp_world_size})
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # checked at log and save time
    window_time, window_steps, run_time, run_steps = 0.0, 0, 0.0, 0
    run_start = time.time()
    clock_start = run_start - time_before  # for the log's and checkpoint's 'time'
    stop = StopSignals(out_dir, ckpt_path, master_process)  # SIGTERM, SIGINT, SIGUSR1: save, stop
    for iter_num in range(start_iter, max_iters + 1):
        stopping = stop.agreed(iter_num, log_interval, device)
        try:  # an evaluation whose images went bad raises on every process: saved, then stopped
            if val_set is not None and not stopping and due(eval_interval, iter_num):
                line, record = image_gap(iter_num, raw_model, val_loader, autocast, seed,
                                         bad_images, f'{data_root}/val2017')
                print0(line)
                log(record)
            if voc_root and not stopping and due(voc_interval, iter_num):
                voc, line, record = voc_map(iter_num, raw_model, voc_root, image_size, micro_batch,
                                            num_workers, best_voc)
                if master_process:
                    if voc > best_voc['map']:
                        best_voc = {**best_voc, 'map': voc, 'iter': iter_num}
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

        # --------------------------------------------------------------------------------------
        # training step
        t0 = time.perf_counter()
        lr_mult = warmup_cosine(iter_num, warmup_iters, max_iters)
        for group in lookahead.param_groups:
            group['lr'] = group['base_lr'] * lr_mult
        loss_sum = torch.zeros(1 + len(part_names), device=device)  # loss, its terms
        for micro_step in range(gradient_accumulation_steps):
            data_position, (images, tokens, errors) = next(stream)
            with one_line_errors():
                bad_images.add(errors)
            if images is None:
                raise SystemExit(f"error: no image of a batch could be read; last: {errors[-1]}")
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
        if step % log_interval and step != max_iters:  # not a log step: count its time, go on
            window_time, window_steps = window_time + time.perf_counter() - t0, window_steps + 1
            continue

        # --------------------------------------------------------------------------------------
        # logging, every log_interval steps: this step's losses, the mean time of the last steps
        losses = loss_sum / gradient_accumulation_steps
        if ddp:  # a cappa mode that drew no caption on some process is NaN in the mean: shown '-'
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
        loss_value, *terms = losses.tolist()  # waits for the device: the window's time is honest
        if nonfinite.item():
            raise SystemExit(f"error: non-finite loss ({loss_value}) by iteration {step}; "
                             f"{kept_checkpoints(ckpt_path)}")
        window_time, window_steps = window_time + time.perf_counter() - t0, window_steps + 1
        ms = 1000 * window_time / window_steps
        if step - start_iter > log_interval:  # the first window holds warm-up and compilation
            run_time, run_steps = run_time + window_time, run_steps + window_steps
        window_time, window_steps = 0.0, 0
        images_per_s = batch_size * 1000 / ms
        mfu = flops * images_per_s / (peak_tflops * 1e12 * ddp_world_size) \
            if flops and run_steps else None
        eta_s = (run_time / run_steps if run_steps else ms / 1000) * (max_iters - step)
        # NaN: that term drew no caption in this step
        terms = {n: None if math.isnan(v) else v for n, v in zip(part_names, terms)}
        terms_text = ' '.join(f"{n} {'-' if v is None else f'{v:.3f}'}" for n, v in terms.items())
        print0(f"iter {step}/{max_iters} | loss {loss_value:.3f} ({terms_text}) | lr cnn "
               f"{cnn_lr * lr_mult:.2e} head {lr * lr_mult:.2e} | gnorm {grad_norm.item():.2f} | "
               f"{ms:.0f}ms | {images_per_s:.0f} img/s | mfu "
               f"{'-' if mfu is None else f'{mfu:.1%}'} | mem {peak_memory_gb(device):.1f}G | "
               f"eta {int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m")
        log({'event': 'train', 'iter': step, 'loss': loss_value,
             **{f'loss_{n}': v for n, v in terms.items()}, 'lr_cnn': cnn_lr * lr_mult,
             'lr_head': lr * lr_mult, 'grad_norm': grad_norm.item(), 'ms': ms,
             'img_s': images_per_s, 'mem_gb': peak_memory_gb(device),
             'time': time.time() - clock_start})

    steps = iter_num - start_iter
    if steps and master_process:
        mean_ms = 1000 * run_time / run_steps if run_steps else \
            1000 * (time.time() - run_start) / steps
        print0(f"done: {steps} iterations in {time.time() - run_start:.0f}s; {mean_ms:.0f} ms/iter "
               f"and {batch_size * 1000 / mean_ms:.1f} img/s after the first {log_interval}; peak "
               f"memory {peak_memory_gb(device):.2f}G; {bad_images.count} images skipped")
    if ddp:
        # rank 0 may still be writing the last checkpoint: a rank leaving early aborts the others
        dist.barrier()
        dist.destroy_process_group()
    if stopping:
        stop.exit(stopping, iter_num, trained=iter_num > start_iter or start_iter > 0)


if __name__ == '__main__':
    configure(globals())
    main()

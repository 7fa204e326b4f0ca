"""
Pretrain VirTex: a ResNet plus forward and backward caption decoders, trained from scratch on COCO captions.

  CPU demo (minutes):  python train.py config/shapes.py
  one GPU:             python train.py config/virtex_r50_l1_h2048.py
  8 GPUs:              torchrun --standalone --nproc_per_node=8 train.py config/virtex_r50_l1_h2048.py
  several machines:    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
  resume:              python train.py config/shapes.py --init_from=resume

Reads <data_root>/ (COCO layout: train2017/, val2017/, annotations/captions_{train,val}2017.json) and
<tokenizer> (a .model from tokenizer.py); writes <out_dir>/ckpt.pt and <out_dir>/log.jsonl.
The defaults are the paper's best run (R-50, L1, H2048, batch 256, 500k iterations).
"""

import json
import math
import os
import re
import resource
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from configurator import config_keys, configure
from model import VirTex, VirTexConfig, load_file
from tokenizer import Tokenizer, read_coco_split

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
bidirectional = True          # False: forward captioning only (an ablation in the paper)
norm_first = False            # post-norm Transformer layers, as in the paper
zero_init_residual = True     # each ResNet block starts as the identity, as in the paper
# data
image_size = 224              # random-resized-crop size
min_crop_scale = 0.2          # random-resized-crop keeps (min_crop_scale, 1) of the image area
batch_size = 256              # global; each of N processes gets batch_size // N (paper: 8 x 32)
gradient_accumulation_steps = 1  # micro-batches per step per process, when a GPU can't hold its share
num_workers = 4               # DataLoader workers per process
max_bad_images = 100          # unreadable images are skipped and counted; the run stops past this many
# optimization
max_iters = 500_000
warmup_iters = 10_000         # linear warmup from 0, then cosine decay to 0 at max_iters
cnn_lr = 0.2                  # SGD lr for the backbone (upstream OPTIM.CNN_LR)
lr = 0.001                    # SGD lr for the textual head (upstream OPTIM.LR)
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
choices = {'init_from': ('scratch', 'resume'), 'dtype': ('auto', 'float32', 'bfloat16', 'float16')}
for key, allowed in choices.items():
    if config[key] not in allowed:
        raise SystemExit(f"error: --{key}={config[key]!r}: choose one of {', '.join(allowed)}")
for key in ('batch_size', 'max_iters', 'image_size', 'log_interval', 'gradient_accumulation_steps', 'lookahead_k'):
    if config[key] <= 0:
        raise SystemExit(f"error: --{key}={config[key]} must be positive")

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
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def print0(*args):
    if master_process:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# data: COCO captions

def swap_left_right(caption):
    """'a cat left of a dog' -> 'a cat right of a dog'; whole words only: 'bright', 'leftover' stay."""
    return re.sub(r'\b(left|right)\b', lambda m: 'right' if m.group(1).lower() == 'left' else 'left',
                  caption, flags=re.IGNORECASE)


class CocoCaptions(Dataset):
    """Images of one COCO split with their captions; an item is one image and one of its captions.

    Items are addressed by (epoch, index): the random crop, flip, color jitter and caption choice are
    drawn from a generator seeded with (seed, epoch, index), so they do not depend on the number of
    workers and a resumed run sees exactly the batches an unbroken run would have seen.
    """

    def __init__(self, root, split, tokenizer, image_size, max_len, train, seed, min_crop_scale=0.2):
        self.items = [(path, captions) for _, path, captions in read_coco_split(root, split)]
        if not self.items:
            raise SystemExit(f"error: {root}/annotations/captions_{split}.json: no images with captions")
        self.tokenizer, self.image_size, self.max_len, self.train, self.seed = tokenizer, image_size, max_len, train, seed
        self.min_crop_scale = min_crop_scale

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key
        path, captions = self.items[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        caption = captions[rng.integers(len(captions))] if self.train else captions[0]
        try:
            with Image.open(path) as image:
                image = self.augment(image, rng) if self.train else self.center(image)
        except Exception as e:  # a corrupt or missing file must not end a long run: report and skip it
            return {'error': f"{path}: {str(e) or type(e).__name__}"}
        if self.train and rng.random() < 0.5:
            # flipping the image makes "left" wrong, so swap left/right words in the caption too
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            caption = swap_left_right(caption)
        if self.train and rng.random() < 0.8:
            image = self.color_jitter(image, rng)
        ids = self.tokenizer.encode(caption)[:self.max_len - 2]  # drop words, never [EOS]
        tokens = [self.tokenizer.sos_id, *ids, self.tokenizer.eos_id]
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S) uint8
        return {'image': pixels, 'tokens': torch.tensor(tokens)}

    def augment(self, image, rng):
        """Random resized crop: area scale (min_crop_scale, 1), aspect ratio (3/4, 4/3), as torchvision draws it.
        JPEG draft mode decodes at 1/2, 1/4 or 1/8 size when the crop keeps >= image_size pixels."""
        W, H = image.size
        for _ in range(10):
            area = W * H * rng.uniform(self.min_crop_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= W and 0 < h <= H:
                left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
                break
        else:  # fall back to a central crop of the whole image
            w, h = W, H
            left, top = 0, 0
        return self.resize(image, (left, top, left + w, top + h), min(w, h))

    def center(self, image):
        """Resize the shorter side to image_size * 8/7 (256 for 224), then center crop image_size."""
        W, H = image.size
        side = min(W, H) * self.image_size / round(self.image_size * 8 / 7)  # crop side in source pixels
        left, top = (W - side) / 2, (H - side) / 2
        return self.resize(image, (left, top, left + side, top + side), side)

    def resize(self, image, box, crop_side):
        W, H = image.size
        reduce = crop_side / self.image_size
        if image.format == 'JPEG' and reduce >= 2:
            image.draft('RGB', (math.ceil(W / reduce), math.ceil(H / reduce)))
        sx, sy = image.size[0] / W, image.size[1] / H  # draft may have shrunk the decoded image
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        return image.convert('RGB').resize((self.image_size,) * 2, Image.Resampling.BILINEAR, box=box)

    @staticmethod
    def color_jitter(image, rng):
        # brightness/contrast/saturation 0.4 and hue 0.1, in random order; hue kept small because
        # captions name colors, and a large hue shift would make them false
        b, c, s = rng.uniform(0.6, 1.4, size=3)
        hue = rng.uniform(-0.1, 0.1)
        ops = [lambda x: TF.adjust_brightness(x, b), lambda x: TF.adjust_contrast(x, c),
               lambda x: TF.adjust_saturation(x, s), lambda x: TF.adjust_hue(x, hue)]
        for i in rng.permutation(4):
            image = ops[i](image)
        return image


def collate(samples):
    """Stack images, right-pad captions with 0 to the longest in the batch; pass load errors on."""
    good = [s for s in samples if 'error' not in s]
    errors = [s['error'] for s in samples if 'error' in s]
    if not good:
        return None, None, errors
    tokens = torch.zeros(len(good), max(len(s['tokens']) for s in good), dtype=torch.long)
    for row, s in zip(tokens, good):
        row[:len(s['tokens'])] = s['tokens']
    return torch.stack([s['image'] for s in good]), tokens, errors


for path, what in ((data_root, 'data_root'), (tokenizer, 'tokenizer')):
    if not os.path.exists(path):
        raise SystemExit(f"error: {what}={path}: no such file or folder")
tok = Tokenizer(tokenizer)
train_set = CocoCaptions(data_root, 'train2017', tok, image_size, max_len, train=True, seed=seed,
                         min_crop_scale=min_crop_scale)
val_set = CocoCaptions(data_root, 'val2017', tok, image_size, max_len, train=False, seed=seed) if eval_interval else None
# the sampler shuffles with (seed, epoch); each process takes every N-th index of the permutation
sampler = DistributedSampler(train_set, ddp_world_size, ddp_rank, shuffle=True, seed=seed, drop_last=True)
batches_per_epoch = len(sampler) // micro_batch
if batches_per_epoch == 0:
    raise SystemExit(f"error: {len(train_set)} training images are fewer than one batch of {micro_batch} per process")
loader_args = dict(batch_size=micro_batch, num_workers=num_workers, collate_fn=collate, drop_last=True,
                   pin_memory=device_type == 'cuda', persistent_workers=False)


def batch_stream(epoch, batch):
    """Yield ((epoch, batches done in it), (images, tokens, errors)) forever, from a given position."""
    while True:
        sampler.set_epoch(epoch)
        keys = [(epoch, i) for i in list(sampler)[batch * micro_batch:]]
        # a private generator: creating a loader must not draw from the global RNG (dropout uses it)
        loader = DataLoader(train_set, sampler=keys, generator=torch.Generator().manual_seed(seed), **loader_args)
        for batch, data in enumerate(loader, start=batch + 1):
            yield (epoch, batch), data
        epoch, batch = epoch + 1, 0


# ----------------------------------------------------------------------------------------------
# model and optimizer

class LookAhead:
    """LookAhead (Zhang et al., 2019) around an inner optimizer: every k steps the slow weights move
    alpha of the way to the fast weights, and the fast weights restart from the slow ones.
    Unlike upstream, state_dict() holds the slow weights and the step counter: exact resume."""

    def __init__(self, optimizer, k=5, alpha=0.5):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.step_count = 0
        self.slow = [p.detach().clone() for p in self.params()]

    @property
    def param_groups(self):  # GradScaler unscales and clips through this
        return self.optimizer.param_groups

    def params(self):
        return [p for group in self.optimizer.param_groups for p in group['params']]

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self):
        self.optimizer.step()
        self.step_count += 1
        if self.step_count % self.k == 0:
            for slow, fast in zip(self.slow, self.params()):
                slow.lerp_(fast, self.alpha)  # slow += alpha * (fast - slow)
                fast.copy_(slow)

    def state_dict(self):
        return {'optimizer': self.optimizer.state_dict(), 'slow': self.slow, 'step_count': self.step_count}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state['optimizer'])
        for slow, saved in zip(self.slow, state['slow']):
            slow.copy_(saved)
        self.step_count = state['step_count']


model_args = dict(visual=visual, vocab_size=len(tok), n_layer=n_layer, n_embd=n_embd, n_head=n_head, max_len=max_len,
                  dropout=dropout, bidirectional=bidirectional, norm_first=norm_first, zero_init_residual=zero_init_residual,
                  pad_id=tok.pad_id, sos_id=tok.sos_id, eos_id=tok.eos_id)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
ckpt = None
if init_from == 'resume':
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"error: --init_from=resume: {ckpt_path} does not exist")
    ckpt = load_file(ckpt_path)
    changed = [f"{k}={ckpt['model_args'].get(k)!r} in the checkpoint, {v!r} now" for k, v in model_args.items()
               if ckpt['model_args'].get(k) != v]
    if changed:
        raise SystemExit(f"error: {ckpt_path}: the model differs from the config: {'; '.join(changed)}")
torch.manual_seed(seed)  # the same initial weights on every process (DDP also broadcasts rank 0's)
model = VirTex(VirTexConfig(**model_args))
if ckpt is not None:
    model.load_state_dict(ckpt['model'])
# channels_last: cuDNN and oneDNN convolutions both run faster on NHWC (4x on a 2-core CPU for R-18 at 64 px)
model = model.to(device, memory_format=torch.channels_last)
raw_model = model  # the plain module: its state_dict is what checkpoints hold
flops_per_image = raw_model.flops_per_image(image_size) if device_type == 'cuda' else None
torch.manual_seed(seed + ddp_rank)  # a different dropout stream per process

groups = model.param_groups(weight_decay, cnn_lr, lr)
for group in groups:
    group['base_lr'] = group['lr']  # get_lr returns a multiplier: we have two base lrs
sgd = torch.optim.SGD(groups, lr=lr, momentum=momentum, **({'fused': True} if device_type == 'cuda' else {'foreach': True}))
optimizer = LookAhead(sgd, lookahead_k, lookahead_alpha)
scaler = torch.amp.GradScaler(device_type, enabled=dtype == 'float16')
iter_num, data_position, bad_images = 0, (0, 0), 0
if ckpt is not None:
    settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt['optimizer'])
    for group, setting in zip(optimizer.param_groups, settings):
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
print0(f"model: {visual} L{n_layer} H{n_embd}, {params['visual'] / 1e6:.1f}M backbone + {params['textual'] / 1e6:.1f}M "
       f"textual parameters; vocabulary {len(tok)}")
print0(f"data: {len(train_set):,} training images, {batches_per_epoch} steps per epoch; {ddp_world_size} process(es) "
       f"x {gradient_accumulation_steps} micro-batches x {micro_batch} = {batch_size} images per iteration; "
       f"{max_iters * batch_size / len(train_set):.1f} epochs in all; {device} {dtype}")


def get_lr(it):
    """LR multiplier at iteration it: linear warmup from 0, then cosine decay to 0 (upstream's schedule)."""
    if it < warmup_iters:
        return it / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


MEAN = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255


def to_device(images, tokens):
    """uint8 images leave the workers (4x less to copy) and are normalized on the device."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return (images.float() - MEAN) / STD, tokens.to(device, non_blocking=True)


@torch.no_grad()
def estimate_val_loss():
    raw_model.eval()
    val_sampler = DistributedSampler(val_set, ddp_world_size, ddp_rank, shuffle=False)
    keys = [(0, i) for i in val_sampler][:eval_iters * micro_batch]
    loader = DataLoader(val_set, sampler=keys, generator=torch.Generator(), **{**loader_args, 'drop_last': False})
    totals = torch.zeros(3, device=device)  # loss, fwd, bwd summed over batches
    for images, tokens, _ in loader:
        if images is None:
            continue
        with autocast:
            loss, parts = raw_model(*to_device(images, tokens))
        totals += torch.stack([loss, parts['fwd'], parts.get('bwd', torch.zeros_like(loss))]).float()
    n = torch.tensor(float(len(loader)), device=device)
    if ddp:
        dist.all_reduce(totals), dist.all_reduce(n)
    raw_model.train()
    return (totals / n.clamp(min=1)).tolist()


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
        val_loss, val_fwd, val_bwd = estimate_val_loss()
        print0(f"iter {iter_num}: val loss {val_loss:.4f} (fwd {val_fwd:.3f} bwd {val_bwd:.3f})")
        log({'event': 'val', 'iter': iter_num, 'loss': val_loss, 'loss_fwd': val_fwd, 'loss_bwd': val_bwd})
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
            checkpoint = {'model': raw_model.state_dict(), 'model_args': model_args, 'optimizer': optimizer.state_dict(),
                          'scaler': scaler.state_dict(), 'iter_num': iter_num, 'data_position': list(data_position),
                          'bad_images': bad_images, 'rng_state': rng_states, 'cuda_rng_state': cuda_rng_states,
                          'config': config}
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
    for group in optimizer.param_groups:
        group['lr'] = group['base_lr'] * lr_mult
    loss_sum = torch.zeros(3, device=device)
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
        loss_sum += torch.stack([loss.detach(), parts['fwd'], parts.get('bwd', torch.zeros_like(parts['fwd']))]).float()
    nonfinite |= ~torch.isfinite(loss_sum[0])
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float('inf'))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # ------------------------------------------------------------------------------------------
    step = iter_num + 1
    if step % log_interval == 0 or step == max_iters:
        losses = loss_sum / gradient_accumulation_steps
        if ddp:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        loss_value, loss_fwd, loss_bwd = losses.tolist()  # .tolist() waits for the device: dt is honest
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
        print0(f"iter {step}/{max_iters} | loss {loss_value:.3f} (fwd {loss_fwd:.3f} bwd {loss_bwd:.3f}) | "
               f"lr {cnn_lr * lr_mult:.4f} | gnorm {grad_norm.item():.2f} | {ms:.0f}ms | {images_per_s:.0f} img/s | "
               f"mfu {mfu} | mem {memory_gb():.1f}G | eta {int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m")
        log({'event': 'train', 'iter': step, 'loss': loss_value, 'loss_fwd': loss_fwd, 'loss_bwd': loss_bwd,
             'lr': cnn_lr * lr_mult, 'grad_norm': grad_norm.item(), 'ms': ms, 'img_s': images_per_s,
             'mem_gb': memory_gb(), 'time': time.time() - run_start})
        window_time, window_iters = 0.0, 0

if step_times:
    last = step_times[-20:]
    print0(f"done: {len(step_times)} iterations in {time.time() - run_start:.0f}s; mean {1000 * sum(last) / len(last):.0f} "
           f"ms/iter over the last {len(last)}; {batch_size * len(last) / sum(last):.1f} img/s; "
           f"peak memory {memory_gb():.2f}G; {bad_images} images skipped")
if ddp:
    dist.destroy_process_group()

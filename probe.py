"""
The linear probe, the paper's ImageNet protocol: a frozen backbone and one new linear layer trained
on an ImageFolder layout (ROOT/train/<class>/*, ROOT/val/<class>/*, as ImageNet and iNaturalist are
usually laid out).

  python probe.py --data_root=data/shapes/imagefolder --ckpt=out/demo_seed0/ckpt.pt
  python probe.py --data_root=data/shapes/imagefolder --init=random --visual=resnet18 \
      --image_size=64 --zero_init_residual=False
  # any evaluate.py source
  python probe.py --data_root=PATH/imagenet --init=moco:moco_v2_800ep_pretrain.pth.tar

The protocol (official scripts/clf_linear.py and configs/downstream/imagenet_clf.yaml): the backbone
frozen and in eval mode (its BatchNorm statistics fixed); a new fc on layer4's global average pool,
weights N(0, 0.01), bias 0; SGD, momentum 0.9, lr 0.3, no weight decay, batch 256, cosine decay to 0
over the run, no warmup, 100 epochs on ImageNet. Train images: random resized crop, scale (0.08, 1),
and a horizontal flip; val images: the eval transform of every stage (shorter side round(S*8/7),
center crop S). Reports top-1 and, with 5 classes or more, top-5.
--augment=False trains on the val transform's features of the training images, extracted once and
kept in memory: much faster, not the paper's protocol. --finetune=True trains the whole backbone
with the new layer instead (the paper's iNaturalist and detection transfers fine-tune): the same
augmentation and schedule, the backbone in train mode at its own lower learning rate
(--backbone_lr), BatchNorm statistics updating. Unreadable images are skipped and counted, up to
max_bad_images.
"""

import json
import os
import time
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from coco import BadImages, EpochKeys, random_box, random_resized_crop
from configurator import DEVICE, NON_NEGATIVE, POSITIVE, Interval, Needs, configure
from evaluate import (IMAGE_EXTENSIONS, judged_backbone, load_eval_image, normalize,
                      to_uint8_tensor)
from lookahead import warmup_cosine
from safety import check_outputs, one_line_errors, write_atomically

# ----------------------------------------------------------------------------------------------
data_root = 'data/shapes/imagefolder'  # has train/<class>/ and val/<class>/
ckpt = ''               # this project's checkpoint, or --init:
# 'random' | 'torchvision:PATH' | 'virtex:PATH' | 'moco:PATH' | 'vissl:PATH', as evaluate.py
init = ''
visual = 'resnet50'     # for --init=random|torchvision:
zero_init_residual = True  # for --init=random
image_size: NON_NEGATIVE = 0  # 0: the checkpoint's training image size, else 224
epochs: POSITIVE = 100  # passes over the training images (the paper's, on ImageNet)
batch_size: POSITIVE = 256  # images per SGD step
lr: POSITIVE = 0.3      # of the new fc, decaying to 0 by a cosine
momentum: Annotated[float, Interval('[0, 1)')] = 0.9  # SGD's
weight_decay: NON_NEGATIVE = 0.0  # none, as the official probe
# False: fixed val-transform features of the training images (fast, not the protocol)
augment = True
# True: train the whole backbone too (at backbone_lr), not only the new fc; its features change
finetune: Annotated[bool, Needs('augment', True)] = False
backbone_lr: NON_NEGATIVE = 0.01  # --finetune: the backbone's SGD lr (the new fc keeps --lr)
num_workers: NON_NEGATIVE = min(4, os.cpu_count() or 1)  # DataLoader processes decoding images
max_bad_images: NON_NEGATIVE = 100  # unreadable images are skipped; refused past this many
device: DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'  # cpu, cuda, cuda:1, ...
seed = 0                # the fc init, the batch order and the augmentation (and --init=random)
log_interval: POSITIVE = 20  # iterations between progress lines
out_json = ''           # also write the result here
# ----------------------------------------------------------------------------------------------


def read_imagefolder(root: str, split: str) -> tuple[list[str], list[int], list[str]]:
    """(image paths, their class indices, the class names, sorted) of ROOT/<split>/<class>/*."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder (expected ROOT/train/<class>/ and "
                         "ROOT/val/<class>/)")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise ValueError(f"{folder}: no class folders")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(folder, name))
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"{os.path.join(folder, name)}: no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        paths += [os.path.join(folder, name, f) for f in files]
        labels += [c] * len(files)
    return paths, labels, classes


class FolderImages(torch.utils.data.Dataset):
    """Item (epoch, index) -> (uint8 (3, S, S), label, error or ''); augmentation seeded by (seed,
    epoch, index)."""

    def __init__(self, paths, labels, size, train, seed):
        self.paths, self.labels, self.size, self.train, self.seed = paths, labels, size, train, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        epoch, i = key
        try:
            if not self.train:
                return to_uint8_tensor(
                    load_eval_image(self.paths[i], self.size)), self.labels[i], ''
            rng = np.random.default_rng([self.seed, epoch, i])
            with Image.open(self.paths[i]) as image:
                pixels = random_resized_crop(image, random_box(*image.size, rng, 0.08), self.size)
            return (pixels.flip(-1) if rng.random() < 0.5 else pixels), self.labels[i], ''
        except Exception as e:
            return torch.zeros(3, self.size, self.size,
                               dtype=torch.uint8), -1, f"{self.paths[i]}: cannot read image ({e})"


def loader(dataset, keys, batch_size, num_workers):
    """A DataLoader over the keys' items whose workers live as long as it does."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=keys,
                                       num_workers=num_workers, persistent_workers=num_workers > 0)


def batches(data_loader, bad: BadImages):
    """Yield (uint8 images, labels) of the readable images, counting the unreadable ones in
    `bad`."""
    for images, labels, errors in data_loader:
        bad.add([e for e in errors if e])
        ok = labels >= 0
        if ok.any():
            yield images[ok], labels[ok]


def pooled(backbone, images, device):
    """(B, 3, S, S) uint8 -> (B, D): the global average pool, unnormalised as in the official
    probe (with gradients only where the backbone trains)."""
    return backbone(
        normalize(images.to(device)).contiguous(memory_format=torch.channels_last)).float()


def readable(done, split):
    """`done` (what the readable images of a split gave), refused if empty: every image failed."""
    if not done:
        raise ValueError(f"{os.path.join(data_root, split)}: no image could be read (see the "
                         "warnings)")
    return done


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose label is among the k highest logits."""
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()


def main():
    if out_json and not os.path.isdir(os.path.dirname(os.path.abspath(out_json))):
        raise SystemExit(f"error: {out_json}: its folder does not exist")
    check_outputs({'out_json': out_json}, {'--ckpt': ckpt, '--init': init.partition(':')[2],
                                           '--data_root': data_root})
    if finetune and batch_size < 2:
        raise ValueError(f"--finetune=True trains the backbone's BatchNorm, which needs batches of "
                         f"2 images or more: raise --batch_size={batch_size}")
    train_paths, train_labels, classes = read_imagefolder(data_root, 'train')
    val_paths, val_labels, val_classes = read_imagefolder(data_root, 'val')
    if val_classes != classes:
        only = sorted(set(classes) ^ set(val_classes))
        raise ValueError(f"{data_root}: train and val have different classes (e.g. {only[0]!r} is "
                         "in only one)")
    backbone, arch, size = judged_backbone(ckpt, init, visual, image_size, seed, zero_init_residual)
    backbone = backbone.to(device, memory_format=torch.channels_last).eval()
    with torch.no_grad():
        width = backbone(torch.zeros(1, 3, size, size, device=device)).shape[1]
    # frozen: eval mode, BatchNorm statistics fixed; fine-tuned: train mode, every weight learns
    backbone.train(finetune)
    for p in backbone.parameters():
        p.requires_grad_(finetune)
    torch.manual_seed(seed)
    fc = nn.Linear(width, len(classes)).to(device)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    groups = [{'params': list(fc.parameters()), 'lr': lr}]
    if finetune:
        groups.append({'params': list(backbone.parameters()), 'lr': backbone_lr})
    for group in groups:
        group['base_lr'] = group['lr']
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = len(train_paths) // batch_size or 1
    total_steps = epochs * steps_per_epoch
    print(f"{len(train_paths)} train and {len(val_paths)} val images, {len(classes)} classes; "
          f"{arch} at {size}px, {'fine-tuned' if finetune else 'frozen'}; {epochs} epochs x "
          f"{steps_per_epoch} steps of {batch_size}; "
          f"{'augmented' if augment else 'fixed features'}")
    bad = BadImages(max_bad_images)
    train_keys = EpochKeys((0, i) for i in range(len(train_paths)))
    train_loader = loader(FolderImages(train_paths, train_labels, size, train=augment, seed=seed),
                          train_keys, batch_size, num_workers)
    if not augment:  # the features never change: compute them once
        with torch.no_grad():
            pairs = [(pooled(backbone, x, device), y) for x, y in batches(train_loader, bad)]
        feats, labels = zip(*readable(pairs, 'train'))
        cached = torch.cat(feats), torch.cat(labels).to(device)
        steps_per_epoch = len(cached[0]) // batch_size or 1  # readable images only
        total_steps = epochs * steps_per_epoch
    order = torch.Generator().manual_seed(seed)
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        permutation = torch.randperm(len(cached[0]) if not augment else len(train_paths),
                                     generator=order).tolist()
        if augment:
            train_keys.keys = [(epoch, i) for i in permutation[:steps_per_epoch * batch_size]]
            # a frozen backbone's parameters need no gradient: no graph is kept
            stream = ((pooled(backbone, x, device), y.to(device))
                      for x, y in batches(train_loader, bad))
        else:
            stream = ((cached[0][permutation[i:i + batch_size]],
                       cached[1][permutation[i:i + batch_size]])
                      for i in range(0, steps_per_epoch * batch_size, batch_size))
        for features, labels in stream:
            for group in optimizer.param_groups:  # cosine from lr to 0 over the run, per step
                group['lr'] = group['base_lr'] * warmup_cosine(step, 0, total_steps)
            loss = F.cross_entropy(fc(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % log_interval == 0 or step == total_steps:
                eta = (time.time() - t0) / step * (total_steps - step)
                print(f"epoch {epoch + 1}/{epochs} | step {step}/{total_steps} | loss "
                      f"{loss.item():.4f} | lr {optimizer.param_groups[0]['lr']:.4f} | eta "
                      f"{int(eta // 60)}m{int(eta % 60):02d}s", flush=True)

    readable(range(step), 'train')  # a layer that took no step has learned nothing
    del train_loader  # its workers
    backbone.eval()
    val_loader = loader(FolderImages(val_paths, val_labels, size, train=False, seed=seed),
                        EpochKeys((0, i) for i in range(len(val_paths))), batch_size, num_workers)
    with torch.no_grad():
        pairs = [(fc(pooled(backbone, x, device)).cpu(), y) for x, y in batches(val_loader, bad)]
    logits, labels = zip(*readable(pairs, 'val'))
    logits, labels = torch.cat(logits), torch.cat(labels)
    result = {'top1': round(100 * accuracy(logits, labels, 1), 2), 'classes': len(classes),
              'train_images': len(train_paths), 'val_images': len(labels), 'epochs': epochs,
              'augment': augment, 'finetune': finetune, 'skipped_images': bad.count,
              'source': ckpt or init,
              'minutes': round((time.time() - t0) / 60, 2)}
    if len(classes) >= 5:
        result['top5'] = round(100 * accuracy(logits, labels, 5), 2)
    if out_json:
        write_atomically(out_json, lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"probe done in {result['minutes']:.1f} min; {bad.count} images skipped")
    if 'top5' in result:
        print(f"top-5: {result['top5']:.2f}")
    print(f"top-1: {result['top1']:.2f}")


if __name__ == '__main__':
    configure(globals())
    with one_line_errors():
        main()

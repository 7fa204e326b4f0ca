"""
Images and captions in the COCO layout, and the image transforms every stage shares.

    from coco import (CocoCaptions, collate, read_coco_split, read_instances, load_eval_image,
                      normalize)
    data = CocoCaptions('data/coco', 'train2017', tokenizer, image_size=224, max_len=30,
                        train=True, seed=0)
    # {'image': (3, S, S) uint8, 'tokens': (T,) long}, or {'error': '...'}
    sample = data[(epoch, index)]
    # for the multilabel pretext: CocoCaptions(..., labels=labels)
    names, labels = read_instances('data/coco', 'train2017')
    # shorter side to 256, center 224 crop: train.py's val, evaluate.py's VOC features and
    # caption.py all use it
    image = load_eval_image('photo.jpg', 224)

Train augmentation (augment.py), as in the paper: random resized crop (area scale (0.2, 1), aspect
ratio (3/4, 4/3)), horizontal flip with p=0.5 that swaps the words left/right in the caption, colour
jitter (brightness, contrast, saturation 0.4, hue 0.1) with p=0.8; the crop's smallest scale and the
jitter's probability are arguments. Every random choice of an item comes from a generator seeded
with (seed, epoch, index), so batches do not depend on the number of workers and a resumed run sees
exactly the batches an unbroken one would. With decode_on_device the workers only read each JPEG and
draw its choices, and TrainBatches decodes and augments the batch on the training device. Images
stay uint8 until the device (`normalize`). Errors are ValueError / OSError naming the file; a sample
that fails to decode is returned as {'error': ...} for the caller to count.
"""

import json
import os
import re

import numpy as np
import torch
from PIL import Image

from augment import (color_jitter, decode_and_augment, draw_jitter, jpeg_bytes, random_box,
                     random_resized_crop, resize_box, to_uint8_tensor)
from tokenizer import read_coco_captions

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PIL reads these
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm', '.pgm', '.tif',
                    '.tiff', '.webp')


def read_coco_split(root: str, split: str) -> list[tuple[int, str, list[str]]]:
    """(image id, image path, its captions) for each captioned image of a COCO-layout split, by id:
    <root>/annotations/captions_<split>.json and <root>/<split>/."""
    files, captions = read_coco_captions(os.path.join(root, 'annotations',
                                                      f'captions_{split}.json'))
    return [(i, os.path.join(root, split, files[i]), captions[i]) for i in sorted(captions)
            if i in files]


def read_instances(root: str, split: str,
                   taught: str = '') -> tuple[list[str], dict[int, list[int]]]:
    """COCO instance annotations, <root>/annotations/instances_<split>.json, as (category names in
    file order, {image id: its distinct category indices, sorted}). Indices run 1..K in file order,
    0 being background / padding (upstream's numbering: 81 outputs for COCO's 80 categories). Images
    without instances are absent from the dict (upstream drops them); the file's images must be
    those of captions_<split>.json. taught: comma-separated names; if given, only these categories
    are labels (the rest are never named; images left with none are absent too)."""
    path = os.path.join(root, 'annotations', f'instances_{split}.json')
    try:
        with open(path) as f:
            data = json.load(f)
        index = {c['id']: i + 1 for i, c in enumerate(data['categories'])}
        names = [c['name'] for c in data['categories']]
        image_ids = {image['id'] for image in data['images']}
        labels = {}
        for a in data['annotations']:
            if a['category_id'] not in index:
                raise ValueError(f"{path}: annotation {a.get('id')} has category_id "
                                 f"{a['category_id']}, not in categories")
            if a['image_id'] not in image_ids:
                raise ValueError(f"{path}: annotation {a.get('id')} is of image {a['image_id']}, "
                                 "not in images")
            labels.setdefault(a['image_id'], set()).add(index[a['category_id']])
    except OSError as e:
        raise OSError(f"{path}: {e.strerror}") from None
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
    captioned = {i for i, _, _ in read_coco_split(root, split)}
    if image_ids != captioned:
        only_here, only_there = sorted(image_ids - captioned), sorted(captioned - image_ids)
        raise ValueError(f"{path}: its images are not those of captions_{split}.json "
                         f"({len(only_here)} only here, {len(only_there)} only there; e.g. id "
                         f"{(only_here or only_there)[0]})")
    unknown = [name for name in taught.split(',') if taught and name not in names]
    if unknown:
        raise ValueError(f"{path}: no category named {unknown[0]!r} (it has {', '.join(names)})")
    kept = {names.index(name) + 1 for name in taught.split(',')} if taught else set(index.values())
    return names, {i: sorted(v & kept) for i, v in labels.items() if v & kept}


def swap_left_right(caption: str) -> str:
    """'a cat left of a dog' -> 'a cat right of a dog'; whole words only: 'bright', 'leftover'
    stay."""
    return re.sub(r'\b(left|right)\b',
                  lambda m: 'right' if m.group(1).lower() == 'left' else 'left', caption,
                  flags=re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# the eval transform

def center_box(width: int, height: int, size: int):
    """The eval transform's crop in source pixels: shorter side to round(size * 8/7) (256 for 224),
    center size."""
    side = min(width, height) * size / round(size * 8 / 7)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def load_eval_image(path: str, size: int) -> Image.Image:
    """The eval transform of every stage: decode, shorter side to round(size * 8/7), center crop
    size x size, RGB."""
    with Image.open(path) as image:
        return resize_box(image, center_box(*image.size, size), size)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float, ImageNet mean/std normalized, on the pixels' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std


def to_device(images: torch.Tensor, tokens: torch.Tensor, device):
    """A batch as the model takes it: uint8 images leave the DataLoader workers (4x less to copy)
    and are normalized on the device, channels-last (cuDNN's and oneDNN's faster convolutions)."""
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return normalize(images), tokens.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# the pretraining dataset

class TrainBatches:
    """One process's training batches for a whole run. Each epoch is a permutation seeded by (seed,
    epoch), split over the processes as DistributedSampler splits it, and read by one DataLoader
    whose workers live for the run. stream(epoch, batch) yields ((epoch, batches done in it),
    (images, tokens, errors)) from any position on, forever: a resumed run reads what an unbroken
    one would. With `decode_on` (a device) the JPEGs the workers only read are decoded and
    augmented there: the images arrive on it."""

    def __init__(self, dataset, batch_size, rank, world_size, seed, decode_on=None,
                 **loader_args):
        self.sampler = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True,
                                                           seed=seed, drop_last=True)
        self.batch_size, self.keys, self.decode_on = batch_size, EpochKeys(), decode_on
        self.loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=self.keys,
                                                  drop_last=True, **loader_args)

    def __len__(self):  # per epoch
        return len(self.sampler) // self.batch_size

    def stream(self, epoch, batch):
        while True:
            self.sampler.set_epoch(epoch)
            self.keys.keys = [(epoch, i) for i in list(self.sampler)[batch * self.batch_size:]]
            for batch, (images, tokens, errors) in enumerate(self.loader, start=batch + 1):
                if isinstance(images, list):  # JPEG files: decoded and augmented on the device
                    images, kept, failed = decode_and_augment(images, self.decode_on)
                    tokens, errors = tokens[kept], errors + failed
                yield (epoch, batch), (images, tokens, errors)
            epoch, batch = epoch + 1, 0


class EpochKeys(torch.utils.data.Sampler):
    """A sampler of the (epoch, index) keys of the next pass. Setting .keys before each epoch lets
    one DataLoader, and its persistent workers, serve a whole run: a new loader per epoch starts new
    worker processes every time."""

    def __init__(self, keys=()):
        self.keys = list(keys)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class CocoCaptions(torch.utils.data.Dataset):
    """Images of one COCO split with their captions; an item is one image and one of its captions,
    addressed by (epoch, index) so that its augmentation is a pure function of the key. With
    `labels` ({image id: category indices}, from read_instances), an item's tokens are its image's
    labels instead, and images without labels are left out. With decode_on_device, a training
    item of a JPEG file is {'jpeg', 'box', 'flip', 'jitter', ...}: its bytes and its draws."""

    def __init__(self, root, split, tokenizer, image_size, max_len, train, seed, min_crop_scale=0.2,
                 color_jitter=0.8, labels=None, decode_on_device=False):
        self.items = [(path, captions, None if labels is None else labels[i])
                      for i, path, captions in read_coco_split(root, split)
                      if labels is None or i in labels]
        if not self.items:
            raise ValueError(f"{root}/annotations/captions_{split}.json: no images with captions"
                             + (' and instances' if labels is not None else ''))
        self.root, self.split, self.tokenizer = root, split, tokenizer
        self.image_size, self.max_len, self.train, self.seed = image_size, max_len, train, seed
        self.min_crop_scale, self.color_jitter = min_crop_scale, color_jitter
        self.decode_on_device = decode_on_device

    def __len__(self):
        return len(self.items)

    def keep_fraction(self, fraction, seed):
        """Keep round(fraction * len) of the images, drawn with seed (the same subset on every
        process and on resume); returns the kept indices, sorted, or None when fraction is 1 and all
        stay."""
        if fraction >= 1:
            return None
        draw = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(seed))
        kept = draw[:round(fraction * len(self.items))].sort().values.tolist()
        self.items = [self.items[i] for i in kept]
        return kept

    def __getitem__(self, key):
        epoch, index = key
        path, captions, labels = self.items[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        caption = captions[rng.integers(len(captions))] if self.train else captions[0]
        encode = self.encode if labels is None else lambda caption: torch.tensor(labels)
        try:
            if not self.train:
                return {'image': to_uint8_tensor(load_eval_image(path, self.image_size)),
                        'tokens': encode(caption)}
            with Image.open(path) as image:
                box = random_box(*image.size, rng, self.min_crop_scale)
                # flipping the image makes "left" wrong, so the caption's left/right swap too
                flip = rng.random() < 0.5
                caption = swap_left_right(caption) if flip else caption
                jitter = draw_jitter(rng) if rng.random() < self.color_jitter else None
                if self.decode_on_device and image.format == 'JPEG' and \
                        image.mode in ('RGB', 'L'):
                    return {'jpeg': jpeg_bytes(image), 'box': box, 'flip': flip, 'jitter': jitter,
                            'size': self.image_size, 'path': path, 'tokens': encode(caption)}
                pixels = random_resized_crop(image, box, self.image_size)
        except Exception as e:
            # a corrupt or missing file must not end a long run: report and skip it
            return {'error': f"{path}: {str(e) or type(e).__name__}"}
        pixels = pixels.flip(-1) if flip else pixels
        pixels = color_jitter(pixels, jitter) if jitter is not None else pixels
        return {'image': pixels.contiguous(), 'tokens': encode(caption)}

    def encode(self, caption):
        ids = self.tokenizer.encode(caption)[:self.max_len - 2]  # drop words, never [EOS]
        return torch.tensor([self.tokenizer.sos_id, *ids, self.tokenizer.eos_id])


def pad_tokens(captions, pad_to: int = 0) -> torch.Tensor:
    """Captions of ids (lists or 1-d tensors) right-padded with 0 to the longest (or to pad_to):
    (B, T) long."""
    tokens = torch.zeros(len(captions), max(pad_to, *(len(c) for c in captions)), dtype=torch.long)
    for row, caption in zip(tokens, captions):
        row[:len(caption)] = torch.as_tensor(caption)
    return tokens


def collate(samples, pad_to: int = 0):
    """Stack images, right-pad captions with 0 to the longest in the batch (or to pad_to: one shape
    for every batch, as torch.compile wants); pass load errors on. JPEG files to decode on the
    device stay a list, each one's pixels or its file and draws (augment.decode_and_augment's)."""
    good = [s for s in samples if 'error' not in s]
    errors = [s['error'] for s in samples if 'error' in s]
    if not good:
        return None, None, errors
    tokens = pad_tokens([s['tokens'] for s in good], pad_to)
    if any('jpeg' in s for s in good):
        return [s.get('image', s) for s in good], tokens, errors
    return torch.stack([s['image'] for s in good]), tokens, errors


class BadImages:
    """Counts the images that failed to load, with a warning for each; past `cap` of them, a
    ValueError."""

    def __init__(self, cap: int, count: int = 0):
        self.cap, self.count = cap, count

    def add(self, errors):
        for error in errors:
            self.count += 1
            print(f"warning: skipped {error} ({self.count} skipped so far)", flush=True)
            if self.count > self.cap:
                raise ValueError(f"more than max_bad_images={self.cap} images failed to load; "
                                 f"last: {error}")

"""
COCO-layout captions and instances, the pretraining dataset, its batches and the paper's training
augmentation, run in the DataLoader workers.

    from coco import CocoCaptions, TrainBatches, collate, read_instances, val_batches
    data = CocoCaptions('data/coco', 'train2017', tokenizer, image_size=224, max_len=30,
                        train=True, seed=0)
    sample = data[(epoch, index)]   # {'image': (3, S, S) uint8, 'tokens': (T,) long}, or {'error'}
    names, labels = read_instances('data/coco', 'train2017')  # the multilabel pretext's labels

The augmentation, as in the paper: random resized crop (area scale (min_crop_scale, 1), aspect ratio
(3/4, 4/3)), a horizontal flip with p=0.5 that swaps the words left/right in the caption, colour
jitter (brightness, contrast, saturation 0.4, hue 0.1) with p=0.8. Every random choice of an item
comes from a generator seeded with (seed, epoch, index), always in the same order, so batches do not
depend on the number of workers and a resumed run sees exactly the batches an unbroken one would.
Validation images take the eval transform every stage shares (evaluate.py's). Images stay uint8
until the device (`to_device`). With decode_on_device the workers only read each JPEG and draw its
choices, and gpu_augment.py decodes and augments the whole batch on the training device.
CPU speed: a JPEG whose crop keeps at least twice the output size is decoded at 1/2, 1/4 or 1/8
scale by libjpeg itself; the crop is resized as a uint8 tensor (torch's vectorized antialiased
bilinear, the same filter as PIL's); the flip runs on the uint8 crop and the jitter in float32, each
op clamped to [0, 255] as torchvision's are. `python dev/compare_pipeline.py` times it against the
official OpenCV + albumentations pipeline on the same JPEGs. Errors are ValueError / OSError naming
the file; a sample that fails to decode is returned as {'error': ...} for the caller to count.
"""

import json
import math
import os
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from evaluate import load_eval_image, normalize, resize_box, to_rgb, to_uint8_tensor
from tokenizer import read_coco_captions

try:
    # torchvision >= 0.8; its image decoders are announced to move to torchcodec: PIL takes over
    # then (and decode_on=device is refused)
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert('L')
MAX_UNKNOWN = 0.1  # of a split's caption pieces: with more <unk>, the vocabulary is another text's
HUE_SECTORS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


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
# the training augmentation

def random_box(W, H, rng, min_scale):
    """Random resized crop's box: area scale (min_scale, 1), aspect ratio (3/4, 4/3), drawn as
    torchvision does."""
    for _ in range(10):
        area = W * H * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= W and 0 < h <= H:
            left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
            return left, top, left + w, top + h
    return 0, 0, W, H  # fall back to the whole image


def random_resized_crop(image: Image.Image, box, size: int) -> torch.Tensor:
    """The integer box (left, top, right, bottom) of an opened, not yet decoded image, resized to
    (3, size, size) uint8 with antialiased bilinear filtering (the filter of PIL's resize)."""
    if image.format == 'JPEG' and min(box[2] - box[0], box[3] - box[1]) >= 2 * size:
        # a DCT-scaled decode, then PIL's fractional box
        return to_uint8_tensor(resize_box(image, box, size))
    if image.format == 'JPEG' and image.mode in ('RGB', 'L') and decode_jpeg is not None:
        # libjpeg-turbo through torchvision: PIL's decoder, straight into a (3, H, W) tensor (no
        # copy out of PIL)
        pixels = decode(jpeg_bytes(image), 'cpu')
    else:
        image = to_rgb(image)
        # PIL keeps RGB pixels as RGBX: exporting them as they are costs half of packing them to RGB
        # torch warns about read-only buffers; this one is only read
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)
            pixels = torch.frombuffer(image.tobytes('raw', 'RGBX'), dtype=torch.uint8)
        # (4, H, W), channels last in memory
        pixels = pixels.view(image.size[1], image.size[0], 4).permute(2, 0, 1)
    left, top, right, bottom = box
    pixels = F.interpolate(pixels[None, :, top:bottom, left:right], size=(size, size),
                           mode='bilinear',
                           antialias=True, align_corners=False)  # torch's vectorized uint8 kernel
    return pixels[0, :3].contiguous()  # (3, size, size)


def jpeg_bytes(image: Image.Image) -> torch.Tensor:
    """The whole file of an opened JPEG (PIL has read only its header) as a uint8 tensor."""
    image.fp.seek(0)
    return torch.frombuffer(bytearray(image.fp.read()), dtype=torch.uint8)


def decode(jpegs, device):
    """torchvision's decode_jpeg to RGB: one file's bytes -> (3, H, W) uint8, or a list of them ->
    a list, decoded together (nvJPEG's batched decoder on a GPU)."""
    # torchvision 0.29 announces that its decoders will move to torchcodec
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


def draw_jitter(rng) -> tuple:
    """The colour jitter's draws: brightness, contrast and saturation factors in [0.6, 1.4], a hue
    shift in [-0.1, 0.1] of the colour circle, and the order of the four ops."""
    b, c, s = rng.uniform(0.6, 1.4, size=3)
    hue = rng.uniform(-0.1, 0.1)
    return float(b), float(c), float(s), float(hue), [int(i) for i in rng.permutation(4)]


def color_jitter(pixels: torch.Tensor, jitter: tuple) -> torch.Tensor:
    """draw_jitter's ops in their order on (3, S, S) uint8, each result clamped to [0, 255] (where
    it can leave it: a factor above 1; a hue rotation keeps every pixel's max and min). The hue
    range is kept small because captions name colours, and a large shift would make them false."""
    b, c, s, hue, order = jitter
    x = pixels.float()
    for i in order:
        if i == 0:
            x.mul_(b)
        elif i == 1:
            # blend with the mean grey level (the mean of the grey image, from the channel means)
            mean_grey = sum(w * m for w, m in zip(GRAY, x.mean((1, 2)).tolist()))
            x.mul_(c).add_((1 - c) * mean_grey)
        elif i == 2:  # blend with the grey image
            grey = x[0] * GRAY[0] + x[1] * GRAY[1] + x[2] * GRAY[2]
            x.mul_(s).add_(grey.mul_(1 - s))
        else:
            x = shift_hue(x, hue)
        if i < 3 and (b, c, s)[i] > 1:
            x.clamp_(0, 255)
    return x.add_(0.5).to(torch.uint8)  # round to nearest


def shift_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the HSV hue of (..., 3, S, S) float RGB by `shift` turns (a number, or a tensor that
    broadcasts to (..., 1, 1, 1)), keeping saturation and value: a pixel keeps its max M and min m,
    and channel n becomes M - (M - m) w(n + 6 hue), w the trapezoid clamp(min(k, 4 - k), 0, 1) of
    period 6. Written without comparisons or torch.where, which are several times slower on CPU
    here."""
    top, bottom = x.amax(-3), x.amin(-3)
    chroma = top - bottom
    r, g, b = x.unbind(-3)
    # which channel holds the max, as exact 0/1 floats (r before g before b on ties, as
    # torchvision):
    # (v - top) * 1e7 + 1 is 1 where v == top and <= 0 wherever v is below it by more than 1e-7
    is_r = (r - top).mul_(1e7).add_(1).clamp_(min=0)
    is_g = (g - top).mul_(1e7).add_(1).clamp_(min=0).mul_(1 - is_r)
    is_b = 1 - is_r - is_g
    # the hue in sixths of a turn: (g - b) / C where r is the max, 2 + (b - r) / C for g,
    # 4 + (r - g) / C for b
    hue6 = (g - b).mul_(is_r)
    hue6.add_((b - r).add_(chroma, alpha=2).mul_(is_g))
    hue6.add_((r - g).add_(chroma, alpha=4).mul_(is_b))
    if torch.is_tensor(shift):
        shift = shift.view(-1, 1, 1)  # (B, 1, 1) against hue6's (B, S, S)
    hue6.div_(chroma.clamp_min(1e-6)).add_(6 * shift)  # in [-1.6, 5.6]
    k = HUE_SECTORS.to(x.device) + hue6.unsqueeze(-3)  # (..., 3, S, S) in [-0.6, 10.6]
    k.sub_(k.div(6).floor_().mul_(6))  # mod 6
    w = torch.minimum(k, 4 - k).clamp_(0, 1)
    return torch.addcmul(top.unsqueeze(-3), chroma.unsqueeze(-3), w, value=-1)


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
                    from gpu_augment import decode_and_augment  # only this path needs it
                    images, kept, failed = decode_and_augment(images, self.decode_on)
                    tokens, errors = tokens[kept], errors + failed
                yield (epoch, batch), (images, tokens, errors)
            epoch, batch = epoch + 1, 0


def val_batches(dataset, batch_size: int, n_batches: int, rank: int = 0, world_size: int = 1,
                **loader_args):
    """A DataLoader of the first n_batches batches of this process's share of the validation
    images: the same images at every evaluation."""
    share = torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=False)
    keys = [(0, i) for i in share][:n_batches * batch_size]
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=keys, **loader_args)


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
        if labels is None:  # captions the vocabulary cannot spell become runs of <unk> (id 0)
            captions = [c for _, cs, _ in self.items[::max(1, len(self.items) // 200)] for c in cs]
            pieces = [p for caption in captions for p in tokenizer.encode(caption)]
            unknown = pieces.count(0) / max(1, len(pieces))
            if unknown > MAX_UNKNOWN:
                raise ValueError(f"{getattr(tokenizer, 'model_path', 'the tokenizer')}: "
                                 f"{unknown:.0%} of the pieces of {root}/annotations/captions_"
                                 f"{split}.json are unknown to it (<unk>): it is not these "
                                 "captions' vocabulary (tokenizer.py makes one)")

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
    device stay a list, each one's pixels or its file and draws (for gpu_augment.py)."""
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

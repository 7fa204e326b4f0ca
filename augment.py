"""
The paper's training augmentation, run in the DataLoader workers or on the training device.

    from augment import color_jitter, decode_and_augment, draw_jitter, random_box
    box = random_box(width, height, rng, min_scale=0.2)    # the random resized crop's box
    pixels = random_resized_crop(image, box, 224)          # (3, 224, 224) uint8, on the CPU
    pixels = color_jitter(pixels, draw_jitter(rng))        # the jitter's draws, then the jitter
    images, kept, errors = decode_and_augment(items, 'cuda')  # JPEG files and their draws

As in the paper: random resized crop (area scale (min_scale, 1), aspect ratio (3/4, 4/3)), a
horizontal flip with p=0.5 (the caption's left and right swap with it: coco.py), colour jitter
(brightness, contrast, saturation 0.4, hue 0.1) with p=0.8. coco.CocoCaptions draws every choice
from a generator seeded with (seed, epoch, index), always in the same order, and then either applies
them itself (the default) or ships the JPEG file's bytes with the draws, for decode_and_augment to
decode a whole batch on the device (nvJPEG on a GPU, through torchvision.io.decode_jpeg) and apply
the same crops, flips and jitters there: the same boxes and flips, and pixels within a level or two
of the workers' (a full decode and an antialiased float resize instead of libjpeg's scaled decode
and uint8 resize). That takes the decoding off the CPU cores, which at the paper's resolution feed a
GPU more slowly than it trains.
CPU speed: a JPEG whose crop keeps at least twice the output size is decoded at 1/2, 1/4 or 1/8
scale by libjpeg itself; the crop is resized as a uint8 tensor (torch's vectorized antialiased
bilinear, the same filter as PIL's); the flip runs on the uint8 crop and the jitter in float32, each
op clamped to [0, 255] as torchvision's are. `python dev/compare_pipeline.py` times it against the
official OpenCV + albumentations pipeline on the same JPEGs.
"""

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:
    # torchvision >= 0.8; its image decoders are announced to move to torchcodec: PIL takes over
    # then (and decode_on=device is refused)
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert('L')
HUE_SECTORS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def resize_box(image: Image.Image, box, size: int) -> Image.Image:
    """The region `box` (left, top, right, bottom, in pixels of the full image) resized to size x
    size, bilinear.
    An unloaded JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that still
    leaves at least `size` pixels across the box: most of the decoding time of a large photo is
    saved."""
    W = image.size[0]
    reduce = min(box[2] - box[0], box[3] - box[1]) / size
    if image.format == 'JPEG' and reduce >= 2:
        drafted = image.draft('RGB', (math.ceil(W / reduce), math.ceil(image.size[1] / reduce)))
        # PIL says by how much: sizes are rounded up, scales are not
        scale = drafted[1][2] / W if drafted else 1.0
        box = tuple(v * scale for v in box)
    return to_rgb(image).resize((size, size), Image.Resampling.BILINEAR, box=box)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grayscale scaled to 8 bits, transparency onto
    white."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels / 257 if pixels.max() > 255 else pixels
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')  # transparent pixels become white, not black
        image = Image.new('RGB', rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel('A'))
    return image.convert('RGB')


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(3, S, S) uint8 from an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


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


def color_jitter_batch(pixels: torch.Tensor, jitters: list) -> torch.Tensor:
    """color_jitter on a (B, 3, S, S) uint8 batch at once, each image with its own draws (None: no
    jitter): the four steps run in turn over the batch, each image taking at step p the op its
    order puts there, so a batch costs a few dozen kernels whatever its size."""
    B, device = len(pixels), pixels.device
    on = torch.tensor([j is not None for j in jitters], device=device).view(B, 1, 1, 1)
    draws = [j or (1.0, 1.0, 1.0, 0.0, [0, 1, 2, 3]) for j in jitters]
    factors = torch.tensor([d[:3] for d in draws], device=device).view(B, 3, 1, 1, 1)
    hue = torch.tensor([d[3] for d in draws], device=device)
    order = torch.tensor([d[4] for d in draws], device=device)  # (B, 4)
    x = pixels.float()
    gray = torch.tensor(GRAY, device=device).view(1, 3, 1, 1)
    for step in range(4):
        op = order[:, step].view(B, 1, 1, 1)
        b, c, s = factors[:, 0], factors[:, 1], factors[:, 2]  # (B, 1, 1, 1) each
        grey = (x * gray).sum(1, keepdim=True)  # (B, 1, S, S)
        mean_grey = (x.mean((2, 3), keepdim=True) * gray).sum(1, keepdim=True)
        outcomes = (x * b, x * c + (1 - c) * mean_grey, x * s + (1 - s) * grey, shift_hue(x, hue))
        for i, (y, factor) in enumerate(zip(outcomes, (b, c, s, None))):
            if factor is not None:
                y = torch.where(factor > 1, y.clamp(0, 255), y)
            x = torch.where(on & (op == i), y, x)
    return x.add_(0.5).to(torch.uint8)


def decode_and_augment(items: list, device) -> tuple:
    """A batch whose JPEG files the workers only read (coco.collate's list: per image its pixels,
    or {'jpeg', 'box', 'flip', 'jitter', 'size', 'path'}): the files decoded on `device` at once,
    then each cropped, resized (antialiased bilinear) and flipped, and the batch jittered, as the
    workers would have. Returns the (B', 3, S, S) uint8 images on `device` (None if none is left),
    the indices of the items kept, and an error line for each file that failed to decode."""
    files = [i for i, item in enumerate(items) if isinstance(item, dict)]
    try:
        decoded = decode([items[i]['jpeg'] for i in files], device)
    except RuntimeError:  # one bad file fails the batch: decode them one by one to find it
        decoded = []
        for i in files:
            try:
                decoded.append(decode(items[i]['jpeg'], device))
            except RuntimeError as e:
                decoded.append(f"{items[i]['path']}: {str(e).strip().splitlines()[0]}")
    decoded = dict(zip(files, decoded))
    images, kept, errors, jitters = [], [], [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):  # not a JPEG the device decodes: the worker did it all
            images.append(item.to(device, non_blocking=True))
            jitters.append(None)
        elif isinstance(decoded[i], str):
            errors.append(decoded[i])
            continue
        else:
            left, top, right, bottom = item['box']
            crop = decoded[i][None, :, top:bottom, left:right].float()
            crop = F.interpolate(crop, size=(item['size'], item['size']), mode='bilinear',
                                 antialias=True, align_corners=False)
            crop = crop[0].round_().clamp_(0, 255).to(torch.uint8)
            images.append(crop.flip(-1) if item['flip'] else crop)
            jitters.append(item['jitter'])
        kept.append(i)
    if not images:
        return None, kept, errors
    return color_jitter_batch(torch.stack(images), jitters), kept, errors

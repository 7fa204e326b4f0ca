"""
The paper's training augmentation of a whole batch on the training device, for train.py's
--decode_on=device: the DataLoader workers only read each JPEG file and draw its crop, flip and
jitter (coco.CocoCaptions), and the batch is decoded here at once (nvJPEG on a GPU, through
torchvision.io.decode_jpeg), then cropped, resized, flipped and jittered with the workers' draws.
The boxes, flips and captions are the workers'; the pixels are within a level or two of theirs (a
full decode and an antialiased float resize instead of libjpeg's scaled decode and uint8 resize).
That takes the decoding off the CPU cores, which at the paper's resolution feed a GPU more slowly
than it trains.

    from gpu_augment import decode_and_augment
    images, kept, errors = decode_and_augment(items, 'cuda')  # coco.collate's list of JPEG files
"""

import torch
import torch.nn.functional as F

from coco import GRAY, decode, shift_hue


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

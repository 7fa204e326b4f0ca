"""
Images and captions in the COCO layout, and the image transforms every stage shares.

    from coco import CocoCaptions, collate, read_coco_split, load_eval_image, normalize
    data = CocoCaptions('data/coco', 'train2017', tokenizer, image_size=224, max_len=30, train=True, seed=0)
    sample = data[(epoch, index)]      # {'image': (3, S, S) uint8, 'tokens': (T,) long}, or {'error': '...'}
    image = load_eval_image('photo.jpg', 224)   # shorter side to 256, center 224 crop: train.py's val,
                                                # evaluate.py's VOC features and caption.py all use it

Train augmentation, as in the paper: random resized crop (area scale (0.2, 1), aspect ratio (3/4, 4/3)),
horizontal flip with p=0.5 that swaps the words left/right in the caption, colour jitter (brightness,
contrast, saturation 0.4, hue 0.1) with p=0.8. Every random choice of an item comes from a generator seeded
with (seed, epoch, index), so batches do not depend on the number of workers and a resumed run sees exactly
the batches an unbroken one would. Images stay uint8 until the device (`normalize`). Errors are ValueError /
OSError naming the file; a sample that fails to decode is returned as {'error': ...} for the caller to count.
"""

import json
import math
import os
import re

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_coco_split(root: str, split: str) -> list[tuple[int, str, list[str]]]:
    """(image id, image path, its captions) for each captioned image of a COCO-layout split, by id:
    <root>/annotations/captions_<split>.json and <root>/<split>/."""
    path = os.path.join(root, 'annotations', f'captions_{split}.json')
    try:
        with open(path) as f:
            data = json.load(f)
        files = {image['id']: image['file_name'] for image in data['images']}
        captions = {}
        for a in data['annotations']:
            captions.setdefault(a['image_id'], []).append(a['caption'])
    except OSError as e:
        raise OSError(f"{path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return [(i, os.path.join(root, split, files[i]), captions[i]) for i in sorted(captions) if i in files]


def swap_left_right(caption: str) -> str:
    """'a cat left of a dog' -> 'a cat right of a dog'; whole words only: 'bright', 'leftover' stay."""
    return re.sub(r'\b(left|right)\b', lambda m: 'right' if m.group(1).lower() == 'left' else 'left',
                  caption, flags=re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# decoding and resizing

def resize_box(image: Image.Image, box, size: int) -> Image.Image:
    """The region `box` (left, top, right, bottom, in pixels of the full image) resized to size x size, bilinear.
    An unloaded JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that still leaves at least
    `size` pixels across the box: most of the decoding time of a large photo is saved."""
    W, H = image.size
    reduce = min(box[2] - box[0], box[3] - box[1]) / size
    if image.format == 'JPEG' and reduce >= 2:
        image.draft('RGB', (math.ceil(W / reduce), math.ceil(H / reduce)))
    sx, sy = image.size[0] / W, image.size[1] / H  # draft may have shrunk the decoded image
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return to_rgb(image).resize((size, size), Image.Resampling.BILINEAR, box=box)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grayscale scaled to 8 bits, transparency onto white."""
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


def center_box(width: int, height: int, size: int):
    """The eval transform's crop in source pixels: shorter side to round(size * 8/7) (256 for 224), center size."""
    side = min(width, height) * size / round(size * 8 / 7)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def load_eval_image(path: str, size: int) -> Image.Image:
    """The eval transform of every stage: decode, shorter side to round(size * 8/7), center crop size x size, RGB."""
    with Image.open(path) as image:
        return resize_box(image, center_box(*image.size, size), size)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(3, S, S) uint8 from an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float, ImageNet mean/std normalized, on the pixels' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std


# ----------------------------------------------------------------------------------------------
# the pretraining dataset

class CocoCaptions(torch.utils.data.Dataset):
    """Images of one COCO split with their captions; an item is one image and one of its captions,
    addressed by (epoch, index) so that its augmentation is a pure function of the key."""

    def __init__(self, root, split, tokenizer, image_size, max_len, train, seed, min_crop_scale=0.2):
        self.items = [(path, captions) for _, path, captions in read_coco_split(root, split)]
        if not self.items:
            raise ValueError(f"{root}/annotations/captions_{split}.json: no images with captions")
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
                box = self.random_box(*image.size, rng) if self.train else center_box(*image.size, self.image_size)
                image = resize_box(image, box, self.image_size)
        except Exception as e:  # a corrupt or missing file must not end a long run: report and skip it
            return {'error': f"{path}: {str(e) or type(e).__name__}"}
        if self.train and rng.random() < 0.5:
            # flipping the image makes "left" wrong, so swap left/right words in the caption too
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            caption = swap_left_right(caption)
        if self.train and rng.random() < 0.8:
            image = color_jitter(image, rng)
        ids = self.tokenizer.encode(caption)[:self.max_len - 2]  # drop words, never [EOS]
        tokens = [self.tokenizer.sos_id, *ids, self.tokenizer.eos_id]
        return {'image': to_uint8_tensor(image), 'tokens': torch.tensor(tokens)}

    def random_box(self, W, H, rng):
        """Random resized crop: area scale (min_crop_scale, 1), aspect ratio (3/4, 4/3), drawn as torchvision does."""
        for _ in range(10):
            area = W * H * rng.uniform(self.min_crop_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < w <= W and 0 < h <= H:
                left, top = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
                return left, top, left + w, top + h
        return 0, 0, W, H  # fall back to the whole image


def color_jitter(image: Image.Image, rng) -> Image.Image:
    """Brightness, contrast and saturation factors in [0.6, 1.4] and a hue shift in [-0.1, 0.1], in random
    order. The hue range is kept small because captions name colours, and a large shift would make them false."""
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

"""
Dev only: our training data pipeline (coco.CocoCaptions) against the official one, side by side, on
the same JPEGs.

  pip install albumentations opencv-python-headless   # only this check needs them
  # 256 JPEGs of 640x480 -> 224 px, about a minute
  python dev/compare_pipeline.py

The official pipeline, rebuilt from its code (kdexd/virtex: CocoCaptionsDataset + CaptioningDataset,
the pretraining transform list and its collate_fn): cv2.imread + BGR->RGB, albumentations
RandomResizedCrop(224, scale (0.2, 1), ratio (3/4, 4/3)), its caption-aware HorizontalFlip
(cv2.flip, p=0.5), ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8) and Normalize, HWC -> CHW float32 tensor,
the caption tokenized; batches stack the float images.
Ours: the same augmentation; images stay uint8 and are normalized on the training device.

Measured two ways, each `rounds` times in alternation, best round reported:
  - one DataLoader worker, batches of 64 (how train.py consumes data): images/s that reach the
    training loop, batch making and the worker-to-trainer transfer included (the official float32
    batches are 4x larger);
  - one image at a time in this process, one thread (torch and OpenCV): the augmentation alone.
"""
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import WordTokenizer, write_jpegs  # noqa: E402
from coco import CocoCaptions, collate  # noqa: E402
from configurator import configure  # noqa: E402

n_images = 256
rounds = 3
batch_size = 64
width, height, size = 640, 480, 224
configure(globals())
try:
    import albumentations as alb
    import cv2
except ImportError:
    raise SystemExit("skipped: needs albumentations and opencv-python-headless (pip install them "
                     "to run this check)")


class OfficialStylePipeline(torch.utils.data.Dataset):
    """The official pretraining item: decode, augment, normalize, CHW float tensor, caption ids;
    keyed as ours."""

    def __init__(self, items):
        self.items, self.tokenizer = items, WordTokenizer()
        self.crop = alb.RandomResizedCrop(size=(size, size), scale=(0.2, 1.0),
                                          ratio=(0.75, 1.333), p=1.0)
        self.jitter_and_normalize = alb.Compose([
            alb.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
            alb.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), p=1.0)])
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        path, captions = self.items[key[1]]
        image = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
        caption = captions[self.rng.integers(len(captions))]
        image = self.crop(image=image)['image']
        # upstream's HorizontalFlip sits between the crop and the jitter
        if self.rng.random() < 0.5:
            image = cv2.flip(image, 1)
            caption = caption.replace('left', '[TMP]').replace('right',
                                                               'left').replace('[TMP]', 'right')
        image = self.jitter_and_normalize(image=image)['image']
        tokens = [1, *self.tokenizer.encode(caption), 2][:30]
        return {'image': torch.tensor(np.transpose(image, (2, 0, 1)), dtype=torch.float),
                'tokens': torch.tensor(tokens, dtype=torch.long)}


def official_collate(samples):  # upstream: stack the images, pad the captions
    tokens = torch.nn.utils.rnn.pad_sequence([s['tokens'] for s in samples], batch_first=True)
    return torch.stack([s['image'] for s in samples]), tokens


def through_one_worker(dataset, collate_fn, epoch):
    loader = torch.utils.data.DataLoader(dataset, sampler=[(epoch, i) for i in range(n_images)],
                                         batch_size=batch_size, num_workers=1,
                                         collate_fn=collate_fn)
    batches = iter(loader)
    next(batches)  # the worker's start-up and its first batch are not timed
    t0 = time.perf_counter()
    count = sum(len(batch[1]) for batch in batches)
    return count / (time.perf_counter() - t0)


def one_at_a_time(dataset, epoch):
    t0 = time.perf_counter()
    for i in range(n_images):
        dataset[(epoch, i)]
    return n_images / (time.perf_counter() - t0)


with tempfile.TemporaryDirectory() as folder:
    write_jpegs(folder, n_images, width, height)
    ours = CocoCaptions(folder, 'train2017', WordTokenizer(), size, 30, train=True, seed=0)
    official = OfficialStylePipeline(ours.items)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    for i in range(n_images):  # warm the page cache and both code paths
        ours[(0, i)], official[(0, i)]
    best = {}
    for r in range(1, rounds + 1):
        for name, rate in (('ours, one worker', through_one_worker(ours, collate, r)),
                           ('official, one worker',
                            through_one_worker(official, official_collate, r)),
                           ('ours, per image', one_at_a_time(ours, r)),
                           ('official, per image', one_at_a_time(official, r))):
            best[name] = max(best.get(name, 0.0), rate)
    print(f"{n_images} JPEGs of {width}x{height} -> {size} px, best of {rounds} rounds (torch "
          f"{torch.__version__}, albumentations {alb.__version__}, OpenCV {cv2.__version__}, "
          f"{os.cpu_count()} CPUs)")
    for name, rate in best.items():
        print(f"{name:<22} {rate:7.0f} img/s   {1000 / rate:.2f} ms/img")
    print(f"ratio ours / official: {best['ours, one worker'] / best['official, one worker']:.2f} "
          "with one DataLoader worker, "
          f"{best['ours, per image'] / best['official, per image']:.2f} per image")

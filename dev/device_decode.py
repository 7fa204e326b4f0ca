"""
Dev: how far the pixels of --decode_on=device are from the workers' own. The same JPEGs, keys and
seed through coco.CocoCaptions both ways: the workers decode (libjpeg, scaled where the crop allows)
and resize in uint8; the device path decodes in full (torchvision.io.decode_jpeg, nvJPEG on a GPU)
and resizes in float; both flip and jitter with the same draws. Prints the mean and the 99th
percentile of the absolute difference, in levels of 255, per image size.

  python dev/device_decode.py                  # the device path run on the CPU
  python dev/device_decode.py --device=cuda    # on a GPU: nvJPEG's decode
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import WordTokenizer, write_jpegs  # noqa: E402
from coco import CocoCaptions, collate  # noqa: E402
from configurator import DEVICE, configure  # noqa: E402
from gpu_augment import decode_and_augment  # noqa: E402

device: DEVICE = 'cpu'      # where the device path decodes
n_images = 64               # JPEGs per image size
seed = 0                    # the JPEGs' content and the augmentation's draws
configure(globals())
with tempfile.TemporaryDirectory() as folder:
    for (width, height), size in (((640, 480), 224), ((160, 120), 64)):
        root = os.path.join(folder, f'{width}x{height}')
        write_jpegs(root, n_images, width, height)
        keys = [(1, i) for i in range(n_images)]
        workers, on_device = (CocoCaptions(root, 'train2017', WordTokenizer(), size, 30,
                                           train=True, seed=seed, decode_on_device=flag)
                              for flag in (False, True))
        want = collate([workers[key] for key in keys])[0]
        got, kept, errors = decode_and_augment(collate([on_device[key] for key in keys])[0],
                                               device)
        assert not errors and kept == list(range(n_images)), errors
        diff = (got.cpu().int() - want.int()).abs().float()
        print(f"{width}x{height} -> {size} px, {n_images} JPEGs, decoded on {device}: mean "
              f"{diff.mean():.2f} levels, 99% within {diff.flatten().quantile(0.99):.0f}, "
              f"max {diff.max():.0f}", flush=True)

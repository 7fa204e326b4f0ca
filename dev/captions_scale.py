"""
Dev: how long data/captions/prepare.py takes on a large collection. Writes --images empty image
files (prepare.py opens no image unless --check_images=True, so their bytes do not matter) and a
JSON Lines file of --rows captions spread over them, then times prepare.py on it and reports its
peak memory.

  python dev/captions_scale.py --rows=1000000 --images=200000    # COCO's shape, 5 captions an image
  python dev/captions_scale.py --rows=1000000 --images=1000000   # one caption an image

The files go to a temporary folder, removed at the end.
"""
import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
parser.add_argument('--rows', type=int, default=1_000_000)
parser.add_argument('--images', type=int, default=200_000)
parser.add_argument('--workdir', default=None, help='where the temporary folder goes')
args = parser.parse_args()
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

root = tempfile.mkdtemp(prefix='captions_scale_', dir=args.workdir)
try:
    t0 = time.perf_counter()
    images = os.path.join(root, 'images')
    names = [f'{i // 1000:04d}/{i:08d}.jpg' for i in range(args.images)]  # 1000 images a folder
    for i, name in enumerate(names):
        if i % 1000 == 0:
            os.makedirs(os.path.join(images, os.path.dirname(name)))
        open(os.path.join(images, name), 'wb').close()
    words = 'a the red blue small large circle square sits on near left of right above'.split()
    rng = random.Random(0)
    with open(os.path.join(root, 'captions.jsonl'), 'w') as f:
        for row in range(args.rows):
            caption = ' '.join(rng.choice(words) for _ in range(rng.randint(6, 14)))
            f.write(json.dumps({'image': names[row % args.images], 'caption': caption}) + '\n')
    print(f'wrote {args.images} images and {args.rows} rows in {time.perf_counter() - t0:.0f} s',
          flush=True)

    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(HERE, 'data', 'captions', 'prepare.py'),
                    f'--images={images}', f'--captions={root}/captions.jsonl',
                    f'--out={root}/out'], check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20  # KiB to GiB
    print(f'prepare.py: {args.rows} rows, {args.images} images in {seconds:.0f} s, '
          f'peak memory {peak:.2f} GB', flush=True)
finally:
    shutil.rmtree(root)

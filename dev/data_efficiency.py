"""
The paper's data-efficiency comparison on the shapes world: VOC07 mAP of the bicaptioning backbone
against the share of the training images it saw, beside random init.

  # 10, 25, 50 and 100 % of the images, seed 0
  python dev/data_efficiency.py
  python dev/data_efficiency.py --fractions=0.1,1.0 --seeds=0,1

Every run is `python train.py config/shapes.py --train_fraction=F --seed=S`: the same 2500
iterations of 64 images whatever the fraction (so a smaller subset is seen more often: the budget
stays, the images change), then evaluate.py. Runs go to out/data_efficiency/F_seedS/; the 100 % run
is the demo's own when `python demo.py --seed=S` wrote out/demo_seedS/. Prints a table and draws
out/data_efficiency/map.png (mAP against the fraction, PIL only).
"""

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (HERE, config_max_iters, finished, random_init_map, train,  # noqa: E402
                  train_minutes, voc_map)
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from configurator import configure  # noqa: E402  (runs.py put the repository on the path)

# ----------------------------------------------------------------------------------------------
data = 'data/shapes'                 # prepare.py's output with the tokenizer's vocab.model
config = 'config/shapes.py'          # the training recipe; only --train_fraction and --seed change
fractions = '0.1,0.25,0.5,1.0'       # shares of the training images
seeds = '0'
out_dir = 'out/data_efficiency'
# ----------------------------------------------------------------------------------------------
rest = configure(globals())
if rest:
    raise SystemExit(f"error: unexpected arguments {rest} (flags are --key=value)")
fraction_list, seed_list = [float(f)
                            for f in str(fractions).split(',')], [int(s)
                                                                  for s in str(seeds).split(',')]
if not all(0 < f <= 1 for f in fraction_list):
    raise SystemExit(f"error: --fractions={fractions}: each must be in (0, 1]")
max_iters, voc = config_max_iters(config), f'{data}/VOC2007'
os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)


def plot(rows, path, width=560, height=360):
    """mAP against the fraction of images (log axis), one line per seed and init; a PNG."""
    left, top, right, bottom = 56, 20, width - 24, height - 45
    maps = [m for r in rows for m in (r['map'], r['random'])]
    # at most ~7 round ticks
    step = next(s for s in (1, 2, 5, 10, 20) if (max(maps) - min(maps)) / s <= 6)
    lo, hi = step * math.floor(min(maps) / step - 0.5), step * math.ceil(max(maps) / step + 0.5)
    f_lo, f_hi = min(fraction_list), max(fraction_list)

    def xy(fraction, value):
        x = left + (right - left) * (math.log(fraction / f_lo) / math.log(f_hi / f_lo) if f_hi
                                     > f_lo else 0.5)
        return x, bottom - (bottom - top) * (value - lo) / (hi - lo)
    image = Image.new('RGB', (width, height), 'white')
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.rectangle((left, top, right, bottom), outline='black')
    for f in fraction_list:
        x = xy(f, lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill='black')
        draw.text((x - 12, bottom + 6), f"{100 * f:g}%", fill='black', font=font)
    for value in range(lo, hi + 1, step):
        y = xy(f_lo, value)[1]
        draw.line((left - 4, y, left, y), fill='black')
        draw.text((left - 26, y - 6), f"{value}", fill='black', font=font)
    draw.text(((left + right) // 2 - 60, bottom + 24), 'share of training images',
              fill='black', font=font)
    draw.text((4, 4), 'VOC07 mAP', fill='black', font=font)
    for seed in seed_list:
        for key, colour in (('map', (40, 80, 200)), ('random', (200, 60, 40))):
            points = [xy(r['fraction'], r[key]) for r in rows if r['seed'] == seed]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    draw.text((left + 8, top + 6), 'bicaptioning', fill=(40, 80, 200), font=font)
    draw.text((left + 8, top + 20), 'random init', fill=(200, 60, 40), font=font)
    image.save(path)


rows, t_start = [], time.time()
for seed in seed_list:
    random_map = None  # the same ResNet at random init, judged once the first run shows what it is
    for fraction in fraction_list:
        run_dir, demo_dir = f'{out_dir}/{fraction:g}_seed{seed}', f'out/demo_seed{seed}'
        if fraction == 1 and finished(demo_dir, max_iters, pretext='bicaptioning', seed=seed,
                                      train_fraction=1.0):
            run_dir = demo_dir
        if not finished(run_dir, max_iters, pretext='bicaptioning', seed=seed,
                        train_fraction=fraction):
            print(f"seed {seed}: {100 * fraction:g}% of the images: training into {run_dir}",
                  flush=True)
            train(run_dir,
                  [config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model',
                   f'--seed={seed}',
                            f'--train_fraction={fraction}'])
        value = voc_map([f'--voc_root={voc}', f'--ckpt={run_dir}/ckpt.pt'],
                        f'{run_dir}/evaluate.log')
        random_map = random_map or random_init_map(voc, seed,
                                                   f'{out_dir}/random_seed{seed}.log', run_dir)
        rows.append({'fraction': fraction, 'seed': seed, 'map': value, 'random': random_map,
                     'train_min': train_minutes(run_dir), 'run': run_dir})
        print(f"seed {seed}: {100 * fraction:g}%: VOC07 mAP {value:.2f} (random init "
              f"{random_map:.2f})", flush=True)

print(f"\n{'images':>8}{'seed':>6}{'mAP':>8}{'random':>8}{'gain':>8}{'train min':>11}")
for r in rows:
    print(f"{100 * r['fraction']:>7g}%{r['seed']:>6}{r['map']:>8.2f}{r['random']:>8.2f}"
          f"{r['map'] - r['random']:>+8.2f}{r['train_min']:>11.1f}")
plot(rows, os.path.join(HERE, out_dir, 'map.png'))
with open(os.path.join(HERE, out_dir, 'results.json'), 'w') as f:
    json.dump(rows, f, indent=1)
print(f"\nwall time {(time.time() - t_start) / 60:.1f} min; plot: {out_dir}/map.png")

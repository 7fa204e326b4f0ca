"""
The paper's pretext-task ablation (its Table 2) on the shapes world: the same backbone pretrained with each of
the five pretext tasks, and at random init, every one judged by the same VOC07 linear SVMs.

  python dev/pretext_ablation.py                                # five pretexts + random init, seeds 0 and 1
  python dev/pretext_ablation.py --seeds=0 --pretexts=masked_lm,token_classification

Every run is `python train.py config/shapes.py --pretext=P --seed=S` (the demo's ResNet-18, 64 px images and
2500 iterations; nothing else changes), then `python evaluate.py --ckpt=...`. Runs go to out/ablation/P_seedS/.
A run that already finished (its checkpoint at the last iteration, with this pretext and seed) is evaluated again,
not retrained; for bicaptioning that includes the demo's own run, out/demo_seedS/ (`python demo.py --seed=S`).
Needs data/shapes/ with the COCO instances files (python data/shapes/prepare.py) and data/shapes/vocab.model.
Prints a table and writes out/ablation/results.json.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import HERE, config_max_iters, finished, random_init_map, train, train_minutes, voc_map  # noqa: E402
from configurator import configure  # noqa: E402  (runs.py put the repository on the path)
from model import PRETEXTS  # noqa: E402

# ----------------------------------------------------------------------------------------------
pretexts = ','.join(PRETEXTS)
seeds = '0,1'
data = 'data/shapes'
config = 'config/shapes.py'
out_dir = 'out/ablation'
# ----------------------------------------------------------------------------------------------
if configure(globals()):
    raise SystemExit("error: this script takes only --key=value flags")
pretext_list, seed_list = pretexts.split(','), [int(s) for s in str(seeds).split(',')]
for p in pretext_list:
    if p not in PRETEXTS:
        raise SystemExit(f"error: --pretexts: {p!r} is not one of {', '.join(PRETEXTS)}")
for path in (f'{data}/coco/annotations/instances_train2017.json', f'{data}/vocab.model', f'{data}/VOC2007', config):
    if not os.path.exists(os.path.join(HERE, path)):
        raise SystemExit(f"error: {path} does not exist (python data/shapes/prepare.py, then the tokenizer: see README)")
max_iters = config_max_iters(config)
voc = f'{data}/VOC2007'

os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)
results = {}  # (pretext, seed) -> {'map':, 'train_min':}
t_start = time.time()
for seed in seed_list:
    print(f"seed {seed}: random init", flush=True)
    results[('random init', seed)] = {'map': random_init_map(voc, seed, f'{out_dir}/random_seed{seed}.log'),
                                      'train_min': 0.0}
    for pretext in pretext_list:
        run_dir, demo_dir = f'{out_dir}/{pretext}_seed{seed}', f'out/demo_seed{seed}'
        if pretext == 'bicaptioning' and not finished(run_dir, max_iters, pretext=pretext, seed=seed) \
                and finished(demo_dir, max_iters, pretext=pretext, seed=seed, train_fraction=1.0):
            run_dir = demo_dir
        if finished(run_dir, max_iters, pretext=pretext, seed=seed):
            print(f"seed {seed}: {pretext}: trained already in {run_dir}", flush=True)
        else:
            print(f"seed {seed}: {pretext}: training into {run_dir}", flush=True)
            train(run_dir, [config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model', f'--pretext={pretext}',
                            f'--seed={seed}'])
        results[(pretext, seed)] = {'map': voc_map(voc, [f'--ckpt={run_dir}/ckpt.pt'], f'{run_dir}/evaluate.log'),
                                    'train_min': train_minutes(run_dir), 'run': run_dir}
        print(f"seed {seed}: {pretext}: VOC07 mAP {results[(pretext, seed)]['map']:.2f}", flush=True)

# ----------------------------------------------------------------------------------------------
# the table: mAP per seed, mean, gain over random init, training time
rows = ['random init'] + pretext_list
print(f"\n{'pretext':<27}" + ''.join(f"{'seed ' + str(s):>9}" for s in seed_list) + f"{'mean':>9}{'vs random':>11}{'train min':>11}")
random_mean = sum(results[('random init', s)]['map'] for s in seed_list) / len(seed_list)
for row in rows:
    maps = [results[(row, s)]['map'] for s in seed_list]
    mean = sum(maps) / len(maps)
    minutes = sum(results[(row, s)]['train_min'] for s in seed_list) / len(seed_list)
    print(f"{row:<27}" + ''.join(f"{m:>9.2f}" for m in maps) + f"{mean:>9.2f}{mean - random_mean:>+11.2f}"
          + (f"{minutes:>11.1f}" if minutes else f"{'-':>11}"))
print(f"\nwall time {(time.time() - t_start) / 60:.1f} min")
with open(os.path.join(HERE, out_dir, 'results.json'), 'w') as f:
    json.dump([{'pretext': p, 'seed': s, **r} for (p, s), r in results.items()], f, indent=1)

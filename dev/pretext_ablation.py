"""
The paper's pretext-task ablation (its Table 2) on a synthetic world, and what each backbone knows
beyond the category: the same ResNet pretrained with each pretext task (and at random init), every
one judged by the same VOC07 linear SVMs on the world's VOC classes and on each of its attribute
tasks (data/shapes/prepare.py writes them: colour, size, count, background, position, colour x
category binding; the objects world adds texture).

  # every pretext + random init, seeds 0 and 1
  python dev/pretext_ablation.py
  python dev/pretext_ablation.py --seeds=0 --pretexts=masked_lm,token_classification
  python dev/pretext_ablation.py --data=data/objects \
      --pretexts=bicaptioning,multilabel_classification --seeds=0

Every run is `python train.py config/shapes.py --pretext=P --seed=S` (the demo's recipe; nothing
else changes) into OUT/P_seedS/, where OUT is out/ablation for the shapes world and
out/ablation_<world> for another. Then, per backbone, `evaluate.py --voc_root=DATA/VOC2007
--save_features=...` extracts the features once (and gives the category mAP), and for every
attribute the same features with the attribute's labels go through `evaluate.py --features=...`: the
SVMs only, seconds each. A run that already finished (its last checkpoint, with this pretext and
seed) is judged again, not retrained; for bicaptioning on the shapes world that includes the demo's
own run, out/demo_seedS/. Needs DATA/ with the COCO instances files and DATA/vocab.model (see
README).
Prints both tables and writes OUT/results.json.
"""

import json
import os
import sys
import time
from typing import Annotated

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (HERE, attribute_tasks, config_max_iters, finished, judge,  # noqa: E402
                  random_init_args, train, train_minutes)
# runs.py put the repository on the path
from configurator import CommaList, configure  # noqa: E402
from pretexts import PRETEXTS  # noqa: E402
from safety import write_atomically  # noqa: E402

# ----------------------------------------------------------------------------------------------
pretexts: Annotated[str, CommaList(*PRETEXTS)] = ','.join(PRETEXTS)
seeds = '0,1'
data = 'data/shapes'
config = 'config/shapes.py'
# default: out/ablation, or out/ablation_<world> for a world other than the shapes world
out_dir = ''
attributes = True           # also judge every backbone on DATA/attributes/*
# ----------------------------------------------------------------------------------------------
configure(globals())
pretext_list, seed_list = pretexts.split(','), [int(s) for s in str(seeds).split(',')]
world = os.path.basename(data.rstrip('/'))
out_dir = out_dir or ('out/ablation' if world == 'shapes' else f'out/ablation_{world}')
needed = [f'{data}/coco/annotations/instances_train2017.json', f'{data}/vocab.model',
          f'{data}/VOC2007', config]
for path in needed + ([f'{data}/attributes'] if attributes else []):
    if not os.path.exists(os.path.join(HERE, path)):
        raise SystemExit(f"error: {path} does not exist (make the world and its vocabulary first: "
                         "see README; an older world gets its attributes with prepare.py "
                         "--attributes_only)")
max_iters = config_max_iters(config)
attribute_names = ['category'] + (attribute_tasks(data) if attributes else [])


os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)
results = {}  # (row, seed) -> {'maps': {attribute: mAP}, 'train_min':}
t_start = time.time()
for seed in seed_list:
    for pretext in pretext_list:
        run_dir, demo_dir = f'{out_dir}/{pretext}_seed{seed}', f'out/demo_seed{seed}'
        if world == 'shapes' and pretext == 'bicaptioning' and not finished(run_dir, max_iters,
                                                                            pretext=pretext,
                                                                           seed=seed) \
                and finished(demo_dir, max_iters, pretext=pretext, seed=seed, train_fraction=1.0):
            run_dir = demo_dir
        if finished(run_dir, max_iters, pretext=pretext, seed=seed):
            print(f"seed {seed}: {pretext}: trained already in {run_dir}", flush=True)
        else:
            print(f"seed {seed}: {pretext}: training into {run_dir}", flush=True)
            train(run_dir, [config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model',
                            f'--pretext={pretext}', f'--seed={seed}'])
        maps = judge(f'{pretext}_seed{seed}', [f'--ckpt={run_dir}/ckpt.pt'], out_dir, data,
                     attribute_names[1:])
        results[(pretext, seed)] = {'maps': maps, 'train_min': train_minutes(run_dir),
                                    'run': run_dir}
        print(f"seed {seed}: {pretext}: " + ', '.join(f'{a} {m:.2f}' for a, m in maps.items()),
              flush=True)
    print(f"seed {seed}: random init", flush=True)  # the ResNet every run started from
    maps = judge(f'random_seed{seed}', random_init_args(f'{run_dir}/ckpt.pt', seed), out_dir,
                 data, attribute_names[1:])
    results[('random init', seed)] = {'maps': maps, 'train_min': 0.0}

# ----------------------------------------------------------------------------------------------
# the tables: the pretext table (category mAP per seed, mean, gain, time), then the attributes (seed
# means)
rows = ['random init'] + pretext_list
mean = lambda row, attribute: np.mean([results[(row, s)]['maps'][attribute] for s in seed_list])
print(f"\n{'pretext':<27}" + ''.join(f"{'seed ' + str(s):>9}" for s in seed_list)
      + f"{'mean':>9}{'vs random':>11}{'train min':>11}")
for row in rows:
    maps = [results[(row, s)]['maps']['category'] for s in seed_list]
    minutes = np.mean([results[(row, s)]['train_min'] for s in seed_list])
    print(f"{row:<27}" + ''.join(f"{m:>9.2f}" for m in maps) + f"{mean(row, 'category'):>9.2f}"
          + f"{mean(row, 'category') - mean('random init', 'category'):>+11.2f}"
          + (f"{minutes:>11.1f}" if minutes else f"{'-':>11}"))
if attribute_names[1:]:
    print(f"\nmAP per attribute (mean of seeds {', '.join(map(str, seed_list))}); 'others' is the "
          f"mean of all but category")
    print(f"{'pretext':<27}" + ''.join(f"{a:>11}" for a in attribute_names) + f"{'others':>9}")
    for row in rows:
        others = np.mean([mean(row, a) for a in attribute_names[1:]])
        print(f"{row:<27}" + ''.join(f"{mean(row, a):>11.2f}" for a in attribute_names)
              + f"{others:>9.2f}")
print(f"\nwall time {(time.time() - t_start) / 60:.1f} min")
rows_json = [{'pretext': p, 'seed': s, **r} for (p, s), r in results.items()]
write_atomically(os.path.join(HERE, out_dir, 'results.json'),
                 lambda f: json.dump(rows_json, f, indent=1), mode='w')

"""
The paper's data-efficiency comparison on the shapes world: VOC07 mAP of each pretext's backbone
against the share of the training images it saw, beside random init, on the category task and on
the mean of the world's attribute tasks (what the captions name that the labels do not).

  # bicaptioning on 10, 25, 50 and 100 % of the images, seed 0
  python dev/data_efficiency.py
  python dev/data_efficiency.py --fractions=0.1,1.0 --seeds=0,1
  # captions against labels at the same fractions
  python dev/data_efficiency.py --pretexts=bicaptioning,multilabel_classification

Every run is `python train.py config/shapes.py --pretext=P --train_fraction=F --seed=S`: the same
2500 iterations of 64 images whatever the fraction (so a smaller subset is seen more often: the
budget stays, the images change), then the backbone is judged as dev/pretext_ablation.py judges it.
Runs go to out/data_efficiency/P_F_seedS/; bicaptioning's 100 % run is the demo's own when `python
demo.py --seed=S` wrote out/demo_seedS/. Prints a table and draws out/data_efficiency/map.png (both
tasks against the fraction, a line per pretext, seeds averaged; PIL only).
"""

import json
import os
import sys
import time
from typing import Annotated

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (HERE, attribute_tasks, config_max_iters, finished, judge,  # noqa: E402
                  plot_panels, random_init_args, train, train_minutes)
# runs.py put the project on the path
from configurator import CommaList, configure  # noqa: E402
from pretexts import PRETEXTS  # noqa: E402
from safety import write_atomically  # noqa: E402

# ----------------------------------------------------------------------------------------------
data = 'data/shapes'                 # prepare.py's output with the tokenizer's vocab.model
config = 'config/shapes.py'          # the training recipe; only the pretext, fraction, seed change
# comma-separated, e.g. bicaptioning,multilabel_classification
pretexts: Annotated[str, CommaList(*PRETEXTS)] = 'bicaptioning'
fractions = '0.1,0.25,0.5,1.0'       # shares of the training images
seeds = '0'
attributes = True                    # also judge every backbone on DATA/attributes/*
out_dir = 'out/data_efficiency'
# ----------------------------------------------------------------------------------------------
configure(globals())
pretext_list = pretexts.split(',')
fraction_list = [float(f) for f in str(fractions).split(',')]
seed_list = [int(s) for s in str(seeds).split(',')]
if not all(0 < f <= 1 for f in fraction_list):
    raise SystemExit(f"error: --fractions={fractions}: each must be in (0, 1]")
if attributes and not os.path.isdir(os.path.join(HERE, data, 'attributes')):
    raise SystemExit(f"error: {data}/attributes does not exist (prepare.py writes it; or "
                     "--attributes=False)")
max_iters = config_max_iters(config)
attribute_names = attribute_tasks(data) if attributes else []
os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)


def row_of(pretext, fraction, seed, maps, minutes, run_dir):
    """A table row: the category mAP and the attributes' mean of one backbone."""
    return {'pretext': pretext, 'fraction': fraction, 'seed': seed, 'map': maps['category'],
            'attributes': np.mean([maps[a] for a in attribute_names]) if attribute_names else None,
            'maps': maps, 'train_min': minutes, 'run': run_dir}


rows, t_start = [], time.time()
for seed in seed_list:
    for pretext in pretext_list:
        for fraction in fraction_list:
            run_dir = f'{out_dir}/{pretext}_{fraction:g}_seed{seed}'
            demo_dir = f'out/demo_seed{seed}'
            expected = {'pretext': pretext, 'seed': seed, 'train_fraction': fraction}
            if pretext == 'bicaptioning' and fraction == 1 and not finished(run_dir, max_iters,
                                                                            **expected) \
                    and finished(demo_dir, max_iters, **expected):
                run_dir = demo_dir
            if not finished(run_dir, max_iters, **expected):
                print(f"seed {seed}: {pretext}, {100 * fraction:g}% of the images: training into "
                      f"{run_dir}", flush=True)
                train(run_dir, [config, f'--data_root={data}/coco',
                                f'--tokenizer={data}/vocab.model', f'--pretext={pretext}',
                                f'--seed={seed}', f'--train_fraction={fraction}'])
            maps = judge(f'{pretext}_{fraction:g}_seed{seed}', [f'--ckpt={run_dir}/ckpt.pt'],
                         out_dir, data, attribute_names)
            rows.append(row_of(pretext, fraction, seed, maps, train_minutes(run_dir), run_dir))
            print(f"seed {seed}: {pretext}, {100 * fraction:g}%: category {maps['category']:.2f}"
                  + (f", attributes {rows[-1]['attributes']:.2f}" if attribute_names else ''),
                  flush=True)
    # the ResNet every run of this seed started from, once per fraction on the plot
    maps = judge(f'random_seed{seed}', random_init_args(f'{run_dir}/ckpt.pt', seed), out_dir, data,
                 attribute_names)
    rows += [row_of('random init', fraction, seed, maps, 0.0, None) for fraction in fraction_list]

print(f"\n{'pretext':<27}{'images':>7}{'seed':>5}{'category':>9}{'attributes':>11}"
      f"{'train min':>10}")
for r in rows:
    attributes_text = f"{r['attributes']:>11.2f}" if r['attributes'] is not None else f"{'-':>11}"
    print(f"{r['pretext']:<27}{100 * r['fraction']:>6g}%{r['seed']:>5}{r['map']:>9.2f}"
          f"{attributes_text}{r['train_min']:>10.1f}")
means = [{'pretext': p, 'fraction': f, 'seeds': len(same),
          **{k: float(np.mean([r[k] for r in same])) for k in ('map', 'attributes')
             if same[0][k] is not None}}
         for p in ['random init'] + pretext_list for f in fraction_list
         for same in [[r for r in rows if (r['pretext'], r['fraction']) == (p, f)]]]
plot_panels(os.path.join(HERE, out_dir, 'map.png'), means,
            [('category mAP (VOC)', 'map'), ("the attributes' mean mAP", 'attributes')],
            'fraction', lambda f: f"{100 * f:g}%", width=640)
write_atomically(os.path.join(HERE, out_dir, 'results.json'),
                 lambda f: json.dump(rows, f, indent=1), mode='w')
print(f"\nwall time {(time.time() - t_start) / 60:.1f} min; plot: {out_dir}/map.png")

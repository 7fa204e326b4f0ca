"""
Dev: fine-tuning beside the frozen probe. The paper transfers by fine-tuning the whole network too
(iNaturalist, detection), and found its gap to ImageNet-supervised backbones smallest there. Here
every backbone, random init and each pretext's, is judged twice by probe.py on the world's
ImageFolder task: frozen (the linear probe) and fine-tuned (--finetune=True: the backbone learns
too, at a lower learning rate than the new layer), with the same augmentation, epochs and seed.

  python dev/finetune_study.py                          # the shapes world, seed 0
  python dev/finetune_study.py --data=data/objects      # dev/objects_world.py's world
  python dev/finetune_study.py --epochs=100 --seeds=0,1

The pretraining runs, `python train.py CONFIG --pretext=P --seed=S`, go to OUT/<P>_seedS/ (OUT:
out/finetune_study, or out/finetune_study_<world>) and are reused once finished. The probe's
recipe is the official iNaturalist fine-tuning's as far as it applies (SGD, momentum 0.9, weight
decay 1e-4, batch 256, random-resized crops and flips) with this project's probe learning rate for
10 classes (0.03; RESULTS.md, the linear probe). Prints the table and writes OUT/results.json.
"""

import json
import os
import sys
import time
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import HERE, config_max_iters, finished, run, train, train_minutes  # noqa: E402
# runs.py put the project on the path
from configurator import POSITIVE, CommaList, configure  # noqa: E402
from demo import random_init_args  # noqa: E402
from pretexts import PRETEXTS  # noqa: E402
from safety import write_atomically  # noqa: E402

# ----------------------------------------------------------------------------------------------
data = 'data/shapes'             # a world with coco/, vocab.model and imagefolder/
config = 'config/shapes.py'      # the pretraining recipe; only the pretext and the seed change
pretexts: Annotated[str, CommaList(*PRETEXTS)] = 'bicaptioning,multilabel_classification,cappa'
seeds = '0'
epochs: POSITIVE = 30            # of the probe, frozen and fine-tuned alike
lr: POSITIVE = 0.03              # the new layer's
backbone_lr: POSITIVE = 0.01     # the backbone's, when it is fine-tuned
weight_decay = 1e-4              # the backbone's and the layer's when fine-tuned (the official)
out_dir = ''                     # default: out/finetune_study[_<world>]
# ----------------------------------------------------------------------------------------------
configure(globals())
pretext_list = pretexts.split(',')
seed_list = [int(s) for s in str(seeds).split(',')]
if not os.path.isdir(os.path.join(HERE, data, 'imagefolder')):
    raise SystemExit(f"error: {data}/imagefolder does not exist (the world's prepare script "
                     "writes it)")
world = os.path.basename(data.rstrip('/'))
out_dir = out_dir or 'out/finetune_study' + ('' if world == 'shapes' else f'_{world}')
os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)
iters = config_max_iters(config)


def top1(name, source_args, seed, mode):
    """probe.py's top-1 and minutes for one backbone, 'frozen' or 'finetuned'."""
    finetune = mode == 'finetuned'
    out_json = f'{out_dir}/probe_{name}_{mode}.json'
    tuning = ['--finetune=True', f'--backbone_lr={backbone_lr}',
              f'--weight_decay={weight_decay}'] if finetune else []  # frozen: the probe's, none
    run(['probe.py', f'--data_root={data}/imagefolder', *source_args, f'--seed={seed}',
         f'--epochs={epochs}', f'--lr={lr}', *tuning, f'--out_json={out_json}'],
        f'{out_dir}/probe_{name}_{mode}.log')
    with open(os.path.join(HERE, out_json)) as f:
        result = json.load(f)
    return result['top1'], result['minutes']


rows, t_start = [], time.time()
for seed in seed_list:
    backbones = []
    for pretext in pretext_list:
        run_dir = f'{out_dir}/{pretext}_seed{seed}'
        if not finished(run_dir, iters, pretext=pretext, seed=seed):
            print(f"{pretext}, seed {seed}: training into {run_dir}", flush=True)
            train(run_dir, [config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model',
                            f'--pretext={pretext}', f'--seed={seed}'])
        backbones.append((pretext, [f'--ckpt={run_dir}/ckpt.pt'], train_minutes(run_dir)))
    # the ResNet the runs started from (random_init_args' seed is probe.py's --seed too)
    random_args = [a for a in random_init_args(f'{run_dir}/ckpt.pt', seed)
                   if not a.startswith('--seed=')]
    for name, source_args, minutes in [('random init', random_args, 0.0), *backbones]:
        row = {'backbone': name, 'seed': seed, 'train_min': minutes}
        for mode in ('frozen', 'finetuned'):
            row[mode], row[f'{mode}_min'] = top1(f"{name.replace(' ', '_')}_seed{seed}",
                                                 source_args, seed, mode)
        rows.append(row)
        print(f"{name}, seed {seed}: top-1 frozen {row['frozen']:.2f}, fine-tuned "
              f"{row['finetuned']:.2f}", flush=True)
write_atomically(os.path.join(HERE, out_dir, 'results.json'),
                 lambda f: f.write(json.dumps(rows, indent=1).encode()))

print(f"\n{'backbone':<27}{'seed':>5}{'frozen':>8}{'fine-tuned':>11}{'probe min':>10}"
      f"{'train min':>10}")
for r in rows:
    print(f"{r['backbone']:<27}{r['seed']:>5}{r['frozen']:>8.2f}{r['finetuned']:>11.2f}"
          f"{r['frozen_min'] + r['finetuned_min']:>10.1f}{r['train_min']:>10.1f}")
print(f"\nwall time {(time.time() - t_start) / 60:.1f} min")

"""
Dev: classes that no label names, the paper's ImageNet probe at this scale. There COCO's 80 labels
never name most of ImageNet's classes, and captions beat labels (53.8 against 46.2 top-1). Here the
multilabel pretext learns only the first half of the world's categories (train.py
--label_categories=...), on the same images and the same schedule: the other half is never a label,
though the captions name it. Every backbone is then judged by evaluate.py on the world's VOC task,
and its per-class APs are averaged over each half: the taught half and the unnamed half.

  python dev/unnamed_classes.py                       # seed 0, the shapes world
  python dev/unnamed_classes.py --seeds=0,1
  python dev/unnamed_classes.py --data=data/objects

The runs, each `python train.py config/shapes.py --seed=S` with
  bicaptioning             --pretext=bicaptioning
  labels, all categories   --pretext=multilabel_classification
  labels, the taught half  --pretext=multilabel_classification --label_categories=<first half>
and the random init they start from. Runs go to OUT/<name>_seedS/ (OUT: out/unnamed_classes, or
out/unnamed_classes_<world> for another world) and are reused once finished. Prints the table and
writes OUT/results.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (HERE, config_max_iters, finished, judge, random_init_args,  # noqa: E402
                  train, train_minutes)
from coco import read_instances  # noqa: E402  (runs.py put the repository on the path)
from configurator import configure  # noqa: E402
from safety import write_atomically  # noqa: E402
from evaluate import read_voc_task  # noqa: E402

# ----------------------------------------------------------------------------------------------
data = 'data/shapes'
config = 'config/shapes.py'
seeds = '0'
out_dir = ''                # default: out/unnamed_classes[_<world>]
# ----------------------------------------------------------------------------------------------
configure(globals())
seed_list = [int(s) for s in str(seeds).split(',')]
world = os.path.basename(data.rstrip('/'))
out_dir = out_dir or 'out/unnamed_classes' + ('' if world == 'shapes' else f'_{world}')
voc = f'{data}/VOC2007'
try:
    categories, _ = read_instances(os.path.join(HERE, data, 'coco'), 'train2017')
    classes = read_voc_task(os.path.join(HERE, voc))['classes']
except (OSError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
if sorted(classes) != sorted(categories):
    raise SystemExit(f"error: {voc}'s classes are not the COCO categories of {data}/coco")
taught = categories[:len(categories) // 2]
unnamed = [c for c in classes if c not in taught]
iters = config_max_iters(config)
runs = {'bicaptioning': ['--pretext=bicaptioning'],
        'labels_all': ['--pretext=multilabel_classification'],
        'labels_half': ['--pretext=multilabel_classification',
                        f"--label_categories={','.join(taught)}"]}
print(f"taught half: {', '.join(taught)}; unnamed half: {', '.join(unnamed)}", flush=True)


def judged(name, run_dir, args):
    """A backbone's row: mAP over all classes, over the taught half and over the unnamed half."""
    judge(name, args, run_dir, data, [])
    with open(os.path.join(HERE, run_dir, f'{name}_voc.json')) as f:
        ap = {c: v['ap'] for c, v in json.load(f)['classes'].items()}
    return {'all': sum(ap.values()) / len(ap), 'taught': sum(ap[c] for c in taught) / len(taught),
            'unnamed': sum(ap[c] for c in unnamed) / len(unnamed)}


rows = []
for seed in seed_list:
    for name, args in runs.items():
        run_dir = f'{out_dir}/{name}_seed{seed}'
        expected = {'pretext': args[0].split('=')[1], 'seed': seed}
        if name == 'labels_half':
            expected['label_categories'] = ','.join(taught)
        if not finished(run_dir, iters, **expected):
            print(f"{name}, seed {seed}: training into {run_dir}", flush=True)
            train(run_dir, [config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model',
                            f'--seed={seed}', *args])
        row = {'backbone': name, 'seed': seed, 'train_min': train_minutes(run_dir),
               **judged(name, run_dir, [f'--ckpt={run_dir}/ckpt.pt'])}
        rows.append(row)
        print(f"{name}, seed {seed}: unnamed half {row['unnamed']:.2f}", flush=True)
    rows.append({'backbone': 'random_init', 'seed': seed, 'train_min': 0.0,
                 **judged('random_init', run_dir, random_init_args(f'{run_dir}/ckpt.pt', seed))})
write_atomically(os.path.join(HERE, out_dir, 'results.json'),
                 lambda f: f.write(json.dumps(rows, indent=1).encode()))

print(f"\n{'backbone':<14}{'seed':>5}{'all':>8}{'taught':>8}{'unnamed':>9}{'train min':>10}")
for r in rows:
    print(f"{r['backbone']:<14}{r['seed']:>5}{r['all']:>8.2f}{r['taught']:>8.2f}"
          f"{r['unnamed']:>9.2f}{r['train_min']:>10.1f}")

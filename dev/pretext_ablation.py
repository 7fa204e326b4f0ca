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
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from checkpoints import load_file  # noqa: E402
from configurator import configure  # noqa: E402
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
with open(os.path.join(HERE, config)) as f:
    max_iters = int(re.search(r'^max_iters\s*=\s*([\d_]+)', f.read(), re.M).group(1))
voc = f'--voc_root={data}/VOC2007'


def run(args, log_path):
    """A project script, its output kept in log_path; returns the output."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True)
    with open(os.path.join(HERE, log_path), 'w') as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(args)} failed; its output is in {log_path}")
    print(f"  {os.path.basename(args[0])} done in {time.time() - t0:.0f} s", flush=True)
    return proc.stdout


def finished(run_dir, pretext, seed):
    """True if run_dir holds the last checkpoint of train.py with this pretext and seed."""
    path = os.path.join(HERE, run_dir, 'ckpt.pt')
    if not os.path.exists(path):
        return False
    ckpt = load_file(path)
    cfg = ckpt['config']
    saved_pretext = cfg.get('pretext', 'bicaptioning' if cfg.get('bidirectional', True) else 'captioning')
    return saved_pretext == pretext and cfg['seed'] == seed and ckpt['iter_num'] == cfg['max_iters'] == max_iters


def train_minutes(run_dir):
    """Training minutes of a run, from its log's last record."""
    with open(os.path.join(HERE, run_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r['event'] == 'train'][-1]['time'] / 60


def voc_map(output):
    return float(re.findall(r'^mAP: ([\d.]+)', output, re.M)[-1])


os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)
results = {}  # (pretext, seed) -> {'map':, 'train_min':}
t_start = time.time()
for seed in seed_list:
    print(f"seed {seed}: random init", flush=True)
    output = run(['evaluate.py', voc, '--init=random', '--visual=resnet18', '--image_size=64',
                  '--zero_init_residual=False', f'--seed={seed}'], f'{out_dir}/random_seed{seed}.log')
    results[('random init', seed)] = {'map': voc_map(output), 'train_min': 0.0}
    for pretext in pretext_list:
        run_dir = f'{out_dir}/{pretext}_seed{seed}'
        demo_dir = f'out/demo_seed{seed}'
        if pretext == 'bicaptioning' and not finished(run_dir, pretext, seed) and finished(demo_dir, pretext, seed):
            run_dir = demo_dir
        os.makedirs(os.path.join(HERE, run_dir), exist_ok=True)
        if finished(run_dir, pretext, seed):
            print(f"seed {seed}: {pretext}: trained already in {run_dir}", flush=True)
        else:
            print(f"seed {seed}: {pretext}: training into {run_dir}", flush=True)
            if os.path.exists(os.path.join(HERE, run_dir, 'log.jsonl')):
                os.remove(os.path.join(HERE, run_dir, 'log.jsonl'))  # a stale log of an unfinished run
            run(['train.py', config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model', f'--pretext={pretext}',
                 f'--seed={seed}', f'--out_dir={run_dir}'], f'{run_dir}/train.log')
        output = run(['evaluate.py', voc, f'--ckpt={run_dir}/ckpt.pt'], f'{run_dir}/evaluate.log')
        results[(pretext, seed)] = {'map': voc_map(output), 'train_min': train_minutes(run_dir), 'run': run_dir}
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

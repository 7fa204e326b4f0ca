"""
Which pretraining recipe for the CPU demo: the same ResNet-18 bicaptioning run of config/shapes.py
with a few flags changed per variant, each backbone judged by the demo's VOC07 SVMs, with the
training time beside it.

  python dev/recipe_study.py                                  # every variant below, seed 0
  python dev/recipe_study.py --variants=old,new --seeds=0,1   # some variants, two seeds

A variant is `python train.py config/shapes.py <its flags> --seed=S` into
out/recipe/<variant>_seedS/, then `python evaluate.py --ckpt=...`. A run that already finished with
the same flags is evaluated again, not retrained.
Prints a table (mAP per seed, the gain over random init, minutes of training and ms per iteration)
and writes out/recipe/results.json. Run nothing else meanwhile: the times are the point.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import HERE, random_init_map, train, train_minutes, voc_map  # noqa: E402
from safety import load_file  # noqa: E402  (runs.py put the repository on the path)
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------------------------
data = 'data/shapes'
config = 'config/shapes.py'
variants = 'old,bf16_1000,bf16_1000_lr2x,bf16_1000_no_lookahead,bf16_b32_2000'
seeds = '0'
out_dir = 'out/recipe'
# ----------------------------------------------------------------------------------------------
# the flags of each variant on top of `config` (the old demo recipe is pinned in full, whatever the
# file says)
OLD = ['--max_iters=2500', '--batch_size=64', '--cnn_lr=0.002', '--lr=0.0005', '--warmup_iters=50',
       '--dtype=float32', '--optimizer=adamw', '--lookahead_alpha=0.5', '--n_layer=1',
       '--n_embd=256', '--visual=resnet18', '--image_size=64', '--eval_interval=500',
       '--eval_iters=8']
VARIANTS = {
    'old': OLD,
    'bf16_1000': OLD + ['--dtype=bfloat16', '--max_iters=1000'],
    'bf16_1000_lr2x': OLD + ['--dtype=bfloat16', '--max_iters=1000', '--cnn_lr=0.004',
                             '--lr=0.001'],
    'bf16_1000_no_lookahead': OLD + ['--dtype=bfloat16', '--max_iters=1000',
                                     '--lookahead_alpha=1.0'],
    'bf16_b32_2000': OLD + ['--dtype=bfloat16', '--max_iters=2000', '--batch_size=32'],
    'bf16_b16_4000': OLD + ['--dtype=bfloat16', '--max_iters=4000', '--batch_size=16'],
    'bf16_b128_1250': OLD + ['--dtype=bfloat16', '--max_iters=1250', '--batch_size=128'],
    'bf16_b256_625': OLD + ['--dtype=bfloat16', '--max_iters=625', '--batch_size=256'],
}
configure(globals())
variant_list, seed_list = variants.split(','), [int(s) for s in str(seeds).split(',')]
unknown = [v for v in variant_list if v not in VARIANTS]
if unknown:
    raise SystemExit(f"error: --variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
voc = f'{data}/VOC2007'
os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)


def finished_with(run_dir, flags):
    """True if run_dir holds the last checkpoint of a run whose config has every flag's value."""
    path = os.path.join(HERE, run_dir, 'ckpt.pt')
    if not os.path.exists(path):
        return False
    saved = load_file(path)
    wanted = dict(flag[2:].split('=', 1) for flag in flags)
    same = all(str(saved['config'][k]) == v for k, v in wanted.items())
    return same and saved['iter_num'] == saved['config']['max_iters']


def median_ms(run_dir):
    """The median of the log's ms/iteration windows (the first window holds the warm-up)."""
    with open(os.path.join(HERE, run_dir, 'log.jsonl')) as f:
        windows = sorted(r['ms'] for r in map(json.loads, f) if r['event'] == 'train')
    return windows[len(windows) // 2]


results, t_start = {}, time.time()
for seed in seed_list:
    for variant in variant_list:
        run_dir = f'{out_dir}/{variant}_seed{seed}'
        flags = VARIANTS[variant] + [f'--seed={seed}']
        if finished_with(run_dir, flags):
            print(f"seed {seed}: {variant}: trained already in {run_dir}", flush=True)
        else:
            print(f"seed {seed}: {variant}: training into {run_dir}", flush=True)
            train(run_dir,
                  [config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model', *flags])
        results[(variant, seed)] = {
            'map': voc_map([f'--voc_root={voc}', f'--ckpt={run_dir}/ckpt.pt'],
                           f'{run_dir}/evaluate.log'),
                                    'train_min': train_minutes(run_dir),
            'ms_iter': median_ms(run_dir)}
        print(f"seed {seed}: {variant}: VOC07 mAP {results[(variant, seed)]['map']:.2f}",
              flush=True)
    results[('random init', seed)] = {
        'map': random_init_map(voc, seed, f'{out_dir}/random_seed{seed}.log', run_dir)}

print(f"\n{'variant':<26}" + ''.join(f"{'seed ' + str(s):>9}" for s in seed_list)
      + f"{'vs random':>11}{'train min':>11}{'ms/iter':>9}")
for variant in ['random init'] + variant_list:
    maps = [results[(variant, s)]['map'] for s in seed_list]
    gain = sum(m - results[('random init', s)]['map']
               for m, s in zip(maps, seed_list)) / len(seed_list)
    line = f"{variant:<26}" + ''.join(f"{m:>9.2f}" for m in maps)
    if variant != 'random init':
        minutes = sum(results[(variant, s)]['train_min'] for s in seed_list) / len(seed_list)
        ms = sum(results[(variant, s)]['ms_iter'] for s in seed_list) / len(seed_list)
        line += f"{gain:>+11.2f}{minutes:>11.1f}{ms:>9.0f}"
    print(line)
print(f"\nwall time {(time.time() - t_start) / 60:.1f} min")
with open(os.path.join(HERE, out_dir, 'results.json'), 'w') as f:
    json.dump([{'variant': v, 'seed': s, 'flags': VARIANTS.get(v), **r}
               for (v, s), r in results.items()], f, indent=1)

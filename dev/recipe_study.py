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
QUICK_32 = OLD + ['--max_iters=700', '--image_size=32', '--eval_interval=700']
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
    # a first run in minutes (demo.py --quick=True): about 3.5 minutes of float32 steps on 2 AVX2
    # cores, spent at the demo's 64 px, or on more images at 48 or 32 px, or on fewer distinct ones
    'quick_64_400': OLD + ['--max_iters=400', '--eval_interval=400'],
    'quick_48_550': OLD + ['--max_iters=550', '--image_size=48', '--eval_interval=550'],
    'quick_32_700': QUICK_32,
    'quick_64_400_4k': OLD + ['--max_iters=400', '--eval_interval=400', '--train_fraction=0.4'],
    # at 32 px: faster learning for the short run, without LookAhead's pull back, or with the
    # backbone at twice its learning rate
    'quick_32_700_nola': QUICK_32 + ['--lookahead_alpha=1.0'],
    'quick_32_700_cnn4': QUICK_32 + ['--cnn_lr=0.004'],
    'quick_32_700_nola_cnn4': QUICK_32 + ['--lookahead_alpha=1.0', '--cnn_lr=0.004'],
    # more steps at 32 px, or a smaller image still
    'quick_32_1000': OLD + ['--max_iters=1000', '--image_size=32', '--eval_interval=1000'],
    'quick_32_1300': OLD + ['--max_iters=1300', '--image_size=32', '--eval_interval=1300'],
    'quick_24_900': OLD + ['--max_iters=900', '--image_size=24', '--eval_interval=900'],
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
        size = load_file(os.path.join(HERE, run_dir, 'ckpt.pt'))['config']['image_size']
        if ('random init', size, seed) not in results:  # the same ResNet at random init, same size
            results[('random init', size, seed)] = {'map': random_init_map(
                voc, seed, f'{out_dir}/random_{size}px_seed{seed}.log', run_dir)}
        results[(variant, seed)]['random'] = results[('random init', size, seed)]['map']

print(f"\n{'variant':<26}" + ''.join(f"{'seed ' + str(s):>9}" for s in seed_list)
      + f"{'vs random':>11}{'train min':>11}{'ms/iter':>9}")
for (variant, *size_seed), r in results.items():
    if variant == 'random init':
        print(f"{f'random init, {size_seed[0]} px':<26}{'seed ' + str(size_seed[1]):>9} "
              f"{r['map']:.2f}")
for variant in variant_list:
    runs = [results[(variant, s)] for s in seed_list]
    gain = sum(r['map'] - r['random'] for r in runs) / len(runs)
    minutes = sum(r['train_min'] for r in runs) / len(runs)
    ms = sum(r['ms_iter'] for r in runs) / len(runs)
    print(f"{variant:<26}" + ''.join(f"{r['map']:>9.2f}" for r in runs)
          + f"{gain:>+11.2f}{minutes:>11.1f}{ms:>9.0f}")
print(f"\nwall time {(time.time() - t_start) / 60:.1f} min")
with open(os.path.join(HERE, out_dir, 'results.json'), 'w') as f:
    json.dump([{'variant': v, 'seed': k[-1], 'flags': VARIANTS.get(v), **r}
               for (v, *k), r in results.items()], f, indent=1)

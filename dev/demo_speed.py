"""
The demo against an earlier version of itself, side by side on one machine: each from a fresh clone
of its commit (so data generation and the vocabulary are part of the time, as for a newcomer), one
after the other, never at once.

  python dev/demo_speed.py                      # f9db9ea (fp32, batch 64, 2500 iterations) vs HEAD
  python dev/demo_speed.py --seeds=0,1 --before=f9db9ea --after=HEAD
  python dev/demo_speed.py --pretrain_iters=150 # each commit's pretraining alone, 150 iterations

With --pretrain_iters=N each commit's clone runs only its own `train.py config/shapes.py` for N
iterations (after its demo generated the data and vocabulary once) and the ratio is of the
ms/iteration.
Prints, per commit and seed, the demo's total minutes, its pretraining minutes and img/s, and its
VOC mAP gain over random init, then the ratio of the total times. Clones go to
out/demo_speed/<commit>/ and are kept (their out/ holds the runs). Run nothing else meanwhile: the
times are the point.
"""

import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import HERE, clone  # noqa: E402
# runs.py put the repository on the path
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the demo of fp32, batch 64, 2500 iterations (15.5 min on the machine it was tuned on)
before = 'f9db9ea'
after = 'HEAD'
seeds = '0'
out_dir = 'out/demo_speed'
pretrain_iters = 0          # > 0: time only this many pretraining iterations per commit
# ----------------------------------------------------------------------------------------------
configure(globals())


def summary_value(text, label):
    """The value of a 'label  value' line of the demo's summary (both versions print one)."""
    match = re.search(rf'^{re.escape(label)}\s+(.+)$', text, re.M)
    if not match:
        raise SystemExit(f"error: the demo printed no '{label}' line")
    return match.group(1).strip()


if pretrain_iters > 0:
    ms_per_iter = {}
    for commit in (before, after):
        folder = clone(commit, os.path.join(HERE, out_dir, commit))
        if not os.path.exists(os.path.join(folder, 'data/shapes/vocab.model')):
            raise SystemExit(f"error: {folder} has no data/shapes/vocab.model; run its demo "
                             "once first")
        args = ['train.py', 'config/shapes.py', f'--max_iters={pretrain_iters}',
                '--eval_interval=100000',
                f'--out_dir=out/pretrain_{pretrain_iters}_{time.time():.0f}']
        print(f"{commit}: python {' '.join(args)}", flush=True)
        proc = subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"error: the pretraining of {commit} failed:\n{proc.stderr[-2000:]}")
        done = re.findall(r'^done: .*', proc.stdout, re.M)[-1]
        ms_per_iter[commit] = float(re.search(r'([0-9.]+) ms/iter', done).group(1))
        print(f"  {done}", flush=True)
    print(f"{before} {ms_per_iter[before]:.0f} ms/iter -> {after} {ms_per_iter[after]:.0f} "
          f"ms/iter: {ms_per_iter[before] / ms_per_iter[after]:.2f}x faster")
    raise SystemExit(0)

rows = []
for commit in (before, after):
    folder = clone(commit, os.path.join(HERE, out_dir, commit))
    for seed in str(seeds).split(','):
        print(f"{commit}, seed {seed}: python demo.py --seed={seed}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, 'demo.py', f'--seed={seed}'], cwd=folder,
                              capture_output=True, text=True)
        minutes = (time.time() - t0) / 60
        with open(os.path.join(folder, f'demo_seed{seed}.log'), 'w') as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode:
            raise SystemExit(f"error: the demo of {commit} failed; its output is in "
                             f"{folder}/demo_seed{seed}.log")
        train = re.findall(r'^done: .*', proc.stdout, re.M)[-1]
        rows.append((commit, seed, minutes, summary_value(proc.stdout, 'difference'), train))
        print(f"  {minutes:.1f} min; mAP gain {rows[-1][3]}; {train}", flush=True)

print(f"\n{'commit':<10}{'seed':>5}{'minutes':>9}  {'mAP gain':>9}  pretraining")
for commit, seed, minutes, gain, train in rows:
    print(f"{commit:<10}{seed:>5}{minutes:>9.1f}  {gain:>9}  {train}")
for seed in str(seeds).split(','):
    old, new = (next(r[2] for r in rows if r[0] == c and r[1] == seed) for c in (before, after))
    print(f"seed {seed}: {old:.1f} min -> {new:.1f} min, {old / new:.2f}x faster")

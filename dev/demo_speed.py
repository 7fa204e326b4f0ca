"""
The demo against an earlier version of itself, side by side on one machine: each from a fresh clone of its commit
(so data generation and the vocabulary are part of the time, as for a newcomer), one after the other, never at once.

  python dev/demo_speed.py                                  # f9db9ea (fp32, batch 64, 2500 iterations) vs HEAD
  python dev/demo_speed.py --seeds=0,1 --before=f9db9ea --after=HEAD

Prints, per commit and seed, the demo's total minutes, its pretraining minutes and img/s, and its VOC mAP gain
over random init, then the ratio of the total times. Clones go to out/demo_speed/<commit>/ and are kept (their
out/ holds the runs). Run nothing else meanwhile: the times are the point.
"""

import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------------------------
before = 'f9db9ea'          # the demo of fp32, batch 64, 2500 iterations (15.5 min on the machine it was tuned on)
after = 'HEAD'
seeds = '0'
out_dir = 'out/demo_speed'
# ----------------------------------------------------------------------------------------------
if configure(globals()):
    raise SystemExit("error: this script takes only --key=value flags")


def summary_value(text, label):
    """The value of a 'label  value' line of the demo's summary (both versions print one)."""
    match = re.search(rf'^{re.escape(label)}\s+(.+)$', text, re.M)
    if not match:
        raise SystemExit(f"error: the demo printed no '{label}' line")
    return match.group(1).strip()


rows = []
for commit in (before, after):
    folder = os.path.join(HERE, out_dir, commit)
    if not os.path.exists(folder):
        subprocess.run(['git', 'clone', '--quiet', HERE, folder], check=True)
        subprocess.run(['git', '-C', folder, 'checkout', '--quiet', commit], check=True)
    for seed in str(seeds).split(','):
        print(f"{commit}, seed {seed}: python demo.py --seed={seed}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, 'demo.py', f'--seed={seed}'], cwd=folder, capture_output=True, text=True)
        minutes = (time.time() - t0) / 60
        with open(os.path.join(folder, f'demo_seed{seed}.log'), 'w') as f:
            f.write(proc.stdout + proc.stderr)
        if proc.returncode:
            raise SystemExit(f"error: the demo of {commit} failed; its output is in {folder}/demo_seed{seed}.log")
        train = re.findall(r'^done: .*', proc.stdout, re.M)[-1]
        rows.append((commit, seed, minutes, summary_value(proc.stdout, 'difference'), train))
        print(f"  {minutes:.1f} min; mAP gain {rows[-1][3]}; {train}", flush=True)

print(f"\n{'commit':<10}{'seed':>5}{'minutes':>9}  {'mAP gain':>9}  pretraining")
for commit, seed, minutes, gain, train in rows:
    print(f"{commit:<10}{seed:>5}{minutes:>9.1f}  {gain:>9}  {train}")
for seed in str(seeds).split(','):
    old, new = (next(r[2] for r in rows if r[0] == c and r[1] == seed) for c in (before, after))
    print(f"seed {seed}: {old:.1f} min -> {new:.1f} min, {old / new:.2f}x faster")

"""
Helpers of the dev experiments that train and judge several backbones (pretext_ablation.py,
data_efficiency.py, recipe_study.py, demo_speed.py, same_losses.py): run a project script with its
output kept in a log (demo.py's runner), clone a commit, tell a finished train.py run from an
unfinished one, read the numbers the scripts print last.
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
from demo import random_init_args, run_logged  # noqa: E402


def run(args, log_path):
    """A project script (paths relative to the repository), its output kept in log_path; returns its
    output."""
    t0 = time.time()
    lines = run_logged(args, log_path, echo=False)
    print(f"  {os.path.basename(args[0])} done in {time.time() - t0:.0f} s", flush=True)
    return ''.join(lines)


def clone(commit, folder):
    """folder/, a clone of this repository checked out at commit (made once, then reused)."""
    if not os.path.exists(folder):
        subprocess.run(['git', 'clone', '--quiet', HERE, folder], check=True)
        subprocess.run(['git', '-C', folder, 'checkout', '--quiet', commit], check=True)
    return folder


def config_max_iters(config):
    """max_iters as a config/*.py file sets it."""
    with open(os.path.join(HERE, config)) as f:
        return int(re.search(r'^max_iters\s*=\s*([\d_]+)', f.read(), re.M).group(1))


def finished(run_dir, max_iters, **expected):
    """True if run_dir holds train.py's last checkpoint of a max_iters run whose config has the
    expected values."""
    path = os.path.join(HERE, run_dir, 'ckpt.pt')
    if not os.path.exists(path):
        return False
    ckpt = load_file(path)
    cfg = ckpt['config']
    return ckpt['iter_num'] == cfg['max_iters'] == max_iters and all(cfg.get(k) == v
                                                                     for k, v in expected.items())


def train(run_dir, args):
    """train.py with args into run_dir, from the start (the callers skip runs that finished: see
    finished())."""
    os.makedirs(os.path.join(HERE, run_dir), exist_ok=True)
    run(['train.py', *args, f'--out_dir={run_dir}', '--overwrite=True'], f'{run_dir}/train.log')


def train_minutes(run_dir):
    """Training minutes of a run, from its log's last record."""
    with open(os.path.join(HERE, run_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r['event'] == 'train'][-1]['time'] / 60


def voc_map(args, log_path):
    """evaluate.py's VOC07 mAP with these arguments (e.g. ['--voc_root=...', '--ckpt=...'], or
    ['--features=...'])."""
    output = run(['evaluate.py', *args], log_path)
    return float(re.findall(r'^mAP: ([\d.]+)', output, re.M)[-1])


def random_init_map(voc_root, seed, log_path, run_dir):
    """The baseline every table shows: the ResNet a run in run_dir started from, at random init."""
    return voc_map([f'--voc_root={voc_root}', *random_init_args(f'{run_dir}/ckpt.pt', seed)],
                   log_path)

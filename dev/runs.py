"""
Helpers of the dev experiments that train and judge several backbones (pretext_ablation.py,
data_efficiency.py, recipe_study.py, demo_speed.py, same_losses.py, ...): run a project script with
its output kept in a log (demo.py's runner), clone a commit, tell a finished train.py run from an
unfinished one, read the numbers the scripts print last, judge a backbone on a world's VOC task and
its attribute tasks.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from safety import load_file  # noqa: E402
from demo import random_init_args, run_logged  # noqa: E402
from evaluate import read_voc  # noqa: E402


def run(args, log_path, each_line=None):
    """A project script (paths relative to the repository), its output kept in log_path; returns its
    output."""
    t0 = time.time()
    lines = run_logged(args, log_path, echo=False, each_line=each_line)
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


def train(run_dir, args, keep_checkpoints=False):
    """train.py with args into run_dir: on from its checkpoint where a run stopped part-way there (a
    signal, a machine restart; train.py refuses one of another config), else from the start. The
    callers skip runs that finished: see finished(). keep_checkpoints: a copy of each checkpoint as
    it lands, ckpt_<iteration>.pt (train.py replaces ckpt.pt at the next save, minutes later)."""
    os.makedirs(os.path.join(HERE, run_dir), exist_ok=True)
    path, stopped = os.path.join(HERE, run_dir, 'ckpt.pt'), False
    if os.path.exists(path):
        ckpt = load_file(path)
        stopped = ckpt['iter_num'] < ckpt['config']['max_iters']

    def keep(line):
        saved = re.match(r'iter (\d+): saved .*ckpt\.pt$', line.strip())
        if keep_checkpoints and saved:
            shutil.copy(path, os.path.join(HERE, run_dir, f'ckpt_{saved[1]}.pt'))
    if stopped:  # its log.jsonl goes on; train.log keeps the first part's output
        run(['train.py', *args, f'--out_dir={run_dir}', '--init_from=resume'],
            f'{run_dir}/train_resumed.log', keep)
    else:
        run(['train.py', *args, f'--out_dir={run_dir}', '--overwrite=True'], f'{run_dir}/train.log',
            keep)


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


def attribute_tasks(data):
    """The attribute tasks of the world in data/ (prepare.py's attributes/<a>/), but category and
    those that a small world left out (their LEFT_OUT.txt says why: noted)."""
    folder = os.path.join(HERE, data, 'attributes')
    names = sorted(a for a in os.listdir(folder) if os.path.isdir(os.path.join(folder, a)))
    left_out = [a for a in names
                if os.path.exists(os.path.join(HERE, data, 'attributes', a, 'LEFT_OUT.txt'))]
    if left_out:
        print(f"note: {data}/attributes: {', '.join(left_out)} left out when the world was written")
    return [a for a in names if a not in left_out and a != 'category']


def judge(name, source_args, folder, data, attributes):
    """{'category': mAP, attribute: mAP, ...} of one backbone (evaluate.py's source_args): its
    features on data/VOC2007 extracted once and judged on the VOC classes (each class's AP in
    folder/<name>_voc.json), then the SVMs alone on each attribute's labels of the same images."""
    voc, features = f'{data}/VOC2007', f'{folder}/{name}_features.npz'
    args = [f'--voc_root={voc}', *source_args, f'--out_json={folder}/{name}_voc.json']
    maps = {'category': voc_map(args + ([f'--save_features={features}'] if attributes else []),
                                f'{folder}/{name}_voc.log')}
    if not attributes:
        return maps
    with np.load(os.path.join(HERE, features)) as saved:
        arrays = {k: saved[k] for k in saved.files}
    for attribute in attributes:
        labels = {}
        for split, key in (('trainval', 'train_y'), ('test', 'test_y')):
            paths, labels[key], names = read_voc(os.path.join(HERE, data, 'attributes', attribute),
                                                 split)
            same = list(map(os.path.basename, read_voc(os.path.join(HERE, voc), split)[0]))
            assert list(map(os.path.basename, paths)) == same, \
                f'{attribute}: other images than VOC2007'
        path = f'{folder}/{name}_{attribute}.npz'
        np.savez(os.path.join(HERE, path), train_x=arrays['train_x'], test_x=arrays['test_x'],
                 **labels, class_names=np.array(names))
        maps[attribute] = voc_map([f'--features={path}'], f'{folder}/{name}_{attribute}.log')
        os.remove(os.path.join(HERE, path))
    return maps


def plot_panels(path, rows, panels, x_key, x_text, width=900, height=300):
    """A PNG (PIL only) of side-by-side panels, one per (title, key) of `panels`: r[key] against
    r[x_key] (log axis, ticks labelled x_text(x)), a line per r['pretext']; rows without the key
    are left out of its panel."""
    image = Image.new('RGB', (width, height), 'white')
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    colours = [(40, 80, 200), (200, 60, 40), (40, 150, 60), (150, 60, 160), (90, 90, 90)]
    xs = sorted({r[x_key] for r in rows})
    for p, (title, key) in enumerate(panels):
        left, top = 50 + p * width // len(panels), 30
        right, bottom = left + width // len(panels) - 70, height - 40
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            continue
        lo, hi = min(values), max(values)
        lo, hi = lo - 0.1 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1)

        def xy(x, value):
            share = math.log(x / xs[0]) / math.log(xs[-1] / xs[0]) if len(xs) > 1 else 0.5
            return (left + (right - left) * share,
                    bottom - (bottom - top) * (value - lo) / (hi - lo))
        draw.rectangle((left, top, right, bottom), outline='black')
        draw.text((left, 10), title, fill='black', font=font)
        for x in xs:
            draw.text((xy(x, lo)[0] - 12, bottom + 6), x_text(x), fill='black', font=font)
        for value in (lo, (lo + hi) / 2, hi):
            draw.text((left - 44, xy(xs[0], value)[1] - 6), f"{value:.2f}", fill='black',
                      font=font)
        for i, pretext in enumerate(sorted({r['pretext'] for r in rows})):
            colour = colours[i % len(colours)]
            line = [xy(r[x_key], r[key]) for r in sorted(rows, key=lambda r: r[x_key])
                    if r['pretext'] == pretext and r.get(key) is not None]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            for x, y in line:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            if line:
                draw.text((left + 6, top + 6 + 14 * i), pretext, fill=colour, font=font)
    image.save(path)

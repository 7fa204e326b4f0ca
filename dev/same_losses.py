"""
Does a change keep the function the model trains? Two commits' train.py run the demo's config on the
same data, seed and float32 for a few iterations, logging the loss of every iteration, and the two
logs are compared bit for bit; then each commit's evaluate.py judges the earlier commit's
checkpoint, and the per-class APs are compared the same way. A refactoring must give the same
numbers; a change of numerics (a fused optimizer) shows where it starts to differ and by how much.

  python dev/same_losses.py                 # f9db9ea vs HEAD, 100 iterations
  python dev/same_losses.py --foreach=True  # both commits' fused optimizers set to foreach

Both run from fresh clones in out/same_losses/<commit>/ (kept), on this checkout's
data/shapes/ (python demo.py or data/shapes/prepare.py + tokenizer.py make it). With --foreach=True
each commit's clone has `fused=True` replaced by `foreach=True` in its train.py (a commit from
before the fused optimizers keeps its foreach ones), in a folder of its own.
"""

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import HERE, clone  # noqa: E402
# runs.py put the repository on the path
from configurator import configure  # noqa: E402

# ----------------------------------------------------------------------------------------------
before = 'f9db9ea'
after = 'HEAD'
iters = 100
foreach = False             # True: both commits' optimizers foreach, not fused
# ----------------------------------------------------------------------------------------------
configure(globals())
data = os.path.join(HERE, 'data/shapes')
if not os.path.exists(os.path.join(data, 'vocab.model')):
    raise SystemExit(f"error: {data}/vocab.model does not exist: run python demo.py once")


def losses(commit, name, patch=False):
    """({iteration: (loss, its terms)} of `iters` float32 iterations of commit's train.py, the
    clone's folder)."""
    folder = clone(commit, os.path.join(HERE, 'out/same_losses', name))
    if patch:
        path = os.path.join(folder, 'train.py')
        with open(path) as f:
            text = f.read()
        if 'fused=True' not in text and 'foreach=True' not in text:
            raise SystemExit(f"error: {path} builds neither a fused nor a foreach optimizer")
        with open(path, 'w') as f:
            f.write(text.replace('fused=True', 'foreach=True'))
    run_dir = os.path.join(folder, 'out/same_losses')
    args = ['train.py', 'config/shapes.py', f'--data_root={data}/coco',
            f'--tokenizer={data}/vocab.model', f'--max_iters={iters}', '--log_interval=1',
            '--eval_interval=0', f'--ckpt_interval={iters}', '--dtype=float32',
            f'--out_dir={run_dir}']
    # the clone's own run of last time goes (f9db9ea's train.py has no --overwrite)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"{name}: python {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: {name}'s train.py failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    per_iteration = {r['iter']: tuple(v for k, v in sorted(r.items()) if k.startswith('loss'))
                     for r in records if r['event'] == 'train'}
    return per_iteration, folder


def class_aps(commit_folder, ckpt):
    """{class: {'ap':, 'cost':, 'cv_ap':}} of the commit's evaluate.py on ckpt."""
    out_json = os.path.join(commit_folder, 'out/same_losses/voc.json')
    args = ['evaluate.py', f'--ckpt={ckpt}', f'--voc_root={data}/VOC2007', f'--out_json={out_json}']
    proc = subprocess.run([sys.executable, *args], cwd=commit_folder, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"error: evaluate.py in {commit_folder} failed:\n{proc.stderr[-2000:]}")
    with open(out_json) as f:
        result = json.load(f)
    print(f"{os.path.basename(commit_folder)}: evaluate.py: mAP {result['mAP']:.2f}", flush=True)
    return result['classes']


# names that stay true when HEAD moves on
before, after = (subprocess.run(['git', '-C', HERE, 'rev-parse', '--short', c], check=True,
                                capture_output=True, text=True).stdout.strip()
                 for c in (before, after))
old, old_folder = losses(before, before + ('-foreach' if foreach else ''), patch=foreach)
new, new_folder = losses(after, after + ('-foreach' if foreach else ''), patch=foreach)
same = [i for i in sorted(old) if old[i] == new.get(i)]
first_diff = next((i for i in sorted(old) if old[i] != new.get(i)), None)
print(f"\n{len(same)} of {len(old)} iterations have bitwise equal losses")
if first_diff is None:
    print(f"the same function: every loss of {before} and {after} agrees to the last bit")
else:
    worst = max(abs(a - b) for i in old for a, b in zip(old[i], new[i]))
    print(f"first difference at iteration {first_diff}: {old[first_diff]} vs {new[first_diff]}; "
          f"largest difference in {iters} iterations {worst:.2e}")
old_ckpt = os.path.join(old_folder, 'out/same_losses/ckpt.pt')
old_aps, new_aps = (class_aps(folder, old_ckpt) for folder in (old_folder, new_folder))
print("evaluate.py: " + ("the same per-class APs and costs to the last bit" if old_aps == new_aps
                         else "the per-class results differ"))

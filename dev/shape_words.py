"""
Dev: the category gap between captions and labels on the shapes world, word by word, against the
number of images seen. Per pretext and schedule: `python train.py config/shapes.py --pretext=P
--max_iters=2500*M --seed=S` (M times the demo's 160k images, the warmup unchanged), then the
backbone's VOC07 mAP on the category task and the mean of the world's attribute tasks (what the
captions name beyond the category), and for the captioners the last validation's image gap, whole
(train.py logs it) and per word class (dev/word_classes.py: nats per word that the image is worth,
shape words, colour words, ...), and caption.py on the 1000 val images: the share of each class's
generated words that are true of the image (precision) and of the image's facts named (recall).

  python dev/shape_words.py                                  # bicaptioning and labels, 1x
  python dev/shape_words.py --multiples=1,2,4                # the curve: 160k, 320k, 640k images
  python dev/shape_words.py --pretexts=bicaptioning --lever=--image_size=96   # one lever
  python dev/shape_words.py --pretexts=bicaptioning --lever='--n_embd=512 --n_head=8'  # wider

Runs go to out/shape_words/<pretext>_x<M>[_<lever>]_seed<S>/ and are reused once finished. Prints a
table, writes out/shape_words/results.json (every row) and out/shape_words/curve.png (category mAP,
the shape words' image gap and precision against the images seen; PIL only).
"""

import json
import math
import os
import re
import sys
from typing import Annotated

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import (HERE, attribute_tasks, config_max_iters, finished, judge,  # noqa: E402
                  plot_panels, run, train, train_minutes)
# runs.py put the project on the path
from configurator import CommaList, configure  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from pretexts import CAPTIONERS, PRETEXTS  # noqa: E402
from safety import write_atomically  # noqa: E402
from word_classes import image_gap_by_word_class, word_scores  # noqa: E402

# ----------------------------------------------------------------------------------------------
data = 'data/shapes'
config = 'config/shapes.py'
pretexts: Annotated[str, CommaList(*PRETEXTS)] = 'bicaptioning,multilabel_classification'
multiples = '1'            # the demo's schedule times these (its 2500 iterations of 64 images)
seed = 0
lever = ''                 # train.py flags that make a lever, space-separated: --image_size=96
out_dir = 'out/shape_words'
# ----------------------------------------------------------------------------------------------
configure(globals())
multiple_list = [int(m) for m in str(multiples).split(',')]
lever_args = lever.split()
tag = re.sub(r'[^\w.=-]+', '_', '_'.join(a.lstrip('-') for a in lever_args))
for needed in ('coco/annotations/words_val2017.json', 'attributes'):
    if not os.path.exists(os.path.join(HERE, data, needed)):
        raise SystemExit(f"error: {data}/{needed} does not exist: make the world again with "
                         "data/shapes/prepare.py (it writes the word classes and attribute tasks)")
base_iters, attribute_names = config_max_iters(config), attribute_tasks(data)
os.makedirs(os.path.join(HERE, out_dir), exist_ok=True)


def last_val(run_dir):
    """The last validation record of a run's log."""
    with open(os.path.join(HERE, run_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['event'] == 'val'][-1]


def caption_words(run_dir):
    """{class: (named, precision %, recall %)} and CIDEr of caption.py on the val images."""
    output = run(['caption.py', f'--ckpt={run_dir}/ckpt.pt', f'--coco_root={data}/coco',
                  '--split=val2017', f'--out={run_dir}/captions_val.json'],
                 f'{run_dir}/caption.log')
    with open(os.path.join(HERE, run_dir, 'captions_val.json')) as f:
        captions = {e['image_id']: e['caption'] for e in json.load(f)}
    table = word_scores(captions, os.path.join(HERE, data, 'coco/annotations/words_val2017.json'))
    words = {m[0]: (int(m[1]), float(m[2]), float(m[3]))
             for m in re.findall(r'^(\w+) +(\d+) +([\d.]+)% +([\d.]+)%', '\n'.join(table), re.M)}
    return words, float(re.findall(r'^CIDEr: ([\d.]+)', output, re.M)[-1])


results_path = os.path.join(HERE, out_dir, 'results.json')
rows = []
if os.path.exists(results_path):
    with open(results_path) as f:
        rows = json.load(f)
for multiple in multiple_list:
    for pretext in pretexts.split(','):
        iters = base_iters * multiple
        name = f"{pretext}_x{multiple}{'_' + tag if tag else ''}_seed{seed}"
        run_dir = f'{out_dir}/{name}'
        if not finished(run_dir, iters, pretext=pretext, seed=seed):
            print(f"{name}: training into {run_dir}", flush=True)
            train(run_dir, [config, f'--data_root={data}/coco', f'--tokenizer={data}/vocab.model',
                            f'--pretext={pretext}', f'--seed={seed}', f'--max_iters={iters}',
                            *lever_args], keep_checkpoints=pretext in CAPTIONERS)
        maps = judge('backbone', [f'--ckpt={run_dir}/ckpt.pt'], run_dir, data, attribute_names)
        row = {'run': name, 'pretext': pretext, 'multiple': multiple, 'lever': lever,
               'seed': seed, 'images': iters * 64, 'train_min': train_minutes(run_dir),
               'map': maps['category'], 'maps': maps,
               'attributes': sum(maps[a] for a in attribute_names) / len(attribute_names)}
        model, saved = load_checkpoint(os.path.join(HERE, run_dir, 'ckpt.pt'))
        # the last validation's gap per word class: the final checkpoint's weights
        gaps = image_gap_by_word_class(model.eval(), saved, os.path.join(HERE, data, 'coco')) \
            if pretext in CAPTIONERS else None
        if gaps:  # and at each validation of the run, from the checkpoints kept as it trained
            row['gaps_by_iter'] = {
                int(kept[5:-3]): image_gap_by_word_class(
                    load_checkpoint(os.path.join(HERE, run_dir, kept))[0].eval(), saved,
                    os.path.join(HERE, data, 'coco'))
                for kept in os.listdir(os.path.join(HERE, run_dir))
                if re.fullmatch(r'ckpt_\d+\.pt', kept)}
            for it, by_class in sorted(row['gaps_by_iter'].items()):
                print(f"{name}: iteration {it}: the image is worth, per word class: " + ', '.join(
                    f"{c} {g:.3f}" for c, g in by_class.items()), flush=True)
            words, row['cider'] = caption_words(run_dir)
            row.update(words=words, gaps=gaps, shape_gap=gaps['shape'],
                       image_gap=last_val(run_dir)['image_gap'],
                       shape_precision=words['shape'][1])
        rows = [r for r in rows if r['run'] != name] + [row]
        print(f"{name}: category mAP {row['map']:.2f}, attributes {row['attributes']:.2f}" + (
            f", shape words: gap {row['shape_gap']:.3f} nats, precision "
            f"{row['shape_precision']:.1f}%" if gaps else ''), flush=True)
        write_atomically(results_path, lambda f: f.write(json.dumps(rows, indent=1).encode()))

print(f"\n{'run':<46}{'mAP':>7}{'attrs':>7}{'shape gap':>10}{'colour gap':>11}{'shape %':>9}"
      f"{'colour %':>9}{'train min':>10}")
for r in sorted(rows, key=lambda r: (r['lever'], r['pretext'], r['multiple'])):
    gap = r.get('gaps', {})
    words = r.get('words', {})
    print(f"{r['run']:<46}{r['map']:>7.2f}{r.get('attributes', math.nan):>7.2f}"
          f"{gap.get('shape', math.nan):>10.3f}"
          f"{gap.get('colour', math.nan):>11.3f}{words.get('shape', [0, math.nan])[1]:>9.1f}"
          f"{words.get('colour', [0, math.nan])[1]:>9.1f}{r['train_min']:>10.1f}")
plot_panels(os.path.join(HERE, out_dir, 'curve.png'), [r for r in rows if not r['lever']],
            [('category mAP', 'map'), ('shape words: image gap (nats)', 'shape_gap'),
             ('shape words: precision (%)', 'shape_precision')],
            'images', lambda images: f"{images // 1000}k")

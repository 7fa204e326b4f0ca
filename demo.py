"""
The whole VirTex pipeline on the built-in shapes world, on a laptop CPU (README.md: how long):

  # data -> vocabulary -> pretrain -> VOC SVMs (pretrained vs random) -> captions
  python demo.py
  python demo.py --quick=True     # a first result in minutes: 32 px images, half the images
  python demo.py --seed=1         # another training seed

Each stage is one of the project's command lines, printed before it runs, so the demo doubles as a
tour: copy any of them to run a stage alone. Writes data/shapes/ (kept between runs) and
<out_dir>_seed<seed>/ (_quick_seed<seed> for the quick demo: a checkpoint, logs, VOC results,
captions, an attention figure, loss curves), then prints a summary with the time of every stage.
A finished pretraining there is reused (delete it to train again).
"""

import json
import os
import re
import subprocess
import sys
import time

from PIL import Image, ImageDraw, ImageFont

from configurator import configure

# ----------------------------------------------------------------------------------------------
seed = 0                   # training seed (and the random-init baseline's)
data = 'data/shapes'       # the shapes world (generated once, then reused)
out_dir = 'out/demo'       # this run's files; the seed is appended
config = 'config/shapes.py'
vocab_size = 256           # the shapes world has 65 distinct words; BPE keeps each one whole
caption_limit = 200        # val images captioned for CIDEr
quick = False              # a first result in minutes: config/shapes_quick.py after `config`
# ----------------------------------------------------------------------------------------------
QUICK_CONFIG = 'config/shapes_quick.py'
HERE = os.path.dirname(os.path.abspath(__file__))


def run_logged(args, log_path, echo=True, each_line=None):
    """Run a project script (`python ARGS` in this folder), showing its output live if `echo`, and
    keep the output in log_path; each_line(line) sees every line as it comes. Returns its lines;
    exits with one line naming the log if the script fails."""
    if echo:
        print(f"$ {' '.join(['python'] + args)}", flush=True)
    lines = []
    with subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'}) as proc:
        for line in proc.stdout:
            if echo:
                print(line, end='', flush=True)
            if each_line:
                each_line(line)
            lines.append(line)
    with open(os.path.join(HERE, log_path), 'w') as f:
        f.writelines(lines)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:1])} failed (exit {proc.returncode}); its output "
                         f"is in {log_path}")
    return lines


def random_init_args(ckpt_path, seed):
    """evaluate.py's flags for the backbone a train.py run started from: its ResNet at random
    init."""
    from safety import load_file
    trained = load_file(os.path.join(HERE, ckpt_path))['config']
    return ['--init=random', f"--visual={trained['visual']}",
            f"--image_size={trained['image_size']}",
            f"--zero_init_residual={trained['zero_init_residual']}", f'--seed={seed}']


def last_number(lines, label):
    """The number of a script's last line 'label: x.xx'."""
    match = re.fullmatch(rf'{label}: ([\d.]+)', lines[-1].strip())
    if not match:
        raise SystemExit(f"error: expected a last line '{label}: ...', got {lines[-1].strip()!r}")
    return float(match.group(1))


def draw_curves(records, path, width=640, height=360):
    """Train loss, val loss and val loss with shuffled images against iterations, as a PNG (PIL
    only)."""
    series = [('train loss', (60, 60, 200),
               [(r['iter'], r['loss']) for r in records if r['event'] == 'train']),
              ('val loss', (20, 150, 40),
               [(r['iter'], r['loss']) for r in records if r['event'] == 'val']),
              ('val loss, shuffled images', (210, 40, 40),
               [(r['iter'], r['loss_shuffled']) for r in records if r['event'] == 'val'])]
    points = [p for _, _, s in series for p in s]
    x_max, y_min, y_max = (max(x for x, _ in points), min(y for _, y in points),
                           max(y for _, y in points))
    margin = 0.05 * (y_max - y_min) or 0.5  # a run of one logged loss has no range
    x_max, y_min, y_max = max(x_max, 1), y_min - margin, y_max + margin
    left, top, right, bottom = 50, 20, width - 20, height - 40
    image = Image.new('RGB', (width, height), 'white')
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()

    def xy(x, y):
        return left + \
            (right - left) * x / x_max, bottom - (bottom - top) * (y - y_min) / (y_max - y_min)
    draw.rectangle((left, top, right, bottom), outline='black')
    for k in range(5):  # axis labels: iterations below, loss (sum over directions) on the left
        y = y_min + (y_max - y_min) * k / 4
        draw.text((4, xy(0, y)[1] - 6), f"{y:.2f}", fill='black', font=font)
        draw.text((xy(x_max * k / 4, y_min)[0] - 10, bottom + 6), f"{round(x_max * k / 4)}",
                  fill='black', font=font)
    draw.text(((left + right) // 2 - 25, bottom + 22), 'iteration', fill='black', font=font)
    for row, (name, colour, data) in enumerate(series):
        if len(data) > 1:
            draw.line([xy(x, y) for x, y in data], fill=colour, width=2)
        for x, y in data if len(data) < 30 else []:
            cx, cy = xy(x, y)
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=colour)
        draw.text((right - 170, top + 8 + 14 * row), name, fill=colour, font=font)
    image.save(path)


def main():
    out = f"{out_dir}{'_quick' if quick else ''}_seed{seed}"
    os.makedirs(os.path.join(HERE, out), exist_ok=True)
    timings = {}

    def stage(name, args, log_name):
        print(f"\n=== {name}", flush=True)
        t0 = time.time()
        lines = run_logged(args, os.path.join(out, log_name))
        timings[name] = time.time() - t0
        return lines

    start = time.time()
    if os.path.exists(f"{data}/coco/annotations/captions_val2017.json") and \
            os.path.exists(f"{data}/VOC2007/ImageSets/Main/test.txt"):
        print(f"=== data: {data} exists, reused (delete it to regenerate)")
    else:
        stage('data', ['data/shapes/prepare.py', f'--out={data}'], 'prepare.log')
    if not os.path.exists(f"{data}/vocab.model"):
        stage('vocabulary',
              ['tokenizer.py', f'--captions={data}/coco/annotations/captions_train2017.json',
                             f'--vocab_size={vocab_size}', f'--out={data}/vocab'], 'tokenizer.log')
    stage('pretrain',
          ['train.py', config, *([QUICK_CONFIG] if quick else []), f'--data_root={data}/coco',
           f'--tokenizer={data}/vocab.model', f'--out_dir={out}', f'--seed={seed}',
           '--init_from=auto'], 'train.log')
    voc = f'--voc_root={data}/VOC2007'
    pretrained = stage('evaluate pretrained', ['evaluate.py', voc, f'--ckpt={out}/ckpt.pt',
                                               f'--out_json={out}/voc_pretrained.json'],
                       'evaluate_pretrained.log')
    random_init = stage('evaluate random init',
                        ['evaluate.py', voc, *random_init_args(f'{out}/ckpt.pt', seed),
                                                 f'--out_json={out}/voc_random.json'],
                        'evaluate_random.log')
    captions = stage('caption', ['caption.py', f'--ckpt={out}/ckpt.pt', f'--coco_root={data}/coco',
                                 '--split=val2017', f'--limit={caption_limit}',
                                 f'--out={out}/captions_val.json'],
                     'caption.log')
    first_image = captions[0].split('\t')[0]
    stage('attention figure',
          ['caption.py', f'--ckpt={out}/ckpt.pt', f'--attention_dir={out}/attention',
                               first_image], 'attention.log')

    map_pretrained, map_random = last_number(pretrained, 'mAP'), last_number(random_init, 'mAP')
    cider = last_number(captions, 'CIDEr')
    with open(os.path.join(HERE, out, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    train_records = [r for r in records if r['event'] == 'train']
    # median over log windows
    images_per_s = sorted(r['img_s'] for r in train_records)[len(train_records) // 2]
    val_records = [r for r in records if r['event'] == 'val']
    curves = os.path.join(out, 'losses.png')
    draw_curves(records, os.path.join(HERE, curves))
    figure = os.path.join(out, 'attention',
                          os.path.splitext(os.path.basename(first_image))[0] + '.png')
    print("\nsome val captions (image<TAB>caption):")
    print(''.join(line for line in captions[:5]), end='')
    print(f"\n=== summary ({'quick demo, ' if quick else ''}seed {seed})")
    table = [('VOC mAP, pretrained backbone', f"{map_pretrained:.2f}"),
             ('VOC mAP, same backbone at random init', f"{map_random:.2f}"),
             ('difference', f"{map_pretrained - map_random:+.2f}"),
             (f'CIDEr-D on {caption_limit} val images', f"{cider:.1f}"),
             ('pretraining speed', f"{images_per_s:.0f} img/s"),
             ('the image is worth (val, last)',
              f"{val_records[-1]['image_gap']:.3f} nats/token" if val_records else '-'),
             ('attention figure', figure),
             ('loss curves', curves),
             *((f'time: {name}', f"{seconds / 60:.1f} min") for name, seconds in timings.items()),
             ('time: whole demo', f"{(time.time() - start) / 60:.1f} min")]
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"{key:<{width}}  {value}")


if __name__ == '__main__':
    configure(globals())
    main()

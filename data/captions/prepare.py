"""
Your own image-caption pairs in the COCO layout that tokenizer.py, train.py and caption.py read:

  # a captions file: JSON Lines ({"image": "rel/path.jpg", "caption": "..."} a line), CSV or TSV
  python data/captions/prepare.py --images=photos/ --captions=captions.jsonl --out=data/mine
  python data/captions/prepare.py --images=photos/ --captions=captions.csv --image_column=file \
      --caption_column=text --val_fraction=0.02 --out=data/mine
  # or a .txt beside each image, its captions one a line (photos/a.jpg, photos/a.txt)
  python data/captions/prepare.py --images=photos/ --out=data/mine

Writes OUT/train2017/ and OUT/val2017/ (symbolic links to your images, or copies with
--copy=True), OUT/annotations/captions_{train,val}2017.json and OUT/prepared_by.txt; then
  python tokenizer.py --captions=data/mine/annotations/captions_train2017.json --out=data/mine/vocab
  python train.py --data_root=data/mine --tokenizer=data/mine/vocab.model ...
Several rows may name one image (COCO has five captions an image). An image's id is its place in
the sorted list of the collection's image paths, so the same collection gives the same ids in any
row order; its link is named by the id (000000000042.jpg), as COCO's files are, which caption.py
reads to score CIDEr. Validation images are drawn with --seed (--val_fraction of them), or come from
a second file (--val_captions). A bad row (an image that is missing, outside --images, or, with
--check_images=True, undecodable; an empty caption; a line that does not parse) is skipped and
counted, the first few named with their line, and the run refused past --max_bad_rows. Nothing of
yours is written to or moved: OUT is built in a hidden folder inside it and renamed into place,
and an OUT that this script did not write (no prepared_by.txt) is refused. The captions file is
read in one pass and no image is opened unless --check_images=True. Standard library, plus pillow
for --check_images.
"""
import argparse
import csv
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time

PROG = 'prepare.py'
MARKER = 'prepared_by.txt'
WRITTEN = ('train2017', 'val2017', 'annotations')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm', '.pgm', '.tif', '.tiff',
                    '.webp')  # PIL reads these
NAMED = 5  # bad rows named on the way; the rest are counted


def fail(message):
    sys.exit(f'{PROG}: error: {message}')


class Rows:
    """The collection's rows, checked: {relative image path: [captions]}, the bad rows counted
    and the first few named."""

    def __init__(self, images, max_bad, check_images):
        self.images, self.max_bad, self.check_images = images, max_bad, check_images
        self.captions, self.bad, self.checked = {}, 0, {}

    def skip(self, where, why):
        self.bad += 1
        if self.bad <= NAMED:
            print(f'{where}: skipped: {why}', flush=True)
        if self.bad > self.max_bad:
            fail(f'more than --max_bad_rows={self.max_bad} bad rows (the last: {where}: {why}); '
                 'mend them or raise --max_bad_rows')

    def add(self, where, image, caption):
        if not isinstance(image, str) or not image.strip():
            return self.skip(where, 'no image path')
        if not isinstance(caption, str) or not caption.strip():
            return self.skip(where, f'the caption of {image} is empty')
        path = os.path.normpath(image.strip())
        if os.path.isabs(path) or path.split(os.sep)[0] == '..':
            return self.skip(where, f'{image} is not inside --images={self.images}')
        problem = self.problem(path)
        if problem:
            return self.skip(where, f'{image}: {problem}')
        self.captions.setdefault(path, []).append(' '.join(caption.split()))

    def problem(self, path):
        """Why the image cannot be used, or ''; an image's fate is decided once."""
        if path not in self.checked:
            full = os.path.join(self.images, path)
            self.checked[path] = '' if os.path.isfile(full) else 'no such image file'
            if self.check_images and not self.checked[path]:
                self.checked[path] = undecodable(full)
        return self.checked[path]


def undecodable(path):
    """'' if PIL decodes the whole image, else why not."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
        return ''
    except Exception as e:
        return f'cannot be decoded ({str(e).strip() or type(e).__name__})'


def read_captions(path, rows, image_column, caption_column):
    """Rows of a JSON Lines, CSV or TSV file (by its name's ending) into `rows`, in one pass."""
    if path.endswith(('.jsonl', '.json')):
        with open(path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    rows.skip(f'{path}:{number}', f'not a JSON object ({e})')
                    continue
                if not isinstance(row, dict):
                    rows.skip(f'{path}:{number}', 'not a JSON object')
                    continue
                rows.add(f'{path}:{number}', row.get(image_column), row.get(caption_column))
        return
    if not path.endswith(('.csv', '.tsv')):
        fail(f'--captions={path}: name it .jsonl, .csv or .tsv (its format)')
    with open(path, encoding='utf-8', newline='') as f:
        reader = csv.reader(f, delimiter='\t' if path.endswith('.tsv') else ',')
        header = next(reader, [])
        missing = [c for c in (image_column, caption_column) if c not in header]
        if missing:
            fail(f'{path}: its header ({", ".join(header) or "empty"}) names no column '
                 f'{missing[0]!r}: give --image_column and --caption_column')
        image_at, caption_at = header.index(image_column), header.index(caption_column)
        for row in reader:
            where = f'{path}:{reader.line_num}'
            if len(row) != len(header):
                rows.skip(where, f'{len(row)} fields, the header has {len(header)}')
                continue
            rows.add(where, row[image_at], row[caption_at])


def read_sidecars(rows):
    """Every image under --images with a sibling .txt: one caption a line."""
    for folder, _, files in sorted(os.walk(rows.images)):
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image = os.path.relpath(os.path.join(folder, name), rows.images)
            text = os.path.splitext(os.path.join(folder, name))[0] + '.txt'
            if not os.path.isfile(text):
                rows.skip(image, f'no captions beside it ({os.path.basename(text)})')
                continue
            with open(text, encoding='utf-8') as f:
                lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
            if not lines:
                rows.skip(text, 'holds no caption')
            for number, line in lines:
                rows.add(f'{text}:{number}', image, line)


def coco_split(out, split, images, ids, captions, source, copy):
    """OUT/<split>/ (a link or a copy of each image, named by its id) and its captions JSON."""
    os.makedirs(os.path.join(out, split))
    entries, annotations = [], []
    for image in images:
        name = f'{ids[image]:012d}{os.path.splitext(image)[1].lower()}'
        target = os.path.join(out, split, name)
        if copy:
            shutil.copyfile(os.path.join(source, image), target)
        else:
            os.symlink(os.path.abspath(os.path.join(source, image)), target)
        entries.append({'id': ids[image], 'file_name': name, 'source': image})
        for caption in captions[image]:
            annotations.append({'id': len(annotations) + 1, 'image_id': ids[image],
                                'caption': caption})
    with open(os.path.join(out, 'annotations', f'captions_{split}.json'), 'w') as f:
        json.dump({'images': entries, 'annotations': annotations}, f)
    return len(annotations)


def check_out(out):
    """Refuse an OUT whose train2017, val2017 or annotations this script did not write."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f'--out={out} is a file, not a folder')
    present = [name for name in WRITTEN if os.path.lexists(os.path.join(out, name))]
    if present and not os.path.isfile(os.path.join(out, MARKER)):
        fail(f'--out={out} holds {", ".join(present)} that this script did not write (no '
             f'{MARKER}): give another --out, or move them away')


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--images', required=True, help='the folder the image paths start from')
    parser.add_argument('--captions', default='', help='JSON Lines, CSV or TSV of image-caption '
                        'pairs (default: a .txt of captions beside each image)')
    parser.add_argument('--val_captions', default='', help='the validation pairs, in a file of '
                        'their own (default: drawn with --val_fraction)')
    parser.add_argument('--image_column', default='image', help="the image path's key or column")
    parser.add_argument('--caption_column', default='caption', help="the caption's key or column")
    parser.add_argument('--out', required=True, help='writes OUT/train2017, OUT/val2017, '
                        'OUT/annotations')
    parser.add_argument('--val_fraction', type=float, default=0.05,
                        help='images drawn for validation (at least one)')
    parser.add_argument('--seed', type=int, default=0, help='draws the validation images')
    parser.add_argument('--copy', choices=('True', 'False'), default='False',
                        help='True: copy the images instead of linking to them')
    parser.add_argument('--check_images', choices=('True', 'False'), default='False',
                        help='True: decode every image first (slow on a large collection)')
    parser.add_argument('--max_bad_rows', type=int, default=100,
                        help='bad rows are skipped; refused past this many')
    parser.error = lambda message: fail(message)
    args = parser.parse_args()
    images, out = args.images, args.out
    if not os.path.isdir(images):
        fail(f'--images={images}: no such folder')
    if not 0 < args.val_fraction < 1 and not args.val_captions:
        fail(f'--val_fraction={args.val_fraction}: must be in (0, 1)')
    if args.max_bad_rows < 0:
        fail(f'--max_bad_rows={args.max_bad_rows}: must be >= 0')
    for path in (args.captions, args.val_captions):
        if path and not os.path.isfile(path):
            fail(f'{path}: no such file')
    if args.val_captions and not args.captions:
        fail('--val_captions goes with --captions (the training pairs)')
    inside = os.path.realpath(out) + os.sep
    if (os.path.realpath(images) + os.sep).startswith(inside) or \
            inside.startswith(os.path.realpath(images) + os.sep):
        fail(f'--out={out} and --images={images} are one inside the other: give another --out')
    check_out(out)

    t0 = time.time()
    rows = Rows(images, args.max_bad_rows, args.check_images == 'True')
    if args.captions:
        read_captions(args.captions, rows, args.image_column, args.caption_column)
    else:
        read_sidecars(rows)
    captions = rows.captions
    if args.val_captions:
        train = sorted(captions)
        rows.captions = {}
        read_captions(args.val_captions, rows, args.image_column, args.caption_column)
        val = sorted(rows.captions)
        both = sorted(set(train) & set(val))
        if both:
            fail(f'{both[0]} (and {len(both) - 1} more) is in both --captions and --val_captions')
        captions = {**captions, **rows.captions}
    else:
        drawn = sorted(captions)
        random.Random(args.seed).shuffle(drawn)
        n_val = max(1, round(args.val_fraction * len(drawn)))
        val, train = sorted(drawn[:n_val]), sorted(drawn[n_val:])
    if not train or not val:
        fail(f'{len(captions)} usable images: too few for a training and a validation split')
    ids = {image: i for i, image in enumerate(sorted(captions), start=1)}

    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.prepare-', dir=out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f'{PROG}: stopped; {out} was left as it was'))
    try:
        os.makedirs(os.path.join(tmp, 'annotations'))
        counts = [coco_split(tmp, split, names, ids, captions, images, args.copy == 'True')
                  for split, names in (('train2017', train), ('val2017', val))]
        with open(os.path.join(tmp, MARKER), 'w') as f:
            f.write(f'written by data/captions/prepare.py from --images={images} and '
                    f'--captions={args.captions or "(a .txt beside each image)"}; running it '
                    f'again replaces {", ".join(WRITTEN)} here\n')
        for name in (*WRITTEN, MARKER):  # the old output goes only once the new one is whole
            target = os.path.join(out, name)
            if os.path.lexists(target):
                os.rename(target, os.path.join(tmp, name + '.old'))
            os.rename(os.path.join(tmp, name), target)
    except OSError as e:
        fail(f'writing to --out={out} failed: {e}')
    except KeyboardInterrupt:
        sys.exit(f'{PROG}: interrupted; {out} was left as it was')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    words = [len(c.split()) for image in captions for c in captions[image]]
    print(f'{len(train)} train and {len(val)} val images, {counts[0]} and {counts[1]} captions '
          f'({sum(words) / len(words):.1f} words a caption, {max(words)} at most); {rows.bad} bad '
          f'rows skipped; {time.time() - t0:.1f} s; wrote {out}')


if __name__ == '__main__':
    main()

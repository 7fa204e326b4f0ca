"""
The built-in synthetic "shapes world": 1-4 coloured shapes on textured backgrounds, written as COCO
Captions (to pretrain on) and as PASCAL VOC 2007 classification (to judge frozen features with
linear SVMs).

  # 10000/1000 COCO + 2000/2000 VOC images at 64 px
  python data/shapes/prepare.py
  python data/shapes/prepare.py --out=/tmp/shapes --size=96 --n_train=50000 --workers=8
  # (re)write data/shapes/attributes only, images untouched
  python data/shapes/prepare.py --attributes_only
  # one attribute's mAP
  python evaluate.py --voc_root=data/shapes/attributes/colour --ckpt=out/shapes/ckpt.pt

Writes OUT/coco/{train2017,val2017,annotations} (with words_*.json: the captions' words by class,
and which are true of each image) and
OUT/VOC2007/{JPEGImages,Annotations,ImageSets/Main} in the public formats (COCO: captions_*.json,
and instances_*.json with every object's box, for the multilabel pretext),
OUT/imagefolder/{train,val}/<category>/ for a linear probe (each image filed under its largest
object), plus each image's scene record (scenes_*.json) so tests can check captions against the
truth.
OUT/attributes/<attribute>/ are more VOC2007-layout tasks on the same VOC images (JPEGImages links
to them), one per thing the captions say beyond the category: category (the VOC task itself),
colour, size (small, large), count (one..four, plainly visible), background, position (left, right,
top, bottom, middle) and binding (colour x category, e.g. red_star); values with fewer than
--min_positives positives in a split are left out, and listed. An attribute with no value left is
left out whole (a small world), its folder holding only LEFT_OUT.txt, which says why; the rest of
the world is written. --attributes=colour,size writes those only, and refuses one left without
values.
The 10 categories differ only by shape; colour, size, rotation, position, count and background are
drawn independently of them, so naming them takes shape (random conv features see colour and
texture, not shape).
Images are seeded from (seed, split, index), so --workers does not change the output. All is built
in a hidden folder inside OUT and renamed into place at the end, replacing what OUT held (said
so when it does).
Measured: --attributes_only on the default world in 0.8 s (2 CPU cores shared with a training run),
4.8 MB; no value falls below --min_positives=10 there (the rarest, purple_cross, has 33 positives in
test).
"""
import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
CATEGORIES = ['circle', 'square', 'triangle', 'star', 'heart', 'cross', 'diamond', 'ring',
              'crescent', 'arrow']
PLURALS = {c: c + ('es' if c.endswith('ss') else 's') for c in CATEGORIES}  # cross -> crosses
COLOURS = {'red': (220, 30, 30), 'orange': (245, 140, 20), 'yellow': (240, 220, 40),
           'green': (40, 165, 50), 'blue': (35, 75, 225), 'purple': (140, 50, 190),
           'white': (245, 245, 245), 'black': (15, 15, 15)}
# width / S
SIZES = {'tiny': (0.10, 0.15), 'small': (0.21, 0.27), 'medium': (0.30, 0.36), 'large': (0.39, 0.47)}
SIZE_PROBS = [0.1, 0.3, 0.3, 0.3]  # tiny objects are VOC "difficult" and never captioned
# gaps between the ranges keep words true
SIZE_WORDS = {'small': ['small', 'little'], 'large': ['large', 'big']}
BACKGROUNDS = {'solid': 'plain', 'noise': 'noisy', 'stripes': 'striped', 'checks': 'checkered',
               'gradient': 'shaded', 'blobs': 'spotted'}  # kind -> caption word
NUMBERS = {2: 'two', 3: 'three', 4: 'four'}
# an object with less of its mask visible is VOC "difficult" and left out of captions
MIN_VISIBLE = 0.5
# a scene with an object less visible than this is redrawn: no unlabelled slivers
MIN_DRAWN = 0.15
# "left of"/"above" only between centres at least MARGIN * S apart along that axis
MARGIN = 0.2
# words + punctuation per caption, so [SOS] caption [EOS] fits 30 ids even with some BPE splits
MAX_TOKENS = 24
MIN_CONTRAST = 100  # RGB distance between an object's colour and the background's colours
SUPERSAMPLE = 4     # shapes drawn at 4x then box-filtered: anti-aliased edges and fractional masks
JPEG_QUALITY = 90
MARKER = '.prepared_by'  # in each folder this script writes: only those it may replace
# part of each image's seed
SPLIT_CODES = {'train2017': 0, 'val2017': 1, 'trainval': 2, 'test': 3, 'train': 4, 'val': 5}
# -----------------------------------------------------------------------------


def normalised(points):
    """Centre a polygon on its bounding box and scale it into the unit circle."""
    p = np.array(points, dtype=np.float64)
    p -= (p.min(0) + p.max(0)) / 2
    return p / np.hypot(p[:, 0], p[:, 1]).max()


def star(n, inner):
    """2n points alternating between radius 1 and `inner`, from the top; star(2, 1.0) is a
    square."""
    a = np.deg2rad(np.arange(2 * n) * 180 / n - 90)
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


heart_t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
# unit-circle outlines, y pointing down as in images; circle, ring, crescent are drawn as discs
POLYGONS = {
    'square': normalised(star(2, 1.0)),
    'triangle': normalised(star(3, 1.0)[::2]),
    'star': normalised(star(5, 0.42)),
    'heart': normalised(np.stack([16 * np.sin(heart_t) ** 3,
                                  -(13 * np.cos(heart_t) - 5 * np.cos(2 * heart_t)
                                    - 2 * np.cos(3 * heart_t) - np.cos(4 * heart_t))], 1)),
    'cross': normalised([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1),
                         (-.3, 1), (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)]),
    # narrow, so no rotation makes it a square
    'diamond': normalised([(0, -1), (.55, 0), (0, 1), (-.55, 0)]),
    'arrow': normalised([(-1, -.22), (.15, -.22), (.15, -.6), (1, 0), (.15, .6), (.15, .22),
                         (-1, .22)]),
}
DISCS = {'circle': [(0, 0, 1, 255)], 'ring': [(0, 0, 1, 255), (0, 0, 0.55, 0)],
         # (dx, dy, radius, fill), bite centred
         'crescent': [(0.2, 0, 0.87, 255), (0.59, 0, 0.74, 0)]}


def object_alpha(obj, size):
    """Anti-aliased coverage (size, size) in [0, 1] of one object on its own, before occlusion."""
    s = SUPERSAMPLE
    mask = Image.new('L', (size * s, size * s), 0)
    draw = ImageDraw.Draw(mask)
    r, a = obj['width'] / 2 * s, np.deg2rad(obj['rotation'])
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    center = np.array(obj['center']) * s
    if obj['category'] in DISCS:
        for dx, dy, radius, fill in DISCS[obj['category']]:
            x, y = center + r * (np.array([dx, dy]) @ rot)
            draw.ellipse([x - radius * r, y - radius * r, x + radius * r, y + radius * r],
                         fill=fill)
    else:
        draw.polygon([tuple(p) for p in center + r * (POLYGONS[obj['category']] @ rot)], fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255


def make_background(rng):
    """A background kind and colours, drawn with no regard to the objects' categories."""
    while True:
        colours = rng.integers(0, 256, (2, 3))
        # an object must stand out from both colours and their blend; at least 3 colours must stay
        # allowed
        refs = np.concatenate([colours, colours.mean(0, keepdims=True)])
        allowed = [c for c, rgb in COLOURS.items()
                   if np.linalg.norm(refs - rgb, axis=1).min() >= MIN_CONTRAST]
        if len(allowed) >= 3:
            return {'kind': str(rng.choice(list(BACKGROUNDS))), 'colours': colours.tolist(),
                    # stripes/checks per image width
                    'frequency': round(float(rng.uniform(4, 10)), 3),
                    'angle': round(float(rng.uniform(0, 180)), 1)}, allowed


def make_scene(rng, size):
    """A random scene: background and 1-4 objects, with the truth every caption and VOC label is
    made from."""
    background, allowed_colours = make_background(rng)
    while True:  # redraw until no object is a hidden sliver and at least one is plainly visible
        objects = []
        for _ in range(rng.integers(1, 5)):
            size_word = str(rng.choice(list(SIZES), p=SIZE_PROBS))
            width = rng.uniform(*SIZES[size_word]) * size
            # prefer spots away from earlier objects: occlusion yes, pile-ups rarely
            for _ in range(10):
                center = rng.uniform(width / 2 + 1, size - width / 2 - 1, 2)
                if all(np.hypot(*(center - o['center'])) >= 0.6 * (width + o['width']) / 2
                       for o in objects):
                    break
            objects.append({'category': str(rng.choice(CATEGORIES)),
                            'colour': str(rng.choice(allowed_colours)), 'size': size_word,
                            'width': round(float(width), 2), 'center': center.round(2).tolist(),
                            'rotation': round(float(rng.uniform(0, 360)), 1)})
        annotate(objects, size)
        if min(o['visible'] for o in objects) >= MIN_DRAWN and \
            not all(o['difficult'] for o in objects):
            return {'size': size, 'background': background, 'objects': objects}


def annotate(objects, size):
    """Measure each object's visible fraction from the drawn masks (later objects are on top); set
    bbox, difficult."""
    cover = np.zeros((size, size), np.float32)
    for obj in reversed(objects):
        alpha = object_alpha(obj, size)
        visible = alpha * (1 - cover)
        obj['visible'] = round(float(visible.sum() / alpha.sum()), 3)
        m = visible if visible.max() > 0 else alpha
        ys, xs = np.nonzero(m >= min(0.25, m.max()))  # VOC boxes enclose the visible part
        # 1-based, incl.
        obj['bbox'] = [int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1]
        obj['difficult'] = obj['size'] == 'tiny' or obj['visible'] < MIN_VISIBLE
        cover += alpha * (1 - cover)


def render(scene, rng):
    """Paint the background, then the objects in order (later ones occlude earlier ones); returns a
    PIL image."""
    size, bg = scene['size'], scene['background']
    c1, c2 = np.array(bg['colours'], np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = np.deg2rad(bg['angle'])
    u = x * np.cos(a) + y * np.sin(a)  # position along a random direction
    kind, f = bg['kind'], bg['frequency']
    if kind == 'stripes':
        t = (u * f) % 1 < 0.5
    elif kind == 'checks':
        t = (np.floor(x * f) + np.floor(y * f)) % 2
    elif kind == 'gradient':
        t = (u - u.min()) / (u.max() - u.min())
    elif kind == 'blobs':  # smooth low-res noise, sharpened into patches
        low = Image.fromarray(
            (rng.random((5, 5)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        t = np.clip((np.asarray(low, np.float32) / 255 - 0.5) * 4 + 0.5, 0, 1)
    else:  # solid, noise
        t = np.zeros((size, size))
    img = c1 + np.asarray(t, np.float32)[..., None] * (c2 - c1)
    if kind == 'noise':
        img += rng.normal(0, 30, img.shape)
    for obj in scene['objects']:
        alpha = object_alpha(obj, size)[..., None]
        # not pixel-exact palette colours
        colour = np.array(COLOURS[obj['colour']]) + rng.uniform(-15, 15, 3)
        img = img * (1 - alpha) + colour * alpha
    img += rng.normal(0, 4, img.shape)  # a little sensor noise everywhere
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def noun_phrase(group, rng):
    """'a small red star' or 'two green triangles': always the category, size and colour only if
    shared and true."""
    o, words = group[0], []
    if len({g['size'] for g in group}) == 1 and o['size'] in SIZE_WORDS and rng.random() < 0.5:
        words.append(str(rng.choice(SIZE_WORDS[o['size']])))
    if len({g['colour'] for g in group}) == 1 and rng.random() < 0.75:
        words.append(o['colour'])
    words.append(o['category'] if len(group) == 1 else PLURALS[o['category']])
    first = NUMBERS[len(group)] if len(group) > 1 else ('an' if words[0][0] in 'aeiou' else 'a')
    return ' '.join([first] + words)


def listing(phrases):
    return phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def captions(scene, rng, n=5):
    """n different captions, each naming every plainly visible object; relations only where
    unambiguous."""
    size, objects = scene['size'], scene['objects']
    # tiny or mostly hidden objects are not described
    shown = [o for o in objects if not o['difficult']]
    bg_word = BACKGROUNDS[scene['background']['kind']]

    def groups():  # same-category objects become "two stars" when none of that category is hidden
        out, cats = [], [o['category'] for o in objects]
        for c in sorted({o['category'] for o in shown}):
            members = [o for o in shown if o['category'] == c]
            together = len(members) > 1 and len(members) == cats.count(c) and rng.random() < 0.7
            out += [members] if together else [[m] for m in members]
        return [out[i] for i in rng.permutation(len(out))]

    def on_background():
        return str(
            rng.choice([f' on a {bg_word} background', f' against a {bg_word} background', '', '']))

    def plain_list():
        gs = groups()
        prefix = rng.choice(['', '', 'there is ' if len(gs[0]) == 1 else 'there are ',
                             'a picture of ', 'an image of '])
        return prefix + listing([noun_phrase(g, rng) for g in gs]) + on_background()

    def shape_count():  # "three shapes: ..." only when the count is exactly what one sees
        if len(shown) < 2 or len(shown) < len(objects):
            return None
        return f'{NUMBERS[len(shown)]} shapes{on_background()}: ' + \
            listing([noun_phrase(g, rng) for g in groups()])

    def relation():
        pairs = []  # (a, relation, b) that hold with a clear margin between the centres
        for a in shown:
            for b in shown:
                dx, dy = (np.array(b['center']) - a['center']) / size
                if dx >= MARGIN:
                    pairs += [(a, 'to the left of', b), (b, 'to the right of', a)]
                if dy >= MARGIN:  # image y grows downwards
                    pairs += [(a, 'above', b), (b, 'below', a)]
        if not pairs:
            return None
        a, rel, b = pairs[rng.integers(len(pairs))]
        clause = (f"{rng.choice(['', 'there is '])}{noun_phrase([a], rng)} {rel} "
                  f"{noun_phrase([b], rng)}")
        rest = [noun_phrase([o], rng) for o in shown if o is not a and o is not b]
        return clause + (f', and {listing(rest)}' if rest else '') + on_background()

    def positions():
        def where(o):
            x, y = np.array(o['center']) / size
            options = [phrase
                       for phrase, holds in (('on the left', x < 1 / 3),
                                             ('on the right', x > 2 / 3),
                                                    ('at the top', y < 1 / 3),
                                             ('at the bottom', y > 2 / 3),
                                                    ('in the middle',
                                                     max(abs(x - .5), abs(y - .5)) < 1 / 8))
                       if holds]
            return ' ' + str(rng.choice(options)) if options else ''
        phrases = [noun_phrase([shown[i]], rng) + where(shown[i])
                   for i in rng.permutation(len(shown))]
        return listing(phrases) if any(' the ' in p for p in phrases) else None

    templates = [plain_list, plain_list, shape_count, relation, relation, positions]
    out = []
    for i in range(10 * n):  # cycle the templates in random order until n distinct captions
        if i % len(templates) == 0:
            order = rng.permutation(len(templates))
        caption = templates[order[i % len(templates)]]()
        if caption and caption not in out and \
            len(re.findall(r'\w+|[^\w\s]', caption)) <= MAX_TOKENS:
            out.append(caption)
        if len(out) == n:
            break
    out = out or \
        [listing([('an ' if o['category'][0] in 'aeiou' else 'a ') + o['category'] for o in shown])]
    return (out * n)[:n]  # a lone small object can run out of phrasings: repeat rather than invent


def make_example(task):
    """Worker: draw, render and save one image; returns its scene record and captions."""
    seed, split, index, size, path = task
    # same image whatever the worker count
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    scene = make_scene(rng, size)
    render(scene, rng).save(path, quality=JPEG_QUALITY)
    return scene, captions(scene, rng)


# ---------------------------------------------------------------------------------------------
# the writers: COCO captions + VOC2007 classification from any world's scenes. dev/objects_world.py,
# the second synthetic world, imports these and passes its own make_example and categories.

def generate(pool, make_example, split, paths, args):
    """Make the images of one split (in parallel if a pool is given), printing progress; results in
    order."""
    tasks = [(args.seed, split, i, args.size, p) for i, p in enumerate(paths)]
    results, t0 = [], time.time()
    for i, result in enumerate(
            pool.imap(make_example, tasks, 32) if pool else map(make_example, tasks), 1):
        results.append(result)
        if i % 2000 == 0 or i == len(tasks):
            print(f'{split} {i}/{len(tasks)} | {i / (time.time() - t0):.0f} img/s', flush=True)
    return results


def coco_instances(image_id, scene, first_id, category_ids):
    """The scene's objects as COCO instance annotations: bbox [x, y, width, height] in 0-based
    pixels (VOC's is 1-based and inclusive), area of the box (no masks are written), ids counting
    from first_id."""
    return [{'id': first_id + k, 'image_id': image_id, 'category_id': category_ids[o['category']],
             'bbox': [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1],
             'area': (x1 - x0 + 1) * (y1 - y0 + 1), 'iscrowd': 0}
            for k, o in enumerate(scene['objects']) for x0, y0, x1, y1 in [o['bbox']]]


def write_coco(root, pool, make_example, categories, source, args, words=None):
    os.makedirs(os.path.join(root, 'annotations'))
    info = {'description': f'{source[0]} ({source[1]}, seed {args.seed}, size {args.size})',
            'version': '1.0', 'year': 2017}
    licenses = [{'id': 1, 'name': 'synthetic, public domain', 'url': ''}]
    image_id, caption_id, instance_id = 1, 1, 1  # ids unique across train and val, as in COCO
    category_ids = {name: i + 1 for i, name in enumerate(categories)}
    category_list = [{'id': i, 'name': name, 'supercategory': source[0]}
                     for name, i in category_ids.items()]
    for split, n in (('train2017', args.n_train), ('val2017', args.n_val)):
        os.makedirs(os.path.join(root, split))
        ids = range(image_id, image_id + n)
        results = generate(pool, make_example, split,
                           [os.path.join(root, split, f'{i:012d}.jpg') for i in ids], args)
        images, annotations, scenes, instances = [], [], [], []
        for i, (scene, caps) in zip(ids, results):
            images.append({'license': 1, 'file_name': f'{i:012d}.jpg', 'width': args.size,
                           'height': args.size, 'id': i})
            for caption in caps:
                annotations.append({'image_id': i, 'id': caption_id, 'caption': caption})
                caption_id += 1
            scenes.append({'image_id': i, 'file_name': f'{i:012d}.jpg', **scene})
            instances += coco_instances(i, scene, instance_id, category_ids)
            instance_id += len(scene['objects'])
        with open(os.path.join(root, 'annotations', f'captions_{split}.json'), 'w') as f:
            json.dump({'info': info, 'licenses': licenses, 'images': images,
                       'annotations': annotations}, f)
        # every object, as COCO
        with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump({'info': info, 'licenses': licenses, 'images': images,
                       'annotations': instances, 'categories': category_list}, f)
        with open(os.path.join(root, 'annotations', f'scenes_{split}.json'), 'w') as f:
            json.dump(scenes, f)
        if words:  # (classes, truth(scene))
            with open(os.path.join(root, 'annotations', f'words_{split}.json'), 'w') as f:
                json.dump({'classes': words[0],
                           'images': {s['image_id']: words[1](s) for s in scenes}}, f)
        image_id += n


def voc_xml(name, scene, source):
    """Annotations/<name>.xml with the elements (and tab indentation) of the real VOC2007 files."""
    def element(tag, *children, text=None):
        e = ET.Element(tag)
        e.text, e[:] = text, children
        return e
    size = str(scene['size'])
    objects = [element('object', element('name', text=o['category']),
                       element('pose', text='Unspecified'), element('truncated', text='0'),
                       element('difficult', text=str(int(o['difficult']))),
                       element('bndbox',
                               *[element(k, text=str(v))
                                 for k, v in zip(('xmin', 'ymin', 'xmax', 'ymax'),
                                                                                  o['bbox'])]))
               for o in scene['objects']]
    root = element('annotation', element('folder', text='VOC2007'),
                   element('filename', text=f'{name}.jpg'),
                   element('source', element('database', text=f'The {source[0]}'),
                           element('annotation', text=source[1]),
                           element('image', text='synthetic')),
                   element('size', element('width', text=size), element('height', text=size),
                           element('depth', text='3')),
                   element('segmented', text='0'), *objects)
    ET.indent(root, '\t')
    return ET.tostring(root, encoding='unicode') + '\n'


def write_voc(root, pool, make_example, categories, source, args):
    main_dir = os.path.join(root, 'ImageSets', 'Main')
    for d in (main_dir, os.path.join(root, 'JPEGImages'), os.path.join(root, 'Annotations')):
        os.makedirs(d)
    first = 1  # VOC image names go on from trainval into test, as in VOC2007
    for split, n in (('trainval', args.n_voc_trainval), ('test', args.n_voc_test)):
        names = [f'{i:06d}' for i in range(first, first + n)]
        results = generate(pool, make_example, split,
                           [os.path.join(root, 'JPEGImages', f'{m}.jpg') for m in names], args)
        scenes = [scene for scene, _ in results]
        for name, scene in zip(names, scenes):
            with open(os.path.join(root, 'Annotations', f'{name}.xml'), 'w') as f:
                f.write(voc_xml(name, scene, source))
        with open(os.path.join(main_dir, f'{split}.txt'), 'w') as f:
            f.writelines(f'{m}\n' for m in names)
        # VOC: 1 = a non-difficult instance, 0 = only difficult ones, -1 = absent
        absent = []
        for c in categories:
            labels = [max([-1] + [int(not o['difficult']) for o in scene['objects']
                                  if o['category'] == c]) for scene in scenes]
            with open(os.path.join(main_dir, f'{c}_{split}.txt'), 'w') as f:
                f.writelines(f"{name} {label:2d}\n" for name, label in zip(names, labels))
            absent += [c] if 1 not in labels else []
        if absent:  # evaluate.py refuses such a class: it cannot give an AP
            print(f"warning: VOC2007 {split}: no image shows {', '.join(absent)} plainly: "
                  f"evaluate.py will refuse the task; make more images (--n_voc_{split})",
                  flush=True)
        with open(os.path.join(root, f'scenes_{split}.json'), 'w') as f:
            json.dump([{'name': m, **s} for m, s in zip(names, scenes)], f)
        first += n


def largest_object(scene):
    """The category an ImageFolder files a scene under: its largest box among the objects that are
    not difficult."""
    def area(o):
        return (o['bbox'][2] - o['bbox'][0] + 1) * (o['bbox'][3] - o['bbox'][1] + 1)
    return max((o for o in scene['objects'] if not o['difficult']), key=area)['category']


def write_imagefolder(root, pool, make_example, categories, args):
    """ROOT/{train,val}/<category>/<name>.jpg, each image filed under its largest object (a linear
    probe's data)."""
    for split, n in (('train', args.n_folder_train), ('val', args.n_folder_val)):
        for c in categories:
            os.makedirs(os.path.join(root, split, c))
        names = [f'{i:06d}' for i in range(1, n + 1)]
        flat = [os.path.join(root, split, f'{m}.jpg') for m in names]
        scenes = [scene for scene, _ in generate(pool, make_example, split, flat, args)]
        for name, path, scene in zip(names, flat, scenes):
            os.rename(path, os.path.join(root, split, largest_object(scene), f'{name}.jpg'))
        empty = [c for c in categories if not os.listdir(os.path.join(root, split, c))]
        if empty:  # probe.py refuses an empty class folder
            print(f"warning: imagefolder/{split}: no image of {', '.join(empty)}: probe.py will "
                  f"refuse the folder; make more images (--n_folder_{split})", flush=True)
        # beside the class folders, not in them
        with open(os.path.join(root, f'scenes_{split}.json'), 'w') as f:
            json.dump([{'name': m, 'category': largest_object(s), **s}
                       for m, s in zip(names, scenes)], f)


# ---------------------------------------------------------------------------------------------
# attribute tasks: one VOC2007-layout folder per attribute (colour, size, count, ...) on the VOC2007
# images, so evaluate.py's SVMs, unchanged, measure what a backbone knows beyond the category
# (--voc_root=OUT/attributes/X)

COUNT_WORDS = {1: 'one', 2: 'two', 3: 'three', 4: 'four'}
EXCLUSIVE = ('count', 'background')  # one value per image: exactly one is 1, the others -1


def flags(scene, values_of):
    """{value: 1 or 0} with VOC's meaning: 1 where a plainly visible object has the value, 0 where
    only difficult ones (tiny or mostly hidden) have it; values no object has are absent, and their
    label is -1."""
    out = {}
    for o in scene['objects']:
        for value in values_of(o):
            out[value] = max(out.get(value, 0), int(not o['difficult']))
    return out


def thirds(o, size):
    """Where an object's centre is, in the words the captions use (captions() decides it the same
    way)."""
    x, y = np.array(o['center']) / size
    return [place
            for place, holds in (('left', x < 1 / 3), ('right', x > 2 / 3), ('top', y < 1 / 3),
                                       ('bottom', y > 2 / 3),
                                 ('middle', max(abs(x - .5), abs(y - .5)) < 1 / 8))
            if holds]


def scene_attributes(scene, background):
    """{attribute: {value: 1 or 0}} of any world's scene record, `background` its background's name.
    Both worlds' captions say the same about sizes (small, large; never medium) and places (the
    thirds), so both share these."""
    shown = sum(not o['difficult'] for o in scene['objects'])
    # tiny objects are smaller than "small" but never captioned: 0 for small (difficult, not
    # judged), as VOC does
    size_word = {'tiny': ['small'], 'small': ['small'], 'large': ['large']}
    # the VOC task itself, for reference
    return {'category': flags(scene, lambda o: [o['category']]),
            'colour': flags(scene, lambda o: [o['colour']]),
            'size': flags(scene, lambda o: size_word.get(o['size'], [])),
            'count': {COUNT_WORDS[shown]: 1},  # plainly visible objects
            'background': {background: 1},
            'position': flags(scene, lambda o: thirds(o, scene['size'])),
            # "red somewhere" and "a star somewhere" do not make a red star: a linear probe needs
            # the pair bound
            'binding': flags(scene, lambda o: [f"{o['colour']}_{o['category']}"])}


def attributes(scene):
    """The shapes world's attribute tasks; the background by its caption word (plain, noisy,
    striped, ...)."""
    return scene_attributes(scene, BACKGROUNDS[scene['background']['kind']])


ATTRIBUTE_TASKS = ('category', 'colour', 'size', 'count', 'background', 'position', 'binding')


# ---------------------------------------------------------------------------------------------
# the captions' words, class by class, and which of them are true of a scene: caption.py scores
# generated captions with them, and train.py's validation measures what the image is worth to each
# class (OUT/coco/annotations/words_<split>.json)

WORD_CLASSES = {
    'shape': {**{c: c for c in CATEGORIES}, **{PLURALS[c]: c for c in CATEGORIES}},
    'colour': {c: c for c in COLOURS},
    'size': {word: size for size, words in SIZE_WORDS.items() for word in words},
    'count': {word: word for word in NUMBERS.values()},
    'position': {w: w for w in ('left', 'right', 'top', 'bottom', 'middle', 'above', 'below')}}


def word_truth(scene):
    """{word class: {'shown': values true of the plainly visible objects, 'present': true of any
    object}}, in WORD_CLASSES' values. A shape, colour or size named for a difficult (tiny or mostly
    hidden) object is not wrong, but captions never name one: recall counts the shown ones. Counts
    and positions are the captions' own: a group's or the whole scene's number of shown objects;
    thirds of the image (left, top, ...) or a relation between two shown objects (left of,
    above, ...)."""
    size = scene['size']
    shown = [o for o in scene['objects'] if not o['difficult']]
    sizes = {'tiny': 'small', 'small': 'small', 'large': 'large'}
    out = {}
    for which, objects in (('shown', shown), ('present', scene['objects'])):
        for name, values in (('shape', {o['category'] for o in objects}),
                             ('colour', {o['colour'] for o in objects}),
                             ('size', {sizes[o['size']] for o in objects if o['size'] in sizes})):
            out.setdefault(name, {})[which] = sorted(values)
    groups = [len(shown), *Counter(o['category'] for o in shown).values()]
    places = {p for o in shown for p in thirds(o, size)}
    for a in shown:
        for b in shown:
            dx, dy = (np.array(b['center']) - a['center']) / size
            places |= ({'left', 'right'} if dx >= MARGIN else set()) | \
                ({'above', 'below'} if dy >= MARGIN else set())
    for name, values in (('count', {NUMBERS[n] for n in groups if n in NUMBERS}),
                         ('position', places)):
        out[name] = {'shown': sorted(values), 'present': sorted(values)}
    return out


def voc_attributes(voc_root, attributes, args):
    """{split: (image names, one attributes(scene) per image)} of a written VOC2007 folder, from its
    scenes_<split>.json, which must list the images of ImageSets/Main/<split>.txt in that order."""
    voc = {}
    for split in ('trainval', 'test'):
        list_path = os.path.join(voc_root, 'ImageSets', 'Main', f'{split}.txt')
        scene_path = os.path.join(voc_root, f'scenes_{split}.json')
        try:
            with open(list_path) as f:
                names = f.read().split()
            with open(scene_path) as f:
                scenes = json.load(f)
        except OSError as e:
            args.error(f'{e.filename}: {e.strerror}')
        except ValueError as e:
            args.error(f'{scene_path}: not JSON ({e})')
        if not names:
            args.error(f'{list_path}: lists no images')
        scenes = scenes if isinstance(scenes, list) else []
        scene_names = [s.get('name') if isinstance(s, dict) else None for s in scenes]
        if scene_names != names:
            at = next((i for i, (a, b) in enumerate(zip(scene_names, names)) if a != b),
                      min(len(scene_names), len(names)))
            args.error(f'{scene_path}: does not match {list_path} ({len(scene_names)} scenes for '
                       f'{len(names)} images, first difference at image {at + 1})')
        try:
            voc[split] = names, [attributes(scene) for scene in scenes]
        except (KeyError, TypeError, AttributeError) as e:
            args.error(f'{scene_path}: not the scene records of this world '
                       f'({type(e).__name__}: {e})')
    return voc


def attribute_values(voc, args):
    """{attribute: (the values kept, those left out, their counts)} of the VOC images' attribute
    tasks (--attributes' or all). A value with fewer than --min_positives positives in either split
    is left out: its test AP would rest on a few images (or be 0, with none). An attribute left
    with no value is left out whole, unless --attributes asked for it: then the world is refused,
    before the other images are drawn."""
    asked = args.attributes.split(',') if args.attributes else []
    values_of = {}
    for attribute in asked or voc['trainval'][1][0]:
        positives = {split: Counter(v for image in images for v, flag in image[attribute].items()
                                    if flag == 1)
                     for split, (_, images) in voc.items()}
        values = sorted({v for _, images in voc.values() for image in images
                         for v in image[attribute]})
        kept = [v for v in values if min(counts[v] for counts in positives.values())
                >= args.min_positives]
        left_out = [f"{v} ({positives['trainval'][v]}/{positives['test'][v]})" for v in values
                    if v not in kept]
        counts = f"positives in trainval/test: {', '.join(left_out) or 'none'}"
        if not kept and asked:
            args.error(f"attribute {attribute}: no value has --min_positives={args.min_positives} "
                       f"positives in both trainval and test ({counts}); make more VOC images or "
                       "lower --min_positives")
        values_of[attribute] = kept, left_out, counts
    return values_of


def write_attributes(root, voc, values_of, args):
    """ROOT/<attribute>/ImageSets/Main/{<split>,<value>_<split>}.txt for each attribute's kept
    values (attribute_values'), and JPEGImages as a relative link to the VOC2007 images beside
    ROOT. An attribute left with no value gets a folder holding only LEFT_OUT.txt, the one line
    that evaluate.py gives as the reason."""
    left_out_tasks = []
    for attribute, (kept, left_out, counts) in values_of.items():
        if not kept:
            reason = (f"no value has --min_positives={args.min_positives} positives in both "
                      f"trainval and test ({counts}); make more VOC images or lower "
                      "--min_positives")
            print(f"attributes/{attribute}: left out: {reason}", flush=True)
            os.makedirs(os.path.join(root, attribute))
            with open(os.path.join(root, attribute, 'LEFT_OUT.txt'), 'w') as f:
                f.write(f"left out when the world was written: {reason}\n")
            left_out_tasks.append(attribute)
            continue
        print(f'attributes/{attribute}: {len(kept)} values' + (
            f'; left out, with fewer than {args.min_positives} {counts}' if left_out else ''),
            flush=True)
        main_dir = os.path.join(root, attribute, 'ImageSets', 'Main')
        os.makedirs(main_dir)
        os.symlink(os.path.join('..', '..', 'VOC2007', 'JPEGImages'),
                   os.path.join(root, attribute, 'JPEGImages'))
        for split, (names, images) in voc.items():
            with open(os.path.join(main_dir, f'{split}.txt'), 'w') as f:
                f.writelines(f'{m}\n' for m in names)
            # write_voc's lines: 1 = plainly visible, 0 = only difficult ones, -1 = absent
            for v in kept:
                with open(os.path.join(main_dir, f'{v}_{split}.txt'), 'w') as f:
                    f.writelines(f'{m} {image[attribute].get(v, -1):2d}\n'
                                 for m, image in zip(names, images))
    if left_out_tasks:
        print(f"attribute tasks left out: {', '.join(left_out_tasks)} (too few positives; each "
              "folder's LEFT_OUT.txt says why)", flush=True)


def command_line(description, out, size, min_size, prog, tasks):
    """The arguments both worlds take, checked; errors are one line that starts with prog. tasks:
    the names of the world's attribute tasks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--out', default=out, help='writes OUT/coco, OUT/VOC2007, OUT/imagefolder, '
                                                   'OUT/attributes, replacing those already there '
                                                   '(only once the new ones are whole)')
    parser.add_argument('--n_train', type=int, default=10000, help='COCO train2017 images')
    parser.add_argument('--n_val', type=int, default=1000, help='COCO val2017 images')
    parser.add_argument('--n_voc_trainval', type=int, default=2000, help='VOC2007 trainval images')
    parser.add_argument('--n_voc_test', type=int, default=2000, help='VOC2007 test images')
    parser.add_argument('--n_folder_train', type=int, default=2000, help='imagefolder/train images')
    parser.add_argument('--n_folder_val', type=int, default=1000, help='imagefolder/val images')
    parser.add_argument('--size', type=int, default=size, help='images are size x size pixels')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                        help='processes')
    # 10: with n positives one image can move a test AP by up to 1/n, so below ~10 an AP is mostly
    # noise
    parser.add_argument('--min_positives', type=int, default=10,
                        help='attribute values with fewer images labelled 1 in trainval or test '
                             'are left out')
    parser.add_argument('--attributes', default='',
                        help='comma-separated attribute tasks to write, refused if one has too '
                             'few positives (default: every one, those with too few left out)')
    parser.add_argument('--attributes_only', action='store_true',
                        help='only (re)write OUT/attributes, from the scene records of an existing '
                             'OUT/VOC2007')
    # one line, not argparse's usage + error
    parser.error = lambda message: sys.exit(f'{prog}: error: {message}')
    args = parser.parse_args()
    for flag in ('n_train', 'n_val', 'n_voc_trainval', 'n_voc_test', 'n_folder_train',
                 'n_folder_val', 'workers', 'min_positives'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag} must be >= 1 (got {getattr(args, flag)})')
    if not min_size <= args.size <= 1024:
        parser.error(f'--size must be between {min_size} and 1024 (got {args.size})')
    if args.n_voc_trainval + args.n_voc_test > 999999:
        parser.error('--n_voc_trainval + --n_voc_test must be <= 999999 (VOC names have 6 digits)')
    for name in args.attributes.split(',') if args.attributes else []:
        if name not in tasks:
            parser.error(f"--attributes: {name!r} is not one of {', '.join(tasks)}")
    ignored = [f'--{flag}' for flag in ('n_train', 'n_val', 'n_voc_trainval', 'n_voc_test',
                                        'n_folder_train', 'n_folder_val', 'size', 'seed', 'workers')
               if getattr(args, flag) != parser.get_default(flag)]
    if args.attributes_only and ignored:
        parser.error(f"--attributes_only rewrites the attributes of OUT/VOC2007's images as they "
                     f"are: drop {', '.join(ignored)}")
    args.error = parser.error
    return args


def clear_leftovers(out):
    """The hidden folders of runs that were killed (SIGKILL; their process has ended)."""
    for name in os.listdir(out):
        pid = name.split('-')[1] if name.startswith('.prepare-') else ''
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def write_world(args, make_example, categories, source, prog, attributes, words=None):
    """Write OUT/coco, OUT/VOC2007, OUT/imagefolder and OUT/attributes (only the last with
    --attributes_only, from the existing OUT/VOC2007), building everything in a hidden folder inside
    OUT first, so that an interrupted run leaves no half-written data set; a previous complete
    output is replaced only at the end.
    source = (the world's name, the script that makes it); attributes(scene) = {attribute: {value: 1
    or 0}}; words = (word classes, word_truth(scene)) for OUT/coco/annotations/words_<split>.json,
    or None."""
    if args.attributes_only:  # read and check the scenes before anything is written
        voc = voc_attributes(os.path.join(args.out, 'VOC2007'), attributes, args)
        values_of = attribute_values(voc, args)
    written = ['attributes'] if args.attributes_only else ['coco', 'VOC2007', 'imagefolder',
                                                           'attributes']
    replaced = [name for name in written if os.path.lexists(os.path.join(args.out, name))]
    foreign = [name for name in replaced if not os.path.isfile(os.path.join(args.out, name,
                                                                            MARKER))]
    if foreign:  # a data set of the user's (COCO in data/coco): never replaced
        args.error(f"{os.path.join(args.out, foreign[0])} was not written by this script (it has "
                   f"no {MARKER}): give another --out, or move it away")
    try:
        os.makedirs(args.out, exist_ok=True)
        clear_leftovers(args.out)
        tmp = tempfile.mkdtemp(prefix=f'.prepare-{os.getpid()}-', dir=args.out)
    except OSError as e:
        args.error(f'cannot write to --out={args.out}: {e.strerror}')
    if replaced:
        print(f"{args.out} holds {', '.join(replaced)} already: replaced at the end, once the new "
              "files are whole", flush=True)
    t0, pool = time.time(), Pool(args.workers) if args.workers > 1 and \
        not args.attributes_only else None
    # a stop (Ctrl-C, SIGTERM) leaves OUT as it was: the hidden folder goes (the workers keep
    # SIGTERM's default, which is how the pool is stopped)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f'{prog}: stopped; {args.out} was left as it '
                                                      'was'))
    try:
        if not args.attributes_only:  # the VOC images first: their attribute tasks are checked
            write_voc(os.path.join(tmp, 'VOC2007'), pool, make_example, categories, source, args)
            voc = voc_attributes(os.path.join(tmp, 'VOC2007'), attributes, args)
            values_of = attribute_values(voc, args)
            write_coco(os.path.join(tmp, 'coco'), pool, make_example, categories, source, args,
                       words)
            write_imagefolder(os.path.join(tmp, 'imagefolder'), pool, make_example,
                              categories, args)
        write_attributes(os.path.join(tmp, 'attributes'), voc, values_of, args)
        for name in written:
            with open(os.path.join(tmp, name, MARKER), 'w') as f:
                f.write(f"written by {source[1]}; running it again replaces this folder\n")
            target = os.path.join(args.out, name)
            if os.path.lexists(target):
                os.rename(target, os.path.join(tmp, name + '.old'))
            os.rename(os.path.join(tmp, name), target)
    except OSError as e:
        args.error(f'writing to --out={args.out} failed: {e}')
    except KeyboardInterrupt:
        sys.exit(f'{prog}: interrupted; {args.out} was left as it was')
    finally:
        if pool:
            pool.terminate()
        shutil.rmtree(tmp, ignore_errors=True)
    # the links' own size, not the images'
    n_bytes = sum(os.lstat(os.path.join(d, f)).st_size for name in written
                  for d, _, files in os.walk(os.path.join(args.out, name)) for f in files)
    if args.attributes_only:
        n_images = sum(len(names) for names, _ in voc.values())
        print(f'wrote the attributes of {n_images} VOC2007 images in {time.time() - t0:.1f} s, '
              f'{n_bytes / 1e6:.1f} MB, to {os.path.join(args.out, "attributes")}')
        return
    n_images = args.n_train + args.n_val + args.n_voc_trainval + args.n_voc_test + \
        args.n_folder_train + args.n_folder_val
    print(f'wrote {n_images} images in '
          f'{time.time() - t0:.1f} s, {n_bytes / 1e6:.1f} MB, to {args.out}')


def main():
    args = command_line('Write the synthetic shapes world in COCO + VOC2007 formats.',
                        out='data/shapes', size=64, min_size=32, prog='prepare.py',
                        tasks=ATTRIBUTE_TASKS)
    write_world(args, make_example, CATEGORIES, ('shapes world', 'data/shapes/prepare.py'),
                'prepare.py', attributes, words=(WORD_CLASSES, word_truth))


if __name__ == '__main__':
    main()

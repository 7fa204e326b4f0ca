"""
Dev only, not part of the demo: a second synthetic world, "objects", to check that the CPU recipe
tuned on the shapes world (config/shapes.py) transfers unchanged to another world. 12 everyday
objects drawn as silhouettes from simple parts, filled with photo-like procedural textures (wood,
marble, fur, ...) and pasted as cut-outs onto photo-like backgrounds (grass, brick, sky, ...), 1-4
per 96 px image, 5 captions each from ~290 distinct words.
Texture, colour, size, place and background are drawn independently of the category: only shape
tells it.

  # 10000/1000 COCO + 2000/2000 VOC images at 96 px into data/objects
  python dev/objects_world.py
  # a world this small leaves out the attribute tasks with too few positives, and says which
  python dev/objects_world.py --out=/tmp/objects --n_train=200 --n_val=20 --n_voc_trainval=50 \
      --n_voc_test=50
  # 286 words: from ~800 pieces on every word is one piece; 1414 is the most it takes
  python tokenizer.py --captions=data/objects/coco/annotations/captions_train2017.json \
      --vocab_size=1000 --out=data/objects/vocab

Writes what data/shapes/prepare.py writes, with its writers (this file only draws and captions the
scenes):
OUT/coco/{train2017,val2017,annotations}, OUT/VOC2007/{JPEGImages,Annotations,ImageSets/Main}, plus
scenes_*.json, OUT/imagefolder/{train,val}/<category>/, and OUT/attributes/<attribute>/: the shapes
world's attribute tasks in VOC2007 layout on the VOC images (category, colour, size, count,
background by kind, position, binding) plus texture (wood, fur, ...). `--attributes_only` rewrites
OUT/attributes alone from OUT/VOC2007's scene records.
COCO and VOC images are disjoint. Images are seeded from (seed, split, index), so --workers does not
change the output; all is built in a hidden folder inside OUT and renamed into place at the end.
Measured on the defaults: captions use 286 distinct words, at most 22 per caption (python 3.11,
numpy 2.4, pillow 13).
"""
import os
import re
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0,
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'data', 'shapes'))
import prepare  # noqa: E402  the COCO and VOC writers of the shapes world

# -----------------------------------------------------------------------------
CATEGORIES = ['cup', 'chair', 'tree', 'car', 'house', 'fish', 'bird', 'flower', 'key', 'umbrella',
              'bottle', 'lamp']
# category names, then a variant's extra names, used only when every object of a group is that
# variant
NOUNS = {
    'cup': ['cup'], 'chair': ['chair', 'seat', 'dining chair'], 'tree': ['tree'], 'fish': ['fish'],
    'car': ['car', 'automobile', 'vehicle'], 'house': ['house', 'home', 'cottage', 'building'],
    'bird': ['bird', 'songbird', 'sparrow'],
    'flower': ['flower', 'blossom', 'bloom'], 'key': ['key', 'door key'],
    'umbrella': ['umbrella', 'parasol', 'brolly'], 'bottle': ['bottle', 'flask'],
    'lamp': ['lamp', 'table lamp', 'desk lamp', 'reading lamp'], 'mug': ['mug', 'coffee mug'],
    'teacup': ['teacup'], 'leafy': ['leafy tree', 'bushy tree'],
    'pine': ['pine tree', 'fir tree', 'pine', 'conifer', 'evergreen'], 'sedan': ['sedan'],
    'van': ['van', 'minivan'], 'daisy': ['daisy'], 'wine': ['wine bottle']}
IRREGULAR = {'fish': 'fish', 'brolly': 'brollies', 'daisy': 'daisies'}  # plurals; the rest add an s
VERBS = {'cup': ['sits', 'stands', 'rests'], 'chair': ['stands', 'waits'],
         'tree': ['grows', 'stands', 'rises'], 'car': ['is parked', 'stands', 'waits'],
         'house': ['stands', 'sits'], 'fish': ['swims', 'floats', 'hovers'],
         'bird': ['perches', 'sits', 'stands', 'is perched'], 'flower': ['grows', 'blooms'],
         'key': ['lies', 'rests'], 'umbrella': ['is open', 'stands', 'is unfolded'],
         'bottle': ['stands', 'sits'], 'lamp': ['stands', 'sits']}
COLOURS = {'red': (200, 40, 35), 'orange': (235, 130, 35), 'yellow': (235, 205, 50),
           'green': (55, 150, 60), 'blue': (45, 85, 205), 'purple': (125, 60, 170),
           'pink': (235, 135, 175), 'brown': (125, 80, 45), 'white': (238, 238, 232),
           'grey': (128, 128, 128), 'black': (30, 30, 30)}
# else the key
COLOUR_WORDS = {'grey': ['grey', 'gray'], 'purple': ['purple', 'violet'], 'red': ['red', 'scarlet']}
TEXTURES = {  # kind -> (adjectives, phrases after the noun)
    'wood': (['wooden', 'timber'], ['made of wood', 'carved from wood', 'with a wood grain']),
    'marble': (['marble', 'marbled', 'veined'],
               ['made of marble', 'carved from stone', 'made of polished stone']),
    'weave': (['woven', 'knitted', 'fabric', 'woollen'],
              ['made of fabric', 'made of cloth', 'knitted from wool']),
    'fur': (['furry', 'fluffy', 'hairy', 'shaggy'],
            ['covered in fur', 'with soft fur', 'with a furry coat']),
    'metal': (['metallic', 'shiny', 'metal', 'chrome'],
              ['made of metal', 'made of shiny metal', 'made of steel']),
    'speckle': (['speckled', 'freckled', 'flecked'],
                ['covered in specks', 'with tiny specks', 'dotted with specks']),
    'stripes': (['striped', 'stripy', 'banded'],
                ['with stripes', 'covered in stripes', 'painted with stripes']),
    'spots': (['spotted', 'spotty', 'blotchy', 'dappled'],
              ['with spots', 'covered in spots', 'with dark patches'])}
BACKGROUNDS = {  # kind -> scene phrases
    'grass': ['on the grass', 'on a lawn', 'in a grassy field', 'on green grass',
              'on a green meadow', 'in the park'],
    'sand': ['on sandy ground', 'on the sand', 'on a sandy beach', 'in the desert', 'on dry sand',
             'on a dune'],
    'brick': ['in front of a brick wall', 'against a brick wall', 'by an old brick wall', 'next to '
              'a red brick wall'],
    'water': ['on the water', 'above rippling water', 'on a lake', 'over the sea', 'on a calm pond',
              'on blue water'],
    'sky': ['under a cloudy sky', 'against a cloudy sky', 'in front of white clouds',
            'against the blue sky', 'high in the sky', 'up in the air'],
    'landscape': ['in a landscape', 'in front of the horizon', 'in the countryside',
                  'in an open landscape', 'outdoors'],
    'tiles': ['on a tiled floor', 'in front of a tiled wall', 'on the tiles',
              'on a checkered floor', 'on a checkerboard'],
    'blur': ['in front of a blurry background', 'on a blurred background', 'against a '
             'colourful blur',
             'on an out of focus background', 'in front of a soft colourful backdrop'],
    'mottled': ['on a mottled background', 'against a patchy background', 'on a blotchy backdrop',
                'on a camouflage pattern', 'on a splotchy surface']}
OPENINGS = ['', 'a photo of', 'a picture of', 'an image of', 'a snapshot of', 'a collage of',
            'we can see', 'you can see', 'this picture shows', 'the photo shows',
            'the image contains']
GROUP_VERBS = ['are shown', 'can be seen', 'appear', 'are visible', 'are pictured', 'are placed']
RELATIONS = {'left': ['to the left of', 'left of', 'on the left of'],
             'right': ['to the right of', 'right of'], 'above': ['above', 'over', 'higher than'],
             'below': ['below', 'under', 'beneath', 'lower than']}
# how a cut-out is pasted: drop shadow, thin outline, or feathered edge
EDGES = ['shadow', 'outline', 'soft']
# longest side/S
SIZES = {'tiny': (0.13, 0.19), 'small': (0.27, 0.34), 'medium': (0.38, 0.45), 'large': (0.50, 0.60)}
SIZE_PROBS = [0.1, 0.3, 0.3, 0.3]  # tiny objects are VOC "difficult" and never captioned
# gaps between ranges keep words true
SIZE_WORDS = {'small': ['small', 'little'], 'large': ['large', 'big', 'huge']}
NUMBERS = {2: 'two', 3: 'three', 4: 'four'}
# degrees either way; objects stay upright, as in photos, so "above"/"below" stay meaningful
MAX_TILT = 12
# an object with less of its mask visible is VOC "difficult" and left out of captions
MIN_VISIBLE = 0.5
# a scene with an object less visible than this is redrawn: no unlabelled slivers
MIN_DRAWN = 0.15
# "left of"/"above" only between centres at least MARGIN * S (and 0.3 x their sizes) apart
MARGIN = 0.22
# so [SOS] caption [EOS] fits max_len = 30 ids with a few words split in two by BPE
MAX_WORDS = 22
# RGB distance between an object's colour and the mean backdrop under it (farthest if none)
MIN_CONTRAST = 140
# silhouettes drawn at 4x then box-filtered: anti-aliased edges and fractional masks
SUPERSAMPLE = 4
JPEG_QUALITY = 90
# part of each image's seed
SPLIT_CODES = {'train2017': 0, 'val2017': 1, 'trainval': 2, 'test': 3, 'train': 4, 'val': 5}
# -----------------------------------------------------------------------------


def ell(cx, cy, rx, ry, rot=0.0, a0=0, a1=360, n=28):
    """Points of an ellipse (or of its arc from a0 to a1 degrees), turned by rot degrees about its
    centre."""
    t, c, s = np.deg2rad(np.linspace(a0, a1, n)), np.cos(np.deg2rad(rot)), np.sin(np.deg2rad(rot))
    return np.stack([cx + rx * np.cos(t) * c - ry * np.sin(t) * s,
                     cy + rx * np.cos(t) * s + ry * np.sin(t) * c], 1)


def box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# A part is (points, fill, layer, line width): layer 0 is the silhouette, layer 1 its dark details
# (windows, eyes); fill 0 cuts a hole. Parts are drawn in order, so later ones cover earlier ones.
# Width 0 means a filled polygon.
solid = lambda points, width=0: (np.asarray(points, float), 1, 0, width)
dark = lambda points, width=0: (np.asarray(points, float), 1, 1, width)
hole = lambda points, layer=0: (np.asarray(points, float), 0, layer, 0)


# Silhouettes face right and stand upright in a unit frame (y down); each returns (variant, parts).
def cup(u, r):
    w, h, taper, top = u(.45, .6), u(.45, .65), u(0, .08), .2
    body = [(.5 - w / 2, top), (.5 + w / 2, top), (.5 + w / 2 - taper, top + h),
            (.5 - w / 2 + taper, top + h)]
    parts = [solid(ell(.5 + w / 2, top + h * .45, .17, h * .3)),
             hole(ell(.5 + w / 2, top + h * .45, .09, h * .17)),
             # handle, body, rim
             solid(body), solid(ell(.5, top, w / 2, .06)), dark(ell(.5, top, w / 2 - .04, .04))]
    return ('teacup',
            parts + [solid(ell(.5, top + h, w * .85, .055))]) if r.random() < .4 else ('mug', parts)


def chair(u, r):
    d, back, leg, lean = u(.4, .55), u(.35, .5), u(.3, .45), u(0, .1)
    # back, seat, legs
    return 'chair', [solid([(.2, .5), (.2 - lean, .5 - back), (.29 - lean, .5 - back), (.29, .5)]),
                     solid(box(.2, .5, .2 + d, .59)), solid(box(.2, .5, .28, .5 + leg)),
                     solid(box(.12 + d, .5, .2 + d, .5 + leg))]


def tree(u, r):
    if r.random() < .5:  # a round crown of overlapping discs on a trunk
        tw, R = u(.05, .08), u(.22, .28)
        crown = [
            solid(ell(.5 + R * .7 * np.cos(a), .35 + R * .6 * np.sin(a), R * u(.6, .8),
                      R * u(.6, .8)))
                 for a in 2 * np.pi * np.arange(r.integers(4, 7)) / 5 + u(0, 1)]
        return 'leafy', [solid(box(.5 - tw, .45, .5 + tw, 1)), dark(box(.5 - tw, .45, .5 + tw, 1)),
                         *crown, solid(ell(.5, .35, R, R * .9))]
    w = u(.3, .4)  # a pine: three tiers, widest at the bottom
    tiers = [
        solid([(.5, k * .22), (.5 + w * (.55 + .25 * k), k * .22 + .4),
               (.5 - w * (.55 + .25 * k), k * .22 + .4)])
             for k in range(3)]
    return 'pine', [solid(box(.46, .8, .54, 1)), dark(box(.46, .8, .54, 1)), *tiers]


def car(u, r):
    y0, y1 = .42, u(.68, .74)
    body = [(0, y0 + .06), (.06, y0), (.94, y0 + .02), (1, y0 + .1), (1, y1 - .03), (.97, y1),
            (.03, y1), (0, y1 - .03)]
    van = r.random() < .3  # a van's cabin is taller and runs almost to its back
    x0, x1, top = (.04, .84, .12) if van else (u(.15, .25), u(.75, .85), u(.18, .24))
    cabin = [(x0, y0), (x0 + .1, top), (x1 - .14, top), (x1, y0)]
    glass = [(x0 + .12, top + .05), (x1 - .15, top + .05), (x1 - .07, y0 - .02),
             (x0 + .07, y0 - .02)]
    wheels = [p for x in (.21, .79)
              for p in (solid(ell(x, y1, .12, .12)), dark(ell(x, y1, .12, .12)),
                                              # dark tyres, light hubs
                                              hole(ell(x, y1, .05, .05), layer=1))]
    return ('van' if van else 'sedan'), [solid(cabin), solid(body), dark(glass), *wheels]


def house(u, r):
    w, roof, door = u(.6, .85), u(.3, .45), u(-.15, .15)
    x0, x1 = .5 - w / 2, .5 + w / 2
    # a chimney
    parts = [solid(box(x1 - .2, .4 - roof * .85, x1 - .11, .3))] if r.random() < .5 else []
    parts += [solid(box(x0, .4, x1, 1)), solid([(x0 - .08, .42), (x1 + .08, .42), (.5, .4 - roof)]),
              dark(box(.5 + door - .07, .75, .5 + door + .07, 1))]
    # windows beside the door
    return 'house', parts + [dark(box(x, .52, x + .12, .64)) for x in (x0 + .06, x1 - .18)
                             if x + .12 < .5 + door - .08 or x > .5 + door + .08]


def fish(u, r):
    rx, ry, tail = u(.3, .38), u(.15, .24), u(.15, .22)
    cx = .2 + rx
    return 'fish', [solid([(cx - rx + .06, .5), (0, .5 - tail), (.05, .5), (0, .5 + tail)]),
                    # dorsal fin
                    solid([(cx - .1, .5 - ry * .8), (cx - .2, .5 - ry - .1),
                           (cx + .05, .5 - ry * .9)]),
                    solid(ell(cx, .5, rx, ry)), dark(ell(cx + rx * .6, .5 - ry * .25, .035, .035)),
                    # eye and gill
                    dark(ell(cx + rx * .35, .5, .02, ry * .6, a0=-60, a1=60, n=8), width=.025)]


def bird(u, r):
    rx, ry, head = u(.25, .3), u(.15, .19), u(.11, .14)
    return 'bird', [solid([(.3, .5), (0, .45 + u(-.08, .05)), (.03, .62)]),
                    solid([(.42, .66), (.42, .9)], .03), solid([(.52, .66), (.55, .9)], .03),
                    solid(ell(.45, .55, rx, ry, rot=-12)), solid(ell(.72, .37, head, head)),
                    # beak
                    solid([(.72 + head * .8, .33), (.72 + head + .13, .38),
                           (.72 + head * .8, .42)]),
                    # wing and eye
                    dark(ell(.42, .54, rx * .6, ry * .5, rot=-20)), dark(ell(.75, .34, .025, .025))]


def flower(u, r):
    n, R = r.integers(5, 10), u(.2, .26)
    leaves = [solid(ell(.5 + side * .12, .7 + u(0, .1), .13, .05, rot=-side * 30))
              for side in (1, -1)[:r.integers(1, 3)]]
    petals = [
        solid(ell(.5 + R * .6 * np.cos(a), .3 + R * .6 * np.sin(a), R * .5, R * .16, np.rad2deg(a))
              if n >= 7
                    else ell(.5 + R * .6 * np.cos(a), .3 + R * .6 * np.sin(a), R * .42, R * .42))
              for a in 2 * np.pi * np.arange(n) / n]  # many thin petals make a daisy
    heart = ell(.5, .3, R * .35, R * .35)
    stem = solid([(.5, .3), (.5 + u(-.06, .06), .65), (.5, 1)], .05)
    return ('daisy' if n >= 7 else 'flower'), [stem, *leaves, *petals, solid(heart), dark(heart)]


def key(u, r):
    rb, th = u(.14, .19), u(.08, .1)
    teeth = [solid(box(x - .045, .5, x, .5 + th / 2 + u(.06, .12)))
             for x in .96 - np.arange(r.integers(2, 4)) * u(.09, .12)]
    return 'key', [solid(ell(rb, .5, rb, rb)), hole(ell(rb, .5, rb * .45, rb * .45)),
                   solid(box(rb * 1.8, .5 - th / 2, 1, .5 + th / 2)), *teeth]


def umbrella(u, r):
    ry, k = u(.3, .42), r.integers(3, 6)
    xs = np.linspace(1, 0, 8 * k + 1)
    # dome, then scallops from right to left
    canopy = np.concatenate([ell(.5, .45, .5, ry, a0=180, a1=360, n=30),
                             np.stack([xs, .45 - .05 * np.abs(np.sin(np.pi * k * xs))], 1)])
    return 'umbrella', [solid(canopy), solid([(.5, .46 - ry), (.5, .4 - ry)], .035),
                        solid(
                            np.concatenate([[(.5, .45)],
                                            ell(.44, .92, .06, .06, a0=0, a1=180, n=10)]), .035),
                        # shaft, hook, ribs
                        *[dark([(.5, .45 - ry), (i / k, .45)], .015) for i in range(1, k)]]


def bottle(u, r):
    bw, nw, sh = u(.1, .17), u(.035, .055), u(.28, .45)
    outline = [(.5 - nw, .1), (.5 + nw, .1), (.5 + nw, sh - .06), (.5 + bw, sh + .08), (.5 + bw, 1),
               (.5 - bw, 1), (.5 - bw, sh + .08), (.5 - nw, sh - .06)]
    cap = box(.5 - nw - .012, .04, .5 + nw + .012, .12)
    label = box(.5 - bw, .62, .5 + bw, .8)
    # long neck: wine
    return ('wine' if sh > .38 else 'bottle'), [solid(outline), solid(cap), dark(cap), dark(label)]


def lamp(u, r):
    tw, bw, sh, base = u(.12, .2), u(.28, .38), u(.3, .4), u(.18, .26)
    parts = [solid([(.5 - tw, 0), (.5 + tw, 0), (.5 + bw, sh), (.5 - bw, sh)]),
             dark(ell(.5, sh, bw * .85, .035)), solid(box(.47, sh, .53, .93)),
             solid(ell(.5, .95, base, .05)), solid(box(.5 - base, .93, .5 + base, .95))]
    # a bulge in the stem
    return 'lamp', parts + ([solid(ell(.5, u(.58, .75), .07, .1))] if r.random() < .5 else [])


def silhouette(category, rng):
    """A random instance: parts centred on their bounding box and scaled so that its longest side is
    1."""
    # the drawer above named after the category
    variant, parts = globals()[category](rng.uniform, rng)
    points = np.concatenate([p for p, fill, layer, _ in parts if fill and layer == 0])
    lo, hi = points.min(0), points.max(0)
    return variant, [((p - (lo + hi) / 2) / (hi - lo).max(), fill, layer, width / (hi - lo).max())
                     for p, fill, layer, width in parts]


def object_masks(obj, parts, size):
    """(mask, dark) in [0, 1], each (size, size): the object's anti-aliased coverage and its dark
    details."""
    s, a = SUPERSAMPLE, np.deg2rad(obj['tilt'])
    layers = [Image.new('L', (size * s, size * s), 0) for _ in range(2)]
    draws = [ImageDraw.Draw(layer) for layer in layers]
    turn = np.array([[np.cos(a), np.sin(a)],
                     [-np.sin(a), np.cos(a)]]) * [[-1 if obj['flip'] else 1], [1]]
    for p, fill, layer, width in parts:  # flip (to face left), tilt, scale, place
        xy = [tuple(q) for q in (p @ turn * obj['box'] + obj['center']) * s]
        if width:
            draws[layer].line(xy, fill=255 * fill, width=max(1, round(width * obj['box'] * s)),
                              joint='curve')
        else:
            draws[layer].polygon(xy, fill=255 * fill)
    mask, details = (np.asarray(layer.resize((size, size), Image.BOX), np.float32) / 255
                     for layer in layers)
    return mask, details * mask


def noise(rng, size, cells, octaves=3):
    """Smooth value noise in about [0, 1]: random grids upsampled bicubically, finer octaves
    weaker."""
    total = sum(0.5 ** i * np.asarray(Image.fromarray(rng.random((cells * 2 ** i + 1,) * 2)
                                                      .astype(np.float32), 'F')
                                      .resize((size, size), Image.BICUBIC)) for i in range(octaves))
    return total / (2 - 0.5 ** (octaves - 1))


def streaks(rng, size, n, vertical=None):
    """Noise smeared along one axis (grass blades, fur, brushed metal): along y, x, or either at
    random."""
    t = np.asarray(Image.fromarray(rng.random((n, size)).astype(np.float32),
                                   'F').resize((size, size), Image.BILINEAR))
    return t if (rng.random() < .5 if vertical is None else vertical) else t.T


def texture(kind, obj, rng, size):
    """A pattern in about [0, 1] over the whole image, scaled to the object (frequencies are per
    object width)."""
    y, x = (np.mgrid[0:size, 0:size] - np.array(obj['center'])[::-1, None, None]) / obj['box']
    a = rng.uniform(0, np.pi)
    u, n = x * np.cos(a) + y * np.sin(a), noise(rng, size, max(2, round(2 * size / obj['box'])))
    if kind == 'wood':  # many thin dark grain lines, bent by noise
        return 0.85 - 0.7 * (
            0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(5, 9) * u + 0.7 * n))) ** 6 - 0.3 * n
    if kind == 'marble':  # pale stone with soft dark veins along a turbulent sine
        return 0.85 - 0.9 * (
            1 - np.abs(np.sin(2 * np.pi * (rng.uniform(1.5, 2.5) * u + 2 * n)))) ** 4
    if kind == 'weave':  # over-under threads, 3-4 px each
        yy, xx = np.mgrid[0:size, 0:size] / rng.uniform(3, 4)
        over = (np.floor(xx) + np.floor(yy)) % 2 == 0
        return 0.2 + 0.6 * np.where(over, np.sin(np.pi * yy) ** 2,
                                    np.sin(np.pi * xx) ** 2) + 0.2 * n
    if kind == 'fur':
        return 0.15 + 0.45 * streaks(rng, size, size // 2) + 0.4 * n
    if kind == 'metal':  # smooth gradient, one bright specular band, faint brushing
        return (0.35 + 0.25 * np.sin(2 * np.pi * (u + rng.uniform(0, 1)))
                + 0.15 * streaks(rng, size, size // 3)
                + 0.5 * np.exp(-((u - rng.uniform(-.3, .3)) * 6) ** 2))
    if kind == 'speckle':  # fruit-like skin with small dark and light specks
        specks = rng.random((size, size))
        return 0.55 + 0.3 * (n - .5) - 0.45 * (specks > .93) + 0.3 * (specks < .04)
    if kind == 'stripes':
        return 0.5 + 0.5 * np.tanh(3 * np.sin(2 * np.pi * rng.uniform(2.5, 4.5) * u))
    # spots
    return np.where(noise(rng, size, max(2, round(4 * size / obj['box'])), 1) > 0.62,
                    0.05, 0.7) + 0.15 * n


def background(kind, rng, size):
    """A photo-like backdrop (size, size, 3), drawn with no regard to the objects."""
    y, x = np.mgrid[0:size, 0:size] / size
    n = noise(rng, size, 4)[..., None]
    if kind == 'grass':  # vertical blades
        img = np.array([70, 135, 45]) * (
            0.45 + 0.5 * n + 0.5 * streaks(rng, size, 6, vertical=True)[..., None] ** 2)
    elif kind == 'sand':
        ripples = np.sin(2 * np.pi * (rng.uniform(5, 9) * y + 1.5 * n[..., 0]))[..., None]
        img = np.array([205, 180, 130]) * (0.85 + 0.1 * ripples + 0.15 * n) + \
            rng.normal(0, 10, (size, size, 1))
    elif kind == 'brick':
        # brick height in pixels; bricks are twice as long, every other row shifted
        h = size / rng.uniform(6, 10)
        row, along = np.floor(y * size / h), x * size + (np.floor(y * size / h) % 2) * h
        mortar = ((y * size) % h < 1.5) | (along % (2 * h) < 1.5)
        # each brick its own shade
        shade = 0.75 + 0.3 * ((row * 7 + np.floor(along / (2 * h)) * 13) * 0.618 % 1)
        brick = (np.array([rng.choice([150, 170, 190]), 75, 55])
                 * (shade[..., None] + 0.2 * (n - .5)))
        img = np.where(mortar[..., None], np.array([190, 185, 175]) * (0.8 + 0.2 * n), brick)
    elif kind == 'water':
        waves = np.sin(2 * np.pi * (rng.uniform(6, 12) * y + 0.4 * np.sin(4 * np.pi * x)
                                    + 2 * n[..., 0]))
        img = np.array([40, 110, 160]) * (0.7 + 0.4 * y[..., None]) + \
            60 * np.clip(waves, 0.7, 1)[..., None] - 42
    elif kind in ('sky', 'landscape'):  # blue getting paler towards the horizon, white clouds
        clouds = np.clip((noise(rng, size, 3)[..., None] - rng.uniform(0.45, 0.6)) * 4, 0, 1)
        img = ((np.array([70, 130, 210]) + (y * 110)[..., None] * [0.9, 0.7, 0.3]) * (1 - clouds)
               + 240 * clouds)
        if kind == 'landscape':  # green, brown or yellow ground below a slightly uneven horizon
            ground = np.array([[80, 140, 50], [150, 120, 70],
                               [190, 170, 90]][rng.integers(3)]) * (0.6 + 0.6 * n)
            horizon = rng.uniform(0.35, 0.65) + 0.05 * (n[..., 0] - 0.5)
            img = np.where((y > horizon)[..., None], ground * (1.1 - 0.3 * y[..., None]), img)
    elif kind == 'tiles':  # a checkerboard of two colours with light grout
        k, colours = rng.uniform(3, 6), rng.integers(40, 240, (2, 3))
        tile = colours[((np.floor(x * k) + np.floor(y * k)) % 2).astype(int)] * (0.9 + 0.2 * n)
        img = np.where((((x * k) % 1 < 0.06) | ((y * k) % 1 < 0.06))[..., None],
                       np.array([200, 200, 195]), tile)
    elif kind == 'blur':  # an out-of-focus photo: random coloured blobs, blurred hard
        im = Image.new('RGB', (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        for _ in range(rng.integers(5, 10)):
            cx, cy, r = rng.uniform(0, size, 3) * [1, 1, .3]
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        img = np.asarray(im.filter(ImageFilter.GaussianBlur(size / 12)), np.float32)
    else:  # mottled: two random colours mixed by cloud-like noise
        c1, c2 = rng.integers(0, 256, (2, 3))
        img = c1 + np.clip((n - 0.5) * 3 + 0.5, 0, 1) * (c2 - c1)
    img = Image.fromarray(np.clip(img + rng.uniform(-20, 20, 3), 0, 255).astype(np.uint8))
    # a slight depth-of-field blur, so the sharp cut-outs stand in front of the backdrop as in a
    # photo
    return np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1))), np.float32)


def make_scene(rng, size):
    """Backdrop and 1-4 objects with the truth every caption and VOC label is made from; also their
    masks."""
    kind = str(rng.choice(list(BACKGROUNDS)))
    bg = background(kind, rng, size)
    while True:  # redraw until no object is a hidden sliver and at least one is plainly visible
        objects, masks = [], []
        for _ in range(rng.integers(1, 5)):
            size_word = str(rng.choice(list(SIZES), p=SIZE_PROBS))
            side = rng.uniform(*SIZES[size_word]) * size
            # prefer spots away from earlier objects: occlusion yes, pile-ups rarely
            for _ in range(10):
                center = rng.uniform(side / 2 + 1, size - side / 2 - 1, 2)
                if all(np.hypot(*(center - o['center'])) >= 0.6 * (side + o['box']) / 2
                       for o in objects):
                    break
            obj = {'category': str(rng.choice(CATEGORIES)), 'size': size_word,
                   'box': round(float(side), 2), 'center': center.round(2).tolist(),
                   'flip': bool(rng.random() < .5),
                   'tilt': round(float(rng.uniform(-MAX_TILT, MAX_TILT)), 1)}
            obj['variant'], parts = silhouette(obj['category'], rng)
            objects.append(obj)
            masks.append(object_masks(obj, parts, size))
        cover = np.zeros((size, size), np.float32)
        for obj, (mask, _) in reversed(list(zip(objects, masks))):  # later objects lie on top
            visible = mask * (1 - cover)
            obj['visible'] = round(float(visible.sum() / mask.sum()), 3)
            m = visible if visible.max() > 0 else mask
            # VOC boxes enclose the visible part, 1-based, inclusive
            ys, xs = np.nonzero(m >= min(0.25, m.max()))
            obj['bbox'] = [int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1,
                           int(ys.max()) + 1]
            obj['difficult'] = obj['size'] == 'tiny' or obj['visible'] < MIN_VISIBLE
            cover += mask * (1 - cover)
        if min(o['visible'] for o in objects) >= MIN_DRAWN and \
            not all(o['difficult'] for o in objects):
            break
    # the colour must stand out from the backdrop under it
    for k, (obj, (mask, _)) in enumerate(zip(objects, masks)):
        under = (bg * mask[..., None]).sum((0, 1)) / mask.sum()
        dist = {c: np.linalg.norm(under - rgb) for c, rgb in COLOURS.items()}
        far = [c for c in COLOURS if dist[c] >= MIN_CONTRAST] or [max(dist, key=dist.get)]
        # and, if it can, from the others
        new = [c for c in far if c not in {o['colour'] for o in objects[:k]}]
        obj['colour'] = str(rng.choice(new or far))
        obj['texture'], obj['edge'] = str(rng.choice(list(TEXTURES))), str(rng.choice(EDGES))
    return {'size': size, 'background': kind, 'objects': objects}, bg, masks


def render(scene, bg, masks, rng):
    """Paste the textured cut-outs in order (later ones occlude earlier ones) and light the scene; a
    PIL image."""
    size, img = scene['size'], bg.copy()
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    # light comes from -light: one direction for shading and shadows in the picture
    light = rng.uniform(-1, 1, 2)
    slope = (x * light[0] + y * light[1])[..., None]

    def filtered(mask, f):
        return np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(f),
                          np.float32)[..., None] / 255
    for obj, (mask, details) in zip(scene['objects'], masks):
        t = texture(obj['texture'], obj, rng, size)[..., None]
        rgb = np.array(COLOURS[obj['colour']]) + rng.uniform(-12, 12, 3)
        paint = ((rgb + (t - 0.5) * (70 + 0.4 * rgb)) * (1 - 0.3 * slope)
                 * (1 - 0.6 * details[..., None]))
        if obj['edge'] == 'shadow':  # cast away from the light
            shift = tuple(np.round(2 * light[::-1]).astype(int))
            img *= 1 - 0.5 * np.roll(filtered(mask, ImageFilter.GaussianBlur(1.5)), shift, (0, 1))
        elif obj['edge'] == 'outline':  # a thin dark or light rim, as around a paper cut-out
            rim = filtered(mask, ImageFilter.MaxFilter(3))
            img = img * (1 - rim) + rim * (20 if rng.random() < .5 else 240)
        alpha = (filtered(mask, ImageFilter.GaussianBlur(0.7)) if obj['edge'] == 'soft'
                 else mask[..., None])
        img = img * (1 - alpha) + paint * alpha
    # light falling across the picture, vignette
    img *= 1 - 0.15 * slope - 0.2 * (x ** 2 + y ** 2)[..., None]
    img += rng.normal(0, 3, img.shape)  # a little sensor noise everywhere
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def noun_phrase(group, rng, first=None):
    """'a big red wooden chair', 'two keys covered in fur': size, colour and texture only if the
    group shares them."""
    o, words, after = group[0], [], ''
    same = lambda k: len({g[k] for g in group}) == 1
    if same('size') and o['size'] in SIZE_WORDS and rng.random() < 0.4:
        words.append(str(rng.choice(SIZE_WORDS[o['size']])))
    if same('colour') and rng.random() < 0.6:
        words.append(str(rng.choice(COLOUR_WORDS.get(o['colour'], [o['colour']]))))
    r = rng.random()
    if same('texture') and r < 0.35:
        words.append(str(rng.choice(TEXTURES[o['texture']][0])))
    elif same('texture') and r < 0.5:
        after = ' ' + str(rng.choice(TEXTURES[o['texture']][1]))
    name = str(rng.choice(NOUNS[o['category']]
                          + (NOUNS.get(o['variant'], []) if same('variant') else [])))
    if len(group) > 1:  # plural of the last word: "pine trees"
        *head, last = name.split()
        name = ' '.join(head + [IRREGULAR.get(last, last + 's')])
    first = first or (NUMBERS[len(group)] if len(group) > 1 else 'an'
                      if (words + [name])[0][0] in 'aeiou' else 'a')
    return ' '.join([first] + words + [name]) + after


def listing(phrases):
    return phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def captions(scene, rng, n=5):
    """n different captions, each naming every plainly visible object; relations only with a clear
    margin."""
    size, objects = scene['size'], scene['objects']
    # tiny or mostly hidden objects are not described
    shown = [o for o in objects if not o['difficult']]
    place = lambda: str(rng.choice(BACKGROUNDS[scene['background']]))
    pick = lambda options: str(rng.choice(options))

    def groups():  # same-category objects become "two cups" when none of that category is hidden
        out, cats = [], [o['category'] for o in objects]
        for c in sorted({o['category'] for o in shown}):
            members = [o for o in shown if o['category'] == c]
            together = len(members) > 1 and len(members) == cats.count(c) and rng.random() < 0.7
            out += [members] if together else [[m] for m in members]
        return [out[i] for i in rng.permutation(len(out))]

    # "a photo of a cup and two keys on the grass", "on the grass we can see a cup and two keys"
    def described():
        gs = groups()
        there, items = 'there is' if len(gs[0]) == 1 else \
            'there are', listing([noun_phrase(g, rng) for g in gs])
        if rng.random() < 0.4:
            return (f"{place()} "
                    f"{pick([there, 'we can see', 'you can see', 'we see', 'one can spot'])} "
                    f"{items}")
        return f'{pick(OPENINGS + [there] * 2)} {items}'.strip() + pick(['', ' ' + place()])

    # "a bird perches on a lawn", "two cars are parked on the sand", "a cup and a key appear ..."
    def verb():
        gs = groups()
        if len(gs) > 1:
            return f"{listing([noun_phrase(g, rng) for g in gs])} {pick(GROUP_VERBS)} {place()}"
        v = pick(VERBS[gs[0][0]['category']] + ['is shown', 'can be seen', 'is pictured'])
        if len(gs[0]) > 1:  # plural verb: is -> are, perches -> perch, sits -> sit
            v = ('are' + v[2:] if v.startswith('is ') else v if v.startswith('can')
                 else v[:-2] if v.endswith('ches') else v[:-1])
        return f'{noun_phrase(gs[0], rng)} {v} {place()}'

    def count():  # claimed only when nothing in the picture is tiny or hidden
        if len(shown) < len(objects):
            return None
        if len(shown) == 1:
            return (f"{noun_phrase(shown, rng, first=pick(['only one', 'just one', 'a single']))} "
                    f"{place()}")
        return f"{NUMBERS[len(shown)]} {pick(['objects', 'things', 'items'])} {place()}: " + \
            listing([noun_phrase(g, rng) for g in groups()])

    def relation():
        pairs = []  # (a, relation, b) that hold with a clear margin between the centres
        for a in shown:
            for b in shown:
                dx, dy = np.array(b['center']) - a['center']
                margin = max(MARGIN * size, 0.3 * (a['box'] + b['box']))
                pairs += [(a, 'left', b), (b, 'right', a)] if dx >= margin else []
                # image y grows downwards
                pairs += [(a, 'above', b), (b, 'below', a)] if dy >= margin else []
        if not pairs:
            return None
        a, rel, b = pairs[rng.integers(len(pairs))]
        is_ = pick(['is ', '', 'can be seen '])
        clause = f"{noun_phrase([a], rng)} {is_}{pick(RELATIONS[rel])} {noun_phrase([b], rng)}"
        rest = [noun_phrase([o], rng) for o in shown if o is not a and o is not b]
        return clause + (f', and {listing(rest)}' if rest else '') + pick(['', ' ' + place()])

    def positions():  # thirds of the picture, by the object's centre
        def where(o):
            x, y = np.array(o['center']) / size
            across = 'left' if x < 1 / 3 else 'right' if x > 2 / 3 else ''
            up = 'top' if y < 1 / 3 else 'bottom' if y > 2 / 3 else ''
            options = [f'on the {across}', f'on the {across} side'] * bool(across)
            options += [f'at the {up}', f'near the {up}'] * bool(up)
            options += [f'in the {up} {across} corner'] * bool(across and up)
            options += ['in the middle',
                        'in the centre'] * bool(max(abs(x - .5), abs(y - .5)) < 1 / 8)
            return ' ' + pick(options) if options else ''
        phrases = [noun_phrase([shown[i]], rng) + where(shown[i])
                   for i in rng.permutation(len(shown))]
        return listing(phrases) if any(' the ' in p for p in phrases) else None

    templates, out = [described, described, verb, count, relation, relation, positions], []
    for i in range(12 * n):  # cycle the templates in random order until n distinct captions
        if i % len(templates) == 0:
            order = rng.permutation(len(templates))
        caption = templates[order[i % len(templates)]]()
        if caption and caption not in out and len(re.findall(r'\w+', caption)) <= MAX_WORDS:
            out.append(caption)
        if len(out) == n:
            break
    out = out or [listing([noun_phrase([o], rng) for o in shown])]
    return (out * n)[:n]  # a lone object can run out of short phrasings: repeat rather than invent


def make_example(task):
    """Worker: draw, render and save one image; returns its scene record and captions."""
    seed, split, index, size, path = task
    # the same image whatever the worker count
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    scene, bg, masks = make_scene(rng, size)
    render(scene, bg, masks, rng).save(path, quality=JPEG_QUALITY)
    return scene, captions(scene, rng)


def attributes(scene):
    """The shapes world's attribute tasks (prepare.scene_attributes), with this world's background
    kinds (grass, brick, ...) and one more: the objects' texture (wood, fur, ...), which the
    captions name too."""
    return {**prepare.scene_attributes(scene, scene['background']),
            'texture': prepare.flags(scene, lambda o: [o['texture']])}


def main():
    args = prepare.command_line('Write the synthetic objects world in COCO + VOC2007 formats.',
                                out='data/objects', size=96, min_size=48, prog='objects_world.py',
                                tasks=prepare.ATTRIBUTE_TASKS + ('texture',))
    prepare.write_world(args, make_example, CATEGORIES, ('objects world', 'dev/objects_world.py'),
                        'objects_world.py', attributes)


if __name__ == '__main__':
    main()

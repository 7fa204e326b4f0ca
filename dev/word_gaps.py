"""
Dev: where a captioner's words come from, direction by direction. For one train.py checkpoint of a
synthetic world, the first reference caption of every val image is scored teacher-forced by each
decoder, with its own image and with the next image's (the batch rolled by one, as train.py's
image gap). Per direction and word class (shape, colour, ...): the image gap (nats per word), and
how often the decoder's most likely next word is the target word, and for shape words how often its
likeliest shape is the target's, or one that the image holds (the generated captions' precision,
with the rest of the caption given); the first also by the number of shape kinds the image holds
(with one kind, naming it needs no binding of shape to colour or place). The forward decoder writes
the colour before the shape ("a yellow heart"), the backward one the shape before the colour, so the
two say whether shape is missing from the features or only from the binding of a shape to its
colour.

  python dev/word_gaps.py --ckpt=out/shape_words/bicaptioning_x4_seed0/ckpt.pt
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runs import HERE  # noqa: E402  (puts the project on the path)
from checkpoints import load_checkpoint  # noqa: E402
from coco import CocoCaptions, collate  # noqa: E402
from configurator import configure  # noqa: E402
from evaluate import normalize  # noqa: E402
from safety import one_line_errors  # noqa: E402
from pretexts import CAPTIONERS  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from word_classes import word_classes  # noqa: E402

# ----------------------------------------------------------------------------------------------
ckpt = ''
data_root = ''          # the world's coco/ folder; '' : the checkpoint's
split = 'val2017'
batch_size = 100
# ----------------------------------------------------------------------------------------------
configure(globals())
with one_line_errors():
    if not ckpt:
        raise ValueError("--ckpt: give a train.py checkpoint of a captioner")
    model, saved = load_checkpoint(os.path.join(HERE, ckpt))
    model.eval()
    if model.config.pretext not in CAPTIONERS:
        raise ValueError(f"{ckpt}: a {model.config.pretext} checkpoint, without caption "
                         "decoders")
    config = saved['config']
    root = os.path.join(HERE, data_root or config['data_root'])
    tok = Tokenizer(os.path.join(HERE, config['tokenizer']))
    dataset = CocoCaptions(root, split, tok, config['image_size'], model.config.max_len,
                           train=False, seed=0)
    classes = word_classes(dataset)
    if classes is None:
        raise ValueError(f"{root}/annotations/words_{split}.json: no such file (a synthetic "
                         "world's word classes)")
    with open(os.path.join(root, 'annotations', f'words_{split}.json')) as f:
        words = json.load(f)
names, lookup = classes
# the first piece of each shape word -> the shape it names (its singular), unless the first pieces
# of two shapes' words are the same (a small vocabulary's); the image ids are in the file names
first = {}
for word, shape in words['classes']['shape'].items():
    token = tok.encode(word)[0]
    first[token] = shape if first.get(token, shape) == shape else None
shape_of = {token: shape for token, shape in first.items() if shape}
shape_tokens = torch.tensor(list(shape_of))
image_ids = [str(int(os.path.splitext(os.path.basename(path))[0])) for path, _, _ in dataset.items]

# per direction, per pairing (own image, rolled): per class: [loss sum, top-1 right, count]
totals = {}
# at shape targets, the likeliest shape word, by the number of shape kinds the image holds (1..4+):
# [names the target's shape, one the image holds, count]. Where the image holds one kind, naming it
# needs no binding of a shape to its colour or place: only features that tell the shapes apart.
held = {}
keys = [(0, i) for i in range(len(dataset))]
for start in range(0, len(keys), batch_size):
    images, tokens, errors = collate([dataset[k] for k in keys[start:start + batch_size]])
    if errors:  # the rows would no longer match the image ids
        raise SystemExit(f"error: {errors[0]}")
    ids_here = image_ids[start:start + batch_size]
    with torch.no_grad():
        memory = model.visual_features(normalize(images))  # (B, N, H)
        for direction, ids in model.directions(tokens):
            targets = ids[:, 1:]
            mask = targets != model.config.pad_id
            rows = torch.arange(len(ids))[:, None].expand_as(targets)[mask]
            for pairing, paired in enumerate((memory, memory.roll(1, 0))):
                logits = model.logits(paired, ids[:, :-1], direction).float()
                logits, wanted = logits[mask], targets[mask]
                losses = torch.nn.functional.cross_entropy(logits, wanted, reduction='none')
                guess = logits.argmax(-1)
                word_class = lookup[wanted]
                table = totals.setdefault(direction, torch.zeros(2, len(names), 3))[pairing]
                hits = held.setdefault(direction, torch.zeros(2, 4, 3))
                table[:, 0].index_add_(0, word_class, losses)
                table[:, 1].index_add_(0, word_class, (guess == wanted).float())
                table[:, 2].index_add_(0, word_class, torch.ones_like(losses))
                at_shape = torch.isin(wanted, shape_tokens)
                if not at_shape.any():
                    continue
                named = shape_tokens[logits[at_shape][:, shape_tokens].argmax(-1)]
                for g, w, r in zip(named.tolist(), wanted[at_shape].tolist(),
                                   rows[at_shape].tolist()):
                    present = words['images'][ids_here[r]]['shape']['present']
                    right = [shape_of[g] == shape_of[w], shape_of[g] in present, 1]
                    kinds = min(len(present), 4) - 1
                    hits[pairing, kinds] += torch.tensor(right, dtype=torch.float)

print(f"{ckpt}: {len(keys)} {split} images, each image's first caption, teacher-forced")
print(f"{'direction':9} {'words':9} {'count':>6} {'gap nats':>9} {'top-1 own':>10} "
      f"{'top-1 other':>12}")
for direction in totals:
    own, other = totals[direction]
    for c, name in enumerate(names):
        count = own[c, 2].item()
        if count == 0:
            continue
        gap = (other[c, 0] - own[c, 0]).item() / count
        print(f"{direction:9} {name:9} {count:6.0f} {gap:9.3f} {100 * own[c, 1] / count:9.1f}% "
              f"{100 * other[c, 1] / count:11.1f}%")
    by_kinds, hits = held[direction], held[direction].sum(1)
    right, held_by_image = 100 * hits[:, 0] / hits[:, 2], 100 * hits[:, 1] / hits[:, 2]
    print(f"{direction:9} {'shape':9} the likeliest shape word names the target's shape "
          f"{right[0]:.1f}% ({right[1]:.1f}% with the next image's features), a shape the image "
          f"holds {held_by_image[0]:.1f}% ({held_by_image[1]:.1f}%)")
    shares = ' / '.join(f"{100 * right / count:.1f}% of {count:.0f}" if count else '-'
                        for right, count in by_kinds[0, :, ::2].tolist())
    print(f"{direction:9} {'shape':9} names the target's shape in images of 1 / 2 / 3 / 4+ shape "
          f"kinds: {shares}")

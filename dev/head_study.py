"""
Dev: which part of the caption head keeps the image's signal from the backbone? The same ResNet-18,
images, seed and budget are trained through a ladder of heads, each rung one change from the one
before, and each backbone is then judged by the VOC SVMs of evaluate.py. With the defaults it runs
in about 21 minutes on 2 CPU cores (measured: 1002 s for the nine rungs before cappa, 271 s for
cappa alone):

  python data/shapes/prepare.py && python tokenizer.py \
      --captions=data/shapes/coco/annotations/captions_train2017.json \
      --vocab_size=256 --out=data/shapes/vocab                      # once
  python dev/head_study.py                                          # all rungs, a table at the end
  python dev/head_study.py --rungs=labels,bicaptioning --steps=200  # some rungs

Per rung it prints the validation loss with the true images, with every caption paired with another
image (`shuffled`), their difference (`gap`, what the image is worth in nats per target) and
`text-only`: the loss of a predictor that never sees the image (for the bag heads the best one, the
mean target distribution; for captions a decoder trained as long on the same captions with the image
replaced by zeros; the shallow rung, which sees only the previous word, cannot reach it even with
the image). All heads train with AdamW at the same learning rates, no augmentation (the images are
kept in memory as uint8), batches of 64, warmup then cosine.

The rungs (each adds one change to the previous one):
  labels          linear layer on the pooled grid, per-class sigmoids: the image's categories (a
                  label pretext)
  category_words  linear layer on the pooled grid, one softmax: the categories named in a caption,
                  equally weighted
  caption_words   the same over all the caption's words (the paper's token classification pretext)
  shallow         captions predicted word by word: the projected pooled grid added to each word
                  embedding, then the tied output layer (no Transformer)
  decoder         + one Transformer decoder layer (self-attention and feed-forward), the image still
                  added
  cross_attention the image enters by cross-attention over the grid instead (the forward
                  captioning head)
  bicaptioning    + the backward decoder: the VirTex head as config/shapes.py trains it
  paper_init      the same with the paper's init (std 0.02), dropout 0.1 and one learning rate for
                  head and backbone
  sorted_names    bicaptioning with each caption replaced by the sorted names of the image's
                  categories
  cappa           bicaptioning's forward decoder alone, with CapPa's parallel prediction: 75 % of
                  the captions are predicted all at once from [MASK] inputs (train.py
                  --pretext=cappa); its text-only reference mixes the same shares of the
                  per-position word frequencies and the text-only decoder
"""
import math
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from coco import pad_tokens, read_coco_split  # noqa: E402
from evaluate import load_eval_image, normalize, to_uint8_tensor  # noqa: E402
from configurator import configure  # noqa: E402
from evaluate import read_voc  # noqa: E402
from svm import train_and_test_svms  # noqa: E402
from model import VirTex, VirTexConfig  # noqa: E402
from pretexts import pretext_model  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# the shapes world (data/shapes/prepare.py) and its vocabulary data/shapes/vocab.model
data = 'data/shapes'
rungs = ('labels,category_words,caption_words,shallow,decoder,cross_attention,bicaptioning,'
         'paper_init,sorted_names,cappa')
steps = 400
batch_size = 64
lr = 2e-3                   # AdamW, backbone
head_lr = 5e-4              # AdamW, every head but paper_init's (which uses lr)
warmup = 50
n_embd = 256
n_head = 4
init_std = 0.0566           # 0.02 * sqrt(2048 / 256): the paper's gain per matrix at its width
dropout = 0.0               # every caption head but paper_init's (the paper's 0.1)
seed = 0
val_images = 512            # validation captions for the losses
# -----------------------------------------------------------------------------
configure(globals())
torch.set_num_threads(os.cpu_count() or 1)
RUNGS = ['labels', 'category_words', 'caption_words', 'shallow', 'decoder', 'cross_attention',
         'bicaptioning', 'paper_init', 'sorted_names', 'cappa']
chosen = rungs.split(',')
unknown = [r for r in chosen if r not in RUNGS]
if unknown:
    raise SystemExit(f"error: unknown rungs {unknown}; choose from {','.join(RUNGS)}")


def load_pixels(paths, center_crop):
    """(N, 3, 64, 64) uint8: whole images (training, as train.py with min_crop_scale=1), or through
    the eval transform (VOC, as evaluate.py: shorter side to 73, center 64)."""
    if center_crop:
        return torch.stack([to_uint8_tensor(load_eval_image(p, 64)) for p in paths])
    return torch.stack([to_uint8_tensor(Image.open(p).convert('RGB')) for p in paths])


t_start = time.time()
tok = Tokenizer(f'{data}/vocab.model')
train_items, val_items = read_coco_split(f'{data}/coco',
                                         'train2017'), read_coco_split(f'{data}/coco', 'val2017')
train_pixels = load_pixels([p for _, p, _ in train_items], center_crop=False)
val_pixels = load_pixels([p for _, p, _ in val_items[:val_images]], center_crop=False)
voc_paths, voc_labels = {}, {}
for split in ('trainval', 'test'):
    paths, voc_labels[split], class_names = read_voc(f'{data}/VOC2007', split)
    voc_paths[split] = load_pixels(paths, center_crop=True)
print(f"loaded {len(train_items)} training, {len(val_pixels)} val and "
      f"{sum(len(v) for v in voc_paths.values())} VOC images in {time.time() - t_start:.0f}s",
      flush=True)

# the targets: the categories of an image are the names of its objects that its captions name (VOC's
# non-difficult)
category_of = {}
for word in class_names:  # singular and plural pieces of each category name
    for form in (word, word + 's', word + 'es'):
        ids = tok.encode(form)
        if len(ids) == 1:
            category_of[ids[0]] = word


def caption_ids(caption):
    return [tok.sos_id, *tok.encode(caption)[:27], tok.eos_id]


def categories(captions):
    named = {category_of[i] for c in captions for i in tok.encode(c) if i in category_of}
    return sorted(named)


def targets(items, rung, rng):
    """One training target per image, drawn as train.py draws a caption: ids (list) or a label
    vector."""
    out = []
    for _, _, captions in items:
        caption = captions[rng.integers(len(captions))]
        if rung == 'labels':
            out.append([class_names.index(c) for c in categories(captions)])
        elif rung == 'category_words':
            out.append([i for i in tok.encode(caption) if i in category_of])
        elif rung == 'caption_words':
            out.append(tok.encode(caption))
        elif rung == 'sorted_names':
            out.append(caption_ids(' '.join(categories(captions))))
        else:
            out.append(caption_ids(caption))
    return out


class Head(nn.Module):
    """The rung's head on top of the shared backbone (model.visual); the caption rungs reuse
    VirTex's modules."""

    def __init__(self, rung):
        super().__init__()
        self.rung = rung
        paper = rung == 'paper_init'
        self.caption = rung not in ('labels', 'category_words', 'caption_words')
        pretext = 'bicaptioning' if rung in ('bicaptioning', 'paper_init', 'sorted_names') else \
            'cappa' if rung == 'cappa' else 'captioning'
        cfg = VirTexConfig(visual='resnet18', vocab_size=len(tok), n_layer=1, n_embd=n_embd,
                           n_head=n_head, dropout=0.1 if paper else dropout, pretext=pretext,
                           zero_init_residual=False, init_std=0.02 if paper else init_std)
        torch.manual_seed(seed)  # the same backbone init on every rung
        self.model = pretext_model(cfg)
        if not self.caption:
            self.linear = nn.Linear(self.model.visual.width,
                                    len(class_names) if rung == 'labels' else len(tok))

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith('model.visual.')]

    def losses(self, grid, target):
        """Per-target mean loss: (loss, number of targets) for a batch. grid (B, C, h, w)."""
        m = self.model
        if not self.caption:
            # (B, classes or V)
            logits = self.linear(grid.mean((2, 3)))
            if self.rung == 'labels':
                y = torch.zeros_like(logits)
                for row, labels in zip(y, target):
                    row[labels] = 1
                return F.binary_cross_entropy_with_logits(logits, y)
            y = torch.zeros_like(logits)
            # a word that comes twice counts twice: the target sums to 1
            for row, ids in zip(y, target):
                if ids:
                    row.index_add_(0, torch.tensor(ids), row.new_full((len(ids),), 1 / len(ids)))
            keep = y.sum(1) > 0
            return -(y[keep] * logits[keep].log_softmax(-1)).sum(1).mean()
        tokens = pad_tokens(target)
        # the pooled image added to every position, no cross-attention
        if self.rung in ('shallow', 'decoder'):
            image = m.visual_projection(grid.mean((2, 3)))[:, None]                  # (B, 1, H)
            x = m.embed(tokens[:, :-1]) + image * (tokens[:, :-1] != 0).unsqueeze(-1)
            if self.rung == 'decoder':
                layer = m.layers_fwd[0]
                x = layer.norm1(x + layer.self_attn(x))
                x = layer.norm3(x + layer.feed_forward(x))
            real = tokens[:, 1:] != 0
            return F.cross_entropy(m.lm_head(x[real]), tokens[:, 1:][real])
        loss, parts = m.losses(m.project(grid), tokens)
        # per target already: the mean over both modes' targets (in eval, their mix)
        if self.rung == 'cappa':
            return loss
        return loss / len(parts)  # per direction, so that every rung's loss is per target


def text_only_loss(train_rows, val_rows, rung):
    """The loss of an image-blind predictor: for bag targets the best one, the mean target
    distribution; for captions a decoder that is trained without the image."""
    if rung == 'labels':
        y = torch.zeros(len(train_rows), len(class_names))
        for row, labels in zip(y, train_rows):
            row[labels] = 1
        p = y.mean(0).clamp(1e-6, 1 - 1e-6)
        yv = torch.zeros(len(val_rows), len(class_names))
        for row, labels in zip(yv, val_rows):
            row[labels] = 1
        return F.binary_cross_entropy(p.expand_as(yv), yv).item()
    if rung in ('category_words', 'caption_words'):
        mean = Counter()  # the mean of the training targets: each row spreads weight 1 over its ids
        rows = [ids for ids in train_rows if ids]
        for ids in rows:
            for i in ids:
                mean[i] += 1 / (len(ids) * len(rows))
        losses = [-sum(math.log(mean.get(i, 1e-6)) for i in ids) / len(ids)
                  for ids in val_rows if ids]
        return float(np.mean(losses))
    forward, both_directions = text_only_decoder(train_rows, val_rows)
    if rung == 'cappa':  # its eval loss mixes the modes: 0.75 parallel, 0.25 forward captioning
        return 0.75 * position_frequencies_loss(train_rows, val_rows) + 0.25 * forward
    return both_directions if rung in ('bicaptioning', 'paper_init', 'sorted_names') else forward


def position_frequencies_loss(train_rows, val_rows):
    """The best image-blind parallel predictor: each position's word frequencies in the training
    captions."""
    counts = Counter((t, i) for ids in train_rows for t, i in enumerate(ids[1:]))
    totals = Counter(t for ids in train_rows for t in range(len(ids) - 1))
    losses = [-math.log(max(counts[(t, i)], 1e-6) / totals[t]) for ids in val_rows
              for t, i in enumerate(ids[1:])]
    return float(np.mean(losses))


TEXT_ONLY = {}


def text_only_decoder(train_rows, val_rows):
    """A bicaptioning decoder trained on the same captions with the image replaced by zeros (no
    backbone, so it is quick), same steps and batch: its val loss (forward, mean of both directions)
    is the text-only reference."""
    key = (len(train_rows), tuple(map(tuple, val_rows[:8])))
    if key not in TEXT_ONLY:
        torch.manual_seed(seed)
        model = VirTex(VirTexConfig(visual='resnet18', vocab_size=len(tok), n_layer=1,
                                    n_embd=n_embd, n_head=n_head, dropout=0.0,
                                    zero_init_residual=False, init_std=init_std))
        optimizer = torch.optim.AdamW([p for n, p in model.named_parameters()
                                       if not n.startswith('visual.')], lr=lr)
        rng = np.random.default_rng(seed)
        for step in range(steps):
            index = rng.integers(len(train_rows), size=batch_size)
            tokens = pad_tokens([train_rows[i] for i in index])
            loss, _ = model.losses(torch.zeros(batch_size, 1, n_embd), tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            tokens = pad_tokens(val_rows)
            _, parts = model.losses(torch.zeros(len(val_rows), 1, n_embd), tokens)
        TEXT_ONLY[key] = (parts['fwd'].item(), (parts['fwd'].item() + parts['bwd'].item()) / 2)
    return TEXT_ONLY[key]


@torch.no_grad()
def validate(head, val_rows):
    """(true-image loss, shuffled-image loss) on the val images, in batches of 128 (each rolled by
    one)."""
    head.eval()
    sums = np.zeros(2)
    for s in range(0, len(val_rows), 128):
        grid = head.model.encode_images(
            normalize(val_pixels[s:s + 128]).contiguous(memory_format=torch.channels_last))
        rows = val_rows[s:s + 128]
        sums += [head.losses(grid, rows).item() * len(rows),
                 head.losses(grid.roll(1, 0), rows).item() * len(rows)]
    head.train()
    return sums / len(val_rows)


@torch.no_grad()
def voc_map(backbone):
    """evaluate.py's protocol on the backbone's pooled layer4 features at 64 px."""
    model = backbone.eval()
    features = {}
    for split, pixels in voc_paths.items():
        features[split] = torch.cat(
            [F.normalize(model.encode_images(normalize(pixels[s:s + 256])).mean((2, 3)), dim=1)
                                     for s in range(0, len(pixels), 256)])
    ap, _, _ = train_and_test_svms(features['trainval'], torch.from_numpy(voc_labels['trainval']),
                                   features['test'], torch.from_numpy(voc_labels['test']))
    return 100 * ap.mean().item()


rows = []
# the same init, untrained: the reference every rung should beat
random_backbone = Head('labels').model
rows.append(('random init', '', '', '', '', voc_map(random_backbone)))
print(f"random init: VOC mAP {rows[-1][-1]:.2f}", flush=True)
for rung in chosen:
    t0 = time.time()
    head = Head(rung).to(memory_format=torch.channels_last)
    rng = np.random.default_rng(seed)
    val_rows = targets(val_items[:val_images], rung, np.random.default_rng(seed + 1))
    text_only = text_only_loss(targets(train_items, rung, np.random.default_rng(seed + 2)),
                               val_rows, rung)
    rates = (lr, lr) if rung == 'paper_init' else (lr, head_lr)
    groups = [{'params': list(head.model.visual.parameters()), 'lr': rates[0]},
              {'params': head.head_parameters(), 'lr': rates[1]}]
    for g in groups:
        g['base_lr'] = g['lr']
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    order, position = rng.permutation(len(train_items)), 0
    for step in range(steps):
        # the schedule the study's tables were measured with: warmup to the full rate at step
        # warmup - 1 and a cosine over all steps (lookahead.warmup_cosine starts at 0 and decays
        # after the warmup only, so it would change every rung's number)
        scale = min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps))
                                                 if step >= warmup else 1)
        for g in optimizer.param_groups:
            g['lr'] = g['base_lr'] * scale
        if position + batch_size > len(order):
            order, position = rng.permutation(len(train_items)), 0
        index = order[position:position + batch_size]
        position += batch_size
        grid = head.model.encode_images(
            normalize(train_pixels[index]).contiguous(memory_format=torch.channels_last))
        loss = head.losses(grid, targets([train_items[i] for i in index], rung, rng))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g['params']], 10.0)
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"  {rung} step {step + 1}/{steps}: loss {loss.item():.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    true, shuffled = validate(head, val_rows)
    rows.append((rung, f"{true:.3f}", f"{shuffled:.3f}", f"{shuffled - true:+.3f}",
                 f"{text_only:.3f}", voc_map(head.model)))
    print(f"{rung}: val loss {true:.3f}, shuffled images {shuffled:.3f}, text-only "
          f"{text_only:.3f}, VOC mAP {rows[-1][-1]:.2f} ({time.time() - t0:.0f}s)", flush=True)

header = ('head', 'val loss', 'shuffled', 'gap', 'text-only', 'VOC mAP')
table = [header] + [(*r[:5], f"{r[5]:.2f}") for r in rows]
widths = [max(len(r[i]) for r in table) for i in range(len(header))]
print(f"\n{steps} steps x {batch_size} images per rung, seed {seed}, "
      f"{time.time() - t_start:.0f}s in all")
for r in table:
    print(' | '.join(cell.ljust(w) for cell, w in zip(r, widths)))

"""
train.py's validation passes: what the decoder reads from the image, and what the backbone is worth
by the paper's measure.

    from validation import image_gap, val_loader, voc_map
    loader = val_loader(val_set, batch_size, n_batches=20)    # a CocoCaptions of val2017
    line, record = image_gap(iter_num, model, loader, autocast, seed, bad_images, folder)
    voc, line, record = voc_map(iter_num, model, 'data/VOC2007', image_size, batch_size,
                                num_workers, best={'map': -1.0, 'iter': 0})

image_gap scores the validation captions with their own images and with other images (each batch's
images rolled by one): the difference is what the image is worth to the pretext head, in nats per
target, the first number to watch in pretraining (at 0 the head writes the captions from the text
alone). voc_map is evaluate.py's protocol (pooled features, the 320 SVMs) on the model being
trained. Under torchrun every process takes its share and all agree on the result, and on a
failure: a ValueError on every process, so that the run saves before it stops.
"""

import json
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from coco import to_device
from configurator import one_line_errors
from evaluate import extract_features, read_voc_task
from svm import svm_products_dtype, train_and_test_svms
from pretexts import CAPTIONERS, LOSS_PARTS


def val_loader(dataset, batch_size: int, n_batches: int, **loader_args) -> DataLoader:
    """The first n_batches batches of this process's share of the validation images: the same images
    at every evaluation."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    keys = [(0, i) for i in DistributedSampler(dataset, world_size, rank, shuffle=False)]
    return DataLoader(dataset, batch_size, sampler=keys[:n_batches * batch_size], **loader_args)


def word_classes(dataset):
    """(names, (V,) class index of every token id, 0 for the rest) from the words_<split>.json a
    synthetic world writes beside its captions (data/shapes/prepare.py), or None without one."""
    path = os.path.join(dataset.root, 'annotations', f'words_{dataset.split}.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        classes = json.load(f)['classes']
    index, tok = {}, dataset.tokenizer
    for c, (name, vocabulary) in enumerate(classes.items(), start=1):
        for word in vocabulary:
            for token in tok.encode(word):  # a piece shared by two classes counts for neither
                index[token] = c if index.get(token, c) == c else 0
    lookup = torch.zeros(len(tok), dtype=torch.long)
    lookup[list(index)] = torch.tensor(list(index.values()))
    return ['rest', *classes], lookup


def losses_by_word_class(model, memory, tokens, lookup):
    """(C,) sums of the next-token losses over both directions' targets of each word class, and
    (C,) their counts, for the captioning decoders."""
    sums = torch.zeros(int(lookup.max()) + 1, device=tokens.device)
    counts = torch.zeros_like(sums)
    for direction, ids in model.directions(tokens):
        targets = ids[:, 1:]
        classes = lookup[targets[targets != model.config.pad_id]]
        losses = model.caption_loss(memory, ids, direction, reduction='none')
        sums.index_add_(0, classes, losses.float())
        counts.index_add_(0, classes, torch.ones_like(losses, dtype=torch.float))
    return sums, counts


@torch.no_grad()
def image_gap(it: int, model, loader, autocast, seed: int, bad_images, folder: str):
    """The validation losses at iteration `it`, and the same captions scored against other images,
    as a line to print and a record for the log. For cappa also the loss of the best image-blind
    parallel predictor: each position's word frequencies in these captions. On a synthetic world,
    the captioners' gap per word class too (shape words, colour words, ..., the rest)."""
    cfg, device = model.config, next(model.parameters()).device
    part_names = LOSS_PARTS[cfg.pretext]
    classes = word_classes(loader.dataset) if cfg.pretext in CAPTIONERS else None
    if classes:
        lookup = classes[1].to(device)
        by_class = torch.zeros(3, len(classes[0]), device=device)  # true, shuffled sums; counts
    model.eval()
    # (true, shuffled) x (loss, parts)
    totals, batches = torch.zeros(2, 1 + len(part_names), device=device), 0
    # cappa: (position, word) counts
    position_counts = torch.zeros(cfg.max_len, cfg.vocab_size, device=device)
    for batch, (images, tokens, errors) in enumerate(loader):
        with one_line_errors():
            bad_images.add(errors)
        if images is None:
            continue
        images, tokens = to_device(images, tokens, device)
        with autocast:
            features = model.visual_features(images)  # (B, N, H) or pooled (B, C)
            # then every caption with another image
            for row, paired in enumerate((features, features.roll(1, 0))):
                # masked_lm hides the same words in both passes, and never draws from the training
                # RNG
                generator = torch.Generator(device).manual_seed(seed + batch)
                loss, parts = model.losses(paired, tokens, generator)
                totals[row] += torch.stack([loss, *parts.values()]).float()
                if classes:
                    sums, counts = losses_by_word_class(model, paired, tokens, lookup)
                    by_class[row] += sums
            if classes:
                by_class[2] += counts  # the same targets in both pairings
        if cfg.pretext == 'cappa':
            targets = tokens[:, 1:]
            positions = torch.arange(targets.shape[1], device=device).expand_as(targets)
            real = targets != cfg.pad_id
            position_counts.index_put_((positions[real], targets[real]),
                                       torch.ones((), device=device), accumulate=True)
        batches += 1
    counts = torch.cat([totals.flatten(),
                        torch.tensor([batches], device=device, dtype=totals.dtype)])
    if dist.is_initialized():
        dist.all_reduce(counts)
        dist.all_reduce(position_counts)
        if classes:
            dist.all_reduce(by_class)
    totals, batches = counts[:-1].view(2, -1), counts[-1].item()
    model.train()
    if batches == 0:  # every process knows: the counts were summed
        raise ValueError(f"no image of {folder} could be read for validation (see the warnings)")
    names = ('loss', *part_names)
    true, shuffled = (dict(zip(names, row)) for row in (totals / batches).tolist())
    frequencies = position_counts / position_counts.sum(1, keepdim=True).clamp(min=1)
    text_only = (-(position_counts * frequencies.clamp(min=1e-12).log()).sum()
                 / position_counts.sum().clamp(min=1)).item()

    gaps = {name: shuffled[name] - true[name] for name in part_names}  # per term
    image_gap = sum(gaps.values()) / len(gaps)  # per target of one term (one direction)
    terms = ' '.join(f"{name} {true[name]:.3f}" for name in part_names)
    unit = 'label' if cfg.pretext.endswith('classification') else 'token'
    worth = f"{image_gap:.3f} nats/{unit}"
    if cfg.pretext == 'cappa':
        worth = (f"{gaps['parallel']:.3f} nats/token in parallel (text-only {text_only:.3f}), "
                 f"{gaps['autoregressive']:.3f} autoregressive")
    line = (f"iter {it}: val loss {true['loss']:.4f} ({terms}) | shuffled images "
            f"{shuffled['loss']:.4f}: the image is worth {worth}")
    record = {'event': 'val', 'iter': it, 'loss': true['loss'],
              **{f'loss_{n}': true[n] for n in part_names}, 'loss_shuffled': shuffled['loss'],
              **{f'loss_shuffled_{n}': shuffled[n] for n in part_names}, 'image_gap': image_gap,
              **({'text_only_parallel': text_only} if cfg.pretext == 'cappa' else {})}
    if classes:  # nats per word of the class, both directions
        gaps = ((by_class[1] - by_class[0]) / by_class[2].clamp(min=1)).tolist()
        record['image_gap_words'] = dict(zip(classes[0], gaps))
        line += ' (' + ', '.join(f"{name} {gap:.3f}" for name, gap in zip(classes[0], gaps)) + ')'
    return line, record


def voc_map(it: int, model, voc_root: str, image_size: int, batch_size: int, num_workers: int,
            best: dict):
    """The backbone's VOC07 mAP at iteration `it`, as evaluate.py computes it: pooled features of
    trainval and test with the eval transform (each process extracts its share), then the SVMs on
    rank 0. Returns (mAP, a line to print, a record for the log), where `best` ({'map', 'iter'}, the
    best so far) is beaten or kept; (None, None, None) on the other processes."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = str(next(model.parameters()).device)  # "cpu", "cuda:0"
    t0 = time.time()
    model.eval()
    splits, task = {}, read_voc_task(voc_root)
    for split in ('trainval', 'test'):
        paths, split_labels = task[split]
        try:
            mine = extract_features(lambda x: model.encode_images(x).mean((2, 3)),
                                    paths[rank::world_size], image_size, split,
                                    batch_size=batch_size, num_workers=num_workers, device=device,
                                    log_interval=0)
        except (ValueError, OSError) as e:  # an image gone bad since start-up: told to all
            mine = str(e)
        shares = [mine]
        if dist.is_initialized():
            shares = [None] * world_size
            dist.all_gather_object(shares, mine)
        failures = [share for share in shares if isinstance(share, str)]
        if failures:
            model.train()
            raise ValueError(f"the VOC evaluation failed: {failures[0]}")
        # the shares back in order: image i is in share i % world_size
        features = torch.empty(len(paths), shares[0].shape[1])
        for share_rank, share in enumerate(shares):
            features[share_rank::world_size] = share
        splits[split] = (features.to(device), torch.from_numpy(split_labels).to(device))
    model.train()
    if rank:
        return None, None, None
    test_ap, _, _ = train_and_test_svms(*splits['trainval'], *splits['test'],
                                        cg_dtype=svm_products_dtype(device))
    voc = 100 * test_ap.mean().item()
    best = {'map': voc, 'iter': it} if voc > best['map'] else best
    line = (f"iter {it}: VOC mAP {voc:.2f} (best {best['map']:.2f} at iter {best['iter']}; "
            f"{time.time() - t0:.0f}s)")
    record = {'event': 'voc', 'iter': it, 'map': voc,
              'classes': {name: 100 * ap for name, ap in zip(task['classes'], test_ap.tolist())},
              'best_map': best['map'], 'best_iter': best['iter'], 'seconds': time.time() - t0}
    return voc, line, record

"""
Dev: the shapes world's words, class by class (shape, colour, size, count, position, the rest). The
world writes beside its captions which word of each class is true of each image
(annotations/words_<split>.json); with it, for a checkpoint, what the image is worth to the caption
decoders per word class, on the validation images train.py judges (its first eval_iters batches,
in its precision); for a file of generated captions (caption.py --out), how many words of each
class are true of their image and how many of the image's facts are named; and CapPa's image-blind
reference: the loss of the best parallel predictor that sees no image, each position's word
frequencies in the same validation captions.

  python dev/word_classes.py --ckpt=out/demo_seed0/ckpt.pt                # gaps per word class
  python dev/word_classes.py --results=out/demo_seed0/captions_val.json \
      --coco_root=data/shapes/coco                                        # the captions' words
  python dev/word_classes.py --ckpt=out/ablation/cappa_seed0/ckpt.pt --text_only=True

dev/shape_words.py and dev/word_gaps.py read them through its functions.
"""

import json
import os
import re
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from coco import CocoCaptions, collate, to_device, val_batches  # noqa: E402
from configurator import configure  # noqa: E402
from evaluate import precision  # noqa: E402
from safety import one_line_errors  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# ----------------------------------------------------------------------------------------------
ckpt = ''               # a train.py checkpoint of a captioner: its image gap per word class
text_only = False       # with --ckpt: the image-blind reference of cappa's parallel mode instead
results = ''            # or a COCO results JSON (caption.py --out): its words, class by class
coco_root = ''          # the world's coco/ folder ('' with --ckpt: the checkpoint's data_root)
split = 'val2017'       # whose words_<split>.json
# ----------------------------------------------------------------------------------------------


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


def validation_set(saved: dict, root: str = ''):
    """The val split of a checkpoint's run, as its train.py validation reads it: the dataset and
    the loader of its first eval_iters batches (one process)."""
    config = saved['config']
    tok = Tokenizer(config['tokenizer'])
    dataset = CocoCaptions(root or config['data_root'], split, tok, config['image_size'],
                           saved['model_args']['max_len'], train=False, seed=config['seed'])
    batch = config['batch_size'] // config['gradient_accumulation_steps']
    return dataset, val_batches(dataset, batch, config['eval_iters'], collate_fn=collate)


@torch.no_grad()
def image_gap_by_word_class(model, saved: dict, root: str = '') -> dict:
    """{word class: nats per word that the image is worth to the decoders, both directions}: the
    class's target words scored with each caption's own image and with the batch's next one, on
    the images and in the precision of the run's validation."""
    dataset, loader = validation_set(saved, root)
    names, lookup = word_classes(dataset) or (None, None)
    if names is None:
        raise ValueError(f"{dataset.root}/annotations/words_{split}.json: no such file (a "
                         "synthetic world's word classes)")
    autocast = precision('cpu', saved['config']['dtype'])[1]
    by_class = torch.zeros(3, len(names))  # true, shuffled sums; counts
    for images, tokens, errors in loader:
        if errors:
            raise ValueError(errors[0])
        images, tokens = to_device(images, tokens, 'cpu')
        with autocast:
            features = model.visual_features(images)
            for row, paired in enumerate((features, features.roll(1, 0))):
                sums, counts = losses_by_word_class(model, paired, tokens, lookup)
                by_class[row] += sums
        by_class[2] += counts
    gaps = ((by_class[1] - by_class[0]) / by_class[2].clamp(min=1)).tolist()
    return dict(zip(names, gaps))


def text_only_loss(model, saved: dict, root: str = '') -> float:
    """The loss of the best image-blind parallel predictor on the run's validation captions: each
    position's word frequencies in those captions (nats per token), cappa's reference."""
    _, loader = validation_set(saved, root)
    cfg = model.config
    counts = torch.zeros(cfg.max_len, cfg.vocab_size)  # (position, word)
    for _, tokens, _ in loader:
        targets = tokens[:, 1:]
        positions = torch.arange(targets.shape[1]).expand_as(targets)
        real = targets != cfg.pad_id
        counts.index_put_((positions[real], targets[real]), torch.ones(()), accumulate=True)
    frequencies = counts / counts.sum(1, keepdim=True).clamp(min=1)
    return (-(counts * frequencies.clamp(min=1e-12).log()).sum() / counts.sum()).item()


def word_scores(candidates: dict, words_path: str) -> list[str]:
    """Lines of a table: for each word class of a synthetic world's words_<split>.json, how many
    words of the captions ({image_id: caption}) fall in it, how many of those are true of their
    image (present), how many of the values each image shows are named (recall), and the words
    named most."""
    try:
        with open(words_path) as f:
            words = json.load(f)
        truth, classes = words['images'], words['classes']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{words_path}: not a words file ({type(e).__name__}: {e})") from None
    named = {name: Counter() for name in classes}
    right, shown, recalled = Counter(), Counter(), Counter()
    for image, caption in candidates.items():
        facts = truth.get(str(image))
        if facts is None:
            raise ValueError(f"{words_path}: has no words of image {image}")
        values = {name: set() for name in classes}
        for word in re.findall(r'[a-z]+', caption.lower()):
            for name, vocabulary in classes.items():
                if word in vocabulary:
                    named[name][word] += 1
                    right[name] += vocabulary[word] in facts[name]['present']
                    values[name].add(vocabulary[word])
        for name in classes:
            shown[name] += len(facts[name]['shown'])
            recalled[name] += len(values[name] & set(facts[name]['shown']))
    lines = [f"{'words':<9} {'named':>6} {'present':>8} {'recall':>7}  most named"]
    for name in classes:
        total = sum(named[name].values())
        common = ', '.join(f"{w} {n}" for w, n in named[name].most_common(3))
        lines.append(f"{name:<9} {total:>6} {100 * right[name] / max(total, 1):>7.1f}% "
                     f"{100 * recalled[name] / max(shown[name], 1):>6.1f}%  {common}")
    return lines


if __name__ == '__main__':
    configure(globals())
    with one_line_errors():
        if bool(ckpt) == bool(results):
            raise ValueError("give --ckpt=PATH (a captioner's checkpoint) or --results=FILE "
                             "(caption.py --out) with --coco_root")
        if results:
            with open(results) as f:
                captions = {e['image_id']: e['caption'] for e in json.load(f)}
            print('\n'.join(word_scores(captions, os.path.join(coco_root, 'annotations',
                                                                f'words_{split}.json'))))
        else:
            from checkpoints import load_checkpoint
            model, saved = load_checkpoint(ckpt)
            model.eval()
            if text_only:
                print(f"text-only parallel loss: {text_only_loss(model, saved, coco_root):.3f}")
            else:
                gaps = image_gap_by_word_class(model, saved, coco_root)
                print('image gap by word class (nats per word): ' +
                      ', '.join(f"{name} {gap:.3f}" for name, gap in gaps.items()))

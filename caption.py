"""
Caption images with a pretrained VirTex model: cached beam search or nucleus sampling, COCO results
JSON, CIDEr-D, and attention figures.

  # path<TAB>caption
  python caption.py --ckpt=out/shapes/ckpt.pt data/shapes/coco/val2017/000000010001.jpg
  python caption.py --ckpt=out/ckpt.pt --coco_root=data/coco --split=val2017 --out=results.json
  # score a file only
  python caption.py --results=results.json --coco_root=data/coco --split=val2017
  python caption.py --official=bicaptioning_R_50_L1_H2048.pth --tokenizer=coco_10k.model photos/

Captions go to stdout, one "path<TAB>caption" per image; progress and timing go to stderr. With
--coco_root the last line is "CIDEr: xx.x" (CIDEr-D x 100, PTB-style tokenization in Python;
SPICE needs Java and is not computed). Images that fail to load are reported by name and skipped,
and the exit code is 1 if any did. Decoding: the image is encoded once, cross-attention keys and
values once per image, self-attention through a key/value cache; beams of all images advance
together and finished images stop costing work. The decoding functions need only a model with
model.py's decode_step: this file imports nothing else of the project until its command line runs.
"""

from __future__ import annotations  # the checks of the config below: configure() reads them

import json
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING, Annotated

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

if TYPE_CHECKING:  # only the command line imports the project's other files: see the header
    from configurator import DEVICE, NON_NEGATIVE, POSITIVE, PROBABILITY, Needs

# ----------------------------------------------------------------------------------------------
ckpt = ''               # this project's checkpoint (train.py); its tokenizer path is inside
official = ''           # or an official VirTex checkpoint (kdexd/virtex); needs --tokenizer
tokenizer = ''          # a tokenizer .model; overrides the checkpoint's
# 0: the size the checkpoint was trained at (224 for official checkpoints)
image_size: NON_NEGATIVE = 0
beam_size: POSITIVE = 5  # 1 is greedy decoding
# words each live beam proposes per step (upstream per_node_beam_size)
candidates_per_beam: POSITIVE = 2
max_steps: POSITIVE = 30  # at most this many generated ids, [EOS] included
top_p: PROBABILITY = 0.0  # > 0: nucleus sampling with this p instead of beam search
# a cappa checkpoint: every word at once from [MASK] inputs (argmax per position)
parallel = False
temperature: POSITIVE = 1.0  # for sampling
seed = 0                # for sampling
batch_size: POSITIVE = 8  # images per forward pass
device: DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'  # cpu, cuda, cuda:1, ...
# COCO layout: caption <coco_root>/<split>/ and score it against the annotations
coco_root = ''
split = 'val2017'       # with coco_root: the split to caption
limit: NON_NEGATIVE = 0  # with coco_root: caption only the first `limit` images (0: all)
# score this COCO results JSON instead of captioning
results: Annotated[str, Needs('coco_root', why=' (and --split) for the references')] = ''
out = ''                # write the captions as a COCO results JSON here
attention_dir = ''      # write one attention figure per image here
# ----------------------------------------------------------------------------------------------


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, S, S) normalized model input from RGB PIL images (evaluate.py's eval transform)."""
    from evaluate import normalize, to_uint8_tensor
    return normalize(torch.stack([to_uint8_tensor(image) for image in images]))


# ----------------------------------------------------------------------------------------------
# decoding

@torch.no_grad()
def beam_search(model, memory: torch.Tensor, beam_size: int = 5,
                candidates_per_beam: int = 2, max_steps: int = 30) -> list[list[int]]:
    """Highest-scoring caption per image (sum of log-probs, no length penalty), without [SOS]/[EOS].

    memory (B, N, H). Each of the K beams of an image proposes its best `candidates_per_beam` words
    (not the word it just emitted), and the K best of those, together with beams that already
    ended with [EOS], form the next beams. Only live beams run the decoder, and an image stops as
    soon as its best finished caption outscores all its live beams (scores only fall as words are
    added, so nothing live can overtake it).
    """
    cfg = model.config
    B, K, device = memory.shape[0], beam_size, memory.device
    max_steps = min(max_steps, cfg.max_len)  # positions beyond max_len have no embedding
    # step 1: every beam starts from [SOS]: decode it once per image and take the K best words
    logp, cache = model.decode_step(memory, torch.full((B,), cfg.sos_id, device=device))  # (B, V)
    scores, words = logp.topk(K, dim=-1)  # (B, K)
    tokens = words.unsqueeze(-1)  # (B, K, t) the words so far
    finished = words == cfg.eos_id  # (B, K)
    active = torch.ones(B, dtype=torch.bool, device=device)  # images still searching
    alive = ~finished
    rows = torch.arange(B, device=device).repeat_interleave(K)[alive.flatten()]
    cache = select_cache(cache, rows)
    for _ in range(1, max_steps):
        if not alive.any():
            break
        last = tokens[..., -1][alive]  # (R,) one row per live beam, in (image, beam) order
        logp, cache = model.decode_step(None, last, cache)  # (R, V)
        logp[torch.arange(len(last), device=device), last] = -math.inf  # no word twice in a row
        top_logp, top_words = logp.topk(candidates_per_beam, dim=-1)  # (R, C)
        C = candidates_per_beam
        cand_scores = torch.full((B, K, C), -math.inf, device=device)
        cand_words = torch.full((B, K, C), cfg.pad_id, dtype=torch.long, device=device)
        cand_scores[alive] = scores[alive].unsqueeze(-1) + top_logp
        cand_words[alive] = top_words
        # finished beams stand still
        cand_scores[..., 0] = torch.where(finished, scores, cand_scores[..., 0])
        scores, index = cand_scores.view(B, K * C).topk(K, dim=-1)  # (B, K)
        parent = index // C
        words = cand_words.view(B, K * C).gather(1, index)
        parent_finished = finished.gather(1, parent)
        tokens = torch.cat([tokens.gather(1, parent.unsqueeze(-1).expand_as(tokens)),
                            words.unsqueeze(-1)], dim=-1)
        finished = parent_finished | (words == cfg.eos_id)
        best_finished = torch.where(finished, scores, -math.inf).amax(1)
        best_live = torch.where(finished, -math.inf, scores).amax(1)
        active &= best_finished < best_live
        # the cache rows of the new live beams are their parents' rows among the old live rows
        row_of = torch.full((B, K), -1, dtype=torch.long, device=device)
        row_of[alive] = torch.arange(int(alive.sum()), device=device)
        alive = ~finished & active.unsqueeze(-1)
        cache = select_cache(cache, row_of.gather(1, parent)[alive])
    best = tokens[torch.arange(B, device=device), scores.argmax(-1)]  # (B, t)
    return [words_until_eos(row.tolist(), cfg) for row in best]


def select_cache(cache, rows: torch.Tensor):
    """Keep / reorder / repeat the batch rows of a decoding cache (VirTex.decode_step's)."""
    layers = {i: {kind: {name: t.index_select(0, rows) for name, t in kv.items()}
                  for kind, kv in layer.items()} for i, layer in cache['layers'].items()}
    return {'pos': cache['pos'], 'layers': layers}


@torch.no_grad()
def parallel_decode(model, memory: torch.Tensor) -> list[list[int]]:
    """cappa's parallel mode: every position's most likely id at once from [MASK] inputs, up to the
    first [EOS]. One decoder pass; shows what the backbone and decoder read from the image with no
    words given."""
    ids = model.parallel_logits(memory).argmax(-1)  # (B, max_len - 1)
    return [words_until_eos(row, model.config) for row in ids.tolist()]


@torch.no_grad()
def sample(model, memory: torch.Tensor, top_p: float = 0.9, temperature: float = 1.0,
           max_steps: int = 30, generator: torch.Generator | None = None) -> list[list[int]]:
    """Nucleus sampling: draw each word from the smallest set of words whose probability reaches
    top_p."""
    cfg = model.config
    B, device = memory.shape[0], memory.device
    last = torch.full((B,), cfg.sos_id, device=device)
    logp, cache = model.decode_step(memory, last)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    # as in beam_search: the last word is predicted at position max_len - 1
    n_steps = min(max_steps, cfg.max_len)
    for step in range(n_steps):
        logits = logp / temperature  # log-probs differ from logits by a per-row constant
        if step > 0:
            logits[torch.arange(B, device=device), last] = -math.inf  # no word twice in a row
        probs = logits.softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # mass before this word already reaches p
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs[outside] = 0
        word = order.gather(1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(1)
        word[finished] = cfg.pad_id
        out.append(word)
        finished |= word == cfg.eos_id
        if finished.all() or step == n_steps - 1:
            break  # the next position would be max_len, which has no embedding
        last = word
        logp, cache = model.decode_step(None, word, cache)
    return [words_until_eos(row, cfg) for row in torch.stack(out, 1).tolist()]


def words_until_eos(ids: list[int], cfg) -> list[int]:
    """Words of a decoded row: up to the first [EOS], padding dropped."""
    ids = ids[:ids.index(cfg.eos_id)] if cfg.eos_id in ids else ids
    return [i for i in ids if i != cfg.pad_id]


@torch.no_grad()
def word_attention(model, memory: torch.Tensor, words: list[int]) -> torch.Tensor:
    """Last layer's cross-attention (mean over heads) while predicting each word of one caption and
    then [EOS]: (len(words) + 1, N), fewer rows if the caption filled all max_len positions. memory
    (1, N, H)."""
    cfg = model.config
    inputs = [cfg.sos_id] + words
    cache, rows = None, []
    for token in inputs[:cfg.max_len]:
        _, cache = model.decode_step(memory, torch.tensor([token], device=memory.device), cache)
        # the newest query of the last layer against the grid; SDPA does not return its weights
        cross = cache['layers'][len(model.layers_fwd) - 1]['cross']
        q, k = cross['q'], cross['k']  # (1, nh, 1, hs), (1, nh, N, hs)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        rows.append(weights.mean(1)[0, -1])  # (N,)
    return torch.stack(rows)


def attention_figure(image: Image.Image, labels: list[str], weights: torch.Tensor, grid_hw,
                     panel: int = 160, columns: int = 6) -> Image.Image:
    """One panel with the image, then one per word: the image under a red overlay where the model
    looked while predicting that word, the word written below."""
    n = len(labels) + 1
    cols, rows = min(n, columns), math.ceil(n / columns)
    figure = Image.new('RGB', (cols * panel, rows * (panel + 20)), 'white')
    draw, font = ImageDraw.Draw(figure), ImageFont.load_default()
    base = image.resize((panel, panel), Image.Resampling.BILINEAR)
    maps = weights.view(-1, 1, *grid_hw).float()
    maps = F.interpolate(maps, size=(panel, panel), mode='bilinear', align_corners=False)[:, 0]
    maps = ((maps - maps.amin((1, 2), keepdim=True))
            / (maps.amax((1, 2), keepdim=True) - maps.amin((1, 2), keepdim=True) + 1e-8))
    for i in range(n):
        x, y = (i % cols) * panel, (i // cols) * (panel + 20)
        if i == 0:
            figure.paste(base, (x, y))
            draw.text((x + 4, y + panel + 4), '(image)', fill='black', font=font)
            continue
        heat = (maps[i - 1].cpu().numpy() * 255).astype(np.uint8)
        red = Image.merge('RGB',
                          (Image.fromarray(heat), Image.new('L', heat.shape[::-1]),
                           Image.new('L', heat.shape[::-1])))
        figure.paste(Image.blend(base, red, 0.5), (x, y))
        draw.text((x + 4, y + panel + 4), labels[i - 1], fill='black', font=font)
    return figure


FIGURE_MARK = 'caption.py attention figure'  # in each figure's PNG text: what it may replace


def save_figure(figure: Image.Image, path: str) -> None:
    from safety import write_atomically
    info = PngImagePlugin.PngInfo()
    info.add_text('Software', FIGURE_MARK)
    write_atomically(path, lambda f: figure.save(f, 'PNG', pnginfo=info))


def is_attention_figure(path: str) -> bool:
    try:
        with Image.open(path) as image:
            return image.text.get('Software') == FIGURE_MARK
    except Exception:
        return False


def figure_path(image_path: str) -> str:
    return os.path.join(attention_dir, os.path.splitext(os.path.basename(image_path))[0] + '.png')


def image_id(path: str):
    """COCO results use the integer id in a COCO file name (000000397133.jpg -> 397133)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return int(stem) if stem.isdigit() else stem


def score_results(paths):
    """--results: the CIDEr of a COCO results file against the split's references."""
    from cider import score
    from coco import read_coco_split
    ignored = [flag for flag, value in (('ckpt', ckpt), ('official', official), ('out', out),
                                        ('top_p', top_p), ('parallel', parallel),
                                        ('attention_dir', attention_dir), ('limit', limit))
               if value] + (['image paths'] if paths else [])
    if ignored:
        raise SystemExit(f"error: --results scores a file and captions nothing: drop "
                         f"{', '.join(ignored)}")
    try:
        with open(results) as f:
            entries = json.load(f)
        if not isinstance(entries, list):
            raise TypeError(f"a list of {{image_id, caption}} records is expected, not a "
                            f"{type(entries).__name__}")
        candidates = {}
        for n, entry in enumerate(entries, 1):
            if not isinstance(entry.get('caption'), str):
                raise TypeError(f"record {n} has the caption {entry.get('caption')!r}, not text")
            if entry['image_id'] in candidates:
                raise ValueError(f"image {entry['image_id']!r} has two captions (records "
                                 f"{list(candidates).index(entry['image_id']) + 1} and {n})")
            candidates[entry['image_id']] = entry['caption']
    except OSError as e:
        raise SystemExit(f"error: {results}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(
            f"error: {results}: not a COCO results file ({type(e).__name__}: {e})") from None
    if not candidates:
        raise SystemExit(f"error: {results}: holds no captions to score")
    references = {i: refs for i, _, refs in read_coco_split(coco_root, split)}
    print(f"CIDEr: {score(candidates, references):.1f}")


def load_captioner():
    """The model to caption with, on `device`, its tokenizer's path and its training's image
    size; one-line exits where they do not fit."""
    from checkpoints import load_checkpoint, load_official
    from pretexts import CAPTIONERS
    from tokenizer import Tokenizer
    if bool(ckpt) == bool(official):
        raise SystemExit("error: give exactly one of --ckpt=PATH (this project) or --official=PATH "
                         "(kdexd/virtex)")
    if ckpt:
        model, saved = load_checkpoint(ckpt)
        model, trained = model.to(device).eval(), saved.get('config', {})  # the training's config
    else:
        model, trained = load_official(official, device), {}
    source = ckpt or official
    if model.config.pretext not in CAPTIONERS:
        raise SystemExit(f"error: {source}: a {model.config.pretext} checkpoint has no caption "
                         "decoder; captions need a bicaptioning, captioning or cappa one "
                         "(evaluate.py takes the backbone of any)")
    if parallel and model.config.pretext != 'cappa':
        raise SystemExit(f"error: --parallel=True needs a cappa checkpoint; {source} is "
                         f"{model.config.pretext}")
    tokenizer_path = tokenizer or trained.get('tokenizer', '')
    if not tokenizer_path:
        raise SystemExit(f"error: {source} names no tokenizer: pass --tokenizer=PATH.model")
    tok = Tokenizer(tokenizer_path)
    if len(tok) != model.config.vocab_size:
        raise SystemExit(f"error: tokenizer {tokenizer_path} has {len(tok)} pieces but {source} "
                         f"was trained with {model.config.vocab_size}")
    if ckpt and saved.get('tokenizer_pieces', tok.pieces_hash()) != tok.pieces_hash():
        # the same size is not enough: another vocabulary would decode the ids as other words
        raise SystemExit(f"error: {tokenizer_path}: not the vocabulary {ckpt} was trained with "
                         "(its pieces differ: replaced since, or another one); pass that one as "
                         "--tokenizer")
    return model, tok, tokenizer_path, image_size or trained.get('image_size', 224)


def main(paths):
    from coco import read_coco_split
    from evaluate import IMAGE_EXTENSIONS, load_eval_image
    from safety import check_outputs, write_atomically
    # images larger than PIL's own limit are refused as possible decompression bombs
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        # now, not after captioning
        raise SystemExit(f"error: --out={out}: its folder does not exist")
    if results:  # score an existing results file, caption nothing
        return score_results(paths)
    model, tok, tokenizer_path, size = load_captioner()

    # the images: files and folders from the command line, or a COCO split
    references = None
    if coco_root:
        items = read_coco_split(coco_root, split)
        paths, references = [p for _, p, _ in items], {i: refs for i, _, refs in items}
        paths = paths[:limit] if limit else paths
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(p, f) for f in os.listdir(p)
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            files.append(p)
    if not files:
        raise SystemExit("error: no images given (pass image files or folders, or --coco_root)")
    figures = [figure_path(p) for p in files] if attention_dir else []
    annotations = os.path.join(coco_root, 'annotations', f'captions_{split}.json') \
        if coco_root else ''
    check_outputs({'out': out, 'attention_dir': figures},
                  {'--ckpt': ckpt, '--official': official, '--tokenizer': tokenizer_path,
                   'an image to caption': files, 'the references': annotations})
    if attention_dir and os.path.exists(attention_dir) and not os.path.isdir(attention_dir):
        raise SystemExit(f"error: --attention_dir={attention_dir} is a file, not a folder")
    for path in figures:  # replace only figures this script drew
        if os.path.lexists(path) and not is_attention_figure(path):
            raise SystemExit(f"error: --attention_dir={attention_dir}: {path} exists and is not an "
                             "attention figure of caption.py: choose another folder")

    generator = torch.Generator(device).manual_seed(seed)
    if attention_dir:
        os.makedirs(attention_dir, exist_ok=True)
    captions, failures = {}, 0
    t_start, t_backbone, n_done = time.perf_counter(), 0.0, 0
    for start in range(0, len(files), batch_size):
        batch, images = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(load_eval_image(path, size))
                batch.append(path)
            except Exception as e:  # one bad file must not stop the others
                failures += 1
                print(f"error: {path}: cannot be captioned "
                      f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})",
                      file=sys.stderr, flush=True)
        if not batch:
            continue
        t0 = time.perf_counter()
        grid = model.encode_images(to_tensor(images).to(device))  # (B, C, h, w)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t_backbone += time.perf_counter() - t0
        memory = model.project(grid)
        if parallel:
            words = parallel_decode(model, memory)
        elif top_p > 0:
            words = sample(model, memory, top_p, temperature, max_steps, generator)
        else:
            words = beam_search(model, memory, beam_size, candidates_per_beam, max_steps)
        for i, (path, ids) in enumerate(zip(batch, words)):
            captions[path] = tok.decode(ids)
            print(f"{path}\t{captions[path]}", flush=True)
            if attention_dir:
                weights = word_attention(model, memory[i:i + 1], ids)
                labels = ([tok.sp.id_to_piece(t).replace('\u2581', '') for t in ids]
                          + ['[EOS]'])[:len(weights)]
                figure = attention_figure(images[i], labels, weights, grid.shape[2:])
                save_figure(figure, figure_path(path))
        n_done += len(batch)
        elapsed = time.perf_counter() - t_start
        print(f"{n_done}/{len(files)} images | {n_done / elapsed:.2f} captions/s",
              file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t_start
    if n_done:
        print(f"captioned {n_done} images in {elapsed:.1f}s ({n_done / elapsed:.2f} captions/s, "
              f"{100 * t_backbone / elapsed:.0f}% of it in the backbone); {failures} failed",
              file=sys.stderr)
    if out:
        entries = [{'image_id': image_id(p), 'caption': c} for p, c in captions.items()]
        write_atomically(out, lambda f: json.dump(entries, f), mode='w')
    if references is not None and captions:
        from cider import score
        candidates = {image_id(p): c for p, c in captions.items()}
        print(f"CIDEr: {score(candidates, references):.1f}")
    if failures:
        sys.exit(1)


if __name__ == '__main__':
    from configurator import configure
    from safety import one_line_errors
    image_paths = configure(globals(), arguments='images')
    with one_line_errors():
        main(image_paths)

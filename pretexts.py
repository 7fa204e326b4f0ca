"""
The pretext tasks beside the paper's bicaptioning, each built from model.py's parts: the objectives
of the paper's ablation (its Table 2) and CapPa's parallel prediction (Tschannen et al. 2023).

    from pretexts import pretext_model
    model = pretext_model(VirTexConfig(pretext='masked_lm', vocab_size=10000))  # any pretext
    loss, parts = model(images, caption_tokens)      # parts: PRETEXTS[pretext][1]

PRETEXTS, at the end, names them all, each with its model: the paper's two (model.VirTex), BERT's
masked words (MaskedLM), the caption's words or the image's COCO categories as a set of labels
(Classification), and CapPa, which predicts a share of the captions all at once from [MASK] inputs,
so that every word must come from the image alone.

Every model has the same backbone (`visual`) and the same names for its weights as in a checkpoint
of any earlier version, so only the backbone changes hands. image_gap is train.py's validation:
what the image is worth to the head of any of them. Imports numpy, torch and model.py (and, to
validate, coco.py's batches).
"""

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import VirTex, VirTexConfig, resnet

# masked_lm: 15% of the words; of those 80% [MASK], 10% random, 10% kept
MASK_FRACTION, MASK_PROBS = 0.15, (0.8, 0.1)


class MaskedLM(VirTex):
    """BERT's objective on captioning's forward decoder: the words mask_words chose, predicted from
    the corrupted caption seen both ways (no causal mask)."""

    def losses(self, memory, caption_tokens, generator=None):
        inputs, labels = mask_words(caption_tokens, self.config, generator)
        # labels: pad where not chosen
        loss = self.word_loss(self.decode(memory, inputs, causal=False), labels)
        return loss, {'masked_lm': loss.detach()}


def mask_words(tokens: torch.Tensor, cfg: VirTexConfig, generator=None):
    """BERT's corruption for masked_lm: (B, T) captions -> (inputs, labels), both (B, T).

    Of each caption's n words (the ids between [SOS] and [EOS]), ceil(0.15 n) positions are chosen
    uniformly; a chosen id becomes [MASK] with p=0.8, a random word id with p=0.1 and stays with
    p=0.1. labels hold the original id at every chosen position, pad elsewhere: the loss is on all
    chosen words, as in BERT (the official code labels only the [MASK]ed ones). Draws from
    `generator` (default: the global RNG).
    """
    pad, (p_mask, p_random) = cfg.pad_id, MASK_PROBS
    words = (tokens != pad) & (tokens != cfg.sos_id) & (tokens != cfg.eos_id)  # (B, T)
    n_words = words.sum(1)
    if (n_words == 0).any():
        raise ValueError("masked_lm: a caption has no words to mask (only [SOS] and [EOS])")
    n_chosen = torch.ceil(n_words * MASK_FRACTION).long()  # >= 1
    scores = torch.rand(tokens.shape, device=tokens.device,
                        generator=generator).masked_fill(~words, 2.0)
    # each position's place in its row's random order; non-words last
    rank = scores.argsort(1).argsort(1)
    chosen = rank < n_chosen[:, None]
    action = torch.rand(tokens.shape, device=tokens.device, generator=generator)
    random_ids = torch.randint(cfg.mask_id + 1, cfg.vocab_size, tokens.shape, device=tokens.device,
                               generator=generator)
    inputs = torch.where(chosen & (action < p_mask), cfg.mask_id, tokens)
    inputs = torch.where(chosen & (action >= p_mask) & (action < p_mask + p_random),
                         random_ids, inputs)
    return inputs, torch.where(chosen, tokens, pad)


class CapPa(VirTex):
    """CapPa: each caption is drawn, with probability parallel_fraction (big_vision's
    masked_pred_prob), into the parallel mode (every word predicted at once from [MASK] inputs,
    parallel_logits) and otherwise into plain forward captioning. The targets and the loss are
    captioning's: the mean cross-entropy over all real targets of the batch."""

    def parallel_inputs(self, n) -> torch.Tensor:
        """The parallel mode reads (n, max_len - 1) [MASK]s: every input position, the one [SOS]
        held too (big_vision has no BOS in this mode), whatever the caption: no word, not even its
        length, only the image."""
        return torch.full((int(n), self.config.max_len - 1), self.config.mask_id,
                          device=self.lm_head.weight.device)

    def parallel_logits(self, memory: torch.Tensor) -> torch.Tensor:
        """(B, N, H) memory -> (B, max_len - 1, V) logits of every position at once."""
        return self.lm_head(self.decode(memory, self.parallel_inputs(len(memory)), causal=False))

    def losses(self, memory, caption_tokens, generator=None):
        """In eval mode every caption is scored both ways and the loss is their expectation
        (nothing is drawn). Returns (loss, {'parallel': mean over its rows' targets,
        'autoregressive': ...}); a mode that drew no caption has NaN."""
        tokens, cfg = caption_tokens, self.config
        if tokens.shape[1] > cfg.max_len:
            raise ValueError(f"captions of {tokens.shape[1]} ids exceed max_len={cfg.max_len}")
        targets = tokens[:, 1:]  # (B, T-1): what position t predicts, in both modes
        if self.training:
            parallel = draw_parallel(len(tokens), cfg.parallel_fraction, tokens.device, generator)
            rows = {'parallel': parallel, 'autoregressive': ~parallel}  # (B,) each
        else:
            every = torch.ones(len(tokens), dtype=torch.bool, device=tokens.device)
            rows = {'parallel': every, 'autoregressive': every}
        sums, counts = {}, {}
        for mode, chosen in rows.items():
            counts[mode] = (targets[chosen] != cfg.pad_id).sum()
            if mode == 'parallel':
                features = self.decode(memory[chosen], self.parallel_inputs(chosen.sum()),
                                       causal=False)
                # then pads
                sums[mode] = self.word_loss(features[:, :targets.shape[1]], targets[chosen], 'sum')
            else:
                sums[mode] = self.caption_loss(memory[chosen], tokens[chosen], 'fwd',
                                               reduction='sum')
        means = {mode: sums[mode] / counts[mode] for mode in rows}  # 0 / 0 is NaN
        if self.training:
            loss = ((sums['parallel'] + sums['autoregressive'])
                    / (counts['parallel'] + counts['autoregressive']))
        else:
            fraction = cfg.parallel_fraction
            loss = fraction * means['parallel'] + (1 - fraction) * means['autoregressive']
        return loss, {mode: mean.detach() for mode, mean in means.items()}


def draw_parallel(n: int, fraction: float, device=None, generator=None) -> torch.Tensor:
    """cappa's choice of mode for n captions: (n,) bool, True (parallel) with probability `fraction`
    each."""
    return torch.rand(n, device=device, generator=generator) < fraction


def draws_of(pretext: str, seed: int, rank: int, step: int, micro_step: int, device):
    """The generator of a training micro-step's random draws: cappa's, seeded by (seed, rank, step,
    micro-step), so that a resumed run draws what an unbroken one would and the global RNG
    (dropout's) is left alone; None for the other pretexts (masked_lm draws from the global RNG)."""
    if pretext != 'cappa':
        return None
    key = np.random.SeedSequence([seed, rank, step, micro_step]).generate_state(1)[0]
    return torch.Generator(device).manual_seed(int(key))


class Classification(nn.Module):
    """token_classification and multilabel_classification: one linear layer on the pooled grid
    (PyTorch's default init, as upstream), trained by cross-entropy against the K-hot / K target of
    each image's set of labels: the caption's words, or its COCO instance categories."""

    def __init__(self, cfg: VirTexConfig):
        super().__init__()
        self.config = cfg
        self.visual = resnet(cfg)
        self.classifier = nn.Linear(self.visual.width, cfg.vocab_size)

    # the backbone's side is VirTex's own code: it reads only self.visual and self.config
    encode_images, forward = VirTex.encode_images, VirTex.forward
    num_params, param_groups = VirTex.num_params, VirTex.param_groups
    backbone_state_dict = VirTex.backbone_state_dict

    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the classifier reads: (B, 3, S, S) images -> (B, C) pooled grid."""
        return self.encode_images(images).mean((2, 3))

    def losses(self, pooled, labels, generator=None):
        """The mean of -log p over the distinct ids of a row (upstream's loss), pad (and, for
        caption words, [SOS] [EOS] [MASK]) left out; rows without labels do not count."""
        cfg = self.config
        logp = F.log_softmax(self.classifier(pooled).float(), dim=-1)  # (B, V)
        targets = torch.zeros_like(logp).scatter_(1, labels, 1.0)  # repeated ids count once
        special = [cfg.pad_id]
        if cfg.pretext == 'token_classification':
            special += [cfg.sos_id, cfg.eos_id, cfg.mask_id]
        targets[:, special] = 0
        per_row = -(logp * targets).sum(1) / targets.sum(1).clamp(min=1)
        loss = per_row.sum() / (targets.sum(1) > 0).sum().clamp(min=1)
        return loss, {'classification': loss.detach()}


PRETEXTS = {  # every pretext: the model that trains the backbone by it, and its loss's terms
    'bicaptioning': (VirTex, ('fwd', 'bwd')),  # the paper's: forward and backward captions
    'captioning': (VirTex, ('fwd',)),  # the forward decoder alone
    'masked_lm': (MaskedLM, ('masked_lm',)),  # BERT's: 15 % of the words hidden, read both ways
    'token_classification': (Classification, ('classification',)),  # the caption's set of words
    'multilabel_classification': (Classification, ('classification',)),  # COCO's categories
    'cappa': (CapPa, ('parallel', 'autoregressive')),  # a share of the captions all at once
}
# the pretexts whose forward decoder writes captions (caption.py)
CAPTIONERS = tuple(name for name, (kind, _) in PRETEXTS.items() if kind in (VirTex, CapPa))


def pretext_model(cfg: VirTexConfig) -> nn.Module:
    """The model that trains the backbone by cfg.pretext, at its init."""
    if cfg.pretext not in PRETEXTS:
        raise ValueError(f"pretext={cfg.pretext!r}: choose one of {', '.join(PRETEXTS)}")
    return PRETEXTS[cfg.pretext][0](cfg)


def freeze_backbone(model: nn.Module) -> None:
    """Any pretext's backbone frozen: no gradients, and BatchNorm kept in eval mode (its running
    statistics stay too) whatever train() the model is switched to."""
    model.visual.requires_grad_(False)
    model.visual.eval()
    model.visual.train = lambda mode=True: model.visual  # the model's train() passes it by


@torch.no_grad()
def image_gap(it, model, loader, autocast, seed, bad_images, folder):
    """The validation losses at iteration `it`, and the same captions scored against other images
    (each batch's images rolled by one): their difference is what the image is worth to the pretext
    head, in nats per target, the first number to watch in pretraining (at 0 the head writes the
    captions from the text alone). Returns a line to print and a record for the log. Under torchrun
    every process takes its share of the images and all agree on the result, and on a failure: a
    ValueError on every process, so that the run saves before it stops."""
    from coco import to_device  # how a train.py batch reaches the model
    device, part_names = next(model.parameters()).device, PRETEXTS[model.config.pretext][1]
    model.eval()
    totals = torch.zeros(2, 1 + len(part_names), device=device)  # (true, shuffled) x (loss, parts)
    batches = 0
    for batch, (images, tokens, errors) in enumerate(loader):
        try:
            bad_images.add(errors)
        except ValueError as e:  # past the cap: the run stops here
            raise SystemExit(f"error: {e}") from None
        if images is None:
            continue
        images, tokens = to_device(images, tokens, device)
        with autocast:
            features = model.visual_features(images)  # (B, N, H) or pooled (B, C)
            for row, paired in enumerate((features, features.roll(1, 0))):
                # masked_lm hides the same words in both pairings, never with the training RNG
                generator = torch.Generator(device).manual_seed(seed + batch)
                loss, parts = model.losses(paired, tokens, generator)
                totals[row] += torch.stack([loss, *parts.values()]).float()
        batches += 1
    counts = torch.cat([totals.flatten(), torch.tensor([batches], device=device,
                                                       dtype=totals.dtype)])
    if dist.is_initialized():
        dist.all_reduce(counts)
    totals, batches = counts[:-1].view(2, -1), counts[-1].item()
    model.train()
    if batches == 0:  # every process knows: the counts were summed
        raise ValueError(f"no image of {folder} could be read for validation (see the warnings)")
    names = ('loss', *part_names)
    true, shuffled = (dict(zip(names, row)) for row in (totals / batches).tolist())
    gaps = {name: shuffled[name] - true[name] for name in part_names}  # per term
    gap = sum(gaps.values()) / len(gaps)  # per target of one term (one direction)
    unit = 'label' if model.config.pretext.endswith('classification') else 'token'
    worth = f"{gap:.3f} nats/{unit}"
    if model.config.pretext == 'cappa':
        worth = (f"{gaps['parallel']:.3f} nats/token in parallel, {gaps['autoregressive']:.3f} "
                 "autoregressive")
    terms = ' '.join(f"{name} {true[name]:.3f}" for name in part_names)
    line = (f"iter {it}: val loss {true['loss']:.4f} ({terms}) | shuffled images "
            f"{shuffled['loss']:.4f}: the image is worth {worth}")
    record = {'event': 'val', 'iter': it, 'loss': true['loss'],
              **{f'loss_{n}': true[n] for n in part_names}, 'loss_shuffled': shuffled['loss'],
              **{f'loss_shuffled_{n}': shuffled[n] for n in part_names}, 'image_gap': gap}
    return line, record

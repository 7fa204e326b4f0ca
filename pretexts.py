"""
The pretext tasks beside the paper's bicaptioning, each built from model.py's parts: the objectives
of the paper's ablation (its Table 2) and CapPa's parallel prediction (Tschannen et al. 2023).

    from pretexts import pretext_model
    model = pretext_model(VirTexConfig(pretext='masked_lm', vocab_size=10000))  # any pretext
    loss, parts = model(images, caption_tokens)      # parts: LOSS_PARTS[pretext]

  bicaptioning               model.VirTex: forward + backward caption decoders (the paper's method)
  captioning                 model.VirTex: the forward decoder alone
  masked_lm                  MaskedLM: the decoder without its causal mask predicts 15% of the
                             words, hidden (BERT)
  token_classification       Classification: a linear layer on the pooled grid predicts the
                             caption's set of words
  multilabel_classification  Classification: the same over COCO's instance categories (the
                             "tokens" are category indices)
  cappa                      CapPa: the forward decoder, but for a share of the captions
                             (parallel_fraction) every input is [MASK] and nothing is causal: all
                             words at once, from the image alone

Every model has the same backbone (`visual`) and the same names for its weights as in a checkpoint
of any earlier version, so only the backbone changes hands. Imports numpy, torch and model.py
only.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import VirTex, VirTexConfig, resnet

LOSS_PARTS = {  # the terms forward() returns beside the loss
    'bicaptioning': ('fwd', 'bwd'), 'captioning': ('fwd',), 'masked_lm': ('masked_lm',),
    'token_classification': ('classification',), 'multilabel_classification': ('classification',),
    'cappa': ('parallel', 'autoregressive')}
CAPTIONERS = ('bicaptioning', 'captioning', 'cappa')  # a forward decoder that writes captions
# masked_lm: 15% of the words; of those 80% [MASK], 10% random, 10% kept
MASK_FRACTION, MASK_PROBS = 0.15, (0.8, 0.1)


class MaskedLM(VirTex):
    """BERT's objective on captioning's forward decoder: the words mask_words chose, predicted from
    the corrupted caption seen both ways (no causal mask)."""
    pretexts = ('masked_lm',)

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
    pretexts = ('cappa',)

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
    pretexts = ('token_classification', 'multilabel_classification')

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


def pretext_model(cfg: VirTexConfig) -> nn.Module:
    """The model that trains the backbone by cfg.pretext, at its init."""
    for kind in (VirTex, MaskedLM, CapPa, Classification):
        if cfg.pretext in kind.pretexts:
            return kind(cfg)

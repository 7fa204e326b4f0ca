"""
The VirTex model (Desai & Johnson, CVPR 2021): a ResNet visual backbone plus forward and backward
Transformer decoders that caption the image, trained from scratch by the captioning loss.

    from model import VirTex, VirTexConfig
    model = VirTex(VirTexConfig(visual='resnet50', n_layer=1, n_embd=2048, n_head=32,
                                vocab_size=10000))
    # (B,3,S,S) float, (B,T) long -> scalar, {'fwd','bwd'}
    loss, parts = model(images, caption_tokens)
    grid = model.encode_images(images)     # (B,2048,S/32,S/32): what evaluate.py pools
    memory = model.project(grid)           # (B,S*S/1024,H): what the decoders attend to
    # one cached step of the forward decoder
    logp, cache = model.decode_step(memory, last_tokens, cache)

`VirTexConfig.pretext` is 'bicaptioning' (the paper) or 'captioning' (the forward decoder alone);
pretexts.py builds the other objectives from these parts. Only the backbone is kept after
pretraining; `backbone_state_dict()` loads into a plain `torchvision.models.resnet50()` (fc aside).
Imports only torch and torchvision, so it copies alone (caption.py's beam search beside it). The
architecture follows the paper and the official code (kdexd/virtex). Errors are ValueErrors.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

VISUALS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'wide_resnet50_2',
           'wide_resnet101_2')


@dataclass
class VirTexConfig:
    visual: str = 'resnet50'    # torchvision ResNet: resnet18/34/50/101/152, wide_resnet50_2
    vocab_size: int = 10000     # from the tokenizer file
    n_layer: int = 1            # L, Transformer layers per direction
    n_embd: int = 2048          # H, textual width
    n_head: int = 32            # H / 64 in every official config
    max_len: int = 30           # caption length in ids, [SOS] and [EOS] included
    dropout: float = 0.1
    pretext: str = 'bicaptioning'  # or captioning; pretexts.py names the others
    norm_first: bool = False    # False: post-norm layers, as in the paper
    zero_init_residual: bool = True  # the paper's backbone init (see VirTex.__init__)
    # std of the textual weights at init: BERT's, the paper's (see init_textual_weights)
    init_std: float = 0.02
    pad_id: int = 0             # <unk> doubles as padding, as upstream
    sos_id: int = 1
    eos_id: int = 2
    mask_id: int = 3            # [MASK], for masked_lm and cappa
    parallel_fraction: float = 0.75  # cappa's (pretexts.py)

    def __post_init__(self):  # refused here, so that a script can check a config before any work
        if self.visual not in VISUALS:
            raise ValueError(f"visual={self.visual!r}: choose one of {', '.join(VISUALS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.max_len < 3:
            raise ValueError(f"max_len={self.max_len} cannot hold [SOS] word [EOS]: it must be "
                             "at least 3")
        if not 0 <= self.parallel_fraction <= 1:
            raise ValueError(f"parallel_fraction={self.parallel_fraction} must be in [0, 1]")

    @property
    def bidirectional(self) -> bool:
        return self.pretext == 'bicaptioning'


def reverse_captions(caption_tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[SOS] w1 .. wn [EOS] <pad>.. -> [EOS] wn .. w1 [SOS] <pad>..: the backward decoder's input.

    Only the first `lengths[b]` ids of row b are reversed, so padding stays at the end.
    """
    B, T = caption_tokens.shape
    positions = torch.arange(T, device=caption_tokens.device).expand(B, T)
    source = torch.where(positions < lengths[:, None], lengths[:, None] - 1 - positions, positions)
    return caption_tokens.gather(1, source)


class Attention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention, with a key/value cache for decoding.

    Self-attention projects q, k, v from one input; cross-attention projects q from the text and
    k, v from the visual memory, which is done once per image when decoding.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, cross: bool):
        super().__init__()
        self.n_head, self.dropout, self.cross = n_head, dropout, cross
        if cross:
            self.q_proj = nn.Linear(n_embd, n_embd)
            self.kv_proj = nn.Linear(n_embd, 2 * n_embd)
        else:
            self.qkv_proj = nn.Linear(n_embd, 3 * n_embd)
        self.out_proj = nn.Linear(n_embd, n_embd)

    def split_heads(self, x):  # (B, T, H) -> (B, nh, T, hs)
        B, T, H = x.shape
        return x.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)

    def memory_kv(self, memory):
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)  # 2 x (B, nh, N, hs)

    def forward(self, x, memory=None, cache=None, key_mask=None):
        """x (B, T, H). Self-attention is causal, unless key_mask (B, T) is given: then every
        position sees every key where key_mask is True, before and after it (masked_lm, cappa's
        parallel mode). With `cache` (a dict), x is the newest position (B, 1, H), and keys and
        values are appended to / read from the cache."""
        dropout = self.dropout if self.training else 0.0
        if self.cross:
            q = self.split_heads(self.q_proj(x))
            if cache is None:
                k, v = self.memory_kv(memory)
            else:
                if 'k' not in cache:
                    cache['k'], cache['v'] = self.memory_kv(memory)
                k, v = cache['k'], cache['v']
                cache['q'] = q  # kept so the attention map of this step can be drawn
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            q, k, v = map(self.split_heads, self.qkv_proj(x).chunk(3, dim=-1))
            if cache is None and key_mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                                   dropout_p=dropout)
            elif cache is None:
                # causal masking alone suffices: padding sits at the end, so a real position never
                # sees a pad key, and outputs at pad positions are ignored by the loss
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:  # one new position: every cached key is in its past, no mask needed
                if 'k' in cache:
                    k, v = torch.cat([cache['k'], k], dim=2), torch.cat([cache['v'], v], dim=2)
                cache['k'], cache['v'] = k, v
                y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(x.shape)  # (B, T, H)
        return self.out_proj(y)


class DecoderLayer(nn.Module):
    """One Transformer decoder layer: self-attention (causal unless given a key_mask),
    cross-attention over the image grid, GELU feed-forward of width 4H; post-norm (the paper) or
    pre-norm."""

    def __init__(self, cfg: VirTexConfig):
        super().__init__()
        H = cfg.n_embd
        self.norm_first = cfg.norm_first
        self.self_attn = Attention(H, cfg.n_head, cfg.dropout, cross=False)
        self.cross_attn = Attention(H, cfg.n_head, cfg.dropout, cross=True)
        self.linear1 = nn.Linear(H, 4 * H)
        self.linear2 = nn.Linear(4 * H, H)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(H), nn.LayerNorm(H), nn.LayerNorm(H)
        self.dropout = nn.Dropout(cfg.dropout)

    def feed_forward(self, x):
        return self.linear2(self.dropout(F.gelu(self.linear1(x))))

    def forward(self, x, memory, cache=None, key_mask=None):
        self_cache = cross_cache = None
        if cache is not None:
            self_cache, cross_cache = cache.setdefault('self', {}), cache.setdefault('cross', {})
        if self.norm_first:
            x = x + self.dropout(self.self_attn(self.norm1(x), cache=self_cache, key_mask=key_mask))
            x = x + self.dropout(self.cross_attn(self.norm2(x), memory, cache=cross_cache))
            x = x + self.dropout(self.feed_forward(self.norm3(x)))
        else:
            x = self.norm1(x + self.dropout(self.self_attn(x, cache=self_cache, key_mask=key_mask)))
            x = self.norm2(x + self.dropout(self.cross_attn(x, memory, cache=cross_cache)))
            x = self.norm3(x + self.dropout(self.feed_forward(x)))
        return x


def resnet(cfg: VirTexConfig) -> nn.Module:
    """The torchvision ResNet of cfg.visual at random init, without its pooling and fc: what every
    pretext trains. zero_init_residual: each block starts as the identity, which helps training from
    scratch. At 64 px (the CPU demo) the layer4 grid is 2x2 and the identity blocks pass only
    strided 1x1 shortcuts, so the caption loss barely reaches the convolutions: the demo turns it
    off."""
    visual = torchvision.models.get_model(cfg.visual, weights=None,
                                          zero_init_residual=cfg.zero_init_residual)
    visual.width = visual.fc.in_features  # 2048 for resnet50, 512 for resnet18
    del visual.fc, visual.avgpool  # we keep the layer4 grid, not a pooled vector
    return visual


class VirTex(nn.Module):

    def __init__(self, cfg: VirTexConfig):
        super().__init__()
        if type(self) is VirTex and cfg.pretext not in ('bicaptioning', 'captioning'):
            raise ValueError(f"pretext={cfg.pretext!r} is not VirTex's: build the model with "
                             f"pretexts.pretext_model(config)")
        self.config = cfg
        self.visual = resnet(cfg)
        H = cfg.n_embd
        # shared by both directions: visual projection, embeddings, output layer
        self.visual_projection = nn.Linear(self.visual.width, H)
        self.word_embedding = nn.Embedding(cfg.vocab_size, H, padding_idx=cfg.pad_id)
        self.position_embedding = nn.Embedding(cfg.max_len, H)
        self.embedding_norm = nn.LayerNorm(H, eps=1e-8)
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.layers_fwd = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.layers_bwd = (nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
                           if cfg.bidirectional else None)
        # pre-norm layers need a last norm per direction (the official backward head is a deep copy
        # of the forward one, final norm included); post-norm layers, the paper's, have none
        self.final_norm = nn.LayerNorm(H) if cfg.norm_first else None
        self.final_norm_bwd = nn.LayerNorm(H) if cfg.norm_first and cfg.bidirectional else None
        self.lm_head = nn.Linear(H, cfg.vocab_size)
        self.lm_head.weight = self.word_embedding.weight  # tied; the bias stays its own
        self.init_textual_weights()

    def init_textual_weights(self):
        # BERT-style: N(0, init_std) for linear, attention and embedding weights; biases keep
        # PyTorch's defaults (attention biases start at 0, as in nn.MultiheadAttention). The paper's
        # 0.02 was chosen for widths of 768-2048, where a matrix of that std has a gain near 1
        # (0.02 * sqrt(2048) = 0.9); at width H the same gain takes 0.02 * sqrt(2048 / H) (0.057
        # at H=256), and the image reaches the logits through 3 such matrices
        for module in self.textual_modules():
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=self.config.init_std)
                if isinstance(m, Attention):
                    for proj in m.children():
                        nn.init.zeros_(proj.bias)
        for embedding in (self.word_embedding, self.position_embedding):
            nn.init.normal_(embedding.weight, std=self.config.init_std)
        with torch.no_grad():
            self.word_embedding.weight[self.config.pad_id].zero_()  # last: lm_head shares it

    def textual_modules(self):
        return [m for m in (self.visual_projection, self.word_embedding, self.position_embedding,
                            self.embedding_norm, self.layers_fwd, self.layers_bwd, self.final_norm,
                            self.final_norm_bwd, self.lm_head) if m is not None]

    # ------------------------------------------------------------------------------------------
    # images -> grid -> memory

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized images -> (B, C, S/32, S/32) layer4 grid."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, height, width), got {tuple(images.shape)}")
        v = self.visual
        x = v.maxpool(v.relu(v.bn1(v.conv1(images))))
        return v.layer4(v.layer3(v.layer2(v.layer1(x))))

    def project(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) grid -> (B, h*w, H) memory, row-major over the grid, for cross-attention."""
        return self.visual_projection(grid.flatten(2).transpose(1, 2))

    # ------------------------------------------------------------------------------------------
    # text

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) ids at positions start.. -> (B, T, H); padding positions are zero."""
        T = tokens.shape[1]
        if start + T > self.config.max_len:
            raise ValueError(f"captions of {start + T} ids exceed max_len={self.config.max_len}")
        positions = torch.arange(start, start + T, device=tokens.device)
        x = self.embedding_norm(self.word_embedding(tokens) + self.position_embedding(positions))
        x = self.embedding_dropout(x)
        return x * (tokens != self.config.pad_id).unsqueeze(-1).to(x.dtype)

    def decode(self, memory, tokens, direction='fwd', start=0, cache=None, causal=True):
        """One direction's decoder ('fwd' or 'bwd'): (B, T) ids -> (B, T, H) features (pre-logits).
        causal=False: every position sees every real one (masked_lm, cappa's parallel mode)."""
        layers, final_norm = ((self.layers_fwd, self.final_norm) if direction == 'fwd' else
                              (self.layers_bwd, self.final_norm_bwd))
        x = self.embed(tokens, start)
        key_mask = None if causal else tokens != self.config.pad_id
        for i, layer in enumerate(layers):
            x = layer(x, memory, None if cache is None else cache.setdefault(i, {}), key_mask)
        return x if final_norm is None else final_norm(x)

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor,
               direction: str = 'fwd') -> torch.Tensor:
        """Full, uncached pass of one direction: (B, T) ids -> (B, T, V) next-token logits."""
        return self.lm_head(self.decode(memory, tokens, direction))

    def caption_loss(self, memory, tokens, direction, reduction='mean'):
        """Next-token cross-entropy over the real (non-pad) targets of one direction: their mean, or
        sum."""
        features = self.decode(memory, tokens[:, :-1], direction)  # (B, T-1, H)
        return self.word_loss(features, tokens[:, 1:], reduction)

    def word_loss(self, features, targets, reduction='mean'):
        """Cross-entropy of the output layer on (B, T, H) features against (B, T) targets, pad ids
        left out."""
        # one static shape, one graph: every position, padding ignored
        if torch.compiler.is_compiling():
            logits = self.lm_head(features).flatten(0, 1).float()
            return F.cross_entropy(logits, targets.flatten(), ignore_index=self.config.pad_id,
                                   reduction=reduction)
        # the output layer is the biggest matmul: run it on real targets only, not on padding
        real = targets != self.config.pad_id
        return F.cross_entropy(self.lm_head(features[real]).float(), targets[real],
                               reduction=reduction)

    def visual_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoders read: (B, 3, S, S) images -> (B, N, H) projected grid."""
        return self.project(self.encode_images(images))

    def forward(self, images: torch.Tensor, caption_tokens: torch.Tensor, generator=None):
        """images (B,3,S,S); caption_tokens (B,T) = [SOS] w.. [EOS] right-padded with pad_id;
        generator: the random draws of the pretexts that have some (pretexts.py). Returns (loss,
        parts): a scalar with grad and its detached terms, {'fwd': .., 'bwd': ..} for
        bicaptioning (loss = forward CE + backward CE), {'fwd': ..} for captioning."""
        if caption_tokens.ndim != 2 or caption_tokens.shape[0] != images.shape[0]:
            raise ValueError(f"caption_tokens must be (B, T) with B={images.shape[0]}, got "
                             f"{tuple(caption_tokens.shape)}")
        return self.losses(self.visual_features(images), caption_tokens, generator)

    def losses(self, memory: torch.Tensor, caption_tokens: torch.Tensor, generator=None):
        """forward() from visual_features() on: scoring the same captions against other images
        (train.py's image-reliance check) needs no second pass through the backbone."""
        if caption_tokens.shape[1] > self.config.max_len:
            raise ValueError(f"captions of {caption_tokens.shape[1]} ids exceed "
                             f"max_len={self.config.max_len}")
        loss, parts = 0, {}
        for direction, tokens in self.directions(caption_tokens):
            direction_loss = self.caption_loss(memory, tokens, direction)
            parts[direction] = direction_loss.detach()
            loss = loss + direction_loss
        return loss, parts

    def directions(self, caption_tokens: torch.Tensor) -> list:
        """[(direction, its decoder's input ids)]: the captions as they are for the forward
        decoder, and reversed for the backward one where there is one."""
        directions = [('fwd', caption_tokens)]
        if self.layers_bwd is not None:
            # length = the last real id's position + 1 (a rare real <unk> inside is id 0 too)
            real = (caption_tokens != self.config.pad_id).int()
            lengths = caption_tokens.shape[1] - real.flip(1).argmax(1)
            directions.append(('bwd', reverse_captions(caption_tokens, lengths)))
        return directions

    # ------------------------------------------------------------------------------------------
    # cached decoding (forward direction), used by caption.py

    @torch.no_grad()
    def decode_step(self, memory, last_tokens, cache=None):
        """One step of the forward decoder with a key/value cache. memory (B, N, H) is read only on
        the first call (cache=None), when the cross-attention keys and values of every layer are
        computed once. last_tokens (B,) are the newest ids (first call: [SOS]). Returns
        log-probabilities (B, V) of the next id and the updated cache ({'pos': positions done,
        'layers': {layer: {'self'|'cross': {'q'?, 'k', 'v'}}}})."""
        if cache is None:
            cache = {'pos': 0, 'layers': {}}
        x = self.decode(memory, last_tokens[:, None], 'fwd', cache['pos'], cache['layers'])
        cache['pos'] += 1
        return F.log_softmax(self.lm_head(x[:, -1]).float(), dim=-1), cache

    # ------------------------------------------------------------------------------------------
    # parameters, optimizer groups, portability

    def num_params(self) -> dict:
        visual = sum(p.numel() for p in self.visual.parameters())
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return {'visual': visual, 'textual': total - visual, 'total': total}

    def param_groups(self, weight_decay: float, cnn_lr: float, lr: float) -> list[dict]:
        """Three optimizer groups (few, so SGD can use its foreach/fused path): the backbone at
        cnn_lr; the textual head at lr, with weight decay except on the embedding and decoder
        layers' norm weights and biases (upstream's NO_DECAY rule). Each group keeps its rate as
        base_lr too: the schedule multiplies it (train.py)."""
        no_decay_names = re.compile(
            r'^(embedding_norm\.|layers_(fwd|bwd)\.\d+\..*(norm\d\.|bias$)|final_norm(_bwd)?\.)')
        visual, decay, no_decay = [], [], []
        for name, p in self.named_parameters():  # named_parameters lists the tied weight once
            if name.startswith('visual.'):
                visual.append(p)
            elif no_decay_names.match(name):
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{'name': 'visual', 'params': visual, 'lr': cnn_lr, 'weight_decay': weight_decay},
                  {'name': 'textual', 'params': decay, 'lr': lr, 'weight_decay': weight_decay},
                  {'name': 'textual_no_decay', 'params': no_decay, 'lr': lr, 'weight_decay': 0.0}]
        return [{**group, 'base_lr': group['lr']} for group in groups]

    def backbone_state_dict(self) -> dict:
        """The ResNet weights in torchvision naming (no fc): loads into
        torchvision.models.<visual>() with strict=False, missing only fc.weight and fc.bias."""
        return {k: v.detach().clone() for k, v in self.visual.state_dict().items()}


def flops_per_image(model: nn.Module, image_size: int = 224, caption_len: int = 16) -> int:
    """FLOPs (matmuls and convolutions, by torch's FlopCounterMode) of one training step, forward
    and backward, of any pretext's model for one image and caption: what MFU divides by."""
    from torch.utils.flop_counter import FlopCounterMode
    device, was_training = next(model.parameters()).device, model.training
    tokens = torch.full((1, caption_len), 5, device=device)
    tokens[0, 0], tokens[0, -1] = model.config.sos_id, model.config.eos_id
    model.eval()  # the same FLOPs, and BatchNorm's running statistics are left as they are
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device), tokens)[0].backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops()

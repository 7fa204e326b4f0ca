"""
Every weight file this project reads, read as untrusted input (torch.load with weights_only=True):
its own train.py checkpoints, those of the official VirTex code (kdexd/virtex), and the torchvision,
MoCo and VISSL backbones that evaluate.py and probe.py judge. (Writing and resuming a run's
checkpoints is safety.py's, beside the rest of the run folder.)

    from checkpoints import load_backbone, load_model, load_official
    model = load_model('out/ckpt.pt')      # a train.py checkpoint, any pretext
    # a VirTex that computes the same function as the official model
    model = load_official('bicaptioning_R_50_L1_H2048.pth')
    # a backbone-only file: the head stays random
    model = load_official('backbone_R_50.pth')
    # evaluate.py's and probe.py's weight sources
    backbone, arch, size = load_backbone(init='moco:moco_v2.pth.tar')

For official files the architecture is read from the weights. The key layout below comes from
reading the official code: its textual head is PyTorch's nn.TransformerDecoder under `textual.` (and
a deep copy under `backward_textual.` that shares the visual projection, the embeddings and the
output layer), its backbone a torchvision ResNet under `visual.cnn.`. The files of the
classification pretexts (`textual.output.*`, a linear layer) load as backbones; a masked-LM file has
the keys of a forward-captioning one and loads as one (only its backbone means anything). Errors are
ValueErrors (FileNotFoundError for a missing file) that name the file.
Imports torch, evaluate.py, model.py, pretexts.py and safety.py only.
"""

import os

import torch
import torch.nn as nn

from evaluate import random_backbone
from model import VirTex, VirTexConfig
from pretexts import pretext_model
from safety import load_file, read_checkpoint


def load_model(path: str, device='cpu') -> VirTex:
    """A train.py checkpoint as a model in eval mode; ValueError naming the file if it is not
    one."""
    # its run's config: load_checkpoint(path)[1]['config']
    return load_checkpoint(path)[0].to(device).eval()


def load_checkpoint(path: str) -> tuple[VirTex, dict]:
    """A train.py checkpoint as (model with its weights, the whole checkpoint dict, whose 'config'
    is the run's): the one loading path of evaluate.py, probe.py, caption.py and export.py."""
    ckpt = read_checkpoint(path)
    try:
        cfg = VirTexConfig(**ckpt['model_args'])
        model = pretext_model(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint {path}: its model_args do not describe a VirTex model ({e})") from None
    load_strict(model, ckpt['model'], path)
    return model, ckpt


def load_strict(model: nn.Module, state: dict, path: str, backbone_only: bool = False) -> None:
    """load_state_dict that reports disagreeing keys and shapes on one line (ValueError)."""
    ours = model.state_dict()
    expected = [k for k in ours if not backbone_only or k.startswith('visual.')]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(ours[k].shape)}"
              for k in expected if k in state and getattr(state[k], 'shape', None) != ours[k].shape]
    if missing or unexpected or shapes:
        problems = []
        for label, items in (('missing keys', missing), ('unexpected keys', unexpected),
                             ('shape mismatches', shapes)):
            if items:
                problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise ValueError(
            f"checkpoint {path}: does not fit this architecture: {'; '.join(problems)}")
    model.load_state_dict(state, strict=not backbone_only)


# ----------------------------------------------------------------------------------------------
# the official code's checkpoints

RESNETS = {  # (blocks per stage, bottleneck, width of layer1) -> torchvision name
    ((2, 2, 2, 2), False, 64): 'resnet18', ((3, 4, 6, 3), False, 64): 'resnet34',
    ((3, 4, 6, 3), True, 64): 'resnet50', ((3, 4, 23, 3), True, 64): 'resnet101',
    ((3, 8, 36, 3), True, 64): 'resnet152', ((3, 4, 6, 3), True, 128): 'wide_resnet50_2',
    ((3, 4, 23, 3), True, 128): 'wide_resnet101_2',
}
# our name -> the official one under textual. (the backward head holds copies of these, shared)
SHARED = {'visual_projection.weight': 'visual_projection.weight',
          'visual_projection.bias': 'visual_projection.bias',
          'word_embedding.weight': 'embedding.words.weight',
          'position_embedding.weight': 'embedding.positions.weight',
          'embedding_norm.weight': 'embedding.layer_norm.weight',
          'embedding_norm.bias': 'embedding.layer_norm.bias',
          'lm_head.weight': 'embedding.words.weight', 'lm_head.bias': 'output.bias'}
# same names in both
PER_LAYER = ('self_attn.out_proj', 'linear1', 'linear2', 'norm1', 'norm2', 'norm3')


def load_official(path: str, device='cpu') -> VirTex:
    """Load a checkpoint of the official VirTex code (full model or backbone only)."""
    cfg, our_state = official_to_ours(load_file(path), path)
    model = VirTex(cfg)
    load_strict(model, our_state, path,
                backbone_only=not any(k.startswith('lm_head') for k in our_state))
    return model.to(device).eval()


def infer_resnet(backbone: dict, path: str) -> str:
    """The torchvision name of the ResNet whose state dict this is, from its blocks per stage and
    their kind."""
    blocks = []
    for stage in ('layer1.', 'layer2.', 'layer3.', 'layer4.'):
        indices = [int(k.split('.')[1]) for k in backbone if k.startswith(stage)]
        if not indices or 'layer1.0.conv1.weight' not in backbone:
            raise ValueError(f"checkpoint {path}: no ResNet layer1..layer4 weights found")
        blocks.append(max(indices) + 1)
    key = (tuple(blocks), 'layer1.0.conv3.weight' in backbone,
           backbone['layer1.0.conv1.weight'].shape[0])
    if key not in RESNETS:
        raise ValueError(f"checkpoint {path}: unknown ResNet layout {key}")
    return RESNETS[key]


def official_to_ours(state: dict, path: str) -> tuple[VirTexConfig, dict]:
    """Map an official VirTex state dict onto this model's keys and infer its VirTexConfig.

    Accepts a full checkpoint ({'model': ...} or bare: visual.cnn.*, textual.*, backward_textual.*)
    or a backbone-only file (plain torchvision keys). The official layers' fused in_proj of the
    cross-attention is split into our q and kv projections. Heads are not stored in weights: the
    official configs all use H / 64.
    """
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: expected a dict of tensors")
    if isinstance(state.get('model'), dict):
        state = state['model']
    if any(k.startswith('visual.cnn.') for k in state):
        backbone = {k[len('visual.cnn.'):]: v for k, v in state.items()
                    if k.startswith('visual.cnn.')}
    elif 'conv1.weight' in state:  # backbone-only file, e.g. the official torch.hub backbone
        backbone = dict(state)
    else:
        raise ValueError(f"checkpoint {path}: neither an official VirTex checkpoint (visual.cnn.*) "
                         f"nor a ResNet backbone file (conv1.weight)")
    backbone = {k: v for k, v in backbone.items() if not k.startswith('fc.')}
    ours = {'visual.' + k: v for k, v in backbone.items()}
    if 'textual.embedding.words.weight' not in state:
        # backbone only: the head stays random
        return VirTexConfig(visual=infer_resnet(backbone, path)), ours

    V, H = state['textual.embedding.words.weight'].shape
    n_layer = len({k.split('.')[3] for k in state if k.startswith('textual.transformer.layers.')})
    cfg = VirTexConfig(visual=infer_resnet(backbone, path), vocab_size=V, n_layer=n_layer, n_embd=H,
                       n_head=max(1, H // 64),
                       max_len=state['textual.embedding.positions.weight'].shape[0],
                       pretext='bicaptioning' if any(k.startswith('backward_textual.transformer.')
                                                     for k in state) else 'captioning',
                       norm_first='textual.transformer.norm.weight' in state)

    def take(key):
        if key not in state:
            raise ValueError(f"checkpoint {path}: missing key {key}")
        return state[key]

    for our_key, their_key in SHARED.items():
        ours[our_key] = take('textual.' + their_key)
        # the backward head shares it: copies must agree
        copy = state.get('backward_textual.' + their_key)
        if cfg.bidirectional and copy is not None and not torch.equal(copy, ours[our_key]):
            raise ValueError(f"checkpoint {path}: backward_textual.{their_key} differs from "
                             f"textual.{their_key}")
    directions = [('textual', 'layers_fwd', 'final_norm')]
    if cfg.bidirectional:
        directions.append(('backward_textual', 'layers_bwd', 'final_norm_bwd'))
    for prefix, layers, final_norm in directions:
        for kind in ('weight', 'bias'):
            if cfg.norm_first:  # pre-norm: each direction has its own last LayerNorm
                ours[f'{final_norm}.{kind}'] = take(f'{prefix}.transformer.norm.{kind}')
            for i in range(n_layer):
                src, dst = f'{prefix}.transformer.layers.{i}.', f'{layers}.{i}.'
                ours[dst + f'self_attn.qkv_proj.{kind}'] = take(src + f'self_attn.in_proj_{kind}')
                in_proj = take(src + f'multihead_attn.in_proj_{kind}')  # rows: [q; k; v]
                (ours[dst + f'cross_attn.q_proj.{kind}'],
                 ours[dst + f'cross_attn.kv_proj.{kind}']) = in_proj[:H], in_proj[H:]
                ours[dst + f'cross_attn.out_proj.{kind}'] = \
                    take(src + f'multihead_attn.out_proj.{kind}')
                for name in PER_LAYER:
                    ours[dst + f'{name}.{kind}'] = take(src + f'{name}.{kind}')
    return cfg, ours


# ----------------------------------------------------------------------------------------------
# the weights a train.py run starts from (--init_from=FILE, --init_backbone=SOURCE)

# what makes two models one architecture with one vocabulary (dropout, init and the like do not)
ARCHITECTURE = ('pretext', 'visual', 'vocab_size', 'n_layer', 'n_embd', 'n_head', 'max_len',
                'norm_first', 'pad_id', 'sos_id', 'eos_id', 'mask_id')


def start_from(model: nn.Module, init_from: str = '', init_backbone: str = '',
               tokenizer_pieces: str = '') -> str:
    """Put the weights a run starts from into `model` (at its init): init_from, a whole model of the
    same architecture and vocabulary (this project's checkpoint, or the official code's as
    'virtex:FILE'); or init_backbone, the backbone alone from any source evaluate.py reads (a
    checkpoint of this project, or 'torchvision:', 'moco:', 'vissl:', 'virtex:' and a path), the
    head staying new. Returns what the run started from, for its checkpoint. A mismatch is a
    ValueError naming both sides."""
    if init_from and init_backbone:
        raise ValueError("--init_from=FILE gives the whole model: drop --init_backbone")
    if init_from:
        path = init_from.removeprefix('virtex:')
        if not os.path.exists(path):
            raise ValueError(f"--init_from={init_from}: no such file (choose scratch, resume, auto "
                             "or a model's file)")
        if init_from.startswith('virtex:'):
            theirs, state = official_to_ours(load_file(path), path)
            pieces = tokenizer_pieces  # the official files do not say; their size must fit
        else:
            ckpt = read_checkpoint(path)
            theirs, state = VirTexConfig(**ckpt['model_args']), ckpt['model']
            pieces = ckpt.get('tokenizer_pieces', tokenizer_pieces)
        differ = [f"{k}={getattr(theirs, k)!r} there, {getattr(model.config, k)!r} in this run"
                  for k in ARCHITECTURE if getattr(theirs, k) != getattr(model.config, k)]
        if differ:
            raise ValueError(f"{init_from}: not this run's model: {'; '.join(differ)}")
        if pieces != tokenizer_pieces:
            raise ValueError(f"{init_from}: was trained with another vocabulary than --tokenizer "
                             "(its pieces differ, so the ids would mean other words)")
        load_strict(model, state, path)
        return f"the weights of {init_from}"
    ckpt, init = (init_backbone, '') if os.path.exists(init_backbone) else ('', init_backbone)
    backbone, arch, _ = load_backbone(ckpt, init, model.config.visual)
    if arch != model.config.visual:
        raise ValueError(f"{init_backbone}: a {arch} backbone, and this run's --visual is "
                         f"{model.config.visual}")
    model.visual.load_state_dict(backbone.state_dict())  # the same keys: fc and avgpool hold none
    return f"the backbone of {init_backbone}"


# ----------------------------------------------------------------------------------------------
# the backbone a frozen evaluation reads (evaluate.py, probe.py)

def load_backbone(ckpt: str = '', init: str = '', visual: str = 'resnet50', image_size: int = 0,
                  seed: int = 1337, zero_init_residual: bool = True) -> tuple[nn.Module, str, int]:
    """The plain torchvision ResNet to evaluate (pooled output, fc removed), its name and the image
    size to use.

    Exactly one weight source: ckpt (this project's checkpoint; its backbone and training image
    size) or init ('random' with `visual`, seed and zero_init_residual; 'torchvision:PATH' a
    torchvision ResNet state dict; 'virtex:PATH' an official VirTex checkpoint or backbone;
    'moco:PATH' an official MoCo v1/v2 release, its query encoder without the fc / projection head;
    'vissl:PATH' a VISSL / ClassyVision release such as PIRL's or SwAV's, its trunk without the
    heads). image_size 0: the checkpoint's, else 224.
    """
    if bool(ckpt) + bool(init) != 1:
        raise ValueError("give exactly one weight source: --ckpt=PATH or "
                         "--init=random|torchvision:PATH|virtex:PATH|moco:PATH|vissl:PATH")
    arch, size = visual, image_size
    state = None  # None: the random init of `arch`
    source = ckpt or init.partition(':')[2]  # the file to read
    if ckpt:
        model, saved = load_checkpoint(ckpt)
        arch, state = model.config.visual, model.backbone_state_dict()
        # features at the resolution it was trained at
        size = size or saved.get('config', {}).get('image_size', 224)
    elif init.startswith('virtex:'):
        model = load_official(source)
        arch, state = model.config.visual, model.backbone_state_dict()
    elif init.startswith('torchvision:'):
        state = load_file(source)
        # old ImageNet example / torchvision references checkpoints
        for wrapper in ('state_dict', 'model'):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise ValueError(f"{source}: expected a dict of tensors")
        state = {k.removeprefix('module.'): v for k, v in state.items()}  # DataParallel's prefix
        # the classifier is not evaluated
        state = {k: v for k, v in state.items() if not k.startswith('fc.')}
    elif init.startswith('moco:'):
        # {'state_dict': {'module.encoder_q.<torchvision key>': ...}, ...}
        state = load_file(source)
        prefix = 'module.encoder_q.'
        state = state.get('state_dict') if isinstance(state, dict) else None
        if not isinstance(state, dict) or not any(k.startswith(prefix) for k in state):
            raise ValueError(f"{source}: not a MoCo checkpoint (expected 'state_dict' with "
                             f"{prefix}* keys)")
        state = {k[len(prefix):]: v for k, v in state.items()
                 if k.startswith(prefix) and not k.startswith(prefix + 'fc.')}
        arch = infer_resnet(state, source)
    elif init.startswith('vissl:'):
        state = vissl_trunk(load_file(source), source)
        arch = infer_resnet(state, source)
    elif init != 'random':
        raise ValueError(f"--init={init}: expected random, torchvision:PATH, virtex:PATH, "
                         "moco:PATH or vissl:PATH")
    backbone = random_backbone(arch, seed, zero_init_residual)
    if state is not None:
        try:
            backbone.load_state_dict(state)
        except RuntimeError as e:
            reason = ' '.join(str(e).split())[:300]
            raise ValueError(f"{source}: not a {arch} backbone: {reason}") from None
    return backbone, arch, size or 224


def vissl_trunk(state, path: str) -> dict:
    """The ResNet trunk of a VISSL checkpoint in torchvision names. VISSL (facebookresearch/vissl)
    keeps it under classy_state_dict -> base_model -> model -> trunk (its own checkpoints: PIRL,
    SimCLR, SwAV, ...) or under model_state_dict (its converted files), with keys
    _feature_blocks.<torchvision key>; the heads sit beside the trunk and are not read. Its
    extra_scripts/convert_vissl_to_torchvision.py strips the same prefix."""
    trunk = state
    for key in ('classy_state_dict', 'base_model', 'model', 'trunk'):
        trunk = trunk.get(key, trunk) if isinstance(trunk, dict) else trunk
    if isinstance(trunk, dict) and isinstance(trunk.get('model_state_dict'), dict):
        trunk = trunk['model_state_dict']
    prefix = '_feature_blocks.'
    if not isinstance(trunk, dict) or not any(str(k).startswith(prefix) for k in trunk):
        raise ValueError(f"{path}: not a VISSL checkpoint (expected classy_state_dict -> "
                         f"base_model -> model -> trunk, or model_state_dict, with {prefix}* keys)")
    return {k[len(prefix):]: v for k, v in trunk.items() if k.startswith(prefix)}

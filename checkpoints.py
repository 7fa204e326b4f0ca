"""
Every weight file this project reads, read as untrusted input (torch.load with weights_only=True):
its own train.py checkpoints, those of the official VirTex code (kdexd/virtex), and the torchvision,
MoCo and VISSL backbones that evaluate.py and probe.py judge. For train.py: load_for_resume refuses
a checkpoint that cannot continue the run, restore_training_state puts the rest of its state back,
and save_checkpoint writes one.

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
Imports torch, torchvision, configurator.py, model.py and pretexts.py only.
"""

import os
import pickle
import re
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

from configurator import write_atomically
from model import VirTex, VirTexConfig
from pretexts import pretext_model


def load_file(path: str):
    """torch.load(path, weights_only=True), with one-line reasons for the files it refuses."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path}: no such file") from None
    except pickle.UnpicklingError as e:
        found = re.search(r'unsupported (?:global: )?GLOBAL (\S+)', str(e), re.IGNORECASE)
        if found:
            raise ValueError(f"checkpoint {path}: holds Python objects ({found.group(1)}), not "
                             f"only tensors; refused because loading it could run code") from None
        raise ValueError(f"checkpoint {path}: cannot be read (not a torch checkpoint)") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path}: cannot be read ({reason[:200]})") from None


def load_model(path: str, device='cpu') -> VirTex:
    """A train.py checkpoint as a model in eval mode; ValueError naming the file if it is not
    one."""
    # its run's config: load_checkpoint(path)[1]['config']
    return load_checkpoint(path)[0].to(device).eval()


def load_checkpoint(path: str) -> tuple[VirTex, dict]:
    """A train.py checkpoint as (model with its weights, the whole checkpoint dict, whose 'config'
    is the run's): the one loading path of evaluate.py, caption.py and train.py's resume."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict) or \
            not isinstance(ckpt.get('model_args'), dict):
        raise ValueError(f"checkpoint {path}: not a checkpoint of this project (expected "
                         f"'model' and 'model_args'; official VirTex files load with "
                         f"load_official)")
    try:
        cfg = VirTexConfig(**ckpt['model_args'])
        model = pretext_model(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint {path}: its model_args do not describe a VirTex model ({e})") from None
    load_strict(model, ckpt['model'], path)
    return model, ckpt


def load_for_resume(path: str, model_args: dict, config: dict, tokenizer_pieces: str,
                    train_subset) -> tuple[VirTex, dict]:
    """A train.py checkpoint that can continue the run of this config (train.py's, resolved), as
    load_checkpoint gives it; otherwise a ValueError (FileNotFoundError) naming the file and what
    stands in the way."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--init_from=resume: {path} does not exist")
    model, ckpt = load_checkpoint(path)
    saved = asdict(model.config)
    changed = [f"{k}={saved[k]!r} in the checkpoint, {v!r} now" for k, v in model_args.items()
               if saved[k] != v]
    if changed:
        raise ValueError(f"{path}: the model differs from the config: {'; '.join(changed)}")
    missing = [k for k in ('optimizer', 'iter_num', 'data_position', 'rng_state', 'world_size')
               if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: cannot resume from it: no {', '.join(missing)} (a model-only "
                         "file?)")
    if ckpt['tokenizer_pieces'] != tokenizer_pieces:
        raise ValueError(f"{path}: was trained with another tokenizer than {config['tokenizer']} "
                         "(its pieces differ, so the ids would mean other words)")
    if ckpt['train_subset'] != train_subset:  # --train_fraction or --seed changed: other images
        raise ValueError(f"{path}: was trained on other images (--train_fraction="
                         f"{ckpt['config']['train_fraction']}, --seed={ckpt['config']['seed']})")
    # the seed drives the data order, the augmentation and dropout; the optimizer's state and the
    # labels must be the ones the run began with ('': a checkpoint from before the key existed)
    for key in ('seed', 'optimizer', 'label_categories'):
        if ckpt['config'].get(key, '') != config[key]:
            raise ValueError(f"{path}: was trained with --{key}={ckpt['config'].get(key, '')}, "
                             f"not {config[key]}: a resume continues the same run")
    if ckpt['iter_num'] >= config['max_iters']:
        raise ValueError(f"{path}: is at iteration {ckpt['iter_num']} already; give --max_iters "
                         "above it to train on (the learning-rate schedule follows max_iters)")
    return model, ckpt


def restore_training_state(path: str, ckpt: dict, optimizer, scaler, rank: int,
                           world_size: int) -> tuple[int, tuple, dict, int, float, str]:
    """Put the training state of a load_for_resume checkpoint back: the optimizer's state and the
    gradient scaler's (the learning rates, momentum and weight decay stay this run's), and this
    process's RNGs. Returns (iter_num, data position, best VOC, images skipped so far, seconds
    trained so far, a note to print or ''). With another number of processes the same images make
    each iteration, split anew, and the RNGs stay as this run seeded them: close to an unbroken
    run, not bitwise."""
    settings = [{k: v for k, v in group.items() if k != 'params'}
                for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: its optimizer state does not fit this run "
                         f"({type(e).__name__}: {e})") from None
    for group, setting in zip(optimizer.param_groups, settings):
        group.update(setting)
    scaler.load_state_dict(ckpt['scaler'])
    epoch, batch = ckpt['data_position']
    note = ''
    if ckpt['world_size'] == world_size:
        torch.set_rng_state(ckpt['rng_state'][rank])
        if ckpt['cuda_rng_state'] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt['cuda_rng_state'][rank])
    else:
        batch = batch * ckpt['world_size'] // world_size
        note = (f"{path} was written by {ckpt['world_size']} process(es), this run has "
                f"{world_size}: the global batch stays the same, split anew, and the data order "
                "and dropout differ from an unbroken run")
    return (ckpt['iter_num'], (epoch, batch), ckpt['best_voc'], ckpt['bad_images'],
            ckpt.get('time', 0.0), note)


def save_checkpoint(path: str, model: nn.Module, state: dict, optimizer=None, scaler=None,
                    diverged=None) -> None:
    """A train.py checkpoint, written whole or not at all: the model's weights and `state` (its
    model_args, config, iteration, ...); with the optimizer, all a resume needs besides: the
    optimizer's and the gradient scaler's state and every process's RNG states, so that each one
    resumes its own dropout stream. Under torchrun every process calls it and rank 0 writes. A
    diverged run (non-finite weights, or `diverged`, a bool tensor: the loss was) never replaces a
    good checkpoint: ValueError. OSError naming the file if it cannot be written."""
    full, on_cuda = optimizer is not None, next(model.parameters()).is_cuda
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if full:
        weight_norm = torch.stack([p.detach().float().norm() for p in model.parameters()]).sum()
        bad = ~torch.isfinite(weight_norm) | (False if diverged is None else diverged)
        if world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise ValueError(f"{path}: not written: the loss or the weights became non-finite")
    rng_states = [torch.get_rng_state()]
    cuda_rng_states = [torch.cuda.get_rng_state()] if on_cuda else []
    if full and world_size > 1:
        rng_states, cuda_rng_states = [None] * world_size, [None] * world_size
        dist.all_gather_object(rng_states, torch.get_rng_state())
        if on_cuda:
            dist.all_gather_object(cuda_rng_states, torch.cuda.get_rng_state())
    if rank:
        return
    checkpoint = {'model': model.state_dict(), **state}
    if full:
        checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                          world_size=world_size, rng_state=rng_states,
                          cuda_rng_state=cuda_rng_states)
    write_atomically(path, lambda f: torch.save(checkpoint, f))


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
    torch.manual_seed(seed)
    try:
        backbone = torchvision.models.get_model(arch, weights=None,
                                                zero_init_residual=zero_init_residual)
    except ValueError:
        raise ValueError(f"--visual={arch}: not a torchvision model name (e.g. resnet50)") from None
    # forward now ends at the global average pool: (B, 2048) for ResNet-50
    backbone.fc = nn.Identity()
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

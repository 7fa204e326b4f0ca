"""
Export a pretrained backbone for downstream training: in torchvision's layout, or in Detectron2's.

  # torchvision.models.<visual>()
  python export.py --ckpt=out/ckpt.pt --out=out/backbone.pth
  # Detectron2's ResNet
  python export.py --ckpt=out/ckpt.pt --format=detectron2 --out=out/backbone_d2.pth

torchvision: a plain state dict without fc; `resnet50().load_state_dict(state, strict=False)` misses
only fc.
Detectron2: {'model': ..., '__author__': ..., 'matching_heuristics': True} with Detectron2's names
(stem.conv1, res2..res5, convK.norm, shortcut), the layout its checkpointer reads. Use it with
Detectron2's standard R-50 configs as the paper's detection runs do:
MODEL.WEIGHTS=out/backbone_d2.pth, INPUT.FORMAT=RGB, MODEL.PIXEL_MEAN=[123.675,116.280,103.530],
MODEL.PIXEL_STD=[58.395,57.120,57.375] (ImageNet's, in RGB, as the backbone was trained),
MODEL.RESNETS.STRIDE_IN_1X1=False (torchvision puts the stride in the 3x3 convolution),
MODEL.RESNETS.NORM=SyncBN to fine-tune the normalisation layers.
"""

import os
from typing import Literal

import torch

from configurator import configure
from safety import check_outputs, one_line_errors, write_atomically

# torchvision -> Detectron2, applied in this order to each key (the official code's renaming)
DETECTRON2_NAMES = (('layer1.', 'res2.'), ('layer2.', 'res3.'), ('layer3.', 'res4.'),
                    ('layer4.', 'res5.'), ('bn1.', 'conv1.norm.'), ('bn2.', 'conv2.norm.'),
                    ('bn3.', 'conv3.norm.'), ('downsample.0.', 'shortcut.'),
                    ('downsample.1.', 'shortcut.norm.'))


def to_detectron2(state: dict) -> dict:
    """torchvision ResNet keys (fc left out) -> Detectron2's: conv1.weight -> stem.conv1.weight,
    layer1.0.bn1.bias -> res2.0.conv1.norm.bias, layer2.0.downsample.1.running_mean ->
    res3.0.shortcut.norm.running_mean."""
    renamed = {}
    for key, value in state.items():
        if key.startswith('fc.'):
            continue
        new = key
        for old, replacement in DETECTRON2_NAMES:
            new = new.replace(old, replacement)
        renamed[new if new.startswith('res') else 'stem.' + new] = value
    return renamed


def from_detectron2(state: dict) -> dict:
    """The inverse of to_detectron2."""
    restored = {}
    for key, value in state.items():
        old = key.removeprefix('stem.')
        for original, replacement in reversed(DETECTRON2_NAMES):
            old = old.replace(replacement, original)
        restored[old] = value
    return restored


# ----------------------------------------------------------------------------------------------
ckpt = ''              # a train.py checkpoint (any pretext: only its backbone is written)
format: Literal['torchvision', 'detectron2'] = 'torchvision'  # the layout to write
out = ''               # the file to write
# ----------------------------------------------------------------------------------------------


def main():
    from checkpoints import load_model
    if not ckpt or not out:
        raise SystemExit("error: give --ckpt=PATH (a train.py checkpoint) and --out=PATH")
    if out.endswith(os.sep) or os.path.isdir(out):
        raise SystemExit(f"error: --out={out} is a folder; give the file to write, e.g. "
                         f"{out.rstrip(os.sep)}/backbone.pth")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise SystemExit(f"error: {out}: its folder does not exist")
    check_outputs({'out': out}, {'--ckpt': ckpt})
    model = load_model(ckpt)
    state = model.backbone_state_dict()
    if format == 'detectron2':
        state = {'model': to_detectron2(state), '__author__': 'VirTex, minimal and fast '
                                                              '(export.py)',
                 'matching_heuristics': True}
    write_atomically(out, lambda f: torch.save(state, f))
    print(f"wrote the {model.config.visual} backbone of {ckpt} ({model.config.pretext}) in "
          f"{format}'s layout to {out}")


if __name__ == '__main__':
    configure(globals())
    with one_line_errors():
        main()

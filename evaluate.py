"""
Judge a frozen visual backbone the VirTex way: linear SVMs on its pooled features of
PASCAL VOC 2007.

  this project's checkpoint:  python evaluate.py --voc_root=data/shapes/VOC2007 --ckpt=out/ckpt.pt
  no pretraining (baseline):  python evaluate.py --voc_root=PATH/VOC2007 --init=random \
                                  --visual=resnet50
  other weights (or virtex:, moco:, vissl:):
                              python evaluate.py --voc_root=PATH/VOC2007 --init=torchvision:PATH
  SVMs only, saved features:  python evaluate.py --features=feats.npz

Reads <voc_root>/ImageSets/Main/*_{trainval,test}.txt and JPEGImages/. Features are the layer4
global average pool (2048-d for ResNet-50), L2-normalized; then the paper's 320 linear SVMs
(svm.py). Prints progress, a per-class table and, last, `mAP: xx.xx`; --save_features and
--out_json write files.
"""
import glob
import json
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from checkpoints import load_backbone
from augment import to_uint8_tensor
from coco import load_eval_image, normalize
from configurator import NON_NEGATIVE, POSITIVE, check_device, check_outputs, write_atomically
from svm import N_FOLDS, SVM_COSTS, svm_products_dtype, train_and_test_svms

# -----------------------------------------------------------------------------
voc_root = 'data/shapes/VOC2007'  # has ImageSets/Main/<class>_{trainval,test}.txt and JPEGImages/
ckpt = ''               # this project's checkpoint (train.py); its backbone is evaluated
# or: 'random' | 'torchvision:PATH' | 'virtex:PATH' (official VirTex file) |
# 'moco:PATH' (MoCo v1/v2)
init = ''
# torchvision ResNet for --init=random|torchvision:... (a checkpoint knows its own)
visual = 'resnet50'
image_size: NON_NEGATIVE = 0  # crop size; 0: the checkpoint's training image_size, else 224 (paper)
batch_size: POSITIVE = 64  # images per forward pass (upstream: 128)
num_workers: NON_NEGATIVE = min(4, os.cpu_count() or 1)  # DataLoader processes decoding JPEGs
log_interval: NON_NEGATIVE = 10  # print extraction progress every this many batches (0: never)
device = 'cuda' if torch.cuda.is_available() else 'cpu'  # also where the SVMs are solved
# extraction precision (autocast): upstream's fp32
dtype: Literal['float32', 'bfloat16', 'float16'] = 'float32'
# the SVM solver's CG products (see svm_products_dtype)
svm_dtype: Literal['auto', 'float32', 'bfloat16'] = 'auto'
features = ''           # an .npz from --save_features: skip the images, train and test SVMs only
# write the extracted features here (.npz: train_x, train_y, test_x, test_y, class_names)
save_features = ''
out_json = ''           # also write the per-class table and mAP here
seed = 1337             # seeds --init=random
# --init=random: the init a train.py run starts from (its zero_init_residual)
zero_init_residual = True
# -----------------------------------------------------------------------------
if __name__ == '__main__':  # importing this file (tests, dev/compare_svm.py) keeps the defaults
    from configurator import configure, one_line_errors
    rest = configure(globals())


# ------------------------------------------------------------------------------------------------
# VOC2007 images and labels

def read_voc(root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Image paths, labels (N, C) in {1, -1, 0} and class names (from <class>_<split>.txt) of a VOC
    split."""
    main = os.path.join(root, 'ImageSets', 'Main')
    class_files = sorted(glob.glob(os.path.join(main, f'*_{split}.txt')))
    if not class_files:
        note = os.path.join(root, 'LEFT_OUT.txt')  # an attribute task a small world left out
        if os.path.exists(note):
            with open(note) as f:
                raise ValueError(f"{root}: {f.read().strip()}")
        raise ValueError(f"{main}: no class files *_{split}.txt (is --voc_root a VOC2007 folder?)")
    # the image order; VOC has it, else take the first class file
    reference = os.path.join(main, f'{split}.txt')
    reference = reference if os.path.exists(reference) else class_files[0]
    with open(reference) as f:
        names = [line.split()[0] for line in f if line.strip()]
    labels = []
    for path in class_files:
        file_labels = {}
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if fields and (len(fields) != 2 or fields[1] not in ('1', '-1', '0')):
                    raise ValueError(f"{path}:{line_no}: expected '<image> <1|-1|0>', got "
                                     f"{line.strip()!r}")
                file_labels.update([fields] if fields else [])
        if len(file_labels) != len(names) or not all(name in file_labels for name in names):
            missing, extra = len(set(names) - set(file_labels)), len(set(file_labels) - set(names))
            raise ValueError(f"{path}: lists other images than {reference} ({missing} missing, "
                             f"{extra} extra)")
        labels.append([int(file_labels[name]) for name in names])
        if 1 not in labels[-1]:  # an AP needs positives: without them it would be a silent 0
            raise ValueError(f"{path}: no image is labelled 1, so the class cannot give an AP")
    class_names = [os.path.basename(p)[:-len(f'_{split}.txt')] for p in class_files]
    paths = [os.path.join(root, 'JPEGImages', name + '.jpg') for name in names]
    return paths, np.array(labels, dtype=np.int64).T, class_names


def read_voc_task(root: str) -> dict:
    """Both splits of a VOC folder, checked to have the same classes: {'trainval': (paths, labels),
    'test': (paths, labels), 'classes': class names}."""
    train_paths, train_labels, classes = read_voc(root, 'trainval')
    test_paths, test_labels, test_classes = read_voc(root, 'test')
    if test_classes != classes:
        raise ValueError(f"{root}: test classes {test_classes} differ from trainval classes "
                         f"{classes}")
    return {'trainval': (train_paths, train_labels), 'test': (test_paths, test_labels),
            'classes': classes}


class VocImages(torch.utils.data.Dataset):
    """The eval transform every stage shares (coco.load_eval_image): shorter side to 8/7 of the
    crop, center crop."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        # a worker's exception reaches the main process as a multi-line traceback, so report
        # failures as data
        try:
            return to_uint8_tensor(load_eval_image(self.paths[i], self.size)), ''
        except Exception as e:
            return (torch.zeros(3, self.size, self.size, dtype=torch.uint8),
                    f"{self.paths[i]}: cannot read image ({e})")


# ------------------------------------------------------------------------------------------------
# the backbone and its features

@torch.inference_mode()
def extract_features(backbone: nn.Module, paths: list[str], size: int, split: str = 'images',
                     batch_size: int = 64, num_workers: int = 0, device: str = 'cpu',
                     dtype: str = 'float32', log_interval: int = 10) -> torch.Tensor:
    """L2-normalized global average pools of layer4 for the images in paths: (N, D) float32 on the
    CPU."""
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"--dtype={dtype}: expected float32, bfloat16 or float16")
    loader = torch.utils.data.DataLoader(VocImages(paths, size), batch_size=batch_size,
                                         num_workers=num_workers,
                                         pin_memory=device.startswith('cuda'))
    autocast = torch.autocast(device.split(':')[0], dtype=getattr(torch, dtype),
                              enabled=dtype != 'float32')
    pooled_all, t0 = [], time.time()
    for i, (images, errors) in enumerate(loader):
        bad = [e for e in errors if e]
        if bad:
            raise ValueError(bad[0])
        with autocast:
            # (B, D)
            pooled = backbone(normalize(images.to(device, non_blocking=True)))
        pooled_all.append(nn.functional.normalize(pooled.float(), dim=1).cpu())
        done = sum(len(p) for p in pooled_all)
        if log_interval and ((i + 1) % log_interval == 0 or done == len(paths)):  # 0: quiet
            print(f"{split} {done}/{len(paths)} | {done / (time.time() - t0):.1f} images/s",
                  flush=True)
    return torch.cat(pooled_all)


def load_features(path: str):
    """Arrays of a --save_features file, checked: train_x (N, D), train_y (N, C) in {1,0,-1},
    test_x, test_y."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in ('train_x', 'train_y', 'test_x', 'test_y') if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing} (has {sorted(arrays)})")
    tx, ty, vx, vy = (arrays[k] for k in ('train_x', 'train_y', 'test_x', 'test_y'))
    if not (tx.ndim == ty.ndim == vx.ndim == vy.ndim == 2
            and len(tx) == len(ty) and len(vx) == len(vy)
            and tx.shape[1] == vx.shape[1] and ty.shape[1] == vy.shape[1]):
        raise ValueError(f"{path}: shapes disagree: train_x {tx.shape}, train_y {ty.shape}, test_x "
                         f"{vx.shape}, test_y {vy.shape} (want (N, D), (N, C), (M, D), (M, C))")
    # else the SVMs fail later with an opaque numpy/torch message
    if min(tx.shape + ty.shape + vx.shape) == 0:
        raise ValueError(f"{path}: empty: {len(tx)} train and {len(vx)} test samples, "
                         f"{tx.shape[1]}-d, {ty.shape[1]} classes (need at least one of each)")
    if not (tx.dtype.kind == vx.dtype.kind == 'f' and np.isfinite(tx).all()
            and np.isfinite(vx).all()):
        raise ValueError(f"{path}: train_x and test_x must hold finite floats")
    if not all(y.dtype.kind in 'iu' and np.isin(y, (1, 0, -1)).all() for y in (ty, vy)):
        raise ValueError(f"{path}: train_y and test_y must hold the integers 1, 0, -1 (VOC labels)")
    names = [str(n) for n in arrays.get('class_names', [f'class{c}' for c in range(ty.shape[1])])]
    if len(names) != ty.shape[1]:
        raise ValueError(f"{path}: {len(names)} class_names for {ty.shape[1]} label columns")
    hopeless = [name for c, name in enumerate(names)
                if not ((ty[:, c] == 1).any() and (vy[:, c] == 1).any())]
    if hopeless:  # an AP needs positives: without them it would be a silent 0
        raise ValueError(f"{path}: class {hopeless[0]} has no positive (label 1) in train_y or "
                         f"test_y, so it cannot give an AP")
    return [torch.from_numpy(a) for a in (tx, ty, vx, vy)], names


# ------------------------------------------------------------------------------------------------

def main():
    if rest:
        raise SystemExit(f"error: unexpected arguments {rest} (flags are --key=value)")
    check_device(device)
    for path in (save_features, out_json):  # fail now, not after minutes of feature extraction
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SystemExit(f"error: {path}: its folder does not exist")
    check_outputs({'save_features': save_features, 'out_json': out_json},
                  {'--ckpt': ckpt, '--init': init.partition(':')[2], '--features': features})
    if features:
        if ckpt or init:
            raise SystemExit("error: --features gives the features; drop --ckpt/--init")
        (train_x, train_y, test_x, test_y), class_names = load_features(features)
    else:
        task = read_voc_task(voc_root)
        (train_paths, train_y), (test_paths, test_y) = task['trainval'], task['test']
        class_names = task['classes']
        backbone, arch, size = load_backbone(ckpt, init, visual, image_size, seed,
                                             zero_init_residual)
        backbone = backbone.to(device).eval()
        print(f"{len(train_paths)} trainval and {len(test_paths)} test images, {len(class_names)} "
              f"classes, {arch} at {size}px on {device}")
        loading = dict(batch_size=batch_size, num_workers=num_workers, device=device, dtype=dtype,
                       log_interval=log_interval)
        train_x = extract_features(backbone, train_paths, size, 'trainval', **loading)
        test_x = extract_features(backbone, test_paths, size, 'test', **loading)
        train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
        if save_features:
            arrays = dict(train_x=train_x.numpy(), train_y=train_y.numpy(), test_x=test_x.numpy(),
                          test_y=test_y.numpy(), class_names=np.array(class_names))
            write_atomically(save_features, lambda f: np.savez(f, **arrays))
            print(f"saved features to {save_features}")

    t0, products = time.time(), svm_products_dtype(device, svm_dtype)
    test_ap, best, cv_ap = train_and_test_svms(train_x.to(device, torch.float32),
                                               train_y.to(device), test_x.to(device, torch.float32),
                                               test_y.to(device), cg_dtype=products)
    print(f"SVMs: {len(class_names)} classes x {len(SVM_COSTS)} costs x {N_FOLDS + 1} fits in "
          f"{time.time() - t0:.1f}s ({train_x.shape[0]} trainval, {test_x.shape[0]} test, "
          f"{train_x.shape[1]}-d; CG products in {str(products).removeprefix('torch.')})")
    width = max(len(n) for n in class_names)
    print(f"{'class':<{width}}  {'C':>5}  {'cv AP':>6}  {'test AP':>7}")
    for c, name in enumerate(class_names):
        print(f"{name:<{width}}  {SVM_COSTS[best[c]]:>5g}  {100 * cv_ap[c, best[c]]:>6.2f}  "
              f"{100 * test_ap[c]:>7.2f}")
    mean_ap = 100 * float(test_ap.mean())
    if out_json:
        classes = {name: {'ap': 100 * float(test_ap[c]), 'cost': SVM_COSTS[best[c]],
                          'cv_ap': [100 * float(a) for a in cv_ap[c]]}
                   for c, name in enumerate(class_names)}
        result = {'mAP': round(mean_ap, 2), 'classes': classes, 'costs': list(SVM_COSTS),
                  'source': features or ckpt or init}
        write_atomically(out_json, lambda f: f.write(json.dumps(result, indent=1).encode()))
    print(f"mAP: {mean_ap:.2f}")


if __name__ == '__main__':
    with one_line_errors():
        main()

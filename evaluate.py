"""
Judge a frozen backbone the VirTex way: linear SVMs on its pooled features of PASCAL VOC 2007.

  this project's checkpoint:  python evaluate.py --voc_root=data/shapes/VOC2007 --ckpt=out/ckpt.pt
  no pretraining (baseline):  python evaluate.py --voc_root=PATH/VOC2007 --init=random \
                                  --visual=resnet50
  other weights (or virtex:, moco:, vissl:):
                              python evaluate.py --voc_root=PATH/VOC2007 --init=torchvision:PATH
  SVMs only, saved features:  python evaluate.py --features=feats.npz

Reads <voc_root>/ImageSets/Main/*_{trainval,test}.txt and JPEGImages/. Features are the layer4
global average pool (2048-d for ResNet-50), L2-normalized; then the paper's 320 linear SVMs
(svm.py). Prints progress, a per-class table and, last, `mAP: xx.xx`. The protocol copies alone:
this file, svm.py and configurator.py (checkpoints.py reads weight files, safety.py writes outputs:
each is imported only when asked for). It owns the eval transform every stage shares, and voc_map:
this protocol inside a train.py run.
"""
import contextlib
import glob
import json
import math
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image

from configurator import DEVICE, NON_NEGATIVE, POSITIVE, configure

VOC_ROOT = 'data/shapes/VOC2007'  # the shapes world's (data/shapes/prepare.py)
# ----------------------------------------------------------------------------------------------
voc_root = VOC_ROOT     # has ImageSets/Main/<class>_{trainval,test}.txt and JPEGImages/
ckpt = ''               # this project's checkpoint (train.py); its backbone is evaluated
init = ''               # or: random | torchvision:PATH | virtex:PATH | moco:PATH | vissl:PATH
visual = 'resnet50'     # torchvision ResNet for --init=random|torchvision:... (a checkpoint knows)
image_size: NON_NEGATIVE = 0  # crop size; 0: the checkpoint's training image_size, else 224 (paper)
batch_size: POSITIVE = 64  # images per forward pass (upstream: 128)
num_workers: NON_NEGATIVE = min(4, os.cpu_count() or 1)  # DataLoader processes decoding JPEGs
log_interval: NON_NEGATIVE = 10  # print extraction progress every this many batches (0: never)
device: DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'  # also where the SVMs are solved
dtype: Literal['float32', 'bfloat16', 'float16'] = 'float32'  # extraction's autocast; upstream fp32
svm_dtype: Literal['auto', 'float32', 'bfloat16'] = 'auto'  # the SVM solver's CG products (svm.py)
features = ''           # an .npz from --save_features: skip the images, train and test SVMs only
save_features = ''      # write the features here (.npz: train_x, train_y, test_x, test_y, ...)
out_json = ''           # also write the per-class table and mAP here
seed = 1337             # seeds --init=random
zero_init_residual = True  # --init=random: the init a train.py run starts from (its own setting)
# ----------------------------------------------------------------------------------------------

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
    'test': (paths, labels), 'classes': class names, 'summary': its folder, classes and sizes}."""
    train_paths, train_labels, classes = read_voc(root, 'trainval')
    test_paths, test_labels, test_classes = read_voc(root, 'test')
    if test_classes != classes:
        raise ValueError(f"{root}: test classes {test_classes} differ from trainval classes "
                         f"{classes}")
    return {'trainval': (train_paths, train_labels), 'test': (test_paths, test_labels),
            'classes': classes, 'summary': {'root': os.path.abspath(root), 'classes': classes,
                                            'images': [len(train_paths), len(test_paths)]}}


# ------------------------------------------------------------------------------------------------
# the eval transform every stage shares: shorter side to round(S * 8/7) (256 for 224), center crop
# S x S, RGB, then ImageNet's mean and std on the device

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm', '.pgm', '.tif', '.tiff',
                    '.webp')  # PIL reads these


def load_eval_image(path: str, size: int) -> Image.Image:
    """The eval transform of an image file: decoded, shorter side to round(size * 8/7), the center
    size x size, RGB."""
    with Image.open(path) as image:
        return resize_box(image, center_box(*image.size, size), size)


def center_box(width: int, height: int, size: int):
    """The eval transform's crop in source pixels (left, top, right, bottom)."""
    side = min(width, height) * size / round(size * 8 / 7)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def resize_box(image: Image.Image, box, size: int) -> Image.Image:
    """The region `box` (left, top, right, bottom, in pixels of the full image) resized to size x
    size, bilinear. An unloaded JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
    when that still leaves at least `size` pixels across the box: most of the decoding time of a
    large photo is saved. (coco.py's random crops use it too.)"""
    W = image.size[0]
    reduce = min(box[2] - box[0], box[3] - box[1]) / size
    if image.format == 'JPEG' and reduce >= 2:
        drafted = image.draft('RGB', (math.ceil(W / reduce), math.ceil(image.size[1] / reduce)))
        # PIL says by how much: sizes are rounded up, scales are not
        scale = drafted[1][2] / W if drafted else 1.0
        box = tuple(v * scale for v in box)
    return to_rgb(image).resize((size, size), Image.Resampling.BILINEAR, box=box)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grayscale scaled to 8 bits, transparency onto
    white."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels / 257 if pixels.max() > 255 else pixels
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')  # transparent pixels become white, not black
        image = Image.new('RGB', rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel('A'))
    return image.convert('RGB')


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(3, S, S) uint8 from an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float, ImageNet mean/std normalized, on the pixels' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std


class VocImages(torch.utils.data.Dataset):
    """Image files through the eval transform: item i is ((3, S, S) uint8, '') or, for a file that
    cannot be read, (zeros, the error)."""

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

def random_backbone(visual: str, seed: int, zero_init_residual: bool) -> nn.Module:
    """The torchvision ResNet `visual` at random init (seeded), its forward ending at the global
    average pool: (B, 2048) for ResNet-50. checkpoints.load_backbone fills it with weights."""
    torch.manual_seed(seed)
    try:
        backbone = torchvision.models.get_model(visual, weights=None,
                                                zero_init_residual=zero_init_residual)
    except ValueError:
        raise ValueError(f"--visual={visual}: not a torchvision model name (e.g. "
                         "resnet50)") from None
    backbone.fc = nn.Identity()
    return backbone


def judged_backbone(ckpt: str, init: str, visual: str, image_size: int, seed: int,
                    zero_init_residual: bool) -> tuple[nn.Module, str, int]:
    """The backbone --ckpt or --init names, its torchvision name and the image size to judge it at
    (evaluate.py's and probe.py's flags); a random init needs no file of checkpoints.py's."""
    if ckpt or init != 'random':
        from checkpoints import load_backbone
        return load_backbone(ckpt, init, visual, image_size, seed, zero_init_residual)
    return random_backbone(visual, seed, zero_init_residual), visual, image_size or 224


@torch.inference_mode()
def extract_features(backbone: nn.Module, paths: list[str], size: int, split: str = 'images',
                     batch_size: int = 64, num_workers: int = 0, device: str = 'cpu',
                     dtype: str = 'float32', log_interval: int = 10) -> torch.Tensor:
    """L2-normalized global average pools of layer4 for the images in paths: (N, D) float32 on the
    CPU."""
    loader = torch.utils.data.DataLoader(VocImages(paths, size), batch_size=batch_size,
                                         num_workers=num_workers,
                                         pin_memory=device.startswith('cuda'))
    autocast = precision(device, dtype)[1]
    pooled_all, t0 = [], time.time()
    for i, (images, errors) in enumerate(loader):
        bad = [e for e in errors if e]
        if bad:
            raise ValueError(bad[0])
        with autocast:
            pooled = backbone(normalize(images.to(device, non_blocking=True)))  # (B, D)
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
        if 'pickled' in str(e) or isinstance(e, (AttributeError, TypeError)):  # text, an .npy
            raise ValueError(f"{path}: cannot be read: not an .npz file (the zip of arrays that "
                             "--save_features writes)") from None
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
# precision

def native_bf16(device) -> bool:
    """True where the hardware multiplies bfloat16 natively and torch uses it: CUDA GPUs that
    support it; CPUs with AVX512-BF16 or AMX (Intel Sapphire Rapids, AMD Zen 4 and later) unless
    ATEN_CPU_CAPABILITY=avx2 holds torch to AVX2. Elsewhere oneDNN emulates bf16, slowly."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    capability = getattr(torch._C._cpu, '_get_cpu_capability', dict)()
    return bool(capability.get('avx512_bf16') or capability.get('amx_bf16')) and \
        torch.backends.cpu.get_cpu_capability().startswith('AVX512')


def precision(device, dtype: str):
    """(dtype, its autocast context) for 'float32', 'bfloat16', 'float16' or 'auto': bfloat16
    where the hardware multiplies it natively, else float16 on GPUs (it needs a gradient scaler to
    train) and float32 on CPUs. Also a warning, or '', where the CPU only emulates the dtype."""
    kind = torch.device(device).type
    if dtype == 'auto':
        dtype = 'bfloat16' if native_bf16(device) else 'float16' if kind == 'cuda' else 'float32'
    warning = ''
    if kind == 'cpu' and (dtype == 'float16' or dtype == 'bfloat16' and not native_bf16(device)):
        warning = (f"warning: --dtype={dtype} is emulated on this CPU, slower than float32 "
                   "(float16 ~25x on the development machine); use float32, or bfloat16 where the "
                   "CPU has it")
    autocast = contextlib.nullcontext() if dtype == 'float32' else \
        torch.autocast(kind, dtype=getattr(torch, dtype))
    return dtype, autocast, warning


def svm_products_dtype(device, choice: str = 'auto') -> torch.dtype:
    """The precision of the SVM solver's CG products (svm.fit_svms' cg_dtype). auto: bfloat16 where
    the hardware multiplies it natively (on VOC-like features: the same costs, the same APs within
    0.011, in a quarter of float32's GEMM time on AMX), else float32."""
    if choice not in ('auto', 'float32', 'bfloat16'):
        raise ValueError(f"--svm_dtype={choice}: expected auto, float32 or bfloat16")
    if choice != 'auto':
        return getattr(torch, choice)
    return torch.bfloat16 if native_bf16(device) else torch.float32


# ------------------------------------------------------------------------------------------------
# the protocol inside a train.py run

def voc_map(it: int, model, voc_root: str, image_size: int, batch_size: int, num_workers: int,
            best: dict):
    """The backbone's VOC07 mAP at iteration `it` of a run: pooled features of trainval and test
    with the eval transform (under torchrun each process extracts its share), then the SVMs on rank
    0. Returns (mAP, a line to print, a record for the log), where `best` ({'map', 'iter'}, the
    best so far) is beaten or kept; (None, None, None) on the other processes. A failure is a
    ValueError on every process, so that the run saves before it stops."""
    from svm import train_and_test_svms
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


# ------------------------------------------------------------------------------------------------

def main():
    # svm.py where SVMs are solved: the reader and the transform above load without it
    from svm import N_FOLDS, SVM_COSTS, train_and_test_svms
    for path in (save_features, out_json):  # fail now, not after minutes of feature extraction
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{path}: its folder does not exist")
    if save_features or out_json:
        from safety import check_outputs, write_atomically
        check_outputs({'save_features': save_features, 'out_json': out_json},
                      {'--ckpt': ckpt, '--init': init.partition(':')[2], '--features': features,
                       '--voc_root': '' if features else voc_root})
    if features:
        given = [flag for flag, value in (('--ckpt', ckpt), ('--init', init),
                                          ('--save_features', save_features),
                                          ('--voc_root', voc_root != VOC_ROOT)) if value]
        if given:
            raise ValueError(f"--features gives the features: drop {', '.join(given)}")
        (train_x, train_y, test_x, test_y), class_names = load_features(features)
    else:
        task = read_voc_task(voc_root)
        (train_paths, train_y), (test_paths, test_y) = task['trainval'], task['test']
        class_names = task['classes']
        backbone, arch, size = judged_backbone(ckpt, init, visual, image_size, seed,
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
    configure(globals())
    try:
        main()
    except (ValueError, OSError) as e:  # they name the file: one line, not a traceback
        raise SystemExit(f"error: {e}") from None

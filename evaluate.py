"""
Judge a frozen visual backbone the VirTex way: linear SVMs on its pooled features of
PASCAL VOC 2007.

  this project's checkpoint:  python evaluate.py --voc_root=data/shapes/VOC2007 --ckpt=out/ckpt.pt
  no pretraining (baseline):  python evaluate.py --voc_root=PATH/VOC2007 --init=random --visual=resnet50
  other weights:              python evaluate.py --voc_root=PATH/VOC2007 --init=torchvision:PATH (or virtex:, moco:)
  SVMs only, saved features:  python evaluate.py --features=feats.npz

Reads <voc_root>/ImageSets/Main/*_{trainval,test}.txt and JPEGImages/. Features are the layer4
global average pool (2048-d for ResNet-50), L2-normalized. Per class one linear SVM (squared hinge,
L2 penalty, class weight 2 for positives), its cost C picked from {0.01, 0.1, 1, 10} by 3-fold
cross-validated AP on trainval, refit on trainval, AP on test without the difficult images. These
are the paper's scikit-learn LinearSVC problems, all 320 solved at once in torch (fit_svms);
dev/compare_svm.py checks them against LinearSVC.
Prints progress, a per-class table and, last, `mAP: xx.xx`; --save_features and --out_json
write files.
Measured, SVMs only, VOC07-sized features (5011/4952 x 2048, 20 classes), 2 CPU cores, torch 2.14,
1 run each:
2.4s on 2 threads with bfloat16 CG products (3.0s in float32) vs 180s for LinearSVC as upstream runs
it (2 processes); on the hard set of dev/compare_svm.py 3.4s vs 56.8s; the same mAP within 0.01.
"""
import glob
import json
import math
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from checkpoints import load_backbone
from coco import load_eval_image, normalize, to_uint8_tensor
from configurator import NON_NEGATIVE, POSITIVE, check_outputs, write_atomically
from model import check_device, native_bf16

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
SVM_COSTS = (0.01, 0.1, 1.0, 10.0)   # upstream's grid for C
POSITIVE_WEIGHT = 2.0                # upstream class_weight={1: 2, -1: 1}
N_FOLDS = 3                          # upstream cross_val_score(cv=3)


# ------------------------------------------------------------------------------------------------
# the SVMs: self-contained, torch only

def svm_basis(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eigenbasis fit_svms solves in, for features x (n, D): V (D+1, D+1), z = [x 1] V and z * z
    (n, D+1).

    Pooled ReLU features share a big mean direction and are highly correlated, so the Hessian
    I + 2 X^T diag(cost) X is badly conditioned. In the eigenbasis of X^T X it is nearly diagonal,
    and the objective does not change under a rotation of (w, b) because the bias is penalized too:
    fit_svms solves for u = V^T (w, b) on the rotated features z, with the Hessian's diagonal as the
    CG preconditioner.
    """
    # (n, D+1) the bias as a feature, as liblinear
    xb = torch.cat([x, x.new_ones(len(x), 1)], 1)
    threads = torch.get_num_threads()
    # LAPACK's eigh waits at many barriers: 0.6s on 1 core, up to 30s on 2 busy cores
    torch.set_num_threads(1)
    _, V = torch.linalg.eigh(xb.T @ xb)                          # (D+1, D+1)
    torch.set_num_threads(threads)
    z = xb @ V
    return V, z, z * z


def fit_svms(x: torch.Tensor, y: torch.Tensor, cost: torch.Tensor, tol: float = 1e-4,
             max_newton: int = 50, max_cg: int = 100,
             cg_dtype: torch.dtype = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve P linear SVMs on the same features at once; return weights (D, P) and biases (P,).

    x (n, D) features; y (n, P) labels +-1; cost (n, P) per-sample cost C * class weight (0 leaves a
    sample out).
    Problem p minimizes, like liblinear's L2-loss SVC primal that sklearn's LinearSVC calls (its
    intercept is a constant feature 1 whose weight is penalized like the others),
        0.5 * (|w|^2 + b^2) + sum_i cost_ip * max(0, 1 - y_ip * (w.x_i + b))^2
    by truncated Newton: each Newton direction comes from preconditioned conjugate gradients, then
    an exact line search. Stops when |gradient| <= tol * |gradient at 0| for every problem.
    (VOC07-sized: 6 Newton and ~30 CG steps in all; with the diagonal in the original basis,
    hundreds of CG steps) cg_dtype (default x's) is the precision of the CG's Hessian products, most
    of the time: bfloat16 only bends each Newton direction a little, while the gradient, the line
    search and the stopping test stay in x's dtype.
    """
    n, D = x.shape
    V, z, z2 = svm_basis(x)
    # (n, D+1) what the CG's products read
    z_cg = z.to(cg_dtype or x.dtype)
    tiny = torch.finfo(x.dtype).tiny
    u = x.new_zeros(D + 1, y.shape[1])                           # (D+1, P)
    margin = x.new_zeros(y.shape)                                # (n, P) z @ u, kept up to date
    gnorm0 = (2 * z.T @ (cost * y)).norm(dim=0)                  # (P,) gradient norm at u = 0
    todo = torch.arange(y.shape[1], device=x.device)             # problems not yet converged
    for _ in range(max_newton):
        yt, ct, ut, mt = y[:, todo], cost[:, todo], u[:, todo], margin[:, todo]
        # (n, p) cost of the samples inside the margin
        active = ct * (yt * mt < 1)
        grad = ut + 2 * z.T @ (active * (mt - yt))               # (D+1, p)
        gnorm = grad.norm(dim=0)
        left = gnorm > tol * gnorm0[todo]
        # drop converged problems from the batch
        if not left.all():
            todo, yt, ct, ut, mt, active, grad, gnorm = (todo[left], yt[:, left], ct[:, left],
                                                         ut[:, left], mt[:, left], active[:, left],
                                                         grad[:, left], gnorm[left])
        if len(todo) == 0:
            break
        # Newton direction d: solve (I + 2 Z^T diag(active) Z) d = -grad loosely (truncated Newton);
        # all problems share Z, so each CG step is two GEMMs against the (D+1, k) matrix of the
        # directions still being refined: a problem leaves the CG as soon as its residual is small
        # enough (the first time, as liblinear's per-problem CG), which on hard features removes
        # most of the columns after a few steps
        # (D+1, p) inverse of the Hessian's diagonal
        precond = 1 / (1 + 2 * z2.T @ active)
        active_cg = active.to(z_cg.dtype)
        cg_tol = torch.clamp(torch.sqrt(gnorm / gnorm0[todo]), max=0.1) * gnorm
        # direction so far, residual -grad - H d
        d, r = torch.zeros_like(grad), -grad
        p = r * precond
        rs = (r * p).sum(0)
        live = torch.arange(len(todo), device=x.device)           # columns whose CG goes on
        for _ in range(max_cg):
            p_live = p[:, live]
            # (D+1, k) H p
            hp = p_live + 2 * (z_cg.T @ (active_cg[:, live]
                                         * (z_cg @ p_live.to(z_cg.dtype)))).to(x.dtype)
            # 0 for a column whose residual is 0
            alpha = rs[live] / (p_live * hp).sum(0).clamp(min=tiny)
            d[:, live] += alpha * p_live
            r_live = r[:, live] - alpha * hp
            r[:, live] = r_live
            going = r_live.norm(dim=0) > cg_tol[live]
            if not going.any():
                break
            live, r_live, p_live = live[going], r_live[:, going], p_live[:, going]
            s_live = r_live * precond[:, live]
            rs_live = (r_live * s_live).sum(0)
            p[:, live] = s_live + (rs_live / rs[live].clamp(min=tiny)) * p_live
            rs[live] = rs_live
        # exact line search: along d the objective is a piecewise quadratic of the step t, its slope
        # f'(t) = u.d + t d.d - 2 sum_i cost_i yq_i max(0, 1 - y_i m_i - t yq_i) is increasing and
        # piecewise linear, so Newton's method on f' (kept inside a bracket) lands on its root in a
        # few steps
        # (n, p) change of the margins per unit step
        dz = z @ d
        slack, yq = 1 - yt * mt, yt * dz
        ud, dd = (ut * d).sum(0), (d * d).sum(0)
        t, lo, hi = torch.ones_like(ud), torch.zeros_like(ud), torch.full_like(ud, math.inf)
        for _ in range(20):
            viol = torch.clamp(slack - t * yq, min=0)
            slope = ud + t * dd - 2 * (ct * yq * viol).sum(0)
            curv = (dd + 2 * (ct * yq * yq * (viol > 0)).sum(0)).clamp(min=tiny)
            lo, hi = torch.where(slope < 0, t, lo), torch.where(slope < 0, hi, t)
            t_new = t - slope / curv
            t_new = torch.where((t_new < lo) | (t_new > hi), (lo + hi) / 2, t_new)
            done = ((t_new - t).abs() <= 1e-6 * t).all()
            t = t_new
            if done:
                break
        u[:, todo] = ut + t * d
        margin[:, todo] = mt + t * dz
    else:
        print(f"warning: fit_svms: {len(todo)} of {y.shape[1]} SVMs still above tol after "
              f"{max_newton} Newton steps")
    # (D+1, P) back to the feature basis
    wb = V @ u
    return wb[:-1], wb[-1]


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """sklearn's average_precision_score: sum over distinct score thresholds of (R_n - R_{n-1}) *
    P_n.

    Tied scores form one threshold (no tie-breaking by order); labels > 0 are positives; no
    positives gives 0.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positive = scores[order], (labels[order] > 0).double()
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    # true positives with score >= each threshold
    tp = torch.cumsum(positive, 0)[last_of_tie]
    # all samples with score >= each threshold
    n_above = torch.nonzero(last_of_tie).squeeze(1) + 1
    if len(tp) == 0 or tp[-1] == 0:
        return 0.0
    recall = tp / tp[-1]
    return float(((recall - torch.cat([recall.new_zeros(1), recall[:-1]])) * tp / n_above).sum())


def stratified_folds(labels: np.ndarray, n_folds: int = N_FOLDS) -> np.ndarray:
    """Fold of each sample, as sklearn's StratifiedKFold(n_folds) without shuffling (sklearn >=
    0.22).

    Each label's samples, in order, fill folds 0, 1, 2 in blocks; block sizes come from dealing the
    label-sorted samples (labels ordered by first appearance) round-robin onto the folds.
    """
    folds = np.empty(len(labels), dtype=np.int64)
    values, first = np.unique(labels, return_index=True)
    start = 0
    for value in values[np.argsort(first)]:
        members = np.flatnonzero(labels == value)
        sizes = np.bincount(np.arange(start, start + len(members)) % n_folds, minlength=n_folds)
        folds[members] = np.repeat(np.arange(n_folds), sizes)
        start += len(members)
    return folds


def svm_products_dtype(device, choice: str = 'auto') -> torch.dtype:
    """The precision of fit_svms' CG products. auto: bfloat16 where the hardware multiplies it
    natively (model.native_bf16; its GEMMs ran 3.8x faster than float32 on the development machine's
    AMX), else float32.
    On VOC-like features it changed no chosen cost and no class AP by more than 0.011."""
    if choice not in ('auto', 'float32', 'bfloat16'):
        raise ValueError(f"--svm_dtype={choice}: expected auto, float32 or bfloat16")
    if choice != 'auto':
        return getattr(torch, choice)
    return torch.bfloat16 if native_bf16(device) else torch.float32


def train_and_test_svms(train_x, train_y, test_x, test_y, costs=SVM_COSTS, cg_dtype=None):
    """Upstream's protocol for VOC labels (N, C) in {1, -1, 0}: returns test AP (C,), index of the
    chosen cost (C,) and the cross-validated AP (C, K) of every cost.

    Difficult (0) is negative in training and in the CV folds, and left out of the test AP.
    """
    n, C = train_y.shape
    K, device = len(costs), train_x.device
    y = torch.where(train_y == 1, 1.0, -1.0).to(train_x.dtype)                     # (n, C)
    weight = torch.where(train_y == 1, POSITIVE_WEIGHT, 1.0).to(train_x.dtype)     # (n, C)
    folds = torch.from_numpy(
        np.stack([stratified_folds(y[:, c].cpu().numpy()) for c in range(C)], 1)).to(device)
    # one problem per (split, class, cost): splits 0..2 leave out one CV fold (cost 0), split 3 is
    # the refit on all of trainval. Upstream refits every cost too, so solving all S*C*K = 320
    # together costs one call.
    S = N_FOLDS + 1
    keep = torch.stack([folds != f for f in range(N_FOLDS)]
                       + [torch.ones_like(folds, dtype=torch.bool)])
    # (C*K,) class-major
    cost_grid = torch.tensor(costs, dtype=train_x.dtype, device=device).repeat(C)
    cost = (keep * weight).repeat_interleave(K, 2) * cost_grid                    # (S, n, C*K)
    cost = cost.permute(1, 0, 2).reshape(n, S * C * K)                            # (n, S*C*K)
    # (D, S*C*K), (S*C*K,)
    w, b = fit_svms(train_x, y.repeat_interleave(K, 1).repeat(1, S), cost, cg_dtype=cg_dtype)
    # decision values on trainval
    scores = (train_x @ w + b).view(n, S, C, K)
    cv_ap = torch.zeros(C, K, dtype=torch.float64)
    for f in range(N_FOLDS):
        for c in range(C):
            held_out = folds[:, c] == f
            for k in range(K):
                cv_ap[c, k] += average_precision(scores[held_out, f, c, k],
                                                 y[held_out, c]) / N_FOLDS
    # the first of equal means, like upstream's strict '>' over increasing C
    best = cv_ap.argmax(1)
    classes, costs = torch.arange(C, device=device), best.to(device)
    # (D, C): each class's refit at its chosen cost
    chosen_w = w.view(-1, S, C, K)[:, N_FOLDS, classes, costs]
    chosen_b = b.view(S, C, K)[N_FOLDS, classes, costs]         # (C,)
    test_scores = test_x @ chosen_w + chosen_b                                         # (M, C)
    test_ap = torch.zeros(C)
    for c in range(C):
        judged = test_y[:, c] != 0    # difficult images don't count
        test_ap[c] = average_precision(test_scores[judged, c], test_y[judged, c])
    return test_ap, best, cv_ap


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

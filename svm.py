"""
The SVMs of the paper's VOC07 protocol, all 320 solved at once in torch: per class one linear SVM
(squared hinge, L2 penalty, class weight 2 for positives), its cost C picked from {0.01, 0.1, 1, 10}
by 3-fold cross-validated average precision on trainval, refit on trainval, AP on test without the
difficult images. They are the scikit-learn LinearSVC problems the official code solves one by one;
dev/compare_svm.py and the tests check them against LinearSVC.

    from svm import train_and_test_svms
    test_ap, best_cost, cv_ap = train_and_test_svms(train_x, train_y, test_x, test_y)  # VOC labels

Measured, VOC07-sized features (5011/4952 x 2048, 20 classes), 2 CPU cores, torch 2.14, 1 run each:
2.4s on 2 threads with bfloat16 CG products (3.0s in float32) vs 180s for LinearSVC as upstream runs
it (2 processes); on the hard set of dev/compare_svm.py 3.4s vs 56.8s; the same mAP within 0.01.
Imports numpy and torch only.
"""

import math

import numpy as np
import torch

SVM_COSTS = (0.01, 0.1, 1.0, 10.0)   # upstream's grid for C
POSITIVE_WEIGHT = 2.0                # upstream class_weight={1: 2, -1: 1}
N_FOLDS = 3                          # upstream cross_val_score(cv=3)


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

"""
Dev only, needs scikit-learn (not a project dependency): evaluate.py's batched torch SVMs against
scikit-learn's LinearSVC run the way the official VirTex script runs it (scripts/clf_voc07.py: per
class, C in {0.01, 0.1, 1, 10}, class_weight {1: 2, -1: 1}, squared hinge, L2, max_iter=2000,
default tol 1e-4, cross_val_score(cv=3, 'average_precision'), refit, one process per class through
multiprocessing.Pool), on VOC07-sized features.

  # synthetic VOC-like features, set A (run from the repo root)
  python -m dev.compare_svm
  # more correlated set; LinearSVC in one process
  python -m dev.compare_svm --synthetic=B --processes=1
  python -m dev.compare_svm --features=feats.npz         # any evaluate.py --save_features file

dual=True is LinearSVC's default up to scikit-learn 1.4 (the paper-era code pinned 0.21.3, upstream
HEAD asks for >= 1.0); dual='auto', the default from 1.5, solves the primal instead when there are
more samples than features. Prints the time and mAP of both solvers, the largest per-class AP
difference and the costs each picked.
Measured (2 CPU cores, torch 2.14, sklearn 1.9.1, 1-2 runs each; the machine was shared, times vary
  by ~2x):
  synthetic A: ours 3.0-3.2s (2 threads), 4.7-4.9s (1); LinearSVC 180s (2 processes), 246s (1);
  dual=auto 89s (2) synthetic B: ours 2.6s (2 threads), 4.0-4.3s (1); LinearSVC 240s (2 processes,
  busy machine) random-init ResNet-50 on data/shapes at 64px (10 classes): ours 1.9s (2 threads);
  LinearSVC 251s (2 processes) mAP equal to 0.01 points on all three, per-class AP within 0.016
  points, the same C for every class.
  synthetic C (hard, quiet machine): ours 5.9s (2 threads), 11.0s (1); LinearSVC 57.6s (2
  processes): 9.7x; mAP 89.06 both, per-class AP within 0.002, the same C for every class.
  The lines above are float32 CG products. With bfloat16 ones (--svm_dtype=auto on this AVX512-BF16
  machine), quiet:
  C: ours 3.4s (2 threads), 5.3s (1); LinearSVC 56.8s in the same run: 16.6x, mAP 89.06 both, the
  same C per class.
  A: 2.4s, B: 2.3s (2 threads), mAP 84.98 and 82.78 as in float32.
"""
import multiprocessing
import time
import warnings

import numpy as np
import torch

from evaluate import load_features
from evaluate import svm_products_dtype
from svm import SVM_COSTS, train_and_test_svms

# -----------------------------------------------------------------------------
# A: mAP 85, mean cosine 0.62, mostly C=1; B: mAP 83, mean cosine 0.71, mostly C=10; C: hard, mAP 89
synthetic = 'A'
features = ''          # an .npz with train_x, train_y, test_x, test_y instead of synthetic features
# LinearSVC processes (upstream: mp.Pool over the classes); 1 runs them in this process
processes = 2
dual = 'True'          # LinearSVC dual: True (sklearn 0.21.3, the paper), False or auto
sklearn = True         # False times only our solver
svm_dtype = 'auto'     # our CG products, as evaluate.py's --svm_dtype
seed = 0
# -----------------------------------------------------------------------------

# positives of each class in VOC07
VOC07_TRAINVAL_COUNTS = [238, 243, 330, 181, 244, 186, 713, 337, 445, 141,
                         # trainval (5011 images)
                         200, 421, 287, 245, 2008, 245, 96, 229, 261, 256]


def features_and_labels(pre, present, difficult):
    """ReLU'd, L2-normalized float32 features and VOC labels (1 present, -1 absent, 0 difficult)."""
    x = np.maximum(pre, 0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.where(present, 1, -1)
    y[difficult] = 0
    return x.astype(np.float32), y


def voc_like_features(seed, n_train=5011, n_test=4952, dim=2048, mean_scale=3.0, signal=0.3,
                      nuisance=1.0, noise=1.0):
    """Stand-in for pooled ResNet features of VOC07: nonnegative (ReLU), L2-normalized, dominated by
    one common direction, with low-rank class directions and low-rank nuisance factors plus noise.
    Multi-label, with VOC07's positive rates (2% to 40%); 10% of the positives are 'difficult'
    (label 0) and show their class weakly."""
    rng = np.random.default_rng(seed)
    n_classes, rank = len(VOC07_TRAINVAL_COUNTS), 32
    rates = np.array(VOC07_TRAINVAL_COUNTS) / 5011
    mean = np.exp(rng.normal(0, 0.5, dim))
    mean /= np.linalg.norm(mean)
    class_dirs = rng.normal(0, 1, (n_classes, dim)) * (rng.random((n_classes, dim)) < 0.3)
    class_dirs /= np.linalg.norm(class_dirs, axis=1, keepdims=True)
    nuisance_dirs = rng.normal(0, 1, (rank, dim))
    nuisance_dirs /= np.linalg.norm(nuisance_dirs, axis=1, keepdims=True)
    class_strength = rng.uniform(0.5, 1.5, n_classes)

    def split(n):
        present = rng.random((n, n_classes)) < rates
        empty = ~present.any(1)  # every VOC image shows at least one class
        present[empty, rng.choice(n_classes, empty.sum(), p=rates / rates.sum())] = True
        difficult = present & (rng.random((n, n_classes)) < 0.1)
        strength = rng.uniform(0.1, 1.0,
                               (n, n_classes)) * class_strength * np.where(difficult, 0.3, 1.0)
        pre = (mean_scale * rng.uniform(0.7, 1.3, (n, 1)) * mean + signal * (present * strength)
               @ class_dirs
               + nuisance * 3 / np.sqrt(rank) * rng.normal(0, 1, (n, rank)) @ nuisance_dirs
               + noise / np.sqrt(dim) * rng.normal(0, 1, (n, dim)))
        return features_and_labels(pre, present, difficult)
    return (*split(n_train), *split(n_test))


def hard_features(seed, n_train=5011, n_test=4952, dim=2048, n_classes=20, strength=0.09, rate=0.1):
    """Harder to separate than voc_like_features: Gaussian noise plus weak class directions, ReLU'd
    and L2-normalized; ~10% positives per class, 3% of the labels difficult. With the default
    strength mAP is ~89."""
    rng = np.random.default_rng(seed)
    class_dirs = rng.normal(0, 1, (n_classes, dim))
    class_dirs /= np.linalg.norm(class_dirs, axis=1, keepdims=True)

    def split(n):
        present = rng.random((n, n_classes)) < rate
        difficult = rng.random((n, n_classes)) < 0.03
        pre = rng.normal(0, 1, (n, dim)) / np.sqrt(dim) + strength * present @ class_dirs
        return features_and_labels(pre, present, difficult)
    return (*split(n_train), *split(n_test))


def linear_svc_one_class(args):
    """One class, as upstream's train_test_single_svm: returns (test AP, chosen cost, seconds,
    convergence warnings)."""
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import cross_val_score
    from sklearn.svm import LinearSVC
    train_x, train_y, test_x, test_y, dual = args
    y = np.where(train_y == 1, 1, -1)  # difficult (0) is a negative in training
    t0, best_ap, best_clf, best_cost = time.time(), 0.0, None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for cost in SVM_COSTS:
            clf = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, penalty='l2', loss='squared_hinge',
                            max_iter=2000, dual=dual)
            cv_ap = cross_val_score(clf, train_x, y, cv=3, scoring='average_precision').mean()
            clf.fit(train_x, y)
            if cv_ap > best_ap:
                best_ap, best_clf, best_cost = cv_ap, clf, cost
    n_unconverged = sum('converge' in str(w.message) for w in caught)
    judged = test_y != 0
    ap = average_precision_score(test_y[judged] > 0, best_clf.decision_function(test_x[judged]))
    return ap, best_cost, time.time() - t0, n_unconverged


if __name__ == '__main__':
    from configurator import configure
    configure(globals())
    if features:
        (train_x, train_y, test_x, test_y), class_names = load_features(features)
        train_x, train_y, test_x, test_y = (a.numpy() for a in (train_x, train_y, test_x, test_y))
        name = features
    else:
        if synthetic == 'C':
            train_x, train_y, test_x, test_y = hard_features(seed)
        else:
            settings = {'A': dict(), 'B': dict(mean_scale=6.0, nuisance=1.5)}[synthetic]
            train_x, train_y, test_x, test_y = voc_like_features(seed, **settings)
        class_names, name = [f'class{c}'
                             for c in range(train_y.shape[1])], (f'synthetic {synthetic} '
                                                                 f'(seed {seed})')
    xb = torch.cat([torch.from_numpy(train_x).double(),
                    torch.ones(len(train_x), 1, dtype=torch.double)], 1)
    cos = (xb[:, :-1] @ xb[:, :-1].T).mean().item()
    # the spectrum the solvers face (liblinear's bias feature included)
    eig = torch.linalg.eigvalsh(xb.T @ xb)
    print(f"features: {name}: trainval {train_x.shape}, test {test_x.shape}, mean cosine "
          f"{cos:.2f}, eigenvalues of [X 1]^T [X 1] from {eig[0]:.2e} to {eig[-1]:.2e}")
    args = [torch.from_numpy(a) for a in (train_x, train_y, test_x, test_y)]
    products = svm_products_dtype('cpu', svm_dtype)
    train_and_test_svms(*(a[:500] for a in args), cg_dtype=products)  # warm-up, untimed
    t_ours = {}
    # 1 thread is the fair match for one LinearSVC process
    for n_threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(n_threads)
        t0 = time.time()
        ours_ap, ours_best, _ = train_and_test_svms(*args, cg_dtype=products)
        t_ours[n_threads] = time.time() - t0
        print(f"ours:      mAP {100 * ours_ap.mean():.2f} in {t_ours[n_threads]:.1f}s ({n_threads} "
              f"torch threads, CG products in {str(products).removeprefix('torch.')})")
    if sklearn:
        jobs = [(train_x, train_y[:, c], test_x, test_y[:, c],
                 {'True': True, 'False': False}.get(dual, dual))
                for c in range(train_y.shape[1])]
        t0 = time.time()
        if processes > 1:
            with multiprocessing.Pool(processes) as pool:
                results = pool.map(linear_svc_one_class, jobs)
        else:
            results = [linear_svc_one_class(job) for job in jobs]
        t_sk = time.time() - t0
        sk_ap = np.array([r[0] for r in results])
        diff = 100 * np.abs(sk_ap - ours_ap.numpy())
        print(f"LinearSVC: mAP {100 * sk_ap.mean():.2f} in {t_sk:.1f}s ({processes} processes, "
              f"dual={dual}; {sum(r[3] for r in results)} of {len(jobs) * len(SVM_COSTS) * 4} fits "
              f"hit max_iter; per-class seconds summed {sum(r[2] for r in results):.1f})")
        n_threads = min(processes, max(t_ours))
        print(f"speedup {t_sk / t_ours[n_threads]:.1f}x (vs ours on {n_threads} threads) | mAP "
              f"difference {100 * (ours_ap.mean() - sk_ap.mean()):+.3f} | largest per-class AP "
              f"difference {diff.max():.3f} ({class_names[diff.argmax()]})")
        print("costs (ours/LinearSVC):",
              ' '.join(f"{SVM_COSTS[b]:g}/{r[1]:g}" for b, r in zip(ours_best, results)))

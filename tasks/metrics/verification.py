"""Face-verification metrics with the insightface protocol (``eval/verification.py``): LFW, CFP-FP, AgeDB-30.

Protocol, for pairs ``(a, b)`` with labels ``issame`` in dataset order:

* The caller computes each image's embedding (insightface: the sum of the embeddings of the image
  and of its horizontal flip); both embeddings of a pair are L2-normalized and the distance is the
  squared L2 distance ``‖â − b̂‖²`` in ``[0, 4]``, in float64.
* Accuracy: 10-fold cross-validation over the pairs in dataset order, folds contiguous and sized as
  sklearn's ``KFold(n_splits=10, shuffle=False)`` (the first ``n % k`` folds hold ``n // k + 1``
  pairs, the others ``n // k``). A pair is predicted "same" iff ``dist < t``; for each fold the
  threshold ``t`` in ``np.arange(0, 4, 0.01)`` with the best accuracy on the other folds is kept
  (ties → the first, as ``np.argmax``) and the accuracy ``(TP + TN) / n`` on the held-out fold is
  recorded. Reported: the mean and the std (``ddof=0``) over folds, and the mean chosen threshold.
  With fewer pairs than folds, one fold per pair (leave-one-out); with fewer than 2 pairs, NaN.
* TAR@FAR (not in insightface's LFW code, but the usual companion): over all pairs, on the exact
  ROC of the actual distance values. Operating point ``j`` accepts every pair whose distance is
  among the ``j`` smallest distinct values (``j = 0`` accepts nothing), i.e. ``dist < u[j]`` with
  ``u`` the sorted distinct distances — tied pairs are always accepted or rejected together. The
  TAR reported is the largest TAR over points whose FAR ``FP / #different`` is ≤ the target; the
  threshold reported is that of the loosest such point, ``u[j]`` (``nextafter(u[-1], inf)`` when
  every pair is accepted), so that ``dist < threshold`` reproduces it exactly.
* ROC AUC: the Mann-Whitney statistic, P(a random same pair has a smaller distance than a random
  different pair), ties counted 1/2, from exact integer counts.
  TAR and AUC are NaN (with a warning) when either class is absent.
"""
from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn
from torchmetrics.utilities.distributed import gather_all_tensors

__all__ = [
    "DEFAULT_THRESHOLDS",
    "FaceVerification",
    "far_key",
    "kfold_accuracy",
    "kfold_test_slices",
    "pair_distances",
    "roc_auc",
    "tar_at_far",
]

ArrayLike = np.ndarray | Tensor | Sequence[float]

#: insightface's threshold grid: 400 values 0.00, 0.01, …, 3.99.
DEFAULT_THRESHOLDS: np.ndarray = np.arange(0, 4, 0.01)


# --------------------------------------------------------------------------- input checks
def _to_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _check_pairs(distances: ArrayLike, issame: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` float64 distances and ``(N,)`` bool labels, or a ValueError naming the argument."""
    d = _to_numpy(distances)
    s = _to_numpy(issame)
    if d.ndim != 1:
        raise ValueError(f"distances must be 1-D (N,), got shape {d.shape}")
    if s.shape != d.shape:
        raise ValueError(f"issame must have the shape of distances {d.shape}, got {s.shape}")
    if s.dtype != np.bool_:
        if s.size and not np.isin(s, (0, 1)).all():
            raise ValueError("issame must be boolean or hold only 0 and 1")
        s = s.astype(bool)
    d = d.astype(np.float64)
    if not np.isfinite(d).all():
        raise ValueError(f"distances contain {int((~np.isfinite(d)).sum())} NaN/Inf value(s)")
    return d, s


def _warn(message: str) -> None:
    # rank_zero_warn: under DDP every rank computes the same thing; say it once.
    rank_zero_warn(message, category=UserWarning)


# --------------------------------------------------------------------------- pure functions
def pair_distances(emb_a: Tensor, emb_b: Tensor) -> Tensor:
    """Squared L2 distance ``(N,)`` float64 between the L2-normalized rows of ``emb_a`` and ``emb_b`` (N, D)."""
    if emb_a.ndim != 2:
        raise ValueError(f"emb_a must be (N, D), got shape {tuple(emb_a.shape)}")
    if emb_b.shape != emb_a.shape:
        raise ValueError(f"emb_b shape {tuple(emb_b.shape)} differs from emb_a shape {tuple(emb_a.shape)}")
    # Normalize in float64: the threshold grid is 0.01 wide, float16/32 rounding could cross it.
    a = F.normalize(emb_a.detach().to(torch.float64), dim=1)
    b = F.normalize(emb_b.detach().to(torch.float64), dim=1)
    return (a - b).square().sum(1)  # insightface's np.sum(np.square(e1 - e2), 1)


def kfold_test_slices(n: int, n_folds: int) -> list[slice]:
    """Held-out fold of each split of ``KFold(n_folds, shuffle=False)`` over ``n`` items, as slices."""
    if not 1 <= n_folds <= n:
        raise ValueError(f"n_folds must be in [1, n={n}], got {n_folds}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1  # sklearn: the first n % k folds are one larger
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _correct_counts(d: np.ndarray, s: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``(T,)`` int64: for each threshold, #(same with d < t) + #(different with d >= t)."""
    same = np.sort(d[s])
    diff = np.sort(d[~s])
    # searchsorted(side="left") counts values strictly below t: exactly np.less(d, t).
    return np.searchsorted(same, thresholds, "left") + (diff.size - np.searchsorted(diff, thresholds, "left"))


def _kfold(d: np.ndarray, s: np.ndarray, n_folds: int, thresholds: np.ndarray) -> tuple[float, float, np.ndarray]:
    n = d.size
    if n < 2:
        return float("nan"), float("nan"), np.empty(0)
    folds = kfold_test_slices(n, min(n_folds, n))
    # Integer counts: train = all − held-out, so each fold costs O(n/k log + T log) and ties stay exact.
    test_correct = np.stack([_correct_counts(d[f], s[f], thresholds) for f in folds])  # (K, T)
    train_correct = test_correct.sum(0, keepdims=True) - test_correct
    # argmax on counts = argmax on accuracies (one denominator per fold), first on ties.
    best = train_correct.argmax(1)
    acc = np.array([test_correct[k, best[k]] / (f.stop - f.start) for k, f in enumerate(folds)])
    return float(np.mean(acc)), float(np.std(acc)), thresholds[best]


def kfold_accuracy(
    distances: ArrayLike,
    issame: ArrayLike,
    n_folds: int = 10,
    thresholds: ArrayLike | None = None,
) -> tuple[float, float, np.ndarray]:
    """insightface's cross-validated verification accuracy.

    Args:
        distances: ``(N,)`` pair distances, in dataset order (the folds are contiguous in it).
        issame: ``(N,)`` bool (or 0/1) labels.
        n_folds: number of folds; ``min(n_folds, N)`` are used (leave-one-out below ``n_folds`` pairs).
        thresholds: ``(T,)`` candidate thresholds, "same" iff ``dist < t``; default ``np.arange(0, 4, 0.01)``.

    Returns:
        ``(mean, std, best)``: mean and std (ddof=0) of the held-out accuracies and the ``(K,)``
        threshold chosen per fold (``K`` = folds used). Fewer than 2 pairs → ``(nan, nan, (0,))``
        with a warning.
    """
    d, s = _check_pairs(distances, issame)
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    t = DEFAULT_THRESHOLDS if thresholds is None else _to_numpy(thresholds).astype(np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D array (T,), got shape {t.shape}")
    if d.size < 2:
        _warn(f"kfold_accuracy: {d.size} pair(s), at least 2 are needed; accuracy is NaN")
    return _kfold(d, s, n_folds, t)


def _tar_at_far(d: np.ndarray, s: np.ndarray, far: float) -> tuple[float, float]:
    n_same, n_diff = int(s.sum()), int((~s).sum())
    if n_same == 0 or n_diff == 0:
        return float("nan"), float("nan")
    order = np.argsort(d, kind="stable")
    d, s = d[order], s[order]
    last = np.flatnonzero(np.diff(d) > 0)  # last pair of each run of equal distances …
    last = np.append(last, d.size - 1)  # … so cutting after it never splits a tie
    tp = np.concatenate([[0], np.cumsum(s)[last]])  # operating points j = 0 … #distinct values
    fp = np.concatenate([[0], np.cumsum(~s)[last]])
    j = int(np.flatnonzero(fp / n_diff <= far)[-1])  # j = 0 (accept nothing) is always feasible
    uniq = d[last]
    threshold = uniq[j] if j < uniq.size else np.nextafter(uniq[-1], np.inf)
    return float(tp[j] / n_same), float(threshold)


def tar_at_far(distances: ArrayLike, issame: ArrayLike, far: float) -> tuple[float, float]:
    """True-accept rate at a false-accept rate ≤ ``far``, on the exact ROC of ``distances`` (N,).

    Returns ``(tar, threshold)``: the largest TAR over operating points with FAR ≤ ``far`` (see the
    module docstring) and the loosest such threshold, with "same" iff ``dist < threshold``.
    ``(nan, nan)`` with a warning when ``issame`` has no same or no different pair.
    """
    d, s = _check_pairs(distances, issame)
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    if s.all() or not s.any():
        _warn(f"tar_at_far: {int(s.sum())} same and {int((~s).sum())} different pairs; TAR is NaN")
    return _tar_at_far(d, s, far)


def _roc_auc(d: np.ndarray, s: np.ndarray) -> float:
    same, diff = np.sort(d[s]), d[~s]
    if same.size == 0 or diff.size == 0:
        return float("nan")
    below = np.searchsorted(same, diff, "left")  # same pairs closer than each different pair
    tied = np.searchsorted(same, diff, "right") - below
    # 2·(wins + ties/2) as an exact integer, one float64 division at the end.
    return float(int((2 * below + tied).sum()) / (2 * same.size * diff.size))


def roc_auc(distances: ArrayLike, issame: ArrayLike) -> float:
    """ROC AUC of the distances ``(N,)`` (smaller = same), ties 1/2 (Mann-Whitney U / (n_same·n_diff)).

    NaN with a warning when ``issame`` has no same or no different pair.
    """
    d, s = _check_pairs(distances, issame)
    if s.all() or not s.any():
        _warn(f"roc_auc: {int(s.sum())} same and {int((~s).sum())} different pairs; AUC is NaN")
    return _roc_auc(d, s)


def far_key(far: float) -> str:
    """Result key of a FAR target: ``1e-3 → "tar@far=1e-3"``, ``0.0015 → "tar@far=1.5e-3"``."""
    # Decimal(repr) keeps the shortest round-trip digits, so 1e-3 is "1e-3", not 1.0000000000000000208e-3.
    text = "0" if far == 0 else format(Decimal(repr(float(far))).normalize(), "e").replace("+", "")
    return f"tar@far={text}"


# --------------------------------------------------------------------------- metric
class FaceVerification(Metric):
    """Accumulates face-verification pairs; ``compute()`` → insightface accuracy, TAR@FAR, ROC AUC.

    ``update(emb_a (N, D), emb_b (N, D), issame (N,), index (N,))``: ``index`` is each pair's
    position in the dataset. ``compute()`` sorts the pairs by it, so the folds follow the dataset
    order whatever the batching or the DDP sharding, and raises a RuntimeError on a repeated index
    (a pair counted twice — e.g. the padding of Lightning's ``DistributedSampler``, or a metric not
    reset between epochs). The folds are contiguous in index order over the pairs present.

    ``compute()`` returns float64 scalars: ``acc``, ``acc_std``, ``threshold`` (mean over folds of
    the chosen threshold), ``far_key(f)`` (``"tar@far=1e-3"``) for each FAR target, ``auc``, ``pairs``
    and ``folds`` (``min(n_folds, pairs)``, 0 when fewer than 2 pairs). Quantities that cannot be
    computed (no pairs, one pair, one class only) are NaN, with a warning.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    # State dtypes, also used to give a rank without data typed empties for the all-gather.
    _STATE_DTYPES = {"index": torch.int64, "distance": torch.float64, "issame": torch.bool}

    index: list[Tensor] | Tensor
    distance: list[Tensor] | Tensor
    issame: list[Tensor] | Tensor

    def __init__(self, n_folds: int = 10, far_targets: Sequence[float] = (1e-3,), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(n_folds) != n_folds or n_folds < 2:
            raise ValueError(f"n_folds must be an integer >= 2, got {n_folds}")
        far_targets = tuple(float(f) for f in far_targets)
        for far in far_targets:
            if not 0.0 <= far <= 1.0:
                raise ValueError(f"far_targets values must be in [0, 1], got {far}")
        keys = [far_key(f) for f in far_targets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"far_targets {far_targets} give repeated result keys {keys}")
        self.n_folds = int(n_folds)
        self.far_targets = far_targets
        for name in self._STATE_DTYPES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, emb_a: Tensor, emb_b: Tensor, issame: Tensor, index: Tensor) -> None:  # type: ignore[override]
        """Add ``N`` pairs: embeddings ``(N, D)`` (normalized here), ``issame`` ``(N,)`` bool, ``index`` ``(N,)`` int."""
        distance = pair_distances(emb_a, emb_b)
        n = emb_a.shape[0]
        issame = torch.as_tensor(issame, device=emb_a.device)
        index = torch.as_tensor(index, device=emb_a.device)
        if issame.shape != (n,):
            raise ValueError(f"issame must be (N,) = ({n},) like emb_a {tuple(emb_a.shape)}, got {tuple(issame.shape)}")
        if index.shape != (n,):
            raise ValueError(f"index must be (N,) = ({n},) like emb_a {tuple(emb_a.shape)}, got {tuple(index.shape)}")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"index must be an integer tensor, got dtype {index.dtype}")
        if issame.dtype != torch.bool:
            if issame.dtype.is_complex or ((issame != 0) & (issame != 1)).any():
                raise ValueError("issame must be boolean or hold only 0 and 1")
            issame = issame != 0
        self.index.append(index.detach().to(torch.int64))
        self.distance.append(distance)
        self.issame.append(issame.detach())

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        # torchmetrics gives a rank that saw no pair an empty tensor of the metric's float dtype; the
        # all-gather needs every rank to send the same dtype, so send typed empties instead.
        for name, dtype in self._STATE_DTYPES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.empty(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group=process_group)

    def _state(self, name: str) -> Tensor:
        """The ``(M,)`` state, whether still a list of batches or already concatenated by a DDP sync."""
        value = getattr(self, name)
        if isinstance(value, list) and not value:
            return torch.empty(0, dtype=self._STATE_DTYPES[name])
        return dim_zero_cat(value).reshape(-1).to(self._STATE_DTYPES[name]).cpu()

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        index, distance, issame = (self._state(name) for name in ("index", "distance", "issame"))
        if not index.numel() == distance.numel() == issame.numel():
            raise RuntimeError(
                f"inconsistent states: {index.numel()} indices, {distance.numel()} distances, {issame.numel()} labels"
            )
        order = torch.argsort(index, stable=True)
        index = index[order]
        repeated = index[1:] == index[:-1]
        if repeated.any():
            first = int(index[1:][repeated][0])
            raise RuntimeError(
                f"pair index {first} was seen {int((index == first).sum())} times ({int(repeated.sum())} repeats in "
                f"all): a pair was counted twice. Under DDP, Lightning's DistributedSampler pads the last batch "
                f"with repeated samples — use a sampler that does not pad — or the metric was not reset between runs."
            )
        d, s = distance[order].numpy(), issame[order].numpy()

        n = d.size
        if not np.isfinite(d).all():
            raise RuntimeError(f"{int((~np.isfinite(d)).sum())} of {n} pair distances are NaN/Inf")
        nan = [name for name, bad in (("accuracy", n < 2), ("TAR and AUC", s.all() or not s.any())) if bad]
        if nan:  # one warning per compute(), not one per quantity
            _warn(f"FaceVerification: {n} pair(s), {int(s.sum())} same; {' and '.join(nan)} NaN "
                  f"(accuracy needs 2 pairs, TAR/AUC both same and different pairs)")
        mean, std, best = _kfold(d, s, self.n_folds, DEFAULT_THRESHOLDS)
        out = {
            "acc": mean,
            "acc_std": std,
            "threshold": float(best.mean()) if best.size else float("nan"),
            **{far_key(far): _tar_at_far(d, s, far)[0] for far in self.far_targets},
            "auc": _roc_auc(d, s),
            "pairs": float(n),
            "folds": float(best.size),
        }
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        return {k: torch.tensor(v, dtype=dtype, device=self.device) for k, v in out.items()}

"""FaceVerification / insightface protocol: against a literal re-implementation of insightface's
``calculate_roc`` (hand-written KFold), brute-force TAR@FAR and AUC, order/sharding invariance, and a
2-process gloo DDP run."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_group

from tasks.metrics.verification import (
    DEFAULT_THRESHOLDS,
    FaceVerification,
    far_key,
    kfold_accuracy,
    kfold_test_slices,
    pair_distances,
    roc_auc,
    tar_at_far,
)

KEYS = {"acc", "acc_std", "threshold", "tar@far=1e-3", "auc", "pairs", "folds"}


# --------------------------------------------------------------------------- data
def make_pairs(n: int, seed: int = 0, dim: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unnormalized ``(n, dim)`` embeddings: 'same' pairs are a + per-pair noise (1×–4×), so the
    classes overlap (accuracy ≈ 0.92, not 0.5 or 1); 'different' pairs are independent."""
    g = np.random.default_rng(seed)
    a = g.standard_normal((n, dim))
    same = g.random(n) < 0.5
    noise = g.uniform(1.0, 4.0, (n, 1))
    b = np.where(same[:, None], a + noise * g.standard_normal((n, dim)), g.standard_normal((n, dim)))
    return a, b, same


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- insightface, literally
def ref_kfold(n: int, n_splits: int):
    """sklearn ``KFold(n_splits, shuffle=False).split(np.arange(n))`` written out."""
    indices = np.arange(n)
    fold_sizes = np.full(n_splits, n // n_splits, dtype=int)
    fold_sizes[: n % n_splits] += 1
    current = 0
    for fold_size in fold_sizes:
        start, stop = current, current + fold_size
        test_mask = np.zeros(n, dtype=bool)
        test_mask[start:stop] = True
        yield indices[~test_mask], indices[test_mask]
        current = stop


def ref_calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def ref_calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    nrof_thresholds = len(thresholds)
    accuracy = np.zeros(nrof_folds)
    best_thresholds = np.zeros(nrof_folds)
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)
    for fold_idx, (train_set, test_set) in enumerate(ref_kfold(nrof_pairs, nrof_folds)):
        acc_train = np.zeros(nrof_thresholds)
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = ref_calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        best_thresholds[fold_idx] = thresholds[best_threshold_index]
        _, _, accuracy[fold_idx] = ref_calculate_accuracy(
            thresholds[best_threshold_index], dist[test_set], actual_issame[test_set]
        )
    return accuracy, best_thresholds


def ref_evaluate(a: np.ndarray, b: np.ndarray, issame: np.ndarray, nrof_folds: int = 10):
    accuracy, best = ref_calculate_roc(np.arange(0, 4, 0.01), normalized(a), normalized(b), issame, nrof_folds)
    return np.mean(accuracy), np.std(accuracy), best


def brute_tar_at_far(d: np.ndarray, s: np.ndarray, far: float) -> float:
    """Max TAR over every threshold t in {distinct distances} ∪ {+inf} ("same" iff d < t) with FAR ≤ far."""
    best = 0.0
    for t in [*np.unique(d), np.inf]:
        accept = d < t
        if accept[~s].sum() / (~s).sum() <= far:
            best = max(best, accept[s].sum() / s.sum())
    return best


def brute_auc(d: np.ndarray, s: np.ndarray) -> float:
    score = 0.0
    for x in d[s]:
        for y in d[~s]:
            score += 1.0 if x < y else 0.5 if x == y else 0.0
    return score / (s.sum() * (~s).sum())


def run_metric(a, b, s, batches=None, **kwargs) -> dict[str, torch.Tensor]:
    """Feed pairs to a FaceVerification, by default in order in batches of 64."""
    metric = FaceVerification(**kwargs)
    n = len(s)
    for idx in batches if batches is not None else np.array_split(np.arange(n), max(1, math.ceil(n / 64))):
        idx = torch.as_tensor(idx, dtype=torch.int64)
        metric.update(torch.as_tensor(a)[idx], torch.as_tensor(b)[idx], torch.as_tensor(s)[idx], idx)
    return metric.compute()


def assert_same_results(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], atol: float = 1e-12) -> None:
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=atol, equal_nan=True, msg=k)


# --------------------------------------------------------------------------- k-fold accuracy
def test_reference_kfold_is_sklearns():
    sizes = [len(test) for _, test in ref_kfold(605, 10)]
    assert sizes == [61] * 5 + [60] * 5
    assert [s.stop - s.start for s in kfold_test_slices(605, 10)] == sizes
    assert kfold_test_slices(605, 10)[5] == slice(305, 365)
    assert len(DEFAULT_THRESHOLDS) == 400 and DEFAULT_THRESHOLDS[-1] == pytest.approx(3.99)


@pytest.mark.parametrize("n", [600, 605])
def test_kfold_accuracy_matches_insightface(n):
    a, b, s = make_pairs(n)
    ref_mean, ref_std, ref_best = ref_evaluate(a, b, s)
    assert 0.85 < ref_mean < 0.97 and ref_std > 0.01  # a non-trivial case
    dist = np.sum(np.square(normalized(a) - normalized(b)), 1)
    mean, std, best = kfold_accuracy(dist, s)
    assert mean == pytest.approx(ref_mean, abs=1e-12)
    assert std == pytest.approx(ref_std, abs=1e-12)
    np.testing.assert_array_equal(best, ref_best)

    out = run_metric(a, b, s)
    assert out.keys() == KEYS
    assert out["acc"].dtype == torch.float64
    assert out["acc"].item() == pytest.approx(ref_mean, abs=1e-12)
    assert out["acc_std"].item() == pytest.approx(ref_std, abs=1e-12)
    assert out["threshold"].item() == pytest.approx(ref_best.mean(), abs=1e-12)
    assert out["pairs"].item() == n and out["folds"].item() == 10
    assert out["auc"].item() == pytest.approx(roc_auc(dist, s), abs=1e-12)
    assert out["tar@far=1e-3"].item() == pytest.approx(tar_at_far(dist, s, 1e-3)[0], abs=1e-12)


def test_kfold_accuracy_other_folds_and_thresholds():
    a, b, s = make_pairs(203, seed=3)
    thresholds = np.linspace(0.5, 3.5, 61)
    accuracy, best = ref_calculate_roc(thresholds, normalized(a), normalized(b), s, nrof_folds=7)
    dist = pair_distances(torch.as_tensor(a), torch.as_tensor(b))
    mean, std, ours = kfold_accuracy(dist, torch.as_tensor(s), n_folds=7, thresholds=thresholds)
    assert (mean, std) == pytest.approx((accuracy.mean(), accuracy.std()), abs=1e-12)
    np.testing.assert_array_equal(ours, best)


def test_ties_pick_the_first_threshold():
    # Every threshold in (0.2, 0.8] separates perfectly: argmax must keep the smallest, 0.21.
    d = np.array([0.1, 0.2, 0.9, 1.0] * 5)
    s = np.array([True, True, False, False] * 5)
    mean, std, best = kfold_accuracy(d, s, n_folds=5)
    assert (mean, std) == (1.0, 0.0)
    np.testing.assert_allclose(best, 0.21, atol=1e-12)


# --------------------------------------------------------------------------- metric behaviour
def test_order_and_sharding_invariance():
    a, b, s = make_pairs(605, seed=1)
    in_order = run_metric(a, b, s)
    g = np.random.default_rng(5)
    perm = g.permutation(605)
    cuts = np.sort(g.choice(np.arange(1, 605), 12, replace=False))
    shuffled = run_metric(a, b, s, batches=np.split(perm, cuts))
    assert_same_results(in_order, shuffled)
    # The check can fail: the same pairs in another dataset order give other folds, another accuracy.
    other_order = run_metric(a[perm], b[perm], s[perm])
    assert other_order["acc"].item() != pytest.approx(in_order["acc"].item(), abs=1e-6)
    assert other_order["auc"].item() == pytest.approx(in_order["auc"].item(), abs=1e-12)


def test_duplicate_index_raises():
    a, b, s = make_pairs(40)
    metric = FaceVerification()
    metric.update(torch.as_tensor(a[:30]), torch.as_tensor(b[:30]), torch.as_tensor(s[:30]), torch.arange(30))
    metric.update(torch.as_tensor(a[29:]), torch.as_tensor(b[29:]), torch.as_tensor(s[29:]), torch.arange(29, 40))
    with pytest.raises(RuntimeError, match="pair index 29 was seen 2 times.*counted twice"):
        metric.compute()


def test_unnormalized_embeddings_equal_normalized():
    a, b, s = make_pairs(300, seed=2)
    scale = np.random.default_rng(9).uniform(0.1, 10.0, (300, 1))
    raw = run_metric(a * scale, b * scale[::-1], s)
    unit = run_metric(normalized(a), normalized(b), s)
    assert_same_results(raw, unit)
    # float32 embeddings give the same float64 distances up to float32 precision
    d32 = pair_distances(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32))
    d64 = pair_distances(torch.as_tensor(a), torch.as_tensor(b))
    assert d32.dtype == torch.float64
    torch.testing.assert_close(d32, d64, rtol=0, atol=1e-5)


def test_concatenated_states_as_after_a_sync():
    # torchmetrics' "cat" reduction leaves tensors, not lists, in the states after a DDP sync.
    a, b, s = make_pairs(200, seed=4)
    metric = FaceVerification()
    for idx in np.array_split(np.arange(200)[::-1].copy(), 5):
        idx = torch.as_tensor(idx)
        metric.update(torch.as_tensor(a)[idx], torch.as_tensor(b)[idx], torch.as_tensor(s)[idx], idx)
    as_lists = metric.compute()
    metric._computed = None
    for name in ("index", "distance", "issame"):
        setattr(metric, name, torch.cat(getattr(metric, name)))
    assert_same_results(as_lists, metric.compute())
    assert as_lists["acc"].item() == pytest.approx(ref_evaluate(a, b, s)[0], abs=1e-12)


def test_perfect_separation():
    g = np.random.default_rng(0)
    a = g.standard_normal((100, 32))
    s = np.arange(100) % 3 == 0
    b = np.where(s[:, None], a + 0.05 * g.standard_normal((100, 32)), -a + 0.05 * g.standard_normal((100, 32)))
    out = run_metric(a, b, s)
    assert out["acc"].item() == 1.0 and out["acc_std"].item() == 0.0
    assert out["auc"].item() == 1.0 and out["tar@far=1e-3"].item() == 1.0
    assert out["threshold"].item() < 0.1  # the first perfect threshold above the largest same distance


def test_update_validates_shapes():
    metric = FaceVerification()
    e = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"emb_a must be \(N, D\), got shape \(4, 8, 1\)"):
        metric.update(e[..., None], e[..., None], torch.ones(4, dtype=torch.bool), torch.arange(4))
    with pytest.raises(ValueError, match=r"emb_b shape \(4, 7\) differs from emb_a shape \(4, 8\)"):
        metric.update(e, e[:, :7], torch.ones(4, dtype=torch.bool), torch.arange(4))
    with pytest.raises(ValueError, match=r"issame must be \(N,\) = \(4,\).*got \(3,\)"):
        metric.update(e, e, torch.ones(3, dtype=torch.bool), torch.arange(4))
    with pytest.raises(ValueError, match=r"index must be \(N,\) = \(4,\).*got \(4, 1\)"):
        metric.update(e, e, torch.ones(4, dtype=torch.bool), torch.arange(4)[:, None])
    with pytest.raises(ValueError, match="index must be an integer tensor"):
        metric.update(e, e, torch.ones(4, dtype=torch.bool), torch.arange(4.0))
    with pytest.raises(ValueError, match="issame must be boolean or hold only 0 and 1"):
        metric.update(e, e, torch.tensor([0, 1, 2, 1]), torch.arange(4))
    with pytest.raises(ValueError, match="n_folds must be an integer >= 2"):
        FaceVerification(n_folds=1)
    with pytest.raises(ValueError, match="repeated result keys"):
        FaceVerification(far_targets=(1e-3, 0.001))
    metric.update(e, e, torch.tensor([1, 1, 0, 1]), torch.arange(4))  # 0/1 integer labels are fine
    assert metric.issame[0].dtype == torch.bool and metric.issame[0].tolist() == [True, True, False, True]


# --------------------------------------------------------------------------- TAR@FAR and AUC
# distances and labels of the hand example; distinct values 0.1 … 1.0, one same/different tie at 0.5.
HAND_D = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.8, 0.9, 1.0])
HAND_S = np.array([1, 1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)  # 5 same, 4 different


@pytest.mark.parametrize(
    "far, tar, threshold",
    [
        (0.0, 2 / 5, 0.3),  # accept 0.1, 0.2; the different pair at 0.3 would be the first false accept
        (0.2, 2 / 5, 0.3),  # 1/4 > 0.2
        (0.25, 3 / 5, 0.5),  # one false accept (0.3); the same pair at 0.5 is tied with a different one
        (0.5, 4 / 5, 0.8),
        (0.75, 1.0, 1.0),
        (1.0, 1.0, np.nextafter(1.0, np.inf)),
    ],
)
def test_tar_at_far_hand_example(far, tar, threshold):
    got_tar, got_threshold = tar_at_far(HAND_D, HAND_S, far)
    assert got_tar == pytest.approx(tar, abs=1e-15)
    assert got_threshold == threshold
    accept = HAND_D < got_threshold  # the threshold reproduces the operating point
    assert accept[HAND_S].mean() == pytest.approx(tar, abs=1e-15)
    assert accept[~HAND_S].mean() <= far


def test_tar_at_far_and_auc_brute_force_with_ties():
    a, b, s = make_pairs(400, seed=6)
    d = np.round(pair_distances(torch.as_tensor(a), torch.as_tensor(b)).numpy(), 1)  # many ties
    assert len(np.unique(d)) < 40
    for far in (0.0, 1e-3, 0.01, 0.1, 0.3):
        assert tar_at_far(d, s, far)[0] == pytest.approx(brute_tar_at_far(d, s, far), abs=1e-15)
    auc = roc_auc(d, s)
    assert auc == pytest.approx(brute_auc(d, s), abs=1e-12)
    assert np.isin(d[s], d[~s]).sum() > 50  # the tie rule matters here
    assert 0.9 < auc < 1.0
    assert roc_auc(HAND_D, HAND_S) == pytest.approx(brute_auc(HAND_D, HAND_S), abs=1e-15)
    assert roc_auc(HAND_D, HAND_S) == pytest.approx(14.5 / 20, abs=1e-15)  # 4 + 4 + 3 + 2.5 (tie) + 1


def test_metric_far_targets_keys():
    a, b, s = make_pairs(300, seed=7)
    out = run_metric(a, b, s, far_targets=(1e-2, 0.1, 0.0015))
    assert set(out) == {"acc", "acc_std", "threshold", "tar@far=1e-2", "tar@far=1e-1", "tar@far=1.5e-3",
                        "auc", "pairs", "folds"}
    dist = pair_distances(torch.as_tensor(a), torch.as_tensor(b)).numpy()
    for far in (1e-2, 0.1, 0.0015):
        assert out[far_key(far)].item() == pytest.approx(brute_tar_at_far(dist, s, far), abs=1e-12)
    assert out["tar@far=1e-2"].item() < out["tar@far=1e-1"].item()
    assert far_key(1e-3) == "tar@far=1e-3" and far_key(0) == "tar@far=0"


# --------------------------------------------------------------------------- small and degenerate sets
def test_one_class_only_gives_nan_auc_with_warning():
    a, b, _ = make_pairs(50)
    s = np.ones(50, dtype=bool)
    with pytest.warns(UserWarning, match="TAR and AUC NaN"):
        out = run_metric(a, b, s)
    assert math.isnan(out["auc"].item()) and math.isnan(out["tar@far=1e-3"].item())
    ref_mean, _, _ = ref_evaluate(a, b, s)
    assert out["acc"].item() == pytest.approx(ref_mean, abs=1e-12) and out["folds"].item() == 10
    with pytest.warns(UserWarning, match="AUC is NaN"):
        assert math.isnan(roc_auc(np.ones(3), np.zeros(3, dtype=bool)))
    with pytest.warns(UserWarning, match="TAR is NaN"):
        assert all(math.isnan(v) for v in tar_at_far(np.ones(3), np.ones(3, dtype=bool), 1e-3))


def test_five_pairs_use_five_folds():
    a, b, s = make_pairs(5, seed=11)
    assert s.any() and not s.all()
    out = run_metric(a, b, s)
    ref_mean, ref_std, ref_best = ref_evaluate(a, b, s, nrof_folds=5)
    assert out["folds"].item() == 5 and out["pairs"].item() == 5
    assert out["acc"].item() == pytest.approx(ref_mean, abs=1e-12)
    assert out["acc_std"].item() == pytest.approx(ref_std, abs=1e-12)
    assert out["threshold"].item() == pytest.approx(ref_best.mean(), abs=1e-12)


def test_one_pair_gives_nan_accuracy():
    a, b, _ = make_pairs(1)
    with pytest.warns(UserWarning, match="accuracy and TAR and AUC NaN"):
        out = run_metric(a, b, np.array([True]))
    assert out["pairs"].item() == 1 and out["folds"].item() == 0
    assert all(math.isnan(out[k].item()) for k in ("acc", "acc_std", "threshold", "auc", "tar@far=1e-3"))
    with pytest.warns(UserWarning, match="at least 2 are needed"):
        mean, std, best = kfold_accuracy(np.array([0.5]), np.array([True]))
    assert math.isnan(mean) and math.isnan(std) and best.shape == (0,)


def test_empty_metric_gives_nan():
    metric = FaceVerification()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = metric.compute()
    assert any("0 pair(s)" in str(w.message) for w in caught)
    assert out.keys() == KEYS
    assert out["pairs"].item() == 0 and out["folds"].item() == 0
    assert all(math.isnan(out[k].item()) for k in ("acc", "acc_std", "threshold", "auc", "tar@far=1e-3"))


# --------------------------------------------------------------------------- DDP (gloo, 2 CPU processes)
N_DDP = 605


def _ddp_shards(world_rank: int) -> list[np.ndarray]:
    """10 uneven batches of a random permutation: rank 0 gets 7, rank 1 gets 3."""
    g = np.random.default_rng(13)
    perm = g.permutation(N_DDP)
    batches = np.split(perm, np.sort(g.choice(np.arange(1, N_DDP), 9, replace=False)))
    return batches[:7] if world_rank == 0 else batches[7:]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        a, b, s = make_pairs(N_DDP, seed=12)
        results: dict[str, object] = {}

        def feed(metric: FaceVerification, batches) -> FaceVerification:
            for idx in batches:
                idx = torch.as_tensor(idx, dtype=torch.int64)
                metric.update(torch.as_tensor(a)[idx], torch.as_tensor(b)[idx], torch.as_tensor(s)[idx], idx)
            return metric

        results["uneven"] = feed(FaceVerification(), _ddp_shards(rank)).compute()
        # a rank that saw no pair at all (fewer pairs than ranks, or an idle rank)
        results["idle_rank"] = feed(FaceVerification(), [np.arange(N_DDP)] if rank == 0 else []).compute()
        # a padding sampler: rank 1 repeats rank 0's last pair
        padded = feed(FaceVerification(), [np.arange(100)] if rank == 0 else [np.arange(99, 150)])
        try:
            padded.compute()
            results["duplicate"] = "no error"
        except RuntimeError as err:
            results["duplicate"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b, s = make_pairs(N_DDP, seed=12)
    single = run_metric(a, b, s)
    assert 0.85 < single["acc"].item() < 0.97
    sizes = [sum(len(x) for x in _ddp_shards(r)) for r in (0, 1)]
    assert sizes[0] != sizes[1] and sum(sizes) == N_DDP
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert_same_results(results["uneven"], single)
        assert_same_results(results["idle_rank"], single)
        assert "pair index 99 was seen 2 times" in results["duplicate"]

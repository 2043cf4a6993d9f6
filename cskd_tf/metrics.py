"""Evaluation metrics as pure functions over numpy arrays (CVPR 2020, section 3.1)."""

import numpy as np
from scipy import special


def top_k_error(logits, labels, k=1):
    """Fraction of examples whose label is not among the `k` largest logits.

    Ties are broken in favour of the lower class index, as `np.argsort` does.

    Args:
      logits: float array `[N, C]` (or probabilities: any monotone score).
      labels: int array `[N]`.
      k: int.

    Returns:
      float in [0, 1].
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    k = min(k, logits.shape[-1])
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    return float(1.0 - np.mean(np.any(top == labels[:, None], axis=-1)))


def negative_log_likelihood(logits, labels):
    """Mean cross-entropy `-log softmax(logits)[label]`, in nats."""
    log_probs = special.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return float(-np.mean(log_probs[np.arange(len(labels)), np.asarray(labels)]))


def classification_metrics(
    logits,
    labels,
    features=None,
    num_bins=20,
    groups=None,
    group_names=None,
    extra_calibration=True,
):
    """What every run reports, as fractions.

    Args:
      logits: float array `[N, C]`.
      labels: int array `[N]`.
      features: optional float array `[N, D]` of pooled penultimate features;
        given, `recall_at_1` is reported too.
      num_bins: int. Bins of `ece` (the paper uses 20); the other calibration
        metrics keep their own, fixed bin counts.
      groups: optional int sequence `[C]`, the coarse group of each fine label
        (`DataSource.groups`); given (and not empty), the hierarchical metrics
        below are reported too.
      group_names: optional sequence of str, the name of each group
        (`DataSource.group_names`), used in the keys; group indices if None or empty.
      extra_calibration: bool. Also report the calibration metrics that other
        papers compare, beside the paper's `ece`: `ece_15`
        (`expected_calibration_error` with 15 bins), `adaptive_ece`
        (`adaptive_calibration_error`, 15 equal-mass bins), `classwise_ece`
        (`classwise_calibration_error`, 15 bins), `mce`
        (`maximum_calibration_error`, 20 bins) and `brier` (`brier_score`).
        The per-epoch `EvaluationCallback` turns them off.

    Returns:
      dict with `top1_error`, `top5_error`, `nll` (nats), `ece`, `aurc`,
      `recall_at_1` (with features), the five above (with extra_calibration;
      `brier` lies in [0, 2], the others in [0, 1]) and `num_examples`. With groups, also
      `hierarchical_accuracy` and, for each group `<g>` with test examples,
      `group_hierarchical_accuracy_<g>` (its row of `hierarchical_confusion`'s
      diagonal, the paper's Figure 4a/b) and `group_top1_error_<g>` (fine-label
      top-1 error over the examples of that true group, Figure 4c).
    """
    probs = special.softmax(np.asarray(logits, np.float64), axis=-1)
    results = {
        "top1_error": top_k_error(logits, labels, 1),
        "top5_error": top_k_error(logits, labels, 5),
        "nll": negative_log_likelihood(logits, labels),
        "ece": expected_calibration_error(probs, labels, num_bins=num_bins),
        "aurc": area_under_risk_coverage(probs, labels),
        "num_examples": int(len(labels)),
    }
    if extra_calibration:
        results.update(
            ece_15=expected_calibration_error(probs, labels, num_bins=15),
            adaptive_ece=adaptive_calibration_error(probs, labels, num_bins=15),
            classwise_ece=classwise_calibration_error(probs, labels, num_bins=15),
            mce=maximum_calibration_error(probs, labels, num_bins=20),
            brier=brier_score(probs, labels),
        )
    if features is not None:
        results["recall_at_1"] = recall_at_k(features, labels, k=1)
    if groups is not None and len(groups):
        results.update(_group_metrics(logits, labels, groups, group_names))
    return results


def _group_metrics(logits, labels, groups, group_names=None):
    """The hierarchical entries of `classification_metrics`."""
    groups = _check_groups(logits, groups)
    labels = np.asarray(labels)
    num_groups = int(groups.max()) + 1
    names = list(group_names) if group_names is not None and len(group_names) else []
    if names and len(names) < num_groups:
        raise ValueError(f"group_names has {len(names)} entries for {num_groups} groups.")
    names = names or [str(g) for g in range(num_groups)]
    true_groups = groups[labels]
    confusion = hierarchical_confusion(logits, labels, groups, num_groups)
    results = {"hierarchical_accuracy": hierarchical_accuracy(logits, labels, groups)}
    for g in range(num_groups):
        members = true_groups == g
        if members.any():  # A group with no test examples has no rate.
            results[f"group_hierarchical_accuracy_{names[g]}"] = float(confusion[g, g])
            results[f"group_top1_error_{names[g]}"] = top_k_error(
                np.asarray(logits)[members], labels[members], 1
            )
    return results


def _check_groups(logits, groups):
    groups = np.asarray(groups, np.int64)
    num_classes = np.shape(logits)[-1]
    if groups.shape != (num_classes,):
        raise ValueError(
            f"groups has shape {groups.shape}; expected one group per class, ({num_classes},)."
        )
    if groups.min() < 0:
        raise ValueError("groups must be non-negative.")
    return groups


def hierarchical_accuracy(logits_or_probs, labels, groups):
    """Fraction of examples whose predicted fine label lies in the true label's group.

    The hierarchy label is predicted as that of the predicted (arg-max) fine label
    (CVPR 2020, section 3.3): a wrong fine label inside the right group counts as
    correct.

    Args:
      logits_or_probs: float array `[N, C]` (any monotone score).
      labels: int array `[N]` of fine labels.
      groups: int sequence `[C]`. The group of each fine label.

    Returns:
      float in [0, 1].
    """
    groups = _check_groups(logits_or_probs, groups)
    predicted = np.argmax(np.asarray(logits_or_probs), axis=-1)
    return float(np.mean(groups[predicted] == groups[np.asarray(labels)]))


def hierarchical_confusion(logits, labels, groups, num_groups=None):
    """Row-normalised confusion of true group (rows) against predicted group (columns).

    Entry `[i, j]` is the fraction of the examples of group `i` whose predicted
    fine label is in group `j`; the diagonal is each group's hierarchical
    accuracy (CVPR 2020, Figure 4a/b). A group with no examples has a row of zeros,
    as in `sklearn.metrics.confusion_matrix(..., normalize="true")`.

    Args:
      logits: float array `[N, C]` (any monotone score).
      labels: int array `[N]` of fine labels.
      groups: int sequence `[C]`. The group of each fine label.
      num_groups: int or None. `G`; `max(groups) + 1` if None.

    Returns:
      float array `[G, G]`.
    """
    groups = _check_groups(logits, groups)
    num_groups = int(groups.max()) + 1 if num_groups is None else int(num_groups)
    if num_groups <= groups.max():
        raise ValueError(f"num_groups is {num_groups}, but groups holds {groups.max()}.")
    true = groups[np.asarray(labels)]
    predicted = groups[np.argmax(np.asarray(logits), axis=-1)]
    counts = np.bincount(true * num_groups + predicted, minlength=num_groups**2)
    counts = counts.reshape(num_groups, num_groups).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def expected_calibration_error(probs, labels, num_bins=20):
    """Expected calibration error over equal-width bins of the max-softmax confidence.

    `ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|`, where bin `m` holds the
    examples whose confidence lies in `((m - 1) / M, m / M]` (Guo et al., 2017):
    `M` equal-width bins over (0, 1], each including its right edge; a
    confidence of exactly 0 joins the first bin. `classification_metrics`
    reports it with the paper's 20 bins (`ece`) and with 15 (`ece_15`).

    Args:
        probs: float array `[N, C]` of predicted probabilities.
        labels: int array `[N]`.
        num_bins: int. `M`; the paper uses 20.

    Returns:
        float in [0, 1] (a fraction, not percent).
    """
    confidence, correct = _top_label(probs, labels)
    gap = np.abs(_bin_sums(_equal_width_bins(confidence, num_bins), num_bins, correct, confidence))
    return float(gap.sum() / max(len(confidence), 1))


def _top_label(probs, labels):
    """Max-softmax confidence `[N]` (float64) and whether the arg-max is the label `[N]`."""
    probs = np.asarray(probs, np.float64)
    return probs.max(axis=-1), probs.argmax(axis=-1) == np.asarray(labels)


def _equal_width_bins(values, num_bins):
    """0-based bin of each value in [0, 1]: bin m is `(m / M, (m + 1) / M]`, and 0 joins bin 0.

    The index is `ceil(M * value) - 1` in floating point, so a value within rounding of an
    inner edge (`0.15 * 20` is `3.0000000000000004`) may land in the bin above it.
    """
    return np.clip(np.ceil(values * num_bins).astype(np.int64) - 1, 0, num_bins - 1)


def _bin_sums(bins, num_bins, hits, scores):
    """Per bin, the number of hits minus the sum of the scores (`[M]`; 0 in empty bins)."""
    return np.bincount(bins, weights=hits, minlength=num_bins) - np.bincount(
        bins, weights=scores, minlength=num_bins
    )


def maximum_calibration_error(probs, labels, num_bins=20):
    """Maximum calibration error: the largest gap of a non-empty confidence bin.

    `MCE = max_m |acc(B_m) - conf(B_m)|` over the non-empty bins `B_m`, whatever
    their size (Naeini et al., AAAI 2015; Guo et al., ICML 2017), with the bins
    of `expected_calibration_error`: `M` equal-width bins of the max-softmax
    confidence, bin `m` (1-based) holding `((m - 1) / M, m / M]`, a confidence of
    exactly 0 in the first.

    Args:
        probs: float array `[N, C]` of predicted probabilities.
        labels: int array `[N]`.
        num_bins: int. `M`; `classification_metrics` uses 20, the paper's ECE bins.

    Returns:
        float in [0, 1]; 0 without examples.
    """
    confidence, correct = _top_label(probs, labels)
    bins = _equal_width_bins(confidence, num_bins)
    count = np.bincount(bins, minlength=num_bins)
    gap = np.abs(_bin_sums(bins, num_bins, correct, confidence))
    filled = count > 0
    return float(np.max(gap[filled] / count[filled], initial=0.0))


def adaptive_calibration_error(probs, labels, num_bins=15):
    """ECE over equal-mass bins of the max-softmax confidence ("adaptive ECE").

    The examples are sorted by increasing confidence (`np.argsort(kind="stable")`:
    equal confidences keep their index order) and the sorted order is cut into
    `M` consecutive bins of (nearly) equal counts by `np.array_split`: with
    `N = q M + r`, the first `r` bins hold `q + 1` examples and the others `q`.
    Ties are not kept together: equal confidences at a cut fall on both sides.
    With fewer than `M` examples the last bins are empty and count for nothing.
    Then, as for `expected_calibration_error`,
    `sum_b |B_b| / n * |acc(B_b) - conf(B_b)|` (Nixon et al., "Measuring
    calibration in deep learning", CVPR Workshops 2019, adaptive binning; top
    label only, as in Mukhoti et al., NeurIPS 2020).

    Args:
        probs: float array `[N, C]` of predicted probabilities.
        labels: int array `[N]`.
        num_bins: int. `M`; `classification_metrics` uses 15.

    Returns:
        float in [0, 1] (a fraction, not percent); 0 without examples.
    """
    confidence, correct = _top_label(probs, labels)
    order = np.argsort(confidence, kind="stable")
    bins = np.empty(len(order), np.int64)
    for b, members in enumerate(np.array_split(order, num_bins)):
        bins[members] = b
    gap = np.abs(_bin_sums(bins, num_bins, correct, confidence))
    return float(gap.sum() / max(len(confidence), 1))


def classwise_calibration_error(probs, labels, num_bins=15, max_chunk_entries=2**22):
    """Class-wise ECE: every class's predicted probability against that class's frequency.

    For each class `c`, the probability `p_c` of **every** example (not only of
    the examples that predict `c`) goes into `M` equal-width bins, bin `m`
    (1-based) holding `((m - 1) / M, m / M]` and a probability of exactly 0 the
    first, as `expected_calibration_error`; in each bin the mean `p_c` is
    compared with the fraction of examples labelled `c`:

        classwise-ECE = 1/C sum_c sum_m |B_mc| / n * |freq_c(B_mc) - mean p_c(B_mc)|

    (Kull et al., "Beyond temperature scaling", NeurIPS 2019, classwise-ECE; the
    static calibration error of Nixon et al., CVPR Workshops 2019). The mean is
    over all `C` columns of `probs`, classes absent from `labels` included.

    Args:
        probs: float array `[N, C]` of predicted probabilities.
        labels: int array `[N]`.
        num_bins: int. `M`; `classification_metrics` uses 15.
        max_chunk_entries: int. Examples are binned a chunk at a time, about this
            many probabilities per chunk, so memory stays bounded for large `N x C`.

    Returns:
        float in [0, 1]; 0 without examples.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    n, num_classes = probs.shape
    # Per (class, bin): label-c count minus the sum of p_c, accumulated over chunks of examples.
    sums = np.zeros(num_classes * num_bins)
    offsets = np.arange(num_classes) * num_bins
    chunk = max(1, max_chunk_entries // max(num_classes, 1))
    for start in range(0, n, chunk):
        part = probs[start : start + chunk]
        index = (_equal_width_bins(part, num_bins) + offsets).ravel()
        hits = np.zeros_like(part)
        hits[np.arange(len(part)), labels[start : start + chunk]] = 1.0
        sums += _bin_sums(index, num_classes * num_bins, hits.ravel(), part.ravel())
    return float(np.abs(sums).sum() / max(n * num_classes, 1))


def brier_score(probs, labels):
    """Multi-class Brier score: squared error summed over classes, mean over examples.

    `Brier = 1/n sum_i sum_c (p_ic - [y_i = c])^2` (Brier, 1950), in [0, 2]:
    0 for confident right answers, 2 for confident wrong ones. (Some papers
    divide by the number of classes, or score the top label only; this does
    neither.)

    Args:
        probs: float array `[N, C]` of predicted probabilities.
        labels: int array `[N]`.

    Returns:
        float in [0, 2]; 0 without examples.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    if not len(labels):
        return 0.0
    # sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_y + 1, without an [N, C] one-hot; rounding
    # can take a perfect prediction's 0 a few ulps below.
    true = probs[np.arange(len(labels)), labels]
    per_example = np.einsum("ij,ij->i", probs, probs) - 2.0 * true + 1.0
    return float(np.mean(np.maximum(per_example, 0.0)))


def recall_at_k(features, labels, k=1, max_chunk_bytes=256 * 2**20):
    """Recall@k: fraction of examples with a same-label example among their k nearest neighbours.

    Neighbours are by L2 distance between feature vectors, the example itself excluded
    (leave-one-out). Distances are computed for a chunk of queries at a time, so memory
    grows with `chunk x N`, never `N x N` (tested: 50,000 x 512 features stay under 1 GiB).

    Args:
        features: float array `[N, D]` (pooled penultimate features).
        labels: int array `[N]`.
        k: int. Neighbours considered.
        max_chunk_bytes: int. Memory budget of one chunk of the distance matrix.

    Returns:
        float in [0, 1].
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise ValueError("recall_at_k needs at least two examples.")
    k = min(k, n - 1)
    squared_norms = np.einsum("ij,ij->i", features, features)
    # Per distance entry: 4 bytes, plus 8 for argpartition's int64 indices when k > 1.
    chunk = max(1, min(n, max_chunk_bytes // ((4 if k == 1 else 12) * n)))
    hits = 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2, in place; the query's own norm does not
        # change its ranking, so it is left out.
        distances = features[start:stop] @ features.T
        distances *= -2.0
        distances += squared_norms[None, :]
        distances[np.arange(stop - start), np.arange(start, stop)] = np.inf
        if k == 1:
            nearest = np.argmin(distances, axis=1)[:, None]
        else:
            nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        hits += int(np.sum(np.any(labels[nearest] == labels[start:stop, None], axis=1)))
    return hits / n


def area_under_risk_coverage(probs, labels):
    """AURC: the mean selective risk over all coverages (Geifman et al., 2019).

    Examples are accepted in order of decreasing max-softmax confidence; at coverage
    `i / n` the risk is the error rate of the `i` most confident. Lower is better; a
    classifier whose errors all rank below its correct predictions has the least possible
    AURC for its error rate.

    Args:
        probs: float array `[N, C]` of predicted probabilities.
        labels: int array `[N]`.

    Returns:
        float in [0, 1].
    """
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=-1)
    errors = (probs.argmax(axis=-1) != np.asarray(labels)).astype(np.float64)
    order = np.argsort(-confidence, kind="stable")
    risks = np.cumsum(errors[order]) / np.arange(1, len(order) + 1)
    return float(risks.mean())

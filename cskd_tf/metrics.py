"""Evaluation metrics as pure functions over numpy arrays."""

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


def classification_metrics(logits, labels):
    """The metrics every run reports: top-1 and top-5 error and NLL, as fractions."""
    return {
        "top1_error": top_k_error(logits, labels, 1),
        "top5_error": top_k_error(logits, labels, 5),
        "nll": negative_log_likelihood(logits, labels),
        "num_examples": int(len(labels)),
    }

"""`ps_kd`: progressive self-knowledge distillation (PS-KD), the model's last-epoch predictions
as soft targets.

Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets", ICCV 2021,
section 3; the authors' code is lgcnsai/PS-KD-Pytorch (`main.py`,
`loss/pskd_loss.py`).

Objective. Cross-entropy against the target

    (1 - alpha_t) * one_hot(y) + alpha_t * p_{t-1}(x),   alpha_t = alpha_T * (t + 1) / epochs,

with `t` the 0-based epoch (the authors' `alpha_T * ((epoch + 1) / end_epoch)`, so the last
epoch uses `alpha_T`) and `p_{t-1}(x)` the softmax the model gave this training example in the
previous epoch, from the training forward pass (training mode, augmented view, before that
step's update), as the authors store it. In the first epoch the stored table is the one-hot
labels (the authors write them in at epoch 0), so the first epoch is plain cross-entropy.
The cross-entropy is the compiled loss (`sum_c -target_c log p_c`, averaged over the batch, the
authors' `(-targets * log_probs).mean(0).sum()`), so label smoothing combines with it.

State (`state`). One prediction per training example, a non-trainable variable indexed by the
example's place in the training set (`Batches(indices=True)`), and the count of steps taken,
whose quotient by the steps of an epoch is `t`. Both are model weights: saved with the model
and in every resume checkpoint, so a run resumed mid-epoch reads the table an uninterrupted
run holds at that step. Each example is seen once an epoch, so a step reads rows written in
the previous epoch; it reads them before writing its own (the writes depend on the loss).
A row never written (all zeros: a softmax sums to 1) stands for the one-hot label, which is
how the first epoch's targets are the labels without knowing the labels in advance.

Storage (`--ps_kd_top_k`). With 0 (the default) every probability is kept, in float32: exact,
as the authors keep it; N x C x 4 bytes, 20 MB for CIFAR-100 (50,000 x 100), 4.8 MB for
CUB-200 (5,994 x 200), but 5.1 GB for ImageNet (1,281,167 x 1000), on every replica and in
every checkpoint. A table above 1 GiB is refused with a sentence that says to pass
`--ps_kd_top_k=K`: then only each prediction's K largest probabilities and their classes are
kept (8 bytes each: 102 MB for ImageNet with K = 10) and the target uses them renormalised to
sum to 1. That distribution is exact for K >= C, and otherwise off by exactly twice the
probability mass outside the top K in L1 (`tests/test_ps_kd.py`), which for a trained
network is small. float16 storage (2.6 GB for ImageNet, relative error 2^-11) would only
halve the table, still on every replica and in every checkpoint; top-10 is 50 times smaller.

Replicas. The table is one mirrored variable, identical on every replica: after each step every
replica gathers all replicas' indices and predictions (`all_gather`, which takes shares of any
size, empty included) in `reduce`, outside the guard that skips an empty replica, and applies
them all, so 2 replicas hold exactly the table one device holds.

Flags. `--ps_kd_alpha` = alpha_T = 0.8: the paper's value for image classification and the
authors' default (`--alpha_T 0.8`). `--ps_kd_top_k` = 0: ours (the paper stores everything).

The paper's recipe differs from CS-KD's (300 epochs, learning rate 0.1 divided by 10 at epochs
150 and 225, weight decay 5e-4, Nesterov momentum, batch 128 for CIFAR-100): see
`configs/methods/cifar100-ps_kd.flags`.
"""

from cskd_tf.methods.base import Batches, Flag, Method, register

FLAGS = {
    "ps_kd_alpha": Flag(
        0.8, "alpha_T, the weight of the last epoch's own predictions at the end.",
        bound="in [0, 1]",
    ),  # fmt: skip
    "ps_kd_top_k": Flag(
        0,
        "keep each stored prediction's K largest probabilities (0: all of them, exact).",
        "integer",
        bound=">= 0",
    ),
}
# The largest table of full predictions PS-KD keeps; past it, --ps_kd_top_k is needed.
MAX_TABLE_BYTES = 2**30


def _top_k(options, num_classes):
    """K, or None when every class is kept."""
    k = int(options["ps_kd_top_k"])
    return k if 0 < k < num_classes else None


def table_bytes(train_size, num_classes, top_k=0):
    """Bytes of the stored predictions: float32 per class, or float32 + int32 per kept class."""
    k = top_k if 0 < top_k < num_classes else None
    return train_size * (num_classes * 4 if k is None else k * 8)


def check(options, context):
    from cskd_tf.errors import UserError  # pylint: disable=g-import-not-at-top

    size = table_bytes(context.train_size, context.num_classes, int(options["ps_kd_top_k"]))
    if size > MAX_TABLE_BYTES:
        raise UserError(
            f"--method=ps_kd keeps one prediction per training example: "
            f"{context.train_size} x {context.num_classes} float32 is {size / 2**30:.1f} GiB; "
            f"pass --ps_kd_top_k=10 to keep each prediction's 10 largest probabilities "
            f"({table_bytes(context.train_size, context.num_classes, 10) / 2**20:.0f} MiB)."
        )


def compress(probabilities, k):
    """What the table keeps of `probabilities` `[batch, C]`: `(probabilities,)`, or the top
    k `(values, classes)`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if k is None:
        return (probabilities,)
    values, classes = tf.math.top_k(probabilities, k)
    return values, classes


def expand(stored, num_classes):
    """The distributions `[batch, C]` that `compress`'s output stands for (renormalised top-k).

    Rows never written come back as zeros.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if len(stored) == 1:
        return stored[0]
    values, classes = stored
    dense = tf.reduce_sum(tf.one_hot(classes, num_classes) * values[..., None], axis=1)
    return tf.math.divide_no_nan(dense, tf.reduce_sum(values, axis=-1, keepdims=True))


def state(model):
    """The table of stored predictions and the step count, as non-trainable model weights."""
    num_classes = model.backbone.output.shape[-1]
    n = int(model.context["train_size"])
    k = _top_k(model.options, num_classes)
    # Mirrored under a strategy; every replica writes the same gathered rows (`reduce`).
    common = dict(initializer="zeros", trainable=False, autocast=False,
                  aggregation="only_first_replica")  # fmt: skip
    if k is None:
        model.ps_kd_predictions = model.add_weight(
            shape=(n, num_classes), dtype="float32", name="ps_kd_predictions", **common
        )
    else:
        model.ps_kd_top_probabilities = model.add_weight(
            shape=(n, k), dtype="float32", name="ps_kd_top_probabilities", **common
        )
        model.ps_kd_top_classes = model.add_weight(
            shape=(n, k), dtype="int32", name="ps_kd_top_classes", **common
        )
    model.ps_kd_steps = model.add_weight(shape=(), dtype="int64", name="ps_kd_steps", **common)


def table(model):
    """The variables of the stored predictions: `[predictions]`, or `[top values, classes]`."""
    if hasattr(model, "ps_kd_predictions"):
        return [model.ps_kd_predictions]
    return [model.ps_kd_top_probabilities, model.ps_kd_top_classes]


def alpha(model):
    """`alpha_t` of the step about to be taken (float32; `alpha_T` from the last epoch on)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    epochs = int(model.context["epochs"])
    epoch = tf.convert_to_tensor(model.ps_kd_steps) // int(model.context["steps_per_epoch"])
    progress = tf.cast(tf.minimum(epoch + 1, epochs), tf.float32) / float(epochs)
    return float(model.options["ps_kd_alpha"]) * progress


def targets(model, indices, labels, num_classes):
    """The soft targets of the examples at `indices`, from the table as it is before this step."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    one_hot = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), num_classes)
    stored = expand([tf.gather(v.value, indices) for v in table(model)], num_classes)
    written = tf.reduce_sum(stored, axis=-1, keepdims=True) > 0
    previous = tf.where(written, stored, one_hot)  # The authors' epoch-0 table: the labels.
    a = alpha(model)
    return (1.0 - a) * one_hot + a * previous


def _unpack(x):
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        raise ValueError(
            "--method=ps_kd trains on batches ((x, index), y), index the example's place in "
            "the training set; build them with cskd_tf.data.example_dataset(..., indices=True)."
        )
    return x


def objective(model, x, y, sample_weight):
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    images, indices = _unpack(x)
    indices = tf.cast(tf.reshape(indices, [-1]), tf.int64)
    if isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy):
        raise ValueError(
            "--method=ps_kd trains on soft targets, which a sparse cross-entropy does not take: "
            "compile with loss=cskd_tf.losses.ClassificationLoss()."
        )
    logits = model(images, training=True)
    num_classes = logits.shape[-1]
    soft = tf.stop_gradient(targets(model, indices, y, num_classes))
    ce = model._compute_loss(  # pylint: disable=protected-access
        x=images, y=soft, y_pred=logits, sample_weight=sample_weight, training=True
    )
    # The training pass's own prediction, stored for the next epoch (in `reduce`).
    probabilities = tf.stop_gradient(tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1))
    update = compress(probabilities, _top_k(model.options, num_classes))
    return dict(loss=ce, parts={"ce_loss": ce}, logits=logits, ps_kd=(indices, *update))


def empty(model, x, y):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf.model import Classifier  # pylint: disable=g-import-not-at-top

    objective_ = Classifier.empty_objective(model, x, y)
    rows = [tf.zeros([0, *v.shape[1:]], v.dtype) for v in table(model)]
    objective_["ps_kd"] = (tf.zeros([0], tf.int64), *rows)
    return objective_


def reduce(model, objective_):
    """Writes every replica's predictions into the table (on every replica) and counts the step."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    indices, *update = objective_.pop("ps_kd")
    context = tf.distribute.get_replica_context()
    # After the loss, hence after this step's reads of the table.
    with tf.control_dependencies([objective_["loss"]]):
        if context is not None and context.num_replicas_in_sync > 1:
            indices = context.all_gather(indices, axis=0)
            update = [context.all_gather(u, axis=0) for u in update]
        for variable, rows in zip(table(model), update):
            variable.value.scatter_update(tf.IndexedSlices(rows, indices))
        model.ps_kd_steps.assign_add(1)
    return objective_


METHOD = register(
    Method(
        name="ps_kd",
        title="PS-KD",
        summary="PS-KD (Kim et al., ICCV 2021): CE against `(1−α_t)·y + α_t·p_{t−1}(x)`, "
        "the model's own last-epoch prediction, `α_t = α_T·(t+1)/epochs`",
        reference="Kim et al., ICCV 2021, section 3.",
        objective=objective,
        parts=("ce_loss",),
        state=state,
        empty=empty,
        reduce=reduce,
        check=check,
        batches=Batches(indices=True),
        flags=FLAGS,
    )
)

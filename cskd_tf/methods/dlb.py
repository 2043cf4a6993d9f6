"""`dlb`: self-distillation from the last mini-batch (DLB), the previous step's logits as targets.

Shen et al., "Self-Distillation from the Last Mini-Batch for Consistency Regularization",
CVPR 2022, section 3; the authors' code is Meta-knowledge-Lab/DLB (`dlb.py`, `my_dataloader.py`).

Objective. Every training example is loaded under two independent augmentations. Step `t`
runs this step's batch `B_t` under its first view and, again, the previous step's batch
`B_{t-1}` under its second view, and minimises

    CE over B_{t-1} and B_t together
    + alpha * T^2 * mean_{i in B_{t-1}} KL(softmax(sg(z_{t-1,i}) / T) || softmax(f(x'_i) / T)),

where `z_{t-1}` are the logits step `t-1` computed for `B_{t-1}` (its first view, with that
step's weights, kept from that step: no extra pass) and `sg` stops the gradient. As the
authors: the cross-entropy is the mean over the two batches' rows together
(`F.cross_entropy(cat(out_pre, out), ...)`), the KL the "batchmean" over the previous batch
scaled by `T^2` (which keeps the gradient's scale independent of T), both passes run in
training mode with gradient, this step's batch first, and the previous batch carries across
epochs. The run's first step has no previous batch: plain cross-entropy on `B_1`. The
cross-entropy is the compiled loss (label smoothing combines with it); training accuracy
counts the rows of both batches (the authors count this step's only).

Batches (`Batches(previous=True)`, `cskd_tf.data.pairs.previous_batch_dataset`). A step's
batch holds `B_{t-1}`'s rows (second view) and then `B_t`'s (first view), each row with its place
in its own step's batch and a flag for the first kind. Which examples `B_{t-1}` holds and how
they are augmented are stateless functions of (seed, epoch, position), across epochs and at a
resumed step; `B_t`'s rows are exactly the cross-entropy baseline's batch.

State (`state`). The logits of the previous step's batch, `[rows, C]` with `rows` the largest
batch (`ceil(N / (steps_per_epoch - 1))` bounds it), by place in that batch: a model weight,
saved with the model and in every resume checkpoint. Whether there was a previous step is not
state: the first batch of the run has no previous rows, which the data says.

Replicas. tf.distribute splits every component of a batch into contiguous shares (by its own
size: components of different sizes would be split differently), so a batch whose
components all have `|B_{t-1}| + |B_t|` rows gives each replica some previous rows, then some
current ones, possibly none of either. Each replica runs its two passes (each skipped when
empty); the stored logits are one mirrored variable, identical everywhere: every replica
gathers all replicas' current logits with their places (`all_gather`) in `reduce` and writes
them all, and reads its previous rows by place. Each replica is weighted by its share of all
the rows (the shared step); the KL term is rescaled in `reduce` to the global batchmean over
`B_{t-1}` (its size all-reduced). So 2 replicas train as one device, short and empty shares
included, and a run resumed on another number of replicas continues exactly.

Flags. `--dlb_temperature` = T = 3 and `--dlb_alpha` = alpha = 1: our reading of the paper's
implementation details (section 4.1), which we could not check against its text here (it is
not on this machine). The authors' code gives no defaults (`--T` and `--alpha` are required
arguments); its default experiment suffix `TP3_0.5` names T = 3 with 0.5.

The paper's recipe differs from CS-KD's (weight decay 5e-4, Nesterov momentum, other
milestones): see `configs/methods/cifar100-dlb.flags`.
"""

from cskd_tf.methods.base import TEMPERATURE_BOUNDS, Batches, Flag, Method, register

FLAGS = {
    "dlb_temperature": Flag(3.0, "temperature T of DLB's distillation from the last batch.",
                            bound=TEMPERATURE_BOUNDS),  # fmt: skip
    "dlb_alpha": Flag(1.0, "weight of DLB's distillation from the last batch.", bound=">= 0"),
}


def rows(context):
    """The most examples one batch can hold, from the run's size and steps per epoch."""
    n, steps = int(context["train_size"]), int(context["steps_per_epoch"])
    # steps = ceil(n / B) gives B < n / (steps - 1): the bound is at most ~B / steps + 1 too big.
    return n if steps <= 1 else min(n, -(-n // (steps - 1)))


def state(model):
    """The logits of the previous step's batch, by place in it: a non-trainable model weight."""
    model.dlb_logits = model.add_weight(
        shape=(rows(model.context), model.backbone.output.shape[-1]),
        dtype="float32",
        initializer="zeros",
        trainable=False,
        autocast=False,
        # Mirrored under a strategy; every replica writes the same gathered rows (`reduce`).
        aggregation="only_first_replica",
        name="dlb_logits",
    )


def _unpack(x):
    if not (isinstance(x, (tuple, list)) and len(x) == 3):
        raise ValueError(
            "--method=dlb trains on batches ((x, position, previous), y) that put the previous "
            "step's examples first; build them with cskd_tf.data.pairs.previous_batch_dataset."
        )
    return x


def _logits(model, images, count):
    """Logits of a training pass over `images`, skipped (an empty batch) when `count` is 0."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    classes = model.backbone.output.shape[-1]
    return tf.cond(
        count > 0,
        lambda: tf.cast(model(images, training=True), tf.float32),
        lambda: tf.zeros([0, classes], tf.float32),
    )


def objective(model, x, y, sample_weight):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf import losses  # pylint: disable=g-import-not-at-top

    images, positions, previous = _unpack(x)
    positions = tf.cast(tf.reshape(positions, [-1]), tf.int64)
    n = tf.shape(images)[0]
    # The previous step's rows come first, in every replica's share too.
    p = tf.reduce_sum(tf.cast(tf.reshape(previous, [-1]), tf.int32))
    # The authors' order: this step's batch, then the previous one's second view.
    current_logits = _logits(model, images[p:], n - p)
    previous_logits = _logits(model, images[:p], p)
    logits = tf.concat([previous_logits, current_logits], axis=0)
    ce = model._compute_loss(  # pylint: disable=protected-access
        x=images, y=y, y_pred=logits, sample_weight=sample_weight, training=True
    )
    # The previous step's logits for these rows, as stored before this step writes its own.
    kept = tf.stop_gradient(tf.gather(model.dlb_logits.value, positions[:p]))
    kl = losses.class_wise_kl(previous_logits, kept, float(model.options["dlb_temperature"]))
    if sample_weight is not None:
        kl *= tf.cast(tf.reshape(sample_weight, [-1])[:p], kl.dtype)
    dlb = dict(
        kl_sum=tf.reduce_sum(kl),
        counts=tf.cast(tf.stack([n, p]), tf.float32),
        positions=positions[p:],
        logits=tf.stop_gradient(current_logits),
    )
    return dict(loss=ce, parts={"ce_loss": ce}, logits=logits, dlb=dlb)


def empty(model, x, y):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf.model import Classifier  # pylint: disable=g-import-not-at-top

    objective_ = Classifier.empty_objective(model, x, y)
    objective_["parts"].pop("dlb_loss")  # `reduce` adds it on every replica.
    classes = model.backbone.output.shape[-1]
    objective_["dlb"] = dict(
        kl_sum=tf.constant(0.0),
        counts=tf.zeros([2], tf.float32),
        positions=tf.zeros([0], tf.int64),
        logits=tf.zeros([0, classes], tf.float32),
    )
    return objective_


def reduce(model, objective_):
    """Adds the KL term as the global batchmean and stores this step's logits on every replica."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    dlb = objective_.pop("dlb")
    kl_sum, counts = dlb["kl_sum"], dlb["counts"]
    positions, logits = dlb["positions"], dlb["logits"]
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    # After the loss, hence after this step's reads of the stored logits.
    with tf.control_dependencies([objective_["loss"], kl_sum]):
        if replicas > 1:
            totals = context.all_reduce(tf.distribute.ReduceOp.SUM, counts)
            positions = context.all_gather(positions, axis=0)
            logits = context.all_gather(logits, axis=0)
            # The shared step weights this replica by replicas * n_r / n (its share of all
            # the rows): undo that, so that the replicas sum to sum(KL) / |B_{t-1}|.
            share = kl_sum * tf.math.divide_no_nan(totals[0], totals[1] * replicas * counts[0])
        else:
            share = tf.math.divide_no_nan(kl_sum, counts[1])
        tf.debugging.assert_less(
            positions,
            tf.cast(model.dlb_logits.shape[0], tf.int64),
            message="dlb: a batch holds more examples than the model was built for",
        )
        model.dlb_logits.value.scatter_update(tf.IndexedSlices(logits, positions))
    objective_["parts"]["dlb_loss"] = share
    objective_["loss"] = objective_["loss"] + float(model.options["dlb_alpha"]) * share
    return objective_


METHOD = register(
    Method(
        name="dlb",
        title="DLB",
        summary="DLB (Shen et al., CVPR 2022): each step reruns the previous step's batch under "
        "a second augmentation, `CE(both) + α·T²·KL(sg(its logits then) ‖ its logits now)`",
        reference="Shen et al., CVPR 2022, section 3.",
        objective=objective,
        parts=("ce_loss", "dlb_loss"),
        state=state,
        empty=empty,
        reduce=reduce,
        batches=Batches(previous=True),
        flags=FLAGS,
    )
)

"""Distribution strategies, and a `fit` for several machines that Keras 3.15 lacks.

Keras 3.15's `Model.fit` fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585: while building it reduces a per-replica value eagerly,
then asks for an invalid reduction dimension). `fit_multi_worker` is a short
custom loop around the model's own `train_step`, run by `strategy.run` on each
global batch, so CS-KD trains on several machines exactly as `fit` trains on one
(the test suite checks equal weights, two workers against one process). It
drives the usual Keras callbacks; only the chief should be given callbacks that
write files. Given a `cskd_tf.checkpointing.StopRequest`, it all-reduces after
every step which stop signals the workers received, so that a signal sent to
one worker stops every worker after the same step.

When a worker dies, the others' next collective fails; `lost_peer` reads which
task TensorFlow's error names.
"""

import os
import re

import keras
import tensorflow as tf

from cskd_tf.errors import UserError

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def make_strategy(name="auto", cpu_replicas=0):
    """Builds a distribution strategy by name.

    Args:
      name: str. `auto` (mirrored over all GPUs when there are several, else
        the default strategy), `one_device` (the first GPU, else the CPU),
        `mirrored` (all local GPUs, or the CPU) or `multi_worker` (several
        machines, from the `TF_CONFIG` environment variable).
      cpu_replicas: int. With `mirrored` on a machine without GPUs and a value
        above 1, splits the CPU into that many logical devices and mirrors over
        them: several replicas where there are no GPUs, to try multi-replica
        training (as the tests do). Must be called before TensorFlow starts.

    Returns:
      tf.distribute.Strategy.

    Raises:
      UserError: for an unknown name, `multi_worker` without `TF_CONFIG`, or
        `cpu_replicas` with another strategy or beside GPUs.
    """
    if name not in STRATEGIES:
        raise UserError(f"Unknown strategy '{name}'. Choose one of: {', '.join(STRATEGIES)}.")
    if cpu_replicas > 1:
        if name != "mirrored" or tf.config.list_physical_devices("GPU"):
            raise UserError(
                "--cpu_replicas splits the CPU of a machine without GPUs for "
                "--strategy=mirrored; it does not apply here."
            )
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
        )
        return tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(cpu_replicas)],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise UserError(
                "--strategy=multi_worker reads the cluster from the TF_CONFIG environment "
                "variable, which is not set (see the README, 'Several machines')."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    # Physical, not logical, devices: listing those would start the runtime.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process writes the run folder: the `chief` task, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


# TensorFlow names the tasks whose heartbeats stopped after this phrase, one a line.
_UNHEALTHY = re.compile(r"unhealthy \(stopped sending heartbeats\):\s*((?:/job:[^\s]+\s*)+)")
_TASK = re.compile(r"/job:[A-Za-z_]+(?:/replica:\d+)?/task:\d+")
# The errors a collective raises when a peer is gone (or its connection is).
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)


def lost_peer(error, strategy=None):
    """The task that a multi-worker collective's `error` says was lost.

    Args:
      error: Exception. What a collective (a training step, an input pipeline's
        `next`) raised.
      strategy: tf.distribute.Strategy or None. Its own task is never the lost one.

    Returns:
      str: the lost task's name (`/job:worker/replica:0/task:1`); `"a peer"` when
      the error is one a lost peer causes but names no other task; None when it is
      not such an error.
    """
    if not isinstance(error, PEER_ERRORS):
        return None
    text = str(error)
    own = None
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None and resolver.task_type is not None:
        own = f"/job:{resolver.task_type}/replica:0/task:{resolver.task_id}"
    listed = _UNHEALTHY.search(text)
    candidates = _TASK.findall(listed.group(1)) if listed else []
    # Otherwise any task the error names but this one (the failed op's own device names it).
    candidates = candidates or [t for t in _TASK.findall(text) if t != own]
    for task in candidates:
        if "/replica:" not in task:
            task = task.replace("/task:", "/replica:0/task:")
        if task != own:
            return task
    return "a peer"


def fit_multi_worker(
    model,
    dataset,
    epochs,
    callbacks=(),
    verbose=2,
    initial_epoch=0,
    steps_per_epoch=None,
    stop=None,
):
    """Trains `model` on `dataset` under its multi-worker strategy; returns the `History`.

    Every worker builds the same global-batch dataset (same seed); each keeps
    its share of every global batch (auto-shard by data), so a step sees the
    same examples as one process would. Gradients are all-reduced by the
    optimizer and the metrics by reading them, in the same order on every
    worker.

    Args:
      model: keras.Model. Compiled inside `strategy.scope()`.
      dataset: tf.data.Dataset of global batches (e.g. `((x, x_pair), y)`).
      epochs: int.
      callbacks: list of keras.callbacks.Callback. Give file-writing ones to the chief only.
      verbose: int. 0, 1 (progress bar) or 2 (one line per epoch).
      initial_epoch: int. The epoch to start at (as in `fit`: `epochs` is the last one).
      steps_per_epoch: int or None. As in `fit`: None iterates `dataset` anew
        every epoch; an int takes that many batches per epoch from one pass over it.
      stop: cskd_tf.checkpointing.StopRequest or None. After every step, the stop
        signals every worker received are all-reduced into `stop.agreed` (the
        first of `stop.signals` any worker received), before the callbacks see the
        step: every worker's callbacks then decide on the same value.

    Returns:
      keras.callbacks.History.
    """
    strategy = model.distribute_strategy
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = strategy.experimental_distribute_dataset(dataset.with_options(options))
    replica_step = model.train_step
    if model.jit_compile is True:
        replica_step = tf.function(model.train_step, jit_compile=True)

    @tf.function
    def step(batch):
        strategy.run(replica_step, args=(batch,))

    def agree():
        # One tiny all-reduce a step (as the distributed iterator's own): how many replicas'
        # workers received each signal.
        flags = tf.constant([float(stop.received == name) for name in stop.signals])
        local = strategy.experimental_distribute_values_from_function(lambda _: flags)
        counts = strategy.reduce(tf.distribute.ReduceOp.SUM, local, axis=None).numpy()
        stop.agreed = next((n for n, c in zip(stop.signals, counts) if c > 0), None)

    if stop is not None:
        stop.collective, stop.agreed = True, None

    callback_list = keras.callbacks.CallbackList(
        list(callbacks),
        add_history=True,
        add_progbar=verbose != 0,
        model=model,
        epochs=epochs,
        verbose=verbose,
        steps=steps_per_epoch,
    )
    model.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    iterator = iter(batches) if steps_per_epoch else None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        epoch_batches = (
            (next(iterator) for _ in range(steps_per_epoch)) if iterator is not None else batches
        )
        for index, batch in enumerate(epoch_batches):
            callback_list.on_train_batch_begin(index)
            step(batch)
            # Reading a metric all-reduces it over every replica of every worker.
            logs = {name: float(value) for name, value in model.get_metrics_result().items()}
            if stop is not None:
                agree()
            callback_list.on_train_batch_end(index, logs)
            if model.stop_training:
                break
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return model.history

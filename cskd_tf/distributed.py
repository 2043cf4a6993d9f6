"""Distribution strategies, and a `fit` for several machines that Keras 3.15 lacks.

Keras 3.15's `Model.fit` fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585: while building it reduces a per-replica value eagerly,
then asks for an invalid reduction dimension). `fit_multi_worker` is a short
custom loop around the model's own `train_step`, run by `strategy.run` on each
global batch, so CS-KD trains on several machines exactly as `fit` trains on one
(the test suite checks equal weights, two workers against one process). It
drives the usual Keras callbacks; only the chief should be given callbacks that
write files.
"""

import os

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


def fit_multi_worker(
    model, dataset, epochs, callbacks=(), verbose=2, initial_epoch=0, steps_per_epoch=None
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
            callback_list.on_train_batch_end(index, logs)
            if model.stop_training:
                break
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return model.history

"""Exports a trained run as a SavedModel for serving, with an optional fitted temperature.

The logic behind `tools/export.py`. The SavedModel has three signatures, each
with the evaluation preprocessing of the run's data set inside:

* `serving_default`: `images`, float32 `[batch, H, W, C]` raw pixel values in
  0..255 -> `probabilities` `[batch, classes]` and `logits`;
* `serve_bytes`: `images`, a string `[batch]` of JPEG or PNG files -> the same;
* `features`: `images` as for `serving_default` -> `features` `[batch, D]`,
  the pooled penultimate features (retrieval, recall@1).

`probabilities` are `softmax(logits / temperature)`; the temperature is 1
unless `calibrate=True` fitted it on the run's validation split (temperature
scaling, Guo et al., ICML 2017). `logits` are always the network's own.
"""

import json
import os
import shutil
import tempfile

import numpy as np
from scipy import optimize
from scipy import special

from cskd_tf.errors import UserError

INFO_FILE = "export_info.json"
KERAS_FILE = "model.keras"
_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


def _check(condition, message):
    if not condition:
        raise UserError(message)


def fit_temperature(logits, labels, bounds=(0.05, 20.0)):
    """The temperature that minimises the NLL of `softmax(logits / T)` (Guo et al., 2017).

    Args:
      logits: float array `[N, C]`.
      labels: int array `[N]`.
      bounds: (float, float). Range searched for T.

    Returns:
      float. T > 1 softens over-confident predictions, T < 1 sharpens.
    """
    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(labels))

    def nll(log_t):
        return -np.mean(special.log_softmax(logits / np.exp(log_t), axis=-1)[rows, labels])

    result = optimize.minimize_scalar(
        nll, bounds=np.log(bounds), method="bounded", options=dict(xatol=1e-6)
    )
    return float(np.exp(result.x))


def _serving_functions(backbone, preset, temperature):
    """The three endpoints as (function, input signature), preprocessing inside."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top

    augmenter = data.Augmenter(preset)
    channels = augmenter.input_shape[-1]
    fixed = augmenter.preset.eval_resize is None  # Inputs of one size, no resize.
    height = width = augmenter.preset.size if fixed else None
    both = backbones.feature_model(backbone)
    temperature = tf.constant(temperature, tf.float32)

    expected = f"[batch, {height or 'H'}, {width or 'W'}, {channels}]"

    def check_shape(images, signature):
        # Signatures do not enforce their shapes: a wrong one would fail deep in the graph.
        shape = tf.shape(images)
        padded = tf.concat([shape, tf.fill([4], -1)], axis=0)
        ok = tf.logical_and(tf.equal(tf.size(shape), 4), tf.equal(padded[3], channels))
        if fixed:
            ok = tf.logical_and(ok, tf.reduce_all(tf.equal(padded[1:3], [height, width])))
        return tf.debugging.Assert(
            ok,
            [
                f"{signature} takes float32 images {expected} of raw pixels in 0..255; got shape",
                shape,
            ],
        )

    def preprocess(images, signature):
        with tf.control_dependencies([check_shape(images, signature)]):
            images = tf.identity(images)
        return tf.map_fn(
            augmenter.eval,
            images,
            fn_output_signature=tf.TensorSpec(augmenter.input_shape, tf.float32),
        )

    def outputs(logits):
        logits = tf.cast(logits, tf.float32)
        return {"probabilities": tf.nn.softmax(logits / temperature), "logits": logits}

    def serve(images):
        return outputs(backbone(preprocess(images, "serving_default"), training=False))

    def decode(encoded):
        head = tf.strings.substr(encoded, 0, 8)
        known = tf.logical_or(tf.strings.substr(head, 0, 3) == _JPEG, tf.equal(head, _PNG))
        check = tf.debugging.Assert(
            known, ["serve_bytes takes JPEG or PNG files; got bytes starting with", head]
        )
        with tf.control_dependencies([check]):
            image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        return augmenter.eval(image)

    def serve_bytes(images):
        inputs = tf.map_fn(
            decode, images, fn_output_signature=tf.TensorSpec(augmenter.input_shape, tf.float32)
        )
        return outputs(backbone(inputs, training=False))

    def features(images):
        _, pooled = both(preprocess(images, "features"), training=False)
        return {"features": tf.cast(pooled, tf.float32)}

    pixels = tf.TensorSpec([None, height, width, channels], tf.float32, name="images")
    encoded = tf.TensorSpec([None], tf.string, name="images")
    return {
        "serving_default": (serve, [pixels]),
        "serve_bytes": (serve_bytes, [encoded]),
        "features": (features, [pixels]),
    }


def _calibration(model, source, settings, batch_size):
    """Fits the temperature on the run's validation split; returns it with ECE/NLL before and after."""
    from cskd_tf import callbacks  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top
    from cskd_tf import metrics  # pylint: disable=g-import-not-at-top

    _, val = data.stratified_split(source.train, settings["val_split"], seed=settings["seed"])
    augmenter = data.Augmenter(source.preset)
    out = callbacks.predict(model, data.split_dataset(val, batch_size, augment=augmenter.eval))
    temperature = fit_temperature(out.logits, out.labels)
    before = metrics.classification_metrics(out.logits, out.labels)
    after = metrics.classification_metrics(out.logits / temperature, out.labels)
    return dict(
        temperature=temperature,
        val_examples=int(len(out.labels)),
        val_ece_before=before["ece"],
        val_ece_after=after["ece"],
        val_nll_before=before["nll"],
        val_nll_after=after["nll"],
    )


def export(workdir, export_dir, checkpoint="last", calibrate=False, batch_size=256):
    """Writes `export_dir`: the SavedModel, `model.keras` and `export_info.json`.

    The folder appears whole or not at all: everything is written to a
    temporary folder beside it, which is renamed at the end.

    Args:
      workdir: str. Run folder of `cskd_tf.train`.
      export_dir: str. New folder (an existing empty one is replaced).
      checkpoint: str. `last` or `best` (`best` needs a run with `--val_split`).
      calibrate: bool. Fit a temperature on the run's validation split.
      batch_size: int. Batch size of the calibration pass.

    Returns:
      dict: what `export_info.json` holds.

    Raises:
      UserError: on a missing run, checkpoint or validation split, or an
        existing, non-empty `export_dir`.
    """
    import keras  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    import cskd_tf  # pylint: disable=g-import-not-at-top
    from cskd_tf import callbacks  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top
    from cskd_tf import saving  # pylint: disable=g-import-not-at-top
    from cskd_tf import train  # pylint: disable=g-import-not-at-top

    # --- Arguments -------------------------------------------------------------
    _check(os.path.isdir(workdir), f"The run folder {workdir} does not exist.")
    _check(checkpoint in ("last", "best"), f"--checkpoint must be last or best, got {checkpoint}.")
    settings = train.read_flagfile(os.path.join(workdir, "flags.txt"))
    path = os.path.join(workdir, "checkpoints", f"{checkpoint}.keras")
    hint = " (best.keras needs a run with --val_split)" if checkpoint == "best" else ""
    _check(os.path.isfile(path), f"{path} does not exist{hint}.")
    _check(
        not (os.path.exists(export_dir) and not os.path.isdir(export_dir)),
        f"--export_dir={export_dir} is a file; name a new folder.",
    )
    _check(
        not (os.path.isdir(export_dir) and os.listdir(export_dir)),
        f"The export folder {export_dir} already exists and is not empty: pass another "
        "--export_dir or remove it.",
    )
    _check(
        not calibrate or settings["val_split"] > 0,
        f"--calibrate fits the temperature on the validation split, and {workdir} has none: "
        "train with --val_split (the test split must not be used for fitting).",
    )
    metrics_path = os.path.join(workdir, "metrics.json")
    run_metrics = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            run_metrics = json.load(f)

    # --- Model and data --------------------------------------------------------
    source = data.load(settings["dataset"], settings["data_dir"])
    model = saving.load_model(path)
    backbone = callbacks.classifier_of(model)
    calibration = _calibration(model, source, settings, batch_size) if calibrate else None
    temperature = calibration["temperature"] if calibration else 1.0
    preset = data.PRESETS[source.preset]

    # --- Write -----------------------------------------------------------------
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        archive = keras.export.ExportArchive()
        archive.track(backbone)
        for name, (fn, signature) in _serving_functions(backbone, preset, temperature).items():
            archive.add_endpoint(name, fn, input_signature=signature)
        archive.write_out(staging, verbose=False)
        backbone.save(os.path.join(staging, KERAS_FILE))
        info = dict(
            dataset=settings["dataset"],
            backbone=settings["backbone"],
            method=settings["method"],
            class_names=list(source.class_names),
            num_classes=int(source.num_classes),
            input=dict(
                shape=[
                    None if preset.eval_resize else preset.size,
                    None if preset.eval_resize else preset.size,
                    preset.channels,
                ],
                dtype="float32",
                values="raw pixels in 0..255",
                preprocessing=(
                    f"resize the shorter side to {preset.eval_resize}, centre crop "
                    f"{preset.size}x{preset.size}, "
                    if preset.eval_resize
                    else ""
                )
                + f"divide by 255, subtract mean {list(preset.mean)}, divide by std "
                f"{list(preset.std)}",
            ),
            signatures=dict(
                serving_default="images float32 [batch, H, W, C] -> probabilities, logits",
                serve_bytes="images string [batch] (JPEG or PNG) -> probabilities, logits",
                features="images float32 [batch, H, W, C] -> features",
            ),
            temperature=temperature,
            calibration=calibration,
            checkpoint=os.path.abspath(path),
            run=os.path.abspath(workdir),
            run_metrics=run_metrics,
            train_flags=settings,
            versions=dict(
                cskd_tf=cskd_tf.__version__, tensorflow=tf.__version__, keras=keras.__version__
            ),
        )
        with open(os.path.join(staging, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if os.path.isdir(export_dir):
            os.rmdir(export_dir)  # Empty, checked above.
        os.replace(staging, export_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def is_export(folder):
    """Whether `folder` holds a SavedModel written by `export`."""
    return os.path.isfile(os.path.join(folder, "saved_model.pb")) and os.path.isfile(
        os.path.join(folder, INFO_FILE)
    )


def read_info(folder):
    """The `export_info.json` of an export folder, as a dict."""
    with open(os.path.join(folder, INFO_FILE)) as f:
        return json.load(f)


def predict_saved_model(export_dir, split, batch_size=256):
    """Predicts a split with a reloaded export, through its signatures only.

    Decoded pixels go through `serving_default` and `features` in batches;
    encoded images and files go through `serve_bytes` in batches and, since
    their sizes differ, through `features` one image at a time.

    Args:
      export_dir: str. Folder written by `export`.
      split: Split or StreamSplit (`cskd_tf.data.sources`).
      batch_size: int.

    Returns:
      cskd_tf.callbacks.Predictions. Its `logits` are the served logits divided
      by the export's temperature, so that their softmax is the served
      `probabilities` (a fitted temperature counts) without the underflow of
      taking the log of a probability.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf import callbacks  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top

    loaded = tf.saved_model.load(export_dir)
    serve, serve_bytes, features = (
        loaded.signatures[name] for name in ("serving_default", "serve_bytes", "features")
    )
    info = read_info(export_dir)
    channels, temperature = info["input"]["shape"][-1], info["temperature"]
    logits, feats, labels = [], [], []
    if split.kind == "pixels":
        for x, y in data.split_dataset(split, batch_size):  # Raw pixels as float32.
            logits.append(serve(images=x)["logits"].numpy())
            feats.append(features(images=x)["features"].numpy())
            labels.append(y.numpy())
    else:
        if hasattr(split, "make"):
            ds = split.make()
        else:
            ds = tf.data.Dataset.from_tensor_slices((split.values, split.labels))
        if split.kind == "path":
            ds = ds.map(lambda v, y: (tf.io.read_file(v), y))
        for encoded, y in ds.batch(batch_size):
            logits.append(serve_bytes(images=encoded)["logits"].numpy())
            for one in encoded:
                image = tf.io.decode_image(one, channels=channels, expand_animations=False)
                pixels = tf.cast(image, tf.float32)[None]
                feats.append(features(images=pixels)["features"].numpy())
            labels.append(y.numpy())
    logits = np.concatenate(logits) / temperature
    return callbacks.Predictions(logits, np.concatenate(feats), np.concatenate(labels))

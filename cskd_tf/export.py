"""Exports a trained run as a SavedModel for serving, and converts it to TFLite and ONNX.

The logic behind `tools/export.py`. The SavedModel has four signatures, each
with the evaluation preprocessing of the run's data set inside:

* `serving_default`: `images`, float32 `[batch, H, W, C]` raw pixel values in
  0..255 -> `probabilities` `[batch, classes]` and `logits`;
* `serve_bytes`: `images`, a string `[batch]` of JPEG or PNG files -> the same;
* `features`: `images` as for `serving_default` -> `features` `[batch, D]`,
  the pooled penultimate features (retrieval, recall@1);
* `serve_pixels`: `images`, float32 `[batch, size, size, C]` raw pixels already
  at the network's input size (resized and centre-cropped by the client as
  `export_info.json` records; `resize_and_crop` does it in numpy) ->
  `probabilities`, `logits` and `features`.

`probabilities` are `softmax(logits / temperature)`; the temperature is 1
unless `calibrate=True` fitted it on the run's validation split (temperature
scaling, Guo et al., ICML 2017). `logits` are always the network's own.

`convert` turns `serve_pixels` into a TFLite file (builtin ops only) or an
ONNX file (tf2onnx). The other signatures do not convert for the 224-pixel
presets: their antialiased resize (`tf.image.resize(..., antialias=True)`, the
op `ScaleAndTranslate`) exists in neither TFLite (not even as a Flex op), ONNX
nor TF.js, and their `map_fn` becomes a While loop that TF.js refuses. They
stay as they were, so that their numbers and their wrong-input messages do not
change for SavedModel users; `serve_pixels` holds only batched ops (its shape
`Assert`, which the converters drop, aside) and leaves the resize to the
client.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from scipy import optimize
from scipy import special

from cskd_tf.errors import UserError

INFO_FILE = "export_info.json"
KERAS_FILE = "model.keras"
PIXELS_SIGNATURE = "serve_pixels"
# Converted files, written beside the SavedModel.
FORMATS = {"tflite": "model.tflite", "onnx": "model.onnx"}
# ONNX opset of the converted models: onnxruntime 1.12 and newer (web and mobile builds too).
ONNX_OPSET = 17
# A converted model whose outputs differ from the SavedModel's by more than this (relative to
# the largest output, or absolute below 1) is not written. Measured differences are ~1e-6.
CONVERSION_TOLERANCE = 1e-3
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
    """The four endpoints as (function, input signature), preprocessing inside."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from cskd_tf import backbones  # pylint: disable=g-import-not-at-top
    from cskd_tf import data  # pylint: disable=g-import-not-at-top

    augmenter = data.Augmenter(preset)
    channels = augmenter.input_shape[-1]
    fixed = augmenter.preset.eval_resize is None  # Inputs of one size, no resize.
    height = width = augmenter.preset.size if fixed else None
    both = backbones.feature_model(backbone)
    temperature = tf.constant(temperature, tf.float32)

    def check_shape(images, signature, size=(height, width), then=""):
        # Signatures do not enforce their shapes: a wrong one would fail deep in the graph, or
        # not at all (global pooling takes any size, normalisation broadcasts one channel).
        expected = f"[batch, {size[0] or 'H'}, {size[1] or 'W'}, {channels}]"
        shape = tf.shape(images)
        padded = tf.concat([shape, tf.fill([4], -1)], axis=0)
        ok = tf.logical_and(tf.equal(tf.size(shape), 4), tf.equal(padded[3], channels))
        if size[0] is not None:
            ok = tf.logical_and(ok, tf.reduce_all(tf.equal(padded[1:3], size)))
        return tf.debugging.Assert(
            ok,
            [
                f"{signature} takes float32 images {expected} of raw pixels in 0..255{then}; "
                "got shape",
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

    mean = tf.constant(augmenter.preset.mean, tf.float32)
    std = tf.constant(augmenter.preset.std, tf.float32)

    then = ", resized and centre-cropped as export_info.json says" if not fixed else ""

    def serve_pixels(images):
        # Batched, convertible ops only: Augmenter.eval's normalisation without its resize and
        # crop (the client's), no map_fn (a While loop) and no ensure_shape (TF.js). The
        # converters drop the Assert (their runtimes' own input checks then apply); it
        # stays for SavedModel users.
        with tf.control_dependencies(
            [check_shape(images, PIXELS_SIGNATURE, augmenter.input_shape[:2], then)]
        ):
            images = tf.identity(images)
        logits, pooled = both((images / 255.0 - mean) / std, training=False)
        return dict(outputs(logits), features=tf.cast(pooled, tf.float32))

    pixels = tf.TensorSpec([None, height, width, channels], tf.float32, name="images")
    encoded = tf.TensorSpec([None], tf.string, name="images")
    network = tf.TensorSpec([None, *augmenter.input_shape], tf.float32, name="images")
    return {
        "serving_default": (serve, [pixels]),
        "serve_bytes": (serve_bytes, [encoded]),
        "features": (features, [pixels]),
        PIXELS_SIGNATURE: (serve_pixels, [network]),
    }


def _pixels_info(preset):
    """What `export_info.json` says of `serve_pixels`: its input, and the resize and crop first."""
    resize = None
    if preset.eval_resize is not None:
        resize = dict(
            shorter_side=preset.eval_resize,
            new_size=(
                f"round(side * ({preset.eval_resize} / shorter side)) for the height and the "
                "width, in float32, halves to even"
            ),
            method=(
                "bilinear, antialiased: tf.image.resize(image, new_size, 'bilinear', "
                "antialias=True), whose triangle filter is widened by the downscale factor "
                "(pixel centres at +0.5, weights normalised per output pixel)"
            ),
            centre_crop=preset.size,
            crop_offset=f"(new side - {preset.size}) // 2, from the top and from the left",
        )
    return dict(
        shape=list(preset.input_shape),
        dtype="float32",
        values="raw pixels in 0..255"
        + (", resized and centre-cropped as `resize` says" if resize else ""),
        resize=resize,
    )


def _resize_weights(size_in, size_out):
    """The `[size_out, size_in]` weights of TensorFlow's antialiased bilinear resize along one axis.

    `ScaleAndTranslate` with its triangle kernel: output pixel `i` averages the
    input pixels whose centres lie within one output pixel of its centre
    `(i + 0.5) * size_in / size_out`, with weights falling linearly to zero (the
    triangle widened by the downscale factor when shrinking; plain bilinear
    interpolation when enlarging), normalised to sum to 1.
    """
    step = 1.0 / (np.float32(size_out) / np.float32(size_in))  # As TensorFlow: from float32.
    width = max(step, 1.0)
    centres = (np.arange(size_out) + 0.5) * step
    distance = np.abs(np.arange(size_in) + 0.5 - centres[:, None]) / width
    weights = np.maximum(0.0, 1.0 - distance)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_and_crop(image, info):
    """In numpy, what `serving_default` does to one image before `serve_pixels`' normalisation.

    For clients of `serve_pixels` and of the converted models, which take images
    at the network's input size: the resize and centre crop recorded in
    `export_info.json` (`serve_pixels.resize`), as two matrix products.

    Args:
      image: array `[H, W, C]` of raw pixels in 0..255 (uint8 or float).
      info: dict. The export's `export_info.json` (`read_info`).

    Returns:
      float32 array `[size, size, C]`: the input of `serve_pixels` (the image
      itself when the preset does not resize).
    """
    image = np.asarray(image, np.float32)
    recipe = info["serve_pixels"]["resize"]
    if recipe is None:
        return image
    height, width = image.shape[:2]
    scale = np.float32(recipe["shorter_side"]) / np.float32(min(height, width))
    new_height, new_width = (int(np.round(np.float32(side) * scale)) for side in (height, width))
    crop = recipe["centre_crop"]
    top, left = (new_height - crop) // 2, (new_width - crop) // 2
    rows = _resize_weights(height, new_height)[top : top + crop]  # [crop, H]
    cols = _resize_weights(width, new_width)[left : left + crop]  # [crop, W]
    out = rows @ image.transpose(2, 0, 1) @ cols.T  # [C, crop, crop]
    return out.transpose(1, 2, 0).astype(np.float32)


def _missing(fmt):
    """The packages `fmt` needs that are not installed."""
    needs = {"tflite": (), "onnx": ("tf2onnx", "onnxruntime")}[fmt]
    return [name for name in needs if importlib.util.find_spec(name) is None]


def _check_formats(formats):
    """`formats` (names, or one comma-separated string) as a list without repeats."""
    if isinstance(formats, str):
        formats = formats.split(",")
    formats = list(dict.fromkeys(f.strip() for f in formats if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    _check(
        not unknown,
        f"--format takes tflite, onnx or both (tflite,onnx); got {', '.join(unknown)}.",
    )
    for fmt in formats:
        missing = _missing(fmt)
        _check(
            not missing,
            f"--format={fmt} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install "
            "-r requirements-test.txt (it pins versions that work with this TensorFlow).",
        )
    return formats


def _onnx_nodes(graph):
    """Every node of an ONNX graph, those of its loops' and conditionals' bodies included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                yield from _onnx_nodes(sub)


def _to_tflite(saved_model_dir, signature, path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=[signature]
    )
    # Builtin ops only: a Flex op would need the TensorFlow-linked runtime on the device.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        content = converter.convert()
    except Exception as err:  # pylint: disable=broad-except; ConverterError holds MLIR's log.
        ops = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor", str(err))))
        lines = [line.strip() for line in str(err).splitlines() if "error:" in line]
        what = f"unsupported ops {', '.join(ops)}" if ops else (lines or [str(err)])[0]
        raise UserError(
            f"TFLite cannot convert the signature {signature} with builtin ops only: {what}."
        ) from None
    with open(path, "wb") as f:
        f.write(content)


def _to_onnx(saved_model_dir, signature, path):
    import onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top

    # tf2onnx's command line, in its own process (it switches TensorFlow to graph mode). An op it
    # cannot map is only logged as "Unsupported ops": it then says "Successfully converted",
    # exits 0 and leaves the TensorFlow op in a model that onnxruntime cannot load. Hence the
    # log and the written model are both checked.
    command = [
        sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved_model_dir, "--tag",
        "serve", "--signature_def", signature, "--opset", str(ONNX_OPSET), "--output", path,
    ]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    log = proc.stdout + proc.stderr
    ops = set()
    for counter in re.findall(r"Unsupported ops: Counter\((\{.*?\})\)", log):
        ops.update(re.findall(r"'(\w+)'", counter))
    ops.update(re.findall(r"Tensorflow op \[.*?: (\w+)\] is not supported", log))
    if proc.returncode == 0 and not ops and os.path.isfile(path):
        model = onnx.load(path)
        ops.update(
            node.op_type
            for node in _onnx_nodes(model.graph)
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type, node.domain)
        )
    if ops or proc.returncode != 0 or not os.path.isfile(path):
        if os.path.exists(path):
            os.remove(path)
        lines = [line for line in log.splitlines() if "ERROR" in line or "Error" in line]
        what = f"unsupported ops {', '.join(sorted(ops))}" if ops else (lines or ["failed"])[-1]
        raise UserError(f"tf2onnx cannot convert the signature {signature}: {what}.")
    try:
        onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as err:  # pylint: disable=broad-except
        os.remove(path)
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"onnxruntime cannot load the ONNX model of the signature {signature}: {first}"
        ) from None


def convert(saved_model_dir, fmt, path, signature=PIXELS_SIGNATURE):
    """Converts one signature of a SavedModel to a TFLite or an ONNX file.

    TFLite: `TFLiteConverter` with builtin ops only (no Flex ops, so TFLite's
    and LiteRT's plain runtimes run it). ONNX: tf2onnx at opset `ONNX_OPSET`,
    checked in its log and in the written model for ops it could not map, and
    loaded once with onnxruntime.

    Args:
      saved_model_dir: str. A SavedModel, e.g. an export folder.
      fmt: str. `tflite` or `onnx`.
      path: str. File to write.
      signature: str. Signature to convert; only `serve_pixels` converts for
        every preset (the others resize or loop).

    Raises:
      UserError: if an op does not convert, or a package is missing; nothing
        is written then.
    """
    (fmt,) = _check_formats([fmt])
    {"tflite": _to_tflite, "onnx": _to_onnx}[fmt](saved_model_dir, signature, path)


def _tflite_interpreter(path):
    """LiteRT's interpreter (`ai-edge-litert`) if installed, else TensorFlow's deprecated one."""
    try:
        from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top

        return interpreter.Interpreter(model_path=path)
    except ImportError:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated": it still runs.
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=path)


def run_converted(path, images, signature=PIXELS_SIGNATURE):
    """The outputs of a converted file (`.tflite` or `.onnx`) on a batch of images.

    Args:
      path: str. File written by `convert`.
      images: float32 array `[batch, size, size, C]`, raw pixels in 0..255.
      signature: str. The converted signature (TFLite files keep its name).

    Returns:
      dict: output name (`probabilities`, `logits`, `features`) -> array.
    """
    images = np.asarray(images, np.float32)
    if path.endswith(".tflite"):
        runner = _tflite_interpreter(path).get_signature_runner(signature)
        return {name: np.asarray(value) for name, value in runner(images=images).items()}
    import onnxruntime  # pylint: disable=g-import-not-at-top

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images})))


def _convert_all(saved_model_dir, formats, preset):
    """Writes each format's file into `saved_model_dir`; checks it against the SavedModel.

    Returns:
      dict: format -> what `export_info.json` records of its file.
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    if not formats:
        return {}
    signature = tf.saved_model.load(saved_model_dir).signatures[PIXELS_SIGNATURE]
    # Two images, so that a batch other than the converter's example batch of 1 is checked.
    images = np.random.default_rng(0).uniform(0, 255, (2, *preset.input_shape)).astype(np.float32)
    expected = {k: v.numpy() for k, v in signature(images=tf.constant(images)).items()}
    converted = {}
    for fmt in formats:
        path = os.path.join(saved_model_dir, FORMATS[fmt])
        convert(saved_model_dir, fmt, path)
        got = run_converted(path, images)
        diff = max(float(np.max(np.abs(got[k] - v))) for k, v in expected.items())
        scale = max(1.0, max(float(np.max(np.abs(v))) for v in expected.values()))
        _check(
            diff <= CONVERSION_TOLERANCE * scale,
            f"The {fmt} model of {PIXELS_SIGNATURE} differs from the SavedModel by {diff:.3g} "
            "on the same images, more than converters' rounding: nothing was written.",
        )
        if fmt == "tflite":
            converter = f"TFLiteConverter of tensorflow {tf.__version__}, builtin ops only"
        else:
            import tf2onnx  # pylint: disable=g-import-not-at-top

            converter = f"tf2onnx {tf2onnx.__version__}, opset {ONNX_OPSET}"
        converted[fmt] = dict(
            file=FORMATS[fmt],
            signature=PIXELS_SIGNATURE,
            converter=converter,
            max_abs_diff_from_saved_model=diff,
        )
    return converted


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


def export(
    workdir,
    export_dir,
    checkpoint="last",
    calibrate=False,
    batch_size=256,
    formats=(),
    version=None,
):
    """Writes `export_dir`: the SavedModel, `model.keras`, `export_info.json` and converted files.

    The folder appears whole or not at all: everything is written to a
    temporary folder beside it, converted and checked there, and renamed at
    the end.

    Args:
      workdir: str. Run folder of `cskd_tf.train`.
      export_dir: str. New folder (an existing empty one is replaced); with
        `version`, the model's folder for TF Serving, which may hold other
        versions.
      checkpoint: str. `last` or `best` (`best` needs a run with `--val_split`).
      calibrate: bool. Fit a temperature on the run's validation split.
      batch_size: int. Batch size of the calibration pass.
      formats: iterable of str (or one comma-separated str). `tflite`, `onnx`:
        convert `serve_pixels` to `model.tflite` / `model.onnx` beside the
        SavedModel, each checked against it on the same images.
      version: int or None. Write everything into `export_dir/<version>/`, the
        layout TF Serving reads (`--model_base_path=export_dir`).

    Returns:
      dict: what `export_info.json` holds.

    Raises:
      UserError: on a missing run, checkpoint or validation split, an
        existing, non-empty export folder, an unknown format, a missing
        converter, or an op that does not convert.
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
    formats = _check_formats(formats)
    settings = train.read_flagfile(os.path.join(workdir, "flags.txt"))
    path = os.path.join(workdir, "checkpoints", f"{checkpoint}.keras")
    hint = " (best.keras needs a run with --val_split)" if checkpoint == "best" else ""
    _check(os.path.isfile(path), f"{path} does not exist{hint}.")
    _check(
        not (os.path.exists(export_dir) and not os.path.isdir(export_dir)),
        f"--export_dir={export_dir} is a file; name a new folder.",
    )
    target = export_dir
    if version is not None:
        _check(
            isinstance(version, int) and not isinstance(version, bool) and version >= 0,
            f"--version must be a whole number of 0 or more (TF Serving's version folder), "
            f"got {version}.",
        )
        _check(
            not os.path.isfile(os.path.join(export_dir, "saved_model.pb")),
            f"--export_dir={export_dir} is a SavedModel itself: with --version, name the "
            "model's folder that holds the numbered versions (TF Serving's model base path).",
        )
        target = os.path.join(export_dir, str(version))
        _check(
            not (os.path.exists(target) and not os.path.isdir(target)),
            f"{target} is a file; pass another --version.",
        )
    again = "another --version" if version is not None else "another --export_dir"
    _check(
        not (os.path.isdir(target) and os.listdir(target)),
        f"The export folder {target} already exists and is not empty: pass {again} or "
        "remove it.",
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
    # With --version the staging folder is inside the model's folder: TF Serving only loads
    # folders named by a number, and sees the version appear whole, by the rename.
    parent = os.path.dirname(os.path.abspath(target))
    made = _make_folders(parent)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        archive = keras.export.ExportArchive()
        archive.track(backbone)
        for name, (fn, signature) in _serving_functions(backbone, preset, temperature).items():
            archive.add_endpoint(name, fn, input_signature=signature)
        archive.write_out(staging, verbose=False)
        backbone.save(os.path.join(staging, KERAS_FILE))
        converted = _convert_all(staging, formats, preset)
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
            signatures={
                "serving_default": "images float32 [batch, H, W, C] -> probabilities, logits",
                "serve_bytes": "images string [batch] (JPEG or PNG) -> probabilities, logits",
                "features": "images float32 [batch, H, W, C] -> features",
                PIXELS_SIGNATURE: (
                    f"images float32 [batch, {preset.size}, {preset.size}, {preset.channels}] "
                    "(resized and cropped already) -> probabilities, logits, features"
                ),
            },
            serve_pixels=_pixels_info(preset),
            converted=converted,
            version=version,
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from a server's user.
        if os.path.isdir(target):
            os.rmdir(target)  # Empty, checked above.
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise
    return info


def _make_folders(folder):
    """Creates `folder` and its missing parents; returns the ones created, outermost first."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(missing):
        os.mkdir(path)
    return missing[::-1]


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


# --- The command line (tools/export.py, cskd-export) ------------------------------------------

_FLAGS = {}


def define_flags(flag_values=None):
    """Defines `cskd-export`'s flags on `flag_values` (absl's global ones by default)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    fv = dict(flag_values=flag_values or flags.FLAGS)
    return dict(
        workdir=flags.DEFINE_string(
            "workdir", None, "Run folder of cskd_tf.train.", required=True, **fv
        ),
        export_dir=flags.DEFINE_string(
            "export_dir", None, "New export folder; unset: WORKDIR/export.", **fv
        ),
        checkpoint=flags.DEFINE_enum(
            "checkpoint",
            "last",
            ("last", "best"),
            "Checkpoint to export (best needs --val_split).",
            **fv,
        ),
        calibrate=flags.DEFINE_bool(
            "calibrate",
            False,
            "Fit a temperature on the validation split (temperature scaling).",
            **fv,
        ),
        format=flags.DEFINE_list(
            "format",
            [],
            "Also convert serve_pixels: tflite (model.tflite, builtin ops), onnx (model.onnx, "
            "needs tf2onnx and onnxruntime) or tflite,onnx; each is checked against the "
            "SavedModel.",
            **fv,
        ),
        version=flags.DEFINE_integer(
            "version",
            None,
            "Write into EXPORT_DIR/VERSION/ (TF Serving's numbered version folder).",
            **fv,
        ),
    )


def main(argv):
    """Exports `--workdir` as the flags say and prints what was written."""
    from absl import logging  # pylint: disable=g-import-not-at-top

    from cskd_tf import cli as cli_lib  # pylint: disable=g-import-not-at-top

    cli_lib.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs every saved function at INFO.
    values = {name: flag.value for name, flag in _FLAGS.items()}
    workdir, version = values["workdir"], values["version"]
    export_dir = values["export_dir"] or os.path.join(workdir, "export")
    info = export(
        workdir,
        export_dir,
        values["checkpoint"],
        values["calibrate"],
        formats=values["format"],
        version=version,
    )
    folder = export_dir if version is None else os.path.join(export_dir, str(version))
    print(f"Wrote {folder}: signatures {', '.join(info['signatures'])}.")
    for converted in info["converted"].values():
        print(
            f"Converted {converted['signature']} to {os.path.join(folder, converted['file'])} "
            f"({converted['converter']}): max |difference| from the SavedModel "
            f"{converted['max_abs_diff_from_saved_model']:.1e}."
        )
    if info["calibration"]:
        c = info["calibration"]
        print(
            f"Temperature {c['temperature']:.4f}: validation ECE {100 * c['val_ece_before']:.2f}% "
            f"-> {100 * c['val_ece_after']:.2f}%, NLL {c['val_nll_before']:.4f} -> "
            f"{c['val_nll_after']:.4f}."
        )


def cli():
    """`cskd-export` and `tools/export.py`."""
    from cskd_tf import cli as cli_lib  # pylint: disable=g-import-not-at-top

    _FLAGS.update(define_flags())
    cli_lib.run(main)

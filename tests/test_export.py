import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special

from cskd_tf import callbacks
from cskd_tf import data
from cskd_tf import evaluate
from cskd_tf import export
from cskd_tf import train
from cskd_tf.data import augment
from cskd_tf.data import sources
from cskd_tf.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: only TensorFlow and the export folder.
RELOAD = """
import sys
import numpy as np
import tensorflow as tf

loaded = tf.saved_model.load(sys.argv[1])
arrays = np.load(sys.argv[2])
pixels = tf.constant(arrays["pixels"])
encoded = tf.constant([bytes(b) for b in arrays["png"]])
np.savez(
    sys.argv[3],
    probabilities=loaded.signatures["serving_default"](images=pixels)["probabilities"].numpy(),
    logits=loaded.signatures["serving_default"](images=pixels)["logits"].numpy(),
    bytes_probabilities=loaded.signatures["serve_bytes"](images=encoded)["probabilities"].numpy(),
    features=loaded.signatures["features"](images=pixels)["features"].numpy(),
)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short CS-KD run on digits with a validation split, and its two exports."""
    root = tmp_path_factory.mktemp("export")
    workdir = str(root / "run")
    train.run(
        dataset="digits",
        backbone="small_convnet",
        epochs=3,
        batch_size=64,
        val_split=0.1,
        workdir=workdir,
        verbose=0,
    )
    plain = str(root / "plain")
    calibrated = str(root / "calibrated")
    export.export(workdir, plain)
    export.export(workdir, calibrated, calibrate=True)
    return dict(workdir=workdir, plain=plain, calibrated=calibrated)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def in_memory(workdir, images):
    """The run's last checkpoint on the evaluation pipeline: logits and features."""
    model = keras.models.load_model(os.path.join(workdir, "checkpoints", "last.keras"))
    augmenter = data.Augmenter("digits")
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(len(images), np.int64)))
    ds = ds.map(lambda x, y: (augmenter.eval(x), y)).batch(64)
    return callbacks.predict(model, ds)


@pytest.mark.slow
def test_fresh_process_reload_serves_what_the_model_computes(run, tmp_path):
    test = sources.load_digits().test
    pixels = test.values.astype(np.float32)  # uint8 values as float32: raw 0..255.
    # Fixed-width bytes (a PNG ends in its IEND checksum, never in the NULs numpy strips).
    pngs = np.array([tf.io.encode_png(image).numpy() for image in test.values])
    np.savez(tmp_path / "inputs.npz", pixels=pixels, png=pngs)
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD, run["plain"], tmp_path / "inputs.npz", tmp_path / "o.npz"],
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp_path / "o.npz")
    expected = in_memory(run["workdir"], test.values)
    np.testing.assert_allclose(served["logits"], expected.logits, atol=1e-5)
    np.testing.assert_allclose(
        served["probabilities"], special.softmax(expected.logits, axis=-1), atol=1e-5
    )
    np.testing.assert_allclose(served["bytes_probabilities"], served["probabilities"], atol=1e-5)
    np.testing.assert_allclose(served["features"], expected.features, atol=1e-5)
    np.testing.assert_allclose(served["probabilities"].sum(-1), 1.0, atol=1e-5)
    # The served model's accuracy on the demo test split is the run's.
    metrics = read_json(os.path.join(run["workdir"], "metrics.json"))
    error = np.mean(served["probabilities"].argmax(-1) != test.labels)
    assert error == pytest.approx(metrics["top1_error"], abs=1e-12)


def test_export_folder_holds_a_keras_file_and_its_description(run):
    info = read_json(os.path.join(run["plain"], export.INFO_FILE))
    assert info["dataset"] == "digits" and info["num_classes"] == 10
    assert info["class_names"] == [str(i) for i in range(10)]
    assert info["input"]["shape"] == [8, 8, 1]
    assert info["temperature"] == 1.0 and info["calibration"] is None
    assert info["run_metrics"] == read_json(os.path.join(run["workdir"], "metrics.json"))
    assert set(info["signatures"]) == {"serving_default", "serve_bytes", "features", "serve_pixels"}
    assert info["serve_pixels"] == dict(
        shape=[8, 8, 1], dtype="float32", values="raw pixels in 0..255", resize=None
    )
    assert info["converted"] == {} and info["version"] is None
    reloaded = keras.models.load_model(os.path.join(run["plain"], export.KERAS_FILE))
    images = sources.load_digits().test.values[:16]
    normalised = tf.stack([data.Augmenter("digits").eval(i) for i in images])
    np.testing.assert_allclose(
        reloaded(normalised).numpy(), in_memory(run["workdir"], images).logits, atol=1e-5
    )


def test_calibration_fits_the_nll_optimal_temperature_and_lowers_validation_ece(run):
    info = read_json(os.path.join(run["calibrated"], export.INFO_FILE))
    calibration = info["calibration"]
    assert calibration["val_ece_after"] < calibration["val_ece_before"]
    assert calibration["val_nll_after"] <= calibration["val_nll_before"]
    # Independently: the NLL over a fine grid of temperatures on the validation logits.
    settings = train.read_flagfile(os.path.join(run["workdir"], "flags.txt"))
    _, val = data.stratified_split(sources.load_digits().train, settings["val_split"], seed=0)
    out = in_memory(run["workdir"], val.values)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 20001))
    log_probs = special.log_softmax(out.logits[None] / grid[:, None, None], axis=-1)
    nll = -log_probs[:, np.arange(len(val.labels)), val.labels].mean(axis=1)
    assert calibration["temperature"] == pytest.approx(grid[nll.argmin()], rel=1e-3)
    assert calibration["val_examples"] == len(val.labels)
    # The temperature is baked into the served probabilities, not into the logits.
    loaded = tf.saved_model.load(run["calibrated"])
    images = tf.constant(val.values.astype(np.float32))
    served = loaded.signatures["serving_default"](images=images)
    np.testing.assert_allclose(served["logits"].numpy(), out.logits, atol=1e-5)
    np.testing.assert_allclose(
        served["probabilities"].numpy(),
        special.softmax(out.logits / calibration["temperature"], axis=-1),
        atol=1e-5,
    )


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=3.0, size=(20_000, 5))
    probs = special.softmax(true_logits, axis=-1)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    # Logits 2.5 times too large are undone by T = 2.5.
    assert export.fit_temperature(2.5 * true_logits, labels) == pytest.approx(2.5, rel=0.05)


@pytest.mark.parametrize(
    "images,message",
    [
        (tf.zeros([2, 9, 9, 1]), "serving_default takes float32 images [batch, 8, 8, 1]"),
        (tf.zeros([2, 8, 8]), "serving_default takes float32 images [batch, 8, 8, 1]"),
        (tf.zeros([2, 8, 8, 1], tf.int32), "expected to be a float tensor but is a int32"),
        (tf.constant([b"not an image"]), "serve_bytes takes JPEG or PNG files"),
    ],
)
def test_wrong_input_gives_one_clear_message(run, images, message):
    loaded = tf.saved_model.load(run["plain"])
    name = "serve_bytes" if images.dtype == tf.string else "serving_default"
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        loaded.signatures[name](images=images)
    assert message in str(err.value)


def test_serve_pixels_is_serving_default_at_the_networks_size(run):
    # Digits have no resize: serve_pixels (the converters' signature) serves the same numbers,
    # the fitted temperature included, plus the features.
    loaded = tf.saved_model.load(run["calibrated"])
    pixels = tf.constant(sources.load_digits().test.values.astype(np.float32))
    default = loaded.signatures["serving_default"](images=pixels)
    served = loaded.signatures["serve_pixels"](images=pixels)
    for key in ("probabilities", "logits"):
        np.testing.assert_allclose(served[key].numpy(), default[key].numpy(), atol=1e-5)
    features = loaded.signatures["features"](images=pixels)["features"]
    np.testing.assert_allclose(served["features"].numpy(), features.numpy(), atol=1e-5)
    layer = keras.layers.TFSMLayer(run["calibrated"], call_endpoint="serve_pixels")
    np.testing.assert_allclose(
        layer(pixels)["probabilities"].numpy(), default["probabilities"].numpy(), atol=1e-5
    )


@pytest.mark.parametrize(
    "shape", [[2, 9, 9, 1], [2, 8, 8, 3], [2, 8, 8]]  # Wrong size, wrong channels, no channels.
)
def test_serve_pixels_wrong_shape_gives_one_clear_message(run, shape):
    # Without the check, global pooling would take any size and the normalisation would
    # broadcast a wrong channel count: numbers, but wrong ones.
    loaded = tf.saved_model.load(run["plain"])
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        loaded.signatures["serve_pixels"](images=tf.zeros(shape))
    assert "serve_pixels takes float32 images [batch, 8, 8, 1] of raw pixels in 0..255" in str(
        err.value
    )


def info_of(preset):
    """The `export_info.json` entries `resize_and_crop` reads, for a preset's export."""
    pixels = export._pixels_info(data.PRESETS[preset])  # pylint: disable=protected-access
    return {"serve_pixels": pixels}


@pytest.mark.parametrize(
    "shape",
    [(480, 640), (640, 480), (300, 257), (1000, 333), (40, 48), (224, 224), (256, 256), (1, 7)],
)
def test_resize_and_crop_is_the_eval_pipelines_resize_and_crop_in_numpy(shape):
    # Shrinking (antialiased), enlarging (plain bilinear) and a resize by 1, against the
    # TensorFlow code that serving_default runs.
    image = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    got = export.resize_and_crop(image, info_of("imagenet"))
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
    expected = data.Augmenter("imagenet").eval(image).numpy()
    # 2e-4 after normalisation: 0.01 of a level of 0..255, float32 rounding of the positions.
    np.testing.assert_allclose((got / 255 - mean) / std, expected, atol=2e-4)


def test_resize_and_crop_known_answers():
    info = info_of("imagenet")
    # Shorter side 256 already: only the centre crop.
    image = np.arange(256 * 300 * 3, dtype=np.float32).reshape(256, 300, 3) % 251
    np.testing.assert_array_equal(export.resize_and_crop(image, info), image[16:240, 38:262])
    # A constant image stays constant (the weights of every output pixel sum to 1).
    np.testing.assert_allclose(export.resize_and_crop(np.full((480, 640, 1), 7.0), info), 7.0)
    # Halving: each output pixel of a 512-pixel side averages a 4-pixel triangle window.
    weights = export._resize_weights(512, 256)  # pylint: disable=protected-access
    np.testing.assert_allclose(weights[10, 19:23], [1 / 8, 3 / 8, 3 / 8, 1 / 8])
    assert weights[10].sum() == pytest.approx(1.0) and np.count_nonzero(weights[10]) == 4
    # Digits: no resize, the image itself.
    image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
    np.testing.assert_array_equal(export.resize_and_crop(image, info_of("digits")), image)


def test_a_missing_converter_is_one_sentence_before_anything_is_written(
    run, tmp_path, monkeypatch
):
    find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util,
        "find_spec",
        lambda name: None if name == "tf2onnx" else find_spec(name),
    )
    with pytest.raises(UserError, match=r"--format=onnx needs tf2onnx, which is not installed"):
        export.export(run["workdir"], str(tmp_path / "x"), formats="tflite,onnx")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_evaluate_scores_an_export_as_its_run(run, tmp_path):
    result = evaluate.run([run["plain"]], out=str(tmp_path / "e"))
    scores = next(iter(result["metrics"].values()))
    own = read_json(os.path.join(run["workdir"], "metrics.json"))
    for key in ("top1_error", "top5_error", "nll", "ece", "recall_at_1"):
        assert scores[key] == pytest.approx(own[key], abs=1e-5), key


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(workdir="{tmp}/nope"), "does not exist"),
        (dict(export_dir="{plain}"), "already exists and is not empty"),
        (dict(checkpoint="best", workdir="{nobest}"), "best.keras needs a run with --val_split"),
        (dict(calibrate=True, workdir="{nobest}"), "--calibrate fits the temperature"),
        (dict(formats="tflite,pb"), "--format takes tflite, onnx or both"),
        (dict(version=-1), "--version must be a whole number"),
        (dict(export_dir="{plain}", version=1), "is a SavedModel itself"),
    ],
)
def test_mistakes_raise_one_sentence_and_write_nothing(run, tmp_path, kwargs, message):
    nobest = tmp_path / "nobest"  # A run folder without a validation split.
    (nobest / "checkpoints").mkdir(parents=True)
    (nobest / "checkpoints" / "last.keras").write_bytes(b"")
    flags = open(os.path.join(run["workdir"], "flags.txt")).read()
    (nobest / "flags.txt").write_text(flags.replace("--val_split=0.1", "--val_split=0.0"))
    names = dict(tmp=tmp_path, plain=run["plain"], nobest=nobest)
    kwargs = {k: v.format(**names) if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs = dict(dict(workdir=run["workdir"], export_dir=str(tmp_path / "out")), **kwargs)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(os.path.dirname(run["plain"])))
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        export.export(**kwargs)
    after = sorted(os.listdir(tmp_path)), sorted(os.listdir(os.path.dirname(run["plain"])))
    assert after == before


@pytest.mark.slow
def test_tool_exports_and_answers_mistakes_with_status_2(run, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "tools/export.py", f"--workdir={run['workdir']}"]
    ok = subprocess.run(
        [*command, f"--export_dir={tmp_path / 'x'}", "--calibrate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "signatures serving_default, serve_bytes, features" in ok.stdout
    assert "validation ECE" in ok.stdout
    assert export.is_export(str(tmp_path / "x"))
    bad = subprocess.run(
        [*command, f"--export_dir={run['plain']}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: The export folder {run['plain']} already exists")
    )
    assert "Traceback" not in bad.stderr


def test_readme_serving_snippet_runs(run, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Export for serving") :]
    code = section[section.index("```python\n") + 10 :]
    code = code[: code.index("```")].replace("runs/digits-cskd-s0/export", run["plain"])
    exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["(2, 10)", "(2, 64)"]


@pytest.mark.slow
def test_image_folder_export_resizes_and_crops_inside(tmp_path):
    # 224-pixel preset: raw images of any size, resized to 256 and centre-cropped inside.
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, n in {"ant": 3, "bee": 2}.items():
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
                (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    workdir = str(tmp_path / "run")
    train.run(
        dataset="folder",
        data_dir=str(tmp_path / "data"),
        backbone="mlp",
        epochs=1,
        batch_size=2,
        workdir=workdir,
        verbose=0,
    )
    export.export(workdir, str(tmp_path / "x"))
    loaded = tf.saved_model.load(str(tmp_path / "x"))
    files = sorted((tmp_path / "data" / "test").rglob("*.png"))
    encoded = [f.read_bytes() for f in files]
    decoded = [tf.io.decode_png(e) for e in encoded]
    model = keras.models.load_model(os.path.join(workdir, "checkpoints", "last.keras"))
    augmenter = data.Augmenter("imagenet")
    expected = special.softmax(
        model(tf.stack([augmenter.eval(d) for d in decoded])).numpy(), axis=-1
    )
    served = loaded.signatures["serve_bytes"](images=tf.constant(encoded))["probabilities"]
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-5)
    same_size = tf.cast(tf.stack([decoded[0], decoded[3]]), tf.float32)  # Both 40 x 48.
    pixels = loaded.signatures["serving_default"](images=same_size)["probabilities"]
    np.testing.assert_allclose(pixels.numpy(), expected[[0, 3]], atol=1e-5)
    scores = next(
        iter(evaluate.run([str(tmp_path / "x")], out=str(tmp_path / "e"))["metrics"].values())
    )
    own = read_json(os.path.join(workdir, "metrics.json"))
    assert scores["nll"] == pytest.approx(own["nll"], rel=1e-4)  # Resized in another graph.
    for key in ("top1_error", "recall_at_1"):
        assert scores[key] == pytest.approx(own[key], abs=1e-9), key

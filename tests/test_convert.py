"""Converted exports (`tools/export.py --format=tflite,onnx`): they serve the SavedModel's outputs.

Each converted file is run with its own runtime, as a client would (TensorFlow's and
LiteRT's TFLite interpreters, onnxruntime), not through `export.run_converted`.
Needs `requirements-test.txt` (tf2onnx, onnxruntime, ai-edge-litert).
"""

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from ai_edge_litert import interpreter as litert

from cskd_tf import export
from cskd_tf import train
from cskd_tf.data import augment
from cskd_tf.data import sources
from cskd_tf.errors import UserError

pytestmark = [
    pytest.mark.slow,  # Each fixture trains a run and converts its export.
    # The deprecated interpreter is one of the runtimes checked: it still runs.
    pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = ("probabilities", "logits", "features")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A digits run with a validation split and its calibrated export, converted to both formats."""
    root = tmp_path_factory.mktemp("digits")
    workdir = str(root / "run")
    train.run(
        dataset="digits",
        backbone="small_convnet",
        epochs=1,
        batch_size=64,
        val_split=0.1,
        workdir=workdir,
        verbose=0,
    )
    folder = str(root / "export")
    info = export.export(workdir, folder, calibrate=True, formats=("tflite", "onnx"))
    return dict(workdir=workdir, folder=folder, info=info)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A 224-pixel image-folder run (uncalibrated export, both formats) and test photos."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, n in {"ant": 3, "bee": 2}.items():
            folder = root / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
                (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    workdir = str(root / "run")
    train.run(
        dataset="folder",
        data_dir=str(root / "data"),
        backbone="small_convnet",
        epochs=1,
        batch_size=2,
        workdir=workdir,
        verbose=0,
    )
    folder = str(root / "export")
    info = export.export(workdir, folder, formats="tflite,onnx")
    # Shrunk (a 480 x 640 photo, an odd size), enlarged (40 x 48) and kept (256 x 300).
    images = [
        rng.integers(0, 256, size=shape, dtype=np.uint8)
        for shape in [(480, 640, 3), (300, 257, 3), (40, 48, 3), (256, 300, 3)]
    ]
    return dict(workdir=workdir, folder=folder, info=info, images=images)


def saved_model_outputs(folder, signature, images):
    outputs = tf.saved_model.load(folder).signatures[signature](images=tf.constant(images))
    return {k: v.numpy() for k, v in outputs.items()}


def run_tflite(make_interpreter, path, images):
    runner = make_interpreter(model_path=path).get_signature_runner(export.PIXELS_SIGNATURE)
    return runner(images=images)


def run_onnx(path, images):
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": images})))


def converted_outputs(folder, images):
    """Each converted file's outputs on `images`, by runtime."""
    return {
        "tf.lite": run_tflite(tf.lite.Interpreter, os.path.join(folder, "model.tflite"), images),
        "ai_edge_litert": run_tflite(
            litert.Interpreter, os.path.join(folder, "model.tflite"), images
        ),
        "onnxruntime": run_onnx(os.path.join(folder, "model.onnx"), images),
    }


def max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in OUTPUTS)


def assert_builtin_ops_only(folder):
    """No Flex (TensorFlow) op in the TFLite file; only ops that ONNX defines in the ONNX file."""
    tflite = litert.Interpreter(model_path=os.path.join(folder, "model.tflite"))
    details = tflite._get_ops_details()  # pylint: disable=protected-access
    tflite_ops = {op["op_name"] for op in details}
    assert tflite_ops and not any(op.startswith("Flex") or op == "CUSTOM" for op in tflite_ops)
    model = onnx.load(os.path.join(folder, "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert all(onnx.defs.has(node.op_type, node.domain) for node in model.graph.node)
    assert [i.name for i in model.graph.input] == ["images"]


def test_digits_export_converts_and_serves_the_saved_models_outputs(digits):
    folder, info = digits["folder"], digits["info"]
    for name in ("model.tflite", "model.onnx", "saved_model.pb", export.KERAS_FILE):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert_builtin_ops_only(folder)
    assert info["temperature"] != 1.0  # Calibrated: the converted files carry the temperature.
    assert set(info["converted"]) == {"tflite", "onnx"}
    assert all(c["max_abs_diff_from_saved_model"] < 1e-5 for c in info["converted"].values())
    pixels = sources.load_digits().test.values.astype(np.float32)  # Raw 0..255, 8 x 8 x 1.
    expected = saved_model_outputs(folder, export.PIXELS_SIGNATURE, pixels)
    # At the network's size, serve_pixels is serving_default (and features).
    default = saved_model_outputs(folder, "serving_default", pixels)
    default["features"] = saved_model_outputs(folder, "features", pixels)["features"]
    assert max_diff(expected, default) < 1e-5
    for batch in (pixels, pixels[:1]):  # The whole split, and the converters' batch of 1.
        reference = {k: v[: len(batch)] for k, v in expected.items()}
        for runtime, got in converted_outputs(folder, batch).items():
            assert max_diff(got, reference) < 1e-5, runtime


def test_image_folder_export_converts_and_serves_photos_resized_by_the_recipe(photos):
    folder, info = photos["folder"], photos["info"]
    assert_builtin_ops_only(folder)
    assert info["serve_pixels"]["shape"] == [224, 224, 3]
    assert info["serve_pixels"]["resize"]["shorter_side"] == 256
    assert all(c["max_abs_diff_from_saved_model"] < 1e-5 for c in info["converted"].values())
    default, tf_recipe, numpy_recipe = [], [], []
    for image in photos["images"]:  # Sizes differ: serving_default one photo at a time.
        x = tf.cast(image, tf.float32)
        out = saved_model_outputs(folder, "serving_default", x[None])
        out["features"] = saved_model_outputs(folder, "features", x[None])["features"]
        default.append(out)
        tf_recipe.append(augment.center_crop(augment.resize_shorter_side(x, 256), 224).numpy())
        numpy_recipe.append(export.resize_and_crop(image, info))
    default = {k: np.concatenate([d[k] for d in default]) for k in OUTPUTS}
    # TensorFlow's own resize and crop, then serve_pixels: serving_default's numbers.
    served = saved_model_outputs(folder, "serve_pixels", np.stack(tf_recipe))
    assert max_diff(served, default) < 1e-5
    # A photo whose shorter side is 256 is only cropped (a resize by 1 is the identity).
    kept = photos["images"][3][16:240, 38:262].astype(np.float32)[None]
    assert np.array_equal(numpy_recipe[3], kept[0])
    one = {k: v[3:] for k, v in default.items()}
    assert max_diff(saved_model_outputs(folder, "serve_pixels", kept), one) < 1e-5
    # The converted files on the numpy recipe: the SavedModel's serve_pixels and serving_default.
    pixels = np.stack(numpy_recipe)
    expected = saved_model_outputs(folder, "serve_pixels", pixels)
    for runtime, got in converted_outputs(folder, pixels).items():
        assert max_diff(got, expected) < 1e-5, runtime
        np.testing.assert_allclose(got["probabilities"], default["probabilities"], atol=1e-5)


def test_an_op_that_does_not_convert_fails_the_conversion_whatever_tf2onnx_prints(
    photos, tmp_path
):
    # serving_default of a 224-pixel export resizes with ScaleAndTranslate: tf2onnx logs it as
    # unsupported, says "Successfully converted" and exits 0; TFLite rejects it.
    for fmt in ("onnx", "tflite"):
        path = str(tmp_path / f"model.{fmt}")
        with pytest.raises(UserError, match=r"cannot convert the signature serving_default.*"
                                            r"unsupported ops.*ScaleAndTranslate"):
            export.convert(photos["folder"], fmt, path, signature="serving_default")
        assert not os.path.exists(path)


def test_version_writes_tf_servings_layout_and_each_version_whole(digits, tmp_path):
    base = str(tmp_path / "models" / "cskd")
    export.export(digits["workdir"], base, version=1)
    info = export.export(digits["workdir"], base, version=2, formats="tflite")
    assert sorted(os.listdir(base)) == ["1", "2"]  # No staging folder left behind.
    assert info["version"] == 2 and set(info["converted"]) == {"tflite"}
    for version in ("1", "2"):
        assert export.is_export(os.path.join(base, version))
        assert os.path.isfile(os.path.join(base, version, export.KERAS_FILE))
    assert os.path.isfile(os.path.join(base, "2", "model.tflite"))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(base, "1")).st_mode & 0o777 == 0o777 & ~umask  # Not mkdtemp's 700.
    with pytest.raises(UserError, match="already exists and is not empty: pass another --version"):
        export.export(digits["workdir"], base, version=1)
    with pytest.raises(UserError, match="is a SavedModel itself"):
        export.export(digits["workdir"], os.path.join(base, "1"), version=3)
    assert sorted(os.listdir(base)) == ["1", "2"]


def test_a_failed_conversion_writes_nothing(digits, tmp_path, monkeypatch):
    def fail(saved_model_dir, signature, path):
        raise UserError(f"tf2onnx cannot convert the signature {signature}: unsupported ops X.")

    monkeypatch.setattr(export, "_to_onnx", fail)
    with pytest.raises(UserError, match="unsupported ops X"):
        export.export(
            digits["workdir"], str(tmp_path / "new" / "models"), version=1, formats="onnx"
        )
    assert os.listdir(tmp_path) == []  # Neither the version, nor the folders made for it.


def test_tool_converts_into_a_version_folder_and_answers_mistakes_with_status_2(digits, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "tools/export.py", f"--workdir={digits['workdir']}"]
    ok = subprocess.run(
        [*command, f"--export_dir={tmp_path / 'm'}", "--version=1", "--format=tflite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"Wrote {tmp_path / 'm' / '1'}: signatures" in ok.stdout
    # (ONNX takes the same path through export.export, which the fixtures run.)
    assert f"Converted serve_pixels to {tmp_path / 'm' / '1' / 'model.tflite'}" in ok.stdout
    assert export.is_export(str(tmp_path / "m" / "1"))
    bad = subprocess.run(
        [*command, f"--export_dir={tmp_path / 'bad'}", "--version=2", "--format=tflite,pb"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last == "error: --format takes tflite, onnx or both (tflite,onnx); got pb."
    assert "Traceback" not in bad.stderr
    assert not os.path.exists(tmp_path / "bad")

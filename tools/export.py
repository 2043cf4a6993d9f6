r"""Exports a run folder as a SavedModel (plus a .keras file) for serving, and converts it.

    python tools/export.py --workdir=runs/digits-cskd-s0            # -> runs/digits-cskd-s0/export
    python tools/export.py --workdir=RUN --export_dir=DIR --checkpoint=best --calibrate
    python tools/export.py --workdir=RUN --format=tflite,onnx       # + model.tflite, model.onnx
    python tools/export.py --workdir=RUN --export_dir=models/cskd --version=1   # TF Serving

Signatures: `serving_default` (float32 raw pixels -> probabilities, logits),
`serve_bytes` (JPEG/PNG strings -> the same), `features` (pooled features) and
`serve_pixels` (raw pixels already at the network's size -> probabilities,
logits, features; the one `--format` converts, since it holds no resize).
`--calibrate` fits a temperature on the run's validation split and bakes it into
`probabilities`. `--version=N` writes everything into EXPORT_DIR/N/, TF Serving's
layout. See cskd_tf/export.py. Mistakes print one "error:" line and exit 2.
"""

import os

from absl import flags
from absl import logging

from cskd_tf import cli
from cskd_tf import export

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder of cskd_tf.train.", required=True)
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "New export folder; unset: WORKDIR/export.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint", "last", ("last", "best"), "Checkpoint to export (best needs --val_split)."
)
_CALIBRATE = flags.DEFINE_bool(
    "calibrate", False, "Fit a temperature on the validation split (temperature scaling)."
)
_FORMAT = flags.DEFINE_list(
    "format",
    [],
    "Also convert serve_pixels: tflite (model.tflite, builtin ops), onnx (model.onnx, needs "
    "tf2onnx and onnxruntime) or tflite,onnx; each is checked against the SavedModel.",
)
_VERSION = flags.DEFINE_integer(
    "version", None, "Write into EXPORT_DIR/VERSION/ (TF Serving's numbered version folder)."
)


def main(argv):
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs every saved function at INFO.
    export_dir = _EXPORT_DIR.value or os.path.join(_WORKDIR.value, "export")
    info = export.export(
        _WORKDIR.value,
        export_dir,
        _CHECKPOINT.value,
        _CALIBRATE.value,
        formats=_FORMAT.value,
        version=_VERSION.value,
    )
    folder = export_dir if _VERSION.value is None else os.path.join(export_dir, str(_VERSION.value))
    print(f"Wrote {folder}: signatures {', '.join(info['signatures'])}.")
    for fmt, converted in info["converted"].items():
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


if __name__ == "__main__":
    cli.run(main)

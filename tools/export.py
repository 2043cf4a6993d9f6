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

from cskd_tf import export

if __name__ == "__main__":
    export.cli()

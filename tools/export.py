r"""Exports a run folder as a SavedModel (plus a .keras file) for serving.

    python tools/export.py --workdir=runs/digits-cskd-s0            # -> runs/digits-cskd-s0/export
    python tools/export.py --workdir=RUN --export_dir=DIR --checkpoint=best --calibrate

Signatures: `serving_default` (float32 raw pixels -> probabilities, logits),
`serve_bytes` (JPEG/PNG strings -> the same) and `features` (pooled features).
`--calibrate` fits a temperature on the run's validation split and bakes it into
`probabilities`. See cskd_tf/export.py. Mistakes print one "error:" line and exit 2.
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


def main(argv):
    cli.no_arguments(argv)
    logging.set_verbosity(logging.WARNING)  # TensorFlow logs every saved function at INFO.
    export_dir = _EXPORT_DIR.value or os.path.join(_WORKDIR.value, "export")
    info = export.export(_WORKDIR.value, export_dir, _CHECKPOINT.value, _CALIBRATE.value)
    print(f"Wrote {export_dir}: signatures {', '.join(info['signatures'])}.")
    if info["calibration"]:
        c = info["calibration"]
        print(
            f"Temperature {c['temperature']:.4f}: validation ECE {100 * c['val_ece_before']:.2f}% "
            f"-> {100 * c['val_ece_after']:.2f}%, NLL {c['val_nll_before']:.4f} -> "
            f"{c['val_nll_after']:.4f}."
        )


if __name__ == "__main__":
    cli.run(main)

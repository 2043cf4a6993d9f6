r"""The offline demo end to end: CS-KD against cross-entropy, as a user runs it.

    python bench/demo.py                                   # 30 epochs, 3 runs of each
    python bench/demo.py --json=bench/results/demo.json
    python bench/demo.py --epochs=3 --repeats=1            # quick

Runs `python -m cskd_tf.train` (digits, small_convnet) with `--method=cskd` and
`--method=ce` as subprocesses, alternating, each into a new temporary
`--workdir`. Reports, per method, the median wall time of the whole command
(start-up, data, training, evaluation, saving) and of `train_seconds` from the
run's `metrics.json` (the `fit` call, per-epoch evaluation included), and the
CS-KD / cross-entropy ratios of both.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    # Run as `python bench/demo.py`: make `bench` importable from the repository root.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("cskd", "ce")
DEMO_COMMAND = (sys.executable, "-m", "cskd_tf.train")


def _run_demo(command, method, epochs, workdir, extra_args):
    args = [*command, f"--method={method}", f"--epochs={epochs}", f"--workdir={workdir}"]
    args += list(extra_args)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # This checkout's cskd_tf, even where another copy is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    completed = subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {completed.returncode}:\n{completed.stderr[-2000:]}"
        )
    with open(os.path.join(workdir, "metrics.json")) as f:
        return wall, json.load(f)


def run(epochs=30, repeats=3, warmup=0, extra_args=(), command=DEMO_COMMAND):
    """Runs the demo `repeats` times per method, alternating; returns the JSON document.

    Args:
      epochs: int. `--epochs` of every run.
      repeats: int. Runs per method.
      warmup: int. Untimed rounds first (each run is a fresh process, so none by default).
      extra_args: sequence of str. More flags for every run.
      command: sequence of str. The demo's command line before its flags (the
        tests substitute a stand-in).

    Returns:
      dict: `common.result` with one row per method and the ratios.
    """
    runs = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory(prefix="cskd_bench_demo_") as folder:

        def contender(method):
            def call():
                workdir = os.path.join(folder, f"{method}-{len(runs[method])}")
                wall, metrics = _run_demo(command, method, epochs, workdir, extra_args)
                runs[method].append(dict(wall_seconds=wall, metrics=metrics))
                return wall

            return call

        walls = common.interleaved(
            {m: contender(m) for m in METHODS}, repeats, warmup=warmup, self_timed=True
        )
    rows = []
    for method in METHODS:
        timed = runs[method][warmup:]  # The warm-up runs come first.
        rows.append(
            dict(
                method=method,
                wall_seconds=common.summary(walls[method]),
                train_seconds=common.summary([r["metrics"]["train_seconds"] for r in timed]),
                top1_error=[round(r["metrics"]["top1_error"], 4) for r in timed],
                ece=[round(r["metrics"]["ece"], 4) for r in timed],
            )
        )
    by_method = {r["method"]: r for r in rows}
    ratios = {
        f"ratio_{key}": common.ratio(
            by_method["cskd"][key]["median"], by_method["ce"][key]["median"]
        )
        for key in ("train_seconds", "wall_seconds")
    }
    settings = dict(
        epochs=epochs,
        repeats=repeats,
        warmup=warmup,
        extra_args=list(extra_args),
        command=" ".join(os.path.basename(c) if c == sys.executable else c for c in command),
    )
    return common.result("demo", settings, rows, **ratios)


def format_table(document):
    """Per-method medians and the ratios as a Markdown table."""
    headers = ["method", "train_seconds", "wall s", "top-1 error", "ECE"]
    rows = [
        [
            r["method"],
            f"{r['train_seconds']['median']:.2f}",
            f"{r['wall_seconds']['median']:.2f}",
            ", ".join(f"{v:.4f}" for v in r["top1_error"]),
            ", ".join(f"{v:.4f}" for v in r["ece"]),
        ]
        for r in document["rows"]
    ]
    rows.append(
        [
            "cskd / ce",
            f"{document['ratio_train_seconds']:.3f}",
            f"{document['ratio_wall_seconds']:.3f}",
            "",
            "",
        ]
    )
    return common.format_table(headers, rows)


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0], default_repeats=3)
    parser.add_argument("--epochs", type=int, default=30, help="Epochs of every run.")
    parser.add_argument("--warmup", type=int, default=0, help="Untimed rounds first.")
    args = parser.parse_args(argv)
    document = run(epochs=args.epochs, repeats=args.repeats, warmup=args.warmup)
    print(f"{args.epochs} epochs, {args.repeats} runs per method (medians):")
    return common.report(document, format_table(document), args.json)


if __name__ == "__main__":
    main()

"""What every benchmark shares: the interleaved timer, medians, tables, JSON and the machine.

Absolute times on a shared machine drift by tens of percent from one minute to the
next, so the benchmarks report ratios of contenders timed side by side: one
repetition of each per round, rounds repeated, medians taken.
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time


def _load_average():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


# Taken when a benchmark imports this module, before it measures anything: how busy the shared
# machine was before the benchmark itself loaded it.
_LOAD_AT_START = _load_average()


def median(samples):
    """The median of a non-empty sequence of numbers (the mean of the middle two if even)."""
    if not samples:
        raise ValueError("The median of no samples is undefined.")
    return float(statistics.median(samples))


def significant(value, digits=6):
    """`value` rounded to `digits` significant digits (a tiny time stays non-zero)."""
    return float(f"{value:.{digits}g}")


def summary(samples, scale=1.0):
    """A sample list as the JSON results hold it.

    Args:
      samples: sequence of float. Measurements, e.g. seconds.
      scale: float. Multiplies every sample first (1e3: seconds to milliseconds).

    Returns:
      dict with `median`, `min`, `max` and `samples`, scaled and rounded to 6
      significant digits; `median` is the median of the rounded `samples` (to
      10 digits, which the mean of two middle ones may need), so a reader can
      check it.
    """
    scaled = [significant(s * scale) for s in samples]
    return dict(
        median=significant(median(scaled), 10), min=min(scaled), max=max(scaled), samples=scaled
    )


def ratio(numerator, denominator):
    """`numerator / denominator` to 5 significant digits; raises on a zero denominator."""
    if not denominator > 0:
        raise ValueError(f"Cannot take a ratio over {denominator}.")
    return significant(numerator / denominator, 5)


def ratios(numerator, denominator):
    """Three estimates of `numerator / denominator` from samples timed in the same rounds.

    Args:
      numerator: sequence of float. One sample per round.
      denominator: sequence of float. One sample per round, same rounds.

    Returns:
      dict: `of_medians` (the headline figure), `of_minima` (each side's least
      disturbed run: interference on a shared machine only ever adds time) and
      `median_of_rounds` (the median of the per-round ratios, which cancels
      drift slower than a round).
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} samples against {len(denominator)}.")
    return dict(
        of_medians=ratio(median(numerator), median(denominator)),
        of_minima=ratio(min(numerator), min(denominator)),
        median_of_rounds=significant(median([a / b for a, b in zip(numerator, denominator)]), 5),
    )


def interleaved(contenders, repeats, warmup=1, self_timed=False):
    """Times zero-argument callables side by side, one call of each per round.

    Rounds alternate the order (A B C, then C B A, ...) so that no contender always
    runs right after the same neighbour, or always first after a pause: on a
    shared CPU both shift a measurement by a few percent.

    Args:
      contenders: dict name -> callable. Each call must return only when its
        work is done (fetch a result to the host if the work is asynchronous).
      repeats: int >= 1. Timed rounds.
      warmup: int >= 0. Untimed rounds first (tracing, compilation, caches).
      self_timed: bool. Each call returns the seconds it measured itself, for
        work with set-up that must stay out of the time (a fresh iterator's
        first batches); otherwise the whole call is timed.

    Returns:
      dict name -> list of `repeats` durations in seconds, in round order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples = {name: [] for name in names}
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            measured = contenders[name]()
            elapsed = time.perf_counter() - start
            samples[name].append(float(measured) if self_timed else elapsed)
    return samples


def _cpuinfo():
    """Model name and vector extensions of the first CPU in /proc/cpuinfo (Linux)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # The first processor is enough.
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return dict(
        cpu_model=fields.get("model name") or platform.processor() or platform.machine(),
        # What oneDNN and XLA's CPU kernels can use: it decides their speed (AMX: bfloat16's).
        cpu_vector_extensions=sorted(
            flags & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}
        ),
    )


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info():
    """Where the numbers were taken: CPU, cores, load, library versions.

    Reads package versions from their metadata rather than importing them, so a
    benchmark that needs no TensorFlow does not pay for importing it.

    Returns:
      dict, JSON-serialisable.
    """
    info = dict(
        **_cpuinfo(),
        logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        # 1-minute load averages; at the end it includes the benchmark's own load.
        load_average_at_start=_LOAD_AT_START,
        load_average_at_end=_load_average(),
        platform=platform.platform(),
        python=platform.python_version(),
        tensorflow=_version("tensorflow"),
        keras=_version("keras"),
        numpy=_version("numpy"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        info["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
    return info


def code_version(root=None):
    """Which code was measured: the commit, and the files of the package changed since.

    Read-only: `GIT_OPTIONAL_LOCKS=0` keeps `git status` from refreshing the index.

    Args:
      root: str or None. The repository; None: the one holding this file.

    Returns:
      dict with `git_commit` and `uncommitted` (paths under `cskd_tf/` that
      differ from it), or None values outside a git checkout.
    """
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")

    def git(*args):
        completed = subprocess.run(
            ["git", *args], cwd=root, env=env, capture_output=True, text=True, check=False
        )
        return completed.stdout if completed.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", "cskd_tf")
    except OSError:  # No git.
        commit = status = None
    return dict(
        git_commit=commit.strip() if commit else None,
        uncommitted=None if status is None else [line[3:] for line in status.splitlines()],
    )


def result(benchmark, settings, rows, **extra):
    """The JSON document of one benchmark run.

    Args:
      benchmark: str. Script name, e.g. `step_cost`.
      settings: dict. The arguments it ran with.
      rows: list of dict. One per measured case.
      **extra: further top-level entries (e.g. `profile`).

    Returns:
      dict, exactly as it reads back from its JSON (tuples become lists), so
      what a caller holds and what the file holds compare equal.
    """
    document = dict(
        benchmark=benchmark,
        machine=machine_info(),
        code=code_version(),
        settings=settings,
        rows=rows,
        **extra,
    )
    return json.loads(to_json(document))


def to_json(document):
    """Serialises a result; NaN or infinity is an error, since JSON has no such numbers."""
    return json.dumps(document, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_json(document, path):
    """Writes `to_json(document)` to `path`, creating its folder."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(to_json(document))


def format_table(headers, rows):
    """A Markdown table, so the output pastes into the README as it is.

    Args:
      headers: sequence of str.
      rows: sequence of sequences, one value per header; floats keep their
        formatting if already strings.

    Returns:
      str, ending with a newline.
    """
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]]) + "\n"


def _cell(value):
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.2f}"
    return str(value)


def argument_parser(description, default_repeats):
    """An argparse parser with the flags every benchmark takes (`--json`, `--repeats`).

    argparse rather than absl: the test module imports every benchmark into one
    process, where absl's global flag registry would make their flags collide.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--json", metavar="PATH", default=None, help="Also write the result as JSON to PATH."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=default_repeats,
        help="Timed rounds; each reported time is the median over them.",
    )
    return parser


def report(document, table, json_path):
    """Prints the table (and the machine), writes the JSON if asked; returns the document."""
    m = document["machine"]
    print(
        f"{document['benchmark']} on {m['cpu_model']} ({m['usable_cpus']} usable CPUs, "
        f"load average {m['load_average_at_start']} at start), TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}"
    )
    print(table, end="")
    if json_path:
        write_json(document, json_path)
        print(f"Wrote {json_path}")
    return document

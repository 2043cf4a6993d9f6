r"""Time and peak extra memory of ECE and recall@1 on large random evaluation sets.

    python bench/eval_metrics.py                           # 10,000 and 50,000 x 512
    python bench/eval_metrics.py --json=bench/results/eval_metrics.json
    python bench/eval_metrics.py --sizes=10000 --repeats=3 --no_rss

Inputs: `N x 512` float32 features, probabilities (float64, as
`classification_metrics` passes them) from random normal logits over 100
classes, random labels. Time is the median over interleaved rounds of
`expected_calibration_error` and `recall_at_k(k=1)`; their total is the median
of the per-round sums.

Memory, two ways:

* `tracemalloc`: the peak of traced allocations during one call, above what
  was allocated when it started. numpy reports its array buffers to
  tracemalloc, so this is the metric's own numpy and Python memory, exactly,
  whatever else the process holds.
* peak RSS (Linux; skipped with `--no_rss`): in a fresh child process per
  (size, metric), the peak resident size (`VmHWM`, reset to the current size
  through /proc/self/clear_refs just before the call) minus the resident size
  before it. This is what the operating system saw, including memory that
  numpy does not report to tracemalloc (BLAS work buffers). Not `ru_maxrss`:
  a spawned child inherits its parent's high-water mark across fork and exec.

Targets (issue): 10,000 examples in under 1 s (ECE + R@1), and at most 1 GiB
extra memory at 50,000 (checked here at every size, on the larger of the two
measurements).
"""

import multiprocessing
import pathlib
import sys
import tracemalloc

if __package__ in (None, ""):
    # Run as `python bench/eval_metrics.py`: make `bench` importable from the repository root.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from bench import common
from cskd_tf import metrics

MAX_SECONDS_AT = {10_000: 1.0}  # Examples -> target on the ECE + R@1 time.
MAX_EXTRA_BYTES = 2**30
METRICS = ("ece", "recall_at_1")


def make_inputs(num_examples, dim=512, num_classes=100, seed=0):
    """Random features, probabilities and labels, allocated without temporaries.

    Building them in place keeps the process' memory high-water mark at its
    resident size, which the peak-RSS measurement relies on.

    Returns:
      `(features [N, dim] float32, probs [N, C] float64, labels [N] int64)`.
    """
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((num_examples, dim), dtype=np.float32)
    probs = rng.standard_normal((num_examples, num_classes))
    probs *= 3.0  # Logits of a confident classifier: the bins' occupancy spreads out.
    probs -= probs.max(axis=1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, num_classes, num_examples)
    return features, probs, labels


def _metric_call(name, inputs, num_bins=20):
    features, probs, labels = inputs
    if name == "ece":
        return lambda: metrics.expected_calibration_error(probs, labels, num_bins=num_bins)
    if name == "recall_at_1":
        return lambda: metrics.recall_at_k(features, labels, k=1)
    raise ValueError(f"Unknown metric '{name}'; expected one of {METRICS}.")


def traced_peak_bytes(fn):
    """Peak bytes allocated (numpy and Python, per tracemalloc) during `fn()`, above the start."""
    already = tracemalloc.is_tracing()
    if not already:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        if not already:
            tracemalloc.stop()


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_child(name, num_examples, dim, num_classes, seed, queue):
    inputs = make_inputs(num_examples, dim, num_classes, seed)
    call = _metric_call(name, inputs)
    # Writing 5 to clear_refs resets the peak (VmHWM) to the current resident size (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    call()
    queue.put((_status_kib("VmHWM") - before) * 1024)


def peak_rss_bytes(name, num_examples, dim=512, num_classes=100, seed=0):
    """Growth of the peak resident size during one call of metric `name`, in a fresh process.

    Linux only (it reads /proc). A fresh process, so that no memory freed by
    earlier calls is reused by the allocator without being counted.
    """
    context = multiprocessing.get_context("spawn")  # Fresh: no high-water mark inherited.
    queue = context.Queue()
    process = context.Process(
        target=_rss_child, args=(name, num_examples, dim, num_classes, seed, queue)
    )
    process.start()
    value = queue.get()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"The peak-RSS process for {name} exited with {process.exitcode}.")
    return int(value)


def _measure_size(num_examples, dim, num_classes, repeats, rss, seed):
    inputs = make_inputs(num_examples, dim, num_classes, seed)
    calls = {name: _metric_call(name, inputs) for name in METRICS}
    values = {name: call() for name, call in calls.items()}  # Also the untimed warm-up.
    samples = common.interleaved(calls, repeats, warmup=0)
    totals = [sum(parts) for parts in zip(*(samples[name] for name in METRICS))]
    row = dict(
        num_examples=num_examples,
        dim=dim,
        num_classes=num_classes,
        seconds={name: common.summary(samples[name]) for name in METRICS},
        total_seconds=common.summary(totals),
        tracemalloc_peak_bytes={name: traced_peak_bytes(calls[name]) for name in METRICS},
        values={name: round(float(v), 6) for name, v in values.items()},
    )
    del inputs, calls  # The RSS children need the memory more than this process does.
    if rss:
        row["rss_peak_delta_bytes"] = {
            name: peak_rss_bytes(name, num_examples, dim, num_classes, seed) for name in METRICS
        }
    measured = list(row["tracemalloc_peak_bytes"].values())
    measured += list(row.get("rss_peak_delta_bytes", {}).values())
    row["max_extra_bytes"] = max(measured)
    row["max_extra_bytes_target"] = MAX_EXTRA_BYTES
    row["meets_memory_target"] = row["max_extra_bytes"] <= MAX_EXTRA_BYTES
    if num_examples in MAX_SECONDS_AT:
        row["total_seconds_target"] = MAX_SECONDS_AT[num_examples]
        row["meets_time_target"] = row["total_seconds"]["median"] < MAX_SECONDS_AT[num_examples]
    return row


def run(sizes=(10_000, 50_000), dim=512, num_classes=100, repeats=5, rss=True, seed=0):
    """Measures both metrics at each size; returns the JSON document.

    Args:
      sizes: sequence of int. Numbers of examples.
      dim: int. Feature width.
      num_classes: int.
      repeats: int. Timed rounds per size.
      rss: bool. Also measure the peak-RSS growth in child processes.
      seed: int.

    Returns:
      dict: `common.result` with one row per size.
    """
    rows = [_measure_size(n, dim, num_classes, repeats, rss, seed) for n in sizes]
    settings = dict(
        sizes=list(sizes),
        dim=dim,
        num_classes=num_classes,
        repeats=repeats,
        rss=rss,
        seed=seed,
        num_bins=20,
        k=1,
        max_seconds_at=[[n, t] for n, t in MAX_SECONDS_AT.items()],
        max_extra_bytes=MAX_EXTRA_BYTES,
    )
    return common.result("eval_metrics", settings, rows)


def _mib(n):
    return f"{n / 2**20:,.1f}"


def format_table(document):
    """Times and memory as a Markdown table (memory in MiB)."""
    headers = [
        "N x D",
        "ECE s",
        "R@1 s",
        "total s",
        "ECE MiB (tracemalloc / RSS)",
        "R@1 MiB (tracemalloc / RSS)",
        "time target",
        "memory target",
    ]
    rows = []
    for r in document["rows"]:
        memory = []
        for name in METRICS:
            cell = _mib(r["tracemalloc_peak_bytes"][name])
            if "rss_peak_delta_bytes" in r:
                cell += " / " + _mib(r["rss_peak_delta_bytes"][name])
            memory.append(cell)
        time_target = (
            f"{'yes' if r['meets_time_target'] else 'NO'} (< {r['total_seconds_target']:g} s)"
            if "meets_time_target" in r
            else "-"
        )
        rows.append(
            [
                f"{r['num_examples']:,} x {r['dim']}",
                f"{r['seconds']['ece']['median']:.4f}",
                f"{r['seconds']['recall_at_1']['median']:.3f}",
                f"{r['total_seconds']['median']:.3f}",
                *memory,
                time_target,
                (
                    f"{'yes' if r['meets_memory_target'] else 'NO'} (<= "
                    f"{r['max_extra_bytes_target'] / 2**30:g} GiB)"
                ),
            ]
        )
    return common.format_table(headers, rows)


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0], default_repeats=5)
    parser.add_argument("--sizes", default="10000,50000", help="Comma-separated example counts.")
    parser.add_argument("--dim", type=int, default=512, help="Feature width.")
    parser.add_argument("--num_classes", type=int, default=100, help="Classes.")
    parser.add_argument(
        "--no_rss", action="store_true", help="Skip the peak-RSS measurement (child processes)."
    )
    args = parser.parse_args(argv)
    document = run(
        sizes=[int(s) for s in args.sizes.split(",") if s],
        dim=args.dim,
        num_classes=args.num_classes,
        repeats=args.repeats,
        rss=not args.no_rss,
    )
    return common.report(document, format_table(document), args.json)


if __name__ == "__main__":
    main()

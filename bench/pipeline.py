r"""Input pipeline throughput (pairs + augmentation) against the rate the CS-KD step consumes.

    python bench/pipeline.py                               # the three default cases
    python bench/pipeline.py --json=bench/results/pipeline.json
    python bench/pipeline.py --cases=pixels --repeats=3

Three ways of storing the training set, as `cskd_tf.data.pair_dataset` reads them:

* `pixels`: decoded uint8 images in memory, 32x32 (`cifar` preset: pad-crop, flip);
* `encoded`: JPEG bytes in memory, decoded per element, 224x224 (`imagenet`
  preset: random-resized crop, flip);
* `path`: the same JPEGs as files in a temporary folder, read and decoded per element.

The pipeline's rate is anchors per second (each anchor comes with a partner, so
twice as many images are decoded and augmented), timed over `--num_batches`
batches of a fresh iterator after `--warmup_batches`, so that batches prefetched
while the model was being timed do not count. The model's rate is anchors per
second of the compiled CS-KD train step (PreAct ResNet-18 at 32, ResNet-18 at
224) on a batch in memory. The two are timed in alternating rounds of the same run.

Both share this machine's CPU here; with the model on an accelerator the
pipeline has the CPU to itself, so the ratio printed is, if anything, low.
"""

import dataclasses
import os
import pathlib
import sys
import tempfile
import time

if __package__ in (None, ""):
    # Run as `python bench/pipeline.py`: make `bench` importable from the repository root.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from bench import common
from bench import step_cost
from cskd_tf import data

TARGET_RATIO = 5.0
CASES = ("pixels", "encoded", "path")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of the benchmark; the defaults are the issue's.

    Attributes:
      num_pixel_images: int. Random 32x32x3 uint8 images for `pixels`.
      num_jpegs: int. Random JPEGs for `encoded` and `path`.
      jpeg_size: tuple. (height, width) around which the JPEGs' sizes vary by 10%.
      num_classes: int. Labels are drawn from this many classes.
      batch_size_32: int. Anchors per batch at 32x32.
      batch_size_224: int. Anchors per batch at 224x224.
      num_batches_32: int. Batches timed per round at 32x32.
      num_batches_224: int. Batches timed per round at 224x224.
      warmup_batches: int. Batches read from a fresh iterator before timing.
      model_steps: int. Train steps timed per round.
      backbone_32: str. Model consuming the 32x32 batches.
      backbone_224: str. Model consuming the 224x224 batches.
      jit_compile: bool. XLA for the train step (`fit` on a CPU-only machine uses none).
    """

    num_pixel_images: int = 10_000
    num_jpegs: int = 256
    jpeg_size: tuple = (300, 400)
    num_classes: int = 100
    batch_size_32: int = 32
    batch_size_224: int = 8
    num_batches_32: int = 100
    num_batches_224: int = 30
    warmup_batches: int = 5
    model_steps: int = 1
    backbone_32: str = "preact_resnet18"
    backbone_224: str = "resnet18"
    jit_compile: bool = False


def random_jpegs(num, size=(300, 400), seed=0, quality=90):
    """JPEG bytes of random images whose sizes vary by up to 10% around `size`.

    Smooth colour fields plus mild noise rather than pure noise: pure noise
    compresses poorly and decodes several times slower than a photograph of the
    same size, which would understate the pipeline.

    Args:
      num: int. Number of images.
      size: tuple. (height, width).
      seed: int.
      quality: int. JPEG quality.

    Returns:
      list of bytes.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num):
        h, w = (int(s * rng.uniform(0.9, 1.1)) for s in size)
        coarse = rng.uniform(0, 255, (h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
        smooth = tf.image.resize(coarse, (h, w), method="bilinear").numpy()
        noisy = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        images.append(tf.io.encode_jpeg(noisy, quality=quality).numpy())
    return images


def _labels(num, num_classes, rng):
    return rng.integers(0, num_classes, num).astype(np.int64)


def _pipeline_timer(dataset, num_batches, warmup_batches):
    def measure():
        iterator = iter(dataset)
        for _ in range(warmup_batches):
            next(iterator)
        start = time.perf_counter()
        for _ in range(num_batches):
            # Eager tensors: next() returns once the batch is computed.
            next(iterator)
        return time.perf_counter() - start

    return measure


def _model_timer(step, steps):
    def measure():
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return time.perf_counter() - start

    return measure


def _case_data(case, settings, folder, seed):
    """The stored values, their labels and the augmentation preset of one case."""
    rng = np.random.default_rng(seed)
    if case == "pixels":
        n = settings.num_pixel_images
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        return images, _labels(n, settings.num_classes, rng), "cifar"
    if case not in CASES:
        raise ValueError(f"Unknown case '{case}'; expected one of {CASES}.")
    jpegs = random_jpegs(settings.num_jpegs, settings.jpeg_size, seed)
    labels = _labels(len(jpegs), settings.num_classes, rng)
    if case == "encoded":
        # dtype=object keeps each value's bytes whole (numpy's "S" type drops trailing NULs).
        return np.array(jpegs, dtype=object), labels, "imagenet"
    paths = []
    for i, jpeg in enumerate(jpegs):
        paths.append(os.path.join(folder, f"{i:05d}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(jpeg)
    return np.array(paths), labels, "imagenet"


def _time_case(case, settings, repeats, seed, folder, models):
    values, labels, preset = _case_data(case, settings, folder, seed)
    s = settings
    if preset == "cifar":
        batch_size, num_batches, backbone = s.batch_size_32, s.num_batches_32, s.backbone_32
    else:
        batch_size, num_batches, backbone = s.batch_size_224, s.num_batches_224, s.backbone_224
    augmenter = data.Augmenter(preset, seed=seed)
    dataset = data.pair_dataset(
        values, labels, batch_size, seed=seed, kind=case, augment=augmenter.train
    ).repeat()

    # One model per (backbone, input, batch): `encoded` and `path` share theirs.
    key = (backbone, augmenter.input_shape, batch_size)
    if key not in models:
        model_case = step_cost.Case(backbone, augmenter.input_shape, batch_size, s.num_classes)
        x, x_pair, y = step_cost.random_batch(model_case, seed)
        model = step_cost.build_model("cskd", model_case, s.jit_compile, seed)
        models[key] = step_cost.compiled_step(model, ((x, x_pair), y))
    contenders = dict(
        pipeline=_pipeline_timer(dataset, num_batches, s.warmup_batches),
        model=_model_timer(models[key], s.model_steps),
    )
    samples = common.interleaved(contenders, repeats, warmup=1, self_timed=True)
    pipeline_rate = [num_batches * batch_size / t for t in samples["pipeline"]]
    model_rate = [s.model_steps * batch_size / t for t in samples["model"]]
    row = dict(
        case=case,
        preset=preset,
        input_shape=list(augmenter.input_shape),
        num_images=len(values),
        batch_size=batch_size,
        batches_timed=num_batches,
        backbone=backbone,
        pipeline_anchors_per_s=common.summary(pipeline_rate),
        model_anchors_per_s=common.summary(model_rate),
    )
    if case == "encoded":
        row["mean_jpeg_bytes"] = int(np.mean([len(v) for v in values]))
    row["ratio"] = common.ratio(
        row["pipeline_anchors_per_s"]["median"], row["model_anchors_per_s"]["median"]
    )
    row["target_ratio"] = TARGET_RATIO
    row["meets_target"] = row["ratio"] >= TARGET_RATIO
    return row


def run(cases=CASES, settings=None, repeats=5, seed=0):
    """Times the pipeline and the model's consumption for each case; returns the JSON document.

    Args:
      cases: sequence of str. From `CASES`.
      settings: Settings or None (the defaults).
      repeats: int. Rounds (one pipeline and one model measurement each).
      seed: int. Seeds the data, the pairing and augmentation, the weights.

    Returns:
      dict: `common.result` with one row per case.
    """
    settings = settings or Settings()
    for case in cases:
        if case not in CASES:
            raise ValueError(f"Unknown case '{case}'; expected one of {CASES}.")
    rows, models = [], {}
    with tempfile.TemporaryDirectory(prefix="cskd_bench_jpegs_") as folder:
        for case in cases:
            rows.append(_time_case(case, settings, repeats, seed, folder, models))
    config = dataclasses.asdict(settings)
    config.update(cases=list(cases), repeats=repeats, seed=seed, target_ratio=TARGET_RATIO)
    return common.result("pipeline", config, rows)


def format_table(document):
    """The rates and ratios as a Markdown table."""
    headers = [
        "case",
        "input",
        "batch",
        "pipeline anchors/s",
        "model",
        "model anchors/s",
        "pipeline / model",
        "target met",
    ]
    rows = []
    for r in document["rows"]:
        rows.append(
            [
                f"{r['case']} ({r['preset']})",
                f"{r['input_shape'][0]}x{r['input_shape'][1]}",
                r["batch_size"],
                f"{r['pipeline_anchors_per_s']['median']:,.1f}",
                r["backbone"],
                f"{r['model_anchors_per_s']['median']:,.2f}",
                f"{r['ratio']:,.1f}",
                f"{'yes' if r['meets_target'] else 'NO'} (>= {r['target_ratio']:g})",
            ]
        )
    return common.format_table(headers, rows)


def _attribute_docs(cls):
    """Name -> description, from the `Attributes:` section of a Google-style docstring."""
    docs, name = {}, None
    for line in cls.__doc__.split("Attributes:", 1)[1].splitlines():
        head, sep, rest = line.strip().partition(": ")
        if sep and head.isidentifier():
            name = head
            docs[name] = rest.split(". ", 1)[-1]  # Drop the type.
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return docs


def main(argv=None):
    parser = common.argument_parser(__doc__.split("\n\n")[0], default_repeats=5)
    defaults = Settings()
    parser.add_argument(
        "--cases", default=",".join(CASES), help="Comma-separated subset of: " + ", ".join(CASES)
    )
    helps = _attribute_docs(Settings)
    for field in dataclasses.fields(Settings):
        value = getattr(defaults, field.name)
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            parser.add_argument(
                f"--{field.name}", type=type(value), default=value, help=helps[field.name]
            )
    parser.add_argument("--jit", action="store_true", help="jit_compile=True for the train step.")
    args = parser.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if hasattr(args, f.name)
    }
    settings = dataclasses.replace(defaults, jit_compile=args.jit, **overrides)
    document = run(
        cases=[c for c in args.cases.split(",") if c], settings=settings, repeats=args.repeats
    )
    return common.report(document, format_table(document), args.json)


if __name__ == "__main__":
    main()

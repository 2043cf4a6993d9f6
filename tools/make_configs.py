r"""Writes configs/paper/*.flags: one flagfile per table cell of the paper that cskd_tf can run.

    python tools/make_configs.py            # (re)write configs/paper/, removing stale files
    python tools/make_configs.py --check    # exit 2 if configs/paper/ is not what it would write

Each file includes the data set's CS-KD flagfile (configs/<dataset>.flags) and adds only what
the cell changes: the method, the backbone, the teacher. Its header, the paper's numbers
included, is written from `cskd_tf.paper`, never typed by hand. Edit `GRID` below, not the
generated files.
"""

import os
import pathlib
import sys

from absl import flags

from cskd_tf import cli, methods, paper, report, train
from cskd_tf.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = "configs/paper"

_CHECK = flags.DEFINE_bool(
    "check", False, "Only compare configs/paper/ with what would be written."
)

# Columns of Tables 1-4 and 6; Table 5 is ImageNet alone.
DATASETS = ("cifar100", "tiny_imagenet", "cub", "stanford_dogs", "mit67")
TABLE_DATASETS = {"5": ("imagenet",)}
_BASELINES = ("ce", "adacos", "virtual_softmax", "max_entropy", "label_smoothing", "cskd")
TEACHER = "teacher of Table 4"
# (paper table, backbone as the table names it, methods). "resnet18" and "resnet10" stand for
# the PreAct ResNet on the 32x32 sets and the torchvision-style one on the 224x224 sets
# (paper section 3.1; `cskd_tf.paper.BACKBONE_FAMILIES`).
GRID = (
    ("1", "resnet18", _BASELINES),
    ("1", "densenet121", _BASELINES),
    ("2", "resnet18", ("ce", "cskd", "ddgsd", "byot")),
    ("3", "resnet18", ("ce", "cskd", "mixup", "mixup_cskd")),
    ("4", "resnet10", ("ce", "cskd", "kd", "kd_cskd")),
    (TEACHER, "densenet121", ("cskd",)),
    ("5", "resnet50", ("ce", "cskd")),
    ("5", "resnet101", ("ce", "cskd")),
    ("5", "resnext101_32x4d", ("ce", "cskd")),
    ("6", "resnet18", (*_BASELINES, "cskd_e")),
)
BACKBONE_NAMES = {  # As the paper's tables spell them.
    "preact_resnet18": "PreAct ResNet-18",
    "resnet18": "ResNet-18",
    "preact_resnet10": "PreAct ResNet-10",
    "resnet10": "ResNet-10",
    "densenet121": "DenseNet-121",
    "resnet50": "ResNet-50",
    "resnet101": "ResNet-101",
    "resnext101_32x4d": "ResNeXt-101-32x4d",
}
METHOD_NAMES = {  # As the paper's tables spell them.
    "ce": "Cross-entropy",
    "adacos": "AdaCos",
    "virtual_softmax": "Virtual-softmax",
    "max_entropy": "Maximum-entropy",
    "label_smoothing": "Label-smoothing",
    "cskd": "CS-KD",
    "mixup": "Mixup",
    "mixup_cskd": "Mixup + CS-KD",
    "kd": "KD",
    "kd_cskd": "KD + CS-KD",
    "cskd_e": "CS-KD-E",
    "ddgsd": "DDGSD",
    "byot": "BYOT",
}
METRIC_NAMES = {
    "top1_error": "top-1 error",
    "top5_error": "top-5 error",
    "ece": "ECE",
    "recall_at_1": "R@1",
}
# What a method needs that the paper does not state: cskd_tf.train's default is used.
_UNSTATED = {
    "label_smoothing": "the smoothing factor (--label_smoothing)",
    "max_entropy": "the entropy weight (--entropy_weight)",
    "mixup": "Mixup's alpha (--mixup_alpha)",
    "mixup_cskd": "Mixup's alpha (--mixup_alpha)",
    "kd": "the KD weight and temperature (--kd_alpha, --kd_temperature)",
    "kd_cskd": "the KD weight and temperature (--kd_alpha, --kd_temperature)",
    "cskd_e": "lambda_E (--lambda_sample)",
    "ddgsd": "DDGSD's weights (cskd_tf.ddgsd.DDGSDModel's defaults, T = --temperature)",
    "byot": "BYOT's T, alpha and beta (cskd_tf.byot.BYOTModel's defaults)",
}

# Run-time guesses, not measurements: hours of cross-entropy with ResNet-18 on one V100-class
# GPU, as the per-data-set flagfiles' headers estimate them, times the relative cost of a
# step. A pair method adds a gradient-free forward pass over the partners (~1/3 of a step),
# CS-KD-E a second one over the clean views, KD one of the DenseNet-121 teacher. ImageNet:
# 90 epochs of 1.28M images at ~1,000 images/s for ResNet-18 in float32.
_CE_HOURS = {
    "cifar100": 2,
    "tiny_imagenet": 4,
    "cub": 2,
    "stanford_dogs": 4,
    "mit67": 2,
    "imagenet": 32,
}
# ResNet-50/101 and ResNeXt-101-32x4d: their float32 training throughput against ResNet-18's.
# ResNeXt-101-32x4d has about ResNet-101's FLOPs, but grouped convolutions run slower per FLOP.
_BACKBONE_COST = {
    "resnet18": 1.0,
    "preact_resnet18": 1.0,
    "resnet10": 0.6,
    "preact_resnet10": 0.6,
    "densenet121": 2.5,
    "resnet50": 2.5,
    "resnet101": 4.5,
    "resnext101_32x4d": 6.0,
}
# DDGSD back-propagates through both views (~2x); BYOT's auxiliary heads add ~1/4.
_METHOD_COST = {
    "cskd": 1.35,
    "mixup_cskd": 1.35,
    "kd_cskd": 1.35,
    "cskd_e": 1.7,
    "ddgsd": 2.0,
    "byot": 1.25,
}
_TEACHER_FORWARD = _BACKBONE_COST["densenet121"] / 3


def cells():
    """The cells to write, in `GRID` order.

    Returns:
        dict. (dataset, backbone, method) -> the tables it appears in (strings, `GRID` order).
    """
    found = {}
    for table, family, methods in GRID:
        for method in methods:
            for dataset in TABLE_DATASETS.get(table, DATASETS):
                backbone = paper.BACKBONE_FAMILIES.get(family, {}).get(dataset, family)
                found.setdefault((dataset, backbone, method), []).append(table)
    return found


def teacher_run(dataset):
    """The run folder of the DenseNet-121 CS-KD teacher that the KD cells of `dataset` read."""
    return f"runs/{dataset}-densenet121-cskd-s0"


def _tables_text(tables):
    numbered = [t for t in tables if t != TEACHER]
    text = "Table " + numbered[0]
    if len(numbered) > 1:
        text = "Tables " + ", ".join(numbered[:-1]) + " and " + numbered[-1]
    return text + (f" ({TEACHER})" if TEACHER in tables else "")


def _value_text(value):
    mean, std = value
    # A mean without a std is Table 5's, which the paper prints to one decimal.
    return f"{mean}%" if std is None else f"{mean:.2f} ± {std:.2f}%"


def _numbers_text(numbers):
    if not numbers:
        return "no paper number"
    top1 = numbers.get("top1_error")
    text = f"paper top-1 error {_value_text(top1)}" if top1 else "no paper top-1 error"
    others = [
        f"{name} {_value_text(numbers[metric])}"
        for metric, name in METRIC_NAMES.items()
        if metric != "top1_error" and metric in numbers
    ]
    return text + (f" ({', '.join(others)})" if others else "")


def _hours_text(dataset, backbone, method):
    hours = _CE_HOURS[dataset] * _BACKBONE_COST[backbone] * _METHOD_COST.get(method, 1.0)
    if methods.get(method).teacher:
        hours += _CE_HOURS[dataset] * _TEACHER_FORWARD
    hours = round(hours * 2) / 2 if hours < 10 else round(hours)
    return f"~{hours:g} h on one V100-class GPU"


def _base_flags(dataset):
    """The values configs/<dataset>.flags sets (its includes are relative to the root)."""
    values = flags.FlagValues()
    holders = train.define_flags(values)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        values(["make_configs", f"--flagfile=configs/{dataset}.flags"])
    finally:
        os.chdir(cwd)
    return {name: holder.value for name, holder in holders.items()}


def render():
    """The flagfiles to write.

    Returns:
        dict. File name (`<dataset>-<backbone>-<method>.flags`) -> its text.
    """
    found = cells()
    bases = {dataset: _base_flags(dataset) for dataset in {key[0] for key in found}}
    files = {}
    for (dataset, backbone, method), tables in found.items():
        base = bases[dataset]
        needs = methods.get(method)
        numbers = _numbers_text(paper.paper_numbers(dataset, backbone, method))
        after = " after the teacher" if needs.teacher else ""
        names = [BACKBONE_NAMES[backbone], report.dataset_name(dataset), METHOD_NAMES[method]]
        lines = [
            f"# {_tables_text(tables)}, {', '.join(names)}: {numbers}.",
            (
                "# Generated by tools/make_configs.py; rough run time: "
                f"{_hours_text(dataset, backbone, method)}{after} (an estimate, not measured)."
            ),
        ]
        if needs.teacher:
            lines.append(
                "# Train the teacher first: DenseNet-121 with CS-KD, configs/paper/"
                f"{dataset}-densenet121-cskd.flags, which writes {teacher_run(dataset)}."
            )
        if TEACHER in tables:
            lines.append(
                "# --workdir is the folder that the KD cells of Table 4 read as their --teacher."
            )
        if dataset == "cub" and needs.batches.partner == "class":
            lines.append(
                f"# lambda_cls = {base['lambda_cls']:g} comes from configs/cub.flags: the authors' "
                "README trains CUB with --lamda 3; the paper only gives the grid {1, 2, 3, 4} "
                "(section 3.1)."
            )
        if dataset == "imagenet" and needs.batches.partner is not None:
            lines.append(
                "# Table 5 gives neither T, lambda_cls nor the learning-rate schedule: "
                f"T = {base['temperature']:g} and lambda_cls = {base['lambda_cls']:g} "
                "(configs/base.flags) and section 3.1's drops at 50% and 75% of the epochs are "
                "our assumption."
            )
        elif dataset == "imagenet":
            lines.append(
                "# Table 5 gives no learning-rate schedule: section 3.1's drops at 50% and 75% "
                "of the epochs are our assumption."
            )
        if method in _UNSTATED:
            lines.append(
                f"# The paper does not give {_UNSTATED[method]}: cskd_tf.train's default is used."
            )
        lines.append(f"--flagfile=configs/{dataset}.flags")
        if method != base["method"]:
            lines.append(f"--method={method}")
        if backbone != base["backbone"]:
            lines.append(f"--backbone={backbone}")
        if needs.teacher:
            lines.append(f"--teacher={teacher_run(dataset)}")
        if TEACHER in tables:
            lines.append(f"--workdir={teacher_run(dataset)}")
        files[f"{dataset}-{backbone}-{method}.flags"] = "\n".join(lines) + "\n"
    return files


def generate(out_dir):
    """Writes `render()` into `out_dir` and removes the other *.flags files there.

    Args:
        out_dir: str | os.PathLike. The folder, created if missing.

    Returns:
        list[pathlib.Path]. The files written, sorted.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = render()
    for stale in out_dir.glob("*.flags"):
        if stale.name not in files:
            stale.unlink()
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return sorted(out_dir / name for name in files)


def main(argv):
    cli.no_arguments(argv)
    out_dir = ROOT / OUT_DIR
    if _CHECK.value:
        files = render()
        on_disk = {p.name: p.read_text(encoding="utf-8") for p in out_dir.glob("*.flags")}
        if on_disk != files:
            raise UserError(f"{OUT_DIR} is out of date: run python tools/make_configs.py.")
        print(f"{OUT_DIR}: {len(files)} flagfiles, up to date.")
        return
    written = generate(out_dir)
    print(f"Wrote {len(written)} flagfiles to {OUT_DIR}.", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)

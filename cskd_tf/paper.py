"""The paper's own numbers (Yun et al., CVPR 2020), to print beside ours.

All values are percentages as `(mean, std)`, copied from the paper's tables;
`std` is None where the paper gives none. `PAPER` holds the Cross-entropy and
CS-KD rows of Tables 1, 5 and 6; `COMPARISONS` every other row of Tables 1-4
and 6 (the baselines, Mixup, KD with its ResNet-10 student, CS-KD-E).
`paper_numbers` looks in both. Keys follow this package's names: the paper's
"ResNet-18" is `preact_resnet18` on the 32x32 sets (CIFAR-100, TinyImageNet)
and `resnet18` on the 224x224 ones (CUB-200-2011, Stanford Dogs, MIT67); its
"ResNet-10" (the Table 4 student) likewise `preact_resnet10` or `resnet10`.
"""

# Column order of Tables 1 and 6.
_DATASETS = ("cifar100", "tiny_imagenet", "cub", "stanford_dogs", "mit67")
_RESNET18 = {
    "cifar100": "preact_resnet18",
    "tiny_imagenet": "preact_resnet18",
    "cub": "resnet18",
    "stanford_dogs": "resnet18",
    "mit67": "resnet18",
}
# Table 4 names its student "ResNet-10" only; section 3.1 swaps in the PreAct ResNet on the
# 32x32 sets, and the reference code's CIFAR student is `CIFAR_ResNet10`, a PreAct ResNet.
_RESNET10 = {
    "cifar100": "preact_resnet10",
    "tiny_imagenet": "preact_resnet10",
    "cub": "resnet10",
    "stanford_dogs": "resnet10",
    "mit67": "resnet10",
}
# A table's backbone name -> our backbone per data set.
BACKBONE_FAMILIES = {"resnet18": _RESNET18, "resnet10": _RESNET10}

# (table row: backbone, method, metric) -> one (mean, std) per data set, in `_DATASETS` order.
_ROWS = {
    # Table 1, ResNet-18 rows (PreAct ResNet-18 on CIFAR-100 / TinyImageNet): top-1 error.
    ("resnet18", "ce", "top1_error"): (
        (24.71, 0.24),
        (43.53, 0.19),
        (46.00, 1.43),
        (36.29, 0.32),
        (44.75, 0.80),
    ),
    ("resnet18", "cskd", "top1_error"): (
        (21.99, 0.13),
        (41.62, 0.38),
        (33.28, 0.99),
        (30.85, 0.28),
        (40.45, 0.45),
    ),
    # Table 1, DenseNet-121 rows: top-1 error.
    ("densenet121", "ce", "top1_error"): (
        (22.23, 0.04),
        (39.22, 0.27),
        (42.30, 0.44),
        (33.39, 0.17),
        (41.79, 0.19),
    ),
    ("densenet121", "cskd", "top1_error"): (
        (21.69, 0.49),
        (37.96, 0.09),
        (30.83, 0.39),
        (27.81, 0.13),
        (40.02, 0.91),
    ),
    # Table 6 (ResNet-18): top-5 error.
    ("resnet18", "ce", "top5_error"): (
        (6.91, 0.09),
        (22.21, 0.29),
        (22.30, 0.68),
        (11.80, 0.27),
        (19.25, 0.53),
    ),
    ("resnet18", "cskd", "top5_error"): (
        (5.69, 0.03),
        (19.21, 0.04),
        (13.07, 0.26),
        (8.55, 0.07),
        (17.46, 0.38),
    ),
    # Table 6 (ResNet-18): expected calibration error, 20 bins.
    ("resnet18", "ce", "ece"): (
        (15.45, 0.33),
        (14.08, 0.76),
        (18.39, 0.76),
        (15.05, 0.35),
        (17.99, 0.72),
    ),
    ("resnet18", "cskd", "ece"): (
        (5.17, 0.40),
        (7.26, 0.93),
        (15.44, 0.92),
        (10.46, 1.08),
        (15.56, 0.29),
    ),
    # Table 6 (ResNet-18): recall at 1.
    ("resnet18", "ce", "recall_at_1"): (
        (61.38, 0.64),
        (30.59, 0.42),
        (33.92, 1.70),
        (47.51, 1.02),
        (31.42, 1.00),
    ),
    ("resnet18", "cskd", "recall_at_1"): (
        (71.15, 0.15),
        (47.15, 0.40),
        (59.06, 0.38),
        (62.67, 0.07),
        (46.74, 1.48),
    ),
}


# The paper's other rows, in the same layout as `_ROWS`.
_OTHER_ROWS = {
    # Table 1, ResNet-18 rows: top-1 error.
    ("resnet18", "adacos", "top1_error"): (
        (23.71, 0.36),
        (42.61, 0.20),
        (35.47, 0.07),
        (32.66, 0.34),
        (42.66, 0.43),
    ),
    ("resnet18", "virtual_softmax", "top1_error"): (
        (23.01, 0.42),
        (42.41, 0.20),
        (35.03, 0.51),
        (31.48, 0.16),
        (42.86, 0.71),
    ),
    ("resnet18", "max_entropy", "top1_error"): (
        (22.72, 0.29),
        (41.77, 0.13),
        (39.86, 1.11),
        (32.41, 0.20),
        (43.36, 1.62),
    ),
    ("resnet18", "label_smoothing", "top1_error"): (
        (22.69, 0.28),
        (43.09, 0.34),
        (42.99, 0.99),
        (35.30, 0.66),
        (44.40, 0.71),
    ),
    # Table 1, DenseNet-121 rows: top-1 error.
    ("densenet121", "adacos", "top1_error"): (
        (22.17, 0.24),
        (38.76, 0.23),
        (30.84, 0.38),
        (27.87, 0.65),
        (40.25, 0.68),
    ),
    ("densenet121", "virtual_softmax", "top1_error"): (
        (23.66, 0.10),
        (41.58, 1.58),
        (33.85, 0.75),
        (30.55, 0.72),
        (43.66, 0.30),
    ),
    ("densenet121", "max_entropy", "top1_error"): (
        (22.87, 0.45),
        (38.39, 0.33),
        (37.51, 0.71),
        (29.52, 0.74),
        (43.48, 1.30),
    ),
    ("densenet121", "label_smoothing", "top1_error"): (
        (21.88, 0.45),
        (38.75, 0.18),
        (40.63, 0.24),
        (31.39, 0.46),
        (42.24, 1.23),
    ),
    # Table 2 (ResNet-18): top-1 error of the self-distillation baselines (not implemented here).
    ("resnet18", "ddgsd", "top1_error"): (
        (23.85, 1.57),
        (41.48, 0.12),
        (41.17, 1.28),
        (31.53, 0.54),
        (41.17, 2.46),
    ),
    ("resnet18", "byot", "top1_error"): (
        (23.81, 0.11),
        (44.02, 0.57),
        (40.76, 0.39),
        (34.02, 0.14),
        (44.88, 0.46),
    ),
    # Table 3 (ResNet-18): top-1 error with Mixup.
    ("resnet18", "mixup", "top1_error"): (
        (21.67, 0.34),
        (41.57, 0.38),
        (37.09, 0.27),
        (32.54, 0.04),
        (41.67, 1.05),
    ),
    ("resnet18", "mixup_cskd", "top1_error"): (
        (20.40, 0.31),
        (40.71, 0.32),
        (30.71, 0.64),
        (29.93, 0.14),
        (39.65, 0.85),
    ),
    # Table 4 (ResNet-10 student, DenseNet-121 CS-KD teacher): top-1 error.
    ("resnet10", "ce", "top1_error"): (
        (26.72, 0.33),
        (46.61, 0.22),
        (48.36, 0.61),
        (38.96, 0.40),
        (44.75, 0.62),
    ),
    ("resnet10", "cskd", "top1_error"): (
        (25.80, 0.10),
        (44.67, 0.12),
        (39.12, 0.09),
        (34.07, 0.46),
        (41.54, 0.67),
    ),
    ("resnet10", "kd", "top1_error"): (
        (25.84, 0.07),
        (43.31, 0.11),
        (39.32, 0.65),
        (34.23, 0.42),
        (41.47, 0.79),
    ),
    ("resnet10", "kd_cskd", "top1_error"): (
        (25.58, 0.16),
        (42.82, 0.33),
        (34.47, 0.17),
        (32.59, 0.50),
        (40.27, 0.78),
    ),
    # Table 6 (ResNet-18): top-5 error.
    ("resnet18", "adacos", "top5_error"): (
        (9.99, 0.20),
        (22.24, 0.11),
        (15.24, 0.66),
        (11.02, 0.22),
        (19.05, 2.33),
    ),
    ("resnet18", "virtual_softmax", "top5_error"): (
        (8.54, 0.11),
        (24.15, 0.17),
        (13.16, 0.20),
        (8.64, 0.21),
        (19.10, 0.20),
    ),
    ("resnet18", "max_entropy", "top5_error"): (
        (7.29, 0.12),
        (21.53, 0.50),
        (19.80, 1.21),
        (10.90, 0.31),
        (20.47, 0.90),
    ),
    ("resnet18", "label_smoothing", "top5_error"): (
        (7.18, 0.08),
        (20.74, 0.31),
        (22.40, 0.85),
        (13.41, 0.40),
        (19.53, 0.75),
    ),
    ("resnet18", "cskd_e", "top5_error"): (
        (5.93, 0.06),
        (19.12, 0.34),
        (13.74, 0.91),
        (8.57, 0.13),
        (18.21, 0.45),
    ),
    # Table 6 (ResNet-18): expected calibration error, 20 bins.
    ("resnet18", "adacos", "ece"): (
        (73.76, 0.35),
        (55.09, 0.41),
        (63.39, 0.06),
        (65.38, 0.33),
        (54.00, 0.52),
    ),
    ("resnet18", "virtual_softmax", "ece"): (
        (8.02, 0.55),
        (4.60, 0.67),
        (11.68, 0.66),
        (7.91, 0.38),
        (11.21, 1.00),
    ),
    ("resnet18", "max_entropy", "ece"): (
        (56.41, 0.36),
        (42.68, 0.31),
        (50.52, 1.20),
        (51.53, 0.28),
        (42.41, 1.74),
    ),
    ("resnet18", "label_smoothing", "ece"): (
        (13.20, 0.60),
        (2.67, 0.48),
        (15.70, 0.81),
        (11.60, 0.40),
        (8.79, 2.47),
    ),
    ("resnet18", "cskd_e", "ece"): (
        (4.69, 0.56),
        (3.79, 0.35),
        (8.75, 0.49),
        (4.70, 0.18),
        (8.06, 1.90),
    ),
    # Table 6 (ResNet-18): recall at 1.
    ("resnet18", "adacos", "recall_at_1"): (
        (67.95, 0.42),
        (44.66, 0.52),
        (54.86, 0.24),
        (58.37, 0.43),
        (42.39, 1.91),
    ),
    ("resnet18", "virtual_softmax", "recall_at_1"): (
        (68.35, 0.48),
        (44.69, 0.58),
        (55.56, 0.74),
        (59.71, 0.56),
        (44.20, 0.90),
    ),
    ("resnet18", "max_entropy", "recall_at_1"): (
        (71.51, 0.29),
        (39.18, 0.79),
        (48.66, 2.10),
        (60.05, 0.45),
        (38.06, 3.32),
    ),
    ("resnet18", "label_smoothing", "recall_at_1"): (
        (71.44, 0.03),
        (34.79, 0.67),
        (41.59, 0.94),
        (54.48, 0.68),
        (35.15, 1.54),
    ),
    ("resnet18", "cskd_e", "recall_at_1"): (
        (70.57, 0.57),
        (45.52, 0.35),
        (58.44, 1.09),
        (62.03, 0.30),
        (44.82, 1.22),
    ),
}


def _build(rows):
    numbers = {}
    for (table_backbone, method, metric), values in rows.items():
        for dataset, value in zip(_DATASETS, values, strict=True):
            per_dataset = BACKBONE_FAMILIES.get(table_backbone)
            backbone = per_dataset[dataset] if per_dataset else table_backbone
            numbers.setdefault((dataset, backbone, method), {})[metric] = value
    return numbers


# (dataset, backbone, method) -> {metric: (mean, std)}, metric in
# top1_error, top5_error, ece, recall_at_1.
PAPER = _build(_ROWS)

# Table 5 (section 3.2, "Evaluation on large-scale datasets"): ImageNet top-1 error (1-crop),
# 90 epochs, batch 256, one decimal; the paper gives no std and no top-5 error. Its
# "ResNeXt-101-32x4d" is `resnext101_32x4d`.
PAPER.update(
    {
        ("imagenet", "resnet50", "ce"): {"top1_error": (24.0, None)},
        ("imagenet", "resnet50", "cskd"): {"top1_error": (23.6, None)},
        ("imagenet", "resnet101", "ce"): {"top1_error": (22.4, None)},
        ("imagenet", "resnet101", "cskd"): {"top1_error": (22.0, None)},
        ("imagenet", "resnext101_32x4d", "ce"): {"top1_error": (21.6, None)},
        ("imagenet", "resnext101_32x4d", "cskd"): {"top1_error": (21.2, None)},
    }
)


# The other rows, keyed as `PAPER`: AdaCos, Virtual-softmax, Maximum-entropy and
# Label-smoothing (Tables 1 and 6), DDGSD and BYOT (Table 2), Mixup and Mixup + CS-KD
# (Table 3), the ResNet-10 student's Cross-entropy, CS-KD, KD and KD + CS-KD (Table 4),
# CS-KD-E (Table 6; the paper gives no top-1 error for it). Kept apart from `PAPER` so that
# `PAPER` stays the Cross-entropy / CS-KD table.
COMPARISONS = _build(_OTHER_ROWS)
assert not PAPER.keys() & COMPARISONS.keys()


def paper_numbers(dataset: str, backbone: str, method: str) -> dict | None:
    """Looks up the paper's numbers for one setting.

    Args:
        dataset: str. Data set name, e.g. "cifar100".
        backbone: str. Backbone name, e.g. "preact_resnet18".
        method: str. Method name as `--method` spells it, e.g. "cskd" or "mixup_cskd"
            (also "ddgsd" and "byot").

    Returns:
        dict | None. Metric name -> `(mean, std)` in percent (std None where the paper gives
        none), a copy of the entry in `PAPER` or `COMPARISONS`; None where the paper has no
        such row.
    """
    key = (dataset, backbone, method)
    numbers = PAPER.get(key, COMPARISONS.get(key))
    return None if numbers is None else dict(numbers)


# Table 7 (appendix A): top-1 error (%) of CS-KD with PreAct ResNet-18 on CIFAR-100, one run per
# cell (the paper gives no std), keyed by (T, lambda_cls).
TABLE7_TEMPERATURES = (0.1, 0.5, 1.0, 4.0, 10.0, 20.0)
TABLE7_LAMBDAS = (0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 10.0, 20.0)
_TABLE7_ROWS = (
    (25.16, 24.03, 23.91, 24.38, 24.05, 24.21, 24.39, 27.61),
    (24.14, 24.05, 24.15, 23.49, 23.78, 23.23, 23.90, 25.96),
    (24.15, 23.32, 22.80, 22.26, 22.87, 23.18, 24.35, 25.58),
    (22.87, 22.03, 21.66, 22.45, 22.68, 22.81, 32.25, 35.45),
    (22.68, 22.36, 21.98, 22.04, 21.95, 31.76, 31.80, 37.50),
    (22.96, 22.39, 22.03, 22.37, 22.00, 22.39, 30.23, 24.05),
)
TABLE7 = {
    (t, lam): value
    for t, row in zip(TABLE7_TEMPERATURES, _TABLE7_ROWS)
    for lam, value in zip(TABLE7_LAMBDAS, row)
}

"""The paper's own numbers (Yun et al., CVPR 2020), to print beside ours.

All values are percentages as `(mean, std)`, copied from the paper's tables;
`std` is None where the paper gives none. Only the Cross-entropy and CS-KD rows
are kept. Keys follow this package's names: the paper's "ResNet-18" is
`preact_resnet18` on the 32x32 sets (CIFAR-100, TinyImageNet) and `resnet18`
on the 224x224 ones (CUB-200-2011, Stanford Dogs, MIT67).
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


def _build():
    numbers = {}
    for (table_backbone, method, metric), values in _ROWS.items():
        for dataset, value in zip(_DATASETS, values, strict=True):
            backbone = _RESNET18[dataset] if table_backbone == "resnet18" else table_backbone
            numbers.setdefault((dataset, backbone, method), {})[metric] = value
    return numbers


# (dataset, backbone, method) -> {metric: (mean, std)}, metric in
# top1_error, top5_error, ece, recall_at_1.
PAPER = _build()

# Table 5: ImageNet top-1 error (1-crop), 90 epochs, batch 256; no std given.
# ResNeXt-101 32x4d is not among our backbones, but kept for completeness.
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


def paper_numbers(dataset: str, backbone: str, method: str) -> dict | None:
    """Looks up the paper's numbers for one setting.

    Args:
        dataset: str. Data set name, e.g. "cifar100".
        backbone: str. Backbone name, e.g. "preact_resnet18".
        method: str. Method name, "ce" or "cskd".

    Returns:
        dict | None. Metric name -> `(mean, std)` in percent (std None where the paper gives
        none), a copy of the entry in `PAPER`; None where the paper has no such row.
    """
    numbers = PAPER.get((dataset, backbone, method))
    return None if numbers is None else dict(numbers)

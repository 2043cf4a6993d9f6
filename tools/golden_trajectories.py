r"""Golden CS-KD trajectories from the authors' PyTorch code, for tests/test_golden.py.

Runs a few CS-KD steps of the authors' models (alinlab/cs-kd at b447f25) exactly as their
`train.py --cls` does, in float64 (the reference) and in float32 (PyTorch's own rounding spread),
from weights and batches that numpy regenerates without PyTorch, and writes a small fixture:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    git clone https://github.com/alinlab/cs-kd /tmp/cs-kd && git -C /tmp/cs-kd checkout b447f25
    /tmp/torchvenv/bin/python tools/golden_trajectories.py --cskd_checkout=/tmp/cs-kd

(about 15 minutes of 2 CPU cores; `--models=CIFAR_ResNet10,...` regenerates some models only).
PyTorch is needed by this script only, never by cskd_tf or its tests. The fixture
(`tests/fixtures/golden/`, one `MODEL-SETTING.npz` per model and setting plus `manifest.json`)
holds, per model and setting:

- `ce64`, `cls64`, `loss64` (and `...32`): per-step cross-entropy, class-wise term (with T^2,
  before lambda) and total loss, as `train.py` computes them;
- `eval64` (and `eval32`): `net.eval()` logits of an evaluation batch on the initial weights;
- `final64` (and `final32`): the state after the steps, every state-dict tensor (parameters and
  running statistics; `num_batches_tracked` is skipped) in `state_dict()` order, concatenated:
  a tensor with at most `full_max` values whole, a larger one as `projections` random
  projections (see below); `step1_64` (and `step1_32`): the same after the first step;
  `norm64`, `delta64` and `step1_delta64`: per tensor, the L2 norm of the final tensor and of
  its change over all steps and over the first one;
- for the models in `PIN_MODELS`, first setting only: `partner_first`, `biased_variance` (and
  their `..._step1`), laid out as `final64`, the float64 trajectory with the partner pass run
  before the anchor pass, and with Keras' biased-variance update of `running_var` (the two
  ways cskd_tf must not update its moving statistics).

Everything is drawn from `numpy.random.default_rng` in this order, in float64:

- weights (seed `seeds.weights`): the state-dict tensors in `state_dict()` order, each drawn
  with its `dist` from the manifest's `tensors` list `[name, shape, dist, a, b]`:
  `uniform` is `rng.uniform(a, b, shape)`, `normal` is `a + b * rng.standard_normal(shape)`.
  Convolution kernels get He-uniform bounds +-sqrt(6 / fan_in) (so the eval-mode signal neither
  dies nor explodes through 120 layers), linear weights and biases +-1 / sqrt(fan_in),
  batch-norm weight 1 + 0.1 N(0, 1), bias 0.1 N(0, 1), running_mean 0.1 N(0, 1) and
  running_var uniform(0.5, 1.5), so that the inference-mode statistics are not trivial;
- data (seed `seeds.data[setting]`): the evaluation batch `standard_normal((eval_batch, 3, H,
  W))`, then per step the anchors `standard_normal((batch, 3, H, W))`, the partners (same shape)
  and the labels `integers(0, num_classes, batch)`; partners share the anchors' labels (NCHW;
  cskd_tf takes the transpose (0, 2, 3, 1));
- projections (seed `seeds.projections`): for every tensor with more than `full_max` values, in
  the same order, `standard_normal((projections, size)) / sqrt(size)`, applied to the tensor
  flattened in PyTorch's layout (C order of the state-dict shape).

Each step follows `train.py` (`--cls`) line by line: `net.train()`; `outputs =
net(inputs[:B])`; `loss = mean(CrossEntropyLoss(outputs, targets[:B]))`; `with
torch.no_grad(): outputs_cls = net(inputs[B:])`; `loss += lamda * KDLoss(T)(outputs,
outputs_cls)` with `KLDivLoss(reduction="sum")(log_softmax(outputs / T), softmax(outputs_cls /
T)) * T**2 / B`; `optimizer.zero_grad(); loss.backward(); optimizer.step()` with
`optim.SGD(net.parameters(), lr, momentum=0.9, weight_decay=wd)`. Both passes are in training
mode, so both update the batch-norm running statistics (anchor pass first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

NUM_CLASSES = 10
BATCH = 8  # anchors per step; the step processes 8 anchors + 8 partners.
EVAL_BATCH = 8
STEPS = 5
FULL_MAX = 64  # tensors with at most this many values are stored whole
PROJECTIONS = 4
SEEDS = {"weights": 20200614, "data": {"a": 1, "b": 2}, "projections": 3}
# torch model -> (cskd_tf registry name, input height = width).
MODELS = {
    "CIFAR_ResNet10": ("preact_resnet10", 32),
    "CIFAR_ResNet18": ("preact_resnet18", 32),
    "resnet10": ("resnet10", 64),
    "resnet18": ("resnet18", 64),
    "CIFAR_DenseNet121": ("densenet121", 32),
    # cskd_tf's densenet121 picks the 7x7 (torchvision) stem only above 64 pixels.
    "densenet121": ("densenet121", 96),
}
# The paper's defaults (T=4, lambda=1, wd=1e-4) and the CUB-200-2011 weight with a lower
# temperature and a stronger decay. At lr 0.01 the float64 steps are smooth (a 1e-7 change of
# the input moves the first gradient by 4e-7; lr 0.1 diverges within five steps); float32's
# spread (the manifest's `max_spread`) comes from ReLU kinks, see tests/test_golden.py.
SETTINGS = {
    "a": {"temperature": 4.0, "lambda_cls": 1.0, "weight_decay": 1e-4, "learning_rate": 0.01},
    "b": {"temperature": 2.0, "lambda_cls": 3.0, "weight_decay": 5e-4, "learning_rate": 0.01},
}
PIN_MODELS = ("CIFAR_ResNet10", "resnet10")
CSKD_COMMIT = "b447f250405932501cb28db0dc09eadeab526b80"


# ----------------------------------------------------------------------------------------------
# What the test regenerates without PyTorch (numpy only).


def draw_tensors(tensors, seed):
    """Draws the initial state dict from the manifest's `[name, shape, dist, a, b]` list."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, shape, dist, a, b in tensors:
        if dist == "uniform":
            values[name] = rng.uniform(a, b, tuple(shape))
        else:
            values[name] = a + b * rng.standard_normal(tuple(shape))
    return values


def draw_batches(height, setting):
    """Draws the evaluation batch and the per-step (anchors, partners, labels), NCHW float64."""
    rng = np.random.default_rng(SEEDS["data"][setting])
    shape = (3, height, height)
    x_eval = rng.standard_normal((EVAL_BATCH, *shape))
    steps = []
    for _ in range(STEPS):
        x = rng.standard_normal((BATCH, *shape))
        x_pair = rng.standard_normal((BATCH, *shape))
        y = rng.integers(0, NUM_CLASSES, BATCH)
        steps.append((x, x_pair, y))
    return x_eval, steps


def flat_values(state, tensors):
    """The values the fixture keeps, concatenated in `tensors` order: each tensor whole
    (flattened in PyTorch's layout) if it has at most FULL_MAX values, else its projections."""
    rng = np.random.default_rng(SEEDS["projections"])
    pieces = []
    for name, shape, *_ in tensors:
        values = np.asarray(state[name], np.float64).ravel()
        if values.size > FULL_MAX:
            vectors = rng.standard_normal((PROJECTIONS, values.size)) / math.sqrt(values.size)
            values = vectors @ values
        pieces.append(values)
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------------------------
# PyTorch.


def _tensor_specs(net, torch):
    """`[name, shape, dist, a, b]` for every state-dict tensor but `num_batches_tracked`."""
    modules = dict(net.named_modules())
    specs = []
    for name, tensor in net.state_dict().items():
        module_name, _, kind = name.rpartition(".")
        if kind == "num_batches_tracked":
            continue
        module = modules[module_name]
        shape = list(tensor.shape)
        if isinstance(module, torch.nn.BatchNorm2d):
            dist = {
                "weight": ["normal", 1.0, 0.1],
                "bias": ["normal", 0.0, 0.1],
                "running_mean": ["normal", 0.0, 0.1],
                "running_var": ["uniform", 0.5, 1.5],
            }[kind]
        elif isinstance(module, torch.nn.Conv2d) and kind == "weight":
            bound = math.sqrt(6.0 / math.prod(shape[1:]))
            dist = ["uniform", -bound, bound]
        elif isinstance(module, torch.nn.Linear):
            bound = 1.0 / math.sqrt(module.weight.shape[1])
            dist = ["uniform", -bound, bound]
        else:
            raise ValueError(f"No initial distribution for '{name}' ({type(module).__name__}).")
        specs.append([name, shape, *dist])
    return specs


def _kd_loss(outputs, outputs_cls, temperature, torch):
    # train.py's KDLoss: KLDivLoss(reduction="sum")(log_p, q) * T^2 / batch.
    log_p = torch.log_softmax(outputs / temperature, dim=1)
    q = torch.softmax(outputs_cls / temperature, dim=1)
    kl = torch.nn.KLDivLoss(reduction="sum")(log_p, q)
    return kl * temperature**2 / outputs.size(0)


def _biased_variance_hooks(net, torch):
    """Turns each BatchNorm2d's running_var update into Keras' (biased variance) one.

    After PyTorch's update `(1 - m) * var * n / (n - 1)`, subtract `(1 - m) * var / (n - 1)`.
    """

    def hook(module, inputs, output):
        if module.training:
            x = inputs[0]
            n = x.numel() // x.shape[1]
            variance = x.detach().var(dim=(0, 2, 3), unbiased=False)
            # `.data`: the anchor pass's backward must not see a new version of running_var
            # (training-mode batch-norm never reads it there).
            module.running_var.data.sub_(module.momentum * variance / (n - 1))

    return [m.register_forward_hook(hook) for m in net.modules()
            if isinstance(m, torch.nn.BatchNorm2d)]


def run_torch(models, torch, model_name, initial, x_eval, steps, setting, dtype,
              partner_first=False, biased_variance=False):
    """Runs `train.py --cls` steps from `initial`; returns losses, eval logits and final state."""
    net = models.load_model(model_name, NUM_CLASSES).to(dtype)
    state = net.state_dict()
    with torch.no_grad():
        for name, value in initial.items():
            state[name].copy_(torch.from_numpy(value))
    hooks = _biased_variance_hooks(net, torch) if biased_variance else []

    net.eval()
    with torch.no_grad():
        eval_logits = net(torch.from_numpy(x_eval).to(dtype)).double().numpy()

    params = SETTINGS[setting]
    optimizer = torch.optim.SGD(
        net.parameters(), lr=params["learning_rate"], momentum=0.9,
        weight_decay=params["weight_decay"],
    )
    criterion = torch.nn.CrossEntropyLoss()
    net.train()
    ce_log, cls_log, loss_log, snapshots = [], [], [], []
    for x, x_pair, y in steps:
        # The pair sampler's batch: anchors then partners, the partners with the same labels.
        inputs = torch.from_numpy(np.concatenate([x, x_pair])).to(dtype)
        targets = torch.from_numpy(np.concatenate([y, y]))
        batch_size = inputs.size(0)
        targets_ = targets[: batch_size // 2]
        if partner_first:
            with torch.no_grad():
                outputs_cls = net(inputs[batch_size // 2:])
        outputs = net(inputs[: batch_size // 2])
        loss = torch.mean(criterion(outputs, targets_))
        ce_log.append(loss.item())
        if not partner_first:
            with torch.no_grad():
                outputs_cls = net(inputs[batch_size // 2:])
        cls_loss = _kd_loss(outputs, outputs_cls.detach(), params["temperature"], torch)
        loss += params["lambda_cls"] * cls_loss
        cls_log.append(cls_loss.item())
        loss_log.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snapshots.append({
            name: tensor.detach().double().numpy().copy()
            for name, tensor in net.state_dict().items()
            if name in initial
        })
        del snapshots[1:-1]  # Keep the first step's state and the last one.
    for handle in hooks:
        handle.remove()
    return {
        "ce": np.array(ce_log), "cls": np.array(cls_log), "loss": np.array(loss_log),
        "eval": eval_logits, "step1": snapshots[0], "final": snapshots[-1],
    }


def _state_spread(arrays, key, specs):
    """Largest |float32 - float64| of a tensor's kept values over the RMS of its change."""
    worst, start = 0.0, 0
    values32, values64 = (arrays["step1_32"], arrays["step1_64"]) if key == "step1" else (
        arrays["final32"], arrays["final64"])
    delta = arrays["step1_delta64" if key == "step1" else "delta64"]
    for index, (_, shape, *_) in enumerate(specs):
        size = math.prod(shape)
        stop = start + (size if size <= FULL_MAX else PROJECTIONS)
        error = np.max(np.abs(values32[start:stop] - values64[start:stop]))
        worst = max(worst, float(error / (delta[index] / math.sqrt(size))))
        start = stop
    return worst


def _manifest_text(manifest):
    """Indented JSON, with each `[name, shape, dist, a, b]` of the `tensors` lists on one line."""
    specs = []
    models = {}
    for name, entry in manifest["models"].items():
        placeholders = [f"@tensor{len(specs) + i}@" for i in range(len(entry["tensors"]))]
        specs += entry["tensors"]
        models[name] = {**entry, "tensors": placeholders}
    text = json.dumps({**manifest, "models": models}, indent=1)
    for index, spec in enumerate(specs):
        text = text.replace(f'"@tensor{index}@"', json.dumps(spec), 1)
    return text + "\n"


def _git_commit(checkout):
    try:
        return subprocess.run(
            ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cskd_checkout", required=True,
                        help="Path of a checkout (work tree) of alinlab/cs-kd at b447f25.")
    parser.add_argument("--out", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "golden"),
        help="Fixture folder (default: tests/fixtures/golden of this repository).")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="Comma-separated torch model names (default: all six).")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown --models {', '.join(unknown)}; choose from {', '.join(MODELS)}.")

    import torch  # pylint: disable=g-import-not-at-top

    checkout = os.path.abspath(args.cskd_checkout)
    if not os.path.isfile(os.path.join(checkout, "models", "__init__.py")):
        parser.error(f"{checkout} is not a checkout of alinlab/cs-kd (no models/__init__.py).")
    sys.path.insert(0, checkout)
    import models  # pylint: disable=g-import-not-at-top,import-error

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    commit = _git_commit(checkout)
    if commit is not None and commit != CSKD_COMMIT:
        print(f"warning: {checkout} is at {commit}, not {CSKD_COMMIT}.", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    manifest_path = os.path.join(args.out, "manifest.json")
    models_entries = {}
    if os.path.exists(manifest_path):  # Regenerating some models keeps the others' entries.
        with open(manifest_path) as f:
            models_entries = json.load(f)["models"]
    header = {
        "format": 1,
        "generator": "tools/golden_trajectories.py",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cskd_commit": commit or CSKD_COMMIT,
        "num_classes": NUM_CLASSES,
        "batch": BATCH,
        "eval_batch": EVAL_BATCH,
        "steps": STEPS,
        "full_max": FULL_MAX,
        "projections": PROJECTIONS,
        "seeds": SEEDS,
        "settings": SETTINGS,
        "bn": {"momentum": 0.1, "eps": 1e-5},
        "sgd": {"momentum": 0.9, "dampening": 0.0, "nesterov": False},
    }

    for model_name in args.models.split(","):
        cskd_name, height = MODELS[model_name]
        specs = _tensor_specs(models.load_model(model_name, NUM_CLASSES), torch)
        initial = draw_tensors(specs, SEEDS["weights"])
        entry = {"cskd_tf": cskd_name, "input_shape": [height, height, 3], "tensors": specs,
                 "files": {}, "pin": model_name in PIN_MODELS, "max_spread": {}}
        for setting in SETTINGS:
            x_eval, steps = draw_batches(height, setting)
            run64 = run_torch(models, torch, model_name, initial, x_eval, steps, setting,
                              torch.float64)
            run32 = run_torch(models, torch, model_name, initial, x_eval, steps, setting,
                              torch.float32)
            arrays = {}
            for key in ("ce", "cls", "loss", "eval"):
                arrays[f"{key}64"] = run64[key]
                arrays[f"{key}32"] = run32[key]
            arrays["final64"] = flat_values(run64["final"], specs)
            arrays["final32"] = flat_values(run32["final"], specs)
            arrays["step1_64"] = flat_values(run64["step1"], specs)
            arrays["step1_32"] = flat_values(run32["step1"], specs)
            arrays["norm64"] = np.array([np.linalg.norm(run64["final"][n]) for n, *_ in specs])
            arrays["delta64"] = np.array(
                [np.linalg.norm(run64["final"][n] - initial[n]) for n, *_ in specs])
            arrays["step1_delta64"] = np.array(
                [np.linalg.norm(run64["step1"][n] - initial[n]) for n, *_ in specs])
            if entry["pin"] and setting == next(iter(SETTINGS)):
                for flag in ("partner_first", "biased_variance"):
                    alt = run_torch(models, torch, model_name, initial, x_eval, steps, setting,
                                    torch.float64, **{flag: True})
                    arrays[flag] = flat_values(alt["final"], specs)
                    arrays[f"{flag}_step1"] = flat_values(alt["step1"], specs)
            file_name = f"{model_name}-{setting}.npz"
            np.savez_compressed(os.path.join(args.out, file_name), **arrays)
            entry["files"][setting] = file_name
            # PyTorch's float32 - float64, in the units tests/test_golden.py compares in.
            entry["max_spread"][setting] = {
                "loss": float(np.max(np.abs(run32["loss"] - run64["loss"]) / run64["loss"])),
                "eval_logits": float(np.max(np.abs(run32["eval"] - run64["eval"]))
                                     / np.max(np.abs(run64["eval"]))),
                "step1_state": _state_spread(arrays, "step1", specs),
                "final_state": _state_spread(arrays, "final", specs),
            }
            print(f"{model_name} {setting}: loss64 {np.round(run64['loss'], 5).tolist()}, "
                  f"spreads {entry['max_spread'][setting]}", flush=True)
        models_entries[model_name] = entry

    with open(manifest_path, "w") as f:
        f.write(_manifest_text({**header, "models": models_entries}))
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"Wrote {args.out}: {total / 1e6:.2f} MB.")


if __name__ == "__main__":
    main()

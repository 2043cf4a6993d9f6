"""Golden trajectories: cskd_tf's CS-KD steps against the authors' PyTorch code, step by step.

`tools/golden_trajectories.py` ran the authors' models (alinlab/cs-kd at b447f25) through five
steps of their `train.py --cls` in float64, from weights and batches that numpy regenerates
here without PyTorch (`tests/fixtures/golden/manifest.json` lists every state-dict tensor with
its shape and distribution, in the order they are drawn). This module rebuilds the same
weights, loads them into the registry backbone with `cskd_tf.backbones.porting`, trains it with
`CSKDModel` and `CoupledWeightDecaySGD` through `train_on_batch` (graph mode for the ResNets,
eager for the DenseNets), and compares with PyTorch's float64 run:

- the inference-mode logits of an evaluation batch on the initial weights (`net.eval()`);
- per step, the cross-entropy, the class-wise term and the total loss;
- after the first step and after the last, every parameter and every moving mean and variance
  (whole tensors of up to 64 values, else 4 fixed random projections of the tensor).

Six backbones (`preact_resnet10/18` <- `CIFAR_ResNet10/18` at 32x32, `resnet10/18` at 64x64,
`densenet121` <- `CIFAR_DenseNet121` at 32x32 and <- `densenet121` at 96x96), 10 classes,
8 anchors + 8 partners a step, SGD lr 0.01 with momentum 0.9, two settings: (a) T = 4,
lambda = 1, wd = 1e-4, (b) T = 2, lambda = 3, wd = 5e-4. Every setting runs with Keras' float64
dtype policy (the `logits` layer stays float32, as every registry backbone keeps it, and so do
the losses); the first setting also runs its first step with the default float32 policy.

Tolerances. A ReLU network's gradient jumps where a pre-activation crosses 0: rounding that
moves one of the ~1e7 pre-activations of a step across 0 changes the gradient below it by
~1/sqrt(n) (n, the values per channel of that layer: ~1e-2 of it), a "flip". Without one the
steps are smooth: a float64 input perturbed by 1e-7 moves PyTorch's first gradient by 4e-7.
float32 rounding (~1e-7 of every value) makes flips common from the first step on: PyTorch's
own float32 run differs from its float64 one by up to 0.21 of the 5-step change on
CIFAR_ResNet18 and 1.2-1.4 on the DenseNets (the manifest's `max_spread`), so float32 is
compared after the first step only. In the float64 runs the float32 head's rounding (6e-8 of
each update) moves the later weights by ~1e-9, enough for a rare flip from step 2 on
(measured: CIFAR_DenseNet121, setting a, steps 4 and 5). Errors below are measured maxima over
all models and settings, as fractions of what each tolerance is a fraction of:

- smooth quantities, tight: inference-mode logits within LOGITS_RTOL = 1e-5 of the largest
  logit (measured 6.6e-7 float64, 1.1e-6 float32; PyTorch float32 4.6e-7); the first step's
  losses within LOSS_RTOL = 1e-5 (measured 3.4e-7); the float64 state after the first step
  within STEP_RTOL = 3e-5 of each tensor's RMS change in that step (measured 4.0e-6, the
  float32 head's bias; 1.1e-6 for the moving statistics); the float32 moving statistics after
  the first step within FLOAT32_MOVING_RTOL = 2e-4 (measured 2.2e-5; PyTorch 4.7e-6). Each
  tensor also gets VALUE_RTOL of its RMS value for values stored in float32. These bounds lie
  far below what they must see: weight decay is ~1e-2 of a batch-norm scale's first update; a
  10% error of the learning rate, T or lambda moves updates by ~1e-1; the partner-first order
  and the biased-variance update move some moving statistic by >= 1.2e-2 of its first change
  (>= 400 tolerances; the pin test);
- quantities past a possible flip, at the size a few flips reach: the later steps' losses
  within LATER_LOSS_RTOL = 1e-3 (measured 7.5e-6; 5.1e-7 without a flip); the float32 first
  step's parameters within FLOAT32_STEP_RTOL = 0.1 of their change (measured 2.2e-2); the
  float64 state after all steps within FLIPPED_STATE_RTOL = 0.25 of the change for parameters
  (measured 3.7e-2 with the two flips, 1.7e-6 without) and FLIPPED_MOVING_RTOL = 1e-2 for
  moving statistics (measured 1.1e-4). These still see momentum (a factor ~2.6 on the 5-step
  displacement) and how the moving statistics accumulate.

The pin test (`test_moving_statistics_pin_pytorch_update_and_pass_order`) also holds two float64
PyTorch runs cskd_tf must NOT match: the partner pass run before the anchor pass, and Keras'
biased-variance update of the moving variance. It fails with the name of the one matched.

Regenerate the fixture (PyTorch in a separate virtual environment, never a cskd_tf dependency;
about 10 minutes on 2 CPU cores):

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    git clone https://github.com/alinlab/cs-kd /tmp/cs-kd && git -C /tmp/cs-kd checkout b447f25
    /tmp/torchvenv/bin/python tools/golden_trajectories.py --cskd_checkout=/tmp/cs-kd
"""

import functools
import json
import math
import pathlib

import keras
import numpy as np
import pytest

import cskd_tf
from cskd_tf.backbones import porting

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "golden"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())
MODELS = list(MANIFEST["models"])
SETTINGS = list(MANIFEST["settings"])
PIN_MODELS = [name for name in MODELS if MANIFEST["models"][name]["pin"]]
# Graph mode for the ResNets (where op order could differ from eager); DenseNet-121's 120
# layers take longer to trace than to run five steps eagerly.
EAGER = {"CIFAR_DenseNet121", "densenet121"}
# Every setting in float64; float32 (the first step only, module docstring) in the first one.
RUNS = [(setting, "float64") for setting in SETTINGS] + [(SETTINGS[0], "float32")]

# Tolerances; the module docstring gives the measured errors they bound.
LOGITS_RTOL = 1e-5  # of the largest |logit|, inference mode on the initial weights
LOSS_RTOL = 1e-5  # of the first step's loss
STEP_RTOL = 3e-5  # of each tensor's RMS change in the first step (float64)
FLOAT32_MOVING_RTOL = 2e-4  # of each moving statistic's RMS change in the first step
# Past a possible flip of a ReLU (module docstring):
LATER_LOSS_RTOL = 1e-3  # of the later steps' losses (float64)
FLOAT32_STEP_RTOL = 0.1  # of each parameter's RMS change in the first step (float32)
FLIPPED_STATE_RTOL = 0.25  # of each parameter's RMS change over all steps (float64)
FLIPPED_MOVING_RTOL = 1e-2  # of each moving statistic's RMS change over all steps (float64)
# Plus, of each tensor's RMS value, the rounding of values stored in float32 (6e-8 of each,
# up to ~3x the RMS): all of them in the float32 runs, the head's in the float64 ones.
VALUE_RTOL = {"float64": 2e-7, "float32": 1e-6}
PIN_MARGIN = 100  # an excluded run lies at least this many tolerances away


# --- What the fixture's manifest documents, regenerated with numpy only -----------------------


def _draw_tensors(tensors, seed):
    """The initial state dict: `[name, shape, dist, a, b]` drawn in order from one generator."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, shape, dist, a, b in tensors:
        if dist == "uniform":
            values[name] = rng.uniform(a, b, tuple(shape))
        else:
            values[name] = a + b * rng.standard_normal(tuple(shape))
    return values


def _draw_batches(height, setting):
    """The evaluation batch, then per step (anchors, partners, labels); NCHW as drawn."""
    rng = np.random.default_rng(MANIFEST["seeds"]["data"][setting])
    shape = (3, height, height)
    x_eval = rng.standard_normal((MANIFEST["eval_batch"], *shape))
    steps = []
    for _ in range(MANIFEST["steps"]):
        x = rng.standard_normal((MANIFEST["batch"], *shape))
        x_pair = rng.standard_normal((MANIFEST["batch"], *shape))
        y = rng.integers(0, MANIFEST["num_classes"], MANIFEST["batch"])
        steps.append((x, x_pair, y))
    return x_eval, steps


def _flat_values(state, tensors):
    """Each tensor whole (PyTorch layout, C order) or as its random projections, concatenated."""
    rng = np.random.default_rng(MANIFEST["seeds"]["projections"])
    pieces = []
    for name, *_ in tensors:
        values = np.asarray(state[name], np.float64).ravel()
        if values.size > MANIFEST["full_max"]:
            vectors = rng.standard_normal((MANIFEST["projections"], values.size))
            values = (vectors / math.sqrt(values.size)) @ values
        pieces.append(values)
    return np.concatenate(pieces)


def _slices(tensors):
    """`[(name, slice into the flat values)]`."""
    sizes = [math.prod(shape) for _, shape, *_ in tensors]
    sizes = [size if size <= MANIFEST["full_max"] else MANIFEST["projections"] for size in sizes]
    ends = np.cumsum(sizes)
    return [(t[0], slice(int(end - size), int(end))) for t, size, end in zip(tensors, sizes, ends)]


def _nhwc(images, dtype):
    return np.transpose(images, (0, 2, 3, 1)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _initial(model):
    entry = MANIFEST["models"][model]
    return _draw_tensors(entry["tensors"], MANIFEST["seeds"]["weights"])


@functools.lru_cache(maxsize=None)
def _reference(model, setting):
    return dict(np.load(FIXTURE / MANIFEST["models"][model]["files"][setting]))


# --- cskd_tf's run ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _run(model, setting, precision):
    """cskd_tf's eval logits, per-step losses and flat state after the first and last step.

    float64 runs every step of the fixture, float32 the first one only (module docstring).
    """
    entry = MANIFEST["models"][model]
    params = MANIFEST["settings"][setting]
    x_eval, steps = _draw_batches(entry["input_shape"][0], setting)
    if precision == "float32":
        steps = steps[:1]
    keras.backend.clear_session()
    policy, floatx = keras.config.dtype_policy(), keras.config.floatx()
    keras.config.set_dtype_policy(precision)
    try:
        # floatx is the dtype of the backbone's `keras.Input`: float32 would round the float64
        # run's images. The losses stay float32, as cskd_tf computes them.
        keras.config.set_floatx(precision)
        backbone = cskd_tf.backbones.get(
            entry["cskd_tf"], MANIFEST["num_classes"], tuple(entry["input_shape"])
        )
        keras.config.set_floatx(floatx)
        porting.load_torch_state_dict(backbone, _initial(model))
        eval_logits = keras.ops.convert_to_numpy(
            backbone(_nhwc(x_eval, precision), training=False)
        )
        cskd = cskd_tf.CSKDModel(
            backbone, temperature=params["temperature"], lambda_cls=params["lambda_cls"]
        )
        cskd.compile(
            optimizer=cskd_tf.CoupledWeightDecaySGD(
                params["learning_rate"],
                momentum=MANIFEST["sgd"]["momentum"],
                coupled_weight_decay=params["weight_decay"],
            ),
            run_eagerly=model in EAGER,
            jit_compile=False,
        )
        logs, states = [], []
        for x, x_pair, y in steps:
            cskd.reset_metrics()  # Each step's own values, not running means.
            logs.append(
                cskd.train_on_batch(
                    (_nhwc(x, precision), _nhwc(x_pair, precision)), y, return_dict=True
                )
            )
            if len(states) < 1 or len(logs) == len(steps):
                states.append(_flat_values(porting.torch_state_dict(backbone), entry["tensors"]))
    finally:
        keras.config.set_dtype_policy(policy)
        keras.config.set_floatx(floatx)
    return {
        "eval": eval_logits,
        "step1": states[0],
        "final": states[-1],
        **{key: np.array([float(log[name]) for log in logs])
           for key, name in (("ce", "ce_loss"), ("cls", "cls_loss"), ("loss", "loss"))},
    }


def _state_errors(model, setting, values, rtol, key, precision="float64", target=None):
    """`[(error / tolerance, tensor name)]` against PyTorch's float64 state, worst first.

    A tensor's tolerance is `rtol` of the RMS of its change (`key`: over the first step, or
    over all of them) plus VALUE_RTOL of its RMS value (the rounding of values stored in
    float32), per kept value: a whole value or a projection, both of which scale as the RMS.
    """
    entry = MANIFEST["models"][model]
    ref = _reference(model, setting)
    delta = ref["step1_delta64"] if key == "step1" else ref["delta64"]
    target = ref["step1_64" if key == "step1" else "final64"] if target is None else target
    rows = []
    for index, (name, where) in enumerate(_slices(entry["tensors"])):
        size = math.prod(entry["tensors"][index][1])
        tolerance = rtol * delta[index] + VALUE_RTOL[precision] * ref["norm64"][index]
        error = np.max(np.abs(values[where] - target[where]))
        rows.append((error / (tolerance / math.sqrt(size)), name))
    return sorted(rows, reverse=True)


def _is_moving(name):
    return name.endswith(("running_mean", "running_var"))


def _assert_within(rows, what):
    bad = [row for row in rows if row[0] > 1]
    shown = ", ".join(f"{name} ({ratio:.3g}x the tolerance)" for ratio, name in bad[:3])
    assert not bad, f"{what}: {len(bad)} of {len(rows)} tensors differ from PyTorch's: {shown}."


def _split(rows, parameters_rtol, moving_rtol):
    """Rows computed with rtol 1, rescaled to each kind's own tolerance."""
    return [(r / (moving_rtol if _is_moving(n) else parameters_rtol), n) for r, n in rows]


def _models(names=MODELS):
    # Even CIFAR_ResNet10's runs take ~10 s of CPU (the porting tests below are quick).
    return [pytest.param(m, marks=pytest.mark.slow) for m in names]


# --- Tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("model", _models())
def test_inference_logits_match_pytorch_eval_mode(model, precision):
    ref = _reference(model, SETTINGS[0])
    logits = _run(model, SETTINGS[0], precision)["eval"]
    error = np.max(np.abs(logits - ref["eval64"])) / np.max(np.abs(ref["eval64"]))
    assert error <= LOGITS_RTOL, (
        f"{model} ({precision}): inference-mode logits differ from PyTorch's net.eval() ones by "
        f"{error:.2e} of the largest logit (tolerance {LOGITS_RTOL:.0e})."
    )


@pytest.mark.parametrize(("setting", "precision"), RUNS)
@pytest.mark.parametrize("model", _models())
def test_losses_match_pytorch_each_step(model, setting, precision):
    ref = _reference(model, setting)
    run = _run(model, setting, precision)
    steps = len(run["loss"])
    # The first step's losses are smooth functions of the initial weights; later ones see the
    # few kink flips of the earlier steps (module docstring).
    rtol = np.array([LOSS_RTOL] + [LATER_LOSS_RTOL] * (steps - 1))
    for key in ("ce", "cls", "loss"):
        expected = ref[f"{key}64"][:steps]
        # Relative to the total loss, of which the class-wise term is a small part.
        error = np.abs(run[key] - expected) / ref["loss64"][:steps]
        assert np.all(error <= rtol), (
            f"{model} {setting} ({precision}): {key} loss per step {np.round(run[key], 6)}, "
            f"PyTorch's {np.round(expected, 6)} (relative errors {error}, tolerances {rtol})."
        )


@pytest.mark.parametrize(("setting", "precision"), RUNS)
@pytest.mark.parametrize("model", _models())
def test_first_step_weights_and_moving_statistics_match_pytorch(model, setting, precision):
    rows = _state_errors(
        model, setting, _run(model, setting, precision)["step1"], 1.0, "step1", precision
    )
    if precision == "float64":
        rows = _split(rows, STEP_RTOL, STEP_RTOL)
    else:
        rows = _split(rows, FLOAT32_STEP_RTOL, FLOAT32_MOVING_RTOL)
    _assert_within(rows, f"{model} {setting} ({precision}) after the first step")


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("model", _models())
def test_last_step_weights_and_moving_statistics_match_pytorch(model, setting):
    rows = _state_errors(model, setting, _run(model, setting, "float64")["final"], 1.0, "final")
    _assert_within(
        _split(rows, FLIPPED_STATE_RTOL, FLIPPED_MOVING_RTOL),
        f"{model} {setting} (float64) after {MANIFEST['steps']} steps",
    )


EXCLUDED = {
    "partner_first": "the partner pass run before the anchor pass",
    "biased_variance": "Keras' biased-variance update of the moving variance",
}


@pytest.mark.parametrize("model", _models(PIN_MODELS))
def test_moving_statistics_pin_pytorch_update_and_pass_order(model):
    """The moving statistics follow PyTorch's unbiased-variance update, anchor pass first.

    The fixture holds two float64 PyTorch runs that differ from the reference in the moving
    statistics only: the partner pass run first, and Keras' biased-variance update. After the
    first step each lies more than PIN_MARGIN tolerances (STEP_RTOL) from the reference, so
    agreeing with the reference excludes both; a disagreement names the one matched instead.
    """
    setting = SETTINGS[0]
    ref = _reference(model, setting)
    mine = _run(model, setting, "float64")["step1"]

    def worst(values, target=None):
        rows = _state_errors(model, setting, values, STEP_RTOL, "step1", target=target)
        return max(ratio for ratio, name in rows if _is_moving(name))

    for alternative in EXCLUDED:
        assert worst(ref[f"{alternative}_step1"]) > PIN_MARGIN, f"{alternative} is too close."
    if worst(mine) > 1:
        matched = [
            what for alt, what in EXCLUDED.items() if worst(mine, ref[f"{alt}_step1"]) <= 1
        ]
        pytest.fail(
            f"{model}: the moving statistics after one step lie {worst(mine):.3g}x the tolerance "
            "from PyTorch's; "
            + (f"they match {matched[0]} instead." if matched else
               "neither excluded run explains it.")
        )


# --- The porting helper on its own ---------------------------------------------------------------


def _small_state(model):
    """The fixture's initial state dict of `model`, as float32 arrays."""
    return {name: value.astype(np.float32) for name, value in _initial(model).items()}


def test_porting_round_trips_and_reads_checkpoint_names():
    entry = MANIFEST["models"]["CIFAR_ResNet10"]
    backbone = cskd_tf.backbones.get(entry["cskd_tf"], 10, tuple(entry["input_shape"]))
    state = _small_state("CIFAR_ResNet10")
    # A DataParallel checkpoint (`module.` prefix) with its batch counters loads as is.
    checkpoint = {f"module.{name}": value for name, value in state.items()}
    checkpoint["module.bn1.num_batches_tracked"] = np.array(5)
    porting.load_torch_state_dict(backbone, checkpoint)
    exported = porting.torch_state_dict(backbone)
    assert sorted(exported) == sorted(state)
    for name, value in state.items():
        np.testing.assert_array_equal(exported[name], value)
    kernel = backbone.get_layer("layer2_0_shortcut").kernel
    np.testing.assert_array_equal(  # OIHW -> HWIO
        keras.ops.convert_to_numpy(kernel), np.transpose(state["layer2.0.shortcut.0.weight"],
                                                         (2, 3, 1, 0))
    )


@pytest.mark.slow
def test_porting_reads_torchvision_densenet_legacy_names():
    entry = MANIFEST["models"]["densenet121"]
    backbone = cskd_tf.backbones.get(entry["cskd_tf"], 10, tuple(entry["input_shape"]))
    state = {
        name.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): value
        for name, value in _small_state("densenet121").items()
    }
    porting.load_torch_state_dict(backbone, state)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(backbone.get_layer("denseblock2_layer3_norm1").gamma),
        state["features.denseblock2.denselayer3.norm.1.weight"],
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("layer3.0.shortcut.0.weight"), r"lacks 1 tensor.*layer3\.0\.shortcut"),
        (lambda s: s.update({"fc.weight": np.zeros((10, 512))}), r"has 1 tensor.*'fc\.weight'"),
        (lambda s: s.update({"linear.weight": np.zeros((100, 512))}),
         r"'linear\.weight' has shape \(100, 512\) where .* needs \(10, 512\)"),
        (lambda s: s.update({"conv1.weight": np.zeros((64, 3, 3))}),
         r"'conv1\.weight' has shape \(64, 3, 3\) where .* needs \(64, 3, 3, 3\)"),
    ],
    ids=["missing", "extra", "classes", "rank"],
)
def test_porting_refuses_a_mismatched_state_dict_and_changes_nothing(change, message):
    entry = MANIFEST["models"]["CIFAR_ResNet10"]
    backbone = cskd_tf.backbones.get(entry["cskd_tf"], 10, tuple(entry["input_shape"]))
    before = [keras.ops.convert_to_numpy(w) for w in backbone.weights]
    state = _small_state("CIFAR_ResNet10")
    change(state)
    with pytest.raises(ValueError, match=message):
        porting.load_torch_state_dict(backbone, state)
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(new))


def test_porting_refuses_a_backbone_without_pytorch_counterpart():
    with pytest.raises(ValueError, match="small_convnet.*no PyTorch counterpart"):
        porting.torch_names(cskd_tf.backbones.get("small_convnet", 3, (8, 8, 3)))

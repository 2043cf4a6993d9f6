"""`tf_kd` (Tf-KD_reg, Yuan et al., CVPR 2020): its virtual teacher, both forms, its step."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from scipy import special

from cskd_tf import backbones
from cskd_tf import methods
from cskd_tf import train
from cskd_tf.errors import UserError
from cskd_tf.methods import tf_kd

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE, CLASSES = (4, 4, 1), 3


def context(num_classes=CLASSES):
    return methods.Context(
        dataset="test", backbone="mlp", num_classes=num_classes, input_shape=SHAPE,
        train_size=8, epochs=1, steps_per_epoch=1,
    )  # fmt: skip


def options(**given):
    values = {name: flag.default for name, flag in tf_kd.FLAGS.items()}
    values.update(given)
    return values


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return backbones.get("mlp", CLASSES, SHAPE)


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *SHAPE)).astype(np.float32), rng.integers(0, CLASSES, size=n)


def small_logits():
    return np.array([[2.0, -1.0, 0.5], [0.1, 0.2, -3.0]], np.float32), np.array([0, 2])


# --- The virtual teacher and its KL, by hand ---------------------------------------------


def test_virtual_teacher_by_hand():
    teacher = tf_kd.virtual_teacher(tf.constant([1, 3]), 4, 0.97).numpy()
    np.testing.assert_allclose(teacher, [[0.01, 0.97, 0.01, 0.01], [0.01, 0.01, 0.01, 0.97]])
    np.testing.assert_allclose(teacher.sum(-1), 1.0, rtol=1e-6)


def numpy_teacher_softened(labels, classes, a, temperature):
    p_d = np.full((len(labels), classes), (1 - a) / (classes - 1))
    p_d[np.arange(len(labels)), labels] = a
    return special.softmax(p_d / temperature, axis=-1)  # The code's softening: p^d as logits.


def test_paper_form_is_eq9_written_out_in_numpy():
    logits, labels = small_logits()
    q = numpy_teacher_softened(labels, 3, 0.9, 2.0)
    log_p = special.log_softmax(logits.astype(np.float64) / 2.0, axis=-1)  # The student at T.
    expected = (q * (np.log(q) - log_p)).sum(-1)
    got = tf_kd.teacher_free_kl(logits, labels, 2.0, 0.9, "paper").numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_code_form_is_the_authors_elementwise_mean_at_student_temperature_one():
    logits, labels = small_logits()
    q = numpy_teacher_softened(labels, 3, 0.99, 20.0)
    log_p = special.log_softmax(logits.astype(np.float64), axis=-1)  # The student at T = 1.
    # PyTorch's KLDivLoss() default: the mean over every element, batch and classes.
    elementwise_mean = (q * (np.log(q) - log_p)).mean()
    got = tf_kd.teacher_free_kl(logits, labels, 20.0, 0.99, "code").numpy()
    assert got.mean() == pytest.approx(elementwise_mean, rel=1e-5)
    # Times C (the authors' ResNet-18 multiplier 100 on 100 classes) it is the batch-mean KL.
    assert 3 * got.mean() == pytest.approx((q * (np.log(q) - log_p)).sum(-1).mean(), rel=1e-5)


def test_a_student_equal_to_the_softened_teacher_gives_zero():
    labels = np.array([0, 1, 2])
    teacher = tf_kd.virtual_teacher(labels, 3, 0.99).numpy()
    # The paper form compares both at T: logits p^d give exactly softmax(p^d / T).
    assert np.abs(tf_kd.teacher_free_kl(teacher, labels, 5.0, 0.99, "paper")).max() < 1e-6
    # The code form compares softmax(p^d / T) with softmax(z): logits p^d / T.
    code = tf_kd.teacher_free_kl(teacher / 5.0, labels, 5.0, 0.99, "code")
    assert np.abs(code).max() < 1e-6


# --- The training step -----------------------------------------------------------------------


def make(**given):
    spec = methods.get("tf_kd")
    values = options(**given)
    spec.check(values, context())
    return spec.make_model(mlp(), values, context())


def sgd_step(model, ds, lr=0.1):
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model.fit(ds, epochs=1, verbose=0, shuffle=False).history


def expected_step(objective, lr=0.1):
    reference = mlp()
    with tf.GradientTape() as tape:
        loss = objective(reference)
    grads = tape.gradient(loss, reference.trainable_weights)
    return [w.numpy() - lr * g.numpy() for w, g in zip(reference.trainable_weights, grads)], loss


def assert_weights(model, expected):
    for w, e in zip(model.backbone.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), e, rtol=1e-5, atol=1e-6)


def ce(y, logits):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


@pytest.mark.parametrize("form", ["paper", "code"])
def test_one_step_equals_the_objective_written_out(form):
    x, y = batch()
    alpha, temperature, a, multiplier = 0.3, 2.0, 0.9, (1.0 if form == "paper" else 50.0)

    def objective(net):
        logits = net(x)
        p_d = tf.one_hot(y, CLASSES) * a + (1 - tf.one_hot(y, CLASSES)) * (1 - a) / (CLASSES - 1)
        log_q = tf.nn.log_softmax(p_d / temperature)
        student_t = temperature if form == "paper" else 1.0
        log_p = tf.nn.log_softmax(logits / student_t)
        kl = tf.reduce_sum(tf.exp(log_q) * (log_q - log_p), -1)
        kl = tf.reduce_mean(kl) if form == "paper" else tf.reduce_mean(kl) / CLASSES
        return (1 - alpha) * ce(y, logits) + alpha * multiplier * kl

    expected, loss = expected_step(objective)
    model = make(tf_kd_alpha=alpha, tf_kd_temperature=temperature, tf_kd_correct_prob=a,
                 tf_kd_form=form, tf_kd_multiplier=multiplier)  # fmt: skip
    history = sgd_step(model, tf.data.Dataset.from_tensors((x, y)))
    assert_weights(model, expected)
    assert history["loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert set(history) == {"loss", "ce_loss", "tf_kd_loss"}
    assert history["loss"][0] == pytest.approx(
        (1 - alpha) * history["ce_loss"][0] + alpha * history["tf_kd_loss"][0], rel=1e-5
    )


def test_alpha_zero_is_plain_cross_entropy():
    x, y = batch()
    expected, _ = expected_step(lambda net: ce(y, net(x)))
    model = make(tf_kd_alpha=0.0)
    sgd_step(model, tf.data.Dataset.from_tensors((x, y)))
    assert_weights(model, expected)


def test_saved_model_reloads_as_the_same_classifier(tmp_path):
    x, y = batch()
    model = make()
    sgd_step(model, tf.data.Dataset.from_tensors((x, y)))
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    assert again.options == model.options
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.parametrize(
    "given,classes,message",
    [
        (dict(tf_kd_form="reg"), 3, "--tf_kd_form must be one of paper, code"),
        (dict(tf_kd_multiplier=100.0), 3, "the paper's eq. 9 has none"),
        ({}, 1, "at least 2 classes"),
    ],
)
def test_mistakes_raise_one_sentence(given, classes, message):
    with pytest.raises(UserError, match=message):
        tf_kd.check(options(**given), context(classes))


# --- Flagfiles and the command line ----------------------------------------------------------


def parse_flagfile(path):
    values = flags.FlagValues()
    holders = train.define_flags(values)
    cwd = os.getcwd()
    os.chdir(ROOT)  # Flagfiles include configs/base.flags relative to the root.
    try:
        values(["train", f"--flagfile={path}"])
    finally:
        os.chdir(cwd)
    return {name: holder.value for name, holder in holders.items()}


@pytest.mark.parametrize(
    "name,dataset,backbone,classes,form",
    [("cifar100-tf_kd", "cifar100", "preact_resnet18", 100, "code"),
     ("cub-tf_kd", "cub", "resnet18", 200, "paper")],
)  # fmt: skip
def test_flagfiles_parse_and_name_known_things(name, dataset, backbone, classes, form):
    path = ROOT / "configs" / "methods" / f"{name}.flags"
    values = parse_flagfile(path)
    named = (values["method"], values["dataset"], values["backbone"])
    assert named == ("tf_kd", dataset, backbone)
    assert values["tf_kd_form"] == form
    config, method = train._resolve(dict(values))  # pylint: disable=protected-access
    method.check(config, context(classes))
    header = path.read_text().splitlines()
    assert header[0].startswith("# ") and "Yuan et al." in header[0]
    assert header[-1] != "" and all(line.startswith(("#", "--")) for line in header)


@pytest.mark.slow
def test_trains_the_digits_demo_from_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "cskd_tf.train", "--method=tf_kd", "--epochs=3",
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["method"] == "tf_kd" and metrics["top1_error"] < 0.5  # Chance: 0.9.
    assert "--tf_kd_form=paper" in (tmp_path / "run" / "flags.txt").read_text()

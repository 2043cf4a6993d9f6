import keras
import numpy as np
import pytest

from cskd_tf import optim


def torch_sgd(params, grads_per_step, lrs, momentum, wd):
    """torch.optim.SGD(momentum, weight_decay), written out in numpy."""
    params = [p.astype(np.float64).copy() for p in params]
    bufs = [np.zeros_like(p) for p in params]
    for grads, lr in zip(grads_per_step, lrs):
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + wd * p
            bufs[i] = momentum * bufs[i] + d
            params[i] = p - lr * bufs[i]
    return params


def test_steps_match_pytorch_update_across_a_learning_rate_drop():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 2)).astype(np.float32)
    bias = rng.normal(size=(2,)).astype(np.float32)
    grads = [
        [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]
        for _ in range(4)
    ]
    # Two epochs of two steps; the rate drops after the first epoch.
    schedule = optim.step_schedule(0.1, epochs=2, steps_per_epoch=2, milestones=(0.5,))
    opt = optim.CoupledWeightDecaySGD(schedule, momentum=0.9, coupled_weight_decay=0.05)
    variables = [keras.Variable(kernel), keras.Variable(bias)]
    for g in grads:
        opt.apply_gradients(zip(g, variables))
    expected = torch_sgd([kernel, bias], grads, [0.1, 0.1, 0.01, 0.01], 0.9, 0.05)
    for v, e in zip(variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)


def test_decay_applies_to_every_parameter():
    # A zero gradient still shrinks kernel, bias and batch-norm parameters alike.
    w = keras.Variable(np.ones((2,), np.float32))
    opt = optim.CoupledWeightDecaySGD(0.5, momentum=0.0, coupled_weight_decay=0.1)
    opt.apply_gradients([(np.zeros((2,), np.float32), w)])
    np.testing.assert_allclose(w.numpy(), [1 - 0.5 * 0.1] * 2, rtol=1e-6)


def test_schedule_boundaries_follow_the_reference_epochs():
    steps = 10
    schedule = optim.step_schedule(0.1, epochs=200, steps_per_epoch=steps)
    assert optim.milestone_epochs(200) == [100, 150]
    assert float(schedule(100 * steps - 1)) == pytest.approx(0.1)
    assert float(schedule(100 * steps)) == pytest.approx(0.01)
    assert float(schedule(150 * steps - 1)) == pytest.approx(0.01)
    assert float(schedule(150 * steps)) == pytest.approx(0.001)


def test_rejects_decoupled_weight_decay_and_round_trips():
    with pytest.raises(ValueError, match="coupled_weight_decay"):
        optim.CoupledWeightDecaySGD(0.1, weight_decay=1e-4)
    opt = optim.CoupledWeightDecaySGD(0.1, momentum=0.8, coupled_weight_decay=3e-4)
    clone = optim.CoupledWeightDecaySGD.from_config(opt.get_config())
    assert (clone.momentum, clone.coupled_weight_decay) == (0.8, 3e-4)

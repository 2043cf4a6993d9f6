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
    # Four epochs of one step; the rate drops for the last epoch (the authors' timing, see
    # test_schedule_gives_every_epoch_the_authors_rate).
    schedule = optim.step_schedule(0.1, epochs=4, steps_per_epoch=1, milestones=(0.5,))
    opt = optim.CoupledWeightDecaySGD(schedule, momentum=0.9, coupled_weight_decay=0.05)
    variables = [keras.Variable(kernel), keras.Variable(bias)]
    for g in grads:
        opt.apply_gradients(zip(g, variables))
    expected = torch_sgd([kernel, bias], grads, [0.1, 0.1, 0.1, 0.01], 0.9, 0.05)
    for v, e in zip(variables, expected):
        np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-6)


def test_decay_applies_to_every_parameter():
    # A zero gradient still shrinks kernel, bias and batch-norm parameters alike.
    w = keras.Variable(np.ones((2,), np.float32))
    opt = optim.CoupledWeightDecaySGD(0.5, momentum=0.0, coupled_weight_decay=0.1)
    opt.apply_gradients([(np.zeros((2,), np.float32), w)])
    np.testing.assert_allclose(w.numpy(), [1 - 0.5 * 0.1] * 2, rtol=1e-6)


def authors_rates(epochs, lr=0.1):
    """The rate of each epoch in the authors' train.py: `adjust_learning_rate(optimizer,
    epoch)` runs after epoch `epoch` and sets the rate the next epoch trains with."""
    rates, current = [], lr
    for epoch in range(epochs):
        rates.append(current)
        current = lr / (10 if epoch >= 0.5 * epochs else 1) / (10 if epoch >= 0.75 * epochs else 1)
    return rates


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 7, 30, 90, 200])
def test_schedule_gives_every_epoch_the_authors_rate(epochs):
    steps = 3
    schedule = optim.step_schedule(0.1, epochs=epochs, steps_per_epoch=steps)
    # The optimizer asks the schedule with the number of steps already taken.
    got = [float(schedule(epoch * steps + s)) for epoch in range(epochs) for s in range(steps)]
    expected = [rate for rate in authors_rates(epochs) for _ in range(steps)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_schedule_boundaries_follow_the_reference_epochs():
    # 101 epochs at 0.1 (0..100), 50 at 0.01, 49 at 0.001: the authors' code lowers the rate
    # one epoch after the paper's "epochs 100 and 150".
    steps = 10
    schedule = optim.step_schedule(0.1, epochs=200, steps_per_epoch=steps)
    assert optim.milestone_epochs(200) == [101, 151]
    assert float(schedule(101 * steps - 1)) == pytest.approx(0.1)
    assert float(schedule(101 * steps)) == pytest.approx(0.01)
    assert float(schedule(151 * steps - 1)) == pytest.approx(0.01)
    assert float(schedule(151 * steps)) == pytest.approx(0.001)


def test_rejects_decoupled_weight_decay_and_round_trips():
    with pytest.raises(ValueError, match="coupled_weight_decay"):
        optim.CoupledWeightDecaySGD(0.1, weight_decay=1e-4)
    opt = optim.CoupledWeightDecaySGD(0.1, momentum=0.8, coupled_weight_decay=3e-4)
    clone = optim.CoupledWeightDecaySGD.from_config(opt.get_config())
    assert (clone.momentum, clone.coupled_weight_decay) == (0.8, 3e-4)

"""The README's code runs as written."""

import pathlib
import re

import keras
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_fit_snippet_runs_and_trains():
    text = README.read_text()
    section = text[text.index("## CS-KD in your own Keras code") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)  # pylint: disable=exec-used
    history = namespace["history"].history
    scores = ("top1_error", "top5_error", "nll", "ece", "aurc", "recall_at_1")
    assert set(history) == {"loss", "ce_loss", "cls_loss", "accuracy"} | {
        f"val_{s}" for s in scores
    }
    for values in history.values():
        assert len(values) == 2
    for total, ce, cls in zip(history["loss"], history["ce_loss"], history["cls_loss"]):
        assert abs(total - (ce + cls)) < 1e-4  # lambda_cls = 1
    assert isinstance(namespace["model"], keras.Model)


@pytest.mark.slow
def test_add_your_own_method_example_registers_and_trains(tmp_path):
    # The README's example module, written out as its own file (not into the package), then
    # imported in a fresh process (so the registry of this one stays as it is) and trained.
    import json  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    text = README.read_text()
    section = text[text.index("## Add your own method") :]
    module, line = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    assert line.strip() == "from cskd_tf.methods import cskd_js  # noqa: E402,F401"
    (tmp_path / "cskd_js.py").write_text(module)
    script = f"""
import json, numpy as np, tensorflow as tf
import cskd_js
from cskd_tf import methods, train, backbones
assert "cskd_js" in methods.names()
result = train.run(method="cskd_js", backbone="mlp", epochs=2, batch_size=64,
                   workdir={str(tmp_path / "run")!r}, verbose=0)
# The objective by hand on one batch: CE + lambda * T^2 * JS(p_T, q_T).
model = result["model"]
model.compile()
rng = np.random.default_rng(0)
x, x_pair = (rng.normal(size=(6, 8, 8, 1)).astype("float32") for _ in range(2))
y = rng.integers(0, 10, size=6)
out = model.compute_objective((x, x_pair), y, None)
def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True)); return e / e.sum(-1, keepdims=True)
logits, target = model(x, training=True).numpy(), model(x_pair, training=True).numpy()
p, q = softmax(logits / 4), softmax(target / 4)
m = (p + q) / 2
js = ((p * np.log(p / m)).sum(-1) + (q * np.log(q / m)).sum(-1)) / 2
ce = -np.log(softmax(logits)[np.arange(6), y])
print(json.dumps(dict(keys=sorted(result["history"]), js=float(out["parts"]["js_loss"]),
                      expected_js=float(16 * js.mean()), ce=float(out["parts"]["ce_loss"]),
                      expected_ce=float(ce.mean()), loss=float(out["loss"]))))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"ce_loss", "js_loss", "loss", "accuracy"} <= set(got["keys"])
    assert abs(got["js"] - got["expected_js"]) < 1e-4 * max(1.0, got["expected_js"])
    assert abs(got["ce"] - got["expected_ce"]) < 1e-4 * got["expected_ce"]
    assert abs(got["loss"] - (got["ce"] + got["js"])) < 1e-5


def test_methods_table_is_the_registrys():
    from cskd_tf import methods  # pylint: disable=g-import-not-at-top
    from cskd_tf.methods import __main__ as tool  # pylint: disable=g-import-not-at-top

    text = README.read_text()
    block = text[text.index(tool.BEGIN_MARKER) + len(tool.BEGIN_MARKER) : text.index(tool.END_MARKER)]
    assert block.strip() == methods.markdown_table().strip()
    assert all(f"`{name}`" in block for name in methods.names())

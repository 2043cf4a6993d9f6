"""The README's code runs as written."""

import pathlib
import re

import keras

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

"""The package: its declared dependencies, its console commands and its version."""

import ast
import importlib
import pathlib
import re
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Import names whose distribution is named otherwise.
DISTRIBUTIONS = {
    "absl": "absl-py",
    "sklearn": "scikit-learn",
    "tensorflow_datasets": "tensorflow-datasets",
    "tf2onnx": "tf2onnx",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "ai_edge_litert": "ai-edge-litert",
}


def _requirement_names(requirements):
    names = (re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in requirements)
    return {name.lower().replace("_", "-") for name in names}


def _imported_top_level_names():
    """Every module the package imports, at the top of a file or inside a function."""
    names = set()
    for path in (ROOT / "cskd_tf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"cskd_tf"}


def test_every_third_party_import_is_a_declared_dependency():
    # A `pip install .` must give every command what it imports: a missing entry here is a
    # command that fails on import after a plain install (matplotlib, scipy and tensorboard
    # once were). The converters are an extra (`pip install .[convert]`).
    required = _requirement_names(PROJECT["dependencies"])
    optional = _requirement_names(PROJECT["optional-dependencies"]["convert"])
    imported = _imported_top_level_names()
    assert {"tensorflow", "keras", "matplotlib", "scipy", "sklearn", "absl"} <= imported
    for name in sorted(imported):
        distribution = DISTRIBUTIONS.get(name, name).lower().replace("_", "-")
        assert distribution in required | optional, f"{name} ({distribution}) is not declared"
    for name in ("tf2onnx", "onnx", "onnxruntime", "ai_edge_litert"):  # Imported lazily.
        assert DISTRIBUTIONS[name] in optional


def test_tensorboard_is_declared_for_the_training_callback():
    # keras.callbacks.TensorBoard imports tensorboard only when it writes a summary.
    assert "tensorboard" in _requirement_names(PROJECT["dependencies"])


@pytest.mark.parametrize(
    "command", ["cskd-train", "cskd-evaluate", "cskd-export", "cskd-report", "cskd-sweep"]
)
def test_console_commands_point_at_callable_entry_points(command):
    module, function = PROJECT["scripts"][command].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_tools_are_thin_callers_of_the_commands():
    for tool, module in (("export", "export"), ("report", "report"), ("sweep", "sweep")):
        code = (ROOT / "tools" / f"{tool}.py").read_text()
        body = code[code.index('"""', 3) + 3 :].strip()
        assert body == f'from cskd_tf import {module}\n\nif __name__ == "__main__":\n    {module}.cli()'


def test_the_version_is_the_packages():
    import cskd_tf  # pylint: disable=g-import-not-at-top

    assert re.fullmatch(r"\d+\.\d+\.\d+", cskd_tf.__version__)
    assert PROJECT["dynamic"] == ["version"]

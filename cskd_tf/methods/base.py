"""What a training method is: the batches it needs, its flags, and how it builds its model.

A method registers one `Method` object under its `--method` name (`register`). The
training command looks it up by name (`get`) and composes data, model, callbacks and
`fit` from what the object declares; it never names a method itself. The registry also
gives `--help`, the error for an unknown name and the README's methods table, so they
cannot drift apart.

Method modules import TensorFlow inside their functions, not at the top: the training
command reads the registry to define its flags, and `--help` must answer without
waiting for TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from cskd_tf.errors import UserError

PARTNERS = (None, "class", "self")


# The largest softening temperature: up to it `cskd_tf.losses` computes the KL terms exactly in
# float32 (against float64, tests/test_losses.py); `losses.MAX_TEMPERATURE`, not imported here
# because it loads TensorFlow.
MAX_TEMPERATURE = 1000

_BOUNDS = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    f"<= {MAX_TEMPERATURE}": lambda v: v <= MAX_TEMPERATURE,
}
# Why a bound holds, where the bound alone does not say.
_REASONS = {
    f"<= {MAX_TEMPERATURE}": f"the distillation losses are checked to be exact in float32 up "
    f"to T = {MAX_TEMPERATURE} only (the paper's temperatures go from 0.1 to 20)",
}
# A temperature's bounds, checked in this order.
TEMPERATURE_BOUNDS = ("> 0", f"<= {MAX_TEMPERATURE}")


@dataclasses.dataclass(frozen=True)
class Flag:
    """A flag of the training command that methods read.

    Attributes:
      default: The value when the flag is not given (None: the method decides).
      help: str. One sentence for `--help`.
      kind: str. `float`, `integer` or `string`.
      bound: str, tuple of str or None. The values it takes, `"> 0"`, `">= 0"`, `"in [0,
        1]"` or `"<= 1000"`, or several of them (`TEMPERATURE_BOUNDS`); any other value
        given is refused with one sentence, whatever the method.
    """

    default: Any
    help: str
    kind: str = "float"
    bound: str | tuple | None = None

    def __post_init__(self):
        for bound in self.bounds():
            if bound not in _BOUNDS:
                raise ValueError(f"Flag.bound must be one of {list(_BOUNDS)}, got {bound!r}.")

    def bounds(self):
        """The flag's bounds, as a tuple."""
        if self.bound is None:
            return ()
        return (self.bound,) if isinstance(self.bound, str) else tuple(self.bound)

    def validate(self, name, value):
        """Raises UserError if `value` (not None) is outside one of the flag's bounds."""
        if value is None:
            return
        for bound in self.bounds():
            if not _BOUNDS[bound](value):
                why = f": {_REASONS[bound]}" if bound in _REASONS else ""
                raise UserError(f"--{name} must be {bound}, got {value}{why}.")


@dataclasses.dataclass(frozen=True)
class Batches:
    """What a method's training batches hold.

    Attributes:
      partner: None (single examples `(x, y)`), `"class"` (a same-class partner
        with its own augmentation, `((x, x_pair), y)`, CS-KD's pairs) or `"self"`
        (a second augmentation of the same image, `((x_a, x_b), y)`).
      clean: bool. Adds the anchor through the evaluation preprocessing,
        `((x, x_pair, x_clean), y)` (CS-KD-E).
      indices: bool. Single examples with their index in the training set,
        `((x, index), y)`, for state kept per training example (PS-KD).
      previous: bool. Each batch is the previous step's batch under a second
        augmentation followed by this step's, `((x, position, previous), y)`:
        `position` is a row's place in its own step's batch and `previous` marks
        the rows of the previous step, which come first (DLB; the first batch of a
        run has none).
    """

    partner: str | None = None
    clean: bool = False
    indices: bool = False
    previous: bool = False

    def __post_init__(self):
        if self.partner not in PARTNERS:
            raise ValueError(f"Batches.partner must be one of {PARTNERS}, got {self.partner!r}.")
        if self.clean and self.partner is None:
            raise ValueError("Batches.clean needs a partner.")
        if (self.indices or self.previous) and self.partner is not None:
            raise ValueError("Batches.indices and Batches.previous are for single examples.")
        if self.indices and self.previous:
            raise ValueError("Batches.indices and Batches.previous do not combine.")


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method sees of the run when it builds its model.

    Attributes:
      dataset: str. The data set's name.
      backbone: str. The backbone's registry name.
      num_classes: int. Number of classes.
      input_shape: tuple. (height, width, channels) of the network's input.
      train_size: int. Number of training examples.
      epochs: int. Epochs of the run.
      steps_per_epoch: int. Optimizer steps in one epoch.
      teacher: keras.Model or None. The fixed teacher (for `Method.teacher` methods).
    """

    dataset: str
    backbone: str
    num_classes: int
    input_shape: tuple
    train_size: int
    epochs: int
    steps_per_epoch: int
    teacher: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: its batches, its flags, and the model it trains.

    Attributes:
      name: str. The `--method` name.
      title: str. Its name in tables, e.g. "CS-KD".
      summary: str. What it trains, in one line (README and `--help`).
      reference: str. The paper (and section) it implements.
      batches: Batches. What its training batches hold.
      flags: Mapping[str, Flag]. The flags it reads (a flag several methods read is
        declared identically by each).
      defaults: Mapping[str, Any]. Values it gives the shared loss flags when they are
        not given (e.g. `label_smoothing` 0.1 for label smoothing).
      teacher: bool. Needs `--teacher`.
      soft_labels: bool. Its batches carry soft labels `[batch, classes]` (Mixup).
      build: Callable[[keras.Model, dict, Context], keras.Model]. Wraps a freshly
        built backbone in the model `fit` trains; `options` holds every flag's value.
      check: Callable[[dict, Context], None] or None. Raises `UserError` (one sentence)
        for options or a context it cannot train with; runs before anything is built.
      transform: Callable or None. `transform(dataset, options, context, first_batch)`
        maps the training batches (Mixup mixes them); `first_batch` is the global
        index of the dataset's first batch, for stateless randomness.
      callbacks: Callable or None. `callbacks(model, options, context)` returns Keras
        callbacks the method needs during `fit`.
      objective: Callable or None. For a method that is an objective rather than a model
        of its own: `objective(model, x, y, sample_weight)` returns what
        `cskd_tf.model.Classifier.compute_objective` returns (`loss`, `parts`, `logits`),
        and `build` may be left out: the model is then a `cskd_tf.model.ObjectiveModel`,
        which calls it (`model.options` holds the method's flags, `model.context` the
        run's `Context` as a dict).
      parts: tuple of str. The names of the loss parts `objective` returns (logged by fit).
      state: Callable or None. `state(model)` creates the variables the objective keeps
        from step to step (with `model.add_weight`); they are saved with the model and in
        the resume checkpoint.
      empty, reduce: Callable or None. `ObjectiveModel.empty_objective` and
        `reduce_objective` (see `cskd_tf.model.Classifier`), for objectives that return
        more than `loss`, `parts` and `logits`.
    """

    name: str
    title: str
    summary: str
    reference: str
    build: Callable | None = None
    batches: Batches = Batches()
    flags: Mapping[str, Flag] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    teacher: bool = False
    soft_labels: bool = False
    check: Callable | None = None
    transform: Callable | None = None
    callbacks: Callable | None = None
    objective: Callable | None = None
    parts: tuple = ()
    state: Callable | None = None
    empty: Callable | None = None
    reduce: Callable | None = None

    def __post_init__(self):
        if (self.build is None) == (self.objective is None):
            raise ValueError(f"Method '{self.name}' needs exactly one of build and objective.")

    def make_model(self, backbone, options, context):
        """The model `fit` trains: `build`'s, or an `ObjectiveModel` around `objective`."""
        if self.build is not None:
            return self.build(backbone, options, context)
        from cskd_tf.model import ObjectiveModel  # pylint: disable=g-import-not-at-top

        own = {name: options[name] for name in self.flags}
        plain = {k: v for k, v in dataclasses.asdict(context).items() if k != "teacher"}
        return ObjectiveModel(backbone, self.name, own, plain)


# The softening temperature, which several methods read.
TEMPERATURE = Flag(4.0, "the softening temperature T.", bound=TEMPERATURE_BOUNDS)

_REGISTRY: dict[str, Method] = {}
_FLAGS: dict[str, Flag] = {}
_READERS: dict[str, list[str]] = {}


def register(method: Method) -> Method:
    """Adds `method` to the registry under its name; returns it.

    Raises:
      ValueError: if the name is taken, or a flag it declares is declared otherwise by
        another method.
    """
    if method.name in _REGISTRY:
        raise ValueError(f"A method named '{method.name}' is already registered.")
    for name, flag in method.flags.items():
        if _FLAGS.setdefault(name, flag) != flag:
            raise ValueError(
                f"Method '{method.name}' declares --{name} as {flag}, but another method "
                f"declared it as {_FLAGS[name]}: share one declaration."
            )
        _READERS.setdefault(name, []).append(method.name)
    _REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    """The registered method names, in registration (the paper's table) order."""
    return list(_REGISTRY)


def get(name: str) -> Method:
    """The method registered as `name`.

    Raises:
      UserError: if there is none.
    """
    if name not in _REGISTRY:
        raise UserError(f"Unknown method '{name}'. Choose one of: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def flags() -> dict[str, Flag]:
    """Every method flag, once: `{name: Flag}`."""
    return dict(_FLAGS)


def readers(flag: str) -> list[str]:
    """The methods that read `flag`."""
    return list(_READERS.get(flag, ()))


def markdown_table() -> str:
    """The README's table of methods: name, what it trains, its flags and their defaults."""
    rows = ["| `--method` | what it trains | its flags (default) |", "|---|---|---|"]
    for method in _REGISTRY.values():
        own = ", ".join(f"`--{n}` ({_text(f.default)})" for n, f in method.flags.items())
        given = ", ".join(f"`--{n}` {_text(v)}" for n, v in method.defaults.items())
        rows.append(f"| `{method.name}` | {method.summary} | {', '.join(filter(None, [own, given]))} |")
    return "\n".join(rows) + "\n"


def _text(value):
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

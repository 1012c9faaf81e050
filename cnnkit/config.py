"""Recipe files: one YAML file holds the keyword arguments of one recipe call.

A recipe file starts with a header comment (what it reproduces, the command that runs it, the
trade-offs of its settings), then maps argument names to values. One key is reserved:
``recipe:`` names the function in :mod:`cnnkit.recipes` to call (default ``train``); files in
the packaged ``tuner/`` folder call a function in :mod:`cnnkit.tuner` instead (default
``search``). Keys are checked against that function's signature, values against its
annotations and notation against the grammar, before anything runs::

    # Reproduces: the Theano tutorial's LeNet (20C5-MP2-50C5-MP2-FC500, tanh) on MNIST.
    # Run: cnnkit run mnist_lenet
    recipe: train
    arch: lenet
    data: mnist
    optimizer: sgd
    epochs: 20

``key=value`` overrides (from the command line) are parsed as YAML, so ``epochs=3`` is an int,
``data=mnist-sample`` a string and ``model_options.activation=tanh`` sets a nested key. Files and
overrides are read as YAML 1.2, unlike PyYAML's YAML 1.1: numbers in exponent form without a dot
(``1e-3``) are floats, and only ``true`` and ``false`` are booleans: ``yes``, ``no``, ``on`` and
``off`` are text (class names ``[yes, no]``, ``augment=off``).

Reading and listing recipe files never imports TensorFlow; validating one imports the module
that holds its function.

Example:
    >>> from cnnkit import config
    >>> recipe = config.load_recipe("mnist_lenet", ["epochs=1", "data=mnist-sample"])  # doctest: +SKIP
    >>> recipe.function, recipe.kwargs["epochs"]  # doctest: +SKIP
    ('train', 1)
    >>> run = config.run_recipe(recipe)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import numbers
import os
import re
import shlex
from pathlib import Path

import yaml

RESERVED_KEY = "recipe"
"""The top-level key that names the function to call instead of being passed to it."""

# kind -> (installed package, folder in a source checkout, module holding the functions, default function)
_KINDS = {
    "recipes": ("cnnkit.recipe_files", "recipes", "cnnkit.recipes", "train"),
    "tuner": ("cnnkit.search_spaces", "tuner", "cnnkit.tuner", "search"),
}
_SUFFIXES = (".yaml", ".yml")


class ConfigError(ValueError):
    """A recipe file or an override is invalid (unknown key, missing argument, bad YAML, ...)."""


@dataclasses.dataclass
class Recipe:
    """One recipe call, loaded from a file and checked against the function's signature.

    Attributes:
        name: the recipe's name (the file name without ``.yaml``).
        function: the function's name in ``module`` (``"train"``, ``"finetune"``, ...).
        kwargs: the keyword arguments of the call, overrides applied.
        path: the file it came from (``None`` when built in code).
        module: the module that holds ``function`` (``"cnnkit.recipes"`` or ``"cnnkit.tuner"``).

    Example:
        >>> Recipe("tiny", "train", {"arch": "FC16", "data": "mnist-sample"}).qualname
        'cnnkit.recipes.train'
    """

    name: str
    function: str
    kwargs: dict
    path: Path | None = None
    module: str = "cnnkit.recipes"

    @property
    def qualname(self) -> str:
        """The dotted name of the function, e.g. ``cnnkit.recipes.train``."""
        return f"{self.module}.{self.function}"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2's booleans, numbers and unique keys: ``1e-3`` is a float, ``010`` is 10.

    YAML 1.1 (PyYAML's default) reads ``010`` as octal 8, ``1:00`` as base 60 (60), ``1_0.5`` as 10.5
    and ``yes``/``no``/``on``/``off`` as booleans; here integers are decimal, ``0x1F`` or ``0o17``,
    floats may be signed (``-.5``), booleans are ``true`` and ``false`` (also ``True``, ``TRUE``...),
    and the rest stay strings.
    """

    def flatten_mapping(self, node):
        """Refuse a key given twice in one mapping (YAML 1.2; PyYAML keeps the last silently).

        Checked here, once per node and before merging, as ``flatten_mapping`` then copies merged
        keys (``<<: *base``) in beside the explicit ones, which may override them. After merging only
        the last of a key is kept (the explicit one, which overrides), so a mapping merged elsewhere
        in turn carries its overrides: PyYAML 6.0.4 keeps the first copy there, 6.0.3 the last.
        """
        checked = self.__dict__.setdefault("_unique_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            first_line = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in first_line:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"duplicate key {key!r} (first on line {first_line[key] + 1})", key_node.start_mark)
                    first_line[key] = key_node.start_mark.line
        super().flatten_mapping(node)
        last = {(key.tag, key.value): index for index, (key, _) in enumerate(node.value) if isinstance(key, yaml.ScalarNode)}
        node.value = [(key, value) for index, (key, value) in enumerate(node.value)
                      if not isinstance(key, yaml.ScalarNode) or last[(key.tag, key.value)] == index]

    def construct_yaml_int(self, node):
        """An int from a decimal, ``0x`` (hexadecimal) or ``0o`` (octal) scalar."""
        text = self.construct_scalar(node)
        prefix = text.lstrip("+-")[:2].lower()
        try:
            return int(text, 16 if prefix == "0x" else 8 if prefix == "0o" else 10)
        except ValueError:  # an explicit !!int tag on something else
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


_REDEFINED = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
              "tag:yaml.org,2002:timestamp")  # no dates
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REDEFINED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+|0o[0-7]+)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+[eE][-+]?[0-9]+
        |[-+]?\.[0-9]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _yaml_document(text: str) -> tuple:
    """The value of a YAML document and its node tree, mappings merged as in the value (``None, None`` when empty)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return (None if node is None else loader.construct_document(node)), node
    finally:
        loader.dispose()


def packaged_dir(kind: str = "recipes") -> Path:
    """The folder of packaged YAML files: ``"recipes"`` (recipe files) or ``"tuner"`` (search spaces).

    An installed cnnkit ships them as the packages ``cnnkit.recipe_files`` and
    ``cnnkit.search_spaces``; in a source checkout they are the top-level ``recipes/`` and
    ``tuner/`` folders beside the ``cnnkit`` package.

    Args:
        kind: ``"recipes"`` or ``"tuner"``.

    Returns:
        The folder (it may not exist in a broken installation).

    Raises:
        ValueError: for another ``kind``.

    Example:
        >>> packaged_dir("recipes").name in ("recipes", "recipe_files")
        True
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}. Received: kind={kind!r}")
    package, folder, _, _ = _KINDS[kind]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    import cnnkit

    return Path(cnnkit.__file__).resolve().parents[1] / folder


def _files(kind: str) -> list[Path]:
    folder = packaged_dir(kind)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.suffix in _SUFFIXES and path.is_file())


def _header_line(path: Path) -> str:
    """The header's first field, lines joined, to its first sentence's end, without the ``#``.

    A field's continuation lines are the indented comment lines after it (``#             ...``).
    """
    parts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stripped = line.strip()
            if not stripped and not parts:
                continue
            if not stripped.startswith("#"):
                break
            text = stripped[1:]
            if parts and not text.startswith("  "):  # the next field, or a blank comment line
                break
            if text.strip():
                parts.append(text.strip())
    summary = " ".join(parts)
    end = re.search(r"\.\s+(?=[A-Z])", summary)  # a sentence's end, not "ch. 6"
    return summary[:end.start() + 1] if end else summary


def list_recipes(kind: str = "recipes") -> list[tuple[str, str]]:
    """The packaged recipe files, as ``(name, first sentence of the header)`` pairs sorted by name.

    Reads only the files' headers: no TensorFlow import, no validation.

    Args:
        kind: ``"recipes"`` (default) or ``"tuner"`` for the packaged search spaces.

    Example:
        >>> for name, description in list_recipes():  # doctest: +SKIP
        ...     print(f"{name:20} {description}")
        mnist_lenet          Reproduces: the Theano tutorial's LeNet (...) on MNIST ...
    """
    return [(path.stem, _header_line(path)) for path in _files(kind)]


def _kind_of(path: Path) -> str:
    """``"tuner"`` for a file in a packaged or checkout ``tuner/`` folder, else ``"recipes"``."""
    parent = path.resolve().parent
    try:
        if parent == packaged_dir("tuner").resolve():
            return "tuner"
    except OSError:
        pass
    return "tuner" if parent.name in ("tuner", "search_spaces") else "recipes"


def find_recipe(path_or_name, kind: str = "recipes") -> Path:
    """The file for a path or a packaged recipe name (``"mnist_lenet"`` -> ``.../mnist_lenet.yaml``).

    Args:
        path_or_name: a path to a YAML file, or the name of a packaged one (with or without
            ``.yaml``). A bare name that is a folder here (a run directory named after its
            recipe, ``run_dir=mnist_conv``) is the packaged recipe of that name.
        kind: where to look names up: ``"recipes"`` or ``"tuner"``.

    Raises:
        FileNotFoundError: a path (it has a folder part) that does not exist.
        ConfigError: a folder that is no packaged recipe's name; a name that is not packaged (the
            message lists close matches first, then every available name).

    Example:
        >>> find_recipe("mnist_lenet").name  # doctest: +SKIP
        'mnist_lenet.yaml'
    """
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    folder = f"{text} is a folder; expected a recipe file (.yaml) or a packaged recipe name"
    if path.is_dir() and len(path.parts) > 1:
        raise ConfigError(folder)
    name = path.name
    stem = name[: -len(path.suffix)] if path.suffix in _SUFFIXES else name
    what = "search space" if kind == "tuner" else "recipe"
    if len(path.parts) == 1:
        for suffix in _SUFFIXES:
            candidate = packaged_dir(kind) / (stem + suffix)
            if candidate.is_file():
                return candidate
        if path.is_dir():
            raise ConfigError(folder)
    else:
        raise FileNotFoundError(f"no such {what} file: {text}")
    available = [file.stem for file in _files(kind)]
    close = difflib.get_close_matches(stem, available, n=3, cutoff=0.5)
    if path.suffix in _SUFFIXES:
        message = f"no such {what} file: {text}, and no packaged {what} {stem!r}"
    else:
        message = f"unknown {what} {text!r}"
    if close:
        message += f"; did you mean {' or '.join(repr(c) for c in close)}?"
    rest = [name for name in available if name not in close]
    if available:
        message += f"{'' if close else '.'} Available: {', '.join(close + rest)}"
    else:
        message += f" (no packaged recipes found in {packaged_dir(kind)})"
    message += "; or give a path to a .yaml file."
    raise ConfigError(message)


def parse_override(text: str) -> tuple[list[str], object]:
    """Split one ``key=value`` override into a dotted key path and a YAML-parsed value.

    Args:
        text: e.g. ``"epochs=3"``, ``"data=mnist-sample"``, ``"model_options.activation=tanh"``.

    Returns:
        ``(keys, value)``, e.g. ``(["model_options", "activation"], "tanh")``.

    The value of a path key (``PATH_KEYS``: ``run_dir``, ``data.path``, ``backbone``...) is the text
    as typed unless quoted or null, so ``run_dir=2024-06-01`` is a folder, not a date; in a mapping
    (``data={path: 010, image_size: 28}``) a path key's plain number or boolean is its text, as in a file.

    Raises:
        ConfigError: no ``=``, an empty key or key part, a value that is not valid YAML, or one
            where `` #`` would start a YAML comment and drop the rest.

    Example:
        >>> parse_override("run_dir=runs/010")
        (['run_dir'], 'runs/010')
        >>> parse_override("epochs=3")
        (['epochs'], 3)
        >>> parse_override("model_options.activation=tanh")
        (['model_options', 'activation'], 'tanh')
        >>> parse_override("learning_rate=1e-3")
        (['learning_rate'], 0.001)
    """
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"an override must look like key=value (e.g. epochs=3). Received: {text!r}")
    key, _, raw = text.partition("=")
    keys = key.strip().split(".")
    if not all(part.strip() for part in keys):
        raise ConfigError(f"an override needs a key before '=' (e.g. epochs=3). Received: {text!r}")
    keys = [part.strip() for part in keys]
    typed = raw.strip()
    if tuple(keys) in PATH_KEYS and typed[:1] not in ("'", '"') and typed not in ("", "~", "null", "Null", "NULL"):
        return keys, typed  # a path as typed: 010, 2024-06-01 or runs/exp #2 stay text
    if re.search(r"(^|\s)#", raw) and typed[:1] not in ("'", '"'):
        raise ConfigError(f"override {text!r}: '#' after a space starts a YAML comment, which would drop the rest of "
                          f"the value; quote the value (e.g. {key.strip()}='\"{typed}\"')")
    try:
        value, node = _yaml_document(raw)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None
    _keep_path_text(value, node, tuple(keys))
    return keys, value


PATH_KEYS = {("run_dir",), ("directory",), ("backbone",), ("weights",), ("data", "path"), ("data", "test_path"),
             ("space", "backbone"), ("space", "weights")}


def apply_overrides(kwargs: dict, overrides=()) -> dict:
    """A copy of ``kwargs`` with ``key=value`` overrides applied (dotted keys set nested values).

    Args:
        kwargs: the mapping to start from (not modified).
        overrides: ``key=value`` strings, applied in order.

    Raises:
        ConfigError: a malformed override, or a dotted path through a value that is not a mapping.

    Example:
        >>> apply_overrides({"epochs": 10, "model_options": {"dropout": 0.5}},
        ...                 ["epochs=2", "model_options.activation=tanh"])
        {'epochs': 2, 'model_options': {'dropout': 0.5, 'activation': 'tanh'}}
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    result = _copy(kwargs)
    for text in overrides:
        keys, value = parse_override(text)
        target = result
        for depth, key in enumerate(keys[:-1]):
            child = target.get(key)
            if child is None:
                child = target[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {text!r}: {where} is {child!r}, not a mapping, so it has no key {keys[depth + 1]!r}")
            target = child
        target[keys[-1]] = value
    return result


def _expand_home(kwargs: dict) -> None:
    """Expand a leading ``~`` in the value of every path key (``PATH_KEYS``), in place."""
    for keys in PATH_KEYS:
        target = kwargs
        for key in keys[:-1]:
            target = target.get(key)
            if not isinstance(target, dict):
                break
        else:
            if isinstance(target.get(keys[-1]), str):
                target[keys[-1]] = os.path.expanduser(target[keys[-1]])


def _copy(value):
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _read_mapping(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file ({error.reason})") from None
    try:
        data, node = _yaml_document(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(part for part in (getattr(error, "context", None), getattr(error, "problem", None)) if part)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{line}: {problem or error}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of keyword arguments like 'epochs: 10'")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keyword arguments like 'epochs: 10'. "
            f"Received: a {type(data).__name__}"
        )
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise ConfigError(f"{path}: keys must be argument names (strings). Received: {bad[0]!r}")
    _keep_path_text(data, node)
    return data


def _keep_path_text(data, node, within: tuple = ()) -> None:
    """Give a path key (``PATH_KEYS``) its text where the YAML has a plain number or boolean, in place, as
    :func:`parse_override` does: ``run_dir: 010`` is the folder ``"010"``, not the int 10.

    ``data`` is the value of ``node``, found at the keys ``within`` (an override's ``data={path: 010}``).
    """
    for keys in PATH_KEYS:
        if len(keys) <= len(within) or keys[:len(within)] != within:
            continue
        parent, value, value_node = None, data, node
        for key in keys[len(within):]:
            if not isinstance(value, dict) or not isinstance(value_node, yaml.MappingNode):
                break
            parent, value = value, value.get(key)
            value_node = next((item for name, item in value_node.value
                               if isinstance(name, yaml.ScalarNode) and name.value == key), None)
        else:
            if isinstance(value, (int, float)) and isinstance(value_node, yaml.ScalarNode) and not value_node.style:
                parent[keys[-1]] = value_node.value


def resolve_function(module: str, name: str, *, source=None):
    """The public function ``name`` of ``module`` (``cnnkit.recipes`` / ``cnnkit.tuner``).

    Args:
        module: the module's dotted name.
        name: the function's name.
        source: the file that asked for it, for the error message.

    Raises:
        ConfigError: no such public function; the message lists the available ones (and points a
            search space's ``search`` in :mod:`cnnkit.recipes` to ``cnnkit tune``).

    Example:
        >>> resolve_function("cnnkit.recipes", "train")  # doctest: +SKIP
        <function train at 0x...>
    """
    prefix = f"{source}: " if source is not None else ""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{prefix}'{RESERVED_KEY}:' must name a function in {module}. Received: {name!r}")
    mod = importlib.import_module(module)
    public = getattr(mod, "__all__", None)
    if public is None:
        public = [key for key, value in vars(mod).items() if not key.startswith("_") and inspect.isfunction(value)]
    function = getattr(mod, name, None) if name in public else None
    if function is None or not callable(function):
        available = sorted(key for key in public if callable(getattr(mod, key, None)))
        close = difflib.get_close_matches(name, available, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        if (module, name) == (_KINDS["recipes"][2], _KINDS["tuner"][3]):  # a search space outside tuner/
            hint = f"; run a search-space file with: cnnkit tune {shlex.quote(str(source or 'FILE'))}."
        raise ConfigError(
            f"{prefix}{module} has no function {name!r}{hint} "
            f"Available: {', '.join(available) if available else '(none yet)'}"
        )
    return function


def validate_kwargs(function, kwargs: dict, *, source=None, qualname=None, override_keys=(), provided=()) -> None:
    """Check keyword arguments against ``function``'s signature, before anything runs.

    Checks, in order: every key is a parameter; no required argument is missing; each value
    fits its parameter's annotation (``epochs: int`` refuses ``"ten"``, ``learning_rate:
    float`` refuses ``[1]``; parameters without an annotation are not checked). For cnnkit's
    own functions also: ``arch`` is a registered name or valid notation (the message names the
    bad token) or a ``keras.Model``, and ``model_options`` holds build options; ``data`` is a known dataset
    name or a mapping of ``cnnkit.data.load`` (with ``name``) or ``cnnkit.data.from_folder`` arguments;
    ``backbone`` is a registered backbone or a path; a ``None`` where it is the default is not checked.
    Whether paths exist is checked by :func:`check_paths`.

    Args:
        function: the function to be called.
        kwargs: the keyword arguments.
        source: the file they came from, for error messages.
        qualname: the function's name for error messages (default ``function.__qualname__``).
        override_keys: top-level keys set by command-line overrides (the message says so).
        provided: parameters the caller passes itself (``transfer`` gives ``train`` its ``data``):
            they count as given and may not be in ``kwargs``.

    Raises:
        ConfigError: one line naming the key (and the bad value or token): an unknown key (with
            a close match and the valid keys), missing required arguments, a value of the
            wrong type, bad notation, an unknown dataset or backbone name.

    Example:
        >>> def train(arch, data, *, epochs: int = 10): ...
        >>> validate_kwargs(train, {"arch": "lenet", "data": "mnist", "epoch": 3})
        Traceback (most recent call last):
        ...
        cnnkit.config.ConfigError: unknown key 'epoch' for train (did you mean 'epochs'?); valid keys: arch, data, epochs
        >>> validate_kwargs(train, {"arch": "lenet", "data": "mnist", "epochs": "ten"})
        Traceback (most recent call last):
        ...
        cnnkit.config.ConfigError: epochs must be an integer. Received: epochs='ten'
    """
    prefix = f"{source}: " if source is not None else ""
    qualname = qualname or getattr(function, "__qualname__", repr(function))
    parameters = inspect.signature(function).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = [
        p.name for p in parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) and p.name not in provided
    ]
    for key in kwargs:
        if key in provided:
            raise ConfigError(f"{prefix}{key!r} cannot be set for {qualname}: its caller passes it")
    if not accepts_any:
        for key in kwargs:
            if key not in named:
                close = difflib.get_close_matches(key, named, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                origin = "override" if key in override_keys else "key"
                raise ConfigError(f"{prefix}unknown {origin} {key!r} for {qualname}{hint}; valid keys: {', '.join(named)}")
    missing = [
        p.name
        for p in parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and p.name not in kwargs
        and p.name not in provided
    ]
    if missing:
        names = ", ".join(repr(name) for name in missing)
        plural = "s" if len(missing) > 1 else ""
        raise ConfigError(f"{prefix}missing required argument{plural} {names} for {qualname}")
    for key, value in kwargs.items():
        if key in parameters:
            _check_type(key, value, parameters[key].annotation, prefix)
    if getattr(function, "__module__", "").startswith("cnnkit."):
        for key, check in _VALUE_CHECKS.items():
            if key in kwargs and key in parameters and not (kwargs[key] is None and parameters[key].default is None):
                check(kwargs[key], kwargs, source)


# annotation name -> (accepted types, words for the message); bool is refused where int or float is meant
_TYPES = {
    "int": ((numbers.Integral,), "an integer"),
    "float": ((numbers.Real,), "a number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "dict": ((dict,), "a mapping"),
    "list": ((list, tuple), "a list"),
    "tuple": ((list, tuple), "a list"),
    "None": ((type(None),), "null"),
}


def _check_type(key: str, value, annotation, prefix: str = "") -> None:
    """Refuse ``value`` when it fits none of the types of a simple annotation like ``int | None``."""
    if annotation is inspect.Parameter.empty:
        return
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [part.strip() for part in text.split("|")]
    if not all(name in _TYPES for name in names):  # an annotation this check does not read
        return
    for name in names:
        types, _ = _TYPES[name]
        if isinstance(value, types) and not (isinstance(value, bool) and name in ("int", "float")):
            return
    expected = " or ".join(_TYPES[name][1] for name in names)
    raise ConfigError(f"{prefix}{key} must be {expected}. Received: {key}={value!r}")


def _check_arch(arch, kwargs: dict, source) -> None:
    """A registered name or notation (naming the bad token), and known ``model_options`` with values the
    planner and builder take (``activation``, ``padding``, ``initializer``, ``l2``...); from Python also a
    ``keras.Model``."""
    prefix = f"{source}: " if source is not None else ""
    if not isinstance(arch, str):
        import keras

        if isinstance(arch, keras.Model):
            return
        raise ConfigError(f"{prefix}arch must be notation (e.g. 20C5-MP2-50C5-MP2-FC256) or a registered model "
                          f"name (see 'cnnkit models'). Received: arch={arch!r}")
    from cnnkit.models.registry import resolve_arch
    from cnnkit.planner import check_options

    options = kwargs.get("model_options")
    try:
        _, resolved = resolve_arch(arch, options if isinstance(options, dict) else {})
    except ValueError as error:  # SpecError is a ValueError
        raise ConfigError(f"{prefix}arch: {error}") from None
    try:
        check_options(resolved)
    except ValueError as error:
        raise ConfigError(f"{prefix}model_options.{error}") from None


def _check_data(data, kwargs: dict, source) -> None:
    """A known dataset name, or a mapping of ``cnnkit.data.load`` arguments with ``name`` or of
    ``cnnkit.data.from_folder`` arguments; other values are the recipe's to check."""
    import cnnkit.data
    from cnnkit.data.datasets import dataset_loader
    from cnnkit.data.folder import from_folder

    prefix = f"{source}: " if source is not None else ""
    if isinstance(data, str):
        known = cnnkit.data.list_datasets()
        if data.strip().lower().replace("_", "-") not in known:
            close = difflib.get_close_matches(data.lower(), known, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{prefix}data: unknown dataset {data!r}{hint}; known datasets: {', '.join(known)}, "
                              "or a folder as a mapping like {path: images/, image_size: [160, 160]}")
    elif isinstance(data, dict) and "name" in data:  # with "path" too, 'path' is named as the unknown key
        if not isinstance(data["name"], str):
            raise ConfigError(f"{prefix}data.name: a dataset name is text, one of "
                              f"{', '.join(cnnkit.data.list_datasets())}; received {data['name']!r}")
        options = {key: value for key, value in data.items() if key != "name"}
        _check_data(data["name"], kwargs, source)
        validate_kwargs(dataset_loader(data["name"]), options, source=source,
                        qualname=f"data (cnnkit.data.load({data['name']!r}))")
    elif isinstance(data, dict):
        validate_kwargs(from_folder, data, source=source, qualname="data (cnnkit.data.from_folder)")


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.endswith(".keras") or Path(text).exists()


def _check_backbone(backbone, kwargs: dict, source) -> None:
    """A registered ``keras.applications`` backbone, unless it names a ``.keras`` file or run directory."""
    if not isinstance(backbone, str) or _looks_like_path(backbone):
        return
    prefix = f"{source}: " if source is not None else ""
    from cnnkit.models.backbones import get_backbone

    try:
        get_backbone(backbone)
    except ValueError as error:
        raise ConfigError(f"{prefix}backbone (a registered name, a .keras file or a run directory): {error}") from None


_VALUE_CHECKS = {"arch": _check_arch, "data": _check_data, "backbone": _check_backbone}


def check_paths(kwargs: dict, *, source=None) -> None:
    """Check that the paths a recipe call reads exist: ``data.path``, ``data.test_path``, ``backbone``,
    ``weights`` (unless ``imagenet``) and a search space's ``space.backbone`` and ``space.weights``.

    Run by :func:`run_recipe` just before the call, so a missing folder fails before any data
    is loaded or run directory written; :func:`check_recipe_file` leaves it out, as packaged
    templates name folders of the user's.

    Raises:
        ConfigError: naming the key and the path; for a backbone, also the header of ``source`` (the
            packaged files say there how to make theirs).

    Example:
        >>> check_paths({"data": {"path": "/nope", "image_size": 28}})
        Traceback (most recent call last):
        ...
        cnnkit.config.ConfigError: data.path: no such folder '/nope'
    """
    prefix = f"{source}: " if source is not None else ""
    data = kwargs.get("data")
    if isinstance(data, dict):
        for key in ("path", "test_path"):
            if isinstance(data.get(key), (str, os.PathLike)) and not Path(data[key]).expanduser().is_dir():
                what = "is a file, not a folder of class subfolders:" if Path(data[key]).expanduser().exists() \
                    else "no such folder"
                raise ConfigError(f"{prefix}data.{key}: {what} {str(data[key])!r}")
    space = kwargs.get("space") if isinstance(kwargs.get("space"), dict) else {}
    for key, backbone in (("backbone", kwargs.get("backbone")), ("space.backbone", space.get("backbone"))):
        if isinstance(backbone, str) and _looks_like_path(backbone) and not Path(backbone).expanduser().exists():
            header = source is not None and Path(source).is_file() and _header_line(Path(source))
            hint = f" (see the header of {Path(source).name})" if header else ""
            raise ConfigError(f"{prefix}{key}: no .keras file or run directory at {backbone!r}{hint}")
    for key, weights in (("weights", kwargs.get("weights")), ("space.weights", space.get("weights"))):
        if isinstance(weights, (str, os.PathLike)) and weights != "imagenet" \
                and not Path(weights).expanduser().is_file():
            raise ConfigError(f"{prefix}{key}: no weights file at {str(weights)!r}; expected imagenet, "
                              "null (untrained) or a weights file")


def load_recipe(path_or_name, overrides=(), *, kind: str | None = None) -> Recipe:
    """Read a recipe file, apply overrides and check every key against the function's signature.

    A leading ``~`` in a path (``run_dir``, ``backbone``, ``data.path``, ... see ``PATH_KEYS``) is
    expanded to the home folder, from the file and from overrides. As in overrides, a path key's plain
    number or boolean in the file is its text: ``run_dir: 010`` is the folder ``"010"``, not the int 10.

    Args:
        path_or_name: a YAML file path, or the name of a packaged recipe (``"mnist_lenet"``).
        overrides: ``key=value`` strings; values are YAML (``epochs=3`` is an int), dotted keys
            set nested values (``model_options.activation=tanh``).
        kind: ``"recipes"`` (functions of :mod:`cnnkit.recipes`, default ``train``) or
            ``"tuner"`` (functions of :mod:`cnnkit.tuner`, default ``search``). ``None``: names
            are looked up among the recipes; a file in a ``tuner/`` folder is a search space.

    Returns:
        The checked :class:`Recipe`.

    Raises:
        ConfigError: unknown recipe name, bad YAML (naming file and line), a top level that is
            not a mapping, a malformed override, or a call :func:`validate_kwargs` refuses
            (unknown key, missing argument, wrong type, bad notation, unknown dataset).
        FileNotFoundError: a path that does not exist.

    Example:
        >>> recipe = load_recipe("recipes/mnist_lenet.yaml", ["epochs=3"])  # doctest: +SKIP
        >>> recipe.qualname, recipe.kwargs["epochs"]  # doctest: +SKIP
        ('cnnkit.recipes.train', 3)
    """
    path = find_recipe(path_or_name, kind or "recipes")
    kind = kind or _kind_of(path)
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}. Received: kind={kind!r}")
    _, _, module, default_function = _KINDS[kind]
    data = apply_overrides(_read_mapping(path), overrides)
    _expand_home(data)
    function_name = data.pop(RESERVED_KEY, default_function)
    override_keys = set()
    for text in [overrides] if isinstance(overrides, str) else overrides:
        override_keys.add(parse_override(text)[0][0])
    function = resolve_function(module, function_name, source=path)
    validate_kwargs(function, data, source=path, qualname=f"{module}.{function_name}", override_keys=override_keys)
    return Recipe(name=path.stem, function=function_name, kwargs=data, path=path, module=module)


def check_recipe_file(path) -> Recipe:
    """Validate one recipe or search-space file without running it.

    Files in a ``tuner/`` (or installed ``search_spaces``) folder are checked against
    :mod:`cnnkit.tuner`, others against :mod:`cnnkit.recipes`.

    Args:
        path: the YAML file.

    Returns:
        The :class:`Recipe` it describes.

    Raises:
        ConfigError: as :func:`load_recipe`.

    Example:
        >>> check_recipe_file("recipes/mnist_lenet.yaml").function  # doctest: +SKIP
        'train'
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such recipe file: {path}")
    return load_recipe(path, kind=_kind_of(path))


def run_recipe(recipe: Recipe):
    """Call the recipe's function with its keyword arguments and return what it returns.

    The arguments are checked again (:func:`validate_kwargs`), with the paths they name
    (:func:`check_paths`) and, for a recipe, the option values that need no data
    (``cnnkit.recipes.options.check_call``: optimizer, schedule, precision, augment, ...), before
    the call: a bad recipe fails, naming its file, before any data is loaded or run directory
    written. ``strategy: multi_worker`` is created (``cnnkit.distribute.get_strategy``) before the
    option check, which starts TensorFlow: TensorFlow takes it only before it runs anything. The
    function itself writes the resolved arguments, versions and seed into its run directory.

    Args:
        recipe: a :class:`Recipe` from :func:`load_recipe`.

    Returns:
        The function's result (a ``cnnkit.Run`` for :mod:`cnnkit.recipes` functions).

    Raises:
        ConfigError: as :func:`validate_kwargs` and :func:`check_paths`, or an option value refused.
        ValueError: ``strategy: multi_worker`` without a valid ``TF_CONFIG``.

    Example:
        >>> run = run_recipe(load_recipe("quickstart", ["epochs=1"]))  # doctest: +SKIP
        >>> run.metrics["test_accuracy"]  # doctest: +SKIP
        0.95
    """
    function = resolve_function(recipe.module, recipe.function, source=recipe.path)
    validate_kwargs(function, recipe.kwargs, source=recipe.path, qualname=recipe.qualname)
    check_paths(recipe.kwargs, source=recipe.path)
    if recipe.module == "cnnkit.recipes":
        from cnnkit.recipes.options import check_call

        if recipe.kwargs.get("strategy") == "multi_worker":  # before TensorFlow runs anything (check_call does)
            from cnnkit.distribute import get_strategy

            get_strategy("multi_worker")
        try:
            check_call(function, recipe.kwargs)
        except ValueError as error:
            raise ConfigError(f"{recipe.path}: {error}" if recipe.path else str(error)) from None
    kwargs = dict(recipe.kwargs)
    args = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY and parameter.name in kwargs:
            args.append(kwargs.pop(parameter.name))
        elif parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            break
    return function(*args, **kwargs)


__all__ = [
    "ConfigError",
    "Recipe",
    "apply_overrides",
    "check_paths",
    "check_recipe_file",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "packaged_dir",
    "parse_override",
    "resolve_function",
    "run_recipe",
    "validate_kwargs",
]

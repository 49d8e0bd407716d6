"""Loading a CLI target: ``package.module:factory`` or ``path/to/file.py:factory``.

The factory is called with no arguments and returns either ``(fn, example_args)``
or an object with ``.fn`` and ``.args`` (and optionally ``.batch_argnums``), such as
``examples.models.Workload``. Every problem a user can cause raises
:class:`TargetError` with a one-line message; ``__cause__`` keeps the original
exception (the CLI re-raises it under ``--debug``).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable

_FORM = "expected MODULE:FACTORY (e.g. examples.models:mlp) or FILE.py:FACTORY"


class TargetError(ValueError):
    """A target that cannot be loaded; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    spec: str
    fn: Callable
    args: tuple
    batch_argnums: Any  # None (parallelize's default) or a tuple of ints


def _describe(err: BaseException) -> str:
    if isinstance(err, SystemExit):   # sys.exit(7) in the user's code
        return f"SystemExit: sys.exit({err.code!r}) was called"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def _import_file(path: str):
    if not os.path.isfile(path):
        raise TargetError(f"no such file: {path!r}")
    path = os.path.abspath(path)
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    name = f"_autoshard_target_{os.path.splitext(os.path.basename(path))[0]}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(path)
    if folder not in sys.path:  # sibling imports work as when running the file
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as err:
        sys.modules.pop(name, None)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise TargetError(f"importing {path!r} failed: {_describe(err)}") from err
    return module


def _import_module(name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if name == missing or name.startswith(missing + "."):
            raise TargetError(f"cannot import module {name!r}: no module named {missing!r} "
                              f"(is it on PYTHONPATH?)") from err
        raise TargetError(f"importing {name!r} failed: {_describe(err)}") from err
    except (Exception, SystemExit) as err:
        raise TargetError(f"importing {name!r} failed: {_describe(err)}") from err


def _lookup(module, module_label: str, attr: str):
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TargetError(f"{module_label} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj


def load_target(spec: str) -> Target:
    """Import the factory named by ``spec``, call it, and check what it returned."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise TargetError(f"bad target {spec!r}: {_FORM}")
    if _is_file(module_part):
        module = _import_file(module_part)
        label = f"file {module_part!r}"
    else:
        module = _import_module(module_part)
        label = f"module {module_part!r}"
    factory = _lookup(module, label, attr)
    if not callable(factory):
        raise TargetError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    try:
        inspect.signature(factory).bind()
    except TypeError as err:
        raise TargetError(f"factory {spec} cannot be called without arguments ({err}); "
                          f"the factory must take no required arguments") from err
    except ValueError:  # no signature (some builtins): just call it
        pass
    try:
        result = factory()
    except (Exception, SystemExit) as err:
        raise TargetError(f"factory {spec} raised {_describe(err)}") from err
    return _unpack(spec, result)


def _unpack(spec: str, result) -> Target:
    batch_argnums = None
    if hasattr(result, "fn") and hasattr(result, "args"):
        fn, args = result.fn, result.args
        batch_argnums = getattr(result, "batch_argnums", None)
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        fn, args = result
    else:
        raise TargetError(f"factory {spec} returned {_kind(result)}; expected (fn, example_args) "
                          f"or an object with .fn and .args")
    if not callable(fn):
        raise TargetError(f"factory {spec} returned {_kind(fn)} as the function, "
                          f"which is not callable; expected (fn, example_args)")
    if not isinstance(args, (tuple, list)):
        raise TargetError(f"factory {spec} returned example args as {_kind(args)}; expected a "
                          f"tuple of positional arguments (arrays or jax.ShapeDtypeStruct)")
    if batch_argnums is not None:
        if isinstance(batch_argnums, int):
            batch_argnums = (batch_argnums,)
        try:
            batch_argnums = tuple(int(b) for b in batch_argnums)
        except (TypeError, ValueError):
            raise TargetError(f"factory {spec} returned batch_argnums={batch_argnums!r}; "
                              f"expected a tuple of ints") from None
    return Target(spec, fn, tuple(args), batch_argnums)


def _kind(value) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:39] + "…"
    return f"{type(value).__name__} {text}"

"""Which arguments of a call are static, donated or batch, read as ``jax.jit`` reads them.

:func:`argument_roles` checks ``static_argnums`` / ``static_argnames``,
``donate_argnums`` / ``donate_argnames`` and ``batch_argnums`` against the function's
signature once, at decoration (numbers out of range, names the function does not take,
an argument both static and donated: ``ValueError``), fills in names from numbers and
numbers from names, and turns negative numbers into positions. :func:`bind_call` then
lays out one call: positional arguments first, then keyword arguments sorted by name
(jax.jit's order), as one flat tuple of arguments with the positions of the static,
donated and batch ones among them, and a function that takes them all positionally.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
from collections.abc import Callable, Iterable, Sequence

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclasses.dataclass(frozen=True)
class ArgumentRoles:
    """The checked roles of a function's arguments (see the module docstring).

    ``num_positional``: how many positional parameters the function declares, ``None``
    when it takes ``*args`` (or has no signature): numbers are then checked per call.
    ``positional_names``: the names of the positional-or-keyword parameters by position
    (``None`` for positional-only ones). ``batch_argnums`` is ``None`` when not given.
    """

    name: str
    static_argnums: tuple[int, ...] = ()
    static_argnames: tuple[str, ...] = ()
    donate_argnums: tuple[int, ...] = ()
    donate_argnames: tuple[str, ...] = ()
    batch_argnums: tuple[int, ...] | None = None
    num_positional: int | None = None
    positional_names: tuple[str | None, ...] = ()
    signature: inspect.Signature | None = dataclasses.field(default=None, compare=False,
                                                            repr=False)

    def position_of(self, keyword: str) -> int | None:
        """The position of the positional parameter called ``keyword``, if there is one."""
        try:
            return self.positional_names.index(keyword)
        except ValueError:
            return None


@dataclasses.dataclass(frozen=True)
class BoundCall:
    """One call laid out for tracing: ``args`` (positional, then keyword values in name
    order), ``keywords`` (those names), and among ``args`` the positions of the static,
    donated and batch arguments (``batch`` ``None``: parallelize's default). ``fun``
    takes all of ``args`` positionally."""

    fun: Callable
    args: tuple
    keywords: tuple[str, ...]
    static: tuple[int, ...]
    donate: tuple[int, ...]
    batch: tuple[int, ...] | None

    @property
    def num_positional(self) -> int:
        return len(self.args) - len(self.keywords)


def _index_tuple(value, what: str) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as a tuple, ``TypeError`` otherwise."""
    if value is None:
        return ()
    try:
        return (operator.index(value),)
    except TypeError:
        pass
    try:
        items = tuple(value)
        if any(isinstance(i, bool) for i in items):
            raise TypeError
        return tuple(operator.index(i) for i in items)
    except TypeError:
        raise TypeError(f"parallelize: {what} must be an int or a sequence of ints, got "
                        f"{value!r}") from None


def _name_tuple(value, what: str) -> tuple[str, ...]:
    """``value`` (a str or a sequence of str) as a tuple, ``TypeError`` otherwise."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        items = (value,)
    if not all(isinstance(n, str) for n in items):
        raise TypeError(f"parallelize: {what} must be a str or a sequence of str, got "
                        f"{value!r}")
    return items


def _signature(fun) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):   # some builtins have none: checked per call instead
        return None


def _check_numbers(nums: tuple[int, ...], what: str, roles: ArgumentRoles) -> tuple[int, ...]:
    """``nums`` with negative numbers made positions; ``ValueError`` for numbers outside
    the function's positional parameters (unless it takes ``*args``)."""
    n = roles.num_positional
    if n is None:
        return nums
    bad = [i for i in nums if not -n <= i < n]
    if bad:
        params = ", ".join(p or "_" for p in roles.positional_names)
        raise ValueError(
            f"parallelize: {what}={nums} but {roles.name}({params}) accepts only {n} "
            f"positional argument{'s' if n != 1 else ''}: argument numbers must lie in "
            f"[{-n}, {n}) (as for jax.jit); fix or drop {bad}")
    return tuple(sorted({i % n for i in nums}))


def _check_names(names: tuple[str, ...], what: str, sig, roles: ArgumentRoles) -> None:
    """``ValueError`` for names the function does not take by keyword."""
    if sig is None or not names:
        return
    params = sig.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    bad = [n for n in names if n not in params and not takes_any
           or n in params and params[n].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                 inspect.Parameter.VAR_POSITIONAL)]
    if bad:
        raise ValueError(
            f"parallelize: {what}={names} names {bad}, which {roles.name} does not take as "
            f"keyword arguments (its parameters: {', '.join(params) or 'none'}); use "
            f"the {what.replace('names', 'nums')} of positional-only parameters instead")


def _infer(nums: tuple[int, ...], names: tuple[str, ...], nums_given: bool, names_given: bool,
           roles: ArgumentRoles) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Names from numbers or numbers from names, as jax.jit infers them (only the one not
    given; both given are taken as they are)."""
    if nums_given and not names_given:
        names = tuple(p for i, p in enumerate(roles.positional_names) if p is not None and
                      (i in nums or i - len(roles.positional_names) in nums))
    elif names_given and not nums_given:
        nums = tuple(i for i, p in enumerate(roles.positional_names) if p in names)
    return nums, names


def argument_roles(fun: Callable, *, static_argnums=None, static_argnames=None,
                   donate_argnums=None, donate_argnames=None, batch_argnums=None
                   ) -> ArgumentRoles:
    """Check and complete the argument numbers and names given to ``parallelize``."""
    name = getattr(fun, "__name__", None) or type(fun).__name__
    sig = _signature(fun)
    roles = ArgumentRoles(name=name)
    if sig is not None:
        params = list(sig.parameters.values())
        varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
        positional = [p for p in params if p.kind in _POSITIONAL]
        roles = dataclasses.replace(
            roles, signature=sig, num_positional=None if varargs else len(positional),
            positional_names=tuple(p.name if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                                   else None for p in positional))
    static = _index_tuple(static_argnums, "static_argnums")
    donate = _index_tuple(donate_argnums, "donate_argnums")
    batch = None if batch_argnums is None else _index_tuple(batch_argnums, "batch_argnums")
    static_names = _name_tuple(static_argnames, "static_argnames")
    donate_names = _name_tuple(donate_argnames, "donate_argnames")
    static = _check_numbers(static, "static_argnums", roles)
    donate = _check_numbers(donate, "donate_argnums", roles)
    if batch is not None:
        batch = _check_numbers(batch, "batch_argnums", roles)
    _check_names(static_names, "static_argnames", sig, roles)
    _check_names(donate_names, "donate_argnames", sig, roles)
    static, static_names = _infer(static, static_names, static_argnums is not None,
                                  static_argnames is not None, roles)
    donate, donate_names = _infer(donate, donate_names, donate_argnums is not None,
                                  donate_argnames is not None, roles)
    for what, nums, names in (("donated", donate, donate_names),
                              ("batch arguments", batch or (), ())):
        both = sorted(set(static) & set(nums)) + sorted(set(static_names) & set(names))
        if both:
            raise ValueError(f"parallelize: arguments {both} are both static and {what}; "
                             f"a static argument is not an array, so it can be neither")
    return dataclasses.replace(roles, static_argnums=static, static_argnames=static_names,
                               donate_argnums=donate, donate_argnames=donate_names,
                               batch_argnums=batch)


def _positions(nums: Iterable[int], num_args: int, what: str, roles: ArgumentRoles) -> set[int]:
    """The numbers of ``nums`` that name arguments of a call with ``num_args`` positional
    arguments (negative ones counted from the end for ``*args`` functions). A number past
    them names a parameter left to its default or passed by keyword, unless the function
    takes ``*args``: then it is an error, as jax.jit would index past the call."""
    out = set()
    for i in nums:
        if roles.num_positional is None:
            if not -num_args <= i < num_args:
                raise ValueError(
                    f"parallelize: {what} names argument {i} but {roles.name} was called "
                    f"with {num_args} positional argument{'s' if num_args != 1 else ''}")
            out.add(i % num_args)
        elif i < num_args:
            out.add(i)
    return out


def bind_call(fun: Callable, roles: ArgumentRoles, args: tuple, kwargs: dict) -> BoundCall:
    """Lay out one call ``fun(*args, **kwargs)`` (see :class:`BoundCall`)."""
    sig = roles.signature
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{roles.name}() called with arguments that do not fit its "
                            f"signature {roles.name}{sig}: {err}") from None
    n = len(args)
    keywords = tuple(sorted(kwargs))
    static = _positions(roles.static_argnums, n, "static_argnums", roles)
    donate = _positions(roles.donate_argnums, n, "donate_argnums", roles)
    batch = None if roles.batch_argnums is None else \
        _positions(roles.batch_argnums, n, "batch_argnums", roles)
    for j, key in enumerate(keywords):
        position = roles.position_of(key)
        if key in roles.static_argnames:
            static.add(n + j)
        if key in roles.donate_argnames:
            donate.add(n + j)
        if batch is not None and position is not None and position in roles.batch_argnums:
            batch.add(n + j)
    flat = tuple(args) + tuple(kwargs[k] for k in keywords)
    return BoundCall(_positional(fun, n, keywords), flat, keywords, tuple(sorted(static)),
                     tuple(sorted(donate)), None if batch is None else tuple(sorted(batch)))


def dynamic_arguments(args: Sequence, static: Iterable[int]) -> list:
    """The arguments of ``args`` not at a ``static`` position, in order."""
    static = frozenset(static)
    return [a for i, a in enumerate(args) if i not in static]


def _positional(fun: Callable, num_positional: int, keywords: tuple[str, ...]) -> Callable:
    """``fun`` taking its keyword arguments (``keywords``, in that order) positionally
    after the first ``num_positional`` arguments."""
    if not keywords:
        return fun

    @functools.wraps(fun)
    def call(*flat):
        return fun(*flat[:num_positional], **dict(zip(keywords, flat[num_positional:])))

    return call

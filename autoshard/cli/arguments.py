"""Reading the command line's arguments and files; every problem is a :class:`CliError`
with a one-line message."""
from __future__ import annotations

import os
import re
import tempfile

from autoshard.cost_model import (
    CLUSTER_PRESETS,
    Cluster,
    cluster_preset,
    parse_bytes,
    write_text_atomically,
)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())



def parse_mesh(text: str) -> tuple[int, ...]:
    """``"2x4"`` → ``(2, 4)``; ``CliError`` for anything but positive sizes joined by x."""
    if not re.fullmatch(r"\s*\d+(\s*[x×]\s*\d+)*\s*", text or ""):
        raise CliError(f"bad --mesh {text!r}: expected mesh axis sizes joined by 'x', "
                       f"e.g. 8, 2x4 or 2x2x2")
    shape = tuple(int(n) for n in re.split(r"[x×]", text.replace(" ", "")))
    if any(n < 1 for n in shape):
        raise CliError(f"bad --mesh {text!r}: every axis size must be at least 1")
    return shape


def default_axis_names(rank: int) -> tuple[str, ...]:
    if rank == 1:
        return ("data",)
    if rank == 2:
        return ("data", "model")
    return tuple(f"a{i}" for i in range(rank))


def parse_axis_names(text: str | None, rank: int) -> tuple[str, ...]:
    if text is None:
        return default_axis_names(rank)
    names = tuple(n.strip() for n in text.split(","))
    if len(names) != rank:
        raise CliError(f"bad --axis-names {text!r}: the mesh has {rank} axes, so give "
                       f"{rank} comma-separated names")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in names):
        raise CliError(f"bad --axis-names {text!r}: names must be identifiers like data,model")
    if len(set(names)) != len(names):
        raise CliError(f"bad --axis-names {text!r}: names must be distinct")
    return names


def load_cluster(value: str | None):
    """A preset name or the path of a JSON file written by ``Cluster.to_json()``."""
    if value is None:
        return None
    if value in CLUSTER_PRESETS:
        return cluster_preset(value)
    if not (value.endswith(".json") or os.path.sep in value or os.path.exists(value)):
        raise CliError(f"unknown cluster {value!r}: give a preset ({', '.join(CLUSTER_PRESETS)}) "
                       f"or the path of a JSON file written by Cluster.to_json()")
    text = read_text(value, "cluster file")
    try:
        return Cluster.from_json(text)
    except ValueError as err:
        raise CliError(f"bad cluster file {value!r}: {one_line(err)}") from err


def parse_budget(value: str | None):
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as err:
        raise CliError(f"bad --memory-budget {value!r}: {one_line(err)}") from err


def read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
        raise CliError(f"cannot read {what} {path!r}: {reason}") from err


def load_plan(path: str):
    from autoshard.plan.record import Plan  # jax: only when a plan is read
    text = read_text(path, "plan file")
    try:
        return Plan.from_json(text)
    except ValueError as err:
        raise CliError(f"{path!r} is not a valid plan file: {one_line(err)}") from err


def check_writable(path: str, what: str) -> None:
    """``CliError`` now, before minutes of work, when ``path`` cannot be written: a folder
    that does not exist, a directory in its place, or a folder this user cannot write."""
    if os.path.isdir(path):
        raise CliError(f"cannot write {what} {path!r}: it is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {what} {path!r}: the folder {folder!r} does not exist "
                       f"(create it first)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".autoshard-write-check.", dir=folder)
    except OSError as err:
        raise CliError(f"cannot write {what} {path!r}: {err.strerror or one_line(err)}") from err
    os.close(fd)
    os.unlink(probe)


def write_text(path: str, text: str, what: str) -> None:
    """Write ``text`` to ``path`` whole (see ``cost_model.write_text_atomically``)."""
    try:
        write_text_atomically(path, text + "\n")
    except OSError as err:
        raise CliError(f"cannot write {what} {path!r}: {err.strerror or one_line(err)}") from err

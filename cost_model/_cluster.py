"""Cluster description: per-device compute and memory, and the links between devices."""

from __future__ import annotations

import dataclasses
import json
import numbers
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

from ._files import write_text_atomically

COLLECTIVES: tuple[str, ...] = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
#: the ``Cluster`` fields that say how the backend lowers collectives and which ops it
#: expands into several (booleans, written to JSON only when set)
_BACKEND_FLAGS = ("reduce_scatter_as_all_reduce", "all_to_all_as_slices",
                  "all_reduce_per_operand", "threefry_in_loops", "select_and_scatter_expanded",
                  "batch_groups_dense", "low_precision_dots_in_f32")


@dataclasses.dataclass(frozen=True)
class Link:
    """A point-to-point link as seen by one device.

    ``bandwidth``: bytes/s per device in one direction. ``latency``: seconds per message.
    """

    bandwidth: float
    latency: float

    def __post_init__(self) -> None:
        _check_positive("Link.bandwidth", self.bandwidth)
        _check_non_negative("Link.latency", self.latency)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Devices and interconnect that plans are priced for.

    ``flops``: peak dense FLOP/s per device by dtype name; must include "float32".
    ``memory_bandwidth``: device memory bytes/s. ``device_memory``: bytes per device,
    of which ``memory_reserve`` bytes are kept free. ``devices_per_node`` devices share
    ``intra_node`` links; traffic between nodes uses ``inter_node``. ``axis_links``,
    when set (by calibration) and as long as the mesh rank, gives each mesh axis its
    measured link and overrides the node topology. ``collective_links`` refines that
    per collective: ``(("all-reduce", (link per axis, …)), …)`` for the kinds in
    ``COLLECTIVES``, each α–β fitted to that collective's formula in
    :class:`MeshCostModel` (set by calibration, one link per axis of the calibrated
    mesh); a single link, in a cluster without ``axis_links``, is that collective's link
    on every axis of any mesh (a preset's figure for one collective). Kinds or mesh ranks
    it lacks fall back to ``axis_links`` and the node topology.
    ``reduce_scatter_as_all_reduce``: the backend's SPMD partitioner leaves a planned
    reduce-scatter as an all-reduce of the whole buffer followed by a local slice (XLA's
    CPU pipeline has no reduce-scatter creation pass), so a reduce-scatter is priced as
    that all-reduce. ``all_to_all_as_slices``: the backend splits an all-to-all's operand
    into one slice per peer before sending them (XLA's ``AllToAllDecomposer`` into a tuple
    all-to-all, run by the CPU pipeline), each slice a kernel that XLA's cost analysis
    counts as reading the whole operand; a resharding all-to-all over n devices then
    reads its shard n − 1 more times. ``all_reduce_per_operand``: the backend runs an
    all-reduce of several arrays (XLA's combiner merges independent all-reduces into one)
    as one all-reduce per array, each paying its full latency, so merging saves nothing.
    ``threefry_in_loops``: the backend computes threefry random bits in a loop over two
    uint32 arrays of the output's size (jax's CPU lowering rolls the rounds): twelve times
    the bits' bytes, and two more for each fusion that reads the two arrays.
    ``select_and_scatter_expanded``: the backend runs max-pool's gradient as an argmax over
    each window (a reduce-window over the operand and an iota per dim) and a scatter of
    the source, about 30 times the operand's bytes where one kernel moves three.
    ``batch_groups_dense``: the backend runs a convolution of ``batch_group_count`` B (a
    depthwise convolution's filter gradient) as a dense one over all B x B group pairs,
    masked: B times the flops, and the dense result written and read four times.
    ``low_precision_dots_in_f32``: the backend runs a dot of bfloat16 or float16 result (or
    of such an operand beside a float32 one) in float32: each such operand converted (read,
    written at twice its bytes) and read as float32, the float32 result written and read
    back (by the fusion that reads it, or by a conversion to the result's type): five times
    the bytes of one kernel.
    ``kernel_seconds``: measured seconds per device of single kernels (a convolution at
    one per-device shape, all devices busy), keyed by :func:`kernel_key` (set by
    ``autoshard.calibrate_kernels``). A strategy whose kernel has an entry is priced at
    that time instead of the roofline: backends run some shapes far below peak (XLA:CPU
    runs a 3×3 convolution with 16 output channels at a quarter of the rate it runs one
    with 32).

    ``flops``, ``collective_links`` and ``kernel_seconds`` may be given as mappings and
    ``axis_links`` as any sequence; all are stored as tuples so the cluster is hashable.
    """

    name: str
    flops: tuple[tuple[str, float], ...]
    memory_bandwidth: float
    device_memory: int
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    memory_reserve: int = 0
    axis_links: tuple[Link, ...] | None = None
    collective_links: tuple[tuple[str, tuple[Link, ...]], ...] | None = None
    reduce_scatter_as_all_reduce: bool = False
    all_to_all_as_slices: bool = False
    all_reduce_per_operand: bool = False
    threefry_in_loops: bool = False
    select_and_scatter_expanded: bool = False
    batch_groups_dense: bool = False
    low_precision_dots_in_f32: bool = False
    kernel_seconds: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Cluster.name must be a non-empty string, got {_show(self.name)}")
        flops = self.flops.items() if isinstance(self.flops, Mapping) else self.flops
        flops = tuple((str(dtype), float(rate)) for dtype, rate in flops)
        for dtype, rate in flops:
            _check_positive(f"Cluster.flops[{dtype!r}]", rate)
        if "float32" not in dict(flops):
            raise ValueError(
                f"Cluster.flops must include a 'float32' rate (the fallback for other dtypes), "
                f"got dtypes {[d for d, _ in flops]}"
            )
        object.__setattr__(self, "flops", flops)
        _check_positive("Cluster.memory_bandwidth", self.memory_bandwidth)
        _check_int("Cluster.device_memory", self.device_memory, minimum=1)
        _check_int("Cluster.devices_per_node", self.devices_per_node, minimum=1)
        _check_int("Cluster.memory_reserve", self.memory_reserve, minimum=0)
        if self.memory_reserve >= self.device_memory:
            raise ValueError(
                f"Cluster.memory_reserve ({self.memory_reserve} bytes) must be less than "
                f"Cluster.device_memory ({self.device_memory} bytes): the reserve is the part "
                f"of each device's memory that plans leave free, so a reserve that large "
                f"leaves nothing to plan with; lower memory_reserve or raise device_memory")
        for field in ("device_memory", "devices_per_node", "memory_reserve"):
            object.__setattr__(self, field, int(getattr(self, field)))
        object.__setattr__(self, "memory_bandwidth", float(self.memory_bandwidth))
        for field in ("intra_node", "inter_node"):
            if not isinstance(getattr(self, field), Link):
                raise ValueError(f"Cluster.{field} must be a Link, got {_show(getattr(self, field))}")
        if self.axis_links is not None:
            links = tuple(self.axis_links)
            if not all(isinstance(link, Link) for link in links):
                raise ValueError(f"Cluster.axis_links must be a sequence of Link or None, got {_show(self.axis_links)}")
            object.__setattr__(self, "axis_links", links)
        if self.collective_links is not None:
            items = self.collective_links
            items = items.items() if isinstance(items, Mapping) else items
            checked = []
            for kind, links in items:
                if kind not in COLLECTIVES:
                    raise ValueError(f"Cluster.collective_links has unknown collective {kind!r}; "
                                     f"expected some of {list(COLLECTIVES)}")
                links = tuple(links)
                if not links or not all(isinstance(link, Link) for link in links):
                    raise ValueError(f"Cluster.collective_links[{kind!r}] must be a non-empty "
                                     f"sequence of Link (one per mesh axis), got {_show(links)}")
                checked.append((kind, links))
            object.__setattr__(self, "collective_links", tuple(checked))
        for flag in _BACKEND_FLAGS:
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"Cluster.{flag} must be a bool, got {_show(getattr(self, flag))}")
        kernels = self.kernel_seconds
        kernels = kernels.items() if isinstance(kernels, Mapping) else kernels
        checked_kernels = []
        for kernel, seconds in kernels:
            if not isinstance(kernel, str) or not kernel:
                raise ValueError(f"Cluster.kernel_seconds keys must be non-empty strings (kernel_key), "
                                 f"got {_show(kernel)}")
            _check_positive(f"Cluster.kernel_seconds[{_show(kernel)}]", seconds)
            checked_kernels.append((kernel, float(seconds)))
        object.__setattr__(self, "kernel_seconds", tuple(checked_kernels))

    def __repr__(self):
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                  if f.name != "kernel_seconds"]
        if self.kernel_seconds:   # hundreds of long keys: their number says enough
            fields.append(f"kernel_seconds=<{len(self.kernel_seconds)} kernels>")
        return f"Cluster({', '.join(fields)})"

    def flops_rate(self, dtype: Any) -> float:
        """Peak FLOP/s for ``dtype`` (a name such as "bfloat16" or anything whose str is one).

        Dtypes without an entry (integers, bool, unknown names) use the float32 rate.
        """
        rates = dict(self.flops)
        return rates.get(str(dtype), rates["float32"])

    def links_for_mesh(self, mesh_shape: Sequence[int], collective: str | None = None
                       ) -> tuple[Link, ...]:
        """One Link per mesh axis (for ``collective``, one of ``COLLECTIVES``, if given).

        Uses ``collective_links[collective]`` when it has one entry per axis (or a single
        entry, for every axis, and the cluster has no ``axis_links``: a one-axis
        calibration's link is not taken for other axes it never measured), else
        ``axis_links`` when it has one entry per axis. Otherwise walks the axes from
        the last (innermost) to the first: an axis is intra-node while the product of
        its size and the sizes of the axes after it is ≤ ``devices_per_node``, and
        inter-node from the first axis where that product exceeds it.
        """
        mesh_shape = tuple(int(size) for size in mesh_shape)
        if collective is not None and self.collective_links is not None:
            links = dict(self.collective_links).get(collective)
            if links is not None and len(links) == len(mesh_shape):
                return links
            if links is not None and len(links) == 1 and self.axis_links is None:
                return links * len(mesh_shape)
        if self.axis_links is not None and len(self.axis_links) == len(mesh_shape):
            return self.axis_links
        links: list[Link] = []
        devices = 1
        inside_node = True
        for size in reversed(mesh_shape):
            devices *= size
            inside_node = inside_node and devices <= self.devices_per_node
            links.append(self.intra_node if inside_node else self.inter_node)
        return tuple(reversed(links))

    @property
    def usable_memory(self) -> int:
        """Bytes per device that plans may use: ``device_memory - memory_reserve``."""
        return max(0, self.device_memory - self.memory_reserve)

    def to_json(self) -> str:
        """Serialise to JSON; ``Cluster.from_json(c.to_json()) == c``."""
        data = {
            "name": self.name,
            "flops": dict(self.flops),
            "memory_bandwidth": self.memory_bandwidth,
            "device_memory": self.device_memory,
            "devices_per_node": self.devices_per_node,
            "intra_node": dataclasses.asdict(self.intra_node),
            "inter_node": dataclasses.asdict(self.inter_node),
            "memory_reserve": self.memory_reserve,
            "axis_links": None if self.axis_links is None else [dataclasses.asdict(l) for l in self.axis_links],
        }
        if self.collective_links is not None:  # only when set: older readers keep working
            data["collective_links"] = {kind: [dataclasses.asdict(l) for l in links]
                                        for kind, links in self.collective_links}
        for flag in _BACKEND_FLAGS:
            if getattr(self, flag):  # likewise only when set
                data[flag] = True
        if self.kernel_seconds:
            data["kernel_seconds"] = dict(self.kernel_seconds)
        return json.dumps(data, indent=2)

    def save(self, path) -> None:
        """Write :meth:`to_json` to ``path`` whole (a temporary file, then ``os.replace``):
        readers and other writers never see half a file."""
        write_text_atomically(path, self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        """Parse ``to_json`` output. Raises ``ValueError`` naming a missing or bad field."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Cluster JSON is not valid JSON: {err}") from None
        except RecursionError:
            raise ValueError("Cluster JSON nests too deeply to read; a cluster file is an "
                             "object a few levels deep") from None
        if not isinstance(data, dict):
            raise ValueError(f"Cluster JSON must be an object, got {type(data).__name__}")
        required = ("name", "flops", "memory_bandwidth", "device_memory", "devices_per_node", "intra_node",
                    "inter_node")
        optional = ("memory_reserve", "axis_links", "collective_links", "kernel_seconds") + \
            _BACKEND_FLAGS
        for field in required:
            if field not in data:
                raise ValueError(f"Cluster JSON is missing required field {field!r}; expected fields {list(required)}")
        unknown = sorted(set(data) - set(required) - set(optional))
        if unknown:
            raise ValueError(f"Cluster JSON has unknown fields {unknown}; expected {list(required + optional)}")
        flops = data["flops"]
        if not isinstance(flops, dict) or not flops:
            raise ValueError(f"Cluster JSON field 'flops' must be a non-empty object dtype -> FLOP/s, "
                             f"got {_show(flops)}")
        for dtype, rate in flops.items():
            _expect_number(f"flops.{dtype}", rate)
        _expect_number("memory_bandwidth", data["memory_bandwidth"])
        for field in ("device_memory", "devices_per_node", "memory_reserve"):
            if field in data and (isinstance(data[field], bool) or not isinstance(data[field], int)):
                raise ValueError(f"Cluster JSON field {field!r} must be an integer, got {_show(data[field])}")
        if not isinstance(data["name"], str):
            raise ValueError(f"Cluster JSON field 'name' must be a string, got {_show(data['name'])}")
        axis_links = data.get("axis_links")
        if axis_links is not None and not isinstance(axis_links, list):
            raise ValueError(f"Cluster JSON field 'axis_links' must be a list of links or null, "
                             f"got {_show(axis_links)}")
        collective_links = data.get("collective_links")
        if collective_links is not None and not (
                isinstance(collective_links, dict)
                and all(isinstance(v, list) for v in collective_links.values())):
            raise ValueError(f"Cluster JSON field 'collective_links' must be an object collective -> "
                             f"list of links, or null, got {_show(collective_links)}")
        kernel_seconds = data.get("kernel_seconds", {})
        if not isinstance(kernel_seconds, dict):
            raise ValueError(f"Cluster JSON field 'kernel_seconds' must be an object kernel -> "
                             f"seconds, got {_show(kernel_seconds)}")
        for kernel, seconds in kernel_seconds.items():
            _expect_number(f"kernel_seconds[{_show(kernel)}]", seconds)
        flags = {flag: data.get(flag, False) for flag in _BACKEND_FLAGS}
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"Cluster JSON field {flag!r} must be true or false, got "
                                 f"{_show(value)}")
        try:
            return cls(
                name=data["name"],
                flops=tuple((dtype, float(rate)) for dtype, rate in flops.items()),
                memory_bandwidth=float(data["memory_bandwidth"]),
                device_memory=data["device_memory"],
                devices_per_node=data["devices_per_node"],
                intra_node=_link_from_json("intra_node", data["intra_node"]),
                inter_node=_link_from_json("inter_node", data["inter_node"]),
                memory_reserve=data.get("memory_reserve", 0),
                axis_links=None
                if axis_links is None
                else tuple(_link_from_json(f"axis_links[{i}]", link) for i, link in enumerate(axis_links)),
                collective_links=None
                if collective_links is None
                else tuple((kind, tuple(_link_from_json(f"collective_links.{kind}[{i}]", link)
                                        for i, link in enumerate(links)))
                           for kind, links in collective_links.items()),
                kernel_seconds=tuple(kernel_seconds.items()),
                **flags,
            )
        except ValueError as err:
            raise ValueError(f"Cluster JSON is invalid: {err}") from None


def kernel_key(kernel: str, operands: Sequence[tuple[str, Sequence[int]]]) -> str:
    """The ``Cluster.kernel_seconds`` key of ``kernel`` (a primitive and its parameters,
    e.g. ``"conv_general_dilated(...)"``) run on ``operands``: per operand its dtype name
    and per-device shape: ``"conv_general_dilated(...) float32[1,8,8,16] float32[3,3,16,16]"``."""
    return " ".join([kernel] + [f"{dtype}[{','.join(map(str, shape))}]" for dtype, shape in operands])


def _link_from_json(field: str, data: Any) -> Link:
    if not isinstance(data, dict) or set(data) != {"bandwidth", "latency"}:
        raise ValueError(
            f"Cluster JSON field {field!r} must be an object with exactly 'bandwidth' (bytes/s) "
            f"and 'latency' (s), got {_show(data)}"
        )
    _expect_number(f"{field}.bandwidth", data["bandwidth"])
    _expect_number(f"{field}.latency", data["latency"])
    return Link(bandwidth=float(data["bandwidth"]), latency=float(data["latency"]))


def _expect_number(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not abs(value) <= _MAX_NUMBER:   # NaN, infinities, huge ints (no float overflow)
        raise ValueError(f"Cluster JSON field {field!r} must be a finite number (within "
                         f"±{_MAX_NUMBER:g}), got {_show(value)}")


#: the largest number a cluster field may hold (FLOP/s, bytes/s, bytes): far above any
#: machine, and small enough that float arithmetic on it stays finite
_MAX_NUMBER = 1e30
#: the largest integer field (bytes per device, devices per node): what an int64 holds
_MAX_INT = 2**63 - 1
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 60, 60
_REPR.maxlong = 40


def _show(value: Any) -> str:
    """``repr`` of a value in an error message, shortened (a hostile file may hold huge or
    deeply nested values)."""
    return _REPR.repr(value)


def _check_positive(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= _MAX_NUMBER:
        raise ValueError(f"{field} must be a finite positive number (at most {_MAX_NUMBER:g}), "
                         f"got {_show(value)}")


def _check_non_negative(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= _MAX_NUMBER:
        raise ValueError(f"{field} must be a finite non-negative number (at most "
                         f"{_MAX_NUMBER:g}), got {_show(value)}")


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum \
            or value > _MAX_INT:
        raise ValueError(f"{field} must be an integer ≥ {minimum}, got {_show(value)}")

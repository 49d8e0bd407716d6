"""One process of tests/test_multihost.py::test_transfers_between_the_devices_of_two_processes:
moves arrays between device sets of two processes by every path of runtime/transfer.py and
writes what this process holds (``--out DIR/process<i>.npz``)."""
import argparse
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("--process-id", type=int)
p.add_argument("--coordinator")
p.add_argument("--out")
args = p.parse_args()
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(args.coordinator, 2, args.process_id)

from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import autoshard  # noqa: E402
from autoshard.runtime import move  # noqa: E402

devices = jax.devices()
first, second = devices[:4], devices[4:]        # process 0's, process 1's


def mesh(devs, shape=None):
    return Mesh(np.asarray(devs, dtype=object).reshape(shape or (len(devs),)), ("data",)
                if shape is None or len(shape) == 1 else ("data", "model"))


value = np.arange(8 * 8, dtype=np.float32).reshape(8, 8)
whole = NamedSharding(mesh(devices), P("data"))
start = move(value, whole)                      # host value -> all devices
moves = {
    "all devices -> process 0's": (start, NamedSharding(mesh(first), P(None, "data"))),
    "same devices, other layout": (start, NamedSharding(mesh(devices), P(None, "data"))),
}
on_first = move(start, NamedSharding(mesh(first), P("data")))
moves.update({
    "within process 0": (on_first, NamedSharding(mesh(first[:2]), P())),
    "process 0's -> process 1's, same mesh shape": (on_first, NamedSharding(mesh(second),
                                                                            P(None, "data"))),
    "process 0's -> 2 of process 1's (through the hosts)": (
        on_first, NamedSharding(mesh(second[:2]), P("data"))),
    "process 0's -> devices of both": (on_first, NamedSharding(mesh(devices[2:6]), P("data"))),
})
record = {}
for name, (src, dst) in moves.items():
    moved = move(src, dst)
    assert moved.sharding == dst, name
    record[name] = autoshard.gather_to_host(moved)
np.savez(os.path.join(args.out, f"process{args.process_id}.npz"), **record)

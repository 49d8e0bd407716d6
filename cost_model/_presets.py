"""Named cluster presets and the default cluster for a JAX platform.

Every number cites its source. GPU link latencies are per step of a ring collective
(``MeshCostModel`` charges (2(n−1)+1)·α for an all-reduce, n·α for one pass), read off
NCCL's own tuning model (``src/graph/tuning.cc``: a ring collective costs a base 3.6 µs
plus per hop 0.4 µs over NVLink and 0.9 µs over the network with the LL protocol, 2.5 µs
with LL128): an 8-GPU NVLink all-reduce is 3.6 + 14 × 0.4 ≈ 9 µs, which α = 0.6 µs
gives (15α); α = 2.5 µs for a step over InfiniBand. Not measured: calibration replaces
them through ``Cluster.axis_links``.
"""

from __future__ import annotations

import dataclasses

from ._cluster import Cluster, Link

_GiB = 1024**3


def _host_cpu() -> Cluster:
    # Each virtual CPU device (XLA --xla_force_host_platform_device_count) is modelled as
    # an independent processor with nominal round numbers: 1e11 FLOP/s (a few AVX cores),
    # 20 GB/s of DRAM bandwidth, 10 GB/s / 5 µs links. devices_per_node is large so every
    # mesh axis gets the same link: a plan made on a laptop then depends on the mesh only.
    # reduce_scatter_as_all_reduce: XLA's CPU compiler does not turn the SPMD
    # partitioner's all-reduce + dynamic-slice into a reduce-scatter (jax 0.10.2: a
    # contraction split then re-split on the output compiles to a full-buffer all-reduce),
    # so a planned reduce-scatter moves what an all-reduce moves.
    # all-to-all: XLA's CPU all-to-all moves bytes about 3x slower than its other
    # collectives (benchmarks/CALIBRATION.md, fitted to each collective's own formula on
    # this kind of host: β 0.52-0.74 GB/s against all-reduce's 1.53-2.06 GB/s on the
    # same axes, 0.34-0.36 of it; all-gather 0.75-0.84 of it), so it gets 0.35 of the
    # nominal link. Without it, plans traded all-reduces for all-to-alls that ran slower
    # (a Wide-ResNet filter gradient split by channels: 1.22x the DataParallel step).
    # all_to_all_as_slices: XLA's CPU pipeline sends an all-to-all as n slices (jax 0.10.2:
    # resharding a [8,16,16,64] float32 array from dim 0 to dim 3 over 8 devices compiles
    # to 8 slice kernels, a tuple all-to-all and a concatenation; cost analysis: 11 shards
    # more bytes accessed than without the resharding, 7 over 4 devices, 5 over 2).
    # all_reduce_per_operand: XLA's CPU collectives run a merged all-reduce of k arrays as k
    # all-reduces (533 KB over 8 devices: 1.05 ms as one array, 5.3 ms as 16; calibrate()
    # measures it). Small models then often do better off data parallelism, as measured:
    # a 2-layer dropout MLP on 8 devices (batch 256), hidden split 1.84 ms a step against
    # data parallelism's 2.07 ms; an equinox ViT (8 images) on 2x4, images whole 9.9 ms
    # against the DataParallel preset's 14.4 ms.
    # threefry_in_loops: jax lowers threefry2x32 for the CPU with rolled loops (five passes
    # over two uint32 arrays of the output's size, then an xor that XLA fuses into each
    # reader): jax.random.bits of N words is 15 N words of cost_analysis bytes, a dropout
    # mask applied to N floats 16 N words (jax 0.10.2).
    # select_and_scatter_expanded: XLA's CPU pipeline expands max-pool's gradient into an
    # argmax reduce-window over the operand and an iota per dim, then a scatter (jax
    # 0.10.2: a [4, 16, 16, 8] operand through a 2x2 window moves 29.6 times its bytes).
    # batch_groups_dense: it runs a depthwise convolution's filter gradient as a dense
    # convolution of every channel pair, masked (64 channels: 64 times the flops).
    # low_precision_dots_in_f32: XLA:CPU upcasts a dot of bfloat16 (or float16) result to
    # float32 (jax 0.10.2: bf16 [256, 512] @ [512, 1024] moves 5 times the bytes of its
    # operands and result; a dot of float32 result from bf16 operands runs as written).
    link = Link(bandwidth=1e10, latency=5e-6)
    return Cluster(
        name="host-cpu",
        collective_links={"all-to-all": (Link(bandwidth=3.5e9, latency=5e-6),)},
        flops=(("float32", 1e11), ("bfloat16", 1e11), ("float16", 1e11), ("float64", 1e11)),
        memory_bandwidth=2e10,
        device_memory=16 * _GiB,
        devices_per_node=1024,
        intra_node=link,
        inter_node=link,
        reduce_scatter_as_all_reduce=True,
        all_to_all_as_slices=True,
        all_reduce_per_operand=True,
        threefry_in_loops=True,
        select_and_scatter_expanded=True,
        batch_groups_dense=True,
        low_precision_dots_in_f32=True,
    )


def _a100_80gb() -> Cluster:
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB), nvidia.com/content/dam/en-zz/
    # Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf:
    #   BF16/FP16 Tensor Core 312 TFLOPS dense (624 is with sparsity), TF32 156 TFLOPS
    #   dense, FP32 19.5 TFLOPS, FP64 Tensor Core 19.5 TFLOPS, HBM2e 2,039 GB/s, 80 GB,
    #   NVLink 600 GB/s (bidirectional total -> 300 GB/s per direction).
    # ("tf32" and "fp32_vector" are informational entries, not dtypes: the tensor-core
    # TF32 rate and the plain CUDA-core FP32 rate.)
    # "float32" uses the TF32 rate: JAX's default matmul precision on Ampere and newer
    # runs float32 dots on TF32 tensor cores, and dots dominate the FLOPs we price.
    # Elementwise float32 work is memory-bound under the roofline either way.
    # DGX A100: 8 GPUs per node, one Mellanox ConnectX-6 HDR 200 Gb/s InfiniBand NIC per
    # GPU (DGX A100 user guide) -> 25 GB/s per GPU per direction.
    # device_memory: nvidia-smi reports 81920 MiB = 80 GiB. memory_reserve: ~1 GiB kept
    # for the CUDA context and cuDNN/cuBLAS workspaces (nominal).
    return Cluster(
        name="a100-80gb",
        flops=(("float32", 156e12), ("tf32", 156e12), ("fp32_vector", 19.5e12),
               ("bfloat16", 312e12), ("float16", 312e12), ("float64", 19.5e12)),
        memory_bandwidth=2.039e12,
        device_memory=80 * _GiB,
        devices_per_node=8,
        intra_node=Link(bandwidth=300e9, latency=0.6e-6),  # NVLink3 (see the module doc)
        inter_node=Link(bandwidth=25e9, latency=2.5e-6),  # IB HDR 200 Gb/s
        memory_reserve=1 * _GiB,
    )


def _h100_80gb() -> Cluster:
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM), nvidia.com/en-us/data-center/h100/:
    #   BF16/FP16 Tensor Core 1,979 TFLOPS with sparsity -> 989 TFLOPS dense, TF32
    #   989 TFLOPS with sparsity -> 494.5 dense, FP32 67 TFLOPS, FP64 Tensor Core 67 TFLOPS,
    #   HBM3 3.35 TB/s, 80 GB, NVLink 900 GB/s (bidirectional -> 450 GB/s per direction).
    # "float32" uses the TF32 rate for the same reason as the A100 preset (JAX's default
    # float32 matmul precision on Hopper runs on TF32 tensor cores).
    # DGX H100: 8 GPUs per node, ConnectX-7 NDR 400 Gb/s InfiniBand per GPU (DGX H100
    # user guide) -> 50 GB/s per GPU per direction.
    # device_memory: 80 GiB nominal (nvidia-smi reports 81559 MiB); memory_reserve as A100.
    return Cluster(
        name="h100-80gb",
        flops=(("float32", 494.5e12), ("tf32", 494.5e12), ("fp32_vector", 67e12),
               ("bfloat16", 989e12), ("float16", 989e12), ("float64", 67e12)),
        memory_bandwidth=3.35e12,
        device_memory=80 * _GiB,
        devices_per_node=8,
        intra_node=Link(bandwidth=450e9, latency=0.6e-6),  # NVLink4 (see the module doc)
        inter_node=Link(bandwidth=50e9, latency=2.5e-6),  # IB NDR 400 Gb/s
        memory_reserve=1 * _GiB,
    )


_BUILDERS = {"host-cpu": _host_cpu, "a100-80gb": _a100_80gb, "h100-80gb": _h100_80gb}

CLUSTER_PRESETS: tuple[str, ...] = tuple(_BUILDERS)


def cluster_preset(name: str) -> Cluster:
    """The preset cluster called ``name`` (one of ``CLUSTER_PRESETS``); ``ValueError`` otherwise."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown cluster preset {name!r}; valid names are {list(CLUSTER_PRESETS)}")
    return builder()


def default_cluster_for_platform(platform: str, device_kind: str = "") -> Cluster:
    """The cluster a mesh of ``platform`` devices of kind ``device_kind`` is priced with.

    "cpu" -> host-cpu. "gpu"/"cuda": "H100" in device_kind -> h100-80gb, "A100" ->
    a100-80gb, any other GPU -> h100-80gb renamed to say which device it stands in for.
    Anything else -> host-cpu.
    """
    platform = (platform or "").lower()
    kind = device_kind or ""
    if platform in ("gpu", "cuda"):
        if "h100" in kind.lower():
            return cluster_preset("h100-80gb")
        if "a100" in kind.lower():
            return cluster_preset("a100-80gb")
        return dataclasses.replace(
            cluster_preset("h100-80gb"), name=f"h100-80gb (assumed for {kind or 'unknown GPU'})"
        )
    return cluster_preset("host-cpu")

"""Hand-written jax.jit baselines (benchmarks/baselines.py): they run, match a single-device
jax.jit, and compile to the collectives their layouts imply."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from autoshard.ir import hlo
from benchmarks import baselines
from examples import models
from tests.baseline_cases import MESHES, SMALL, compiled_baseline, mesh_of, small_workload

CASES = [(name, shape, strategy) for name in SMALL for shape in MESHES
         for strategy in baselines.baseline_names(name, shape)]


@pytest.mark.parametrize("name,shape,strategy", CASES,
                         ids=[f"{n}-{'x'.join(map(str, s))}-{st}" for n, s, st in CASES])
def test_baseline_runs_and_matches_single_device(name, shape, strategy):
    w, want = small_workload(name)
    fn, in_shardings = compiled_baseline(name, shape, strategy)
    # From host copies: fresh buffers, since the params and optimizer state are donated.
    args = jax.device_put(jax.device_get(w.args), in_shardings)
    got = fn(*args)
    jax.tree_util.tree_map(
        lambda g, r: np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-5),
        got, want)
    # Carried outputs keep their input's layout; the loss is replicated.
    for out, sh in zip(jax.tree_util.tree_leaves(got[:2]), jax.tree_util.tree_leaves(in_shardings[:2])):
        assert out.sharding.is_equivalent_to(sh, out.ndim)
    assert got[2].sharding.is_fully_replicated
    # Whatever replica-group form XLA printed, the parsed groups partition the 8 devices.
    for c in hlo.parse_collectives(fn.as_text()):
        if c.kind != "collective-permute" and c.groups:
            assert sorted(i for g in c.groups for i in g) == list(range(8)), c
            assert len({len(g) for g in c.groups}) == 1, c


def test_baseline_names():
    assert baselines.baseline_names("mlp", (8,)) == ["dp", "fsdp", "tp"]
    assert baselines.baseline_names("gpt_large", (2, 4)) == ["dp", "fsdp", "dp_tp", "fsdp_tp"]
    assert baselines.baseline_names("moe", (8,)) == ["dp", "fsdp", "tp", "ep"]
    assert "ep_gshard" in baselines.baseline_names("moe", (2, 4))
    assert baselines.baseline_names("gpt_large", (2, 2, 2)) == ["dp", "fsdp", "dp_tp", "fsdp_tp"]
    assert baselines.baseline_names("moe", (2, 2, 2)) == ["dp", "fsdp", "dp_tp", "fsdp_tp",
                                                          "ep_gshard"]
    with pytest.raises(ValueError):
        baselines.baseline_names("conv_net", (8,))


def _specs(w, name, shape, strategy):
    specs = baselines.baseline_specs(w, name, mesh_of(shape), strategy)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {jax.tree_util.keystr(p): s for p, s in flat}


def test_megatron_layout_of_gpt_and_optimizer_state_mirrors_params():
    w, _ = small_workload("gpt")
    s = _specs(w, "gpt", (8,), "tp")
    assert s["[0]['blocks'][0]['wq']"] == P(None, "devices")      # column-parallel
    assert s["[0]['blocks'][0]['wo']"] == P("devices")            # row-parallel
    assert s["[0]['blocks'][0]['w1']"] == P(None, "devices")
    assert s["[0]['blocks'][0]['b1']"] == P("devices")
    assert s["[0]['blocks'][0]['w2']"] == P("devices")
    assert s["[0]['blocks'][0]['ln1']['scale']"] == P()
    assert s["[0]['wte']"] == P("devices")                        # vocab-parallel
    assert s["[2]['tokens']"] == P()
    for path, spec in s.items():                                  # adam's mu/nu mirror params
        if ".mu" in path or ".nu" in path:
            assert spec == s["[0]" + path.split(".mu", 1)[-1].split(".nu", 1)[-1]], path
    s = _specs(w, "gpt", (2, 4), "fsdp_tp")
    assert s["[0]['blocks'][0]['wq']"] == P("data", "model")
    assert s["[0]['blocks'][0]['wo']"] == P("model", "data")
    assert s["[2]['tokens']"] == P("data")
    # 3-D, MaxText's default: weights over fsdp and model, the batch over data and fsdp
    s = _specs(w, "gpt", (2, 2, 2), "fsdp_tp")
    assert s["[0]['blocks'][0]['wq']"] == P("fsdp", "model")
    assert s["[0]['blocks'][0]['wo']"] == P("model", "fsdp")
    assert s["[0]['wte']"] == P("model", "fsdp")
    assert s["[2]['tokens']"] == P(("data", "fsdp"))
    s = _specs(w, "gpt", (2, 2, 2), "dp_tp")
    assert s["[0]['blocks'][0]['wq']"] == P(None, "model")
    assert s["[2]['tokens']"] == P(("data", "fsdp"))


def test_fallback_when_a_dim_does_not_divide():
    w = models.mlp(num_layers=2, batch=12, hidden=64, abstract=True)
    assert _specs(w, "mlp", (2, 4), "dp")["[2]['x']"] == P("model")   # 12 % 8 != 0, 12 % 4 == 0
    assert _specs(w, "mlp", (8,), "dp")["[2]['x']"] == P()             # nothing divides 12 by 8
    w = models.mlp(num_layers=2, batch=16, hidden=12, abstract=True)
    s = _specs(w, "mlp", (2, 4), "fsdp")
    assert s["[0]['layers'][0]['w']"] == P("model")                    # 12 x 12: 4 divides
    assert s["[0]['layers'][0]['b']"] == P("model")


def _stats(name, shape, strategy):
    return hlo.collective_stats(compiled_baseline(name, shape, strategy)[0].as_text())


@pytest.mark.parametrize("shape", list(MESHES))
def test_dp_mlp_compiles_to_all_reduces_only(shape):
    st = _stats("mlp", shape, "dp")
    assert st["all-reduce"]["count"] >= 1
    assert all(st[k]["count"] == 0 for k in hlo.COLLECTIVE_KINDS if k != "all-reduce"), st


def test_tp_mlp_gathers_no_weights():
    cols = hlo.parse_collectives(compiled_baseline("mlp", (8,), "tp")[0].as_text())
    assert not [c for c in cols if c.kind != "all-reduce"], cols
    # Only activations ([16, 64] f32) and the loss are reduced: no weight-gradient all-reduce.
    assert cols and all(c.result_bytes <= 16 * 64 * 4 + 4 for c in cols), cols


@pytest.mark.parametrize("shape", list(MESHES))
def test_fsdp_gathers_parameters(shape):
    st = _stats("mlp", shape, "fsdp")
    assert st["all-gather"]["count"] >= 2   # at least each weight of the 2-layer MLP

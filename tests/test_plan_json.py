"""The plan file format: exact round trip, clear validation errors."""
from __future__ import annotations

import collections
import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.remat import Rematerialization
from autoshard.plan.parts import Collective, OpCost, PlanCost, SolverInfo
from autoshard.plan.record import Plan
from autoshard.plan.serialize import SpecTreeNode, plan_to_dict
from autoshard.plan.spec_trees import tree_to_json
from examples.models import mlp


def _has_custom_node(tree) -> bool:
    return any(isinstance(x, SpecTreeNode) for x in jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: isinstance(x, (P, SpecTreeNode))))


def assert_plans_equal(a: Plan, b: Plan) -> None:
    """Field-by-field equality (Plan itself has no __eq__).

    Spec trees compare with ==, except where the loaded one holds a SpecTreeNode
    (a stand-in for a custom pytree class): then by their encoding and leaves.
    """
    for field in dataclasses.fields(Plan):
        va, vb = getattr(a, field.name), getattr(b, field.name)
        if field.name in ("in_specs", "out_specs") and _has_custom_node(vb):
            assert tree_to_json(va) == tree_to_json(vb), f"Plan.{field.name} differs"
            is_spec = lambda x: isinstance(x, P)  # noqa: E731
            assert jax.tree_util.tree_leaves(va, is_leaf=is_spec) == \
                jax.tree_util.tree_leaves(vb, is_leaf=is_spec)
            continue
        assert va == vb, f"Plan.{field.name} differs: {va!r} != {vb!r}"


def assert_round_trip(plan: Plan) -> Plan:
    text = plan.to_json()
    loaded = Plan.from_json(text)
    assert loaded.to_json() == text
    assert_plans_equal(plan, loaded)
    assert Plan.from_json(loaded.to_json()).to_json() == text
    return loaded


class Pair:  # a custom pytree node, as a user's parameter container might be
    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_with_keys(
    Pair, lambda p: (((jax.tree_util.GetAttrKey("a"), p.a), (jax.tree_util.GetAttrKey("b"), p.b)),
                     None),
    lambda _, children: Pair(*children))

State = collections.namedtuple("State", ["count", "mu"])


def _synthetic_plan(**changes) -> Plan:
    cluster = dataclasses.replace(autoshard.cluster_preset("a100-80gb"), name="my-cluster",
                                  axis_links=(autoshard.cost_model.Link(1e9, 1e-6),) * 2)
    in_specs = ({"w": P("data", ("model", "data")), "b": P(None, "model")},
                State(P(), {2: P("model"), 1: None}), Pair(P("data", None), P()), None)
    flat_in = (P(None, "model"), P("data", ("model", "data")), P(), P("model"),
               P("data", None), P())
    out_specs = (P(), [P("data")])
    plan = Plan(
        method=autoshard.ShardParallel(time_limit_s=60.0), mesh_shape=(2, 4),
        axis_names=("data", "model"), cluster=cluster, in_specs=in_specs, out_specs=out_specs,
        cost=PlanCost(np.float64(1e-5), 0.1 + 0.2, 0, np.int64(12345)),
        solver=SolverInfo("OPTIMAL", 1.5e-5, 1.4e-5, np.float32(0.25), 0.01, 10, 200, 300, 0.5),
        fingerprint="0123456789abcdef",
        in_paths=("args[0]['b']", "args[0]['w']", "args[1].count", "args[1].mu[2]",
                  "args[2].a", "args[2].b"),
        out_paths=("[0]", "[1][0]"), flat_in_specs=flat_in, flat_out_specs=(P(), P("data")),
        value_specs=((7, P("model")), (9, P(None, ("data", "model")))),
        operand_specs=((3, 1, P("data")),),
        collectives=(Collective("dot_general#3", "all-reduce", 1e-6),),
        top_ops=(OpCost("dot_general#3", "model.py:3", "r0 all-reduce", np.float64(2e-6)),),
        warnings=("autoshard: control flow primitive 'while' …",),
        stages=((0, 3), {"mesh": (1, 4)}))
    return dataclasses.replace(plan, **changes)


def test_synthetic_plan_round_trips_exactly():
    plan = _synthetic_plan()
    loaded = assert_round_trip(plan)
    # namedtuples stay namedtuples; other custom nodes become SpecTreeNode
    state = loaded.in_specs[1]
    assert type(state).__name__ == "State" and state._fields == ("count", "mu")
    assert isinstance(loaded.in_specs[2], SpecTreeNode)
    assert loaded.in_specs[2].leaves == ((".a", P("data", None)), (".b", P()))
    assert loaded.in_specs[3] is None
    assert loaded.cluster.axis_links == plan.cluster.axis_links
    # the loaded spec trees are pytrees whose leaves are the flat specs
    leaves = jax.tree_util.tree_leaves(loaded.in_specs, is_leaf=lambda x: isinstance(x, P))
    assert tuple(leaves) == plan.flat_in_specs


def test_solver_none_and_empty_trees_round_trip():
    assert_round_trip(_synthetic_plan(solver=None, stages=(), warnings=(), collectives=()))


def test_recomputed_segments_round_trip():
    plan = _synthetic_plan(remat=Rematerialization(40, ((0, 12), (12, 30))))
    assert assert_round_trip(plan).remat == plan.remat


def test_a_value_pinned_through_two_layouts_round_trips_in_order():
    from autoshard.plan.parts import value_layouts
    # a gather's summed rows, then their planned slices (plan_record._made_layouts)
    chain = ((7, P("data")), (9, P()), (7, P("data", "model")))
    loaded = assert_round_trip(_synthetic_plan(value_specs=chain))
    assert loaded.value_specs == chain
    assert value_layouts(loaded.value_specs) == ({7: P("data", "model"), 9: P()},
                                                 {7: (P("data"),)})


def test_real_plan_round_trips_exactly():
    w = mlp(num_layers=1, batch=16, hidden=16, optimizer="adam", abstract=True)
    mesh = autoshard.abstract_mesh((2,), ("data",))
    fn = autoshard.parallelize(w.fn, mesh=mesh, method=autoshard.DataParallel(),
                               cluster=autoshard.cluster_preset("h100-80gb"))
    plan = fn.plan(*w.args)
    loaded = assert_round_trip(plan)
    assert loaded.cluster == autoshard.cluster_preset("h100-80gb")
    assert loaded.in_specs[2] == {"x": P("data"), "y": P("data")}
    # adam's state is a tuple of namedtuples: restored with the same names
    assert [type(s).__name__ for s in loaded.in_specs[1]] == \
        [type(s).__name__ for s in plan.in_specs[1]]


def _corrupt(mutate):
    data = plan_to_dict(_synthetic_plan())
    mutate(data)
    return json.dumps(data)


def _set(path, value):
    def mutate(data):
        *head, last = path
        for k in head:
            data = data[k]
        data[last] = value
    return mutate


def _delete(*path):
    def mutate(data):
        *head, last = path
        for k in head:
            data = data[k]
        del data[last]
    return mutate


@pytest.mark.parametrize("mutate,expected", [
    (_set(["format_version"], 99), "plan.format_version"),
    (_set(["format"], "other"), "not an autoshard plan file"),
    (_delete("cost"), "missing field 'cost'"),
    (_delete("cost", "compute_s"), "plan.cost: missing field(s) ['compute_s']"),
    (_set(["cost", "compute_s"], "fast"), "plan.cost.compute_s: expected"),
    (_set(["solver", "num_nodes"], 1.5), "plan.solver.num_nodes: expected an integer"),
    (_set(["mesh", "shape"], [2, 0]), "plan.mesh.shape"),
    (_set(["mesh", "axis_names"], ["data"]), "plan.mesh.axis_names"),
    (_set(["inputs", 0, 1], ["nope"]), "mesh axis 'nope'"),
    (_set(["inputs", 0, 1], "data"), "plan.inputs[\"args[0]['b']\"]"),
    (_set(["value_specs", 0], ["x", ["model"]]), "plan.value_specs[0]"),
    (_set(["operand_specs", 0], [3, ["data"]]), "plan.operand_specs[0]"),
    (_set(["in_specs", "tuple", 0], {"what": 1}), "plan.in_specs[0]: unknown spec tree node"),
    (_set(["in_specs", "tuple", 0, "dict"], [["w"]]), "plan.in_specs[0]: expected a list of"),
    (_delete("inputs", 0), "plan.in_specs: has 6 specs but plan.inputs has 5"),
    (_set(["cluster", "device_memory"], "80GB"), "plan.cluster"),
    (_set(["warnings"], [1]), "plan.warnings[0]"),
    (_set(["extra"], 1), "unknown field(s) ['extra']"),
    (_set(["collectives", 0, "seconds"], None), "plan.collectives[0].seconds"),
    (_set(["method"], "ShardParallel(time_limit_s=60.0)"), "plan.method: expected an object"),
    (_set(["method", "kind"], "Magic"), "plan.method: expected an object with \"kind\""),
    (_set(["method", "speed"], 2), "plan.method: ShardParallel has no setting(s) ['speed']"),
    (_set(["method", "time_limit_s"], "long"), "plan.method: ShardParallel"),
    (_set(["remat"], {"turn": 9, "segments": [[0, 4], [2, 6]]}), "plan.remat: rematerialized "
     "segments must be ordered, non-empty, disjoint ranges before the turn"),
    (_set(["remat"], {"turn": 9}), "plan.remat: expected null or"),
])
def test_validation_errors_name_the_field(mutate, expected):
    with pytest.raises(autoshard.PlanFormatError) as info:
        Plan.from_json(_corrupt(mutate))
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_method_is_a_typed_record_and_version_1_files_still_load():
    plan = _synthetic_plan(method=autoshard.PipeshardParallel(
        num_microbatches=4, stage_method=autoshard.Megatron()))
    data = plan_to_dict(plan)
    assert data["method"] == {"kind": "PipeshardParallel", "num_microbatches": 4,
                              "num_stages": None, "schedule": "1f1b", "num_layers": None,
                              "stage_method": {"kind": "Megatron"}}
    assert Plan.from_json(json.dumps(data)).method == plan.method
    # a version-1 file wrote the method's repr
    data.update(format_version=1, method=repr(plan.method))
    assert Plan.from_json(json.dumps(data)).method == plan.method
    data["method"] = "__import__('os').system('true')"
    with pytest.raises(autoshard.PlanFormatError, match="plan.method"):
        Plan.from_json(json.dumps(data))


@pytest.mark.parametrize("text,expected", [
    ("not json{", "not valid JSON"), ("[1, 2]", "not an autoshard plan file"), ("", "JSON")])
def test_not_a_plan(text, expected):
    with pytest.raises(ValueError, match=expected):
        Plan.from_json(text)


def test_fingerprint_covers_the_program_body():
    mesh = autoshard.abstract_mesh((8,), ("d",))
    x = jax.ShapeDtypeStruct((16, 8), np.float32)

    def plan(f, **kwargs):
        return autoshard.parallelize(f, mesh=mesh, method=autoshard.DataParallel(),
                                     **kwargs).plan(x)

    sin, cos, sin_again = plan(jax.numpy.sin), plan(jax.numpy.cos), plan(lambda v: jax.numpy.sin(v))
    assert sin.fingerprint == sin_again.fingerprint != cos.fingerprint
    with pytest.raises(ValueError, match="another function or input signature"):
        plan(jax.numpy.cos, plan=sin)

"""The view a loop over layers is planned on (ir.loop_view): the scan's body spliced in once,
between an entry per input and a stack per stacked result."""
import jax
import jax.numpy as jnp

from autoshard.ir.loop_view import loop_view
from autoshard.ir.trace import trace

STEPS = 5


def _layers(w, x):
    def body(h, wi):
        h = jnp.tanh(h @ wi)
        return h, h * 2.0
    return jax.lax.scan(body, x, w)


def _traced():
    return trace(_layers, (jnp.ones((STEPS, 4, 4)), jnp.ones((3, 4))), rolled_layers=True)


def test_a_scan_is_spliced_between_its_entries_and_its_stacks():
    traced = _traced()
    (scan,) = traced.program.eqns
    view = loop_view(traced)
    (loop,) = view.loops
    program = view.traced.program
    kinds = [origin[0] for origin in view.origins]
    # the carry's identity, the weights' slice and squeeze; the body (a dot, a tanh, a
    # product); the stacked result's broadcast
    assert kinds == ["entry", "slice", "entry", "body", "body", "body", "stack"]
    assert [view.repeats(e) for e in range(len(kinds))] == [1, 1, 1, STEPS, STEPS, STEPS, 1]
    assert loop.length == STEPS and (loop.start, loop.stop) == (3, 6)
    # a step of the stacked weights is read whole along the steps ...
    slice_eqn = program.eqns[loop.slices[1]]
    assert slice_eqn.inputs == (scan.inputs[1],)
    assert program.avals[slice_eqn.outputs[0]].shape == (1, 4, 4)
    # ... the stacked result is the scan's own value, [steps, ...] ...
    stack = program.eqns[loop.stacks[0]]
    assert stack.outputs == (scan.outputs[1],)
    assert program.avals[stack.outputs[0]].shape == (STEPS, 3, 4)
    # ... and the carry the body makes is what the program reads after the loop, and goes
    # back into the carry's entry
    assert program.outvars[0] == view.renamed[scan.outputs[0]]
    assert loop.carried == ((program.outvars[0], loop.entries[0]),)


def test_a_program_without_loops_has_no_view():
    assert loop_view(trace(lambda x: jnp.tanh(x @ x), (jnp.ones((4, 4)),))) is None


def test_the_view_does_not_grow_with_the_number_of_steps():
    sizes = []
    for steps in (2, 16):
        traced = trace(_layers, (jnp.ones((steps, 4, 4)), jnp.ones((3, 4))), rolled_layers=True)
        sizes.append(len(loop_view(traced).traced.program.eqns))
    assert sizes[0] == sizes[1]

"""The HTML view of a plan: Jupyter repr, save_html, the example notebook, a real browser."""
from __future__ import annotations

import dataclasses
import html
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.plan.html import plan_html, simulate_schedule
from autoshard.plan.parts import Collective, OpCost

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ("<script>alert(1)</script>", 'a"b', "x'&<y>")


def _hostile_fn(params, x):
    h = jnp.tanh(x @ params[HOSTILE[0]])
    h = h @ params[HOSTILE[1]]
    return jnp.sum(h * params["ok"][HOSTILE[2]])


def _hostile_args():
    params = {HOSTILE[0]: jnp.ones((16, 32)), HOSTILE[1]: jnp.ones((32, 16)),
              "ok": {HOSTILE[2]: jnp.ones((8, 16))}}
    return params, jnp.ones((8, 16))


@pytest.fixture(scope="module")
def plan():
    mesh = autoshard.abstract_mesh((2, 4), ("data", "model"))
    base = autoshard.parallelize(_hostile_fn, mesh=mesh).plan(*_hostile_args())
    # Hostile op names and sources too, and specs that exercise every picture kind.
    flat = (P("data", "model"), P(("data", "model")), P(None, ("model", "data")),
            P("data", None, "model"))[:len(base.flat_in_specs)]
    treedef = jax.tree_util.tree_structure(base.in_specs,
                                           is_leaf=lambda x: isinstance(x, P) or x is None)
    return dataclasses.replace(
        base, flat_in_specs=flat, in_specs=jax.tree_util.tree_unflatten(treedef, flat),
        in_shapes=(),  # the made-up specs do not fit the real inputs' shapes

        collectives=base.collectives + (Collective("<img src=x onerror=alert(2)>", "all-reduce",
                                                   1e-4),),
        top_ops=base.top_ops + (OpCost("op<b>", "/tmp/<evil>.py:1", "s'\"", 1e-5),))


@pytest.fixture(scope="module")
def pipeline_plan(plan):
    stages = tuple({"layers": [2 * i, 2 * i + 1], "mesh_shape": [2, 1],
                    "device_ids": [2 * i, 2 * i + 1],
                    "cost": {"forward_s": 1e-3, "backward_s": 2e-3, "peak_memory_bytes": 2**20},
                    "num_microbatches": 6, "schedule": "1f1b"} for i in range(4))
    return dataclasses.replace(plan, stages=stages)


def test_repr_html_draws_every_input_and_escapes_names(plan):
    page = plan._repr_html_()
    n = len(plan.in_paths)
    assert n == 4
    for i in range(n):   # one picture per input
        m = re.search(rf'<div class="as-t" data-input="{i}"[^>]*><svg ', page)
        assert m, f"no SVG for input {i}"
    assert page.count('data-tensor="input') == n
    for raw in HOSTILE + ("<img src=x onerror=alert(2)>", "op<b>", "/tmp/<evil>.py", "s'\""):
        assert raw not in page, f"unescaped {raw!r}"
    assert html.escape("<script>alert(1)</script>") in page
    assert "<script" not in page.lower()
    assert html.escape(HOSTILE[1]) in page
    # Cost breakdown, memory against the device and the collectives are there.
    assert "Modelled cost per step" in page and "Peak memory per device" in page
    assert "Collectives" in page and html.escape("<img src=x onerror=alert(2)>") in page
    # A 2-D spec on the 2-D mesh is a grid of 2×4 blocks, each on one device.
    grid = re.search(r'<svg class="as-svg" data-tensor="input0".*?</svg>', page).group(0)
    assert grid.count("<title>shard") == 8
    assert "device(s) 5<" in grid
    assert "dim 2" in page           # rank-3 spec drawn as split bars
    assert "timeline" not in page    # no stages, no timeline


def test_groups_by_path_prefix():
    paths = tuple(f"args[0]['layers'][{i}]['w']" for i in range(30)) + ("args[1]",)
    plan = _fake_plan(paths)
    page = plan_html(plan)
    assert page.count("<details") >= 30          # one group per layer (plus inputs/outputs)
    assert page.count('data-input="') == 31
    assert f"<code>{html.escape('[29]')}</code>" in page


def test_pipeline_timeline(pipeline_plan):
    page = pipeline_plan._repr_html_()
    assert 'class="as-timeline"' in page
    assert "4 stages, 6 micro-batches, schedule 1f1b" in page
    # The stage contract is plain JSON: it survives to_json/from_json and draws the same.
    again = autoshard.Plan.from_json(pipeline_plan.to_json())
    assert 'class="as-timeline"' in again._repr_html_()
    # Malformed stages are reported, not raised.
    bad = dataclasses.replace(pipeline_plan, stages=({"cost": 1.0, "schedule": "zigzag"},))
    assert "cannot draw the pipeline stages" in bad._repr_html_()


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_schedule_simulation(schedule):
    S, B = 4, 8
    events = simulate_schedule([1.0] * S, [2.0] * S, B, schedule)
    assert len(events) == 2 * S * B
    end = max(e[4] for e in events)
    assert end == pytest.approx((B + S - 1) * 3.0)  # both schedules: (B + S - 1)(f + b)
    for s in range(S):   # a stage never runs two things at once
        spans = sorted((e[3], e[4]) for e in events if e[0] == s)
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:]))
    if schedule == "1f1b":  # 1F1B keeps at most S - s micro-batches in flight on stage s
        for s in range(S):
            live = peak = 0
            for e in sorted((e for e in events if e[0] == s), key=lambda e: e[3]):
                live += 1 if e[1] == "F" else -1
                peak = max(peak, live)
            assert peak <= S - s


def test_save_html_is_self_contained(plan, pipeline_plan, tmp_path):
    for p in (plan, pipeline_plan):
        path = tmp_path / "plan.html"
        p.save_html(path)
        text = path.read_text(encoding="utf-8")
        assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
        assert '<meta charset="utf-8">' in text
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
        assert not re.search(r"@import|url\(|<script|<link|<iframe", text, re.I)
        assert "http://" not in text and "https://" not in text
        assert text.count("<svg") >= len(p.in_paths)


# ----------------------------------------------------------------------------- notebook
def test_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "examples" / "inspect_plan.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "store the notebook without outputs"
    env_flags = os.environ.pop("XLA_FLAGS", None)   # the notebook must set it itself
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        if env_flags is not None:
            os.environ["XLA_FLAGS"] = env_flags
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    htmls = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("autoshard-plan" in h and "<svg" in h for h in htmls)


# ----------------------------------------------------------------------------- browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def _screenshot(binary: str, page: Path, png: Path, profile: Path) -> None:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           f"--screenshot={png}", "--window-size=1200,900", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert png.exists(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"


def _png_pixels(data: bytes):
    """(width, height, pixels as a uint8 [height, width, channels] array) of an 8-bit
    RGB/RGBA, non-interlaced PNG — the stdlib zlib plus numpy, no PIL."""
    import numpy as np
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    stride = width * bpp
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        f, line = raw[y, 0], raw[y, 1:]
        if f == 0:
            cur = line.copy()
        elif f == 1:      # Sub: running sum per channel, mod 256
            cur = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif f == 2:      # Up
            cur = line + prev
        else:             # Average / Paeth: sequential along the row
            cur, up = bytearray(line.tobytes()), prev.tobytes()
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b = up[i]
                if f == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 255
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.frombuffer(bytes(cur), np.uint8)
        out[y] = cur
        prev = out[y]
    return width, height, out.reshape(height, width, bpp)


def test_browser_renders_saved_html(plan, pipeline_plan, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install -y --no-install-recommends chromium)")
    page = tmp_path / "plan.html"
    pipeline_plan.save_html(page)
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    png, blank_png = tmp_path / "plan.png", tmp_path / "blank.png"
    _screenshot(binary, page, png, tmp_path / "profile")
    _screenshot(binary, blank, blank_png, tmp_path / "profile")
    data = png.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 900)
    assert len(data) > 4 * len(blank_png.read_bytes())
    import numpy as np
    _, _, pixels = _png_pixels(data)
    rgb = pixels[..., :3].reshape(-1, 3)
    assert (rgb != rgb[0]).any(), "the screenshot is blank"
    assert len(np.unique(rgb, axis=0)) > 20, "the screenshot is (nearly) one colour"
    # The cost bar's compute colour (an opaque block of #4e79a7) is on screen.
    near = np.abs(rgb.astype(int) - np.array([0x4E, 0x79, 0xA7])).sum(axis=1) < 12
    assert near.sum() > 1000, "the cost bar is not drawn"


def _fake_plan(paths):
    """A plan with the given input paths (specs replicated), without planning."""
    mesh = autoshard.abstract_mesh((2, 4), ("data", "model"))
    base = autoshard.parallelize(lambda x: x * 2, mesh=mesh).plan(jnp.ones((8, 8)))
    return dataclasses.replace(base, in_paths=paths, flat_in_specs=(P("data"),) * len(paths))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

"""The documentation: the API reference builds from the docstrings (pdoc, offline) with an
entry for every public name, and the guides' links and code are sound."""
from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import autoshard

REPO = Path(__file__).resolve().parents[1]
GUIDES = sorted((REPO / "docs" / "guides").glob("*.md"))
PUBLIC = [n for n in autoshard.__all__ if not n.startswith("_")]


def test_every_public_name_has_a_docstring():
    missing = [n for n in PUBLIC if not isinstance(getattr(autoshard, n), (str, tuple))
               and not (inspect.getdoc(getattr(autoshard, n)) or "").strip()]
    assert missing == []


def test_api_reference_builds_with_every_public_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pdoc", "autoshard", "autoshard.cost_model",
                           "autoshard.runtime", "-o", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "autoshard.html").read_text()
    ids = set(re.findall(r'id="([A-Za-z_][\w.]*)"', page))
    assert [n for n in PUBLIC if n not in ids] == []
    for member in ("Plan.summary", "Plan.alternatives", "PlanCost.total_s",
                   "ParallelizedFunction.plan", "Annotated.rules"):
        assert member in ids
    assert (tmp_path / "index.html").exists()


def test_index_lists_every_guide():
    index = (REPO / "docs" / "README.md").read_text()
    assert GUIDES
    for guide in GUIDES:
        assert f"(guides/{guide.name})" in index


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_guide_links_resolve_and_code_parses(guide):
    text = guide.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (guide.parent / target).resolve().exists(), target
    blocks = re.findall(r"```py\n(.*?)```", text, flags=re.S)
    assert blocks, "each guide shows its idiom in code"
    for block in blocks:
        ast.parse(block)
    for name in re.findall(r"autoshard\.(\w+)", text):
        assert hasattr(autoshard, name), name

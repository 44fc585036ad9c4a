"""The backpropagation tutorial in docs/ runs: each page's ```python blocks, in order, as one script.

Each page ends in a finite-difference check of the trainer's own layers (imported from train_gpt2,
never copied into the page), so a wrong backward pass in train_gpt2.py fails the page that teaches it.
"""

import glob
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT

DOCS = os.path.join(ROOT, "docs")
# the tutorial in reading order
PAGES = ["backprop_1_overview.md", "backprop_2_layernorm.md", "backprop_3_matmul_gelu.md",
         "backprop_4_softmax_crossentropy.md", "backprop_5_attention.md", "backprop_6_adamw.md"]
LAYER_NAMES = ("encoder", "layernorm", "matmul", "attention", "gelu", "residual", "softmax", "crossentropy",
               "adamw")


def python_blocks(page):
    # the page's ```python blocks, in order
    with open(os.path.join(DOCS, page)) as f:
        return re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.M | re.S)


def test_pages_are_all_listed():
    # a new page must join the reading order (and this test) by name
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "backprop_*.md"))) == sorted(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no ```python blocks"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{page} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("page", PAGES)
def test_page_imports_the_layers(page):
    # the pages check the trainer's layers: a layer defined in a page would check only itself
    code = "\n".join(python_blocks(page))
    assert "import train_gpt2" in code
    for name in LAYER_NAMES:
        assert not re.search(rf"^\s*def {name}\w*\(", code, flags=re.M), f"{page} defines its own {name}"


@pytest.mark.parametrize("page", PAGES)
def test_page_links_resolve(page):
    # every relative link and picture of a page points at a file in the repository (PNGs kept small)
    with open(os.path.join(DOCS, page)) as f:
        targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read())
    for target in targets:
        if "://" in target:
            continue
        path = os.path.normpath(os.path.join(DOCS, target))
        assert os.path.exists(path), f"{page}: broken link {target}"
        if path.endswith(".png"):
            assert os.path.getsize(path) < 150_000, f"{page}: {target} is over 150 KB"

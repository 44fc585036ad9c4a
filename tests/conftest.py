"""Shared test set-up: import the top-level scripts and tests/helpers.py, and let tiktoken work offline."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # helpers.py, whatever pytest's --import-mode

# tiktoken can't download its GPT-2 files without internet; the workplace keeps a copy beside the repo
_cache = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)

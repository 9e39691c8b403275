"""The committed sample dumps: intact, and analysed as their bytes say.

``tests/sample_dumps.json`` was written by ``tests/make_sample_dumps.py`` from the raw guest
memory with hashlib (no ksm-analyze code), so it is an independent account of each file.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import ROOT

from ksm_analyze import analyze

MANIFEST = json.loads((ROOT / "tests" / "sample_dumps.json").read_text())
FILES = sorted(MANIFEST["files"])


@pytest.mark.parametrize("name", FILES)
def test_sample_is_the_file_the_manifest_describes(name):
    data = (ROOT / "sample_dumps" / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == MANIFEST["files"][name]["sha256"]


def test_sample_dumps_are_small():
    total = sum(p.stat().st_size for p in (ROOT / "sample_dumps").iterdir())
    assert total < 8 * 2**20


def test_scan_of_the_samples_matches_their_bytes():
    result = analyze([ROOT / "sample_dumps" / n for n in FILES])
    for row, name in zip(result.per_input.itertuples(), FILES, strict=True):
        expect = MANIFEST["files"][name]["window_pages"]
        assert row.pages == expect["pages"]
        assert row.zero_pages == expect["zero_pages"]
        assert row.distinct_contents == expect["distinct_nonzero"]
    both = MANIFEST["vm-a+vm-b"]
    copies = both["copies_of_nonzero_contents"]
    assert max(copies) < 256  # so each repeated content is exactly one KSM page
    zero = both["zero_pages"]
    zero_ksm_pages = -(-zero // 256)  # no single leftover: zero % 256 != 1 (checked below)
    assert zero % 256 != 1
    host = result.host["with_zero_pages"]
    assert host["pages_shared"] == len(copies) + zero_ksm_pages
    assert host["pages_sharing"] == sum(c - 1 for c in copies) + zero - zero_ksm_pages
    assert host["ksm_rmap_items"] == both["pages"]
    untouched = result.host["without_zero_pages"]
    assert untouched["pages_sharing"] == sum(c - 1 for c in copies)

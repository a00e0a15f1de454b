"""docs/quality.md's pilots that were not adopted live as patches in docs/pilots/, and the page
says they apply to today's main: each must still apply cleanly, or the page's commands are false."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import ROOT

PILOTS = sorted((ROOT / "docs" / "pilots").glob("*.patch"))


def test_the_pilots_the_page_names_are_there():
    page = (ROOT / "docs" / "quality.md").read_text()
    assert PILOTS, "docs/pilots/ holds no patch"
    for p in PILOTS:
        assert p.name in page, f"docs/quality.md does not say what {p.name} is or how to run it"


@pytest.mark.parametrize("patch", PILOTS, ids=lambda p: p.name)
def test_each_pilot_applies_to_this_checkout(patch):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to apply the pilots to")
    p = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, f"{patch.name} no longer applies: {p.stderr.strip()}"

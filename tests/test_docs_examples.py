"""The examples of docs/targets/*.md run as written (with /var/tmp replaced by a temporary
directory) against a real daemon, and the outputs their comments show are what they print."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs" / "targets"
PAGES = sorted(DOCS.glob("*.md"))
EXPECTS = re.compile(r"^(userdm (?:status|table) \S+)\s+# (\d.*)$")


def script_of(page: Path, tmp: Path) -> str:
    """The page's ```sh blocks as one bash script; `userdm status X   # OUTPUT` lines become
    checks of the output."""
    text = page.read_text().replace("/var/tmp", str(tmp))
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            m = EXPECTS.match(line)
            if m:
                cmd, want = m[1], m[2].strip()
                line = f'got=$({cmd}); [ "$got" = {want!r} ] || {{ echo "{cmd}: got [$got]" >&2; exit 1; }}'
            lines.append(line)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def test_every_target_has_a_page():
    assert {p.stem for p in PAGES} == {"linear", "striped", "zero", "error", "verity", "snapshot",
                                        "era", "dust", "flakey", "delay"}
    for page in PAGES:
        text = page.read_text()
        assert "## Table" in text or "## Tables" in text, page
        assert "## Status, table, messages" in text and "## Example" in text, page


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_examples_run(daemon, tmp_path, page):
    if page.stem == "verity" and shutil.which("veritysetup") is None:
        pytest.skip("veritysetup is not installed (apt: cryptsetup-bin)")
    script = script_of(page, tmp_path)
    assert "userdm" in script
    env = {**daemon.env, "PATH": f"{Path(sys.executable).parent}:{daemon.env['PATH']}"}
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, f"{page.name}:\n{script}\n{res.stdout}\n{res.stderr}"

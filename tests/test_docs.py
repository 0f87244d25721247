"""Every ```python block in the README and docs/ runs, so examples cannot rot.

Blocks of one page run in order in one namespace, as a reader would paste them.
"""

import pathlib
import re

import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
TORCH = re.compile(r"^(import|from) .*\btorch\b", re.MULTILINE)
# Pages whose examples are slow by nature: they train, run a property test, or
# compile 1000-step sequences.
SLOW = {"docs/api/train.md", "docs/parallel.md", "docs/testing.md", "docs/sequences.md"}


def _page(path):
    slow = path.relative_to(ROOT).as_posix() in SLOW
    return pytest.param(path, marks=[pytest.mark.slow] if slow else [], id=path.name)


def test_slow_pages_exist():
    assert SLOW <= {p.relative_to(ROOT).as_posix() for p in PAGES}


@pytest.mark.parametrize(
    "page", [_page(p) for p in PAGES if BLOCK.search(p.read_text())]
)
def test_code_blocks_run(page, monkeypatch, tmp_path):
    if TORCH.search(page.read_text()):
        pytest.importorskip("torch")  # an optional extra; CI installs it
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(BLOCK.findall(page.read_text())):
        code = compile(block, f"{page.relative_to(ROOT)}[block {i}]", "exec")
        exec(code, namespace)

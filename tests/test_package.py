"""What `import stackrnn` loads, and the command without the application's extra."""

import importlib
import subprocess
import sys

import pytest


# Packages of the extras (`lm`, `torch`, `testing`) and of the old data download.
EXTRAS = ("hypothesis", "matplotlib", "optax", "pooch", "torch", "tqdm")


def test_import_stackrnn_loads_no_extra():
    code = f"import sys, stackrnn; print(sorted(set({EXTRAS!r}) & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", ["optax", "tqdm", "matplotlib"])
def test_command_without_the_lm_extra_says_what_to_install(missing):
    # The package made unimportable, as in an environment without the extra.
    code = (
        f"import sys; sys.modules[{missing!r}] = None; "
        "from stackrnn.__main__ import main; main(['train', '--out', 'unused'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    )
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "`stackrnn.lm` needs the `lm` extra" in lines[0]
    assert missing in lines[0] and 'pip install "stackrnn[lm]"' in lines[0]


def test_import_lm_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optax", None)
    for name in [m for m in sys.modules if m.startswith("stackrnn.lm")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "stackrnn\[lm\]"'):
        importlib.import_module("stackrnn.lm")

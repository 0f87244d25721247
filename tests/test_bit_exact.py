"""The tests marked `bit_exact` compare with bits saved by programs compiled with
XLA's default flags, what users run. The suite compiles with faster flags
(`conftest.py`), which round some float products differently, so they run here, in
a pytest process of their own with the default flags."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from .conftest import FAST_COMPILE


@pytest.mark.slow
def test_bit_exact_at_xlas_default_optimisation():
    here = pathlib.Path(__file__)
    files = [
        f.name
        for f in sorted(here.parent.glob("test_*.py"))
        if f != here and "@pytest.mark.bit_exact" in f.read_text()
    ]
    assert files, "no test is marked `bit_exact`"
    # The flags that conftest.py set for this process, which children inherit, go.
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if f not in FAST_COMPILE]
    env = dict(os.environ, STACKRNN_TEST_DEFAULT_OPTIMISATION="1")
    env["XLA_FLAGS"] = " ".join(flags)
    command = [sys.executable, "-m", "pytest", "-m", "bit_exact", "-n", "0", "-q"]
    command += ["-p", "no:cacheprovider", *files]
    result = subprocess.run(
        command, cwd=here.parent, env=env, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # The marked tests ran and passed, none skipped.
    assert re.search(r"\b[1-9][0-9]* passed\b", output), output[-5000:]
    assert "skipped" not in output, output[-5000:]

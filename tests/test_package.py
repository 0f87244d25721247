"""The distributions: what `import stackrnn` loads, the command without the
application's extra, the license, and install commands that work from a clone."""

import importlib
import pathlib
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest


ROOT = pathlib.Path(__file__).parents[1]


def test_license_is_declared_and_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


@pytest.mark.slow
def test_wheel_and_sdist_carry_the_license(tmp_path):
    # Builds offline with the installed backend (the test extra does not bring it).
    pytest.importorskip("hatchling")
    pytest.importorskip("build")
    command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path]
    subprocess.run([*map(str, command), str(ROOT)], check=True, capture_output=True)
    license = (ROOT / "LICENSE").read_bytes()
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        assert z.read(name) == license
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        (name,) = [
            n for n in t.getnames() if n.count("/") == 1 and n.endswith("/LICENSE")
        ]
        assert t.extractfile(name).read() == license


def test_install_commands_work_from_a_clone():
    # Until the package is published, `pip install "stackrnn[x]"` finds nothing.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    commands = [
        (page.name, command)
        for page in pages
        for command in re.findall(r"pip install ([^`\n#&]*)", page.read_text())
    ]
    assert len(commands) >= 4
    for page, command in commands:
        if command.strip() == "./kernels":  # the accelerator's own distribution
            continue
        match = re.fullmatch(r'-e (\.|"\.\[([a-z,]+)\]")\s*', command)
        assert match, (page, command)
        assert set((match[2] or "").split(",")) - {""} <= extras.keys(), (page, command)


# Packages of the extras (`lm`, `torch`, `testing`) and of the old data download.
EXTRAS = ("hypothesis", "matplotlib", "optax", "pooch", "torch", "tqdm")


@pytest.mark.slow
def test_import_stackrnn_loads_no_extra():
    code = f"import sys, stackrnn; print(sorted(set({EXTRAS!r}) & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", ["optax", "tqdm", "matplotlib"])
def test_command_without_the_lm_extra_says_what_to_install(
    missing, monkeypatch, capsys
):
    # The package made unimportable, as in an environment without the extra.
    monkeypatch.setitem(sys.modules, missing, None)
    for name in [m for m in sys.modules if m.startswith("stackrnn.lm")]:
        monkeypatch.delitem(sys.modules, name)
    from stackrnn.__main__ import main

    with pytest.raises(SystemExit) as exit:
        main(["train", "--out", "unused"])
    # A message: Python prints it to stderr and exits with status 1.
    message = exit.value.code
    assert isinstance(message, str) and "\n" not in message
    assert "`stackrnn.lm` needs the `lm` extra" in message
    assert missing in message and 'pip install "stackrnn[lm]"' in message
    assert capsys.readouterr() == ("", "")


def test_import_lm_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optax", None)
    for name in [m for m in sys.modules if m.startswith("stackrnn.lm")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "stackrnn\[lm\]"'):
        importlib.import_module("stackrnn.lm")

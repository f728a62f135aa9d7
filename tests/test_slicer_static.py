"""Static checks of the Slicer extension, which cannot be run here: every Python file must be valid for the
Python 3.9 of older Slicer releases, the panel's widget names must exist in the .ui file, and CMake must ship
every file."""

from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "slicer_extension"
MODULE = EXTENSION / "LabelLoop"
LIB = MODULE / "LabelLoopLib"
UI = MODULE / "Resources" / "UI" / "LabelLoop.ui"
PY_FILES = sorted(EXTENSION.rglob("*.py"))


def python39() -> str:
    """A real Python 3.9 interpreter if one is installed with pyenv ('' otherwise)."""
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3")))
    return found[-1] if found else ""


def test_there_is_something_to_check():
    names = {p.relative_to(MODULE).as_posix() for p in PY_FILES}
    assert {"LabelLoop.py", "LabelLoopLib/__init__.py", "LabelLoopLib/client.py", "LabelLoopLib/segio.py"} <= names
    assert {"LabelLoopLib/workflow.py", "LabelLoopLib/colors.py"} <= names


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: p.relative_to(EXTENSION).as_posix())
def test_parses_as_python_39(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    match_statement = getattr(ast, "Match", None)  # ``match`` is 3.10+
    assert match_statement is None or not any(isinstance(n, match_statement) for n in ast.walk(tree))


def test_compiles_with_a_real_python_39():
    """``ast.parse(feature_version=...)`` misses some newer syntax; the real 3.9 compiler does not."""
    interpreter = python39()
    if not interpreter:
        # No 3.9 here: the ast check above is what can be done (not a skip: it ran for every file).
        assert all(ast.parse(p.read_text(encoding="utf-8"), feature_version=(3, 9)) for p in PY_FILES)
        return
    code = (
        "import sys\n"
        "for p in sys.argv[1:]:\n"
        "    compile(open(p, encoding='utf-8').read(), p, 'exec', dont_inherit=True)\n"
        "print(sys.version_info[:2])\n"
    )
    result = subprocess.run([interpreter, "-c", code, *map(str, PY_FILES)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(3, 9)" in result.stdout


def test_runtime_annotations_are_deferred_for_python_39():
    """``X | Y`` and ``list[int]`` in annotations only work on 3.9 when annotations are not evaluated."""
    for path in PY_FILES:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        has_code = any(not isinstance(n, (ast.Expr, ast.Import, ast.ImportFrom)) for n in tree.body)
        if has_code:
            assert "from __future__ import annotations" in source, path


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: p.relative_to(EXTENSION).as_posix())
def test_no_cgi_and_no_hand_written_multipart(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(alias.name != "cgi" for alias in node.names), path
        if isinstance(node, ast.ImportFrom):
            assert node.module != "cgi", path
    source = path.read_text(encoding="utf-8")
    assert "multipart/form-data; boundary=" not in source
    assert "Content-Disposition: form-data" not in source


def test_lib_does_not_import_slicer_or_qt():
    for path in sorted(LIB.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not set(names) & {"slicer", "qt", "ctk", "vtk", "PythonQt"}, f"{path.name} imports {names}"


def test_ui_file_parses_and_has_every_widget_the_module_uses():
    tree = ET.parse(UI)
    root = tree.getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget"
    names = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "LabelLoop.py").read_text(encoding="utf-8")))
    assert used, "the module uses no widget from the .ui?"
    missing = sorted(used - names)
    assert not missing, f"used in LabelLoop.py but not in LabelLoop.ui: {missing}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {w.get("class") for w in root.iter("widget")} - {
        c for c in {w.get("class") for w in root.iter("widget")} if c.startswith("Q")
    }
    assert custom <= declared, f"custom widgets without declaration: {custom - declared}"


def test_module_icon_is_a_small_png():
    icon = MODULE / "Resources" / "Icons" / "LabelLoop.png"
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)
    assert len(data) < 20_000


def cmake_entries(text: str, variable: str) -> set:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return {e.replace("${MODULE_NAME}", "LabelLoop") for e in match.group(1).split()}


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text
    scripts = cmake_entries(text, "MODULE_PYTHON_SCRIPTS")
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py")}
    assert on_disk == scripts, f"missing: {sorted(on_disk - scripts)}, stale: {sorted(scripts - on_disk)}"
    resources = cmake_entries(text, "MODULE_PYTHON_RESOURCES")
    assert {"Resources/Icons/LabelLoop.png", "Resources/UI/LabelLoop.ui"} <= resources
    for entry in resources:
        assert (MODULE / entry).is_file(), entry


def test_extension_cmake_metadata():
    text = (EXTENSION / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Active Learning"\)', text)
    assert "add_subdirectory(LabelLoop)" in text
    assert "find_package(Slicer REQUIRED)" in text


def test_module_declares_the_active_learning_category():
    tree = ast.parse((MODULE / "LabelLoop.py").read_text(encoding="utf-8"))
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"LabelLoop", "LabelLoopWidget", "LabelLoopLogic", "LabelLoopTest"} <= classes
    assert 'self.parent.categories = ["Active Learning"]' in (MODULE / "LabelLoop.py").read_text(encoding="utf-8")


def test_no_machine_specific_paths():
    for path in [*PY_FILES, UI, MODULE / "CMakeLists.txt", EXTENSION / "CMakeLists.txt"]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(/root/|/home/\w+|/work/|C:\\\\Users)", text), path

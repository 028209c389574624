"""The fast cases of scripts/torture.py (FAST): each is a defect a hostile user or a fault found
in some command or the Python API (a wrong result with exit 0, a lost file, a half-erased
pipeline, a traceback), run on the tiny model; every case must hold."""

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "torture.py")
spec = importlib.util.spec_from_file_location("torture", SCRIPT)
torture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torture)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny models and artifacts the cases share, made once for the module."""
    return torture.World(str(tmp_path_factory.mktemp("torture")))


@pytest.mark.parametrize("name", torture.FAST)
def test_case_holds(world, tmp_path, name):
    try:
        torture.CASES[name](world, str(tmp_path))
    except torture.Defect as defect:
        pytest.fail(f"{name}: {defect}")

"""The version lives in one core module and equals the package metadata's."""

import re
from pathlib import Path

import cachefit
from cachefit.version import __version__


def test_version_module_is_the_package_version():
    assert cachefit.__version__ == __version__
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.exists():
        declared = re.search(r'^version = "([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M).group(1)
        assert declared == __version__

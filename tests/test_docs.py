"""The Python example in docs/quickstart.md runs as written."""

import os
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_quickstart_python_example_runs(tmp_path):
    code = re.findall(r"```python\n(.*?)```", (DOCS / "quickstart.md").read_text(), re.S)
    assert code
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in code:
            exec(compile(block, "quickstart.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert (tmp_path / "plan.json").exists()


def test_api_doc_names_every_public_name():
    import cachefit

    text = (DOCS / "api.md").read_text()
    missing = [n for n in cachefit.__all__ if n != "__version__" and f"cachefit.{n}" not in text]
    assert not missing, f"docs/api.md lacks {missing}"


def test_cli_reference_is_up_to_date():
    from cachefit.cli import cli_reference

    assert (DOCS / "cli.md").read_text() == cli_reference(), "regenerate: cachefit cli-reference > docs/cli.md"

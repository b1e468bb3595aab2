"""cachefit's version, in a module of its own at the bottom of the layers.

Plans, reports and provenance record it; they import it from here rather than from the package face
(``cachefit/__init__.py`` sits above every module, so importing from it would run against the flow).
Keep it equal to ``version`` in pyproject.toml (a test checks).
"""

__version__ = "0.1.0"

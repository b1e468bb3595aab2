"""Markdown documents that several writers share: each owns one section between its own markers."""

from __future__ import annotations

import os

from cachefit.files import write_text_atomic


def replace_section(path: str | os.PathLike[str], section: str, *, start: str, end: str,
                    title: str | None = None) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into the markdown file.

    An existing ``start`` ... ``end`` span is replaced and everything around it kept; otherwise the
    section is appended, under ``title`` when given. A missing file starts as ``# Benchmarks``.
    The file is replaced whole or not at all (:func:`cachefit.files.write_text_atomic`).
    """
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    body = section.rstrip("\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{title}\n\n" if title else "") + body + "\n"
    write_text_atomic(path, text, what="markdown file")

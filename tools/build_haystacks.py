#!/usr/bin/env python
"""Snapshot the demo model's real-prose haystacks into bench/haystack_data/ (gzip text, one sentence per line).

Why a snapshot: the text ships with Python itself, but it changes between Python versions; the training recipe
and the accuracy figures must not. Both sources are the Python documentation (PSF License, which permits
redistribution; see bench/haystack_data/README.md):

- ``pydoc`` (training): the language-reference topics of ``pydoc_data.topics``;
- ``stdlib`` (held out: training never reads it): docstrings of standard-library modules, classes and functions.

Only prose is kept: indented blocks (code, tables) are dropped, whitespace is collapsed, and paragraphs are split into
sentences. Rerunning this on Python 3.11.7 reproduces the committed files byte for byte (in a fresh interpreter:
what a module exposes depends on what was imported before).
"""
from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "bench" / "haystack_data"

# Held-out modules: well-documented, pure-Python, present on every CPython build.
STDLIB_MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "email.message",
    "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html", "http.client", "http.cookies", "http.server", "imaplib", "inspect", "ipaddress",
    "json", "locale", "logging", "logging.handlers", "mailbox", "mimetypes", "multiprocessing", "netrc",
    "numbers", "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "queue", "quopri", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zipimport",
]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def prose_sentences(text: str) -> list[str]:
    """Sentences of the prose paragraphs of a reStructuredText-ish block: indented lines (code, tables, literal
    blocks), lines of markup and paragraphs that read like code are dropped."""
    sentences = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or lines[0].startswith((" ", "\t")) or lines[0].lstrip().startswith((">>>", "..", "*", "-", "=")):
            continue
        flat = " ".join(ln.strip() for ln in lines)
        flat = re.sub(r"\s+", " ", flat).strip()
        letters = sum(c.isalpha() or c == " " for c in flat)
        if len(flat) < 40 or letters < 0.85 * len(flat) or not flat.endswith((".", "!", "?")):
            continue
        for s in _SENTENCE_END.split(flat):
            s = s.strip()
            if 20 <= len(s) <= 400 and s[0].isupper() and s.endswith((".", "!", "?")):
                sentences.append(s)
    return sentences


def pydoc_text() -> list[str]:
    from pydoc_data.topics import topics
    return [s for key in sorted(topics) for s in prose_sentences(topics[key])]


def stdlib_text() -> list[str]:
    out, seen = [], set()
    warnings.simplefilter("ignore")
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for s in prose_sentences(doc):
                if s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def write(out: Path, name: str, sentences: list[str]) -> Path:
    path = out / f"{name}.txt.gz"
    data = ("\n".join(sentences) + "\n").encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(data)
    print(f"{path}: {len(sentences)} sentences, {len(data)} bytes of text, {path.stat().st_size} gzipped")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = p.parse_args(argv)
    if sys.version_info[:2] != (3, 11):
        print(f"note: the committed snapshot was made with Python 3.11.7; this is {sys.version.split()[0]}")
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out, "pydoc", pydoc_text())
    write(args.out, "stdlib", stdlib_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

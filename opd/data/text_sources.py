"""Real offline text: the Python stdlib sources and the Python docs, as training prompts.

The walkers (shared with `opd.data.text_corpus`, which uses the same text as answers) are
deterministic (sorted files, source order inside a file) and give stable ids:

* `stdlib_functions()`: every function and method (found with `ast`) in the `*.py` files of the
  running interpreter's stdlib (`sysconfig.get_paths()["stdlib"]`; always present), minus
  `test/`, `idlelib/`, `lib2to3/` and `site-packages/`. Id: `stdlib:<relative path>:<qualname>`
  (+ `#k` for the k-th repeat of a qualname in one file). Ids are stable for a given Python
  version; the text follows the stdlib.
* `pydocs_paragraphs()`: prose paragraphs of the Python documentation's reST sources
  (`/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`, Debian package `python3.11-doc`), with
  the section heading above each. Directives, code blocks, tables and headings are dropped,
  inline roles are reduced to their text. When the folder is absent a warning is logged and
  there are none.

Prompt sources built on them:

* `stdlib_code_prompts()`: each function becomes one prompt of one kind, picked by a hash of its
  id: "explain" (explain what the function does), "docstring" (write a docstring; the function's
  own docstring is removed from the shown code) or "tests" (write unit tests).
* `pydocs_prompts()`: each kept paragraph becomes a "summarize" or "explain" prompt (hash-picked).
  Id: `pydocs:<relative path>:<k>` (k-th kept paragraph of that file).

Records have the shape of `opd.data.assets.load_prompt_set` records: `id` (str), `turns`
(one user turn), plus `source`, `path`, `kind` and (stdlib) `qualname`.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
import textwrap
from typing import Iterator, NamedTuple

from absl import logging

DEFAULT_PYDOCS_ROOT = "/usr/share/doc/python3.11/html/_sources"
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})

CODE_TEMPLATES = {
    "explain": "Explain what this Python function does:\n```python\n{code}\n```",
    "docstring": "Write a docstring for this Python function:\n```python\n{code}\n```",
    "tests": "Write unit tests with pytest for this Python function:\n```python\n{code}\n```",
}
DOC_TEMPLATES = {
    "summarize": "Summarize this passage from the Python documentation:\n\n{text}",
    "explain": "Explain this passage from the Python documentation in simpler terms:\n\n{text}",
}

_MAX_FILE_BYTES = 1 << 20


def _pick(uid: str, kinds) -> str:
    kinds = sorted(kinds)
    h = int.from_bytes(hashlib.sha256(uid.encode("utf-8")).digest()[:8], "big")
    return kinds[h % len(kinds)]


def stdlib_root() -> str:
    """The running interpreter's stdlib folder."""
    return sysconfig.get_paths()["stdlib"]


def _sorted_files(root: str, suffix: str, excluded=frozenset()) -> list[str]:
    """Relative paths (with '/') of the files under `root` ending in `suffix`, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded]
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            if f.endswith(suffix):
                rel = f if rel_dir == "." else os.path.join(rel_dir, f)
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    """(qualname, node) of every function in source order (pre-order, nested included)."""

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                yield qual, child
                yield from visit(child, f"{qual}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def function_source(lines: list[str], node, strip_docstring: bool = False) -> str | None:
    """The dedented source of a function node (decorators included) from its file's lines;
    with `strip_docstring`, without its docstring (None when nothing else would be left)."""
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    end = node.end_lineno
    body = node.body
    has_doc = (
        body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )
    keep = list(range(start, end))
    if strip_docstring and has_doc:
        doc = body[0]
        if doc.lineno == node.lineno or len(body) == 1:
            return None  # one-liner or docstring-only function: nothing left to document
        drop = set(range(doc.lineno - 1, doc.end_lineno))
        keep = [i for i in keep if i not in drop]
    return textwrap.dedent("".join(lines[i] for i in keep)).rstrip()


class StdlibFunction(NamedTuple):
    """One function of `stdlib_functions`: its id, file, qualified name, the file's lines and the
    `ast` node (its source: `function_source(lines, node)`)."""

    id: str
    path: str
    qualname: str
    lines: list
    node: ast.AST


def stdlib_functions(root: str | None = None, *, max_files: int | None = None) -> Iterator[StdlibFunction]:
    """Every function of the stdlib `*.py` files in deterministic order (see the module docstring).

    Args:
      root: folder of `*.py` files; default the running interpreter's stdlib.
      max_files: read at most this many files (in sorted order).
    """
    root = root or stdlib_root()
    files = _sorted_files(root, ".py", STDLIB_EXCLUDED_DIRS)
    for rel in files if max_files is None else files[:max_files]:
        path = os.path.join(root, rel)
        try:
            if os.path.getsize(path) > _MAX_FILE_BYTES:
                continue
            with open(path, encoding="utf-8") as f:
                src = f.read()
            tree = ast.parse(src, filename=rel)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a few stdlib files are templates or in other encodings
        lines = src.splitlines(keepends=True)
        seen: dict[str, int] = {}
        for qual, node in _functions(tree):
            seen[qual] = seen.get(qual, 0) + 1
            uid = f"stdlib:{rel}:{qual}" + (f"#{seen[qual]}" if seen[qual] > 1 else "")
            yield StdlibFunction(uid, rel, qual, lines, node)


def stdlib_code_prompts(
    root: str | None = None,
    *,
    max_prompts: int | None = None,
    max_files: int | None = None,
    min_lines: int = 4,
    max_lines: int = 60,
    max_chars: int = 2500,
) -> list[dict]:
    """Instruction prompts about functions of the Python stdlib (see the module docstring).

    Args:
      root: folder of `*.py` files; default the running interpreter's stdlib.
      max_prompts: stop after this many prompts (the first ones in deterministic order).
      max_files: read at most this many files (in sorted order).
      min_lines, max_lines, max_chars: size limits on the shown function source.
    """
    records: list[dict] = []
    for fn in stdlib_functions(root, max_files=max_files):
        kind = _pick(fn.id, CODE_TEMPLATES)
        code = function_source(fn.lines, fn.node, strip_docstring=kind == "docstring")
        if code is None:
            continue
        n_lines = code.count("\n") + 1
        if not (min_lines <= n_lines <= max_lines) or len(code) > max_chars:
            continue
        records.append({
            "id": fn.id,
            "turns": [CODE_TEMPLATES[kind].format(code=code)],
            "source": "stdlib_code",
            "path": fn.path,
            "qualname": fn.qualname,
            "kind": kind,
        })
        if max_prompts is not None and len(records) >= max_prompts:
            return records
    return records


# ----------------------------------------------------------------------------- reST docs

_ROLE = re.compile(r":[\w:.+-]+:`(?:[^`<]*<)?~?([^`>]+)>?`")  # :func:`~a.b` / :ref:`text <target>`
_LITERAL = re.compile(r"``([^`]+)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")
_EMPH = re.compile(r"(?<![\w*])\*\*?([^*\s][^*]*?)\*\*?(?![\w*])")
_HEADING = re.compile(r"^([=\-~^\"'*+#`:._])\1{2,}\s*$")
_BULLET = re.compile(r"^\s*([-*+•]|\d+\.|#\.)\s")


def _clean_inline(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"`\1`", text)
    text = _EMPH.sub(r"\1", text)
    return " ".join(text.split())


def _prose_paragraphs(rst: str) -> Iterator[tuple[str, str]]:
    """(section, paragraph) of one reST file's prose paragraphs (unindented blocks that are not
    markup); section: the text of the latest heading above it ("" before the first)."""
    block: list[str] = []
    section = ""
    for line in rst.splitlines() + [""]:
        if line.strip():
            block.append(line)
            continue
        if block:
            first = block[0]
            if any(_HEADING.match(l) for l in block):
                title = _clean_inline(" ".join(l.strip() for l in block if not _HEADING.match(l)))
                section = title or section  # a bare line of punctuation is a transition, not a heading
            elif (
                not first[:1].isspace()
                and not first.startswith((".. ", "..\t", "|", "+-", "=="))
                and not any(l[:1].isspace() for l in block)  # definition lists, code, options
                and not _BULLET.match(first)
                and not block[-1].rstrip().endswith("::")  # introduces a code block
            ):
                yield section, _clean_inline(" ".join(l.strip() for l in block))
            block = []


class DocParagraph(NamedTuple):
    """One prose paragraph of `pydocs_paragraphs`: its file, index among that file's prose
    paragraphs, section heading and text."""

    path: str
    index: int
    section: str
    text: str


def pydocs_missing(root: str | None = None) -> str:
    """Why the Python docs reST sources at `root` (default `DEFAULT_PYDOCS_ROOT`) cannot be read,
    with the fix; "" when they are there."""
    root = root or DEFAULT_PYDOCS_ROOT
    if os.path.isdir(root):
        return ""
    return f"Python docs reST sources not found at {root} (install them with `apt-get install python3.11-doc`)"


def pydocs_paragraphs(root: str | None = None, what: str = "pydocs prompts") -> Iterator[DocParagraph]:
    """Every prose paragraph of the Python docs' reST sources, in deterministic order.

    Args:
      root: the `_sources` folder of an HTML build of the Python docs (`*.rst.txt` files);
        default `DEFAULT_PYDOCS_ROOT`.
      what: what is skipped when `root` does not exist (for the logged warning).
    """
    root = root or DEFAULT_PYDOCS_ROOT
    if missing := pydocs_missing(root):
        logging.warning("%s: %s skipped", missing, what)
        return
    for rel in _sorted_files(root, ".rst.txt"):
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                rst = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        for i, (section, para) in enumerate(_prose_paragraphs(rst)):
            yield DocParagraph(rel, i, section, para)


def pydocs_prompts(
    root: str | None = None,
    *,
    max_prompts: int | None = None,
    min_chars: int = 200,
    max_chars: int = 1500,
) -> list[dict]:
    """Summarize / explain prompts from the Python docs' reST sources (see the module docstring).

    Args:
      root: the `_sources` folder of an HTML build of the Python docs (`*.rst.txt` files);
        default `DEFAULT_PYDOCS_ROOT`.
      max_prompts: stop after this many prompts (the first ones in deterministic order).
      min_chars, max_chars: length limits on a paragraph after markup removal.

    Returns:
      The prompt records; `[]` (with a logged warning) when `root` does not exist.
    """
    records: list[dict] = []
    kept: dict[str, int] = {}  # file -> paragraphs kept so far
    for p in pydocs_paragraphs(root):
        if not min_chars <= len(p.text) <= max_chars:
            continue
        k = kept.get(p.path, 0)
        kept[p.path] = k + 1
        uid = f"pydocs:{p.path}:{k}"
        kind = _pick(uid, DOC_TEMPLATES)
        records.append({
            "id": uid,
            "turns": [DOC_TEMPLATES[kind].format(text=p.text)],
            "source": "pydocs",
            "path": p.path,
            "kind": kind,
        })
        if max_prompts is not None and len(records) >= max_prompts:
            return records
    return records

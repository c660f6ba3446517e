"""Every file, module and section the docs and docstrings cite exists in the repository.

Scanned: README.md, ARCHITECTURE.md, PROTOCOL.md, BENCHMARKS.md, the comments of
``scripts/*.sh`` and every docstring (module, class, function) under ``covspec/`` and
``tests/``. A citation is:

- a path: ``covspec/...``, ``tests/...``, ``scripts/...``, ``benchmarks/...``, a path
  relative to ``covspec/`` (``runtime_edge/kv.py``) or to the citing file's folder, a
  file name alone (``session.py``, ``PROTOCOL.md``); a path that climbs out of the
  repository never exists. ``NAME``, ``X`` and ``N`` stand for any name
  (``covspec/cli/bench_X_cmd.py``). What commands build under ``artifacts/`` is never
  committed and not checked; ``benchmarks/`` (where benches write their results) is
  checked in the Markdown docs, which show committed results, not in docstrings, which
  say where a command writes;
- a module: ``covspec.a.b`` must be a package or module, and a name after the module
  (``covspec.a.b.thing``) must occur in it;
- a section: a Markdown file's name, a comma and a heading in double quotes must name
  a heading of that file (or the start of one, before a parenthesis: BENCHMARKS.md's
  headings end with their command); inside a Markdown file, ``see`` and a heading in
  double quotes must name a heading of that file.

This module's own docstring describes citations without making any, so it is not scanned.
"""

import ast
import fnmatch
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SELF = "tests/test_citations.py"
DOCS = ["README.md", "ARCHITECTURE.md", "PROTOCOL.md", "BENCHMARKS.md"]
PLACEHOLDERS = {"NAME", "X", "N"}

PATH = re.compile(r"(?<![\w/.~:-])((?:\.\./)+[\w./-]*|[A-Za-z_][\w.-]*(?:/[\w.*-]+)+/?)")
FILE_NAME = re.compile(r"(?<![\w/.-])([\w-]+\.(?:py|sh)|[A-Z][A-Z_]*\.md)\b")
MODULE = re.compile(r"(?<![\w.])covspec(?:\.\w+)+")
SECTION = re.compile(r"\b([A-Z][A-Z_]*\.md),? \"([^\"]+)\"")
OWN_SECTION = re.compile(r"\bsee \"([^\"]+)\"")
BUILT = ("artifacts/",)          # built by commands, never committed
WRITTEN = ("benchmarks/",)       # where the benches write: committed results, checked where the docs show them


def tracked() -> list[str]:
    """The repository's files as git knows them (the untracked ones it does not ignore too)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [name for name in listed if (ROOT / name).exists()]


FILES = tracked()
FOLDERS = {str(parent) for name in FILES for parent in pathlib.PurePosixPath(name).parents if str(parent) != "."}
ROOTS = {name.split("/")[0] for name in FILES} | {name for name in FOLDERS if "/" not in name} | {".."}
PACKAGES = {path.split("/")[1] for path in FOLDERS if path.startswith("covspec/") and path.count("/") == 1}
BASENAMES = {pathlib.PurePosixPath(name).name for name in FILES}


def _pattern(path: str) -> str:
    return "/".join("*" if part in PLACEHOLDERS else re.sub(r"(?<![A-Za-z])(NAME|X|N)(?![A-Za-z])", "*", part)
                    for part in path.split("/"))


def _exists(path: str) -> bool:
    pattern = _pattern(path.rstrip("/"))
    return any(fnmatch.fnmatchcase(name, pattern) for name in FILES) or \
        any(fnmatch.fnmatchcase(name, pattern) for name in FOLDERS)


def _plain(heading: str) -> str:
    return " ".join(heading.replace("`", "").split())


def headings(doc: str) -> set[str]:
    path = ROOT / doc
    if not path.exists():
        return set()
    return {_plain(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def _has_section(doc: str, heading: str) -> bool:
    wanted = _plain(heading)
    return any(h == wanted or h.startswith(wanted + " (") for h in headings(doc))


def _path_problem(path: str, citing: str) -> str | None:
    path = path.rstrip(".,;:")
    if path.startswith(BUILT) or (path.startswith(WRITTEN) and citing.endswith(".py")):
        return None
    first = path.split("/")[0]
    if first not in ROOTS and first not in PACKAGES:
        return None                                      # not a repository path (a unit, a ratio, a URL)
    if path.startswith("../"):
        return f"{path}: outside the repository"
    folder = str(pathlib.PurePosixPath(citing).parent)
    candidates = [path, f"covspec/{path}", f"{folder}/{path}"]
    return None if any(_exists(c) for c in candidates) else f"{path}: no such file or folder"


def _module_problem(dotted: str) -> str | None:
    parts = dotted.split(".")
    path = ROOT / "covspec"
    for i, part in enumerate(parts[1:], start=1):
        if (path / part).is_dir() and (path / part / "__init__.py").exists():
            path = path / part
            continue
        if (path / f"{part}.py").exists():
            path = path / f"{part}.py"
            rest = parts[i + 1:]
            break
        source = path / "__init__.py"
        rest = parts[i:]
        path = source
        break
    else:
        return None
    if rest and not re.search(rf"\b{re.escape(rest[0])}\b", path.read_text()):
        return f"{dotted}: {'.'.join(parts[:len(parts) - len(rest)])} has no {rest[0]}"
    return None


def broken_citations(text: str, citing: str) -> list[str]:
    """What ``text`` (from the file ``citing``, relative to the repository) cites that does not exist."""
    problems = []
    for match in PATH.finditer(text):
        problems.append(_path_problem(match.group(1), citing))
    for match in FILE_NAME.finditer(text):
        name = match.group(1)
        if name not in BASENAMES and not any(fnmatch.fnmatchcase(b, _pattern(name)) for b in BASENAMES):
            problems.append(f"{name}: no such file")
    for match in MODULE.finditer(text):
        problems.append(_module_problem(match.group(0).rstrip(".")))
    for doc, heading in SECTION.findall(text):
        if not _has_section(doc, heading):
            problems.append(f'{doc}, "{heading}": no such section')
    if citing.endswith(".md"):
        for heading in OWN_SECTION.findall(text):
            if not _has_section(citing, heading):
                problems.append(f'see "{heading}": no such section in {citing}')
    return [p for p in problems if p]


def docstrings(path: pathlib.Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n".join(doc for doc in (ast.get_docstring(n, clean=False) for n in nodes) if doc)


def cited_texts() -> list[tuple[str, str]]:
    texts = [(doc, (ROOT / doc).read_text()) for doc in DOCS]
    texts += [(name, "\n".join(line for line in (ROOT / name).read_text().splitlines() if line.lstrip().startswith("#")))
              for name in FILES if name.startswith("scripts/") and name.endswith(".sh")]
    texts += [(name, docstrings(ROOT / name)) for name in FILES
              if name.endswith(".py") and name.split("/")[0] in ("covspec", "tests") and name != SELF]
    return texts


@pytest.mark.parametrize("citing, text", cited_texts(), ids=lambda value: value if "\n" not in value else "")
def test_every_citation_exists(citing, text):
    assert broken_citations(text, citing) == []


def test_the_architecture_and_protocol_exist_with_their_sections():
    assert {"Processes", "Packages and layers", "A round, mode by mode", "Invariants", "Where a change lands",
            "The deployment regime"} <= headings("ARCHITECTURE.md")
    assert "Why edge-led sampling is lossless" in headings("PROTOCOL.md")


def test_a_missing_file_module_or_section_is_caught():
    text = ('See covspec/runtime_edge/no_such.py, runtime_edge/kv.py, ../shared/DESIGN.md and DESIGN.md; '
            'covspec.bench.device_llamacpp and covspec.runtime_edge.session.Session; '
            'ARCHITECTURE.md, "Invariants", BENCHMARKS.md, "Toy world" and ARCHITECTURE.md, "No such section"; '
            'see "Nowhere".')
    problems = broken_citations(text, "covspec/runtime_edge/example.md")
    assert problems == ["covspec/runtime_edge/no_such.py: no such file or folder",
                        "../shared/DESIGN.md: outside the repository",
                        "DESIGN.md: no such file",
                        "covspec.bench.device_llamacpp: covspec.bench has no device_llamacpp",
                        'ARCHITECTURE.md, "No such section": no such section',
                        'see "Nowhere": no such section in covspec/runtime_edge/example.md']

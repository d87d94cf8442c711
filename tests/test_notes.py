"""Comments that cannot drift: every NOTE is defined once and every cited one
exists, and every file a comment names is in the repository.

A NOTE is defined by a line that holds only `NOTE [name]` (after the
comment marker, the docstring quotes or a markdown heading's hashes),
followed by its text; any other
`NOTE [name]` is a citation. A cited file is a path with a directory and an
extension (`fasttricks/ops/rounding.py`, `csrc/host/plans.h`); it is looked
up from the repository root, from `fasttricks/` (the package's own
relative names) and from `csrc/include/` (the C++ include paths).
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A copy of tests/ run against an installed package (the GPU check) has no sources to read.
pytestmark = pytest.mark.skipif(not (ROOT / "csrc").is_dir(), reason="needs the source checkout")
SOURCES = [p for pattern in ("fasttricks/**/*.py", "csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.cuh",
                             "tests/*.py", "bench/*.py", "docs/*.md", "README.md", "setup.py")
           for p in sorted(ROOT.glob(pattern))]
NOTE = re.compile(r"NOTE \[([^\]]+)\]")
DEFINITION = re.compile(r'^\s*(?:#+|//|"""|/\*)?\s*NOTE \[([^\]]+)\]\s*$')
# Our own top-level folders, and the package's and csrc/include's relative names;
# not #include lines, torch's files or the demo's output.
OURS = ("fasttricks", "csrc", "tests", "bench", "docs", "ops", "optim", "sampling", "kernels", "models", "cpu", "cuda")
CITED_FILE = re.compile(r"(?<![\w/.])((?:%s)/(?:[\w.-]+/)*[\w.-]+\.(?:py|h|cpp|cu|cuh|md|toml|json))\b" % "|".join(OURS))
LOOKUP = (ROOT, ROOT / "fasttricks", ROOT / "csrc" / "include")


CITED_WITH_FILE = re.compile(r"NOTE \[([^\]]+)\],?\s*(?:in\s+|\()`?([\w./-]+\.(?:py|h|cpp|cu|cuh|md))")


def _scan():
    defined, cited, files, placed = {}, {}, [], []
    for path in SOURCES:
        if path.name == "test_notes.py":
            continue
        rel = path.relative_to(ROOT)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{rel}:{n}"
            match = DEFINITION.match(line)
            if match:
                defined.setdefault(match.group(1), []).append(where)
                continue
            for name in NOTE.findall(line):
                cited.setdefault(name, []).append(where)
            if not line.lstrip().startswith("#include"):
                files += [(f, where) for f in CITED_FILE.findall(line)]
        # Citations wrapped over lines: the comment markers and line breaks read as spaces.
        flat = re.sub(r"\n\s*(?:#:?|//|\*)?\s*", " ", path.read_text(encoding="utf-8"))
        placed += [(name, f, str(rel)) for name, f in CITED_WITH_FILE.findall(flat)]
    return defined, cited, files, placed


def test_each_note_is_defined_once():
    defined, _, _, _ = _scan()
    twice = {name: wheres for name, wheres in defined.items() if len(wheres) > 1}
    assert not twice, f"NOTEs defined more than once: {twice}"


def test_each_cited_note_is_defined():
    defined, cited, _, _ = _scan()
    missing = {name: wheres for name, wheres in cited.items() if name not in defined}
    assert not missing, f"NOTEs cited but never defined: {missing}"


def test_each_cited_file_exists():
    _, _, files, _ = _scan()
    missing = [(f, where) for f, where in files
               if not any((base / f).exists() for base in LOOKUP) and not f.startswith(("bench/results/", "http"))]
    assert not missing, f"comments name files that do not exist: {missing}"


def test_each_note_is_cited_where_it_is_defined():
    """`NOTE [x] in some/file.py` (or `NOTE [x] (some/file.py)`) names the file that defines x."""
    defined, _, _, placed = _scan()
    wrong = [(name, f, where, defined[name][0]) for name, f, where in placed
             if name in defined and not defined[name][0].split(":")[0].endswith(f.lstrip("./"))]
    assert not wrong, f"NOTEs cited in a file that does not define them (name, cited file, where, defined at): {wrong}"


def _first_sentence(path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    return text


def test_the_rooms_say_their_job_where_the_architecture_does():
    """docs/architecture.md's "Rooms" names every module of optim/, ops/ and
    sampling/ with its job, and that sentence is the module's first paragraph."""
    listed = dict(re.findall(r"^- `(fasttricks/[\w/]+\.py)`: (.+)$", (ROOT / "docs" / "architecture.md").read_text(),
                             re.M))
    modules = [p for d in ("optim", "ops", "sampling") for p in sorted((ROOT / "fasttricks" / d).glob("*.py"))
               if p.name != "__init__.py"]
    missing = [str(p.relative_to(ROOT)) for p in modules if str(p.relative_to(ROOT)) not in listed]
    assert not missing, f"modules docs/architecture.md does not list: {missing}"
    differ = {name: (job, _first_sentence(ROOT / name)) for name, job in listed.items()
              if _first_sentence(ROOT / name) != job}
    assert not differ, f"docs/architecture.md and the module's first paragraph differ: {differ}"


def test_the_scanner_tells_definitions_from_citations():
    assert DEFINITION.match("// NOTE [tensor table]") and DEFINITION.match('"""NOTE [compiled step]')
    assert DEFINITION.match("NOTE [plan cache]") and DEFINITION.match("# NOTE [DTensor shards]")
    assert DEFINITION.match("## NOTE [pointer table]")
    assert not DEFINITION.match("# NOTE [sparse grads]: the family steps") and not DEFINITION.match(
        "    (NOTE [plan cache] in fasttricks/optim/_plan_cache.py)")
    assert CITED_FILE.findall("see csrc/host/plans.h and fasttricks/ops/rounding.py.") == \
        ["csrc/host/plans.h", "fasttricks/ops/rounding.py"]

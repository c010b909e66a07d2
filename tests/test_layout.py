"""The shape of the source tree (docs/DESIGN.md, "Source tree"): a few modules at the top of the
package and the rest in layers, short functions, comments without tracker references, and the
patch-grid formula and the norm epsilon defined once in Python and once in C++."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "srntt_core"

MAX_TOP_MODULES = 6
MAX_FUNCTION_LINES = 80
# Functions still longer than MAX_FUNCTION_LINES, each being split on another branch. An entry
# must name a function that is still too long (test_long_function_allow_list_is_current), so the
# list empties as they are split.
LONG_FUNCTIONS_ALLOWED: set[tuple[str, str]] = set()

PYTHON_DIRS = ("srntt_core", "kernels", "scripts", "benchmarks")
CODE_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh"}
SKIP_DIRS = {".venv", "build", "out", "__pycache__", ".git", "results"}


def _files(*tops: str, suffixes=CODE_SUFFIXES) -> list[Path]:
    out = []
    for top in tops:
        base = ROOT / top
        paths = [base] if base.is_file() else base.rglob("*")
        out += [p for p in paths if p.is_file() and p.suffix in suffixes
                and not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(out)


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    return any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in fn.decorator_list)


def _long_functions() -> dict[tuple[str, str], int]:
    found = {}
    for path in _files(*PYTHON_DIRS, suffixes={".py"}):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found[(path.relative_to(ROOT).as_posix(), node.name)] = lines
    return found


def test_few_modules_at_the_top_of_the_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules directly in srntt_core/: {top}"
    for layer in ("ops", "models", "cli", "compat"):
        assert (PACKAGE / layer / "__init__.py").is_file(), f"srntt_core/{layer} is not a package"


def test_no_long_functions():
    """No Python function outside the Triton kernels (@triton.jit) is longer than 80 lines."""
    long = {k: n for k, n in _long_functions().items() if k not in LONG_FUNCTIONS_ALLOWED}
    assert not long, "functions longer than 80 lines: " + ", ".join(
        f"{path}:{name} ({n} lines)" for (path, name), n in sorted(long.items()))


def test_long_function_allow_list_is_current():
    stale = LONG_FUNCTIONS_ALLOWED - set(_long_functions())
    assert not stale, f"no longer too long (remove from LONG_FUNCTIONS_ALLOWED): {sorted(stale)}"


def test_code_names_no_tracker_issues():
    """Code explains itself: no "issue <N>" references (the reasons belong in the comment)."""
    pattern = re.compile(r"\bissues?\s*#?\d", re.IGNORECASE)
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in _files("srntt_core", "kernels", "csrc", "scripts", "benchmarks", "tests", "setup.py")
            + [ROOT / "Makefile"]
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


# Where each fact is defined: Python, C++ (every CPU and CUDA kernel and binding). Docstrings and
# comments may state them.
FACT_HOMES = {"srntt_core/ops/geometry.py", "csrc/srntt_geometry.h"}
FACTS = {
    # the grid formula written out: (size + 2 * padding - patch_size) // stride + 1 and its C++ twin
    "grid formula": re.compile(r"\+\s*2\s*\*\s*\w+\s*-\s*\w+\s*\)\s*//?\s*\w+\s*\+\s*1\b"),
    # the norm epsilon given a value
    "norm epsilon": re.compile(r"\b\w*eps\w*\s*=\s*1e-12\b", re.IGNORECASE),
}


def _code_lines(path: Path) -> list[str]:
    """The lines of ``path`` with comments (and, in Python, string literals) blanked out."""
    text = path.read_text()
    if path.suffix != ".py":
        return [line.split("//")[0] if "//" in line else line for line in text.splitlines()]
    lines = text.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            (r0, c0), (r1, c1) = tok.start, tok.end
            for r in range(r0, r1 + 1):
                lo = c0 if r == r0 else 0
                hi = c1 if r == r1 else len(lines[r - 1])
                lines[r - 1] = lines[r - 1][:lo] + " " * (hi - lo) + lines[r - 1][hi:]
    return lines


@pytest.mark.parametrize("fact", sorted(FACTS))
def test_geometry_facts_defined_once(fact):
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in _files("srntt_core", "kernels", "csrc", "scripts", "benchmarks", "setup.py")
            if path.relative_to(ROOT).as_posix() not in FACT_HOMES
            for i, line in enumerate(_code_lines(path), 1) if FACTS[fact].search(line)]
    assert not hits, f"{fact} defined outside {sorted(FACT_HOMES)}:\n" + "\n".join(hits)
    for home in FACT_HOMES:
        assert FACTS[fact].search((ROOT / home).read_text()), f"{home} does not define the {fact}"

"""House rules that a machine can check: ruff's lint rules pass, llmconv's modules import
each other without cycles (counting imports inside functions too: a lazy import that closes a
cycle is still a cycle a reader has to untangle), and no module or function grows past what a
reader takes in at once."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "llmconv"


def module_imports(pkg_dir: Path) -> dict[str, set[str]]:
    """Each llmconv module -> the llmconv modules it imports (anywhere in its body)."""
    mods = {}
    for p in pkg_dir.rglob("*.py"):
        parts = p.relative_to(pkg_dir.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = {f"{target}.{a.name}" for a in node.names} & mods.keys()
                # `from . import x` names a submodule, not the package's __init__
                graph[m] |= subs or ({target} & mods.keys())
        graph[m].discard(m)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# "path" or "path:function" -> why it cannot be split. Keep this short.
LONG_ALLOWED: dict[str, str] = {}


def too_long(pkg_dir: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES lines and functions (methods, nested functions) whose body,
    docstring included, is over MAX_FUNCTION_LINES. The signature is not counted: the formatter
    puts each parameter of a long one on its own line (api.convert's 27 options), lines that
    declare names rather than hold steps a reader has to follow."""
    out = []
    for p in sorted(pkg_dir.rglob("*.py")):
        rel = p.relative_to(pkg_dir.parent).as_posix()
        text = p.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES and rel not in LONG_ALLOWED:
            out.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text, str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.body[0].lineno + 1
                if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_ALLOWED:
                    out.append(f"{rel}:{node.name}: {n} lines")
    return out


def test_no_long_modules_or_functions():
    assert too_long(PKG) == []


def test_the_length_check_can_fail(tmp_path):
    pkg = tmp_path / "llmconv"
    pkg.mkdir()
    (pkg / "long.py").write_text(
        "def f():\n" + "    x = 1\n" * (MAX_FUNCTION_LINES + 1) + "\n" * (MAX_MODULE_LINES - 61)
    )
    signature = "def g(\n" + "    a,\n" * 40 + "):\n"
    (pkg / "fine.py").write_text(signature + '    """Doc."""\n' + "    x = 1\n" * (MAX_FUNCTION_LINES - 1))
    assert too_long(pkg) == [
        f"llmconv/long.py: {MAX_MODULE_LINES + 1} lines",
        f"llmconv/long.py:f: {MAX_FUNCTION_LINES + 1} lines",
    ]


def test_no_import_cycles():
    assert import_cycles(module_imports(PKG)) == []


def test_the_cycle_check_can_fail(tmp_path):
    pkg = tmp_path / "llmconv"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    assert import_cycles(module_imports(pkg)) == [["llmconv.a", "llmconv.sub.b"]]


def modules_importing_test_modules(tests_dir: Path) -> list[str]:
    """Test modules that import another test module (shared helpers belong in a plain module,
    such as mix_util.py or verify_util.py, or in conftest.py): importing a test module runs its
    module-level setup and makes pytest collect its tests twice under another name."""
    found = []
    for path in sorted(tests_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            found += [f"{path.name} imports {n}" for n in names if n.split(".")[-1].startswith("test_")]
    return found


def test_no_test_module_imports_another():
    assert modules_importing_test_modules(ROOT / "tests") == []


def test_the_test_import_check_can_fail(tmp_path):
    (tmp_path / "test_a.py").write_text("def helper():\n    pass\n")
    (tmp_path / "test_b.py").write_text("def test_x():\n    from test_a import helper\n")
    (tmp_path / "test_c.py").write_text("import tests.test_a\nimport mix_util\n")
    assert modules_importing_test_modules(tmp_path) == ["test_b.py imports test_a", "test_c.py imports tests.test_a"]


def test_llmconv_testing_is_light_and_apart():
    """`import llmconv` does not bring llmconv.testing, and importing llmconv.testing brings none
    of the heavy libraries (its modules import their own when they are imported)."""
    probe = (
        "import sys, llmconv; a = sorted(m for m in sys.modules if m.startswith('llmconv.testing')); "
        "import llmconv.testing; print(a, sorted(m for m in ('torch', 'numpy', 'hypothesis', 'gguf', 'llama_cpp') "
        "if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.strip() == "[] []", res.stdout + res.stderr


def benches_reaching_into_tests(bench_dir: Path) -> list[str]:
    """bench/ scripts that put tests/ on sys.path or import a test module: what tests and
    benches share lives in llmconv/testing/. A sys.path change is flagged when a string in it,
    or in an assignment of a name it uses, names the tests directory."""
    found = []
    for path in sorted(bench_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        strings_of = {}  # module-level name -> the strings its value is built from (and its names')
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                strings_of[node.targets[0].id] = _strings(node.value, strings_of)
        for node in ast.walk(tree):
            if _is_sys_path_change(node) and any("tests" in s.split("/") for s in _strings(node, strings_of)):
                found.append(f"{path.name}:{node.lineno} puts tests/ on sys.path")
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[-1].startswith("test_")]
    return found


def _strings(node: ast.AST, strings_of: dict[str, set[str]]) -> set[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            out.add(n.value)
        elif isinstance(n, ast.Name):
            out |= strings_of.get(n.id, set())
    return out


def _is_sys_path_change(node: ast.AST) -> bool:
    """sys.path.insert/append/extend(...), or an assignment to sys.path or a slice of it."""

    def is_sys_path(e):
        e = e.value if isinstance(e, ast.Subscript) else e
        return (
            isinstance(e, ast.Attribute) and e.attr == "path" and isinstance(e.value, ast.Name) and e.value.id == "sys"
        )

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("insert", "append", "extend") and is_sys_path(node.func.value)
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        return any(is_sys_path(t) for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
    return False


def test_no_bench_reaches_into_tests():
    assert benches_reaching_into_tests(ROOT / "bench") == []


def test_the_bench_check_can_fail(tmp_path):
    (tmp_path / "a.py").write_text(
        "import sys\nfrom pathlib import Path\nROOT = Path(__file__).parents[1]\n"
        "sys.path.insert(0, str(ROOT / 'bench'))\nsys.path.append(str(ROOT / 'tests'))\n"
    )
    (tmp_path / "b.py").write_text(
        "import sys\nTESTS = '/src/llmconv/tests'\nHERE = TESTS\n"
        "sys.path[:0] = [HERE]\nimport test_fuzz as F\nfrom llmconv.testing import fuzz_gguf\n"
    )
    (tmp_path / "c.py").write_text("import sys\nsys.path.insert(0, 'bench')\nimport tests_util\n")
    assert benches_reaching_into_tests(tmp_path) == [
        "a.py:5 puts tests/ on sys.path",
        "b.py:4 puts tests/ on sys.path",
        "b.py:5 imports test_fuzz",
    ]


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
    reason="ruff is not installed (it is in the test extra)",
)
def test_ruff_lint_passes():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run(
        [ruff, "check", "--no-cache", "llmconv", "tests", "bench", "fixtures"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
    reason="ruff is not installed (it is in the test extra)",
)
def test_ruff_format_is_applied():
    """`ruff format` (settings in pyproject.toml) leaves every file as it is."""
    assert _ruff_format_check(ROOT, "llmconv", "tests", "bench", "fixtures") == ""


def _ruff_format_check(cwd: Path, *paths: str) -> str:
    """The files `ruff format --check` would change ("" if none), with the repository's settings."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    res = subprocess.run(
        [ruff, "format", "--check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), *paths],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert res.returncode in (0, 1), res.stdout + res.stderr  # 2: ruff itself failed
    return "" if res.returncode == 0 else res.stdout + res.stderr


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
    reason="ruff is not installed (it is in the test extra)",
)
def test_the_format_check_can_fail(tmp_path):
    (tmp_path / "fine.py").write_text('x = {"a": 1}\n')
    (tmp_path / "unformatted.py").write_text("x = {  'a':1 }\n")
    found = _ruff_format_check(tmp_path, ".")
    assert "unformatted.py" in found and "fine.py" not in found


def test_a_missing_outside_oracle_skips_with_a_reason(tmp_path):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_oracle.py").write_text(
        "import sys\n\n"
        "def test_needs_llama_cpp():\n"
        "    sys.modules['llama_cpp'] = None      # as if it were not installed\n"
        "    import llama_cpp  # noqa: F401\n\n"
        "def test_other_import_errors_still_fail():\n"
        "    import surely_not_a_module_here  # noqa: F401\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "1 failed, 1 skipped" in res.stdout, res.stdout
    assert "needs llama_cpp" in res.stdout

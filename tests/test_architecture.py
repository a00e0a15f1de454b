"""The import graph of stackgan/, read from the source with ``ast`` (imports inside functions
included): the metrics registry is the ground floor of its package, no module reaches into
another's private names, and no modules import each other in a circle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stackgan"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if node.level == 0:
        return node.module or ""
    pkg = module.split(".")
    if MODULES[module].name != "__init__.py":
        pkg = pkg[:-1]
    pkg = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, ast.AST]]:
    """(imported stackgan module, name taken from it or None, node) for every import in ``module``."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node) for a in node.names if a.name.split(".")[0] == "stackgan"]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            if base.split(".")[0] != "stackgan":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node) if sub in MODULES else (base, a.name, node))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}


def test_the_parser_sees_what_it_must():
    """The checks below can fail: the graph holds the edges and names they look for."""
    g = graph()
    assert "stackgan.metrics.core" in g["stackgan.metrics.scores"]
    assert "stackgan.metrics.judges.base" in g["stackgan.metrics.judges.species"]  # relative, in a subpackage
    in_function = {(t, n) for t, n, _ in imports("stackgan.monitor")}  # monitor imports it in a function
    assert ("stackgan.metrics", "compute") in in_function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _private_uses("stackgan.metrics.core", "from stackgan.metrics.scores import _x\n") == [
        "stackgan.metrics.core:1 uses stackgan.metrics.scores._x"]


def test_metrics_core_imports_no_other_metrics_module():
    own = {t for t, _, _ in imports("stackgan.metrics.core") if t.startswith("stackgan.metrics")}
    assert own == set(), f"stackgan/metrics/core.py imports {sorted(own)}"
    # and importing it loads none of them (the built-in metric modules load on first use of the registry)
    code = ("import sys, stackgan.metrics.core; "
            "print(sorted(m for m in sys.modules if m.startswith('stackgan.metrics')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['stackgan.metrics', 'stackgan.metrics.core']", out.stdout


def _private_uses(module: str, source: str | None = None) -> list[str]:
    """``from x import _name`` and ``x._name`` on an imported stackgan module ``x``, in ``module``."""
    tree = ast.parse(source if source is not None else MODULES[module].read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _base(module, node)
            if base.split(".")[0] != "stackgan":
                continue
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif a.name.startswith("_") and not a.name.startswith("__") and base != module:
                    found.append(f"{module}:{node.lineno} uses {base}.{a.name}")
        elif isinstance(node, ast.Import):
            aliases |= {a.asname: a.name for a in node.names if a.asname and a.name.startswith("stackgan.")}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    found = [f for m in MODULES for f in _private_uses(m)]
    assert found == [], "\n".join(found)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_within_stackgan():
    assert _cycles(graph()) == []


def test_a_ddp_step_does_not_import_deepspeed():
    """DeepSpeed is imported only by runs that use it: its import takes seconds per process,
    and ``Accelerator.unwrap_model`` would pay it on every DDP step's first unwrap."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: nothing could import it")
    code = (
        "import sys, torch\n"
        "from stackgan.backends import make_backend\n"
        "from stackgan.bench.cases import build_models, case_config, tiny_case\n"
        "from stackgan.step import Batch, gan_step\n"
        "case = tiny_case(1)\n"
        "cfg = case_config(case)\n"
        "acc = make_backend(cfg)\n"
        "G, D = build_models(case, 'cpu')\n"
        "opt_g, opt_d = (torch.optim.Adam(m.parameters()) for m in (G, D))\n"
        "G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)\n"
        "b = 4\n"
        "batch = Batch(real=torch.zeros(b, 3, 64, 64), emb=torch.zeros(b, case.text),\n"
        "              z=torch.zeros(b, case.z),\n"
        "              wrong=torch.arange(b).flip(0), cls=torch.arange(b))\n"
        "gan_step(acc, G, D, opt_g, opt_d, batch, cfg)\n"
        "print('deepspeed' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "False", "a DDP step imported DeepSpeed"

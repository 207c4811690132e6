"""Imports flow downward only (parallel < models < megalysses runtime < tools), and everything lives under
the one installed name `megalysses`."""
import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDER = {"parallel": 0, "models": 1, "megalysses": 2, "tools": 3}


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, [node.module]


def test_imports_flow_downward_and_use_the_installed_name():
    bad = []
    for folder, level in ORDER.items():
        for path in (ROOT / folder).rglob("*.py"):
            for line, names in _imports(path):
                for name in names:
                    parts = name.split(".")
                    if parts[0] in ("models", "parallel", "tools"):
                        bad.append(f"{path.relative_to(ROOT)}:{line} imports bare '{name}'")
                    if parts[0] == "megalysses" and len(parts) > 1 and parts[1] in ORDER:
                        if ORDER[parts[1]] > level:
                            bad.append(f"{path.relative_to(ROOT)}:{line} imports '{name}' upward")
    assert not bad, "\n".join(bad)


def test_one_installed_namespace(tmp_path):
    """From outside the checkout, the folders import as megalysses.* and never as bare top-level names."""
    probe = (
        "import importlib.util as u, pathlib\n"
        "for n in ('megalysses.models', 'megalysses.parallel', 'megalysses.tools'):\n"
        "    print(n, pathlib.Path(u.find_spec(n).origin).parent.name)\n"
        "for n in ('models', 'parallel', 'tools'):\n"
        "    s = u.find_spec(n)\n"
        "    print(n, 'absent' if s is None else s.origin)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["megalysses.models"] == "models" and lines["megalysses.parallel"] == "parallel"
    assert lines["megalysses.tools"] == "tools"
    for bare in ("models", "parallel", "tools"):
        assert lines[bare] == "absent" or str(ROOT) not in lines[bare], f"bare '{bare}' importable: {lines[bare]}"

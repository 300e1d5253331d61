"""Static tools follow the kernels/ -> promptcore.kernels and export/ -> promptcore.export mapping: mypy,
configured in pyproject.toml ([tool.mypy] mypy_path = ".typecheck"), resolves and reads both folders."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent
LINKS = ROOT / ".typecheck" / "promptcore"

# Names that exist only in the mapped folders: mypy must see their real signatures, not Any.
PROGRAM = """
import promptcore.kernels as kernels
from promptcore.export.onnx_export import to_onnx
reveal_type(kernels.cosine_logits)
reveal_type(to_onnx)
"""


def _mypy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # --follow-imports=silent: only the program's own errors count; the cache keeps reruns fast
    cmd = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(ROOT / ".mypy_cache"), *args]
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _package_dirs() -> dict:
    text = (ROOT / "pyproject.toml").read_text()
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.M).group(1)
    return dict(re.findall(r'"([\w.]+)"\s*=\s*"([\w./]+)"', line))


def test_links_mirror_the_package_dir_mapping():
    mapped = {name: folder for name, folder in _package_dirs().items() if name.startswith("promptcore.")}
    assert mapped == {"promptcore.kernels": "kernels", "promptcore.export": "export"}
    for name, folder in mapped.items():
        link = LINKS / name.split(".", 1)[1]
        assert link.is_symlink(), f"{link} must be a link to {folder}/ (see the README's layout section)"
        assert link.resolve() == (ROOT / folder).resolve()


def test_mypy_resolves_the_mapped_packages():
    result = _mypy("-c", PROGRAM)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    revealed = re.findall(r'Revealed type is "(.*)"', out)
    assert len(revealed) == 2 and all(t.startswith("def (") for t in revealed), out


def test_without_the_mapping_mypy_cannot_find_them(tmp_path):
    # the check above can fail: the same program with no mypy_path is what static tools saw before
    (tmp_path / "mypy.ini").write_text("[mypy]\nignore_missing_imports = False\n")
    result = _mypy("--config-file", str(tmp_path / "mypy.ini"), "-c", PROGRAM)
    assert result.returncode != 0
    assert 'module named "promptcore.kernels"' in result.stdout

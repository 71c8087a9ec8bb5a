"""The wheel built from this checkout, installed into a fresh virtual environment (no editable finder, not
run from the source tree), imports every module of the source tree and compiles a small model."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow    # builds and installs a wheel: `make test` runs it, `make check` does not

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"sparsecc": ROOT / "sparsecc", "sparsecc.passes": ROOT / "passes", "sparsecc.runtimes": ROOT / "runtimes"}

_IN_VENV = """
import importlib, json, sys, torch
import sparsecc
from sparsecc.tooling.synthetic import attach_with_prune, fanin_masks

names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
assert sparsecc.__file__.startswith(sys.argv[2]), sparsecc.__file__
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
attach_with_prune(model, fanin_masks(model, 0.75))
x = torch.randn(3, 32)
for backend in ("reference", "tvm"):
    compiled = sparsecc.compile(model, (x,), backend=backend)
    assert compiled.report.rewrites == {"condensed_linear": 2}, compiled.report.rewrites
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
print("imported", len(names), "modules; compiled on reference and tvm")
"""


def _source_modules() -> list[str]:
    names = []
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            names.append(".".join((package, *parts)))
    return names


def test_installed_wheel_imports_every_module_and_compiles(tmp_path):
    import json

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(wheels.glob("sparsecc-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The dependencies come from this environment's site-packages as a plain path entry: its .pth files (the
    # editable finder among them) are not run, so `sparsecc` can only come from the wheel.
    deps = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    Path(purelib, "deps.pth").write_text("\n".join(deps) + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = _source_modules()
    assert "sparsecc.runtimes.onnxruntime.writer" in names and "sparsecc.runtimes.tvm.runtime" in names
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), "-c", _IN_VENV, json.dumps(names), purelib], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"imported {len(names)} modules" in done.stdout


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_every_source_folder_is_a_package(package):
    """find_packages only finds folders with an __init__.py: a folder of modules without one would be left out."""
    for folder in [SOURCES[package], *(p for p in SOURCES[package].rglob("*") if p.is_dir())]:
        if any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder} has modules but no __init__.py"

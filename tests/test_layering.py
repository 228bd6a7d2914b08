"""The core is plain Python: importing every pipeline module pulls in neither Ray nor Prefect."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pipeline


def test_core_modules_import_neither_ray_nor_prefect():
    modules = sorted(m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline."))
    assert "pipeline.execution" in modules and "pipeline.shard" in modules
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
    code += "print(sorted(n for n in ('ray', 'prefect') if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""numpy's unused subpackages are placeholders until used (nbdqcow/cli/numpy_extras.py):
a command line that scans metadata does not import them, and code that uses them
still gets the real thing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nbdqcow.qcow2.create import Qcow2Options, create_qcow2

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, timeout=60)


def test_placeholders_load_the_real_subpackages() -> None:
    out = _python(
        "from nbdqcow.cli.numpy_extras import defer\n"
        "defer()\n"
        "import sys, numpy as np\n"
        "assert type(sys.modules['numpy.random']).__name__ == '_Deferred'\n"
        "assert 'numpy.random.mtrand' not in sys.modules\n"
        "assert 0 <= np.random.default_rng(1).integers(5) < 5\n"
        "assert np.ma.masked_array([1, 2], mask=[0, 1]).sum() == 1\n"
        "assert abs(np.fft.fft([1.0, 0.0])[1] - 1) < 1e-9\n"
        "assert np.polynomial.Polynomial([1, 2])(2) == 5\n"
        "from numpy.ctypeslib import as_array\n"
        "from numpy.random import Generator\n"
        "assert np.random is sys.modules['numpy.random']\n"
        "print('ok')\n")
    assert out.stdout.strip() == "ok", out.stderr


def test_defer_after_numpy_changes_nothing() -> None:
    out = _python(
        "import sys, numpy\n"
        "from nbdqcow.cli.numpy_extras import defer\n"
        "defer()\n"
        "print(type(sys.modules['numpy.random']).__name__)\n")
    assert out.stdout.strip() == "module", out.stderr


def test_check_imports_no_numpy_extras(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    create_qcow2(str(img), 1 << 20, Qcow2Options())
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "nbdqcow", "check",
                          str(img)], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0, out.stderr
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "numpy" in imported
    assert not {"numpy.random.mtrand", "numpy.ma.core", "numpy.fft._pocketfft",
                "numpy.polynomial.polynomial"} & imported

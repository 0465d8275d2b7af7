"""The package's import-time check: beside a torch other than the one it was built against,
`import scaletrain` fails with a message naming both versions (instead of undefined symbols or a
crash inside the native module). The wheel itself is checked by `make test-wheel`."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_other_torch_is_named(tmp_path):
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text('__version__ = "2.99.0+cpu"\n')
    built = (ROOT / "python/scaletrain/_build.py").read_text()
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT / 'python'}")
    proc = subprocess.run([sys.executable, "-c", "import scaletrain"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "ImportError: scaletrain was built against torch" in proc.stderr, proc.stderr
    assert "this environment has torch 2.99.0+cpu" in proc.stderr, proc.stderr
    version = built.split('TORCH_VERSION = "')[1].split('"')[0]
    assert f"built against torch {version}" in proc.stderr

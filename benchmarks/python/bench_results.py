"""The JSON result file of every benchmark script (the shape of BENCHMARKS.md): device, torch,
commit, date and command, then the script's own fields and rows; written to a temporary file and
renamed, so a run cut short never leaves half a file."""

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def commit():
    """SCALETRAIN_COMMIT when set (a copied tree whose git HEAD is stale), else git's short HEAD."""
    return os.environ.get("SCALETRAIN_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip() or "unknown"


def write_results(path, device, **fields):
    result = {"device": device, "torch": torch.__version__, "commit": commit(), "date": date.today().isoformat(),
              "command": " ".join(["python"] + sys.argv), **fields}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)

"""The diffusion extra stays optional: importing preftune and building its command line does
not import diffusers (this file runs with or without the extra installed)."""

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).parents[1] / "src")


def test_import_and_cli_do_not_import_diffusers():
    code = ("import sys, preftune, preftune.cli; preftune.cli.build_parser(); "
            "import preftune.diffusion.losses, preftune.diffusion.config, preftune.diffusion.data; "
            "print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": SRC, "PATH": ""})
    assert out.stdout.strip() == "False"

"""The diffusion extra stays optional: importing preftune, its API and building its command
line does not import diffusers, and without it the diffusion functions and commands say what to
install (this file runs with or without the extra installed)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).parents[1] / "src")


def test_import_and_cli_do_not_import_diffusers():
    code = ("import sys, preftune, preftune.api, preftune.cli; preftune.cli.build_parser(); "
            "import preftune.diffusion.losses, preftune.diffusion.config, preftune.diffusion.data; "
            "print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": SRC, "PATH": ""})
    assert out.stdout.strip() == "False"


def test_without_diffusers_the_api_and_commands_say_what_to_install(tmp_path, monkeypatch,
                                                                     capsys):
    from preftune import api
    from preftune.cli import main

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    install = "needs diffusers: pip install 'preftune[diffusion]'"
    with pytest.raises(api.ConfigError, match=re.escape(f"preftune diffusion train {install}")):
        api.train_diffusion({"model": {"path": str(tmp_path)}, "data": {"train": "pairs.jsonl"}})
    with pytest.raises(api.ConfigError, match=re.escape(f"preftune diffusion eval {install}")):
        api.evaluate_diffusion(str(tmp_path), str(tmp_path), ["a red circle"], "shape_colour")
    assert main(["diffusion", "demo", "--quick", "--output-dir", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err == f"error: preftune diffusion demo {install}\n"
    assert not (tmp_path / "demo").exists()

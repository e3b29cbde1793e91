"""The floors in pyproject.toml are the versions scripts/oldest_versions.sh installs and tests."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# huggingface-hub, tqdm: at what transformers 5.18 itself requires (at or above these floors);
# setuptools: the build's; pytest, hypothesis: the tests' own tools; vllm: CUDA only, and the
# script runs on CPU machines
NOT_PINNED = {"setuptools", "huggingface-hub", "tqdm", "hypothesis", "pytest", "vllm"}


def _name(name: str) -> str:
    return name.lower().replace("_", "-")


def test_every_floor_is_the_version_the_oldest_versions_script_tests():
    pyproject = (ROOT / "pyproject.toml").read_text()
    floors: dict[str, set] = {}
    for name, floor in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)', pyproject):
        floors.setdefault(_name(name), set()).add(floor)
    script = (ROOT / "scripts" / "oldest_versions.sh").read_text()
    pins = {_name(name): pinned
            for name, pinned in re.findall(r'"([A-Za-z0-9_.-]+)==([0-9.]+)"', script)}
    assert {"torch", "transformers", "accelerate", "peft"} <= set(pins)
    assert {name: floor for name, floor in floors.items() if name not in NOT_PINNED} == \
        {name: {pins.get(name)} for name in floors if name not in NOT_PINNED}


def test_a_package_below_its_floor_stops_a_command_saying_how_to_upgrade(monkeypatch, capsys):
    from importlib.metadata import PackageNotFoundError

    from preftune import versions
    from preftune.cli import main

    monkeypatch.setattr(versions, "requires", lambda name: [
        "torch>=2.9.0", "transformers>=5.13.1", "gguf>=0.10.0", 'peft>=0.19.1; extra == "lora"'])
    installed = {"torch": "2.9.0+cu128", "transformers": "4.57.1", "peft": "0.13.0"}

    def version(name):
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(versions, "version", version)
    assert main(["objectives"]) == 2
    assert capsys.readouterr().err == (
        "error: transformers 4.57.1 (preftune needs >=5.13.1); gguf is not installed (preftune "
        "needs >=0.10.0). Upgrade: pip install -U 'transformers>=5.13.1' 'gguf>=0.10.0'\n")
    installed.update(transformers="5.13.1", gguf="0.10.0")
    assert versions.below_floors() is None


def test_this_environment_meets_the_floors():
    from preftune.versions import below_floors

    assert below_floors() is None

"""The floors in pyproject.toml are the versions scripts/oldest_versions.sh installs and tests."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# at what transformers 5.13 itself requires (above these floors), or not in the tested paths
NOT_PINNED = {"setuptools", "huggingface-hub", "tqdm", "datasets", "hypothesis", "pytest",
              "tensorboard", "mlflow-skinny", "jsonschema", "wandb", "pillow", "diffusers",
              "deepspeed", "vllm"}


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

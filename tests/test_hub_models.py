"""``model.path`` as a Hugging Face Hub id: the model's snapshot in the local HF cache is what
every part of preftune loads (run here offline, from a cache laid out as the Hub leaves it),
and an id that cannot be fetched is a one-line error naming it."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from safetensors.torch import load_file

from preftune.model.load import PICKLE_WEIGHTS, files_fingerprint, resolve_model_dir
from preftune.train.model_card import front_matter
from tiny_models import yes_no_workspace

REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model and its pairs, and an HF cache holding the same model as ``REPO``."""
    root = yes_no_workspace(tmp_path_factory.mktemp("hub"), with_config=True)
    folder = root / "hub" / "models--tiny-org--tiny-llama"
    snapshot = folder / "snapshots" / "0123abcd"
    shutil.copytree(root / "model", snapshot)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    return root, snapshot


def _preftune(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hub"),
           "PREFTUNE_CACHE": str(root / "preftune-cache")}
    return subprocess.run([sys.executable, "-m", "preftune", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_a_cached_hub_id_trains_like_its_directory(workspace):
    root, snapshot = workspace
    by_id = _preftune(root, "train", str(root / "config.yaml"), "--set", f"model.path={REPO}",
                      "--set", f"output_dir={root / 'by_id'}")
    assert by_id.returncode == 0, by_id.stderr[-3000:]
    by_dir = _preftune(root, "train", str(root / "config.yaml"), "--set",
                       f"model.path={snapshot}", "--set", f"output_dir={root / 'by_dir'}")
    assert by_dir.returncode == 0, by_dir.stderr[-3000:]
    weights = [load_file(root / run / "model" / "model.safetensors") for run in ("by_id", "by_dir")]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][name] == weights[1][name]).all() for name in weights[0])
    card = front_matter((root / "by_id" / "model" / "README.md").read_text())
    # the card names the Hub id and takes the license from the cached model's own card
    assert (card["base_model"], card["license"]) == (REPO, "apache-2.0")


def test_an_id_that_cannot_be_fetched_is_one_clear_error(workspace):
    root, _ = workspace
    result = _preftune(root, "train", str(root / "config.yaml"), "--set",
                       "model.path=nobody/no-such-model", "--set", f"output_dir={root / 'none'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: model.path: 'nobody/no-such-model' is not a local model "
                            "directory or .gguf file, and fetching it as a Hugging Face Hub "
                            "model failed (")
    assert "`hf download nobody/no-such-model`" in error


def test_a_download_asks_for_pickled_weights_only_when_allowed(workspace, monkeypatch):
    _, snapshot = workspace
    asked = []

    def download(repo_id, allow_patterns, ignore_patterns):
        asked.append((allow_patterns, ignore_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model_dir(REPO) == str(snapshot)
    assert resolve_model_dir(REPO, allow_pickle=True) == str(snapshot)
    (safe, skipped), (pickled, _) = asked
    assert "*.safetensors" in safe and "*.json" in safe
    assert not set(PICKLE_WEIGHTS) & set(safe) and set(PICKLE_WEIGHTS) <= set(pickled)
    # what the Hub's filter keeps of a Llama-style repository: the top folder's files only
    files = ["config.json", "model.safetensors", "tokenizer.json", "pytorch_model.bin",
             "original/consolidated.00.pth", "original/params.json", "onnx/model.onnx"]
    kept = list(huggingface_hub.utils.filter_repo_objects(files, allow_patterns=safe,
                                                          ignore_patterns=skipped))
    assert kept == ["config.json", "model.safetensors", "tokenizer.json"]
    # the fingerprint of an online round's model hashes the snapshot's weights, not nothing
    assert files_fingerprint(REPO) == files_fingerprint(str(snapshot))
    assert files_fingerprint(REPO) != hashlib.sha256().hexdigest()  # (what no files hash to)

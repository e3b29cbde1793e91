"""``model.path`` as a Hugging Face Hub id: the model's snapshot in the local HF cache is what
every part of preftune loads (run here offline, from a cache laid out as the Hub leaves it),
and an id that cannot be fetched is a one-line error naming it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from safetensors.torch import load_file

from preftune.model.load import files_fingerprint, resolve_model_dir
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


@pytest.mark.slow  # (two trainings in fresh interpreters: `pytest -m slow`)
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


def fake_hub(monkeypatch, root: Path, repository: dict[str, str | bytes]) -> list[list[str]]:
    """``snapshot_download`` over ``repository`` (file name: content), filtered by the Hub
    library's own pattern matching into one snapshot folder; returns each call's file list."""
    calls = []

    def download(repo_id, allow_patterns, ignore_patterns=None):
        kept = list(huggingface_hub.utils.filter_repo_objects(
            sorted(repository), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        calls.append(kept)
        for name in kept:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            content = repository[name]
            content = content if isinstance(content, bytes) else content.encode()
            (root / name).write_bytes(content)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    return calls


def _index(*shards: str) -> str:
    return json.dumps({"weight_map": {f"layer{i}": shard for i, shard in enumerate(shards)}})


def test_a_download_takes_what_from_pretrained_reads_and_no_copies(tmp_path, monkeypatch):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    mistral_like = {"config.json": "{}", "tokenizer.json": "{}", "consolidated.safetensors": "w",
                    "model.safetensors.index.json": _index(*shards, shards[1]),
                    **{shard: "w" for shard in shards}, "original/params.json": "{}",
                    "onnx/model.onnx": "w", "pytorch_model.bin": "w"}
    calls = fake_hub(monkeypatch, tmp_path / "mistral", mistral_like)
    assert resolve_model_dir("org/mistral-like", allow_pickle=True) == str(tmp_path / "mistral")
    # the small files, then the shards the index names; the consolidated copy, subfolders and
    # the pickle (not needed: there are safetensors) stay on the Hub
    assert calls == [["config.json", "model.safetensors.index.json", "tokenizer.json"],
                     ["config.json", *shards, "model.safetensors.index.json", "tokenizer.json"]]
    calls.clear()  # the tokenizer alone (read before the data, the data before the weights)
    resolve_model_dir("org/mistral-like", weights=False)
    assert calls == [["config.json", "model.safetensors.index.json", "tokenizer.json"]]

    pickled_only = {"config.json": "{}", "pytorch_model.bin": "w", "README.md": "card"}
    calls = fake_hub(monkeypatch, tmp_path / "old", pickled_only)
    resolve_model_dir("org/old")
    assert calls[-1] == ["README.md", "config.json"]  # no pickle unless allowed
    resolve_model_dir("org/old", allow_pickle=True)
    assert calls[-1] == ["README.md", "config.json", "pytorch_model.bin"]


def test_an_online_rounds_fingerprint_hashes_the_snapshots_weights(workspace, monkeypatch):
    _, snapshot = workspace
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    assert files_fingerprint(REPO) == files_fingerprint(str(snapshot))
    assert files_fingerprint(REPO) != hashlib.sha256().hexdigest()  # (what no files hash to)

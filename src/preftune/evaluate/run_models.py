"""Which models ``preftune eval`` compares when given a path: the model a run directory
trained (``model/``, or ``adapter/`` without a merged copy) or a model directory itself, and
by default the reference that run trained against."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import ConfigError
from ..model.adapter_dirs import adapter_base, final_model_dir, is_adapter_dir
from ..reward.heads import HEAD_FILE


def model_location(path: str) -> tuple[str, Path | None]:
    """(model dir to load, the run dir it belongs to or None). A run dir holds ``model/`` (or,
    LoRA without a merged copy, ``adapter/``)."""
    local = Path(path)
    if any((where / HEAD_FILE).exists() for where in (local, local / "model")):
        raise ConfigError(f"--model {path}: a reward model ({HEAD_FILE}), which scores "
                          "responses rather than writing them; preftune eval measures a policy. "
                          f"Measure it with `preftune rm eval --model {path} --data PAIRS`.")
    if (local / "run.json").exists() or (local / "model" / "config.json").exists():
        return str(final_model_dir(local)), local
    if (local / "metrics.jsonl").exists() and not (local / "config.json").exists():
        raise FileNotFoundError(f"--model {path}: a run that has not written its model yet "
                                "(no model/ and no run.json: still training, or stopped); finish "
                                "it with the same preftune train command and --resume, then "
                                "evaluate it.")
    if (local / "config.json").exists() or is_adapter_dir(local):
        is_run = any((local.parent / name).exists() for name in ("run.json", "metrics.jsonl"))
        return str(local), local.parent if is_run else None
    return path, None  # "default", a .gguf file or a hub id; load_model_and_tokenizer decides


def run_reference(run_dir: Path | None) -> str:
    """The model a run trained against: its config.yaml's ``reference.model``, else its
    ``model.path`` (the model it started from); the bundled default for a bare model dir."""
    tree = _saved_config(run_dir)
    if tree is None:
        return "default"
    path = ((tree.get("reference") or {}).get("model") or (tree.get("model") or {}).get("path")
            or "default")
    return _where_training_ran(path, run_dir, tree.get("output_dir"))


def run_mask_roles(run_dir: Path | None) -> tuple | None:
    """The roles a run's config.yaml left out of the loss (``data.mask_roles``), when it
    names them: eval scores the tokens the run trained on. None: the default."""
    roles = ((_saved_config(run_dir) or {}).get("data") or {}).get("mask_roles")
    return None if roles is None else tuple(roles)


def _saved_config(run_dir: Path | None) -> dict | None:
    """A run directory's config.yaml as a tree; None for a bare model directory."""
    config = run_dir / "config.yaml" if run_dir is not None else None
    if config is None or not config.is_file():
        return None
    return yaml.safe_load(config.read_text()) or {}


def _where_training_ran(path: str, run_dir: Path, output_dir: str | None) -> str:
    """A relative ``path`` from a run's config.yaml is relative to the directory training ran
    in: the run directory less its relative ``output_dir`` (``/w/runs/dpo`` less
    ``runs/dpo`` is ``/w``). ``path`` itself when it exists from here, when that directory
    cannot be told, or when nothing is there (a hub id, ``default``)."""
    if Path(path).is_absolute() or Path(path).exists() or not output_dir:
        return path
    parts, here = Path(output_dir).parts, run_dir.resolve()
    if Path(output_dir).is_absolute() or (parts and here.parts[-len(parts):] != parts):
        return path
    there = (here.parents[len(parts) - 1] if parts else here) / path
    return str(there) if there.exists() else path


def shared_adapter(run_dir: Path | None, reference: str) -> Path | None:
    """The LoRA adapter a run directory holds when ``reference`` is the base it was trained
    on: the policy is then that base with the adapter and the reference the same model with
    the adapter disabled, as training computed them, one copy of the weights instead of two.
    None otherwise (also when the base's path cannot be matched from here)."""
    adapter = run_dir / "adapter" if run_dir is not None else None
    if adapter is None or not is_adapter_dir(adapter):
        return None
    base = adapter_base(adapter)
    if base == reference:
        return adapter
    if Path(base).exists() and Path(reference).exists() and \
            Path(base).resolve() == Path(reference).resolve():
        return adapter
    return None


def load_models(model_dir: str, run_dir: Path | None, reference: str, tokenizer, dtype: str,
                device):
    """(policy, reference model, a context under which the reference model computes as the
    reference) of ``preftune eval``, on ``device`` in ``dtype``: one model with the run's
    adapter enabled and disabled (``shared_adapter``), or two models."""
    import contextlib

    from ..config import ConfigError
    from ..model.adapter_dirs import with_adapter
    from ..model.load import given_as, load_model, load_model_and_tokenizer

    adapter = shared_adapter(run_dir, reference)
    if adapter is not None:
        with given_as("--reference"):
            base = load_model(reference, tokenizer, dtype, device=device)
        policy = with_adapter(base, str(adapter)).eval()
        print(f"policy and reference: {reference} with {adapter} on and off (one copy of the "
              "weights)")
        return policy, policy, policy.disable_adapter
    with given_as("--model"):
        policy = load_model(model_dir, tokenizer, dtype, device=device)
    with given_as("--reference"):
        other, other_tokenizer = load_model_and_tokenizer(reference, dtype, device=device)
    if other_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"--reference {reference} has another vocabulary than --model "
                          f"{model_dir}; log-prob ratios need the same tokenizer.")
    return policy, other, contextlib.nullcontext

"""The model card (``README.md``, Hugging Face format) written into every saved model directory:
base model, objective and parameters, data files with hashes and counts, final metrics, the
command that made it, and the library versions."""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

import yaml

from ..config import TrainConfig
from ..versions import installed_versions
from .logging import read_metrics

# the bundled model aliases of model.path: their Hugging Face id and license
KNOWN_BASES = {"default": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
               "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
               "all-MiniLM-L6-v2": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")}


def command_line(argv: list[str] | None = None, processes: int = 1,
                 config_run: str = "preftune train CONFIG") -> str:
    """The command this process runs, as a user would type it to train the same run again
    (without --resume or --overwrite); a run of several processes under ``accelerate launch``
    (which its processes' own command lines leave out). A process that is neither preftune's
    command nor a script of the user's (``python -c``, stdin, a notebook kernel, pytest) gives
    ``config_run``: the command that trains the run's saved config."""
    argv = list(sys.argv if argv is None else argv)
    # a run resumed, or started over, trains as the command that started it: that command
    argv = [word for word in argv if word not in ("--resume", "--overwrite")]
    path = Path(argv[0]) if argv else Path("-")
    module = path.name == "__main__.py" and path.parent.name == "preftune"  # python -m preftune
    script = path.suffix == ".py" and path.name != "__main__.py" and not (
        {"site-packages", "dist-packages"} & set(path.parts))  # a script calling the API
    if not (module or script or path.name == "preftune"):
        return config_run
    if processes > 1:
        start = ["accelerate", "launch", "--num_processes", str(processes)]
        return shlex.join(start + ([argv[0]] if script else ["-m", "preftune"]) + argv[1:])
    if module:
        return shlex.join(["python", "-m", "preftune", *argv[1:]])
    if script:
        return shlex.join(["python", argv[0], *argv[1:]])
    return shlex.join([path.name, *argv[1:]])


def sha256(path: str) -> str:
    """SHA-256 of a data file; of a saved dataset directory, of its files' names and bytes."""
    local = Path(path)
    if not local.exists() and ":" in path:  # a saved HF dataset's "dir:split"
        local = Path(path.rsplit(":", 1)[0])
    digest = hashlib.sha256()
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    for file in files:
        if local.is_dir():
            digest.update(str(file.relative_to(local)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def base_model(path: str) -> tuple[str | None, str | None]:
    """(Hugging Face id, license) of ``model.path`` where known: a bundled alias, a hub id, and
    the license a local model directory's own card gives."""
    if path in KNOWN_BASES:
        return KNOWN_BASES[path]
    local = Path(path).expanduser()
    card = local / "README.md" if local.exists() else _cached_hub_card(path)
    meta = front_matter(card.read_text(encoding="utf-8")) if card and card.is_file() else {}
    return (None if local.exists() else path), meta.get("license")


def _cached_hub_card(repo_id: str) -> Path | None:
    """The model card of a Hub model in the local HF cache (where loading it put it)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "README.md")
    except ValueError:  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def front_matter(text: str) -> dict:
    if not text.startswith("---\n"):
        return {}
    try:
        meta = yaml.safe_load(text[4:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def model_card(output_dir: Path, info: dict, kind: str) -> str:
    """The card of the run in ``output_dir`` (its config.yaml, data_report.json, metrics.jsonl)
    for its ``model`` or ``adapter`` directory; ``info`` is the run's run.json."""
    config = yaml.safe_load((output_dir / "config.yaml").read_text())
    report_path = output_dir / "data_report.json"
    data_report = json.loads(report_path.read_text()) if report_path.exists() else {}
    metrics = read_metrics(output_dir / "metrics.jsonl")
    reward = "reward_loss" in info
    method = info["reward_loss"] if reward else info["objective"]
    hub_id, license_name = base_model(config["model"]["path"])
    meta = {**({"base_model": hub_id} if hub_id else {}),
            **({"license": license_name} if license_name else {}),
            "library_name": "peft" if kind == "adapter" else "preftune",
            "pipeline_tag": "text-classification" if reward else {
                "diffusion": "text-to-image", "vision-language": "image-text-to-text"}.get(
                info.get("model_kind"), "text-generation"),
            "tags": ["preftune", "reward-model" if reward else "preference-optimization",
                     *method.split(" + "), *(["lora", "peft"] if kind == "adapter" else [])]}
    what = (f"a reward model ({info['head']['kind']} head) trained with the reward loss "
            f"`{method}`" if reward else f"a policy trained with `{method}`")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {output_dir.resolve().name}", "",
             f"This {'LoRA adapter' if kind == 'adapter' else 'model'} is {what} by preftune "
             f"from `{config['model']['path']}`{f' ({hub_id})' if hub_id else ''}.", "",
             "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in _settings(config, info).items()]
    lines += ["", "## Data", "", "| split | file | sha256 |", "|---|---|---|"]
    data = config["data"]
    for split in ("train", "eval"):
        paths = data.get(split) or []
        for path in [paths] if isinstance(paths, str) else paths:
            lines.append(f"| {split} | `{path}` | `{sha256(path)}` |")
    if data.get("eval_fraction"):
        lines.append(f"| eval | {data['eval_fraction']:g} of train, split off by the seed | |")
    lines.append("")
    converted = data_report.get("convert")
    for split in ("train", "eval"):
        if isinstance(data_report.get(split), dict):
            counts = ", ".join(f"{name} {value}" for name, value in data_report[split].items()
                               if name != "origins")
            made = (f" (made by data.convert {converted['conversions']} from the "
                    f"{converted['read'][split]} read)" if converted else "")
            lines.append(f"- {split} records{made}: {counts}")
    if "skipped_rows" in data_report:
        lines.append(f"- malformed records left out (data.on_error: skip): "
                     f"{data_report['skipped_rows']['count']}")
    lines += ["", "## Results", ""] + _results(metrics)
    processes = info.get("processes") or 1
    command = {"diffusion": ["diffusion", "train"],
               "step-aware preference model": ["diffusion", "spm"]}.get(
        info.get("model_kind"), ["rm", "train"] if reward else ["train"])
    saved = shlex.join(["preftune", *command, str(output_dir / "config.yaml")])
    lines += ["", "## Reproduce", "", "```bash", command_line(processes=processes,
                                                           config_run=saved), "```", "",
              *([f"It ran on {processes} processes ({info.get('engine') or 'launched'}); add "
                 "the run's accelerate config (--config_file) for its machines.", ""]
                if processes > 1 else []),
              "The full resolved config is the run's `config.yaml`:", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False).strip(), "```", "",
              ", ".join(f"{name} {v}" for name, v in installed_versions().items()) + "."]
    return "\n".join(lines) + "\n"


def _settings(config: dict, info: dict) -> dict:
    """What trained the model: method parameters, reference, layout, optimizer settings."""
    train, data, reward = config["train"], config["data"], "reward_loss" in info
    return {"parameters": json.dumps(info.get("params", {})),
            **({"head": json.dumps(info["head"])} if reward
               else {"reference": reference_text(info)}),
            "layout": info.get("layout"), "dtype": info.get("dtype"),
            "optimizer steps": info.get("steps"), "processes": info.get("processes"),
            "device": info.get("device"), "learning rate": train["learning_rate"],
            "batch size x accumulation (per process)":
                f"{train['batch_size']} x {train['gradient_accumulation_steps']}",
            "schedule, warmup": f"{train['schedule']}, {train['warmup_ratio']}",
            "optimizer": _optimizer(train),
            "seed": train["seed"],
            **({"max length (prompt)": f"{data['max_length']} ({data['max_prompt_length']})"}
               if "max_length" in data else {"image resolution": data.get("resolution")}),
            **({"LoRA": json.dumps(config["model"]["lora"])}
               if config["model"].get("lora") else {}),
            **({"quantized base (QLoRA)": config["model"]["quantize"]}
               if config["model"].get("quantize") else {}),
            **({"trained weights": json.dumps(part)} if (part := {
                key: config["model"][key] for key in ("train_layers", "train_params")
                if config["model"].get(key) is not None}) else {})}


def reference_text(info: dict) -> str | None:
    """The reference strategy, and TR-DPO's syncs when the reference moved."""
    sync = info.get("reference_sync")
    return info.get("reference") if sync is None else (
        f"{info['reference']}, moved toward the policy every {sync['every']} steps "
        f"(mix {sync['mix']}, TR-DPO)")


def _optimizer(train: dict) -> str:
    """The optimizer and its settings (a config written before a key existed: its default)."""
    defaults = TrainConfig()
    setting = {key: train.get(key, getattr(defaults, key)) for key in (
        "optimizer", "adam_betas", "adam_epsilon", "weight_decay", "optimizer_in_backward")}
    return (f"{setting['optimizer']}, betas {setting['adam_betas']}, eps "
            f"{setting['adam_epsilon']:g}, weight decay {setting['weight_decay']:g}"
            + (", in backward" if setting["optimizer_in_backward"] else ""))


def _results(metrics: list[dict]) -> list[str]:
    """The last logged training record and the last evaluation, as a table."""
    if not metrics:
        return ["No metrics were logged."]
    last = metrics[-1]
    evaluated = [record for record in metrics if any(k.startswith("eval/") for k in record)]
    rows = [f"| train (step {last['step']}) | {name} | {value:.6g} |" for name, value in
            last.items() if isinstance(value, (int, float)) and name != "step"
            and not name.startswith("eval/")]
    if evaluated:
        final = evaluated[-1]
        rows += [f"| eval (step {final['step']}) | {name[5:]} | {value:.6g} |"
                 for name, value in final.items() if name.startswith("eval/")]
    return ["| when | metric | value |", "|---|---|---|", *rows]


def _cell(value) -> str:
    return str(value).replace("|", "\\|")


def write_model_cards(output_dir: Path, info: dict) -> list[Path]:
    """``README.md`` in each saved model directory of the run (``model/``, ``adapter/``)."""
    written = []
    for kind in ("model", "adapter"):
        directory = output_dir / kind
        if directory.is_dir():
            (directory / "README.md").write_text(model_card(output_dir, info, kind),
                                                 encoding="utf-8")
            written.append(directory / "README.md")
    return written

"""``preftune compare`` on a diffusion config: each diffusion objective trains from the same
pipeline, data, budget and seed (only ``objective`` changes, with its paper's defaults), then
samples the config's fixed ``samples.prompts`` x ``samples.seeds`` against the untrained
pipeline under one image scorer (``preftune diffusion eval``). An entry that finished with the
same settings is not trained again, so an interrupted comparison resumes."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from . import require_diffusers
from .pipeline_files import DENOISER_FOLDERS


def is_diffusion_config(tree: dict, objectives: list[str]) -> bool:
    """A config whose ``model.path`` is a diffusers pipeline, or whose objectives are all
    diffusion objectives."""
    from .losses import DIFFUSION_LOSSES

    path = Path(str((tree.get("model") or {}).get("path") or ""))
    if str(path) and any((path / folder / "config.json").is_file()
                         for folder in DENOISER_FOLDERS):
        return True
    return bool(objectives) and all(name in DIFFUSION_LOSSES for name in objectives)


def compare_diffusion(objectives: list[str], tree: dict, config_path, root: Path,
                      scorer: str | None, plan_only: bool = False,
                      params: dict | None = None) -> Path:
    """Train, evaluate (win rate vs the base pipeline) and report every objective; write the
    leaderboard through the text comparison's writer. ``plan_only``: each one's ``--plan``."""
    from ..compare import _write_leaderboard, data_stamps, plans, run_entry, term, trained
    from .config import DiffusionConfig
    from .evaluate import evaluate_diffusion, image_scorer
    from .losses import get_diffusion_loss
    from .train import train_diffusion

    require_diffusers(f"{config_path} is a diffusion config: comparing diffusion objectives")
    for name in objectives:  # unknown names fail before anything trains
        try:
            get_diffusion_loss(name)
        except KeyError as error:
            raise ConfigError(error.args[0]) from None
    base = DiffusionConfig.from_dict(tree, source=config_path or "the config")
    samples = base.samples
    if not samples.prompts:
        raise ConfigError(f"{config_path}: a diffusion compare scores each objective's samples "
                          "of samples.prompts (x samples.seeds): set samples.prompts.")
    if not scorer:
        raise ConfigError("a diffusion compare needs --scorer: shape_colour (the demo's "
                          "checker) or module:function rating (prompt, PIL image).")
    image_scorer(scorer)  # a scorer that cannot load fails before anything trains

    def tree_of(name: str) -> dict:
        run_tree = json.loads(json.dumps(base.model_dump()))
        run_tree.update(objective=term(name, params or {}), output_dir=str(root / name))
        run_tree["reference"]["strategy"] = "auto"
        return run_tree

    trees = {name: tree_of(name) for name in objectives}
    configs = {name: DiffusionConfig.from_dict(trees[name], source=f"{config_path} with "
                                               f"objective {name}")
               for name in objectives}  # a bad --param stops before anything trains
    if plan_only:
        return plans(objectives, root, configs.get,
                     lambda config: train_diffusion(config, plan_only=True))
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in objectives:
        run_dir = root / name
        run_tree = trees[name]

        def work(entry: dict, name=name, run_dir=run_dir) -> None:
            trained(entry, configs[name], train_diffusion)
            results = evaluate_diffusion(str(run_dir), base.model.path, samples.prompts,
                                         samples.seeds, scorer, samples.steps,
                                         samples.guidance_scale, None, samples.resolution,
                                         samples.negative_prompt, samples.true_cfg_scale,
                                         base.model.dtype, samples.batch_size)
            entry.update({"win_rate": results["win_rate"],
                          "win_rate/policy_score": results["mean_score/policy"],
                          "win_rate/reference_score": results["mean_score/reference"]})
            entry.update(_last_train_metrics(run_dir))

        entries.append(run_entry(name, run_dir, [run_tree, data_stamps(run_tree["data"]),
                                                 scorer], work))
    held_out = (f"{len(samples.prompts)} prompts x {len(samples.seeds)} seeds "
                f"(samples.prompts of {config_path})")
    _write_leaderboard(root, entries, held_out, scorer)
    return root


def _last_train_metrics(run_dir: Path) -> dict:
    """The implicit-reward accuracy and margin of the last logged training step (under their
    own names: not held-out numbers, and in each loss's own units, MaPO's not DPO's)."""
    last = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "rewards/accuracies" in record and "loss" in record:
            last = record
    return {key: last[source] for key, source in (
        ("train/rewards/accuracy", "rewards/accuracies"),
        ("train/rewards/margin", "rewards/margins")) if source in last}

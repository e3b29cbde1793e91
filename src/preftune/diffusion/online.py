"""``preftune diffusion online``: iterative preference training of a denoiser, round after round:
the current model samples every prompt from fresh seeds, scorers rank each prompt's images
(``ranking.py``, Syn-Pic's win shares), and the configured offline objective trains on those
lists (``rank_dpo`` as they are, a pair objective through ``data.convert``, default best vs
worst); the next round starts from the model this round trained, which is also this round's
reference. This is the diffusion counterpart of ``preftune online``'s rounds, built from the same
two commands a user would chain by hand (``diffusion rank``, ``diffusion train``).

Round r samples with seeds ``seed + 1000 (r - 1)`` for each configured seed, so every round sees
new noise; after training, the round's model plays the initial model on the evaluation prompts
(``data.eval``, else the training prompts) under the first scorer, same seeds for both
(``diffusion eval``'s win rate). Each phase is recorded in ``round-r/phases.json``; ``--resume``
skips the phases already done. Launched on several processes, the main one samples, ranks and
evaluates, and all of them train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from ..config import ConfigError, Count, NonNegative, Section
from ..train.output import write_json
from ..model.load import released
from ..online.loop import run_phase, start_rounds
from ..train.run_lock import holding_output_dirs
from ..train.stopping import LATE_STOPS, stop_if_asked
from .config import DiffusionConfig
from .losses import get_diffusion_loss

SEED_STRIDE = 1000  # round r samples seed + SEED_STRIDE * (r - 1)
ONLINE_KEYS = ("model.path", "online.negative_prompt", "online.true_cfg_scale")  # in errors


class DiffusionOnlineSection(Section):
    rounds: Count = 2
    """How many rounds of sample -> rank -> train."""
    scorers: Annotated[list[str], Field(min_length=1)] = ["shape_colour"]
    """Image scorers rating every sample (shape_colour, spm:PATH or module:function(prompt, PIL
    image) -> float); several are averaged as win shares. The first one also judges the
    evaluation."""
    seeds: Annotated[list[int], Field(min_length=2)] = [0, 1, 2, 3]
    """The samples per prompt per round (one per seed; shifted by 1000 each round)."""
    list_size: Annotated[int, Field(ge=2)] | None = None
    """Images per ranked list (default: all of a prompt's samples in one list); a last list
    that would hold one image joins the one before."""
    steps: Count = 25
    """Sampling steps."""
    guidance_scale: NonNegative = 1.0
    """Guidance of the samples (Flux.1-dev: its guidance input)."""
    resolution: Count | None = None
    """Pixels per side of the samples (default: the denoiser's own size)."""
    negative_prompt: str = ""
    """What the samples' classifier-free guidance steers away from (default: the empty
    prompt); Flux: with true_cfg_scale above 1."""
    true_cfg_scale: NonNegative = 1.0
    """Flux only: classifier-free guidance away from negative_prompt (1: none)."""
    eval_seeds: Annotated[list[int], Field(min_length=1)] = [0, 1]
    """Seeds of the evaluation's samples, the same every round."""
    batch_size: Count = 8
    """Images sampled together (for ranking and evaluation; the images do not depend on
    it)."""


class DiffusionOnlineConfig(DiffusionConfig):
    """A ``preftune diffusion online`` run: a ``diffusion train`` config (what each round's
    training does; data.train holds the prompts) plus ``online``."""

    output_dir: str = "runs/diffusion_online"
    """Where round-1/, round-2/ ... and online.json are written."""
    online: DiffusionOnlineSection = DiffusionOnlineSection()
    """The rounds, the sampling and the scorers."""

    @model_validator(mode="before")
    @classmethod
    def _evaluated_by_rounds(cls, tree):
        """Checked before the training config's own checks, which would ask for held-out data
        that an online run does not use that way."""
        train = tree.get("train") if isinstance(tree, dict) else None
        if isinstance(train, dict) and train.get("eval_every"):
            raise ValueError("train.eval_every: each round is evaluated by its win rate over "
                             "the initial model (online.eval_seeds on data.eval's prompts); "
                             "remove it.")
        data = tree.get("data") if isinstance(tree, dict) else None
        if isinstance(data, dict) and data.get("eval_fraction"):
            raise ValueError("data.eval_fraction: an online run samples every training prompt "
                             "and evaluates on data.eval's prompts (else the training ones); "
                             "give held-out prompts with data.eval instead.")
        return tree

    @model_validator(mode="after")
    def _online(self):
        spec = get_diffusion_loss(self.objective.name)
        if spec.online:
            raise ValueError(f"objective {spec.name} samples its own images at every step; "
                             "train it with `preftune diffusion train`, not in rounds.")
        if spec.captions:
            raise ValueError(f"objective {spec.name} needs a caption per image, which sampled "
                             "lists do not have; use diffusion_dpo, mapo, rank_dpo or "
                             "denoising.")
        if set(self.data.fields) - {"prompt"}:
            raise ValueError("data.fields: an online run reads only each record's prompt "
                             "(map it with data.fields.prompt).")
        return self


@holding_output_dirs
def run_diffusion_online(config: DiffusionOnlineConfig, resume: bool = False,
                         overwrite: bool = False, show_progress: bool = True,
                         plan_only: bool = False) -> Path:
    """Every round of ``config`` (what is left of them with ``resume``); returns output_dir.
    ``plan_only`` prints the plan of round 1's training and stops before anything is
    written."""
    from accelerate import Accelerator

    from ..online.loop import has_started

    LATE_STOPS.clear()  # (a signal an earlier run of this process let finish)
    from .evaluate import check_image_scorer
    from .model import pipeline_family
    from .sample import check_negative_prompt

    family = pipeline_family(config.model.path)
    if family is not None:  # settings that would do nothing, before anything is written
        check_negative_prompt(family, config.online.negative_prompt, config.online.guidance_scale,
                              config.online.true_cfg_scale, ONLINE_KEYS[1:])
    for number, spec in enumerate(config.online.scorers):
        try:
            check_image_scorer(spec)
        except ConfigError as error:
            raise ConfigError(f"online.scorers[{number}]: {error}") from None
    column = {"prompt": config.data.fields.get("prompt", "prompt")}  # read before anything
    prompts = _distinct_prompts(config.data.train, column)              # is written
    held_out = _distinct_prompts(config.data.eval, column) if config.data.eval else prompts
    if plan_only:
        from .plan import print_rounds_plan

        print_rounds_plan(config, prompts)
        return Path(config.output_dir)
    state = Accelerator()  # the processes' state, as each round's training sees it
    out = Path(config.output_dir)
    if state.is_main_process:
        out = start_rounds(config, resume, overwrite)
    elif has_started(out) and not (resume or overwrite):  # the same refusal on every process
        raise ConfigError(f"{out} already holds an online run (see the first process).")
    state.wait_for_everyone()
    summary, model = {"initial": None, "rounds": []}, config.model.path
    for r in range(1, config.online.rounds + 1):
        info = run_round(config, r, model, prompts, held_out, show_progress, state)
        summary["rounds"].append(info)
        if "evaluate" in info and summary["initial"] is None:  # the same seeds every round
            summary["initial"] = {"mean_score": info["evaluate"]["mean_score/reference"]}
        if state.is_main_process:
            write_json(out / "online.json", summary)
        model = info["model"]
    return out


def main_phase(state, here: Path, name: str, work) -> dict:
    """``work`` done once, by the main process (recorded in ``phases.json``); every process
    returns the record."""
    if state.is_main_process:
        run_phase(here, name, work)
    state.wait_for_everyone()
    return json.loads((here / "phases.json").read_text())[name]


def every_process_phase(state, here: Path, name: str, work) -> dict:
    """``work`` done by every process together (training: DDP or FSDP2 collectives), once;
    the main process records it."""
    record = here / "phases.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    if name in done:
        return done[name]
    if state.is_main_process:
        run_phase(here, name, work)
    else:
        released(work)
    state.wait_for_everyone()
    return json.loads(record.read_text())[name]


def _distinct_prompts(path: str, column: dict) -> list[str]:
    """Each prompt of a data file once, in file order (a pairs file repeats its prompts; the
    same prompt and seeds would sample the same images again)."""
    from .data import load_pairs

    prompts = [r.prompt for r in load_pairs(path, column, check=False, prompts_only=True)]
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < len(prompts):
        print(f"{path}: {len(prompts)} records, {len(distinct)} distinct prompts (each sampled "
              "once a round)")
    return distinct


def run_round(config: DiffusionOnlineConfig, r: int, model: str, prompts: list[str],
              held_out: list[str], show_progress: bool, state) -> dict:
    """Round ``r`` from ``model``: the main process samples, ranks and evaluates; training
    runs on every process (DDP or FSDP2 when launched with several)."""
    from .evaluate import evaluate_diffusion
    from .ranking import make_ranked_lists
    from .train import train_diffusion

    online, here = config.online, Path(config.output_dir) / f"round-{r}"
    here.mkdir(parents=True, exist_ok=True)
    seeds = [seed + SEED_STRIDE * (r - 1) for seed in online.seeds]
    info = {"round": r, "model_before": model, "seeds": seeds}
    info["rank"] = main_phase(state, here, "rank", lambda: make_ranked_lists(
        prompts, [model], online.scorers, seeds, here / "data", online.steps,
        online.guidance_scale, online.list_size, online.resolution, online.negative_prompt,
        online.true_cfg_scale, ONLINE_KEYS, config.model.dtype, online.batch_size))
    # what `preftune report` shows of a round, under the names of `preftune online`'s
    info["sample"] = {"prompts": len(prompts), "samples": info["rank"]["images"]}
    info["build"] = {"rows": info["rank"]["pairs"], "tied": info["rank"]["lists_all_tied"]}
    if not info["rank"]["pairs"]:
        print(f"round {r}: every list scored its images alike; nothing to train on this round")
        info["train"] = {"skipped": "every list scored its images alike"}
        info["model"] = model
        return info
    tree = round_tree(config, model, info["rank"]["ranked"], here / "train")

    def train():  # a stopped round's training continues from its checkpoint, or starts over
        stopped = any((here / "train" / "checkpoints").glob("step-*"))
        run = train_diffusion(DiffusionConfig.from_dict(tree), resume=stopped,
                              show_progress=show_progress,
                              overwrite=(here / "train").exists() and not stopped)
        logged = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        steps = [row for row in logged if "loss" in row]
        return {"output_dir": str(run), "steps": steps[-1]["step"] if steps else 0,
                "loss": steps[-1]["loss"] if steps else None}

    info["train"] = every_process_phase(state, here, "train", train)
    stop_if_asked(f"after round {r}'s training")  # (every process: each was told)
    info["model"] = str(here / "train" / "model")
    info["evaluate"] = main_phase(state, here, "evaluate", lambda: evaluated(evaluate_diffusion(
        info["model"], config.model.path, held_out, online.eval_seeds, online.scorers[0],
        online.steps, online.guidance_scale, str(here), online.resolution,
        online.negative_prompt, online.true_cfg_scale, config.model.dtype,
        online.batch_size)))
    return info


def round_tree(config: DiffusionOnlineConfig, model: str, ranked: str, output_dir: Path) -> dict:
    """The ``diffusion train`` config of a round: the online config's sections, from ``model``,
    on the round's ``ranked`` lists (a pair objective through data.convert best vs worst)."""
    tree = config.model_dump(exclude={"online"})
    tree["output_dir"] = str(output_dir)
    tree["model"]["path"] = model
    tree["data"].update(train=ranked, eval=None, eval_fraction=0.0, fields={})
    if not get_diffusion_loss(config.objective.name).ranked and tree["data"]["convert"] is None:
        tree["data"]["convert"] = "pairs:best_vs_worst"
    return tree


def evaluated(results: dict) -> dict:
    """A round's win rate over the initial model, with its mean score as ``mean_score``."""
    return {**{k: v for k, v in results.items() if not isinstance(v, list)},
            "mean_score": results["mean_score/policy"]}

"""Win rate of a trained denoiser against its reference under an image scorer: both sample the
same prompts from the same seeds (the same starting noise), the scorer rates every image, and
the policy wins a (prompt, seed) when the scorer prefers its image (a tie counts 1/2)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from ..model.load import released
from ..score.base import checked, paired_scores
from .data import tensor_image
from .model import load_for_sampling
from .pipeline_files import pipeline_dir, saved_denoiser_dtype
from .sample import image_batches


TEXT_PREFIXES = {"rm:": "a reward model", "judge:": "an LLM judge",
                 "judge-pair:": "a pairwise LLM judge", "follow-up:": "follow-up likelihood"}
IMAGE_SCORERS = ("shape_colour (the demo's checker), spm:PATH (a step-aware preference model) or "
                 "module:function(prompt, PIL image) -> float")


def image_scorer(spec: str):
    """``shape_colour`` (the demo's checker), ``spm:PATH`` (a step-aware preference model,
    ``preftune diffusion spm``) or any scorer spec ``load_scorer`` reads whose
    ``score(prompts, responses)`` accepts PIL images (e.g. ``module:function``), checked
    first (``check_image_scorer``)."""
    check_image_scorer(spec)
    if spec == "shape_colour":
        from .shapes import ColourScorer

        return ColourScorer()
    if spec.startswith("spm:"):  # a step-aware preference model, on clean images
        from .step_model import StepModelScorer

        return StepModelScorer(spec[4:])
    from ..config import ConfigError
    from ..score import load_scorer

    try:
        return load_scorer(spec)
    except ConfigError as error:
        raise ConfigError(f"{error} For images: {IMAGE_SCORERS}.") from None


def check_image_scorer(spec: str) -> None:
    """Refuse, before any model loads, a scorer that cannot rate images: one that reads text
    (a reward model, an LLM judge, follow-up likelihood, the synthetic checkers, a render or
    compositional file, a combination with such a term; they fail on an image, or rate its
    description), an spm: path that is no folder, or a spec ``check_scorer`` refuses."""
    from ..config import ConfigError
    from ..score import check_scorer, is_function_spec

    if spec == "shape_colour":
        return
    if spec.startswith("spm:"):
        if not Path(spec[4:]).is_dir():
            raise ConfigError(f"scorer {spec!r}: {spec[4:]} is not a directory (a step-aware "
                              "preference model from preftune diffusion spm).")
        return
    named_text = spec.startswith(tuple(TEXT_PREFIXES)) or spec == "synthetic"  # (said below)
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        from ..score import read_scorer_file

        named_text = named_text or _text_file(read_scorer_file(spec)) is not None
    if not named_text:
        if not (is_function_spec(spec) or spec.endswith((".yaml", ".yml")) or
                Path(spec).exists()):
            near = difflib.get_close_matches(spec, ["shape_colour", "spm:"], n=1)
            raise ConfigError(f"scorer {spec!r}: expected {IMAGE_SCORERS}."
                              + (f" Did you mean {near[0]!r}?" if near else ""))
        try:  # (a combination that names itself is refused here, before it is read)
            check_scorer(spec)
        except ConfigError as error:
            raise ConfigError(f"{error} For images: {IMAGE_SCORERS}.") from None
    reads = _reads_text(spec)
    if reads:
        raise ConfigError(f"scorer {spec!r} is {reads}, which rates text, not images; for "
                          f"images give {IMAGE_SCORERS}.")


def _text_file(tree) -> str | None:
    """What text scorer a scorer file's mapping describes (not a combination's terms)."""
    for key, kind in (("follow_up", "follow-up likelihood"),
                      ("compositional", "a compositional preference model"),
                      ("render", "a render scorer (it renders text into images)")):
        if isinstance(tree, dict) and key in tree:
            return kind
    return None


def _reads_text(spec: str) -> str | None:
    """What text scorer ``spec`` is (or a combination's first text term), else None."""
    from ..score import is_function_spec, read_scorer_file
    from ..score.combine import check_combination

    for prefix, kind in TEXT_PREFIXES.items():
        if spec.startswith(prefix):
            return kind
    if spec == "synthetic":
        return "the synthetic checkers"
    if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
        tree = read_scorer_file(spec)
        return _text_file(tree) or next(filter(None, map(_reads_text,
                                                          check_combination(spec, tree))), None)
    if Path(spec).is_dir() and not is_function_spec(spec):
        return "a reward model"
    return None


def win_rate(policy, reference, prompts: list[str], seeds: list[int], scorer, steps: int = 25,
             guidance_scale: float = 1.0, resolution: int | None = None,
             negative_prompt: str = "", true_cfg_scale: float = 1.0,
             batch_size: int | None = None) -> dict:
    """Policy vs reference on prompts x seeds under ``scorer`` (``batch_size`` images sampled
    at a time). ``policy`` and ``reference`` give their ``DiffusionModel``s when called, one at
    a time: each samples and is released before the other loads."""
    rows = [prompt for prompt in prompts for _ in seeds]
    images = {}
    for name, model in (("policy", policy), ("reference", reference)):
        images[name] = released(lambda: [tensor_image(x) for batch in image_batches(
            model(), prompts, seeds, steps, guidance_scale, resolution=resolution,
            negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
            batch_size=batch_size) for x in batch])  # (8-bit images; no fp32 copy of them all)
    both = paired_scores(scorer, rows, images["policy"], images["reference"])  # (maxmin: one term)
    scores = {name: checked(values, scorer.name, len(rows)) for name, values in zip(images, both)}
    wins = (scorer.prefer(rows, images["policy"], images["reference"])
            if getattr(scorer, "pairwise", False)
            else [1.0 if a > b else 0.0 if a < b else 0.5  # (from the scores: scored once)
                  for a, b in zip(scores["policy"], scores["reference"])])
    return {"win_rate": sum(wins) / len(wins), "scorer": scorer.name,
            "mean_score/policy": sum(scores["policy"]) / len(rows),
            "mean_score/reference": sum(scores["reference"]) / len(rows),
            "samples": len(rows), "sampling_steps": steps}


def evaluate_diffusion(model: str, reference: str, prompts: list[str], seeds: list[int],
                       scorer: str, steps: int = 25, guidance_scale: float = 1.0,
                       output: str | None = None, resolution: int | None = None,
                       negative_prompt: str = "", true_cfg_scale: float = 1.0,
                       dtype: str = "auto", batch_size: int = 8) -> dict:
    """``preftune diffusion eval``: the win rate, written as ``eval.json`` in the run dir
    (``model`` is a run dir holding ``model/``, or a pipeline dir) or in ``output`` (a folder,
    or the file itself when it ends in .json). Both pipelines load in ``dtype`` ('auto': the
    policy's saved dtype) and sample ``batch_size`` images at a time. Errors name the
    command's flags (the runs of ``compare`` and ``diffusion online`` that call it have
    checked their settings before)."""
    from .sample import SAMPLING_FLAGS, check_negative_prompt

    run_dir = Path(model)
    pipeline = pipeline_dir(run_dir)
    if dtype == "auto":  # the policy's saved dtype, the reference's too
        dtype = saved_denoiser_dtype(pipeline, "--model") if pipeline.is_dir() else "float32"

    def policy():
        loaded = load_for_sampling(pipeline, "--model", dtype)
        check_negative_prompt(loaded.family, negative_prompt, guidance_scale, true_cfg_scale,
                              SAMPLING_FLAGS[1:])
        return loaded

    results = win_rate(policy, lambda: load_for_sampling(reference, "--reference", dtype),
                       prompts, seeds, image_scorer(scorer), steps, guidance_scale, resolution,
                       negative_prompt, true_cfg_scale, batch_size)
    results.update(model=str(pipeline), reference=str(reference), dtype=dtype, prompts=prompts,
                   seeds=seeds, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale)
    target = Path(output) if output else (run_dir if pipeline != run_dir else Path("."))
    written = target if target.suffix == ".json" else target / "eval.json"  # a file or a folder
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_text(json.dumps(results, indent=2))
    return results

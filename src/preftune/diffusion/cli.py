"""``preftune diffusion train | online | spm | caption | sample | eval | rank | demo |
objectives``: the diffusion commands (the ``diffusion`` extra; diffusers is imported only when
one of them runs)."""

from __future__ import annotations

from pathlib import Path

from ..arguments import POSITIVE, add_column_option, add_dtype_option
from ..config import ConfigError
from . import require_diffusers


def _config_command(name: str, load, done):
    """A command that runs a config (YAML plus ``--set``, ``--resume``, ``--overwrite``):
    ``load()`` gives (config class, run function), ``done(output_dir)`` the closing line."""
    def command(args) -> None:
        require_diffusers(f"preftune diffusion {name}")
        config_class, run = load()
        config = config_class.from_yaml(args.config, args.set or [])
        if getattr(args, "plan", False):
            run(config, plan_only=True)
            return
        print(done(run(config, resume=args.resume, overwrite=args.overwrite)))
    return command


def _train_parts():
    from .config import DiffusionConfig
    from .train import train_diffusion

    return DiffusionConfig, train_diffusion


def _spm_parts():
    from .step_model_train import StepModelConfig, train_step_model

    return StepModelConfig, train_step_model


def _online_parts():
    from .online import DiffusionOnlineConfig, run_diffusion_online

    return DiffusionOnlineConfig, run_diffusion_online


_train = _config_command("train", _train_parts, lambda out: (
    f"done: pipeline in {out / 'model'} (diffusers loads its unet/), metrics in "
    f"{out / 'metrics.jsonl'}; `preftune report {out}` for the report"))
_spm = _config_command("spm", _spm_parts, lambda out: (
    f"done: step-aware preference model in {out / 'model'}; SPO uses it with "
    f"objective.scorer: spm:{out / 'model'}"))
_online = _config_command("online", _online_parts, lambda out: (
    f"done: each trained round's model in {out}/round-N/train/model, its win rate over the initial "
    f"model in round-N/eval.json; summary in {out / 'online.json'}"))


def _caption(args) -> None:
    from .captions import caption_pairs

    result = caption_pairs(args.data, args.output, args.captioner, args.perturber, args.fields,
                           args.max_new_tokens, args.batch_size, args.caption_instruction,
                           args.perturb_instruction, args.overwrite)
    print(f"wrote {result['pairs']} pairs with chosen_caption and rejected_caption "
          f"({result['method']}) to {result['output']}; train them with objective dcpo")


def _sample(args) -> None:
    require_diffusers("preftune diffusion sample")
    import re
    from types import SimpleNamespace

    if not re.fullmatch(r"[\w-][\w.-]*", args.label):  # a file name under samples/, no path
        raise ConfigError(f"--label {args.label!r}: the grid is written as samples/<label>.png; "
                          "give a name of letters, digits, '-', '_' and '.' (no path).")

    from .model import load_for_sampling
    from .pipeline_files import pipeline_dir
    from .sample import SAMPLING_FLAGS, check_negative_prompt, write_samples

    samples = SimpleNamespace(prompts=args.prompt, seeds=args.seeds, steps=args.steps,
                              guidance_scale=args.guidance_scale, resolution=args.resolution,
                              negative_prompt=args.negative_prompt,
                              true_cfg_scale=args.true_cfg_scale)
    model = load_for_sampling(pipeline_dir(args.model), "--model", args.dtype)  # (a run dir too)
    check_negative_prompt(model.family, args.negative_prompt, args.guidance_scale,
                          args.true_cfg_scale, SAMPLING_FLAGS[1:])  # before anything is written
    _check_samples_dir(Path(args.output_dir), args.label, vars(samples), args.overwrite)
    grid = write_samples(model, samples, args.output_dir, args.label,
                         batch_size=args.batch_size)
    print(f"wrote {len(args.prompt) * len(args.seeds)} images and the grid {grid}")


def _check_samples_dir(out: Path, label: str, settings: dict, overwrite: bool) -> None:
    """Grids in one ``samples/`` share its ``samples.json`` (prompts, seeds, sampler): another
    grid there must be sampled alike and not replace one of the same label, unless
    ``overwrite`` (the folder is moved aside)."""
    import json

    from ..train.output import move_aside
    from .sample import SAMPLES_DIR

    index_path = out / SAMPLES_DIR / "samples.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    differ = sorted(key for key, value in settings.items() if index.get(key) != value)
    if label in index.get("grids", {}) or differ:
        if overwrite:
            move_aside(out / SAMPLES_DIR)
            return
        why = (f"already has grid {label!r}" if label in index.get("grids", {}) else
               f"holds grids sampled with other {', '.join(differ)}")
        raise ConfigError(f"{index_path.parent} {why}; choose another --label or --output-dir, "
                          "or pass --overwrite (the folder is moved aside, not deleted).")


def _eval(args) -> None:
    import json

    from ..api import evaluate_diffusion

    results = evaluate_diffusion(args.model, args.reference, args.prompt, args.scorer,
                                 seeds=args.seeds, steps=args.steps,
                                 guidance_scale=args.guidance_scale, output=args.output,
                                 resolution=args.resolution,
                                 negative_prompt=args.negative_prompt,
                                 true_cfg_scale=args.true_cfg_scale, dtype=args.dtype,
                                 batch_size=args.batch_size)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, list)}, indent=2))


def _rank(args) -> None:
    require_diffusers("preftune diffusion rank")
    from .data import load_pairs
    from .ranking import check_list_size, make_ranked_lists

    from ..config import ConfigError

    check_list_size(args.model, args.seeds, args.list_size)
    out = Path(args.output_dir)
    if (out / "ranked.jsonl").exists() and not args.overwrite:
        raise ConfigError(f"{out} already holds ranked lists; choose another --output-dir "
                          "or pass --overwrite (the folder is moved aside, not deleted).")
    prompts = list(args.prompt or [])
    for path in args.prompts or []:  # records need only their prompt
        prompts += [record.prompt for record in load_pairs(
            path, {"prompt": args.prompt_field}, check=False, prompts_only=True)]
    if (out / "ranked.jsonl").exists():  # --overwrite, once the prompts have been read
        from ..train.output import move_aside

        move_aside(out)
    result = make_ranked_lists(prompts, args.model, args.scorer, args.seeds, args.output_dir,
                               args.steps, args.guidance_scale, args.list_size,
                               args.resolution, args.negative_prompt, args.true_cfg_scale,
                               dtype=args.dtype, batch_size=args.batch_size)
    print(f"wrote {result['lists']} ranked lists of {result['images']} images to "
          f"{result['ranked']} (objective rank_dpo) and {result['pairs']} best-vs-worst pairs "
          f"to {result['pairs_file']} (diffusion_dpo); {result['lists_all_tied']} lists "
          "scored every image the same and make no pair")


def _demo(args) -> None:
    require_diffusers("preftune diffusion demo")
    from .demo import run_demo

    run_demo(args.output_dir, quick=args.quick, beta=args.beta)


def _objectives(args) -> None:
    from .losses import DIFFUSION_LOSSES

    for name, spec in sorted(DIFFUSION_LOSSES.items()):
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults().items()) or "-"
        needs = "reference denoiser" if spec.needs_reference else "no reference"
        if spec.online:
            needs += "; online: records need only a prompt, it samples its own images"
        if spec.ranked:
            needs += "; ranked image lists (prompt, images, image_scores)"
        print(f"{name:<14} {spec.summary}\n{'':<14} {needs}; params: {defaults}; paper: "
              f"{spec.paper}{'' if spec.verified else ' (formula UNVERIFIED)'}")


def _seeds(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _sampling_arguments(parser, prompt_required: bool = True) -> None:
    parser.add_argument("--prompt", action="append", required=prompt_required,
                        help="a prompt (repeat for several)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1], help="comma-separated, e.g. 0,1")
    parser.add_argument("--steps", type=POSITIVE, default=25, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance (1: none); Flux.1-dev: its guidance "
                        "input (FluxPipeline uses 3.5)")
    parser.add_argument("--resolution", type=POSITIVE,
                        help="pixels per side (default: the denoiser's own size; Flux: 1024)")
    parser.add_argument("--negative-prompt", default="",
                        help="what guidance steers away from (default: the empty prompt)")
    parser.add_argument("--true-cfg-scale", type=float, default=1.0,
                        help="Flux: classifier-free guidance away from --negative-prompt")
    add_dtype_option(parser, "the --model pipeline's denoiser", "its safetensors files")
    parser.add_argument("--batch-size", type=POSITIVE, default=8,
                        help="images sampled together (the images do not depend on it)")


def add_diffusion_commands(commands) -> None:
    from ..cli import add_config_arguments, command

    group = command(commands, "diffusion", "text-to-image denoisers: Diffusion-DPO, DCPO, MaPO, "
                    "SPO, RankDPO, LongAlign (needs preftune[diffusion])",
                    "preftune diffusion demo --quick",
                    "preftune diffusion train examples/diffusion/diffusion_dpo.yaml")
    sub = group.add_subparsers(dest="diffusion_command", required=True)

    config_commands = [  # (name, summary, examples, an override for --help, what runs)
        ("train", "train a diffusers denoiser on image preference pairs (or on prompts, "
         "sampling online: spo, longalign)",
         ["preftune diffusion train examples/diffusion/diffusion_dpo.yaml",
          "preftune diffusion train examples/diffusion/mapo_lora.yaml --set "
          "data.train=pairs.jsonl",
          "preftune diffusion train examples/diffusion/spo.yaml --set data.train=prompts.jsonl",
          "preftune diffusion train examples/diffusion/diffusion_dpo.yaml --plan"],
         "objective.beta=2500", _train),
        ("spm", "train SPO's step-aware preference model: a CLIP scorer (e.g. PickScore) "
         "rating a pipeline's predicted clean images at each noise level",
         ["preftune diffusion spm examples/diffusion/spm.yaml --set data.train=pairs.jsonl"],
         "pipeline.guidance_scale=5", _spm),
        ("online", "rounds of sample -> rank -> train: the current model samples every "
         "prompt, scorers rank the images, the objective trains on them, the next round "
         "starts from the result",
         ["preftune diffusion online examples/diffusion/online_rank_dpo.yaml",
          "preftune diffusion online examples/diffusion/online_rank_dpo.yaml --plan"],
         "online.rounds=3", _online)]
    for name, summary, examples, override, run in config_commands:
        parser = command(sub, name, summary, *examples)
        add_config_arguments(parser, "examples/diffusion/", override)
        if name in ("train", "online"):
            parser.add_argument("--plan", action="store_true", help=(
                "print the objective, the images and the memory of a step (measured on 1 and "
                "2 examples), then stop" if name == "train" else "print round 1's training "
                "plan (diffusion train --plan on lists like its samples), then stop"))
        parser.set_defaults(run=run)

    caption = command(sub, "caption", "DCPO's captions: a vision-language model captions each "
                      "image of a pair (DCPO-c), a language model perturbs the rejected one's "
                      "text (DCPO-p), or both (DCPO-h); writes chosen_caption/rejected_caption",
                      "preftune diffusion caption --data pairs.jsonl --output captioned.jsonl "
                      "--captioner models/qwen2.5-vl-3b",
                      "preftune diffusion caption --data pairs.jsonl --output captioned.jsonl "
                      "--perturber default")
    caption.add_argument("--data", required=True, help="image pairs (prompt, chosen, rejected)")
    caption.add_argument("--output", required=True, help="JSONL file to write")
    caption.add_argument("--captioner", help="a vision-language model directory")
    caption.add_argument("--perturber", help="a language model (directory, Hub id or default)")
    add_column_option(caption, "--field", example="prompt=caption")
    caption.add_argument("--max-new-tokens", type=POSITIVE, default=48,
                         help="longest caption or rewritten prompt, in tokens")
    caption.add_argument("--batch-size", type=POSITIVE, default=8,
                         help="images (or texts) per generate call")
    caption.add_argument("--caption-instruction", default=None,
                         help="the captioner's instruction, with <image> and {prompt}")
    caption.add_argument("--perturb-instruction", default=None,
                         help="the perturber's instruction, with {text}")
    caption.add_argument("--overwrite", action="store_true",
                         help="replace captions the rows already have, and an existing "
                              "--output file")
    caption.set_defaults(run=_caption)

    sample = command(sub, "sample", "fixed-seed samples and a grid (a row per prompt)",
                     "preftune diffusion sample --model runs/diffusion/model --prompt 'a red "
                     "circle' --seeds 0,1,2")
    sample.add_argument("--model", required=True, help="a pipeline directory")
    sample.add_argument("--output-dir", default=".", help="writes samples/<label>.png here")
    sample.add_argument("--label", default="samples",
                        help="name of the image grid: samples/<label>.png")
    sample.add_argument("--overwrite", action="store_true",
                        help="move an earlier samples/ folder aside instead of refusing")
    _sampling_arguments(sample)
    sample.set_defaults(run=_sample)

    evaluate = command(sub, "eval", "win rate against the reference under an image scorer "
                       "(same prompts, same seeds; writes eval.json)",
                       "preftune diffusion eval --model runs/diffusion --reference "
                       "runs/pretrained --prompt 'a red circle' --scorer shape_colour")
    evaluate.add_argument("--model", required=True, help="a run dir (holding model/) or a "
                          "pipeline directory")
    evaluate.add_argument("--reference", required=True, help="the pipeline before training")
    evaluate.add_argument("--scorer", required=True, help="shape_colour (the demo's checker), "
                          "spm:PATH (a step-aware preference model) or "
                          "module:function(prompt, PIL image) -> float")
    evaluate.add_argument("--output", help="a folder for eval.json (default: the run dir), or "
                                           "a FILE.json")
    _sampling_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    rank = command(sub, "rank", "ranked image lists without people (Syn-Pic): pipelines sample "
                   "each prompt, scorers rate every image; writes ranked.jsonl (rank_dpo) and "
                   "best-vs-worst pairs.jsonl (diffusion_dpo)",
                   "preftune diffusion rank --model runs/diffusion_demo/pretrain/model "
                   "--prompt 'a red circle' --seeds 0,1,2,3 --scorer shape_colour "
                   "--output-dir data/ranked",
                   "preftune diffusion rank --model sd15/ --model sd21/ --prompts prompts.jsonl "
                   "--scorer mymod:pickscore --scorer mymod:hps --output-dir syn")
    rank.add_argument("--model", action="append", required=True,
                      help="a pipeline directory or a run dir holding model/ (repeat: every "
                      "model samples every prompt from every seed)")
    rank.add_argument("--scorer", action="append", required=True,
                      help="shape_colour, spm:PATH or module:function(prompt, PIL image) -> "
                      "float (repeat: scores are averaged as win shares)")
    rank.add_argument("--prompts", action="append",
                      help="a data file of prompts (JSONL, JSON, Parquet, CSV; repeatable)")
    rank.add_argument("--prompt-field", default="prompt", help="the prompt column of --prompts")
    rank.add_argument("--output-dir", required=True,
                      help="writes ranked.jsonl, pairs.jsonl and images/ here")
    rank.add_argument("--overwrite", action="store_true",
                      help="move earlier lists in --output-dir aside instead of refusing")
    rank.add_argument("--list-size", type=POSITIVE,
                      help="seeds per list (default: all seeds of a prompt in one list); "
                      "a list holds every model's image of each of its seeds")
    _sampling_arguments(rank, prompt_required=False)
    rank.set_defaults(run=_rank)

    demo = command(sub, "demo", "pretrain a tiny denoiser on coloured shapes, then Diffusion-DPO "
                   "toward the requested colour, checked by a program",
                   "preftune diffusion demo --quick")
    demo.add_argument("--output-dir", default="runs/diffusion_demo",
                      help="where the demo's data, runs and results go")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke version (about a minute on 2 CPU cores)")
    demo.add_argument("--beta", type=float, default=5000.0,
                      help="beta of Diffusion-DPO (default: the paper's 5000)")
    demo.set_defaults(run=_demo)

    objectives = command(sub, "objectives", "list the diffusion objectives",
                         "preftune diffusion objectives")
    objectives.set_defaults(run=_objectives)

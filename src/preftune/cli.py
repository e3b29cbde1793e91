"""Command line: ``preftune train | online | rm | diffusion | demo | eval | report | compare |
data | objectives | config``. Each command that trains, evaluates, scores or reports calls the
function of ``preftune.api`` that does its job."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .arguments import (CONFIG_KINDS, COUNT, POSITIVE, add_column_option, add_dtype_option,
                        add_tokenize_options)


def _train(args) -> None:
    from .api import Config, train

    config = Config.from_yaml(args.config, args.set or [])
    output_dir = train(config, resume=args.resume, plan_only=args.plan,
                       overwrite=args.overwrite)
    if args.plan:
        return
    saved = "model" if (output_dir / "model").is_dir() or not (output_dir / "adapter").is_dir() \
        else "adapter"  # model.lora.save_merged: false
    print(f"done: {saved} in {output_dir / saved}, metrics in {output_dir / 'metrics.jsonl'}")


def _online(args) -> None:
    from .api import OnlineConfig, run_online

    output_dir = run_online(OnlineConfig.from_yaml(args.config, args.set or []),
                            resume=args.resume, overwrite=args.overwrite, plan_only=args.plan)
    if not args.plan:
        print(f"done: rounds in {output_dir}, summary in {output_dir / 'online.json'}")


def _demo(args) -> None:
    if args.vision:
        from .demo_vision import run_vision_demo

        if args.online:
            raise SystemExit("error: --vision and --online are separate demos; pick one.")
        run_vision_demo(output_dir=args.output_dir or "runs/vision-demo", quick=args.quick)
        return
    from .demo import run_demo

    run_demo(output_dir=args.output_dir or "runs/demo", quick=args.quick, online=args.online)


def _eval(args) -> None:
    from .api import evaluate

    evaluate(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})


def _objectives(args) -> None:
    from .objectives.catalog import markdown, terminal_listing
    from .objectives.registry import load_installed

    if not args.markdown:  # docs/objectives.md lists preftune's own
        for problem in load_installed():
            print(f"warning: not listed: {problem}", file=sys.stderr)
    print(markdown() if args.markdown else terminal_listing(), end="\n" if not args.markdown else "")


def _report(args) -> None:
    from .api import write_report
    from .report import ReportError

    try:
        html_path = write_report(args.run_dir, args.output)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"report: {html_path} (each figure also as a PNG under {args.run_dir}/report/)")


def _compare(args) -> int:
    from .api import ObjectivesFailed, compare
    from .compare import objective_params

    try:
        compare(args.objectives, args.config, overrides=args.set or [],
                output_dir=args.output_dir, eval_data=args.eval_data, scorer=args.scorer,
                samples=args.samples, max_new_tokens=args.max_new_tokens,
                plan_only=args.plan, params=objective_params(args.param or []))
    except ObjectivesFailed as failures:  # the others were trained and ranked
        print(failures, file=sys.stderr)
        return 1
    return 0


def _config_explain(args) -> None:
    from .config_schema import explain

    print(explain(args.kind, args.key))


def _config_schema(args) -> None:
    from .config_schema import write_schema

    write_schema(args.kind, args.output)


def add_config_arguments(parser, examples: str, example_override: str) -> None:
    """The config file, ``--set`` overrides and ``--resume`` of a training command."""
    parser.add_argument("config", nargs="?", help=f"YAML config file (see {examples}); optional "
                        "when every key comes from --set")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example_override}")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in output_dir (same settings)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds a run (the old run is "
                             "moved aside to OUTPUT_DIR.old-TIME, not deleted)")


def command(commands, name: str, summary: str, *examples: str) -> argparse.ArgumentParser:
    """A (sub)command whose ``--help`` ends with example invocations."""
    return commands.add_parser(name, help=summary, description=summary,
                               epilog=_examples(examples), formatter_class=_ShowsDefaults)


class _ShowsDefaults(argparse.RawDescriptionHelpFormatter):
    """--help gives each option's default, where it has one and its help does not say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default in (None, False, [], argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _examples(examples) -> str:
    return "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(
        f"  {line}" for line in examples)


def _versions() -> str:
    """``preftune X (torch Y, transformers Z, Python W)``: what a bug report needs."""
    from .versions import installed_versions

    preftune, *others = installed_versions().items()
    return f"preftune {preftune[1]} ({', '.join(f'{name} {v}' for name, v in others)})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(["preftune demo --quick",
                          "preftune train examples/dpo.yaml --set data.train=my_pairs.jsonl"]))
    parser.add_argument("--version", action="version", version=_versions(),
                        help="print the versions of preftune, torch, transformers and Python "
                             "(for a bug report), then stop")
    commands = parser.add_subparsers(dest="command", required=True)

    train = command(commands, "train", "train on your own preference data",
                    "preftune train examples/dpo.yaml --set data.train=my_pairs.jsonl",
                    "preftune train examples/dpo.yaml --set 'train.report_to=[tensorboard]'",
                    "preftune train examples/dpo.yaml --resume")
    add_config_arguments(train, "examples/", "train.learning_rate=1e-6")
    train.add_argument("--plan", action="store_true",
                       help="print layout, reference strategy and a memory estimate, then stop")
    train.set_defaults(run=_train)

    online = command(commands, "online", "rounds of sample, score, pair, train, evaluate",
                     "preftune online examples/online/iterative_dpo_checkers.yaml "
                     "--set online.rounds=3",
                     "preftune online examples/online/iterative_dpo_checkers.yaml --plan")
    add_config_arguments(online, "examples/online/", "online.rounds=3")
    online.add_argument("--plan", action="store_true",
                        help="print the sampling and training memory of the rounds, then stop")
    online.set_defaults(run=_online)

    from .reward.cli import add_rm_commands

    add_rm_commands(commands)

    from .diffusion.cli import add_diffusion_commands

    add_diffusion_commands(commands)

    demo = command(commands, "demo", "DPO on SmolLM2-135M with generated, checkable data",
                   "preftune demo --quick", "preftune demo --online --output-dir runs/demo",
                   "preftune demo --vision")
    demo.add_argument("--output-dir", default=None,
                      help="default runs/demo (runs/vision-demo with --vision)")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke version (under a minute; with --online about 3)")
    demo.add_argument("--online", action="store_true",
                      help="also spend the same optimizer steps half offline, half in online "
                           "rounds on the model's own checked samples, and compare")
    demo.add_argument("--vision", action="store_true",
                      help="the vision-language demo instead: a small VLM built from a config, "
                           "SFT then DPO and mDPO on generated images of coloured shapes")
    demo.set_defaults(run=_demo)

    evaluate = command(commands, "eval", "diagnostics of a trained model against its "
                       "reference on preference pairs (writes eval.json)",
                       "preftune eval --model runs/demo --data runs/demo/data/eval.jsonl "
                       "--scorer synthetic")
    evaluate.add_argument("--model", required=True, help="a run dir (holding model/) or a model dir")
    evaluate.add_argument("--data", required=True, help="preference pairs (JSONL, JSON, ...)")
    add_column_option(evaluate)
    evaluate.add_argument("--reference", help="reference model (default: the one a run dir's "
                          "config.yaml trained against, its reference.model or model.path; "
                          "for a bare model dir the bundled SmolLM2-135M-Instruct)")
    evaluate.add_argument("--output", help="output dir (default: the run dir, else the cwd)")
    evaluate.add_argument("--beta", type=float, default=0.1, help="beta of implied rewards and R*")
    evaluate.add_argument("--ches-model", choices=["reference", "policy"], default="reference",
                          help="whose hidden states CHES uses (the paper: the model before training)")
    evaluate.add_argument("--filter-top", type=float, metavar="FRACTION",
                          help="also write the data without this fraction of highest-CHES pairs")
    evaluate.add_argument("--samples", type=COUNT, default=4,
                          help="policy samples per prompt for KL, top-k and length stats (0: skip)")
    evaluate.add_argument("--max-new-tokens", type=POSITIVE, default=64,
                          help="longest sampled or greedy answer, in tokens")
    evaluate.add_argument("--top-k", type=POSITIVE, default=10, help="k of top-k entropy and mass")
    evaluate.add_argument("--scorer", help="win rate vs the reference under a scorer (README, "
                          "Scorers): 'synthetic' (the demo's checkers), rm:DIR, judge:default "
                          "or module:function(prompt, response) -> float")
    evaluate.add_argument("--batch-size", type=POSITIVE, default=16,
                          help="pairs (or prompts) per forward pass")
    add_tokenize_options(evaluate)
    add_dtype_option(evaluate, "the evaluated model (--model)")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="seed of the sampled answers (the draws also depend on "
                               "--batch-size: compare runs at the same one)")
    evaluate.set_defaults(run=_eval)

    from .data.cli import add_data_commands

    add_data_commands(commands)

    objectives = command(commands, "objectives", "list the registered objectives (with those "
                         "of installed packages)", "preftune objectives",
                         "preftune objectives --markdown")
    objectives.add_argument("--markdown", action="store_true",
                            help="print the catalog as markdown (docs/objectives.md)")
    objectives.set_defaults(run=_objectives)

    report = command(commands, "report", "plots, alarms and eval results of a run as one "
                     "self-contained HTML page", "preftune report runs/demo",
                     "preftune report runs/my_run --output /tmp/my_run.html")
    report.add_argument("run_dir", help="a `preftune train` output_dir (holds metrics.jsonl)")
    report.add_argument("--output", metavar="FILE",
                        help="where to write the HTML page (default: RUN_DIR/report.html)")
    report.set_defaults(run=_report)

    compare = command(commands, "compare", "train several objectives on the same data, "
                      "budget and seed; evaluate them alike; write a leaderboard",
                      "preftune compare --objectives dpo,ipo,simpo --config "
                      "examples/compare_demo.yaml --scorer synthetic",
                      "preftune compare --objectives dpo,ipo,simpo --config "
                      "examples/compare_demo.yaml --plan")
    compare.add_argument("--objectives", required=True, help="comma-separated, e.g. dpo,ipo,simpo")
    compare.add_argument("--config", help="base YAML config; its objective is replaced")
    compare.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override a base config key")
    compare.add_argument("--param", action="append", metavar="OBJECTIVE.KEY=VALUE",
                         help="a parameter of one compared objective, e.g. simpo.beta=2.5 "
                         "(repeatable; the rest keep their paper's defaults)")
    compare.add_argument("--output-dir", default="runs/compare",
                         help="each objective's run goes to OUTPUT_DIR/<objective>")
    compare.add_argument("--eval-data", help="held-out pairs (default: the config's data.eval)")
    compare.add_argument("--scorer", help="win rate under a scorer: 'synthetic', rm:DIR, "
                         "judge:default or module:function")
    compare.add_argument("--samples", type=COUNT, default=2,
                         help="policy samples per prompt for KL and length (0: skip)")
    compare.add_argument("--max-new-tokens", type=POSITIVE, default=32,
                         help="longest answer of the win-rate evaluation, in tokens")
    compare.add_argument("--plan", action="store_true",
                         help="print each objective's --plan (layout, memory), then stop")
    compare.set_defaults(run=_compare)

    config = command(commands, "config", "every config key with its type, default and help; "
                     "a JSON schema for editors", "preftune config explain train.learning_rate",
                     "preftune config schema --kind rm -o rm.schema.json")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    explain = command(config_commands, "explain", "print every key (or those under KEY) with "
                      "its type, default and help", "preftune config explain",
                      "preftune config explain objective --kind online")
    explain.add_argument("key", nargs="?", help="a key or section, e.g. train or "
                         "train.learning_rate")
    schema = command(config_commands, "schema", "write a JSON schema of the config files (for "
                     "editor completion and checks)", "preftune config schema -o schema.json")
    schema.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    for sub, run in ((explain, _config_explain), (schema, _config_schema)):
        sub.add_argument("--kind", choices=CONFIG_KINDS, default="train",
                         help="which config: preftune train, rm train, online, diffusion train, "
                              "diffusion online or diffusion spm (default train)")
        sub.set_defaults(run=run)
    return parser


def out_of_memory_outside_steps(error: Exception) -> str:
    """What to say when the device ran out of memory outside the training steps (which say it
    themselves, with a checkpoint)."""
    from .train.stopping import first_line

    return (f"the device ran out of memory ({first_line(error)}) outside the training steps: loading, the "
            "reference pass, evaluation, sampling or scoring. What was written is kept. Less "
            "memory: a smaller train.batch_size (the reference pass and evaluation batch by "
            "it; --batch-size for eval and scoring), model.dtype bfloat16, model.quantize "
            "nf4, or LoRA; `--plan` estimates training's memory.")


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.records import DataError

    from .train.logging import quiet_deepspeed_on_cpu, speaks
    from .train.stopping import Terminated, TrainingStopped, raise_terminated
    from .versions import below_floors

    args = build_parser().parse_args(argv)
    too_old = below_floors()
    if too_old:
        print(f"error: {too_old}", file=sys.stderr)
        return 2
    quiet_deepspeed_on_cpu()
    talks = speaks()  # under a launcher, the first process speaks for all of them
    if not talks:
        sys.stdout = open(os.devnull, "w")
    here = threading.current_thread() is threading.main_thread()  # (signals: main thread only)
    previous = signal.signal(signal.SIGTERM, raise_terminated) if here else None
    try:
        code = args.run(args) or 0  # a command returns a code only when it is not 0
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): no traceback, and none at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a command ended by SIGPIPE
    except (ConfigError, DataError, FileNotFoundError) as error:
        if talks:  # (every process reads the same config and data)
            print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        if talks:
            print(str(stopped), file=sys.stderr)
        code = stopped.exit_code
    except RuntimeError as error:
        import torch  # (loaded by then: a command that runs out of memory imported it)

        if not isinstance(error, torch.OutOfMemoryError):
            raise
        if talks:
            print(f"error: {out_of_memory_outside_steps(error)}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM, outside a training step
        name = "SIGTERM" if isinstance(stop, Terminated) else "SIGINT (Ctrl-C)"
        advice = ("Run the same command again; if it says its folder holds a run, add "
                  "--resume to continue from what was written (the last checkpoint, the "
                  "finished rounds) or --overwrite to start over." if hasattr(args, "resume")
                  else "Run the same command again.")
        if talks:
            print(f"\nstopped by {name}; what was written is kept. {advice}", file=sys.stderr)
        code = 143 if isinstance(stop, Terminated) else 130
    finally:
        if here:
            signal.signal(signal.SIGTERM, previous)
    _end_launched_process(code)
    return code


def _end_launched_process(code: int) -> None:
    """Under a launcher, leave the process group once every process is done, then end the
    process at once with ``code``, its output flushed, without the interpreter's teardown.

    Libraries keep process groups referenced past ``destroy_process_group`` (DeepSpeed's ZeRO-3
    keeps the top module in a module-level stack, and every parameter holds its group), so the
    gloo threads outlive the run. Torn down with the interpreter, such a thread that drops a
    tensor needs the GIL, is stopped by a forced unwind, and the process aborts ("terminate
    called without an active exception", SIGABRT) after everything was written. Every file of
    the run is closed and every tracker finished by the time this runs."""
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``preftune train | demo | data inspect | objectives``."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> None:
    from .config import load_config
    from .train.loop import train

    config = load_config(args.config, args.set or [])
    output_dir = train(config, resume=args.resume, plan_only=args.plan)
    if args.plan:
        return
    print(f"done: model in {output_dir / 'model'}, metrics in {output_dir / 'metrics.jsonl'}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, quick=args.quick)


def _inspect(args) -> None:
    from .data.inspect import inspect_report, render_example
    from .data.sources import load_records
    from .data.tokenize import TokenizeSettings, tokenize_records
    from .model.load import load_tokenizer

    records = load_records(args.file, format=args.format)
    tokenizer = load_tokenizer(args.model)
    settings = TokenizeSettings(args.max_length, args.max_prompt_length)
    examples, report = tokenize_records(records, tokenizer, settings)
    print(inspect_report(records, examples, report))
    if args.example is not None:
        match = [ex for ex in examples if ex.index == args.example]
        if not match:
            raise SystemExit(f"error: record {args.example} of {args.file} was dropped or does "
                             f"not exist ({len(records)} records)")
        print(render_example(match[0], tokenizer))


def _objectives(args) -> None:
    from .objectives.catalog import markdown, terminal_listing

    print(markdown() if args.markdown else terminal_listing(), end="\n" if not args.markdown else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train on your own preference data")
    train.add_argument("config", nargs="?", help="YAML config file (see examples/); optional "
                       "when every key comes from --set")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.learning_rate=1e-6")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in output_dir")
    train.add_argument("--plan", action="store_true",
                       help="print layout, reference strategy and a memory estimate, then stop")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="DPO on SmolLM2-135M with generated, checkable data")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    demo.set_defaults(run=_demo)

    data = commands.add_parser("data", help="look at a dataset the way preftune sees it")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = data_commands.add_parser("inspect", help="counts and token-level view")
    inspect.add_argument("file")
    inspect.add_argument("--example", type=int, help="show record N token by token")
    inspect.add_argument("--model", default="default", help="whose tokenizer to use")
    inspect.add_argument("--format", default="auto",
                         choices=["auto", "standard", "conversational", "implicit"])
    inspect.add_argument("--max-length", type=int, default=1024)
    inspect.add_argument("--max-prompt-length", type=int, default=512)
    inspect.set_defaults(run=_inspect)

    objectives = commands.add_parser("objectives", help="list the registered objectives")
    objectives.add_argument("--markdown", action="store_true",
                            help="print the catalog as markdown (docs/objectives.md)")
    objectives.set_defaults(run=_objectives)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .data.records import DataError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ConfigError, DataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

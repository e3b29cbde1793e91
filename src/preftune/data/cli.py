"""``preftune data inspect | synthetic | tree | commits | relevance``: look at a dataset the
way preftune sees it, write the demo's checkable tasks, and make pairs: step-level ones from a
policy's search trees, code ones from a repository's history, relevance ones from the answers
to related questions."""

from __future__ import annotations

from pathlib import Path

from ..arguments import COUNT, POSITIVE, add_column_option, add_tokenize_options


def _inspect(args) -> None:
    from ..diffusion.data import inspect_image_data

    shown = inspect_image_data(args.file, args.example, args.fields)  # None: not images to denoise
    if shown is not None:
        print(shown)
        return
    from ..config import prompt_limit
    from ..model.chat_template import use_chat_template
    from ..model.load import given_as, load_tokenizer
    from .inspect import inspect_prompts, inspect_report, prompts_only, render_example
    from .sources import load_records
    from .tokenize import TokenizeSettings, tokenize_records

    settings = TokenizeSettings(args.max_length,
                                prompt_limit(args.max_length, args.max_prompt_length))
    with given_as("--model"):
        tokenizer = load_tokenizer(args.model)
    if args.chat_template is not None:
        use_chat_template(tokenizer, args.chat_template, "--chat-template")
    if prompts_only(args.file, args.fields):  # prompts alone: what online and spo sample from
        print(inspect_prompts(args.file, tokenizer, settings, args.example, args.fields))
        return
    detected: list = []
    records = load_records(args.file, format=args.format, fields=args.fields,
                           detected=detected)
    examples, report = tokenize_records(records, tokenizer, settings)
    print(inspect_report(records, examples, report, detected[0]))
    if args.example is not None:
        match = [ex for ex in examples if ex.index == args.example]
        if not match:
            raise SystemExit(f"error: record {args.example} of {args.file} was dropped or does "
                             f"not exist ({len(records)} records)")
        print(render_example(match[0], tokenizer, records[args.example]))


def _synthetic(args) -> None:
    from ..config import ConfigError
    from .checks import write_task_files
    from .synthetic import generate_split

    from ..train.output import check_output_folder

    out = Path(args.output_dir)
    check_output_folder(out, "--output-dir")
    try:
        train_tasks, eval_tasks = generate_split(args.train, args.eval, seed=args.seed,
                                                 families=args.families,
                                                 hard_negatives=args.hard_negatives)
    except ValueError as error:  # an unknown family, a share outside [0, 1], too few items
        raise ConfigError(f"preftune data synthetic: {error}") from None
    write_task_files({out / "train.jsonl": train_tasks, out / "eval.jsonl": eval_tasks},
                     args.overwrite)
    print(f"wrote {len(train_tasks)} training pairs to {out / 'train.jsonl'}"
          + (f" and {len(eval_tasks)} held-out pairs to {out / 'eval.jsonl'}"
             if eval_tasks else ""))


def escapes_read(text: str) -> str:
    """``text`` with its escapes (``\\n``, ``\\t``, ``\\u3002``) read, other characters kept as
    they are (unicode_escape alone reads its input as Latin-1: '。' came out as 'ã\\x80\\x82')."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _tree(args) -> None:
    from ..api import tree_pairs

    tree_pairs(args.model, args.data, args.output_dir, args.scorer, fields=args.fields,
               max_length=args.max_length, max_prompt_length=args.max_prompt_length,
               dtype=args.dtype, chat_template=args.chat_template, overwrite=args.overwrite,
               branches=args.branches, rollouts=args.rollouts, expansions=args.expansions,
               delimiter=escapes_read(args.delimiter),
               step_tokens=args.step_tokens, answer_tokens=args.answer_tokens,
               min_gap=args.min_gap, temperature=args.temperature, seed=args.seed,
               batch_size=args.batch_size)


def _commits(args) -> None:
    from ..api import pairs_from_commits

    pairs_from_commits(args.repo, args.output, max_commits=args.max_commits,
                       min_words=args.min_words, max_functions=args.max_functions,
                       max_chars=args.max_chars, context=not args.no_context,
                       overwrite=args.overwrite)


def _relevance(args) -> None:
    from ..api import relevance_pairs

    relevance_pairs(args.data, args.output, min_similarity=args.min_similarity,
                    max_similarity=args.max_similarity, encoder=args.encoder,
                    fields=args.fields, overwrite=args.overwrite)


def add_data_commands(commands) -> None:
    from ..cli import command

    data = command(commands, "data", "look at a dataset the way preftune sees it",
                   "preftune data inspect my_pairs.jsonl --example 3",
                   "preftune data synthetic --output-dir runs/synthetic",
                   "preftune data tree --data prompts.jsonl --scorer synthetic --output-dir "
                   "runs/tree")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    inspect = command(data_commands, "inspect", "counts and token-level view",
                      "preftune data inspect my_pairs.jsonl --example 3 --model default")
    inspect.add_argument("file", help="a data file, a dataset directory or hub-cache dataset "
                         "(ORG/NAME), optionally :SPLIT")
    add_column_option(inspect)
    inspect.add_argument("--example", type=COUNT, help="show record N token by token")
    inspect.add_argument("--model", default="default", help="whose tokenizer to use")
    inspect.add_argument("--format", default="auto",
                         choices=["auto", "standard", "conversational", "implicit"],
                         help="how the text fields are read, as data.format")
    add_tokenize_options(inspect)
    inspect.set_defaults(run=_inspect)
    synthetic = command(data_commands, "synthetic", "write the demo's checkable tasks as "
                        "preference pairs (train.jsonl, eval.jsonl)",
                        "preftune data synthetic --output-dir runs/synthetic --train 192 "
                        "--eval 96")
    synthetic.add_argument("--output-dir", default="runs/synthetic",
                           help="where train.jsonl and eval.jsonl go")
    synthetic.add_argument("--train", type=POSITIVE, default=192, help="training pairs")
    synthetic.add_argument("--eval", type=COUNT, default=96, help="held-out pairs")
    synthetic.add_argument("--seed", type=int, default=0,
                           help="the same seed writes the same tasks")
    synthetic.add_argument("--overwrite", action="store_true",
                           help="replace train.jsonl / eval.jsonl that hold other data")
    synthetic.add_argument("--hard-negatives", type=float, default=0.0, metavar="SHARE",
                           help="share of pairs whose rejected answer is a bare wrong answer "
                           "(as short as chosen) instead of a chatty one; field 'negative' "
                           "says which (for reward models, which would otherwise learn length)")
    synthetic.add_argument("--families", type=lambda text: text.split(","), metavar="A,B",
                           help="task families (default: the demo's six); tool_call: calls to "
                           "functions, for model.chat_template "
                           "examples/chat_templates/chatml_tools.jinja")
    synthetic.set_defaults(run=_synthetic)
    tree = command(data_commands, "tree", "step-level pairs from best-first search trees "
                   "of a policy's answers, each step valued by rollouts (Tree-PLV)",
                   "preftune data tree --data runs/synthetic/train.jsonl --scorer synthetic "
                   "--output-dir runs/tree --branches 4 --rollouts 4 --expansions 4")
    tree.add_argument("--data", required=True, help="prompts (any preftune file with a prompt "
                      "field)")
    tree.add_argument("--scorer", required=True,
                      help="what values a finished answer: synthetic, module:function, rm:DIR, "
                           "judge:MODEL or a .yaml combination (pointwise)")
    tree.add_argument("--output-dir", required=True, help="where pairs.jsonl and trees.jsonl go")
    tree.add_argument("--model", default="default", help="the policy that answers")
    tree.add_argument("--branches", type=POSITIVE, default=4, help="next steps per expansion")
    tree.add_argument("--rollouts", type=POSITIVE, default=4,
                      help="completions per step that estimate its value")
    tree.add_argument("--expansions", type=POSITIVE, default=4,
                      help="nodes expanded per prompt, best first")
    tree.add_argument("--delimiter", default="\\n",
                      help="what ends a step (escapes such as \\n are read; default: a line)")
    tree.add_argument("--step-tokens", type=POSITIVE, default=64, help="longest step")
    tree.add_argument("--answer-tokens", type=POSITIVE, default=256,
                      help="longest completion of a rollout")
    tree.add_argument("--min-gap", type=float, default=0.25,
                      help="the value gap a pair of sibling steps needs")
    tree.add_argument("--temperature", type=float, default=1.0,
                      help="sampling temperature of steps and rollouts (above 0)")
    tree.add_argument("--seed", type=int, default=0, help="the same seed grows the same trees")
    tree.add_argument("--batch-size", type=POSITIVE, default=16,
                      help="generation contexts per call")
    tree.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="the policy's weights, as model.dtype")
    tree.add_argument("--overwrite", action="store_true",
                      help="replace pairs.jsonl / trees.jsonl in --output-dir")
    add_column_option(tree)
    add_tokenize_options(tree)
    tree.set_defaults(run=_tree)
    commits = command(data_commands, "commits", "code preference pairs from a git "
                      "history: each changed Python function after a commit over before it, "
                      "the message as the request (CodeFavor's Commit-Instruct)",
                      "preftune data commits --repo path/to/clone --output code_pairs.jsonl")
    commits.add_argument("--repo", required=True, help="a local git clone (with its history)")
    commits.add_argument("--output", required=True, help="the pairs file (JSONL) to write")
    commits.add_argument("--max-commits", type=POSITIVE, default=1000,
                         help="how many commits to read, newest first")
    commits.add_argument("--min-words", type=POSITIVE, default=3,
                         help="commits with shorter messages are passed over")
    commits.add_argument("--max-functions", type=POSITIVE, default=3,
                         help="commits changing more functions are passed over (refactors)")
    commits.add_argument("--max-chars", type=POSITIVE, default=4000,
                         help="longer functions are passed over")
    commits.add_argument("--no-context", action="store_true",
                         help="leave the function's old code out of the prompt")
    commits.add_argument("--overwrite", action="store_true", help="replace --output")
    commits.set_defaults(run=_commits)
    relevance = command(data_commands, "relevance", "pairs that teach a reward model to read "
                        "the question: each prompt's best answer over the best answer to the "
                        "most similar other prompt (axiomatic preference modeling)",
                        "preftune data relevance --data pairs.jsonl --output relevance.jsonl")
    relevance.add_argument("--data", required=True, help="pairs, lists, labelled or rated "
                           "answers: any preftune file with one prompt per record")
    relevance.add_argument("--output", required=True, help="the pairs file (JSONL) to write")
    relevance.add_argument("--min-similarity", type=float, default=0.3,
                           help="a prompt with no other this similar (cosine) makes no pair")
    relevance.add_argument("--max-similarity", type=float, default=0.95,
                           help="more similar prompts are the same question: passed over")
    relevance.add_argument("--encoder", default="minilm",
                           help="the sentence encoder of the prompts (a path, or minilm)")
    add_column_option(relevance)
    relevance.add_argument("--overwrite", action="store_true", help="replace --output")
    relevance.set_defaults(run=_relevance)

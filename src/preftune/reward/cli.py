"""``preftune rm train | eval | score | losses``: the reward-model commands."""

from __future__ import annotations

from ..arguments import POSITIVE, add_column_option, add_dtype_option


def _train(args) -> None:
    from ..api import RewardConfig, train_reward_model

    config = RewardConfig.from_yaml(args.config, args.set or [])
    output_dir = train_reward_model(config, resume=args.resume, overwrite=args.overwrite,
                                    plan_only=args.plan)
    if not args.plan:
        print(done_line(output_dir))


def done_line(output_dir) -> str:
    """What ``rm train`` says at the end: where the model is and what loads it."""
    from .vision import SCORE_FILE

    saved = output_dir / "model"
    if not saved.is_dir():  # model.lora.save_merged: false
        return (f"done: reward model as a LoRA adapter in {output_dir / 'adapter'} (preftune's "
                f"commands load it on its base; PEFT's PeftModel does too), metrics in "
                f"{output_dir / 'metrics.jsonl'}")
    loads = (f"AutoModelForImageTextToText loads the model, {SCORE_FILE} holds its head"
             if (saved / SCORE_FILE).is_file() else "AutoModelForSequenceClassification loads it")
    return f"done: reward model in {saved} ({loads}), metrics in {output_dir / 'metrics.jsonl'}"


def _eval(args) -> None:
    from ..api import evaluate_reward_model

    evaluate_reward_model(args.model, args.data, scorer=args.scorer, output=args.output,
                          category_field=args.category_field, bins=args.bins,
                          batch_size=args.batch_size, fields=args.fields, dtype=args.dtype)


def _score(args) -> None:
    from ..api import score_with_reward_model

    score_with_reward_model(args.model, args.data, args.output, batch_size=args.batch_size,
                            field=args.field, overwrite=args.overwrite, fields=args.fields,
                            dtype=args.dtype)


def _strength(args) -> None:
    from ..api import preference_strength

    preference_strength(args.model, args.data, args.output, passes=args.passes,
                        dropout=args.dropout, flip=args.flip, field=args.field,
                        seed=args.seed, batch_size=args.batch_size, overwrite=args.overwrite,
                        fields=args.fields, dtype=args.dtype)


def _fit_cpm(args) -> None:
    from ..api import fit_compositional

    fit_compositional(args.scorer_file, args.data, args.output, l2=args.l2,
                      overwrite=args.overwrite, fields=args.fields, dtype=args.dtype)


def _losses(args) -> None:
    from .losses import REWARD_LOSSES

    for name, spec in sorted(REWARD_LOSSES.items()):
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults().items()) or "-"
        print(f"{name:<14} {spec.summary}\n{'':<14} data: {', '.join(spec.data)}; heads: "
              f"{', '.join(spec.heads)}; params: {defaults}; paper: {spec.paper}")


def add_rm_commands(commands) -> None:
    from ..cli import add_config_arguments, command

    rm = command(commands, "rm", "reward and preference models: train, eval, score, "
                 "strength, fit-cpm",
                 "preftune rm train examples/rm/bt.yaml --set data.train=my_pairs.jsonl",
                 "preftune rm score --model runs/rm --data samples.jsonl --output scored.jsonl")
    sub = rm.add_subparsers(dest="rm_command", required=True)

    train = command(sub, "train", "train a reward model (see examples/rm/)",
                    "preftune rm train examples/rm/bt.yaml --set data.train=my_pairs.jsonl",
                    "preftune rm train examples/rm/bt.yaml --resume",
                    "preftune rm train examples/rm/bt.yaml --plan")
    add_config_arguments(train, "examples/rm/", "loss.name=bt_margin")
    train.add_argument("--plan", action="store_true",
                       help="print the layout and a memory estimate, then stop")
    train.set_defaults(run=_train)

    evaluate = command(sub, "eval", "how a reward model or any scorer orders pairs: accuracy "
                       "(by category and length), calibration (ECE, reliability plot), reward "
                       "distribution",
                       "preftune rm eval --model runs/rm --data held_out.jsonl\n"
                       "  preftune rm eval --scorer follow-up:default --data held_out.jsonl")
    measured = evaluate.add_mutually_exclusive_group(required=True)
    measured.add_argument("--model", help="a reward-model run dir or model dir")
    measured.add_argument("--scorer", help="instead of a reward model, any scorer (see "
                          "'Scorers' in the README): judge:MODEL, follow-up:MODEL, "
                          "module:function, a .yaml file")
    evaluate.add_argument("--data", required=True, help="pairs or ranked lists (JSONL, ...)")
    add_column_option(evaluate)
    evaluate.add_argument("--output", help="output dir (default: the run dir, else the cwd)")
    evaluate.add_argument("--category-field",
                          help="record field whose values group the accuracy (default: "
                               "'category', where the records have it)")
    evaluate.add_argument("--bins", type=POSITIVE, default=10, help="confidence bins of the ECE")
    evaluate.add_argument("--batch-size", type=POSITIVE, default=16,
                          help="records per forward pass")
    add_dtype_option(evaluate, "the reward model (or the scorer's model)")
    evaluate.set_defaults(run=_eval)

    score = command(sub, "score", "score (prompt, response) records, pairs or lists; writes "
                    "each input row with its scores",
                    "preftune rm score --model runs/rm --data samples.jsonl --output scored.jsonl")
    score.add_argument("--model", required=True, help="a reward-model run dir or model dir")
    score.add_argument("--data", required=True, help="records to score (JSONL, JSON, ...)")
    add_column_option(score)
    score.add_argument("--output", required=True, help="JSONL file to write")
    score.add_argument("--field", default="score", help="name of the score fields: pairs get "
                       "chosen_NAME / rejected_NAME (what odpo and modpo read), lists NAMEs, "
                       "single responses NAME (default score)")
    score.add_argument("--overwrite", action="store_true",
                       help="replace score fields the input rows already have, and an "
                            "existing --output file")
    score.add_argument("--batch-size", type=POSITIVE, default=16,
                          help="records per forward pass")
    add_dtype_option(score, "the reward model")
    score.set_defaults(run=_score)

    strength = command(sub, "strength", "how strongly an ensemble of reward models (or one "
                       "under MC dropout) agrees with each pair's label: mean, spread and "
                       "agreement of the reward gaps; --flip swaps pairs they reverse",
                       "preftune rm strength --model runs/rm_0 --model runs/rm_1 --model "
                       "runs/rm_2 --data pairs.jsonl --output strength.jsonl --flip\n"
                       "  preftune rm strength --model runs/rm --passes 16 --dropout 0.1 "
                       "--data pairs.jsonl --output strength.jsonl")
    strength.add_argument("--model", required=True, action="append",
                          help="a reward-model run dir or model dir; repeat for an ensemble")
    strength.add_argument("--data", required=True, help="pairs (JSONL, JSON, ...)")
    add_column_option(strength)
    strength.add_argument("--output", required=True, help="JSONL file to write")
    strength.add_argument("--passes", type=POSITIVE, default=1,
                          help="scorings per model, each with its own dropout masks (MC "
                               "dropout; needs --dropout)")
    strength.add_argument("--dropout", type=float, default=0.0,
                          help="share of the head's input features dropped in each pass")
    strength.add_argument("--flip", action="store_true",
                          help="write pairs whose mean strength is below 0 with chosen and "
                               "rejected swapped (and NAME_flipped: true)")
    strength.add_argument("--field", default="strength",
                          help="NAME of the fields written: NAME (mean), NAME_std, "
                               "NAME_agreement (default strength)")
    strength.add_argument("--seed", type=int, default=0, help="seed of the dropout masks")
    strength.add_argument("--overwrite", action="store_true",
                          help="replace fields the rows already have, and an existing --output")
    strength.add_argument("--batch-size", type=POSITIVE, default=16,
                          help="records per forward pass")
    add_dtype_option(strength, "each reward model")
    strength.set_defaults(run=_strength)

    fit_cpm = command(sub, "fit-cpm", "fit a compositional preference model: a judge rates "
                      "each response on named features, a logistic regression on labelled "
                      "pairs weights them (CPM)",
                      "preftune rm fit-cpm examples/scorers/cpm.yaml --data pairs.jsonl "
                      "--output cpm_fitted.yaml")
    fit_cpm.add_argument("scorer_file", help="a scorer file with a 'compositional' mapping "
                         "(judge, features)")
    fit_cpm.add_argument("--data", required=True, help="labelled pairs (JSONL, JSON, ...)")
    add_column_option(fit_cpm)
    fit_cpm.add_argument("--output", required=True,
                         help="the scorer file to write, with the fitted weights")
    fit_cpm.add_argument("--l2", type=float, default=0.01,
                         help="L2 penalty on the weights (above 0)")
    fit_cpm.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_dtype_option(fit_cpm, "the judge")
    fit_cpm.set_defaults(run=_fit_cpm)

    losses = command(sub, "losses", "list the reward losses", "preftune rm losses")
    losses.set_defaults(run=_losses)

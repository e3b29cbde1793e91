"""``preftune online``: rounds of sample -> score -> build -> train -> evaluate.

Each round r writes ``round-r/``: ``samples.jsonl`` (the policy's responses, with the round, the
policy's weight hash and the sampling settings), ``scored.jsonl`` (plus the scorer's scores),
``pairs.jsonl`` (the training rows, each naming the sample it came from), then the usual
training outputs of ``preftune train`` (``model/``, ``metrics.jsonl``, ``run.json``) and
``eval.json`` / ``eval_answers.jsonl`` (greedy answers to ``data.eval``'s prompts, scored).
``phases.json`` records each finished phase; ``--resume`` skips them, and a training phase
that was cut off continues from its last checkpoint. Training is ``preftune train`` itself
(``train.loop.train``) on the round's pairs: same layouts, references, alarms and checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from ..config import Config, ConfigError, build_config
from ..data.images import stored_images
from ..data.rows import write_rows
from ..train.stopping import LATE_STOPS, stop_if_asked
from ..generation import HFGenerator
from ..model.adapter_dirs import final_model_dir
from ..model.load import files_fingerprint, load_tokenizer, released
from ..objectives import get_objective
from ..score import check_scorer
from ..score.base import preference_matrix, scored_in_chunks
from ..train.checkpoint import latest_checkpoint
from ..train.logging import read_metrics
from ..train.loop import train
from ..train.output import (check_resume, move_aside, one_of, prepare_output_dir,
                            same_settings, write_json)
from ..train.run_lock import holding_output_dirs
from .build import DATA_PAIR_BUILDERS, LIST_BUILDERS, build_rows, why_no_rows, win_probs
from .common import (Prompt, check_image_prompts, load_on_device, online_scorer, prompt_images,
                     prompts_to_ids, read_json_text, read_jsonl, read_prompts, row_question)
from .config import OnlineConfig
from .diversity import add_pair_diversity, check_divpo_encoder, needs_surprisal
from .estimator import check_estimator, estimator_probs, select_pairs
from .measure import evaluate_model, samples_under


@holding_output_dirs
def run_online(config: OnlineConfig, resume: bool = False, overwrite: bool = False,
               plan_only: bool = False) -> Path:
    """Run every round of ``config`` (or what is left of them with ``resume``; ``overwrite``
    moves a previous run in output_dir aside). ``plan_only`` prints the plan of the rounds
    (sampling and training memory) and stops before anything is written."""
    LATE_STOPS.clear()  # (a signal an earlier run of this process let finish)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("preftune online runs in one process (its rounds sample, score and "
                          "train one after another, on one device); start it without "
                          "torch.distributed.run or accelerate launch.")
    try:  # before anything is written or loaded
        check_scorer(config.online.scorer, config.data.train)
    except ConfigError as error:
        raise ConfigError(f"online.scorer: {error}") from None
    if config.online.pairs.estimator is not None:
        check_estimator(config.online.pairs.estimator)
    check_divpo_encoder(config.online.pairs)
    prompts = _prompts(config.data.train, config)  # a bad file stops the run before output_dir
    eval_prompts = _prompts(config.data.eval, config) if config.data.eval else []
    _check_data_responses(config, prompts)
    check_image_prompts(config, prompts + eval_prompts)
    _say_cut_samples(config)
    if plan_only:
        from .plan import online_plan

        print(online_plan(config, prompts, eval_prompts))
        return Path(config.output_dir)
    out = start_rounds(config, resume, overwrite)
    summary = {"initial": None, "rounds": []}
    if eval_prompts:
        summary["initial"] = run_phase(out / "initial", "evaluate", lambda: evaluate_model(
            config, config.model.path, eval_prompts, out / "initial"))
    if config.online.mode == "per_step":
        return _per_step(config, prompts, eval_prompts, summary, resume)
    for r in range(1, config.online.rounds + 1):
        summary["rounds"].append(run_round(config, r, prompts, eval_prompts))
        write_json(out / "online.json", summary)
    return out


def _say_cut_samples(config: OnlineConfig) -> None:
    """A note where a sample of max_new_tokens after a prompt of max_prompt_length tokens
    does not fit data.max_length: it is scored whole but trains cut."""
    data, new = config.data, config.online.sampling.max_new_tokens
    room = data.max_length - (data.max_prompt_length or 0)
    if data.max_prompt_length is not None and new > room:
        print(f"note: online.sampling.max_new_tokens ({new}) is more than the {room} tokens "
              f"data.max_length ({data.max_length}) leaves after a prompt of "
              f"data.max_prompt_length ({data.max_prompt_length}): such samples are scored "
              "whole but train cut (response_truncated in each round's data_report.json); "
              f"raise data.max_length to {data.max_prompt_length + new}, or lower one of them.")


def start_rounds(config, resume: bool, overwrite: bool) -> Path:
    """The output directory of a run of rounds made ready, with its ``config.yaml``: a run
    already there needs ``resume`` (continued under the same settings, more or fewer rounds
    allowed) or ``overwrite`` (moved aside)."""
    out = Path(config.output_dir)
    one_of(resume, overwrite)  # (it moved the finished run aside and started over)
    if has_started(out) and not (resume or overwrite):
        raise ConfigError(f"{out} already holds an online run; continue it with --resume, start "
                          "over with --overwrite (the old run is moved aside), or choose another "
                          "output_dir.")
    aside = move_aside(out) if has_started(out) and overwrite else None
    if resume:
        check_resume(config, may_change=ROUNDS_MAY_CHANGE)
    prepare_output_dir(str(out), resume=resume, aside=aside)
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    return out


ROUNDS_MAY_CHANGE = frozenset({"online.rounds"})  # a resumed run may add rounds


def continues(config) -> bool:
    """Whether ``config.output_dir`` holds a run that ``config`` may resume (text and
    diffusion online configs alike)."""
    return has_started(config.output_dir) and same_settings(config, ROUNDS_MAY_CHANGE)


def has_started(output_dir) -> bool:
    """Whether ``output_dir`` holds (part of) an online run."""
    out = Path(output_dir)
    return (out / "online.json").exists() or (out / "initial").exists() \
        or any(out.glob("round-*"))


def run_round(config: OnlineConfig, r: int, prompts: list, eval_prompts: list) -> dict:
    out = Path(config.output_dir)
    here = out / f"round-{r}"
    here.mkdir(parents=True, exist_ok=True)
    policy = policy_before(out, r, config.model.path)
    mine = _round_prompts(prompts, config.online.prompts_per_round, r)
    info = {"round": r, "policy": policy}
    info["sample"] = run_phase(here, "sample", lambda: _sample(config, r, policy, mine, here))
    info["score"] = run_phase(here, "score", lambda: _score(config, policy, here))
    info["build"] = run_phase(here, "build", lambda: _build(config, r, here))
    if info["build"]["rows"]:
        info["train"] = run_phase(here, "train", lambda: _train(config, r, policy, here))
    else:  # nothing to learn from this round's samples: the next round starts from `policy`
        why = why_no_rows(info["build"], info["score"]["scorer"])
        print(f"round {r}: no training rows ({why}); no training this round (more samples, or "
              "more varied ones, would help)")
        info["train"] = run_phase(here, "train",
                                  lambda: {"skipped": f"no training rows ({why})"})
    stop_if_asked(f"after round {r}'s training")
    trained = str(final_model_dir(here)) if "skipped" not in info["train"] else policy
    if eval_prompts:
        info["evaluate"] = run_phase(here, "evaluate", lambda: evaluate_model(
            config, trained, eval_prompts, here))
    return info


def policy_before(out: Path, r: int, initial: str) -> str:
    """The model round r starts from: the newest earlier round's trained model (a round that
    built no pairs trains nothing), else the initial model."""
    for earlier in range(r - 1, 0, -1):
        trained = final_model_dir(out / f"round-{earlier}")
        if trained.is_dir():
            return str(trained)
    return initial


def _per_step(config: OnlineConfig, prompts: list, eval_prompts: list, summary: dict,
              resume: bool) -> Path:
    """online.mode per_step: one training run whose every step samples (see ``per_step.py``),
    then the held-out evaluation; ``online.json`` has them as one round."""
    from .per_step import run_per_step

    out = Path(config.output_dir)
    here = out / "round-1"
    checkpoint = latest_checkpoint(here / "checkpoints")
    step_config = config.model_copy(update={"output_dir": str(here)})
    info = {"round": 1, "policy": config.model.path}

    def train_per_step() -> dict:
        def scorer_of(policy):  # judge:policy and its kin: the policy as it trains
            return online_scorer(config, "policy", config.data.train, policy)

        run_per_step(step_config, prompts, scorer_of, resume=resume and checkpoint is not None)
        return _train_result(here)

    info["train"] = run_phase(here, "train", train_per_step)
    stop_if_asked("after training")
    if eval_prompts:
        info["evaluate"] = run_phase(here, "evaluate", lambda: evaluate_model(
            config, str(final_model_dir(here)), eval_prompts, here))
    summary["rounds"].append(info)
    write_json(out / "online.json", summary)
    return out


def run_phase(here: Path, name: str, work) -> dict:
    """Run ``work`` unless ``phases.json`` says it finished; record what it returns. The
    phase's models are freed before the next phase loads its own (``released``)."""
    record = here / "phases.json"
    done = read_json_text(record.read_text(), record) if record.exists() else {}
    if name in done:
        return done[name]
    started = time.perf_counter()
    result = {**released(work), "seconds": round(time.perf_counter() - started, 2)}
    done[name] = result
    write_json(record, done)
    return result


def _prompts(paths, config: OnlineConfig) -> list[Prompt]:
    """Each distinct prompt of the data file(s) (``read_prompts``), ``data.fields`` naming
    the columns."""
    return read_prompts(paths, config.data.fields, "an online run samples answers to each "
                        "row's prompt", "data.fields")


def _check_data_responses(config: OnlineConfig, prompts: list) -> None:
    """D2O's builder pairs each prompt's samples with its row's rejected response, SELM's
    ranks a sample with its row's chosen and rejected: prompts without them train nothing,
    so data with none is refused before any round (it ran every round, training nothing)."""
    from ..data.records import DataError

    builder = config.online.pairs.builder
    needs = {"d2o": ("negative",), "selm": ("positive", "negative")}.get(builder, ())
    if needs and not any(all(getattr(p, side) for side in needs) for p in prompts):
        fields = " and ".join(repr({"positive": "chosen", "negative": "rejected"}[side])
                              for side in needs)
        raise DataError(f"{config.data.train}: online.pairs.builder {builder} uses each row's "
                        f"{fields} response, and no row has {'them' if len(needs) > 1 else 'one'}"
                        "; give pairs data (prompt, chosen, rejected), or another builder.")


def _round_prompts(prompts: list, per_round: int | None, r: int) -> list:
    """All prompts, or the r-th slice of ``per_round`` of them (wrapping around the file)."""
    if not per_round or per_round >= len(prompts):
        return prompts
    start = (r - 1) * per_round
    return [prompts[(start + k) % len(prompts)] for k in range(per_round)]


def _sample(config: OnlineConfig, r: int, policy: str, prompts: list, here: Path) -> dict:
    sampling = config.online.sampling
    settings = sampling.settings(seed=config.train.seed * 1000 + r)
    if sampling.backend == "vllm":
        from ..generation_vllm import VLLMGenerator

        tokenizer = load_tokenizer(policy, config.model.trust_remote_code,
                                   config.model.chat_template)
        generator = VLLMGenerator.from_pretrained(policy, tokenizer, config.model.dtype,
                                                  sampling.vllm_memory, settings.seed)
    else:
        model, tokenizer = load_on_device(policy, config)
        generator = HFGenerator(model, tokenizer)
    generations = generator.generate(prompts_to_ids(prompts, tokenizer, config), settings,
                                     f"round {r}: sampling", prompt_images(prompts))
    if sampling.backend == "vllm":
        generator.close()
    surprisal = None
    if needs_surprisal(config.online.pairs):  # DivPO's logprob criterion: -log pi(y|x) / |y|
        if sampling.backend == "vllm":
            model, tokenizer = load_on_device(policy, config)
        under = samples_under(model, tokenizer, prompts, generations.token_ids, config,
                              f"round {r}: surprisal")
        surprisal = (-under.logps / under.token_counts.clamp(min=1)).tolist()
    provenance = {"round": r, "policy": files_fingerprint(policy)[:16],
                  "sampling": {**asdict(settings), "backend": sampling.backend}}
    rows = [{"prompt": p.prompt, "responses": texts, "ended": ended, "origin": p.origin,
             **({"tools": list(p.tools)} if p.tools else {}),  # on to the pairs built
             **({"images": stored_images(p.images, here.parent / "images")}
                if p.images else {}),
             **({"negative": p.negative} if p.negative else {}),
             **({"positive": p.positive} if p.positive else {}),
             **({"surprisal": [round(v, 6) for v in surprisal[n]]} if surprisal else {}),
             **provenance}
            for n, (p, texts, ended) in enumerate(zip(prompts, generations.texts,
                                                      generations.ended))]
    write_rows(here / "samples.jsonl", rows)
    return {"prompts": len(rows), "samples": len(rows) * settings.samples,
            "new_tokens": generations.new_tokens,
            "tokens_per_second": round(generations.tokens_per_second, 1)}


def _score(config: OnlineConfig, policy: str, here: Path) -> dict:
    scorer = online_scorer(config, policy, config.data.train)
    rows = read_jsonl(here / "samples.jsonl")
    # SELM ranks each sample with the data's chosen and rejected: they are scored too
    with_data = config.online.pairs.builder in DATA_PAIR_BUILDERS
    candidates = [row["responses"] + ([row["positive"], row["negative"]] if with_data and
                                      row.get("positive") and row.get("negative") else [])
                  for row in rows]
    flat_prompts = [row_question(row) for row, texts in zip(rows, candidates) for _ in texts]
    flat = [text for texts in candidates for text in texts]
    scores = None if scorer.pairwise else scored_in_chunks(
        scorer.score, f"{here.name}: scoring", flat_prompts, flat)
    at = 0
    for row, texts in zip(rows, candidates):
        k = len(row["responses"])
        if scores is not None:
            row["scores"] = scores[at : at + k]
            if len(texts) > k:
                row["data_scores"] = scores[at + k : at + len(texts)]
        if scorer.pairwise:  # it ranks by win rate (a pointwise one's: from the scores)
            row["win_probs"] = row["scores"] = win_probs(
                preference_matrix(scorer, row_question(row), row["responses"]))
        row["scorer"] = scorer.name
        if getattr(scorer, "worst", None):  # maxmin: the worst-served group's term
            row["scored_by"] = scorer.worst
        at += len(texts)
    add_pair_diversity(rows, config.online.pairs)  # divpo: each sample's diversity
    write_rows(here / "scored.jsonl", rows)
    values = [s for row in rows for s in row["scores"]]
    return {"scorer": scorer.name, "mean": statistics.fmean(values),
            "std": statistics.pstdev(values), "min": min(values), "max": max(values)}


def _build(config: OnlineConfig, r: int, here: Path) -> dict:
    pairs = config.online.pairs
    scored = read_jsonl(here / "scored.jsonl")
    seed = config.train.seed * 1000 + r
    rows, counts = build_rows(scored, pairs.builder, pairs.min_margin, pairs.rso_beta,
                              pairs.rso_accept, seed=seed, divpo_rho=pairs.divpo_rho,
                              unfinished_penalty=pairs.unfinished_penalty,
                              with_win_probs=pairs.win_probs)
    write_rows(here / "pairs.jsonl", rows)
    if pairs.estimator is not None and rows:  # keep the pairs the estimator is sure of
        probs = estimator_probs(pairs.estimator, here / "pairs.jsonl", seed,
                                config.model.dtype)
        rows, dropped, dropped_counts = select_pairs(rows, probs, pairs.estimator)
        write_rows(here / "pairs_dropped.jsonl", dropped)
        write_rows(here / "pairs.jsonl", rows)
        counts.update(dropped_counts, rows=len(rows))
    return counts


def round_config(config: OnlineConfig, r: int, policy: str, here: Path) -> Config:
    """The ``preftune train`` config of round r: the online config's model, objective, reference
    and train sections on the round's pairs, the reference by ``online.reference``."""
    tree = config.model_dump(exclude={"online"})
    data = "ranked" if config.online.pairs.builder in LIST_BUILDERS else "pairs"
    unpaired = all(get_objective(t.name).data == "unpaired" for t in config.objective)
    tree["data"] = {"train": str(here / "pairs.jsonl"), "max_length": config.data.max_length,
                    "max_prompt_length": config.data.max_prompt_length, "shape": data,
                    "convert": "unpaired" if unpaired and data == "pairs" else None}
    tree["model"]["path"] = policy
    tree["output_dir"] = str(here)
    tree["train"]["eval_every"] = None
    initial = config.model.path
    tree["reference"]["model"] = initial if config.online.reference == "initial" \
        and policy != initial else None
    return build_config(tree, f"round {r}")


def _train(config: OnlineConfig, r: int, policy: str, here: Path) -> dict:
    checkpoint = latest_checkpoint(here / "checkpoints")
    if checkpoint is None:  # cut off before its first checkpoint: the phase starts over
        for name in ("metrics.jsonl", "alarms.jsonl", "run.json"):
            (here / name).unlink(missing_ok=True)
        for folder in ("model", "adapter"):
            shutil.rmtree(here / folder, ignore_errors=True)
    train(round_config(config, r, policy, here), resume=checkpoint is not None)
    return _train_result(here)


def _train_result(here: Path) -> dict:
    """The last logged step of a round's training."""
    last = read_metrics(here / "metrics.jsonl")[-1]
    return {"steps": last["step"], "loss": last["loss"],
            **{k: last[k] for k in ("rewards/accuracies", "rewards/margins") if k in last},
            "train_seconds": json.loads((here / "run.json").read_text())["train_seconds"]}



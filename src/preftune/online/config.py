"""Typed configuration of ``preftune online``: a policy config (model, objective, reference,
train: what each round's training does) plus the ``online`` section: the rounds, how samples are
drawn, scored and paired, and what is measured after each round."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..config import Config, Count, NonNegative, Positive, Section, Share
from ..config_model import refuse_unused
from ..generation import SamplingSettings
from ..objectives import REGISTRY, get_objective
from ..reward.strength import no_spread
from .build import BUILDERS, DATA_PAIR_BUILDERS, LIST_BUILDERS
from .diversity import CRITERIA


class SamplingSection(Section):
    samples: Count = 4
    """Responses per prompt: at least 2 (pairs are made of them), except for the builders
    that rank one sample with the data's pair (selm)."""
    temperature: Positive = 1.0
    """Sampling temperature (above 0: pairs need different samples)."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Keep the k most likely tokens; 0: no top-k cut."""
    max_new_tokens: Count = 64
    """Longest sampled response, in tokens."""
    stop: list[str] = []
    """Strings that end a response."""
    batch_size: Count = 16
    """Prompts per generate call."""
    backend: Literal["hf", "vllm"] = "hf"
    """hf: transformers generate; vllm: vLLM (installed, CUDA), loaded from the round's
    policy."""
    vllm_memory: Annotated[float, Field(gt=0, le=1)] = 0.3
    """Share of GPU memory vLLM may hold while it samples."""

    @model_validator(mode="after")
    def _vllm_settings_need_vllm(self):
        if self.backend != "vllm":
            refuse_unused(self, ("vllm_memory",), "online.sampling",
                          f"with backend {self.backend} (it is vLLM's share)")
        return self

    def settings(self, seed: int, **changes) -> SamplingSettings:
        """These settings for one draw, with ``seed`` and any ``changes``."""
        values = self.model_dump(exclude={"backend", "vllm_memory"})
        return SamplingSettings(**{**values, **changes}, seed=seed)


ESTIMATOR_KEYS = {"where": "online.pairs.estimator: ", "passes": "passes", "dropout": "dropout",
                  "models": "list several models"}


class EstimatorSection(Section):
    """UPO's reliable-pair sampling (arXiv:2409.11212): an estimator scores each built pair
    several times (an ensemble of reward models, or one under MC dropout) and only the pairs it
    is surest of train; each keeps ``estimator_prob`` (mean P(chosen > rejected) over the
    members) and ``estimator_std`` (their spread), which ``train.example_weight_field`` can
    read."""

    models: list[str] = []
    """Reward models (``preftune rm train`` run or model dirs): several make an ensemble."""
    passes: Count = 1
    """Scorings per model, each with its own dropout masks (MC dropout; needs dropout)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Share of the features the reward head reads dropped in each pass."""
    min_prob: Annotated[float, Field(ge=0, lt=1)] = 0.5
    """Drop pairs whose mean P(chosen > rejected) is below this: the estimator reverses them."""
    keep: Share = 1.0
    """Share of the remaining pairs kept, those with the smallest spread first."""

    @model_validator(mode="after")
    def _has_a_spread(self):
        if not self.models:
            raise ValueError("online.pairs.estimator.models is required: the reward model(s) "
                             "that judge each built pair.")
        problem = no_spread(len(self.models), self.passes, self.dropout, ESTIMATOR_KEYS)
        if problem is not None:
            raise ValueError(problem)
        return self


class PairsSection(Section):
    builder: Literal[BUILDERS] = "best_vs_worst"  # type: ignore[valid-type]
    """How scored samples become training examples (pairs, or lists for listwise
    objectives); selm: the round's first sample ranked with the data's chosen and rejected,
    kept as the third response (objective selm)."""
    min_margin: NonNegative = 0.0
    """Drop pairs whose score gap is smaller."""
    rso_beta: Positive = 0.5
    """rso: the temperature of pi* ~ pi exp(r / beta)."""
    rso_accept: Count = 4
    """rso: samples accepted per prompt (paired two by two)."""
    divpo_criterion: Literal[CRITERIA] = "logprob"  # type: ignore[valid-type]
    """divpo: what makes a sample diverse: logprob (the policy's mean surprisal per token),
    words (rare words in the prompt's pool of samples), embedding (far from the other samples
    in a sentence encoder's space)."""
    divpo_rho: Annotated[float, Field(gt=0, lt=0.5)] = 0.3
    """divpo: the good pool is the samples within this share of the prompt's score range from
    the top, the bad pool within it from the bottom."""
    divpo_encoder: str = "minilm"
    """divpo with criterion embedding: the sentence encoder (a path, or minilm)."""
    win_probs: bool = False
    """Add chosen_win_prob / rejected_win_prob (sppo_soft)."""
    estimator: EstimatorSection | None = None
    """Keep only the pairs an estimator is sure of (UPO); null: every built pair trains."""
    unfinished_penalty: NonNegative = 0.0
    """Subtracted from the score of each sample cut off at max_new_tokens (it never ended its
    turn) before pairs are built, so an answer that ends wins over an equal cut-off one (TRL's
    missing_eos_penalty); the rows' scores include it."""

    @model_validator(mode="after")
    def _rso_settings_need_rso(self):
        if self.builder != "rso":
            refuse_unused(self, ("rso_beta", "rso_accept"), "online.pairs",
                          f"with builder {self.builder} (it is for builder rso)")
        if self.builder != "divpo":
            refuse_unused(self, ("divpo_criterion", "divpo_rho", "divpo_encoder"),
                          "online.pairs", f"with builder {self.builder} (it is for builder divpo)")
        elif self.divpo_criterion != "embedding":
            refuse_unused(self, ("divpo_encoder",), "online.pairs",
                          f"with divpo_criterion {self.divpo_criterion} (it is the embedding "
                          "criterion's encoder)")
        return self


class OnlineSection(Section):
    mode: Literal["rounds", "per_step"] = "rounds"
    """rounds: sample -> score -> build -> train -> evaluate, round after round; per_step:
    every optimizer step samples from the current policy (online DPO), reference = initial
    model."""
    rounds: Count = 2
    """How many rounds."""
    scorer: str = ""
    """What judges the samples: synthetic, module:function, a registered scorer name, rm:DIR,
    judge:MODEL, judge-pair:MODEL or a .yaml combination."""
    prompts_per_round: Count | None = None
    """Prompts sampled per round (a new slice each round); null: every prompt of data.train."""
    reference: Literal["initial", "previous"] = "initial"
    """Each round's reference: the initial model, or the previous round's (SPPO/DNO/SELM)."""
    sampling: SamplingSection = SamplingSection()
    """How responses are sampled."""
    pairs: PairsSection = PairsSection()
    """How scored samples become pairs or lists."""
    eval_max_new_tokens: Count = 64
    """Greedy answers to data.eval's prompts after each round, up to this many tokens."""
    eval_kl_samples: Annotated[int, Field(ge=0)] = 2
    """Samples per held-out prompt from each evaluated model: their diversity (2 or more) and
    the KL of each round's model to the initial one (0: off)."""
    eval_best_of: Annotated[int, Field(ge=0, json_schema_extra={"not": {"const": 1}})] = 0
    """Best-of-n baseline: n samples of the initial model per held-out prompt, the best scored
    (what BoNBoN imitates); 0: off."""


class OnlineConfig(Config):
    """A ``preftune online`` run: a policy config plus the ``online`` section."""

    online: OnlineSection = OnlineSection()
    """Rounds, sampling, scoring, pairing and per-round evaluation."""

    @model_validator(mode="after")
    def _online_settings(self):
        online = self.online
        if not online.scorer:
            raise ValueError("online.scorer is required: what judges the samples (synthetic, "
                             "module:function, rm:DIR or a .yaml combination).")
        builder = online.pairs.builder
        with_data = builder in DATA_PAIR_BUILDERS  # one sample, ranked with the data's pair
        if online.sampling.samples < 2 and not with_data:
            raise ValueError("online.sampling.samples must be at least 2: pairs are made from "
                             "several samples of the same prompt.")
        if online.mode == "per_step":
            self._check_per_step()
        self._check_declared_builders()
        if with_data and (online.reference != "previous"
                          or online.scorer.startswith("judge-pair:") or online.mode != "rounds"):
            raise ValueError(f"online.pairs.builder {builder} samples y_ref from the round's "
                             "starting model, which must be the reference: set "
                             "online.reference: previous, online.mode: rounds, and a pointwise "
                             "scorer (it scores the sample and the data's chosen and rejected).")
        if online.sampling.temperature <= 0:
            raise ValueError("online.sampling.temperature must be above 0: greedy decoding gives "
                             "the same answer every time, so nothing could be paired.")
        if not self.data.train:
            raise ValueError("data.train is required: the prompts to sample from (any preftune "
                             "data file; only its prompt field is read).")
        if self.data.convert is not None:
            raise ValueError("data.convert does nothing in an online run: the pairs (or lists) "
                             "are built from the samples by online.pairs.builder.")
        data = "ranked" if builder in LIST_BUILDERS else "pairs"
        if online.pairs.estimator is not None and data == "ranked":
            raise ValueError(f"online.pairs.estimator judges pairs; builder {builder} makes "
                             "lists. Use a pair builder, or remove the estimator.")
        wanted = {term.name for term in self.objective}
        for name in wanted:
            if get_objective(name).data not in (data, "unpaired"):
                fits = ("a pair builder (best_vs_worst, the default; all_pairs, ...)"
                        if get_objective(name).data == "pairs" else
                        "builder 'list' (or 'd2o') for listwise objectives")
                raise ValueError(f"objective {name} trains on {get_objective(name).data} data, "
                                 f"but online.pairs.builder {online.pairs.builder!r} makes "
                                 f"{data}; use {fits}.")
        for term in self.objective:  # a parameter `n` is the samples its pairs are drawn from
            defaults = get_objective(term.name).defaults()
            n = (term.model_extra or {}).get("n", defaults.get("n"))
            if n is not None and n != online.sampling.samples:
                raise ValueError(f"objective {term.name}'s n ({n}) must equal "
                                 f"online.sampling.samples ({online.sampling.samples}): its target "
                                 "is the gap between the best and worst of exactly n samples.")
        lora = self.model.lora
        if online.sampling.backend == "vllm" and lora is not None and not lora.save_merged:
            raise ValueError("online.sampling.backend vllm loads each round's model from its "
                             "directory, and LoRA writes one only with model.lora.save_merged: "
                             "true; set it, or sample with backend hf.")
        if online.eval_best_of == 1 or online.eval_best_of < 0:
            raise ValueError("online.eval_best_of is 0 (off) or the n of best-of-n, at least 2.")
        if online.eval_best_of and not self.data.eval:
            raise ValueError("online.eval_best_of samples the initial model on data.eval's "
                             "prompts; set data.eval, or remove eval_best_of.")
        if self.reference.model is not None:
            raise ValueError("reference.model is set by online.reference in an online run "
                             "(initial or previous); remove it.")
        if self.reference.strategy == "adapter-off" and online.reference == "initial" \
                and online.mode == "rounds" and online.rounds > 1:
            raise ValueError("reference.strategy: adapter-off shows each round's own starting "
                             "model without its adapters, which after round 1 is the previous "
                             "round's, not the initial model online.reference: initial asks "
                             "for; use live or precomputed (or online.reference: previous).")
        if self.train.eval_generations is not None:
            raise ValueError("train.eval_generations does nothing in an online run: it answers "
                             "and scores the held-out prompts after every round already "
                             "(online.eval_max_new_tokens, eval_answers.jsonl); remove it.")
        if self.reference.sync_every is not None and online.mode == "rounds":
            raise ValueError("reference.sync_every moves the reference within one run: it works "
                             "with online.mode per_step; rounds move it by online.reference "
                             "(previous). Remove it, or use per_step.")
        return self

    def _check_per_step(self) -> None:
        """What online.mode per_step cannot do: it trains pairwise objectives on each step's
        fresh pairs, against the initial model, with nothing made per round."""
        online = self.online
        for spec in (get_objective(term.name) for term in self.objective):
            needs = ("lists" if spec.data == "ranked" or spec.online_builder in LIST_BUILDERS
                     else "win probabilities" if spec.online_win_probs
                     else "samples of the reference" if spec.reference_samples
                     else "the data's pairs beside a sample" if spec.online_builder else None)
            if needs:
                raise ValueError(f"objective {spec.name} trains on {needs}, which online.mode "
                                 "per_step does not make (each step pairs its own samples); "
                                 "use online.mode: rounds.")
        plain = type(online)()
        fixed = [f"online.{key}: {getattr(online, key)!r}" for key in
                 ("rounds", "prompts_per_round", "reference")
                 if getattr(online, key) != getattr(plain, key)]
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: nothing to set with online.mode per_step "
                             "(one run of train.max_steps steps, each on fresh samples, "
                             "against the initial model); remove them.")
        if online.sampling.backend != "hf":
            raise ValueError("online.mode per_step samples with the policy being trained "
                             "(transformers); set online.sampling.backend: hf.")
        if online.pairs.builder in LIST_BUILDERS or online.pairs.win_probs:
            raise ValueError("online.mode per_step builds pairs for pairwise objectives; "
                             "lists and win probabilities need online.mode: rounds.")
        if online.pairs.estimator is not None:
            raise ValueError("online.pairs.estimator filters each round's pairs; it needs "
                             "online.mode: rounds.")
        if online.pairs.builder == "divpo":
            raise ValueError("online.pairs.builder divpo measures each round's samples "
                             "(their diversity) before pairing them; it needs "
                             "online.mode: rounds.")
        if self.train.eval_every is not None:
            raise ValueError("train.eval_every does nothing with online.mode per_step: the "
                             "held-out prompts are answered and scored after training.")

    def _check_declared_builders(self) -> None:
        """What the objectives declare of their online rows (``online_builder``,
        ``online_win_probs``), and the builders whose rows only such objectives train on."""
        pairs = self.online.pairs
        specs = [get_objective(term.name) for term in self.objective]
        for spec in specs:
            if spec.online_builder and pairs.builder != spec.online_builder:
                raise ValueError(f"objective {spec.name} and online.pairs.builder "
                                 f"{spec.online_builder} go together: its rows come from that "
                                 f"builder; set online.pairs.builder: {spec.online_builder}.")
            if spec.reference_samples and self.online.reference != "previous" \
                    and self.online.rounds > 1:
                raise ValueError(f"objective {spec.name} reads each list as samples of the "
                                 "reference, but after round 1 they come from the previous "
                                 "round's model: set online.reference: previous (or "
                                 "online.rounds: 1).")
            if spec.image_negatives:
                raise ValueError(f"objective {spec.name} compares the chosen answer under each "
                                 "record's image and under a negative image; the pairs of "
                                 "online rounds are built from samples and carry none. Use an "
                                 "objective without negative images (dpo, ...) online, or "
                                 f"train {spec.name} offline on pairs with negative_images.")
            if spec.online_win_probs and not pairs.win_probs:
                raise ValueError(f"objective {spec.name} reads each response's win probability: "
                                 "set online.pairs.win_probs: true.")
            carried = {"chosen_score", "rejected_score", "chosen_win_prob", "rejected_win_prob"}
            missing = [field for field in spec.scores if field not in carried]
            if missing or (spec.gold and pairs.builder != "selm"):
                field = "gold" if spec.gold and not missing else missing[0]
                raise ValueError(f"objective {spec.name} reads each record's {field!r}, which "
                                 "the pairs built from samples do not carry (their scores and, "
                                 "with online.pairs.win_probs, win probabilities); train "
                                 f"{spec.name} offline on data with that field.")
        if pairs.builder in DATA_PAIR_BUILDERS and not any(
                spec.online_builder == pairs.builder for spec in specs):
            owners = sorted(spec.name for spec in REGISTRY.values()
                            if spec.online_builder == pairs.builder)
            raise ValueError(f"online.pairs.builder {pairs.builder} makes rows for objective "
                             f"{', '.join(owners)} only (a sample of the reference as the third "
                             "response); use it, or another builder.")


def load_online_config(path: str | None, overrides: list[str] = ()) -> OnlineConfig:
    """Read an online YAML config and apply ``key=value`` overrides."""
    return OnlineConfig.from_yaml(path, overrides)

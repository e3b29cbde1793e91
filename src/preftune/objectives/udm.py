"""BCO's underlying distribution matching (UDM; Jung et al. 2024, arXiv:2404.04656, sec. 4).

When thumbs-up and thumbs-down feedback come from different prompts (users rate some tasks
more kindly than others), a classifier on the implied reward also learns to tell the prompts
apart. UDM reweighs each undesirable example by the density ratio of its prompt,
w(x) = p(desirable | x) / p(undesirable | x), clamped to [min_density_ratio,
max_density_ratio], so that the undesirable prompts count as if drawn like the desirable ones.
p comes from a logistic regression on sentence embeddings of a sample of each label's
training prompts (``prompt_sample_size`` of each), with balanced class weights and an L2
penalty of 1/2 |w|^2, the setup of TRL's former BCOTrainer (scikit-learn's defaults there).

The weights are made once, before training, for every training and held-out example
(desirable ones weigh 1), and go into the examples' ``udm_weight`` score, which ``bco``
multiplies its losses by: ``prepare_udm`` is bco's ``prepare`` step (objectives.registry).
They depend only on the data, the encoder and ``train.seed``, so a resumed run makes the same
ones again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config_tree import ConfigError
from ..data.records import DataError, plain_text

WEIGHT = "udm_weight"  # the score bco reads
ENCODE_BATCH = 64
MAX_ENCODER_TOKENS = 256  # all-MiniLM-L6-v2 was trained on up to 256 word pieces


@dataclass(frozen=True)
class UDMSettings:
    encoder: str
    prompt_sample_size: int
    min_density_ratio: float
    max_density_ratio: float


def udm_settings(params: list) -> UDMSettings | None:
    """The UDM settings of the ``bco`` terms (their ``params``) that set ``udm: true`` (one set
    of them: the weights are one score per example), or None."""
    found = {UDMSettings(p.udm_encoder, p.prompt_sample_size, p.min_density_ratio,
                         p.max_density_ratio) for p in params if p.udm}
    if len(found) > 1:
        raise ConfigError("objective: bco terms with udm: true must share udm_encoder, "
                          "prompt_sample_size and the density ratio bounds (each example "
                          "gets one UDM weight); make them equal.")
    return found.pop() if found else None


def prepare_udm(params: list, train: list, held_out: list, seed: int, device) -> dict:
    """bco's step before training: the UDM weights, if a term asks for them."""
    settings = udm_settings(params)
    if settings is None:
        return {}
    return {"udm": add_udm_weights(train, held_out, settings, seed, device)}


class SentenceEncoder:
    """Unit-length mean-pooled token embeddings of an encoder (all-MiniLM-L6-v2 by default:
    sentence-transformers' pooling for it)."""

    def __init__(self, path: str, device, setting: str = "objective.udm_encoder"):
        from transformers import AutoModel, AutoTokenizer

        from ..model.load import given_as, resolve_model_dir

        with given_as(setting):  # the config key a missing encoder is reported under
            source = resolve_model_dir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), D] float32 on the CPU."""
        out = []
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = self.tokenizer(texts[start:start + ENCODE_BATCH], padding=True,
                                   truncation=True, max_length=MAX_ENCODER_TOKENS,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out)


def fit_logistic(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [D], bias) minimising 1/2 |w|^2 + sum_i c_i log(1 + exp(-s_i (w.x_i + b))),
    s_i = +-1 by label, c_i = n / (2 n_label) (balanced), by L-BFGS in float64."""
    x, y = x.double(), labels.double()
    counts = torch.stack([(y == 0).sum(), (y == 1).sum()]).double()
    balance = (len(y) / (2 * counts))[y.long()]
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=1000, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ params[:-1] + params[-1]
        loss = 0.5 * params[:-1].square().sum() + (
            balance * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    params = params.detach()
    return params[:-1], params[-1]


def add_udm_weights(train: list, held_out: list, settings: UDMSettings, seed: int,
                    device) -> dict:
    """Set ``scores["udm_weight"]`` of every example of ``train`` and ``held_out`` (each with
    ``.prompt`` and its ``label`` score); returns what the data report says of it."""
    for example in [*train, *held_out]:
        if WEIGHT in example.scores:
            raise DataError(f"{example.origin}: the record has a field {WEIGHT!r}, which "
                            "objective.udm writes; rename it, or set udm: false.")
    desirable = [ex for ex in train if ex.scores["label"] > 0.5]
    undesirable = [ex for ex in train if ex.scores["label"] <= 0.5]
    if not desirable or not undesirable:
        raise DataError(
            f"objective.udm: the training data has {len(desirable)} desirable and "
            f"{len(undesirable)} undesirable examples; the prompt classifier needs both. "
            "Set udm: false, or add examples of the missing label.")
    rng = random.Random(f"udm {seed}")
    sample = [rng.sample(side, min(len(side), settings.prompt_sample_size))
              for side in (undesirable, desirable)]
    weighed = [ex for ex in [*train, *held_out] if ex.scores["label"] <= 0.5]
    texts = sorted({plain_text(ex.prompt) for ex in [*sample[1], *weighed]})
    encoder = SentenceEncoder(settings.encoder, device)
    embedding = dict(zip(texts, encoder(texts)))
    del encoder

    def embedded(examples):
        return torch.stack([embedding[plain_text(ex.prompt)] for ex in examples]).double()

    x = embedded([*sample[0], *sample[1]])
    labels = torch.tensor([0] * len(sample[0]) + [1] * len(sample[1]))
    w, b = fit_logistic(x, labels)
    accuracy = ((x @ w + b > 0).long() == labels).double().mean().item()
    p = torch.sigmoid(embedded(weighed) @ w + b)
    ratios = (p / (1 - p + 1e-8)).tolist()
    weights = [min(max(r, settings.min_density_ratio), settings.max_density_ratio)
               for r in ratios]
    for example in [*train, *held_out]:
        example.scores[WEIGHT] = 1.0
    for example, weight in zip(weighed, weights):
        example.scores[WEIGHT] = weight
    report = {"encoder": settings.encoder, "sampled_prompts": [len(s) for s in sample][::-1],
              "classifier_accuracy": round(accuracy, 4),
              "undesirable_weight_mean": round(sum(weights) / len(weights), 4),
              "clamped_low": sum(r < settings.min_density_ratio for r in ratios),
              "clamped_high": sum(r > settings.max_density_ratio for r in ratios)}
    print(f"bco udm: a prompt classifier on {report['sampled_prompts'][0]} desirable and "
          f"{report['sampled_prompts'][1]} undesirable training prompts tells them apart "
          f"{accuracy:.0%} of the time; undesirable examples weigh "
          f"{report['undesirable_weight_mean']:.3g} on average ({report['clamped_low']} raised "
          f"to {settings.min_density_ratio:g}, {report['clamped_high']} lowered to "
          f"{settings.max_density_ratio:g})")
    return report

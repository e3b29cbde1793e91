"""Reference-policy strategies: where pi_ref's log-probs come from, chosen once per run.

- ``precomputed``: one pass of the initial model over the data before training, cached on disk
  under a key of (weights, token ids, settings); the reference is not in memory while training.
- ``adapter-off``: with LoRA, the policy itself with its adapters disabled.
- ``live``: a frozen copy of the initial model kept in memory.
- ``none``: reference-free objectives.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch

from ..data.layout import Batch
from ..data.tokenize import TokenizedExample
from .forward import LogpModel, SequenceStats, causal_lm_of, sequence_stats, token_grid
from .load import weights_fingerprint

@contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class NoReference:
    def stats(self, batch: Batch) -> None:
        return None


class LiveReference:
    """A frozen in-memory copy of the model as it was when this object was made (``model``
    itself, frozen, when it is not the policy: ``copy`` False)."""

    def __init__(self, model, chunk_tokens: int, per_token: bool, copy: bool = True):
        model = causal_lm_of(model)
        frozen = (deepcopy(model) if copy else model).eval().requires_grad_(False)
        self.logp_model = LogpModel(frozen, chunk_tokens)
        self.per_token = per_token

    @torch.no_grad()
    def stats(self, batch: Batch) -> SequenceStats:
        return sequence_stats(self.logp_model(batch), batch, self.per_token)

    @torch.no_grad()
    def stats_with_hidden(self, batch: Batch) -> tuple[SequenceStats, tuple]:
        """Stats plus (hidden states, output weight) for the policy's KL to this reference."""
        return _stats_with_hidden(self.logp_model, batch, self.per_token)


def _stats_with_hidden(logp_model: LogpModel, batch: Batch, per_token: bool):
    """The reference's stats and (hidden, weight). With per_token the stats also carry
    ``token_activation``: per response token, the min-max rescaled feature mean of each layer's
    output over that response, averaged over layers (in [0, 1]; SparsePO's reference mask)."""
    hidden, weight, *layer_means = logp_model(batch, hidden=True, layer_means=per_token)
    token_logps = logp_model.token_logps(hidden, weight, batch.target_tokens)
    stats = sequence_stats(token_logps, batch, per_token)
    if per_token:
        stats.token_activation = activation_mask(layer_means[0], batch)
    return stats, (hidden.detach(), weight.detach())


def activation_mask(layer_means: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[layers, n] feature means -> [E, R, L] weights: per layer and response, (a - min) /
    (max - min) over the response's tokens (1 where a response's values are all equal), then the
    mean over layers. Laid out like ``SequenceStats.token_logps``."""
    owner, count = batch.target_response, batch.num_responses
    expand = (layer_means.shape[0], count)
    low = layer_means.new_full(expand, float("inf")).scatter_reduce(
        1, owner.expand_as(layer_means), layer_means, "amin")
    high = layer_means.new_full(expand, float("-inf")).scatter_reduce(
        1, owner.expand_as(layer_means), layer_means, "amax")
    span = (high - low)[:, owner]
    scaled = torch.where(span > 0, (layer_means - low[:, owner]) / span.clamp(min=1e-12),
                         torch.ones_like(layer_means))
    return token_grid(scaled.mean(0), batch)


class AdapterOffReference:
    """The LoRA policy with adapters switched off: the frozen base model, at no memory cost."""

    def __init__(self, peft_logp_model: LogpModel, per_token: bool):
        if not hasattr(peft_logp_model.model, "disable_adapter"):
            raise ValueError("reference.strategy 'adapter-off' needs a LoRA (PEFT) model")
        self.logp_model = peft_logp_model
        self.per_token = per_token

    @torch.no_grad()
    def stats(self, batch: Batch) -> SequenceStats:
        with self.logp_model.model.disable_adapter(), _eval_mode(self.logp_model):
            return sequence_stats(self.logp_model(batch), batch, self.per_token)

    @torch.no_grad()
    def stats_with_hidden(self, batch: Batch) -> tuple[SequenceStats, tuple]:
        with self.logp_model.model.disable_adapter(), _eval_mode(self.logp_model):
            return _stats_with_hidden(self.logp_model, batch, self.per_token)


class PrecomputedReference:
    """Reference stats looked up by example index from a table computed once. The table stays
    in host memory and is indexed there with the batch's host-side example ids; only the rows a
    batch needs are copied to its device (no read back from the device)."""

    def __init__(self, table: dict):
        self.row_of = {int(i): row for row, i in enumerate(table["example_indices"].tolist())}
        self.logps = table["logps"]
        self.token_counts = table["token_counts"]
        self.token_logps = None  # [responses, longest] zero-padded, when per-token
        if table.get("token_logps") is not None:
            per_response = table["token_logps"]
            self.token_logps = torch.zeros(len(per_response),
                                           max(len(t) for t in per_response))
            for k, values in enumerate(per_response):
                self.token_logps[k, : len(values)] = values

    def stats(self, batch: Batch) -> SequenceStats:
        device = batch.input_ids.device
        rows = torch.tensor([self.row_of[i] for i in batch.example_ids])
        stats = SequenceStats(_to(self.logps[rows], device), _to(self.token_counts[rows], device))
        if self.token_logps is not None:
            per_example = self.logps.shape[1]
            slots = (rows[:, None] * per_example + torch.arange(per_example)).flatten()
            width = batch.longest_response  # the table covers at least the batch's responses
            grid = self.token_logps[slots, :width]
            mask = torch.arange(width) < self.token_counts[rows].flatten()[:, None]
            shape = (*stats.logps.shape, width)
            stats.token_logps = _to(grid.view(shape), device)
            stats.token_mask = _to(mask.view(shape), device)
        return stats


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through page-locked memory, so the copy is queued
    without the host waiting for it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# Raised whenever a change to preftune makes its forward give other log-probs for some model,
# so references cached before it are computed again: 2, Gemma 3's image tokens attend both ways.
FORWARD_REVISION = 2


def reference_cache_key(model, examples: list[TokenizedExample], settings: dict) -> str:
    """Hash of ``FORWARD_REVISION``, the weights, the model's config (the same weights under
    another architecture, rope setting or logit factor give other numbers), every token id,
    every image's content and the settings that change the numbers."""
    digest = hashlib.sha256(f"forward {FORWARD_REVISION}".encode())
    digest.update(weights_fingerprint(model).encode())
    config = {key: value for key, value in causal_lm_of(model).config.to_dict().items()
              if not key.startswith("_") and key != "transformers_version"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        images = [[image.key for image in ex.images_of_slot(slot)]
                  for slot in range(len(ex.response_ids))] if ex.images else []
        masks = [ex.response_masks] if ex.response_masks else []  # tool results left out
        digest.update(json.dumps([ex.index, ex.prompt_ids, ex.response_ids, images, *masks])
                      .encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute_reference_table(
    model, examples, make_batch, batch_size, chunk_tokens, per_token, device, progress=None
) -> dict:
    """One forward pass of ``model`` over ``examples``: the precomputed reference table."""
    logp_model = LogpModel(causal_lm_of(model), chunk_tokens)
    logps, counts, token_logps = [], [], []
    with _eval_mode(logp_model):
        for start in range(0, len(examples), batch_size):
            batch = make_batch(examples[start : start + batch_size]).to(device)
            stats = sequence_stats(logp_model(batch), batch, per_token)
            logps.append(stats.logps.cpu())
            counts.append(stats.token_counts.cpu())
            if per_token:
                flat_logps = stats.token_logps.flatten(0, 1).cpu()
                flat_counts = stats.token_counts.flatten().long().tolist()
                token_logps += [row[:n].clone() for row, n in zip(flat_logps, flat_counts)]
            if progress is not None:
                progress(len(batch.example_indices))
    return {
        "example_indices": torch.tensor([ex.index for ex in examples]),
        "logps": torch.cat(logps),
        "token_counts": torch.cat(counts),
        **({"token_logps": token_logps} if per_token else {}),
    }


def precomputed_reference(
    model, examples, *, make_batch, batch_size, chunk_tokens, per_token, device,
    cache_dir: Path, settings: dict, progress=None, accelerator=None,
) -> tuple[PrecomputedReference, bool]:
    """Load the reference table from ``cache_dir`` or compute and store it. Returns (ref, hit).
    With several processes (``accelerator``) each computes every n-th example, the parts are
    gathered into one table (in ``examples`` order) and the main process writes the cache."""
    key = reference_cache_key(model, examples, {**settings, "per_token": per_token})
    path = Path(cache_dir) / f"reference-{key}.pt"
    if path.exists():
        try:
            return PrecomputedReference(torch.load(path, weights_only=True)), True
        except Exception as error:  # a damaged file (truncated, emptied): computed again
            print(f"reference cache {path} cannot be read ({type(error).__name__}); computing "
                  "it again")
    world = accelerator.num_processes if accelerator is not None else 1
    mine = examples[accelerator.process_index::world] if world > 1 else examples
    table = compute_reference_table(
        model, mine, make_batch, batch_size, chunk_tokens, per_token, device, progress
    )
    if world > 1:
        from accelerate.utils import gather_object

        table = _merged(gather_object([table]), examples)
    if accelerator is None or accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(table, staging)
        os.replace(staging, path)
    return PrecomputedReference(table), False


def _merged(parts: list[dict], examples) -> dict:
    """Reference tables of disjoint example sets -> one table in ``examples`` order."""
    rows = {}
    for part in parts:
        per_example = part["logps"].shape[1]
        tokens = part.get("token_logps")
        for row, index in enumerate(part["example_indices"].tolist()):
            rows[index] = (part["logps"][row], part["token_counts"][row],
                           tokens[row * per_example:(row + 1) * per_example] if tokens else None)
    order = [ex.index for ex in examples]
    table = {"example_indices": torch.tensor(order),
             "logps": torch.stack([rows[i][0] for i in order]),
             "token_counts": torch.stack([rows[i][1] for i in order])}
    if parts[0].get("token_logps") is not None:
        table["token_logps"] = [t for i in order for t in rows[i][2]]
    return table

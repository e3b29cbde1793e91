"""The references a policy is trained against, one per data split: none, a live copy, a table
computed once (cached), further models (MRPO), and TR-DPO's reference that moves with the
policy."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data.records import DataError
from ..model.load import load_model_and_tokenizer
from ..model.packaged import cache_root
from ..model.reference import LiveReference, NoReference, precomputed_reference
from ..model.reference_sync import DEFAULT_MIX, ReferenceSync
from ..model.verify import check_model, decoder_of, verified_layout
from .logging import progress_bar
from .output import check_writable


def build_reference(strategy, config, model, examples_by_split, make_batch, objective, device,
                    accelerator=None):
    """One reference per data split (the precomputed one is a table per split)."""
    chunk = config.train.logps_chunk_tokens
    if strategy == "none":
        return {split: NoReference() for split in examples_by_split}
    if strategy == "live":
        live = LiveReference(model, chunk, objective.per_token)
        return {split: live for split in examples_by_split}
    if strategy == "adapter-off":
        return None  # built after LoRA is attached
    cache_dir = Path(config.reference.cache_dir or cache_root() / "reference")
    if accelerator is None or accelerator.is_main_process:  # before the pass, not after it
        check_writable(cache_dir, "reference.cache_dir" if config.reference.cache_dir else
                       "the reference cache (under PREFTUNE_CACHE)")
    references = {}
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator \
        else (0, 1)
    for split, examples in examples_by_split.items():
        share = len(range(rank, len(examples), world))  # each process computes every n-th
        bar = progress_bar(share, f"reference logps ({split}"
                           f"{', this process' if world > 1 else ''})", unit="example")
        reference, hit = precomputed_reference(
            model, examples, make_batch=make_batch,
            batch_size=config.train.batch_size, chunk_tokens=chunk, per_token=objective.per_token,
            device=device, cache_dir=cache_dir, progress=bar.update,
            settings={"max_length": config.data.max_length,
                      "max_prompt_length": config.data.max_prompt_length},
            accelerator=accelerator,
        )
        bar.close()
        if hit:
            print(f"reference logps ({split}): loaded from cache {cache_dir}")
        references[split] = reference
    return references


def build_extra_references(config, tokenizer, examples_by_split, make_batch, objective, device):
    """MRPO's further references: each model of reference.extra_models is loaded, run once over
    the data (cached like the precomputed reference) and freed, so only tables stay in memory."""
    extras = {split: [] for split in examples_by_split}
    for path in config.reference.extra_models:
        one = reference_from(path, "reference.extra_models", config, tokenizer, examples_by_split,
                             make_batch, objective, device)
        for split in extras:
            extras[split].append(one[split])
    return extras


def reference_from(path, key, config, tokenizer, examples_by_split, make_batch, objective,
                   device, strategy: str = "precomputed"):
    """A reference per split from the model at ``path``: precomputed (loaded, run once, freed)
    or live (loaded and kept, frozen)."""
    model, other = load_model_and_tokenizer(path, config.model.dtype,
                                            config.model.trust_remote_code)
    if other.get_vocab() != tokenizer.get_vocab():
        raise DataError(f"{key}: {path} has a different tokenizer from model.path "
                        f"{config.model.path}; a reference must share it (re-tokenising for "
                        "another vocabulary is not supported).")
    model.to(device)
    check_model(model, max_length=config.data.max_length,
                attn_implementation=config.model.attn_implementation, key=key)
    layout = make_batch.keywords["layout"]  # the policy's; the reference must keep to it too
    verified_layout(*decoder_of(model), layout, layout, key=f"{key} ({path})")
    if strategy == "live":
        live = LiveReference(model, config.train.logps_chunk_tokens, objective.per_token,
                             copy=False)
        return {split: live for split in examples_by_split}
    return build_reference("precomputed", config, model, examples_by_split, make_batch,
                           objective, device)


def reference_sync(config: Config, references: dict, policy) -> ReferenceSync | None:
    """TR-DPO's moving reference (reference.sync_every): the live reference's weights, moved
    toward ``policy``'s."""
    every = config.reference.sync_every
    if every is None:
        return None
    live = references["train"]  # every split shares the one live copy
    return ReferenceSync(live.logp_model.model, policy, every,
                         config.reference.sync_mix or DEFAULT_MIX)

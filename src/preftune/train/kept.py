"""What a model keeps for backward, measured rather than modelled: ``--plan``'s activation
figures come from running the model's own decoder, through preftune's forward, on two short
random batches of the run's layout, and reading the tensors autograd saves.

A formula per architecture misses what each family does its own way: Qwen3's and Gemma 3's
per-head query and key norms, Gemma's four norms per layer and fp32 norm arithmetic, OLMo 2's
norms after each block, a mixture of experts' routed copies, LoRA's adapter inputs, frozen
weights that keep nothing, the lean layers where they apply. Measured, each is exactly what
training will keep. Per decoder layer, over R rows of W slots, the bytes are
k + R W (a + c W): c for eager attention's [heads, W, W] scores, k for what does not grow with
the batch (a kernel's copy of frozen expert weights); three widths give all three. A tensor
saved by more than one layer (the rotary tables) and everything saved outside the layers (the
embedding's indices, the final norm, an encoder's own attention mask) count once, fit the same
way. The mask of preftune's layouts is left out: the plan adds it, once per batch. The probe
costs forwards of 16, 32 and 48 tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.layout import collate
from ..data.tokenize import TokenizedExample
from ..model.forward import causal_lm_of, decoder_layers, run_decoder

WIDTHS = (16, 32, 48)  # evenly spaced


@dataclass(frozen=True)
class KeptBytes:
    """Bytes kept for backward by each decoder layer over a [rows, W] micro-batch,
    ``constant + rows W per_slot + rows W^2 per_row_slot2``, and outside the layers (or by
    several of them) ``outside``, the same three terms."""

    constant: tuple[float, ...]
    per_slot: tuple[float, ...]
    per_row_slot2: tuple[float, ...]
    outside: tuple[float, float, float]

    def layer(self, index: int, rows: int, width: int) -> float:
        """What layer ``index`` keeps over a [rows, width] micro-batch."""
        return _bytes((self.constant[index], self.per_slot[index], self.per_row_slot2[index]),
                      rows, width)

    def layers(self, rows: int, width: int) -> list[float]:
        return [self.layer(i, rows, width) for i in range(len(self.per_slot))]

    def shared(self, rows: int, width: int) -> float:
        """What is kept outside the layers over a [rows, width] micro-batch."""
        return _bytes(self.outside, rows, width)


def _bytes(terms: tuple[float, float, float], rows: int, width: int) -> float:
    constant, per_slot, per_row_slot2 = terms
    return constant + rows * width * (per_slot + width * per_row_slot2)


def measure_kept(model, layout: str, padded_rows: bool = False, pad_token_id: int = 0,
                 forward: Callable | None = None,
                 make_batch: Callable | None = None) -> KeptBytes:
    """Run ``model`` (set up as it will train: LoRA, frozen weights, lean layers, dropout off,
    no checkpointing) on probe batches of ``layout``; ``padded_rows``: rows of the padded
    layout hold padding, so they get preftune's dense mask (and transformers repeats grouped
    keys and values for it), as the run's will. ``forward(batch)`` runs the model (by default
    its decoder, as a policy's log-probs do) and ``make_batch(examples)`` builds a probe batch
    (by default ``collate`` in ``layout``): a reward model passes its own."""
    lm = causal_lm_of(model)
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    if forward is None:
        decoder = lm.get_decoder()

        def forward(batch):
            return run_decoder(decoder, batch, decoder.config, vlm=lm)
    vocab = lm.config.get_text_config().vocab_size
    probes = [_saved_by_layer(model, forward, layers, _probe_batch(
        width, layout, padded_rows, pad_token_id, vocab, make_batch).to(device))
        for width in WIDTHS]
    rows = probes[0][0]
    fits = [_fit(*kept, rows=rows) for kept in zip(*(probe[1] for probe in probes))]
    outside = _fit(*(probe[2] for probe in probes), rows=rows)
    return KeptBytes(*(tuple(column) for column in zip(*fits)), outside) if fits else \
        KeptBytes((), (), (), outside)


def _fit(first: int, second: int, third: int, rows: int = 1) -> tuple[float, float, float]:
    """(k, a, c) with k + rows W a + rows W^2 c through the three probes' bytes."""
    (w1, w2, _), step = WIDTHS, WIDTHS[1] - WIDTHS[0]
    d1, d2 = second - first, third - second
    c = (d2 - d1) / (2 * rows * step * step)
    a = d1 / (rows * step) - c * (w1 + w2)
    return first - rows * w1 * (a + c * w1), a, c


def _probe_batch(width: int, layout: str, padded_rows: bool, pad_token_id: int, vocab: int,
                 make_batch: Callable | None = None):
    """A batch of ``width``-slot rows: one example (a prompt and one response of half the
    row each), or under ``padded_rows`` two, the second 4 tokens shorter."""
    generator = torch.Generator().manual_seed(width)

    def example(length: int, index: int) -> TokenizedExample:
        ids = torch.randint(3, max(4, vocab), (length,), generator=generator).tolist()
        return TokenizedExample(prompt_ids=ids[: length // 2],
                                response_ids=[ids[length // 2 :]], index=index)

    examples = [example(width, 0)] + ([example(width - 4, 1)] if padded_rows else [])
    if make_batch is not None:
        return make_batch(examples)
    return collate(examples, pad_token_id, layout, max_row_tokens=width)


def _saved_by_layer(model, forward, layers, batch) -> tuple[int, list[int], int]:
    """(rows, the bytes each layer alone saves, the bytes saved outside the layers or by more
    than one) for one forward of ``batch``; parameters and the batch's masks left out."""
    current: list = [None]
    savers: dict[int, set] = {}
    sizes: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        sizes[key] = storage.nbytes()
        savers.setdefault(key, set()).add(current[0])
        return tensor

    def enter(index):
        return lambda module, args: current.__setitem__(0, index)

    hooks = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    hooks += [layer.register_forward_hook(lambda *_: current.__setitem__(0, None))
              for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward(batch)
    finally:
        for hook in hooks:
            hook.remove()
    left_out = {p.untyped_storage().data_ptr() for p in model.parameters()}
    left_out |= {mask.untyped_storage().data_ptr() for mask in batch._masks.values()
                 if isinstance(mask, torch.Tensor)}  # (a BlockMask is no tensor)
    per_layer, outside = [0] * len(layers), 0
    for key, who in savers.items():
        if key in left_out:
            continue
        if len(who) == 1 and None not in who:
            per_layer[next(iter(who))] += sizes[key]
        else:
            outside += sizes[key]
    return batch.input_ids.shape[0], per_layer, outside


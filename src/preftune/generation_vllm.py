"""vLLM as the generation backend of online rounds (optional: ``pip install vllm``, CUDA).

The same interface and post-processing as ``HFGenerator`` (``generate(prompt_ids, settings) ->
Generations``: EOS and stop-string cuts, decoding). Weights are synced by loading: each round's
sampler is built from the directory of the model that round starts from (the previous round's
saved policy), and shut down before training so the GPU memory goes back to training.
``online.sampling.vllm_memory`` is the share of GPU memory vLLM may take meanwhile.

Not yet run on a GPU in this project: ``tests/test_vllm.py`` checks the settings mapping and
the output handling against a stand-in ``vllm`` module everywhere, and compares greedy answers
with Hugging Face ``generate`` where vLLM and CUDA are present.
"""

from __future__ import annotations

import gc
import time

import torch

from .config import ConfigError
from .data.turn_end import stop_ids
from .generation import SamplingSettings, finished
from .model.load import resolve_model_dir


class VLLMGenerator:
    def __init__(self, llm, tokenizer):
        self.llm, self.tokenizer = llm, tokenizer

    @classmethod
    def from_pretrained(cls, path: str, tokenizer, dtype: str = "float32", memory: float = 0.3,
                        seed: int = 0) -> "VLLMGenerator":
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError("online.sampling.backend 'vllm' needs vLLM installed (pip install "
                              "vllm) and a CUDA GPU; use backend 'hf' otherwise.") from None
        if not _cuda():
            raise ConfigError("online.sampling.backend 'vllm' needs a CUDA GPU and torch sees "
                              "none; use backend 'hf'.")
        llm = LLM(model=resolve_model_dir(path), dtype=dtype, seed=seed,
                  gpu_memory_utilization=memory)
        return cls(llm, tokenizer)

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings,
                 description: str | None = None, images: list | None = None):
        """Samples of every prompt; vLLM's progress bar when ``description`` is given. Image
        prompts are not taken here (``images`` must be None: the online loop refuses them
        before it loads vLLM)."""
        if images is not None:
            raise ValueError("the vLLM backend does not sample image prompts")
        from vllm import SamplingParams

        params = SamplingParams(
            n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k > 0 else -1,
            max_tokens=settings.max_new_tokens, seed=settings.seed,
            stop_token_ids=stop_ids(self.tokenizer))
        started = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params,
                                    use_tqdm=description is not None)
        raw = [[list(choice.token_ids) for choice in output.outputs] for output in outputs]
        return finished(raw, settings, self.tokenizer, time.perf_counter() - started)

    def close(self) -> None:
        """Free the engine and its GPU memory before training."""
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _cuda() -> bool:
    return torch.cuda.is_available()

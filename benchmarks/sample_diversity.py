"""Quality and diversity of models' samples, side by side: for each model, N seeded samples of
every prompt of a file, their mean score, and their diversity (the share of distinct answers,
the mean word-set distance, and the mean embedding distance in all-MiniLM-L6-v2 between two
samples of a prompt).

    python benchmarks/sample_diversity.py --prompts eval.jsonl --scorer synthetic \\
        --model default --model runs/a/round-3/model --model runs/b/round-3/model
"""

from __future__ import annotations

import argparse
import statistics

import torch

from preftune.data.tokenize import TokenizeSettings
from preftune.generation import HFGenerator, SamplingSettings, prompt_ids
from preftune.model.load import load_model_and_tokenizer
from preftune.objectives.udm import SentenceEncoder
from preftune.online.common import read_prompts
from preftune.online.diversity import embedding_rarity, sample_diversity
from preftune.score import load_scorer
from preftune.score.base import score_samples


def measure(model_path: str, prompts: list, scorer, encoder, args) -> dict:
    model, tokenizer = load_model_and_tokenizer(model_path)
    ids = prompt_ids([p.prompt for p in prompts], tokenizer, TokenizeSettings(256, 192))
    settings = SamplingSettings(samples=args.samples, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, seed=args.seed)
    texts = HFGenerator(model, tokenizer).generate(ids, settings).texts
    scores = [s for group in score_samples(scorer, [p.question for p in prompts], texts)
              for s in group]
    semantic = statistics.fmean(statistics.fmean(embedding_rarity(encoder(group)))
                                for group in texts)
    return {"score": statistics.fmean(scores), **sample_diversity(texts),
            "embedding_distance": semantic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--scorer", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    prompts = read_prompts(args.prompts, {}, "each row's prompt is sampled", "a 'prompt' "
                           "field")
    scorer = load_scorer(args.scorer, args.prompts)
    encoder = SentenceEncoder("minilm", torch.device("cpu"))
    print(f"{len(prompts)} prompts x {args.samples} samples (temperature {args.temperature}, "
          f"{args.max_new_tokens} new tokens, seed {args.seed})")
    print("| model | mean score | distinct | word distance | embedding distance |")
    print("|---|---:|---:|---:|---:|")
    for path in args.model:
        m = measure(path, prompts, scorer, encoder, args)
        print(f"| {path} | {m['score']:.3f} | {m['distinct']:.3f} | {m['word_distance']:.3f} "
              f"| {m['embedding_distance']:.3f} |", flush=True)


if __name__ == "__main__":
    main()

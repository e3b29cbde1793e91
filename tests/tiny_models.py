"""Tiny random causal LMs and a character-level tokenizer, built in-process (no downloads)."""

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, chat-ml style template, eos = <|im_end|>."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int = 128, seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).float().eval()


def save_tiny_model_dir(directory: Path, seed: int = 0) -> Path:
    """A loadable HF model directory (tiny llama + char tokenizer), as a user would pass it."""
    tokenizer = char_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_moe_dir(directory: Path, seed: int = 0) -> Path:
    """A loadable Mixtral directory (4 experts, 2 per token; char tokenizer)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, num_local_experts=4,
                           num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    MixtralForCausalLM(config).float().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


TOKENIZER_CORPUS = [
    "hello world", "hello there", "say hello", "the quick brown fox jumps over the lazy dog",
    "user assistant system", "What is the capital of France? Paris is the capital.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (BOS added on encode, eos ``<|im_end|>``, chatml template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TOKENIZER_CORPUS * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_tiny_encoder_dir(directory: Path, seed: int = 0) -> Path:
    """A loadable BERT-style encoder directory (tiny random BERT + WordPiece tokenizer over
    single characters and a few words), as a user would pass an encoder reward-model backbone."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = ["hello", "world", "what", "is", "yes", "no", "the", "answer"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *string.digits, *".,?!+-=:'", *words, *[f"##{c}" for c in string.ascii_lowercase + string.digits]]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)},
                                  do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
                        pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def yes_no_workspace(root: Path, pairs: int = 12, with_config: bool = False) -> Path:
    """``root`` with a tiny model dir, ``pairs.jsonl`` ("say yes" prompts: " yes" preferred to
    " no thanks") and, if asked, a 2-step ``config.yaml`` training on them."""
    import json

    import yaml

    save_tiny_model_dir(root / "model")
    rows = [{"prompt": f"Q{i}: say yes.", "chosen": " yes", "rejected": " no thanks"}
            for i in range(pairs)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if with_config:
        config = {"output_dir": str(root / "run"), "model": {"path": str(root / "model")},
                  "data": {"train": str(root / "pairs.jsonl")},
                  "reference": {"cache_dir": str(root / "cache")},
                  "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3}}
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root

"""A chat answer trains as the chat template writes it after the prompt: the template's trim
(Llama 3) and its empty reasoning block before a final answer (Qwen3) are in the tokens, which
equal the whole dialogue's encoding. Text the model wrote (a string, an online sample) and an
answer cut off at a length limit train as written. The templates here are small ones written
for these tests that keep the one behaviour each family is known for."""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from preftune.data.records import Pair
from preftune.data.tokenize import TokenizeSettings, tokenize_records

SETTINGS = TokenizeSettings(max_length=300, max_prompt_length=None)
QUESTION = [{"role": "user", "content": "2+2?"}]

# Llama 3: a header per turn, each message's content trimmed, <|eot_id|> ends a turn
LLAMA3_LIKE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen3: the last answer after the question carries a reasoning block, empty when it has none
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}"
    "{% if '</think>' in m['content'] %}{% set parts = m['content'].split('</think>') %}"
    "<think>\n{{ parts[0].split('<think>')[-1].strip('\n') }}\n</think>\n\n"
    "{{ parts[-1].lstrip('\n') }}"
    "{% else %}<think>\n\n</think>\n\n{{ m['content'] }}{% endif %}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# DeepSeek-R1: the generation prompt opens the reasoning, answers are written without it
R1_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% else %}<|Assistant|>{{ m['content'].split('</think>')[-1] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|User|>", "<|Assistant|>", "<|end|>"]


def tokenizer(template: str, eos: str) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # (one token per character, newlines too)
    backend.add_special_tokens(SPECIALS)
    built = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token=eos)
    built.chat_template = template
    return built


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def dialogue_ids(tok, answer: str, end: str) -> list[int]:
    """The plain path: the whole dialogue encoded at once, up to and with the answer's end."""
    text = tok.apply_chat_template(QUESTION + [{"role": "assistant", "content": answer}],
                                   tokenize=False)
    return ids(tok, text[: text.rindex(end) + len(end)])


def sequences(tok, record) -> list[list[int]]:
    (example,), report = tokenize_records([record], tok, SETTINGS)
    assert report.kept == 1
    return [example.prompt_ids + response for response in example.response_ids]


def test_llama3_answers_are_trimmed_as_the_template_writes_them():
    tok = tokenizer(LLAMA3_LIKE, eos="<eos>")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    record = Pair(QUESTION, [{"role": "assistant", "content": " 4.\n"}],
                  [{"role": "assistant", "content": "5 "}])
    (example,), _ = tokenize_records([record], tok, SETTINGS)
    assert example.response_ids == [ids(tok, "4.") + [eot], ids(tok, "5") + [eot]]
    assert sequences(tok, record) == [dialogue_ids(tok, " 4.\n", "<|eot_id|>"),
                                      dialogue_ids(tok, "5 ", "<|eot_id|>")]


def test_qwen3_final_answers_train_after_the_empty_reasoning_block_the_template_writes():
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>")
    end = tok.eos_token_id
    record = Pair(QUESTION, [{"role": "assistant", "content": "4"}],
                  [{"role": "assistant", "content": "<think>\nadd\n</think>\n\n5"}])
    (example,), _ = tokenize_records([record], tok, SETTINGS)
    assert example.response_ids == [ids(tok, "<think>\n\n</think>\n\n4") + [end],
                                    ids(tok, "<think>\nadd\n</think>\n\n5") + [end]]
    assert sequences(tok, record) == [dialogue_ids(tok, "4", "<|im_end|>"),
                                      dialogue_ids(tok, "<think>\nadd\n</think>\n\n5",
                                                   "<|im_end|>")]


def test_text_the_model_wrote_and_cut_off_answers_train_as_written():
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>")
    end = tok.eos_token_id
    # a sample (a string after a chat prompt) and an answer cut off mid-reasoning: a template
    # would put an empty reasoning block before the cut-off one
    sample = Pair(QUESTION, "4", [{"role": "assistant", "content": "<think>\nadd 2 an"}],
                  unfinished=(1,))
    (example,), _ = tokenize_records([sample], tok, SETTINGS)
    assert example.response_ids == [ids(tok, "4") + [end], ids(tok, "<think>\nadd 2 an")]
    # cut off in a later turn: the turns before it as the template writes them, then the
    # answer as written after the generation prompt
    dialogue = [{"role": "assistant", "content": "4"}, {"role": "user", "content": "sure?"},
                {"role": "assistant", "content": "<think>\nadd 2 an"}]
    (later,), _ = tokenize_records([Pair(QUESTION, dialogue, "5", unfinished=(0,))], tok,
                                   SETTINGS)
    assert tok.decode(later.response_ids[0]) == (  # (no empty block before the model's own)
        "4<|im_end|>\n<|im_start|>user\nsure?<|im_end|>\n<|im_start|>assistant\n<think>\n"
        "add 2 an")


def test_an_answer_the_generation_prompt_opens_trains_as_written_after_it():
    tok = tokenizer(R1_LIKE, eos="<|end|>")
    end = tok.eos_token_id
    record = Pair(QUESTION, [{"role": "assistant", "content": "add\n</think>\n4"}],
                  [{"role": "assistant", "content": "5"}])
    (example,), _ = tokenize_records([record], tok, SETTINGS)
    assert example.prompt_ids == ids(tok, "<|User|>2+2?<|Assistant|><think>\n")
    assert example.response_ids == [ids(tok, "add\n</think>\n4") + [end], ids(tok, "5") + [end]]


def test_an_empty_answer_is_dropped_though_the_template_writes_text_around_it():
    tok = tokenizer(QWEN3_LIKE, eos="<|im_end|>")
    blank = Pair(QUESTION, [{"role": "assistant", "content": " "}], "5")
    examples, report = tokenize_records([blank], tok, SETTINGS)
    assert (examples, report.empty_responses) == ([], 1)


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that marks a word's start with "▁" and writes "▁" before the
    text, as Llama 2's: " 4" alone is "▁" "▁4", after "[/INST]" it is "▁4"."""
    from tokenizers import normalizers

    words = ["▁[INST]", "▁2+2?", "▁[/INST]", "▁4", "▁5", "▁"]
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁[^▁]*"), behavior="isolated")
    backend.add_special_tokens(["<s>", "</s>"])
    built = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
    built.chat_template = (  # Llama 2's way: the answer after a space, then a space and EOS
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
    return built


def test_an_answer_takes_the_tokens_the_whole_dialogue_gives_it_after_the_prompt():
    tok = sentencepiece_like()
    assert ids(tok, " 4 </s>") != ids(tok, "[INST] 2+2? [/INST] 4 </s>")[3:]  # alone: "▁" "▁4"
    record = Pair(QUESTION, [{"role": "assistant", "content": "4"}],
                  [{"role": "assistant", "content": "5"}])
    (example,), report = tokenize_records([record], tok, SETTINGS)
    assert sequences(tok, record) == [dialogue_ids(tok, "4", "</s>"),
                                      dialogue_ids(tok, "5", "</s>")]
    assert tok.convert_ids_to_tokens(example.response_ids[0]) == ["▁4", "▁", "</s>"]
    assert report.boundary_merges == 0  # no token spans the boundary

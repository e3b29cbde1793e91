"""A chat model whose template ends a turn with its own token (Gemma's ``<end_of_turn>``, not
EOS): its answers are trained to end with that token, and sampling stops there."""

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from preftune.data.records import Pair
from preftune.data.tokenize import TokenizeSettings, tokenize_records
from preftune.data.turn_end import stop_ids, turn_end_id
from preftune.generation import HFGenerator, SamplingSettings, finished
from preftune.reward.model import reward_pad_token
from tiny_models import char_tokenizer, tiny_llama

GEMMA_LIKE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
    "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SETTINGS = TokenizeSettings(max_length=200, max_prompt_length=None)


def gemma_like_tokenizer(turn_tokens_special: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials if turn_tokens_special else specials[:3])
    if not turn_tokens_special:  # added as plain tokens, as some fine-tunes do
        backend.add_tokens(specials[3:])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<bos>", eos_token="<eos>")
    tokenizer.chat_template = GEMMA_LIKE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_turn_end_is_the_templates_token_after_an_answer():
    gemma = gemma_like_tokenizer()
    end = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert turn_end_id(gemma) == end
    assert stop_ids(gemma) == [end, gemma.eos_token_id]
    chatml = char_tokenizer()  # its template ends a turn with EOS itself
    assert turn_end_id(chatml) == chatml.eos_token_id
    assert stop_ids(chatml) == [chatml.eos_token_id]
    chatml.chat_template = "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"
    assert stop_ids(chatml) == [chatml.eos_token_id]  # plain text after an answer: EOS


def test_chat_answers_end_with_the_turn_end_and_plain_completions_with_eos():
    gemma = gemma_like_tokenizer()
    end, eos = gemma.convert_tokens_to_ids("<end_of_turn>"), gemma.eos_token_id
    question = [{"role": "user", "content": "2+2?"}]
    single = Pair(question, [{"role": "assistant", "content": "4"}], "5")
    follow_up = [{"role": "assistant", "content": "4"}, {"role": "user", "content": "x2?"},
                 {"role": "assistant", "content": "8"}]
    turns = Pair(question, follow_up, [{"role": "assistant", "content": "5"}])
    plain = Pair("2+2=", "4", "5")
    (chat, dialogue, completion), report = tokenize_records([single, turns, plain], gemma,
                                                            SETTINGS)
    assert report.kept == 3
    assert chat.response_ids == [ids(gemma, "4") + [end], ids(gemma, "5") + [end]]
    # a multi-turn answer: every turn as the template writes it, cut after its last end of turn
    assert dialogue.response_ids[0] == ids(gemma, "4") + [end] + ids(gemma, "\n") + [
        gemma.convert_tokens_to_ids("<start_of_turn>")] + ids(gemma, "user\nx2?") + [end] + \
        ids(gemma, "\n") + [gemma.convert_tokens_to_ids("<start_of_turn>")] + \
        ids(gemma, "model\n8") + [end]
    assert completion.response_ids == [ids(gemma, "4") + [eos], ids(gemma, "5") + [eos]]


class _Says(torch.nn.Module):
    """An output head whose logits always pick one token."""

    def __init__(self, vocab: int, token: int):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.token] = 10.0
        return logits


def test_sampling_stops_at_the_turn_end():
    gemma = gemma_like_tokenizer()
    end = gemma.convert_tokens_to_ids("<end_of_turn>")
    model = tiny_llama(vocab_size=len(gemma), tie=False)
    model.lm_head = _Says(len(gemma), end)
    prompt = ids(gemma, gemma.apply_chat_template([{"role": "user", "content": "hi"}],
                                                  add_generation_prompt=True, tokenize=False))
    drawn = HFGenerator(model, gemma).generate(
        [prompt], SamplingSettings(temperature=0.0, max_new_tokens=6))
    assert drawn.token_ids == [[[end]]]
    # any backend's raw ids are cut after the first turn end or EOS, whichever comes first
    a, b = ids(gemma, "ab")
    cut = finished([[[a, end, b, gemma.eos_token_id], [a, gemma.eos_token_id, end]]],
                   SamplingSettings(), gemma, 0.0)
    assert cut.token_ids == [[[a, end], [a, gemma.eos_token_id]]]
    assert cut.texts == [["a", "a"]]


def test_a_reward_model_never_pads_with_the_token_its_reward_is_read_at():
    gemma = gemma_like_tokenizer()
    gemma.pad_token = "<end_of_turn>"  # the last token of every chat answer
    reward_pad_token(gemma)
    assert gemma.pad_token == "<pad>"


def test_a_template_that_ends_a_turn_with_plain_text_keeps_it_out_of_responses():
    plain = char_tokenizer()
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n"
                           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    eos = plain.eos_token_id
    question = [{"role": "user", "content": "2+2?"}]
    turns = [{"role": "assistant", "content": "4"}, {"role": "user", "content": "x2?"},
             {"role": "assistant", "content": "8"}]
    (example,), _ = tokenize_records([Pair(question, turns, [{"role": "assistant",
                                                              "content": "5"}])], plain, SETTINGS)
    assert example.response_ids[0][-2:] == [ids(plain, "8")[0], eos]  # not 8, \n, \n, EOS
    assert example.response_ids[1] == ids(plain, "5") + [eos]


def test_an_end_of_turn_added_as_a_plain_token_is_no_part_of_the_answer_text():
    gemma = gemma_like_tokenizer(turn_tokens_special=False)
    end = gemma.convert_tokens_to_ids("<end_of_turn>")
    assert stop_ids(gemma) == [end, gemma.eos_token_id]
    (seven,) = ids(gemma, "7")
    cut = finished([[[seven, end, seven], [end]]], SamplingSettings(), gemma, 0.0)
    assert cut.texts == [["7", ""]]


def test_a_reward_model_pads_a_base_tokenizer_whose_pad_is_its_eos_with_an_unused_pad():
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.add_special_tokens(specials)
    base = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")  # no unk, no bos (Qwen2.5 base)
    reward_pad_token(base)
    assert base.pad_token == "<|fim_pad|>"

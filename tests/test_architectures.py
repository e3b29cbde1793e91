"""Architectures beyond Llama: preftune's log-probs equal each model's own, in every layout it
lets the model use; heads that scale or cap their logits are reproduced; models whose layers
mix tokens outside attention (Mamba hybrids, short convolutions) train on padded rows, never on
a layout whose mask they ignore; an unknown head is refused rather than trained wrong."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from preftune.api import Config, train
from preftune.config import ConfigError
from preftune.data.layout import LAYOUTS, collate
from preftune.data.tokenize import TokenizedExample
from preftune.model.chunked_logps import Head, chunked_token_logps
from preftune.model.forward import LogpModel, output_head, sequence_stats
from preftune.model.verify import check_head, decoder_of, mask_leak, verified_layout
from tiny_models import char_tokenizer, tiny_llama

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# model_type -> (config changes, attention); each a way of computing logits Llama does not use
ATTENTION_MODELS = {
    "qwen2": ({}, "sdpa"),                                   # biased q/k/v projections
    "gemma": ({"head_dim": 8}, "sdpa"),                      # scaled embeddings, (1 + w) norms
    "gemma2": ({"head_dim": 8, "final_logit_softcapping": 5.0}, "eager"),  # capped logits
    "cohere": ({"logit_scale": 0.25}, "sdpa"),               # logits times a factor
    "granite": ({"logits_scaling": 8.0}, "sdpa"),            # logits over a factor
    "gpt2": ({"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}, "sdpa"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "sdpa"),  # experts
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, "sdpa"),  # positions from the mask
    "phi": ({}, "sdpa"),  # an output layer with a bias (folded into the chunked head)
    # sliding windows shorter than the examples: every layer (one mask), or some (a mask each)
    "mistral": ({"sliding_window": 4}, "sdpa"),
    "gemma3_text": ({"head_dim": 8, "sliding_window": 4,
                     "layer_types": ["sliding_attention", "full_attention"]}, "sdpa"),
}


def build(model_type: str, changes: dict, attention: str = "sdpa", seed: int = 0):
    config = AutoConfig.for_model(model_type, **{**SMALL, **changes})
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def examples():
    """Prompts of 3, 11, 1 and 7 tokens, two responses each of 2 to 7 tokens."""
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 100, (n,), generator=generator).tolist()

    return [TokenizedExample(prompt_ids=ids(p), response_ids=[ids(1 + (3 * e + 2 * r) % 6) + [2]
                                                               for r in range(2)], index=e)
            for e, p in enumerate([3, 11, 1, 7])]


def own_logps(model, batch_examples):
    """Summed response log-probs from the model's own forward, one unpadded row at a time."""
    rows = []
    for example in batch_examples:
        row = []
        for response in example.response_ids:
            ids = torch.tensor([example.prompt_ids + response])
            logps = model(ids).logits[0].float().log_softmax(-1)
            start = len(example.prompt_ids)
            row.append(sum(logps[start - 1 + t, token] for t, token in enumerate(response)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def preftune_logps(model, layout):
    batch = collate(examples(), pad_token_id=0, layout=layout, max_row_tokens=40)
    return sequence_stats(LogpModel(model, chunk_tokens=5)(batch), batch).logps


@pytest.mark.parametrize("model_type", list(ATTENTION_MODELS))
def test_log_probs_and_gradients_equal_the_models_own_in_every_layout(model_type):
    changes, attention = ATTENTION_MODELS[model_type]
    model = build(model_type, changes, attention)
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:  # (it starts at 0: make it count)
        torch.nn.init.normal_(head.bias)
    check_head(model)  # passes: preftune's head is the model's
    expected = own_logps(model, examples())
    expected.sum().backward()
    plain_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for layout in LAYOUTS:
        model.zero_grad()
        assert mask_leak(*decoder_of(model), layout) == 0.0  # the mask holds, exactly
        got = preftune_logps(model, layout)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        got.sum().backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain_grads[name], atol=2e-5, rtol=1e-4)


def test_the_mask_probe_runs_experts_per_token_and_gives_the_model_its_kernels_back():
    """Grouped expert kernels round a token's result by which other tokens share its expert:
    the probe computes experts per token, then restores the model's choice."""
    model = build("mixtral", *ATTENTION_MODELS["mixtral"])
    decoder, config = decoder_of(model)
    if getattr(config, "_experts_implementation", None) is None:
        pytest.skip("this transformers has one experts kernel")
    model.set_experts_implementation("grouped_mm")
    assert mask_leak(decoder, config, "prefix_shared") == 0.0
    assert config._experts_implementation == "grouped_mm"


def test_sliding_windows_are_read_by_layer_type_and_refused_where_they_cannot_be_built():
    from preftune.model.forward import attention_windows
    from preftune.model.verify import check_windows

    mistral = build("mistral", {"sliding_window": 4}).config
    gemma = build("gemma3_text", *ATTENTION_MODELS["gemma3_text"]).config
    assert attention_windows(mistral) == {None: 4}
    assert attention_windows(gemma) == {"sliding_attention": 4, "full_attention": None}
    assert attention_windows(tiny_llama().config) is None
    check_windows(gemma, 4, "varlen")  # the window never binds on 4 tokens
    check_windows(gemma, 64, "sdpa")  # it binds, and the dense masks have it
    with pytest.raises(ConfigError, match=r"model.attn_implementation: varlen has no sliding "
                                          r"window, .* look back 4 tokens, fewer than "
                                          r"data.max_length \(64\)"):
        check_windows(gemma, 64, "varlen")
    chunked = build("llama4_text", {"attention_chunk_size": 8, "head_dim": 8,
                                    "num_local_experts": 2, "intermediate_size_mlp": 64,
                                    "layer_types": ["chunked_attention", "full_attention"]}).config
    with pytest.raises(ConfigError, match="data.max_length: 64 tokens are more than this "
                                          r"model's attention chunks \(8\)"):
        check_windows(chunked, 64, "sdpa")


def test_the_head_reads_the_factors_and_cap_from_the_config():
    assert output_head(build("cohere", {"logit_scale": 0.25})) == Head(0.25, None)
    assert output_head(build("granite", {"logits_scaling": 8.0})) == Head(0.125, None)
    assert output_head(build("gemma2", {"head_dim": 8, "final_logit_softcapping": 5.0},
                             "eager")) == Head(1.0, 5.0)
    assert output_head(tiny_llama()) == Head()


def test_a_scaled_and_capped_head_has_the_formulas_log_probs_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (13,))
    upstream = torch.randn(13)
    head = Head(scale=3.0, softcap=2.5)
    got = chunked_token_logps(hidden, weight, targets, chunk_tokens=4, head=head)
    (got * upstream).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = 2.5 * torch.tanh(3.0 * (hidden @ weight.T) / 2.5)  # the formula, by autograd
    expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=1e-5)


class TripledLogits(LlamaForCausalLM):
    """A head preftune does not know: logits times 3, with nothing in the config saying so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


def test_a_head_that_does_something_unknown_is_refused_by_name():
    model = TripledLogits(tiny_llama().config).eval()
    with pytest.raises(ConfigError, match=r"model.path: TripledLogits computes its logits in a "
                                          r"way preftune's log-probs do not reproduce"):
        check_head(model)


def test_a_model_with_non_finite_weights_is_refused_as_such():
    model = tiny_llama().eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ConfigError) as refused:
        check_head(model, "--model")
    assert str(refused.value).startswith(
        "--model: 1 of the model's weight tensors hold NaN or inf values (e.g. "
        "model.layers.1.mlp.up_proj.weight): a training run that diverged saved them?")


def hybrid(seed: int = 0, vocab_size: int = 128):
    """LFM2 with a short-convolution layer before its attention layer."""
    return build("lfm2", {"layer_types": ["conv", "full_attention"], "vocab_size": vocab_size},
                 seed=seed)


def test_layers_that_ignore_the_mask_keep_to_padded_rows(capsys, monkeypatch):
    from preftune.model import verify

    monkeypatch.setattr(verify, "_SAID", set())  # said once per process: start afresh
    model = hybrid()
    decoder, config = decoder_of(model)
    for layout in ("prefix_shared", "packed", "packed_prefix_shared"):
        assert mask_leak(decoder, config, layout) > 1e-6  # the convolution reads across
    assert verified_layout(decoder, config, "prefix_shared") == "padded"
    assert verified_layout(*decoder_of(hybrid(seed=1)), "prefix_shared") == "padded"  # once
    said = capsys.readouterr().out
    assert said.count("layout: padded, not prefix_shared: Lfm2Model mixes tokens outside "
                      "attention") == 1
    with pytest.raises(ConfigError, match=r"train.layout: packed: Lfm2Model mixes tokens "
                                          r"outside attention .* Use layout padded"):
        verified_layout(decoder, config, "packed", configured="packed")
    torch.testing.assert_close(preftune_logps(model, "padded").detach(),
                               own_logps(model, examples()).detach(), atol=2e-5, rtol=1e-5)


def test_a_model_that_cannot_take_a_layouts_mask_keeps_to_padded_rows(capsys, monkeypatch):
    """Where the probe's forward raises on a layout's inputs (older transformers' Jamba took no
    4D mask), auto keeps to padded rows saying why, and an explicit layout is refused."""
    from preftune.model import verify

    monkeypatch.setattr(verify, "_SAID", set())
    decoder, config = decoder_of(tiny_llama())

    def refuse(module, args, kwargs):
        raise RuntimeError("The size of tensor a (64) must match the size of tensor b (12)\nmore")

    decoder.layers[0].register_forward_pre_hook(refuse, with_kwargs=True)
    assert verified_layout(decoder, config, "prefix_shared") == "padded"
    assert capsys.readouterr().out == (
        "layout: padded, not prefix_shared: LlamaModel cannot run the prefix_shared layout's "
        "mask (RuntimeError: The size of tensor a (64) must match the size of tensor b (12)).\n")
    with pytest.raises(ConfigError, match=r"train.layout: packed: LlamaModel cannot run the "
                                          r"packed layout's mask \(RuntimeError: The size .* "
                                          r"Use layout padded"):
        verified_layout(decoder, config, "packed", configured="packed")


def test_a_hybrid_model_trains_on_padded_rows_and_refuses_a_shared_layout(tmp_path):
    tokenizer = char_tokenizer()
    hybrid(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pairs = [{"prompt": f"Question {i}: which word comes next, please?", "chosen": "yes",
              "rejected": "no"} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tree = {"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
            "data": {"train": str(tmp_path / "pairs.jsonl")},
            "reference": {"cache_dir": str(tmp_path / "cache")},
            "train": {"batch_size": 2, "max_steps": 1}}
    run = train(Config.from_dict(tree), show_progress=False)
    assert json.loads((run / "run.json").read_text())["layout"] == "padded"
    tree["output_dir"] = str(tmp_path / "shared")
    tree["train"]["layout"] = "prefix_shared"
    with pytest.raises(ConfigError, match="train.layout: prefix_shared: Lfm2Model mixes"):
        train(Config.from_dict(tree), show_progress=False)


def test_a_hybrid_reward_model_scores_on_padded_rows():
    from transformers import AutoModelForSequenceClassification

    from preftune.reward.heads import Head as RewardHead
    from preftune.reward.model import RewardModel

    config = AutoConfig.for_model("jamba", **{**SMALL, "num_labels": 1, "attn_layer_period": 2,
                                              "attn_layer_offset": 1, "expert_layer_period": 2,
                                              "num_experts": 2, "mamba_d_state": 8,
                                              "use_mamba_kernels": False})
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(config).eval()
    reward_model = RewardModel(classifier, RewardHead())
    long_prompts = examples()[1:2] * 2  # 11 prompt tokens: auto would share the prompt
    batch = reward_model.make_batch(0, "auto")(long_prompts)
    assert batch.unit_ids is None and batch.input_ids.shape[0] == 4  # a padded row each
    with torch.no_grad():
        rewards = reward_model(batch)[0, :, 0]
        alone = [classifier(torch.tensor([long_prompts[0].prompt_ids + response])).logits[0, 0]
                 for response in long_prompts[0].response_ids]
    torch.testing.assert_close(rewards, torch.stack(alone), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="train.layout: prefix_shared: JambaModel mixes"):
        reward_model.make_batch(0, "prefix_shared")


def test_the_same_weights_in_another_architecture_do_not_share_a_cached_reference(tmp_path):
    from preftune.model.load import weights_fingerprint
    from preftune.model.reference import reference_cache_key

    llama = build("llama", {})
    granite = build("granite", {"logits_scaling": 8.0})
    granite.load_state_dict(llama.state_dict())
    assert weights_fingerprint(granite) == weights_fingerprint(llama)
    assert reference_cache_key(granite, examples(), {}) != reference_cache_key(
        llama, examples(), {})
    for name in ("one", "two"):  # where the model was loaded from does not matter
        llama.save_pretrained(tmp_path / name)
    keys = {reference_cache_key(AutoModelForCausalLM.from_pretrained(tmp_path / name),
                                examples(), {}) for name in ("one", "two")}
    assert keys == {reference_cache_key(llama, examples(), {})}


def test_a_change_to_preftunes_forward_retires_cached_references(monkeypatch):
    from preftune.model import reference

    llama = build("llama", {})
    key = reference.reference_cache_key(llama, examples(), {})
    monkeypatch.setattr(reference, "FORWARD_REVISION", reference.FORWARD_REVISION + 1)
    assert reference.reference_cache_key(llama, examples(), {}) != key


def test_dropout_is_off_while_training_unless_kept(tmp_path):
    from preftune.model.load import without_dropout

    gpt2 = build("gpt2", ATTENTION_MODELS["gpt2"][0])  # nn.Dropout layers, p = 0.1
    llama = build("llama", {"attention_dropout": 0.5})  # a rate the attention keeps as a float
    ids = torch.tensor([list(range(3, 40))])
    for model in (gpt2, llama):
        evaluated = model(ids).logits
        assert not torch.equal(model.train()(ids).logits, evaluated)
        without_dropout(model)
        assert torch.equal(model(ids).logits, evaluated)  # train mode, now as in eval

    tokenizer = char_tokenizer()
    model = build("gpt2", {**ATTENTION_MODELS["gpt2"][0], "vocab_size": len(tokenizer)})
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(
        {"prompt": f"Question {i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(4)))
    losses = {}
    for keep in (False, True):
        tree = {"output_dir": str(tmp_path / f"run-{keep}"),
                "model": {"path": str(tmp_path / "model")},
                "data": {"train": str(tmp_path / "pairs.jsonl")},
                "reference": {"cache_dir": str(tmp_path / "cache")},
                "train": {"batch_size": 4, "max_steps": 1, "keep_dropout": keep}}
        run = train(Config.from_dict(tree), show_progress=False)
        losses[keep] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # step 1: the policy is its reference, so DPO's loss is -log sigmoid(0) = log 2, exactly
    # as computed in fp32, unless dropout perturbs the policy
    assert losses[False] == pytest.approx(0.6931471805599453, abs=1e-7)
    assert abs(losses[True] - 0.6931471805599453) > 1e-4
    saved = AutoConfig.from_pretrained(tmp_path / "run-False" / "model")
    assert saved.resid_pdrop == 0.1  # the saved model keeps its own rates


def test_a_backbone_without_a_classification_class_is_refused_before_the_data_is_read(
        tmp_path):
    from preftune.api import RewardConfig, train_reward_model

    build("cohere", {}).save_pretrained(tmp_path / "cohere")
    tree = {"output_dir": str(tmp_path / "rm"), "model": {"path": str(tmp_path / "cohere")},
            "data": {"train": str(tmp_path / "missing.jsonl")}}
    with pytest.raises(ConfigError, match=r"model.path: .*cohere is a cohere model, for which "
                                          r"transformers has no sequence-classification class"):
        train_reward_model(RewardConfig.from_dict(tree), show_progress=False)


@pytest.mark.parametrize("model_type", ["gemma3_text", "lfm2", "falcon_h1"])
def test_sampling_k_answers_equals_k_prompt_copies(model_type, monkeypatch):
    """Gemma 3 (sliding-window cache layers) takes the shared prompt cache; LFM2 and Falcon-H1
    (convolution and state layers besides keys and values) encode each copy: all draw what K
    copies of each prompt draw."""
    from preftune import generation
    from preftune.generation import HFGenerator, SamplingSettings

    tokenizer = char_tokenizer()
    changes = {"gemma3_text": ATTENTION_MODELS["gemma3_text"][0],
               "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_head": 8,
                             "mamba_d_state": 16, "mamba_chunk_size": 16},
               "lfm2": {"layer_types": ["conv", "full_attention"]}}[model_type]
    model = build(model_type, {**changes, "vocab_size": len(tokenizer)}, seed=3)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in ("hello there, friend", "ab", "the quick brown fox")]
    settings = SamplingSettings(samples=3, max_new_tokens=8, seed=4, batch_size=4)
    caches = []
    real = generation.shared_prefix_cache
    monkeypatch.setattr(generation, "shared_prefix_cache",
                        lambda *a: caches.append(real(*a)) or caches[-1])
    drawn = HFGenerator(model, tokenizer).generate(prompts, settings)
    assert (caches[0] is None) == (model_type != "gemma3_text")
    monkeypatch.setattr(generation, "shared_prefix_cache", lambda *a: None)
    assert drawn.token_ids == HFGenerator(model, tokenizer).generate(prompts, settings).token_ids
    assert [len(samples) for samples in drawn.token_ids] == [3, 3, 3]


def test_image_data_is_refused_where_image_tokens_attend_both_ways_by_another_rule():
    """Gemma 3's rule is reproduced (tests/test_vision.py), on sdpa and eager attention only;
    PaliGemma's (the whole prompt both ways) is not."""
    from preftune.model.verify import check_image_attention

    model = build("gemma3_text", ATTENTION_MODELS["gemma3_text"][0])
    model.config.model_type = "paligemma"
    text, pictured = examples()[:2], [TokenizedExample([1, 2], [[3]], 0, images=("cat.png",))]
    check_image_attention(model, text)  # text alone trains
    with pytest.raises(ConfigError, match="model.path: a paligemma model lets image tokens "
                                          "attend both ways by a rule preftune's attention "
                                          "masks do not reproduce yet"):
        check_image_attention(model, text + pictured)
    model.config.model_type = "gemma3"  # the vision-language Gemma 3's type
    model.config.image_token_id = 7
    check_image_attention(model, text + pictured, attn_implementation="sdpa")
    for kernel in ("flex_attention", "varlen"):
        with pytest.raises(ConfigError, match=f"model.attn_implementation: {kernel} cannot let "
                                              "an image's tokens attend both ways, as a gemma3 "
                                              "model's do"):
            check_image_attention(model, text + pictured, attn_implementation=kernel)


def test_an_encoder_decoder_model_is_refused_by_name(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from preftune.model.load import load_model

    tokenizer = char_tokenizer()
    T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64,
                                        num_layers=1, num_heads=2, d_kv=16)).save_pretrained(
        tmp_path / "t5")
    with pytest.raises(ConfigError, match=r"model.path: .*t5 is a t5 model, which is not a "
                                          r"causal \(decoder-only\) language model"):
        load_model(str(tmp_path / "t5"), tokenizer)


def test_the_plan_names_the_head_and_the_windows(tmp_path, capsys):
    tokenizer = char_tokenizer()
    changes = {**ATTENTION_MODELS["gemma3_text"][0], "vocab_size": len(tokenizer),
               "final_logit_softcapping": 30.0}
    build("gemma3_text", changes).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(
        {"prompt": f"Question {i}?", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(4)))
    tree = {"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
            "data": {"train": str(tmp_path / "pairs.jsonl"), "max_length": 64}}
    train(Config.from_dict(tree), plan_only=True)
    out = capsys.readouterr().out
    assert "output head        logits x 1, capped at 30\n" in out
    assert ("attention windows  sliding_attention 4 tokens (built into the masks: "
            "data.max_length is longer)\n") in out


@pytest.mark.parametrize("objective", ["dpo", "tdpo"])  # tdpo: both models' heads, chunk by chunk
def test_a_model_whose_output_layer_has_a_bias_trains_it(tmp_path, objective):
    from safetensors.torch import load_file

    tokenizer = char_tokenizer()
    model = build("phi", {"vocab_size": len(tokenizer)})
    torch.nn.init.normal_(model.lm_head.bias)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    pairs = [{"prompt": f"Question {i}: which word comes next?", "chosen": "yes",
              "rejected": "no"} for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tree = {"output_dir": str(tmp_path / "run"), "model": {"path": str(tmp_path / "model")},
            "data": {"train": str(tmp_path / "pairs.jsonl")}, "objective": {"name": objective},
            "reference": {"cache_dir": str(tmp_path / "cache")},
            "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-2}}
    run = train(Config.from_dict(tree), show_progress=False)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # the reference is the model
    start = load_file(tmp_path / "model" / "model.safetensors")["lm_head.bias"]
    end = load_file(run / "model" / "model.safetensors")["lm_head.bias"]
    assert (end - start).abs().max() > 1e-3  # the bias trained

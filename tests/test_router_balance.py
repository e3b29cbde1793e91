"""Mixture-of-experts policies: the routers' load-balancing loss (model/router.py) against a
hand computation of Switch Transformers' formula and against each model's own ``aux_loss``, in
every layout, and added to the preference loss by ``preftune train`` as the model's own
training adds it."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM

from preftune.config import ConfigError, build_config
from preftune.data.layout import LAYOUTS, collate
from preftune.model.forward import LogpModel
from preftune.model.router import balancing_loss, router_balance
from preftune.train import loop
from preftune.train.logging import read_metrics
from test_architectures import SMALL, examples
from test_train_loop import write_sum_pairs
from tiny_models import char_tokenizer, save_tiny_moe_dir, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")

# model_type -> its config's names for the expert count (4 experts, 2 per token)
MOE = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
       "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                     "decoder_sparse_step": 1, "head_dim": 8},
       "olmoe": {"num_experts": 4, "num_experts_per_tok": 2}}


def moe_model(model_type: str, seed: int = 0, **changes):
    config = AutoConfig.for_model(model_type, **{**SMALL, **MOE[model_type], **changes})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().eval()


def by_hand(router_logits, weights, experts, top_k):
    """Switch Transformers' E sum_e f_e P_e written out token by token."""
    chosen, probability, tokens = [0.0] * experts, [0.0] * experts, 0.0
    for layer in router_logits:
        for logits, weight in zip(layer.tolist(), weights.tolist()):
            exp = [pow(2.718281828459045, v - max(logits)) for v in logits]
            probs = [v / sum(exp) for v in exp]
            for e in sorted(range(experts), key=lambda e: -probs[e])[:top_k]:
                chosen[e] += weight
            for e in range(experts):
                probability[e] += weight * probs[e]
            tokens += weight
    return experts * sum(c / tokens * p / tokens for c, p in zip(chosen, probability))


def test_the_loss_is_switch_transformers_formula_with_tokens_counted_by_weight():
    generator = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(6, 5, generator=generator) for _ in range(3))
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 1.0])
    got = balancing_loss(logits, weights, experts=5, top_k=2)
    assert got.item() == pytest.approx(by_hand(logits, weights, 5, 2), rel=1e-6)
    # a token counted twice is the same as the token written out twice
    doubled = tuple(torch.cat([layer, layer[4:5]]) for layer in logits)
    ones = torch.tensor([1.0, 2.0, 0.0, 1.0, 2.0, 1.0, 1.0])
    assert balancing_loss(doubled, ones, 5, 2).item() == pytest.approx(got.item(), rel=1e-6)
    # uniform routers give its minimum, top_k
    flat = (torch.zeros(4, 5),)
    assert balancing_loss(flat, torch.ones(4), 5, 2).item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("model_type", list(MOE))
def test_every_layout_gives_the_models_own_aux_loss_over_the_padded_rows(model_type):
    model = moe_model(model_type)
    balance = router_balance(model, 0.01)
    assert (balance.experts, balance.top_k) == (4, 2)
    padded = collate(examples(), pad_token_id=0, layout="padded")
    own = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                output_router_logits=True).aux_loss
    own.backward()
    own_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logp_model = LogpModel(model, chunk_tokens=5, router=balance)
    for layout in LAYOUTS:
        model.zero_grad()
        batch = collate(examples(), pad_token_id=0, layout=layout, max_row_tokens=40)
        logps, aux = logp_model(batch, balance=True)
        torch.testing.assert_close(aux, own, atol=1e-6, rtol=1e-5, msg=layout)
        aux.backward()
        gate_grads = {n: p.grad for n, p in model.named_parameters()
                      if p.grad is not None and p.grad.abs().sum() > 0}
        assert gate_grads.keys() == {n for n, g in own_grads.items() if g.abs().sum() > 0}
        for name, grad in gate_grads.items():
            torch.testing.assert_close(grad, own_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        # and the log-probs are those of the plain forward
        torch.testing.assert_close(logps, logp_model(batch), atol=1e-6, rtol=0)


def test_the_setting_follows_the_models_config_unless_given():
    plain = moe_model("mixtral")
    assert router_balance(plain, None) is None  # the config does not ask for it
    asked = moe_model("mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    assert router_balance(asked, None).coefficient == 0.02
    assert router_balance(asked, 0) is None
    assert router_balance(plain, 0.5).coefficient == 0.5
    assert router_balance(tiny_llama(), None) is None
    with pytest.raises(ValueError, match=r"train.router_aux_loss_coef: 0.5 weights the routers' "
                                         r"load-balancing loss .* LlamaForCausalLM trains "
                                         r"without one .*remove the key"):
        router_balance(tiny_llama(), 0.5)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    save_tiny_moe_dir(root / "model")
    write_sum_pairs(root / "pairs.jsonl", 4)
    return root


def config_tree(workspace: Path, name: str, **train) -> dict:
    return {"output_dir": str(workspace / "runs" / name),
            "model": {"path": str(workspace / "model")},
            "data": {"train": str(workspace / "pairs.jsonl")},
            "reference": {"cache_dir": str(workspace / "cache")},
            "train": {"learning_rate": 1e-3, "batch_size": 4, "max_steps": 1,
                      "max_grad_norm": None, "seed": 3, **train}}


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_a_training_step_adds_the_weighted_loss_of_the_models_own_formula(workspace, layout):
    config = build_config(config_tree(workspace, f"task-{layout}", layout=layout,
                                      router_aux_loss_coef=0.5))
    task, _ = loop.policy_task(config, Accelerator())
    batch = task.make_batch(task.train_examples)
    losses, metrics = task.losses(task.module, batch, 0)
    losses.mean().backward()
    lm = task.module.model
    got = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    # the same step by hand: the objective's loss alone, plus 0.5 x the model's own aux_loss
    # over the step's sequences written out as padded rows
    lm.zero_grad()
    task.module.router = None
    plain, _ = task.losses(task.module, batch, 0)
    rows = collate(task.train_examples, task.tokenizer.pad_token_id, "padded")
    own = lm(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
             output_router_logits=True).aux_loss
    (plain.mean() + 0.5 * own).backward()
    torch.testing.assert_close(losses, plain + 0.5 * own, atol=1e-6, rtol=1e-6)
    assert metrics["router_aux_loss"][0].item() / 4 == pytest.approx(own.item(), rel=1e-5)
    for name, grad in got.items():
        torch.testing.assert_close(grad, lm.get_parameter(name).grad, atol=1e-6, rtol=1e-4,
                                   msg=name)


def test_a_run_logs_the_routers_loss_and_a_dense_model_refuses_the_key(workspace, tmp_path):
    output = loop.train(build_config(config_tree(workspace, "logged", router_aux_loss_coef=0.1,
                                                 max_steps=2, batch_size=2)),
                        show_progress=False)
    records = read_metrics(output / "metrics.jsonl")
    assert [r["step"] for r in records if "router_aux_loss" in r] == [1, 2]
    assert json.loads((output / "run.json").read_text())["layout"] == "prefix_shared"
    padded = loop.train(build_config(config_tree(
        workspace, "logged-padded", router_aux_loss_coef=0.1, max_steps=1, batch_size=2,
        layout="padded")), show_progress=False)
    # the same model and examples at step 1, whatever the layout
    assert read_metrics(padded / "metrics.jsonl")[0]["router_aux_loss"] == pytest.approx(
        records[0]["router_aux_loss"], rel=1e-5)
    off = loop.train(build_config(config_tree(workspace, "off", max_steps=1)),
                     show_progress=False)
    assert "router_aux_loss" not in read_metrics(off / "metrics.jsonl")[0]

    tiny = tiny_llama(vocab_size=len(char_tokenizer()))
    tiny.save_pretrained(tmp_path / "dense")
    char_tokenizer().save_pretrained(tmp_path / "dense")
    tree = config_tree(workspace, "dense", router_aux_loss_coef=0.1)
    tree["model"]["path"] = str(tmp_path / "dense")
    with pytest.raises(ConfigError, match="LlamaForCausalLM trains without one"):
        loop.train(build_config(tree), show_progress=False)
    assert not (workspace / "runs" / "dense" / "config.yaml").exists()


def test_checkpointed_layers_keep_the_gradient_of_the_routers_loss(workspace):
    """preftune's recomputation runs a layer's forward without gradients, which would cut the
    router logits transformers hands out beside the layer's output: such forwards go through
    torch's checkpoint, and the step's gradients are those of the plain one."""
    grads = {}
    for checkpointed in (False, True):
        config = build_config(config_tree(workspace, f"ckpt-{checkpointed}",
                                          router_aux_loss_coef=0.5,
                                          gradient_checkpointing=checkpointed))
        task, _ = loop.policy_task(config, Accelerator())
        losses, _ = task.losses(task.module, task.make_batch(task.train_examples), 0)
        losses.mean().backward()
        grads[checkpointed] = {n: p.grad for n, p in task.module.model.named_parameters()
                               if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)

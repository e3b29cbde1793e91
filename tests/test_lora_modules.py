"""model.lora.modules_to_save: whole modules train beside the adapters (a copy each); the saved
adapter carries them, the merged model has them, tied embeddings stay tied, and the
adapters-off reference keeps the originals."""

import re

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import losses, run, workspace  # noqa: F401

from preftune.config import ConfigError, build_config
from preftune.model.adapter_dirs import merge_adapter
from preftune.model.load import load_model_and_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"]}


def test_the_tied_head_trains_and_the_adapter_dir_rebuilds_the_merged_model(workspace):  # noqa: F811
    output = run(workspace, "head-saved", model__lora=LORA)
    base = load_file(workspace / "model" / "model.safetensors")
    merged = load_file(output / "model" / "model.safetensors")
    # the tiny model ties its output layer to the embeddings: one tensor, trained
    assert "lm_head.weight" not in merged
    moved = (merged["model.embed_tokens.weight"] - base["model.embed_tokens.weight"]).abs()
    assert moved.max() > 1e-3
    adapter = load_file(output / "adapter" / "adapter_model.safetensors")
    torch.testing.assert_close(adapter["base_model.model.model.embed_tokens.weight"],
                               merged["model.embed_tokens.weight"], rtol=0, atol=0)
    model, _ = load_model_and_tokenizer(str(workspace / "model"), "float32")
    rebuilt = merge_adapter(model, str(output / "adapter"))
    assert rebuilt.get_output_embeddings().weight is rebuilt.get_input_embeddings().weight
    for name, value in rebuilt.state_dict().items():
        if name in merged:
            torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6, msg=name)


def test_the_adapters_off_reference_keeps_the_original_modules(workspace):  # noqa: F811
    """Every step, the adapters-off reference equals the precomputed one (the model before
    training), though the head's copy has moved since step 1."""
    off = run(workspace, "head-adapter-off", model__lora=LORA, reference__strategy="adapter-off")
    precomputed = run(workspace, "head-precomputed", model__lora=LORA,
                      reference__strategy="precomputed")
    assert losses(off) == pytest.approx(losses(precomputed), rel=1e-5)
    assert losses(off)[-1] < losses(off)[0] - 0.01


def test_a_module_name_the_model_lacks_is_refused_by_name(workspace):  # noqa: F811
    with pytest.raises(ConfigError, match=r"model.lora.modules_to_save: no module of "
                                          r"LlamaForCausalLM is called 'head'; module names "
                                          r"include .*embed_tokens"):
        run(workspace, "no-head", model__lora={**LORA, "modules_to_save": ["head"]})
    with pytest.raises(ConfigError, match="model.lora.modules_to_save is for language models"):
        from preftune.diffusion.config import DiffusionConfig

        DiffusionConfig.from_dict({"model": {"path": "x", "lora": LORA}})
    build_config({"model": {"lora": LORA}})  # a policy takes it


def test_target_modules_that_name_nothing_are_refused_and_one_name_is_a_name(workspace):  # noqa: F811
    """A target module the model lacks (in a list, or a pattern matching no module's whole
    name) is refused by name before training (it was peft's traceback); a plain string
    names a module, as in a list (peft would match it as a whole path, and find nothing)."""
    for target, missing in ((["q_proj", "q_prj"], "q_prj"), (r".*\.q_prj", r".*\.q_prj")):
        with pytest.raises(ConfigError, match=f"model.lora.target_modules: "
                                              f"{re.escape(repr(missing))} names no "
                                              "module of LlamaForCausalLM; its linear layers "
                                              "are called down_proj, gate_proj, k_proj"):
            run(workspace, "no-target", model__lora={**LORA, "target_modules": target})
    one = run(workspace, "one-target", model__lora={"r": 4, "target_modules": "q_proj"})
    pattern = run(workspace, "pattern-target",
                  model__lora={"r": 4, "target_modules": r".*\.q_proj"})
    adapted = [sorted(load_file(run_dir / "adapter" / "adapter_model.safetensors"))
               for run_dir in (one, pattern)]
    assert adapted[0] == adapted[1] and adapted[0]
    assert all(".q_proj." in name for name in adapted[0])
    assert losses(one) == pytest.approx(losses(pattern), rel=1e-6)


@pytest.mark.parametrize("target, says", [
    (["lm_head", "q_proj"], r"lm_head is the model's output layer, which log-probs are computed "
                            r"from as a plain weight: train it in full with "
                            r"model.lora.modules_to_save: \[lm_head\]"),
    (["embed_tokens"], r"model.embed_tokens is the model's input embeddings, .*"
                       r"modules_to_save: \[embed_tokens\]"),
    (".*mlp.*", r"'.\*mlp.\*' matches model.layers.0.mlp \(LlamaMLP\), which is no layer LoRA "
                r"adapts; name layers only \(its linear layers are called down_proj, gate_proj, "
                r"k_proj, o_proj, q_proj, up_proj, v_proj"),
    (["act_fn"], r"act_fn matches model.layers.0.mlp.act_fn \(SiLUActivation\)"),
])
def test_targets_that_lora_cannot_adapt_here_are_refused_before_training(workspace, target,  # noqa: F811
                                                                         says):
    """The output layer's adapters were never read (log-probs take its weight as it is), the
    input embeddings' broke eval, and a module that is no layer was peft's traceback."""
    with pytest.raises(ConfigError, match=f"model.lora.target_modules: {says}"):
        run(workspace, "no-target", model__lora={"r": 4, "target_modules": target})

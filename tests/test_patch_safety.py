"""What a patched model promises beyond its outputs: checkpoints saved while patched are the
original model's, a failure at any point of `patch` leaves the model as it was, copies and pickles
work, dtype changes are checked against an explicit backend, and `plugged` never hides the body's
error."""
import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch

import doe_kernels as dk
import doe_kernels.models.base as base
from safetensors.torch import load_file, save_file
from model_utils import build, inputs, masked_dense, mixed_mask, output_of, snapshot, state_dict_equal
from moe_utils import mixtral

FAMILIES = ["bert", "llama", "mixtral"]


def model_of(name):
    return mixtral() if name == "mixtral" else build(name)


def masked(model):
    mask = mixed_mask(model)
    return mask if dk.models.spec_of(model).num_experts == 0 else \
        dk.ExpertMask(mask.ffn, mask.heads, mask.spec, moe={0: [0, 2, 5], 2: [1, 3]})


def modules_of(model):
    return {name: module for name, module in model.named_modules()}


def assert_untouched(model, before, modules_before):
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)
    after = modules_of(model)
    assert after.keys() == modules_before.keys()
    assert all(after[k] is modules_before[k] for k in after)


def run(model, name="llama"):
    ids, attention = inputs("bert" if name == "bert" else "llama")
    with torch.no_grad():
        return output_of(model, ids, attention)


# ---- checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_state_dict_of_a_patched_model_is_the_original(name, tmp_path):
    model = model_of(name)
    before = snapshot(model)
    dk.patch(model, masked(model))
    patched = model.state_dict()
    assert list(patched) == list(before)
    assert state_dict_equal(patched, before)
    save_file(patched, str(tmp_path / "weights.safetensors"))  # refuses non-contiguous tensors
    assert state_dict_equal(load_file(str(tmp_path / "weights.safetensors")), before)
    kept = model.state_dict(keep_vars=True)  # the live Parameters, where the model has them
    params = dict(model.named_parameters())
    assert list(kept) == list(before)
    assert sum(isinstance(v, torch.nn.Parameter) for v in kept.values()) > len(kept) // 2
    assert all(kept[k] is params[k] for k in kept if k in params)

    torch.save(patched, tmp_path / "weights.pt")
    fresh = model_of(name)
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt"))
    assert state_dict_equal(snapshot(fresh), before)

    model.save_pretrained(tmp_path / "checkpoint")
    reloaded = type(model).from_pretrained(tmp_path / "checkpoint").eval()
    assert state_dict_equal(snapshot(reloaded), before)
    dk.unpatch(model)
    assert state_dict_equal(snapshot(model), before)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_load_state_dict_into_a_patched_model_is_refused_before_any_change(name):
    model = model_of(name)
    mask = masked(model)
    dk.patch(model, mask)
    expected = run(model, name)
    other = {k: torch.zeros_like(v) for k, v in model_of(name).state_dict().items()}
    with pytest.raises(RuntimeError, match="unpatch"):
        model.load_state_dict(other)
    with pytest.raises(RuntimeError, match="unpatch"):  # a layer loaded on its own too
        layer = model.bert.encoder.layer[0] if name == "bert" else model.model.layers[0]
        layer.load_state_dict({k.split(".0.", 1)[1]: v for k, v in other.items() if ".0." in k})
    assert torch.equal(run(model, name), expected)
    dk.unpatch(model)
    model.load_state_dict(other)  # unpatched: loads as usual


# ---- failures part-way -----------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_a_failure_inside_a_layer_leaves_the_model_as_it_was(name, fail_at, monkeypatch):
    """`input_major` runs once per converted weight (2 per layer): failing at the 1st, 2nd or 4th
    call fails before any change, half-way through layer 0, and half-way through layer 1."""
    model = model_of(name)
    before, modules_before, expected = snapshot(model), modules_of(model), run(model, name)
    calls = []
    real = base.input_major

    def failing(weight):
        calls.append(1)
        if len(calls) == fail_at:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real(weight)

    monkeypatch.setattr(base, "input_major", failing)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        dk.patch(model, masked(model))
    assert_untouched(model, before, modules_before)
    assert torch.equal(run(model, name), expected)
    monkeypatch.setattr(base, "input_major", real)
    mask = masked(model)
    reference = run(masked_dense(model, mask), name) if name != "mixtral" else None
    with dk.plugged(model, mask):  # and it patches normally afterwards
        if reference is not None:
            assert torch.allclose(run(model, name), reference, atol=1e-5)
    assert_untouched(model, before, modules_before)


def test_a_failure_whose_rollback_cannot_copy_leaves_the_original_modules(monkeypatch):
    """A patch failing in layer 1 whose rollback cannot copy a weight back either (out of memory
    twice): every layer still gets its original modules back (the rollback stopped at the first
    failure, leaving layers patched with no patch state to undo them), the weights keep their
    values, the patch's error carries a note, and a later patch works."""
    model = build("llama")
    before, modules_before, expected = snapshot(model), modules_of(model), run(model)
    calls, real_input_major = [], base.input_major

    def failing(weight):
        calls.append(1)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real_input_major(weight)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated out of memory, again")

    monkeypatch.setattr(base, "input_major", failing)
    monkeypatch.setattr(base.torch, "empty_strided", no_memory)
    with pytest.raises(torch.OutOfMemoryError) as error:
        dk.patch(model, masked(model))
    monkeypatch.undo()
    assert str(error.value) == "simulated out of memory"  # the patch's own error
    assert any("could not restore a layer's weight layout" in n for n in error.value.__notes__)
    assert_untouched(model, before, modules_before)
    assert torch.equal(run(model), expected)
    with dk.plugged(model, masked(model)):
        pass
    assert_untouched(model, before, modules_before)


def test_a_failed_swap_keeps_the_previous_expert(monkeypatch):
    model = build("llama")
    first, second = mixed_mask(model, seed=1), mixed_mask(model, ffn_keep=0.7, seed=2)
    dk.patch(model, first)
    expected = run(model)
    real, calls = base.LayerPatch.set, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in layer 1")
        return real(self, *args)

    monkeypatch.setattr(base.LayerPatch, "set", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        dk.patch(model, second)
    monkeypatch.setattr(base.LayerPatch, "set", real)
    assert dk.current_mask(model) is first
    assert torch.equal(run(model), expected)
    dk.unpatch(model)


def test_a_failed_unpatch_still_restores_every_layer(monkeypatch):
    """An unpatch whose first weight cannot be copied back into its layout (out of memory)
    stopped there, leaving the other layers patched with the patch state and guard: a later
    patch served those layers dense. Every layer gets its modules back, the model is unpatched
    and the error (with a note) raised; the weights keep their values, and it patches anew."""
    model = build("llama")
    before, modules_before, expected = snapshot(model), modules_of(model), run(model)
    mask = mixed_mask(model, seed=1)
    reference = run(masked_dense(model, mask))
    dk.patch(model, mixed_mask(model, seed=2))
    real, calls = base._relayout, []

    def failing(weight, data):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("simulated out of memory")
        return real(weight, data)

    monkeypatch.setattr(base, "_relayout", failing)
    with pytest.raises(torch.OutOfMemoryError, match="simulated") as error:
        dk.unpatch(model)
    monkeypatch.undo()
    assert len(calls) == 6  # every converted weight of the 3 layers was tried
    assert any("unpatched the model" in note for note in error.value.__notes__)
    assert_untouched(model, before, modules_before)
    assert "_apply" not in model.__dict__ and not model._forward_pre_hooks
    torch.testing.assert_close(run(model), expected, atol=1e-6, rtol=1e-5)
    with dk.plugged(model, mask):
        torch.testing.assert_close(run(model), reference, atol=1e-5, rtol=1e-4)
    assert_untouched(model, before, modules_before)


# ---- copies ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_patched_model_deep_copies_and_pickles(name):
    model = model_of(name)
    before = snapshot(model)
    mask = masked(model)
    dk.patch(model, mask)
    expected = run(model, name)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert dk.is_patched(clone) and dk.current_mask(clone) == mask
        assert torch.equal(run(clone, name), expected)
        dk.patch(clone, mixed_mask(clone, seed=5))  # swaps on the copy
        dk.unpatch(clone)
        assert state_dict_equal(snapshot(clone), before)
    assert torch.equal(run(model, name), expected)  # the original is untouched by its copies
    dk.unpatch(model)
    assert state_dict_equal(snapshot(model), before)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_deleted_patched_model_is_freed_without_the_garbage_collector(name):
    """No reference cycle through the patch: `del model` frees it at once (GPU memory too)."""
    model = model_of(name)
    dk.patch(model, masked(model))
    gc.collect()
    gc.disable()
    try:
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()


# ---- dtype and device changes ------------------------------------------------------------------
def test_a_dtype_the_explicit_backend_cannot_run_is_refused_before_any_change():
    model = build("llama")
    before = snapshot(model)
    mask = mixed_mask(model)
    dk.patch(model, mask, backend="cpu")
    expected = run(model)
    for convert in (model.double, model.half, lambda: model.to(torch.float64)):
        with pytest.raises(dk.BackendUnavailableError, match="backend='cpu'.*float"):
            convert()
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert torch.equal(run(model), expected)
    model.bfloat16()  # the cpu backend runs bfloat16
    dk.patch(model, mixed_mask(model, seed=3), backend="cpu")  # a swap after the change works
    assert run(model).dtype == torch.bfloat16
    model.float()
    dk.unpatch(model)
    assert state_dict_equal(snapshot(model), {k: v.bfloat16().float() for k, v in before.items()})


def test_a_submodule_converted_alone_is_checked_at_the_next_swap():
    model = build("llama")
    dk.patch(model, mixed_mask(model), backend="cpu")
    model.model.double()  # the model's guard does not see a submodule's conversion
    with pytest.raises(dk.BackendUnavailableError, match="backend 'cpu' does not support"):
        dk.patch(model, mixed_mask(model, seed=3), backend="cpu")
    dk.patch(model, mixed_mask(model, seed=3))  # auto runs float64
    model.lm_head.double()
    assert run(model).dtype == torch.float64
    dk.unpatch(model)


def test_auto_backend_follows_a_dtype_change():
    model = build("llama")
    mask = mixed_mask(model)
    reference = run(masked_dense(model.double(), mask))
    model.float()
    dk.patch(model, mask)
    model.double()
    assert torch.allclose(run(model), reference, atol=1e-10)
    dk.patch(model, mixed_mask(model, seed=4))  # swaps build their plans for the new dtype
    dk.unpatch(model)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.parametrize("convert", ["type", "to_empty"])
def test_a_conversion_changing_integer_tensors_is_refused_before_any_change(convert):
    """`model.type(torch.float64)` turned the index buffers into float64 (the forward failed),
    and `model.to_empty(...)` filled them with uninitialised memory: both are refused before
    anything changes, and the model still computes its expert."""
    model = build("llama")
    dk.patch(model, mixed_mask(model))
    before, expected = snapshot(model), run(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    match = ("turns integer tensors into torch.float64" if convert == "type"
             else "does not keep tensors' values")
    with pytest.raises(ValueError, match=match):
        if convert == "type":
            model.type(torch.float64)
        else:
            model.to_empty(device="cpu")
    assert state_dict_equal(snapshot(model), before)
    after = dict(model.named_buffers())
    assert after.keys() == buffers.keys() and all(torch.equal(after[k], v)
                                                  for k, v in buffers.items())
    assert torch.equal(run(model), expected)
    model.to(torch.float64)  # converting the floating-point tensors only: as usual
    assert run(model).dtype == torch.float64
    dk.unpatch(model)


def test_a_conversion_replacing_parameters_is_refused_before_any_change():
    """Under torch.__future__.set_overwrite_module_params_on_conversion(True) a conversion
    replaces Parameters, which the swapped-in modules share with the originals (out of the
    tree): after `.double()` and unpatch, the originals held stale float32 Parameters. It is
    refused while patched, and works again once unpatched."""
    model = build("llama")
    dk.patch(model, mixed_mask(model))
    before, expected = snapshot(model), run(model)
    params = {name: id(p) for name, p in model.named_parameters()}
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with pytest.raises(RuntimeError, match="overwrite_module_params_on_conversion.*unpatch"):
            model.double()
        assert {name: id(p) for name, p in model.named_parameters()} == params
        assert state_dict_equal(snapshot(model), before)
        assert torch.equal(run(model), expected)
        dk.unpatch(model)
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


# ---- plugged ---------------------------------------------------------------------------------
def test_plugged_keeps_the_body_error_when_the_body_unpatched():
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(KeyError, match="from the body"):
        with dk.plugged(model, mixed_mask(model)):
            dk.unpatch(model)
            raise KeyError("from the body")
    assert not dk.is_patched(model)
    assert state_dict_equal(snapshot(model), before)

    first = mixed_mask(model, seed=1)
    dk.patch(model, first)
    with pytest.raises(KeyError, match="from the body"):
        with dk.plugged(model, mixed_mask(model, seed=2)):
            dk.unpatch(model)
            raise KeyError("from the body")
    assert dk.current_mask(model) is first  # the expert plugged before is back
    dk.unpatch(model)
    assert state_dict_equal(snapshot(model), before)


def test_plugged_keeps_the_body_error_when_restoring_fails():
    model = build("llama")
    first = mixed_mask(model, seed=1)
    dk.patch(model, first, backend="cpu")
    with pytest.raises(KeyError, match="from the body") as error:
        with dk.plugged(model, mixed_mask(model, seed=2), backend="auto"):
            model.double()  # fine under auto; the previous expert's backend cannot run it
            raise KeyError("from the body")
    assert any("could not restore" in note for note in error.value.__notes__)
    dk.unpatch(model)


# ---- models refused, and what a patched model refuses -----------------------------------------
def _lookalike(name):
    """Tiny models whose layers hold the LLaMA or BERT family's modules but compute otherwise."""
    import transformers as T

    causal = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=80, vocab_size=120,
                  max_position_embeddings=128, tie_word_embeddings=False)
    encoder = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=72, vocab_size=120, max_position_embeddings=64)
    return {"cohere": lambda: T.CohereForCausalLM(T.CohereConfig(**causal)),
            "olmo": lambda: T.OlmoForCausalLM(T.OlmoConfig(clip_qkv=0.05, **causal)),
            "roformer": lambda: T.RoFormerModel(T.RoFormerConfig(**encoder)),
            }[name]().eval()


@pytest.mark.parametrize("name, model_type", [("cohere", "cohere"), ("olmo", "olmo"),
                                              ("roformer", "roformer")])
def test_models_sharing_a_familys_modules_but_not_its_computation_are_refused(name, model_type):
    """Cohere's interleaved rotary, OLMo's clip_qkv, RoFormer's rotary positions: patched, they
    computed something else without a word (or failed later); the model type is refused."""
    model = _lookalike(name)
    before, modules = snapshot(model), modules_of(model)
    with pytest.raises(dk.models.UnsupportedModelError,
                       match=f"model_type '{model_type}'.* is not supported"):
        dk.patch(model, dk.ExpertMask())
    assert_untouched(model, before, modules)


@pytest.mark.parametrize("name", ["XLMRoberta", "Camembert", "Electra"])
def test_roberta_copies_are_patched_as_roberta(name):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        hidden_size=40, num_hidden_layers=3, num_attention_heads=5, intermediate_size=70,
        vocab_size=120, max_position_embeddings=70)
    model = getattr(transformers, f"{name}Model")(config).eval()
    ids, attention = inputs("bert")
    mask = mixed_mask(model)
    with torch.no_grad():
        expected = output_of(masked_dense(model, mask), ids, attention)
        with dk.plugged(model, mask):
            torch.testing.assert_close(output_of(model, ids, attention), expected,
                                       atol=1e-5, rtol=1e-4)


def test_a_peft_lora_model_is_refused_until_merged():
    """A LoRA layer's weight is its base layer's: patched, the adapters were silently lost."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False)).eval()
    before = snapshot(model)
    with pytest.raises(dk.models.UnsupportedModelError,
                       match=r"self_attn.q_proj is a Linear.* not a plain torch.nn.Linear \(a "
                             r"PEFT adapter: merge it first"):
        dk.patch(model, dk.ExpertMask())
    assert not dk.is_patched(model) and state_dict_equal(before, snapshot(model))
    merged = model.merge_and_unload()
    ids, attention = inputs("llama")
    with torch.no_grad():
        expected = output_of(merged, ids, attention)
        with dk.plugged(merged, dk.ExpertMask()):
            torch.testing.assert_close(output_of(merged, ids, attention), expected)


def test_attention_implementations_other_than_sdpa_and_eager_are_refused_for_causal_models():
    """A patched causal model computes attention from the sdpa/eager masks: with flash
    attention's 2-D padding mask a padded batch attended non-causally (wrong answers). A BERT
    encoder reads that mask as it is."""
    model = build("llama")
    model.config._attn_implementation = "flash_attention_2"
    before, modules = snapshot(model), modules_of(model)
    with pytest.raises(dk.models.UnsupportedModelError,
                       match="attn_implementation 'flash_attention_2' is not supported"):
        dk.patch(model, mixed_mask(model))
    assert_untouched(model, before, modules)
    model.config._attn_implementation = "sdpa"
    with dk.plugged(model, mixed_mask(model)):  # switched after patching: the forward refuses
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(dk.models.UnsupportedModelError, match="not from flash attention's"):
            run(model)
    from transformers import MistralConfig, MistralForCausalLM

    from model_utils import _causal_config

    window = 4  # a decoding step with more keys than the sliding window
    mistral = MistralForCausalLM(_causal_config(MistralConfig, sliding_window=window)).eval()
    attn = mistral.model.layers[0].self_attn
    with dk.plugged(mistral, mixed_mask(mistral)):
        hidden = torch.randn(1, 1, mistral.config.hidden_size)
        position = mistral.model.rotary_emb(hidden, torch.tensor([[window + 3]]))
        with pytest.raises(dk.models.UnsupportedModelError, match="not from flash attention's"):
            mistral.model.layers[0].self_attn(hidden, position,
                                              torch.ones(1, window + 4, dtype=torch.long))
        # no mask, no padding: flash attention leaves the window to its kernel (sdpa and eager
        # give a mask when the keys run past it); the window was lost (0.30 off)
        mistral.config._attn_implementation = "flash_attention_2"
        long = torch.randint(3, 120, (1, window + 3))
        with pytest.raises(dk.models.UnsupportedModelError, match="not from flash attention's"):
            mistral(input_ids=long)
        mistral.config._attn_implementation = "sdpa"
        mistral(input_ids=long)  # sdpa's mask: served
        short = torch.randint(3, 120, (1, window - 1))
        want = mistral.generate(short, max_new_tokens=6, do_sample=False)
        mistral.config._attn_implementation = "flash_attention_2"
        mistral(input_ids=short)  # within the window, no mask is needed
        # decoding past the window: the sliding cache gives at most the window's keys (its
        # token count runs past it): served, as sdpa serves it
        assert torch.equal(mistral.generate(short, max_new_tokens=6, do_sample=False), want)
        mistral.config._attn_implementation = "sdpa"
    assert attn is mistral.model.layers[0].self_attn  # unpatched again
    bert = build("bert")
    mask = mixed_mask(bert)
    ids, attention = inputs("bert")
    with torch.no_grad():
        expected = output_of(masked_dense(bert, mask), ids, attention)
        bert.config._attn_implementation = "flash_attention_2"
        with dk.plugged(bert, mask):
            torch.testing.assert_close(output_of(bert, ids, attention), expected)
    from doe_kernels.ops.attention import _attention_mask

    with pytest.raises(ValueError, match="attention_mask is a object .*'sdpa' or 'eager'"):
        _attention_mask(object(), True, 2, 2, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_flex_attention_switched_on_after_patching_is_refused_by_name(name):
    """Flex attention chosen after patching hands the attention a BlockMask: a ValueError naming
    it (LLaMA's path read it as a tensor: AttributeError 'BlockMask' has no attribute 'dim');
    back on sdpa the model serves again."""
    model = build(name)
    mask = mixed_mask(model)
    ids, attention = inputs(name)
    with torch.no_grad(), dk.plugged(model, mask):
        expected = output_of(model, ids, attention)
        model.set_attn_implementation("flex_attention")
        with pytest.raises(ValueError, match="attention_mask is a BlockMask"):
            model(input_ids=ids, attention_mask=attention)
        model.set_attn_implementation("sdpa")
        assert torch.equal(output_of(model, ids, attention), expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_patching_under_inference_mode_leaves_a_trainable_model(name):
    """Patch, swap and unpatch under torch.inference_mode made the relaid-out weights and the
    cached plans inference tensors: the model (and any later model patched with the same mask)
    could no longer be trained."""
    model, mask = model_of(name), masked(model_of(name))
    with torch.inference_mode():
        with dk.plugged(model, mask):
            run(model, name)
        dk.patch(model, mask)
        dk.patch(model, dk.ExpertMask.random(model, 0.5, seed=3))
        dk.unpatch(model)
    assert not any(p.is_inference() for p in model.parameters())
    other = model_of(name)
    for trained in (model, other):
        with dk.plugged(trained, mask):
            assert not any(b.is_inference() for b in trained.buffers())
            ids, attention = inputs("bert" if name == "bert" else "llama")
            output_of(trained, ids, attention).float().sum().backward()


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_load_into_a_module_holding_patched_layers_is_refused_before_any_change(name):
    """load_state_dict copies module by module: into `model.model` (or `model.bert`) it copied
    the embeddings before reaching a patched layer's refusal."""
    model = build(name)
    dk.patch(model, mixed_mask(model))
    inner = model.bert if name == "bert" else model.model
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="unpatch"):
        inner.load_state_dict({k: torch.zeros_like(v) for k, v in inner.state_dict().items()})
    assert state_dict_equal(before, snapshot(model))
    dk.unpatch(model)
    inner.load_state_dict(inner.state_dict())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_output_attentions_is_refused_while_patched(name):
    """transformers records attentions with hooks on modules a patch replaces: a patched model
    returned an empty tuple."""
    model = build(name)
    model.set_attn_implementation("eager")
    ids, attention = inputs(name)
    with dk.plugged(model, mixed_mask(model)), torch.no_grad():
        with pytest.raises(ValueError, match="output_attentions=True on a model patched"):
            model(input_ids=ids, attention_mask=attention, output_attentions=True)
        model.config.output_attentions = True
        with pytest.raises(ValueError, match="output_attentions=True on a model patched"):
            model(input_ids=ids, attention_mask=attention)
        model(input_ids=ids, attention_mask=attention, output_attentions=False)
    model.config.output_attentions = False
    model(input_ids=ids, attention_mask=attention, output_attentions=True)  # unpatched: works


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_output_attentions_is_refused_through_the_base_model_too(name):
    """The refusal was a hook on the top model only: `model.bert(...)` / `model.model(...)`
    with output_attentions=True returned attentions=() silently. Every PreTrainedModel holding
    the layers refuses it now, and its hook goes at unpatch."""
    model = build(name)
    model.set_attn_implementation("eager")
    inner = model.bert if name == "bert" else model.model
    ids, attention = inputs(name)
    with dk.plugged(model, mixed_mask(model)), torch.no_grad():
        with pytest.raises(ValueError, match="output_attentions=True on a model patched"):
            inner(input_ids=ids, attention_mask=attention, output_attentions=True)
        inner(input_ids=ids, attention_mask=attention)
    assert not inner._forward_pre_hooks
    with torch.no_grad():
        assert len(inner(input_ids=ids, attention_mask=attention,
                         output_attentions=True).attentions) == 3


def forward_hooks(model) -> dict:
    """Each module's forward hooks, and transformers' mark of the models it hooked."""
    return {name: (list(module._forward_hooks.values()),
                   module.__dict__.get("_output_capturing_hooks_installed"))
            for name, module in model.named_modules()}


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_first_asked_for_while_patched_work_after_unpatch(name):
    """transformers installs its output-capturing hooks once, on the first forward asking for
    an output, on the modules then in the tree: asked first while patched (hidden states, router
    logits), the original attention (and router) modules never got theirs, and after unpatch
    output_attentions gave no attentions. Unpatch takes off the hooks installed while patched:
    the model has the hooks it had, and every output is a never-patched model's."""
    model = model_of(name)
    model.set_attn_implementation("eager")
    fresh = copy.deepcopy(model)
    ids, attention = inputs("bert" if name == "bert" else "llama")
    asked = dict(output_hidden_states=True, output_attentions=True)
    if name == "mixtral":
        asked["output_router_logits"] = True
    hooks = forward_hooks(model)
    with torch.no_grad():
        with dk.plugged(model, masked(model)):
            model(input_ids=ids, attention_mask=attention,
                  **{k: v for k, v in asked.items() if k != "output_attentions"})
        assert forward_hooks(model) == hooks
        got = model(input_ids=ids, attention_mask=attention, **asked)
        want = fresh(input_ids=ids, attention_mask=attention, **asked)
    for key in asked:
        key = key[len("output_"):]
        assert len(getattr(got, key)) == len(getattr(want, key)) > 0, key
        assert all(torch.equal(a, b) for a, b in zip(getattr(got, key), getattr(want, key)))


def test_a_copy_made_while_patched_keeps_the_capturing_hooks_asked_for_before():
    """Unpatch takes off only the capturing hooks added while patched (known by module name and
    key): a deep copy of a patched model, whose modules are others, keeps the ones installed
    before the patch, and captures each output once."""
    model = build("llama")
    model.set_attn_implementation("eager")
    ids, attention = inputs("llama")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        hooks = {name: len(m._forward_hooks) for name, m in model.named_modules()}
        dk.patch(model, mixed_mask(model))
        clone = copy.deepcopy(model)
        dk.unpatch(clone)
        assert {name: len(m._forward_hooks) for name, m in clone.named_modules()} == hooks
        out = clone(input_ids=ids, attention_mask=attention, output_hidden_states=True,
                    output_attentions=True)
    assert (len(out.hidden_states), len(out.attentions)) == (4, 3)
    dk.unpatch(model)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_unpatch_keeps_modes_set_per_module_and_the_weights_strides(name):
    """A dropout set to eval inside a model in train mode, and a weight held transposed (a
    checkpoint's layout), come back as they were (unpatch gave every child the parent's mode and
    made every converted weight contiguous)."""
    model = build(name)
    model.train()
    if name == "bert":
        quiet, weight = model.bert.encoder.layer[0].attention.self.dropout, \
            model.bert.encoder.layer[1].output.dense
    else:
        quiet, weight = model.model.layers[0].mlp.act_fn, model.model.layers[1].mlp.down_proj
    quiet.eval()
    weight.weight.data = weight.weight.data.t().contiguous().t()
    modes = {n: m.training for n, m in model.named_modules()}
    strides = {n: p.stride() for n, p in model.named_parameters()}
    before = snapshot(model)
    dk.patch(model, mixed_mask(model))
    dk.unpatch(model)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.stride() for n, p in model.named_parameters()} == strides
    assert state_dict_equal(before, snapshot(model))
    with dk.plugged(model, mixed_mask(model)):
        model.eval()  # a mode set while patched reaches every module, as model.eval() does
    assert not any(m.training for m in model.modules())


def test_unpatch_puts_a_weight_back_into_the_storage_it_viewed():
    """A weight that was a view into a larger buffer (every Parameter in one flat vector) came
    back with its own storage (no longer aliasing the buffer), and one with non-dense strides (a
    column slice) came back contiguous: both get their storage, offset and strides back, with
    the values they have at unpatch (a change made while patched included)."""
    model = build("llama")
    params = list(model.parameters())
    flat = torch.nn.utils.parameters_to_vector(params)
    torch.nn.utils.vector_to_parameters(flat, params)  # every Parameter a view of `flat`
    down = model.model.layers[1].mlp.down_proj.weight
    wide = torch.zeros(48, 160)
    wide[:, ::2] = down.detach()
    down.data = wide[:, ::2]  # (48, 80) with strides (160, 2)
    layouts = {name: (p.untyped_storage().data_ptr(), p.storage_offset(), p.stride())
               for name, p in model.named_parameters()}
    before, expected = snapshot(model), run(model)
    with dk.plugged(model, mixed_mask(model)):
        run(model)
    assert {name: (p.untyped_storage().data_ptr(), p.storage_offset(), p.stride())
            for name, p in model.named_parameters()} == layouts
    assert state_dict_equal(snapshot(model), before)
    assert torch.equal(run(model), expected)
    o_proj = model.model.layers[0].self_attn.o_proj.weight
    with dk.plugged(model, mixed_mask(model)), torch.no_grad():
        o_proj.add_(1.0)  # a change while patched goes back into the buffer
    assert torch.equal(flat, torch.nn.utils.parameters_to_vector(model.parameters()))
    with torch.no_grad():
        flat.zero_()
    assert all(bool((p == 0).all()) for p in model.parameters() if p is not down)


def test_a_weight_kept_in_its_storage_and_converted_while_patched_comes_back_converted():
    """A strided weight keeps its storage while patched; converted while patched (.double()), it
    comes back converted, not cast into its old float32 storage (the model was left in two
    dtypes, its forward failing)."""
    model = build("llama")
    down = model.model.layers[1].mlp.down_proj.weight
    wide = torch.zeros(48, 160)
    wide[:, ::2] = down.detach()
    down.data = wide[:, ::2]
    expected = run(model.double()).clone()
    model.float()
    with dk.plugged(model, dk.ExpertMask()):
        model.double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    torch.testing.assert_close(run(model), expected)


def test_a_conversion_to_the_meta_device_is_refused_by_name():
    model = build("llama")
    with dk.plugged(model, mixed_mask(model)):
        with pytest.raises(ValueError, match="runs on CPU or CUDA devices, not meta"):
            model.to("meta")
        run(model)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_model_made_under_inference_mode_is_patched_and_served_there(name):
    """Loading and serving a model inside torch.inference_mode: its weights are inference
    tensors, laid out and put back as such (a forward failed on the relaid-out weights)."""
    with torch.inference_mode():
        model = build(name)
        mask = mixed_mask(model)
        ids, attention = inputs(name)
        expected = output_of(masked_dense(model, mask), ids, attention)
        before = snapshot(model)
        with dk.plugged(model, mask):
            torch.testing.assert_close(output_of(model, ids, attention), expected)
        assert state_dict_equal(before, snapshot(model))
        assert all(p.is_inference() for p in model.parameters())


# ---- torch.compile ----------------------------------------------------------------------------
def test_a_torch_compile_wrapper_patches_and_unpatches_its_model(name="llama"):
    """patch, plugged, mixed and unpatch given a torch.compile wrapper act on the module it
    compiles: the wrapper computes the expert (recompiling for swaps, made through either), and
    unpatching either leaves both unpatched, with no hook left behind and the weights bitwise as
    they were."""
    model = build(name)
    before, modules_before = snapshot(model), modules_of(model)
    mask, other = mixed_mask(model), mixed_mask(model, ffn_keep=0.6, seed=1)
    with dk.plugged(model, other):
        want_other = run(model, name)
    with dk.plugged(model, mask):
        want = run(model, name)
    dense = run(model, name)
    assert (want - want_other).abs().max() > 1e-2  # (the two experts answer apart)

    def same(a, b):  # the compiled code runs a layer keeping everything on ATen's GEMM, which
        # eager calls may run on the cpu backend's kernels instead (runs_fused_dense)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    compiled = torch.compile(model, backend="eager")
    assert dk.patch(compiled, mask) is compiled
    assert dk.is_patched(model) and dk.is_patched(compiled)
    same(run(compiled, name), want)
    dk.patch(compiled, other)  # a swap: the compiled code follows it
    same(run(compiled, name), want_other)
    dk.patch(model, mask)
    same(run(compiled, name), want)
    dk.unpatch(compiled)
    assert not dk.is_patched(compiled) and "_apply" not in compiled.__dict__
    assert not model._forward_pre_hooks and not compiled._forward_pre_hooks
    assert_untouched(model, before, modules_before)
    assert torch.equal(run(compiled, name), dense)
    with dk.plugged(compiled, mask):
        same(run(compiled, name), want)
    with dk.mixed(compiled, [mask, None, mask]) as serving, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert serving is compiled
        got = run(compiled, name)
    assert not [str(w.message) for w in caught if "Dynamo" in str(w.message)]  # (a builtin)
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], dense[1], atol=1e-5, rtol=1e-4)
    assert_untouched(model, before, modules_before)

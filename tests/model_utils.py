"""Small models built from configs, and the masked-dense reference a patched model must equal."""
import copy
import warnings

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaModel,
)

import doe_kernels as dk


def bert(**overrides):
    config = BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=72, vocab_size=120, max_position_embeddings=64,
                        num_labels=3, **overrides)
    return BertForSequenceClassification(config)


def roberta():
    config = RobertaConfig(hidden_size=40, num_hidden_layers=3, num_attention_heads=5,
                           intermediate_size=70, vocab_size=120, max_position_embeddings=70,
                           hidden_act="gelu_new")
    return RobertaModel(config, add_pooling_layer=False)


def _causal_config(config_class, **extra):
    return config_class(hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                        num_key_value_heads=2, intermediate_size=80, vocab_size=120,
                        max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
                        **extra)


def llama():
    return LlamaForCausalLM(_causal_config(LlamaConfig))


def mistral():
    return MistralForCausalLM(_causal_config(MistralConfig, sliding_window=None))


def qwen2():
    return Qwen2ForCausalLM(_causal_config(Qwen2Config))


MODELS = {"bert": bert, "roberta": roberta, "llama": llama, "mistral": mistral, "qwen2": qwen2}
CAUSAL = ("llama", "mistral", "qwen2")


def build(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]().eval().to(dtype)
    return model


def mixed_mask(model, ffn_keep=0.35, heads_keep=0.5, seed=0):
    """A random mask: layer 0 keeps no neuron, layer 1 every neuron and head, layer 2 no head."""
    mask = dk.ExpertMask.random(model, ffn_keep=ffn_keep, heads_keep=heads_keep, seed=seed)
    ffn = dict(mask.ffn)
    heads = dict(mask.heads)
    spec = mask.spec
    ffn[0] = torch.empty(0, dtype=torch.int64)
    ffn[1] = torch.arange(spec["intermediate_size"])
    heads[1] = torch.arange(spec["num_heads"])
    heads[2] = torch.empty(0, dtype=torch.int64)
    return dk.ExpertMask(ffn, heads, spec)


def add_bias(linear, delta):
    """Add an expert's bias delta to a dense copy's linear layer (a bias Parameter if it has none)."""
    delta = delta.to(linear.weight.dtype)
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(delta)
    else:
        linear.bias += delta


def masked_dense(model, mask):
    """A copy of the dense model with the pruned neurons' and heads' weights zeroed, the kept
    units' columns of the down and attention output projections multiplied by the mask's scales,
    and its bias deltas added to those projections' biases."""
    dense = copy.deepcopy(model)
    _, layers, spec = dk.models.describe(dense)
    with torch.no_grad():
        for index, layer in enumerate(layers):
            pruned = torch.ones(spec.intermediate_size, dtype=torch.bool)
            pruned[mask.ffn.get(index, torch.arange(spec.intermediate_size))] = False
            head_pruned = torch.ones(spec.num_heads, dtype=torch.bool)
            head_pruned[mask.heads.get(index, torch.arange(spec.num_heads))] = False
            head_cols = head_pruned.repeat_interleave(spec.head_dim)
            if spec.family == "bert":
                layer.intermediate.dense.weight[pruned] = 0
                layer.intermediate.dense.bias[pruned] = 0
                down, o_proj = layer.output.dense, layer.attention.output.dense
            else:
                layer.mlp.gate_proj.weight[pruned] = 0
                layer.mlp.up_proj.weight[pruned] = 0
                down, o_proj = layer.mlp.down_proj, layer.self_attn.o_proj
            down.weight[:, pruned] = 0
            o_proj.weight[:, head_cols] = 0
            if index in mask.ffn_scales:
                kept = mask.ffn.get(index, torch.arange(spec.intermediate_size))
                down.weight[:, kept] *= mask.ffn_scales[index].to(down.weight.dtype)
            if index in mask.head_scales:
                kept = mask.heads.get(index, torch.arange(spec.num_heads))
                cols = (kept[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)
                scales = mask.head_scales[index].repeat_interleave(spec.head_dim)
                o_proj.weight[:, cols] *= scales.to(o_proj.weight.dtype)
            if index in mask.ffn_bias:
                add_bias(down, mask.ffn_bias[index])
            if index in mask.attn_bias:
                add_bias(o_proj, mask.attn_bias[index])
    return dense


def inputs(name, batch=3, seq=9, seed=1, device="cpu"):
    """Token ids and a padded attention mask (left padding for causal models, right for BERT)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (batch, seq), generator=gen)
    attention = torch.ones(batch, seq, dtype=torch.long)
    if name in CAUSAL:
        attention[1, :4] = 0
    else:
        attention[1, -4:] = 0
    return ids.to(device), attention.to(device)


def output_of(model, ids, attention):
    """What the tests compare of a forward pass, 0 at padding positions: a causal LM's logits, an
    encoder's last hidden state; a classifier's logits with its encoder's last hidden state
    beside them, a row each (the tiny classifiers' logits, about 0.03, are smaller than
    bfloat16's error floor in reference.assert_close, and would hide a pruning not done)."""
    states = []
    hook = model.base_model.register_forward_hook(lambda module, args, out: states.append(out[0]))
    try:
        out = model(input_ids=ids, attention_mask=attention)
    finally:
        hook.remove()
    tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    if tensor.dim() == 3:
        return tensor * attention[..., None]
    return torch.cat([tensor, (states[-1] * attention[..., None]).flatten(1)], dim=1)


def state_dict_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def convert_while_patched(model, mask, plain, buffer, count, name):
    """Patch `model` (float32) with `mask`, convert it to bfloat16 while patched: the `count`
    expert buffers named `buffer` follow the model's dtype, a swap to `plain` and back gives the
    same output, and the output matches the masked-dense reference."""
    from reference import assert_close

    ids, attention = inputs(name)
    with torch.no_grad():
        dk.patch(model, mask)
        model.to(torch.bfloat16)
        held = [getattr(m, buffer) for m in model.modules()
                if getattr(m, buffer, None) is not None]
        assert len(held) == count and all(t.dtype == torch.bfloat16 for t in held)
        out = output_of(model, ids, attention)
        dk.patch(model, plain)
        dk.patch(model, mask)  # a swap after the conversion casts to the model's dtype
        assert torch.equal(output_of(model, ids, attention), out)
        dk.unpatch(model)
        reference = output_of(masked_dense(model.double(), mask), ids, attention)
        dense_same_dtype = output_of(masked_dense(model.to(torch.bfloat16), mask), ids, attention)
    assert_close(out, reference, dense_same_dtype, f"{name} converted to bfloat16 while patched")


def gpu_syncs(run) -> list:
    """The messages of torch's sync debug mode (each host wait for the GPU) during `run()`,
    after a first `run()` (which may plan and cache)."""
    run()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]

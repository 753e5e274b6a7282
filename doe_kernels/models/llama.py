"""LLaMA-family adapter (LLaMA, Mistral, Qwen2 and the models that share their decoder layer).

A layer is recognised by `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`. Patching
replaces `self_attn` (kept heads' Q/K/V, rotary embeddings, the KV cache holding only the KV heads
in use, attention with the model's attention dropout in training mode, and the kept heads' columns
of o_proj) and `mlp` (SwiGLU on the kept neurons, down projection input-major). A layer that keeps
no head stores one zero KV head per token in the cache, so that the cache's length is right in
every layer (transformers reads it from layer 0 to place positions and padding masks). A patched
model's KV cache is only valid for the expert that filled it: swap experts between requests, not
inside one generation. A mixed-task batch (doe_kernels.mixed) runs each segment of sequences on its
expert's heads and neurons, its KV cache holding every KV head (valid for that batch composition
only).
"""
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from doe_kernels.models.base import LayerPatch, UnsupportedModelError, has_modules
from doe_kernels.models.modules import GatherSwiGLUMLP, PrunedAttention, add_bias_delta
from doe_kernels.models.segments import attention_forward, packed_rows, rows_of
from doe_kernels.ops import attend, project_out
from doe_kernels.ops.attention import keys_of_pass, no_heads_output
from doe_kernels.ops.linear import input_major_view

FAMILY = "llama"
DESCRIPTION = "LLaMA family (LlamaForCausalLM, LlamaModel, Mistral, Qwen2)"
# config.model_type of the models whose layers compute as LlamaDecoderLayer does (others share
# its modules but not its computation: Cohere's interleaved rotary, OLMo's clip_qkv, ...)
MODEL_TYPES = ("llama", "mistral", "qwen2")
ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj")
# the projections a patch reads as plain nn.Linear (a LoRA wrapper's adapters would be lost)
LINEARS = ATTENTION_LINEARS + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# the FFN's projections in a layer: those whose output rows are its neurons, and the down one
FFN_INPUTS = ("mlp.gate_proj", "mlp.up_proj")
FFN_DOWN = "mlp.down_proj"

_FLASH_MASKS = ("a patched model computes attention from the masks of attn_implementation 'sdpa' "
                "or 'eager', not from flash attention's (a 2-D padding mask, or none): call "
                "model.set_attn_implementation('sdpa')")


def is_layer(module) -> bool:
    return has_modules(module, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                       "self_attn.o_proj", *FFN_INPUTS, FFN_DOWN)


def attention_sizes(layer, config) -> dict:
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(layer.self_attn, "head_dim", None) or config.hidden_size // num_heads
    return dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)


def layer_sizes(layer, config) -> dict:
    return dict(hidden_size=layer.mlp.gate_proj.in_features,
                intermediate_size=layer.mlp.gate_proj.out_features,
                **attention_sizes(layer, config))


def check_swiglu(config, what: str) -> None:
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported for {what} "
                                    "(only 'silu', i.e. SwiGLU)")


def check_supported(layer, config) -> None:
    check_swiglu(config, "the LLaMA family")
    mlp = layer.mlp
    if any(p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        raise UnsupportedModelError("MLP biases (mlp_bias=True) are not supported")
    check_attention(layer, layer_sizes(layer, config))


def check_attention(layer, sizes: dict) -> None:
    if layer.self_attn.q_proj.out_features != sizes["num_heads"] * sizes["head_dim"]:
        raise UnsupportedModelError("q_proj's size does not match num_attention_heads * head_dim")
    for name in ("q_norm", "k_norm"):
        if hasattr(layer.self_attn, name):
            raise UnsupportedModelError(f"attention with {name} (Qwen3-style) is not supported yet")


class PrunedLlamaAttention(PrunedAttention):
    """LlamaAttention on the kept heads; returns (output, None) as the original does."""

    def __init__(self, original, sizes, backend):
        super().__init__(original.q_proj, original.k_proj, original.v_proj, sizes["num_heads"],
                         sizes["num_kv_heads"], sizes["head_dim"], original.scaling, backend,
                         getattr(original, "attention_dropout", 0.0),
                         getattr(original, "config", None))
        self.layer_idx = original.layer_idx
        self.is_causal = getattr(original, "is_causal", True)  # (a call's is_causal overrides)
        # the past positions a query sees, where the layer limits them: Qwen2's per layer,
        # Mistral's in its config (the model's attention mask holds the same limit)
        self.sliding_window = (original.sliding_window if hasattr(original, "sliding_window")
                               else getattr(getattr(original, "config", None), "sliding_window",
                                            None))
        # o_proj's weight, laid out input-major while patched (LayerPatch.lay_out_input_major)
        self.o_weight, self.o_bias = original.o_proj.weight, original.o_proj.bias
        self.register_buffer("bias_delta", None, persistent=False)  # the expert's, after o_proj
        self.register_buffer("scales", None, persistent=False)  # the expert's, of o_proj's inputs

    @property
    def o_weight_t(self) -> torch.Tensor:
        return input_major_view(self.o_weight)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        self.check_mask(hidden_states, attention_mask)
        # transformers' attention functions take `is_causal` from the call (bidirectional uses
        # of a decoder pass False), else the module's, True
        causal = kwargs.get("is_causal")
        causal = self.is_causal if causal is None else bool(causal)
        if self.segments is not None:
            return self.forward_mixed(hidden_states, position_embeddings, attention_mask,
                                      cache, causal), None
        selection = self.selection
        if selection.num_kept == 0:
            if cache is not None:
                placeholder = self.placeholder_kv(hidden_states)
                self.cache_update(cache, placeholder, placeholder)
            out = no_heads_output(hidden_states, self.qkv_weights(), self.o_weight_t, self.o_bias,
                                  selection, self.backend)
            return add_bias_delta(out, self.bias_delta), None
        q, k, v = self.project(hidden_states)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = self.cache_update(cache, k, v)
        is_causal = causal and attention_mask is None and q.shape[2] > 1
        k, v = keys_of_pass(k, v, q.shape[2], is_causal)
        self.check_window(attention_mask, k.shape[2])
        out = attend(q, k, v, selection, attention_mask, is_causal=is_causal, scale=self.scaling,
                     dropout=self.dropout_p(), eager=self.eager())
        out = project_out(out, self.o_weight_t, self.o_bias, selection, self.backend,
                          scales=self.scales)
        return add_bias_delta(out, self.bias_delta), None

    def check_mask(self, hidden_states, attention_mask) -> None:
        """Refuse flash attention's 2-D padding mask (flash attention switched on after
        patching), which leaves causality and any sliding window to its kernel, which a patched
        model does not call (a decoding step's one query needs no causal mask, but a window
        shorter than its keys is lost); `check_window` sees the other case."""
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            window_lost = (self.sliding_window is not None
                           and attention_mask.shape[-1] > self.sliding_window)
            if hidden_states.shape[1] > 1 or window_lost:
                raise UnsupportedModelError(_FLASH_MASKS)

    def check_window(self, attention_mask, keys: int) -> None:
        """Refuse a pass without a mask whose `keys` (as the cache gives them) run past the
        sliding window: flash attention's (sdpa and eager give a mask there)."""
        if attention_mask is None and self.sliding_window is not None and (
                keys > self.sliding_window):
            raise UnsupportedModelError(_FLASH_MASKS)

    def forward_mixed(self, hidden_states, position_embeddings, attention_mask, cache,
                      causal: bool = True):
        """A mixed batch: each segment on its expert's heads; the cache holds every KV head."""
        cos, sin = position_embeddings

        def rotary(q, k, start, stop, index=None):
            c, s = rows_of(cos, start, stop), rows_of(sin, start, stop)
            if index is not None:  # the packed real tokens of sequences [start, stop)
                c, s = packed_rows(c, stop - start, index), packed_rows(s, stop - start, index)
            return apply_rotary_pos_emb(q, k, c, s)

        update = None if cache is None else (lambda k, v: cache.update(k, v, self.layer_idx))
        return attention_forward(self.segments, hidden_states, self.qkv_weights(),
                                 self.o_weight_t, self.o_bias, attention_mask, self.scaling,
                                 self.dropout_p(), self.backend, rotary, update, is_causal=causal,
                                 sliding_window=self.sliding_window, eager=self.eager())

    def cache_update(self, cache, keys, values):
        """`cache.update` with this layer's keys and values (its kept KV heads, or a layer keeping
        no head's placeholder); a cache layer laid out for every KV head before this pass (a
        static cache initialised early: generate's chunked prefill, export recipes) gets them in
        their heads' places, zeros elsewhere, and gives back the kept heads."""
        layers = getattr(cache, "layers", None)
        layer = layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) \
            else None
        held = getattr(layer, "keys", None) if getattr(layer, "is_initialized", False) else None
        full = self.num_kv_heads
        if not isinstance(held, torch.Tensor) or held.dim() != 4 or held.shape[1] != full \
                or keys.shape[1] == full:
            return cache.update(keys, values, self.layer_idx)
        heads = self.selection.kept_kv_heads
        shape = (keys.shape[0], full, *keys.shape[2:])
        keys_all, values_all = keys.new_zeros(shape), values.new_zeros(shape)
        if self.selection.num_kept:
            keys_all[:, heads], values_all[:, heads] = keys, values
        keys_all, values_all = cache.update(keys_all, values_all, self.layer_idx)
        return keys_all[:, heads], values_all[:, heads]

    def placeholder_kv(self, hidden_states):
        """What a layer keeping no head stores in the KV cache: one zero KV head per position,
        (batch, 1, seq, head_dim), so that the cache counts this layer's tokens as transformers
        expects (its sequence length, read from layer 0, places positions and masks)."""
        batch, seq, _ = hidden_states.shape
        return hidden_states.new_zeros(batch, 1, seq, self.head_dim)


def patch_attention(patch: LayerPatch, layer, sizes: dict, backend: str) -> None:
    """Replace `layer.self_attn` by PrunedLlamaAttention (o_proj held input-major)."""
    original = layer.self_attn
    attention = patch.lay_out_input_major(
        original.o_proj.weight, lambda _: PrunedLlamaAttention(original, sizes, backend))
    patch.replace("self_attn", attention)
    patch.head_modules.append(attention)
    patch.attn_out.append(attention)


def patch_layer(patch: LayerPatch, config, backend: str) -> None:
    """Patch `patch.layer`, recording every change in `patch` as it is made."""
    layer = patch.layer
    patch_attention(patch, layer, layer_sizes(layer, config), backend)
    mlp = layer.mlp
    gathered = patch.lay_out_input_major(
        mlp.down_proj.weight,
        lambda w_down: GatherSwiGLUMLP(mlp.gate_proj.weight, mlp.up_proj.weight, w_down, backend))
    patch.replace("mlp", gathered)
    patch.ffn_modules.append(gathered)
    patch.ffn_out.append(gathered)
    patch.mixed_run += [patch.head_modules[-1], gathered]

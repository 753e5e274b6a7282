"""BERT-family adapter (BERT, RoBERTa and the models that share BertLayer's structure).

A layer is recognised by `attention.self.{query,key,value}`, `attention.output.dense`,
`intermediate.dense` and `output.dense`. Patching replaces `attention.self` (kept heads' Q/K/V and
attention, with the attention-probability dropout in training mode), `attention.output.dense`
(kept heads' columns), `intermediate` (kept neurons' rows with the activation) and `output.dense`
(kept neurons' columns, input-major); the residual, dropout and LayerNorm modules stay as they are.
In a mixed-task batch the attention runs through its output projection and `output.dense` runs the
whole FFN, each per segment; `attention.output.dense` and `intermediate` pass their input through.
"""
from doe_kernels.activations import HF_ACTIVATIONS
from doe_kernels.models.base import LayerPatch, UnsupportedModelError, has_modules
from doe_kernels.models.modules import (
    KeptColsLinear,
    KeptRowsLinear,
    PrunedAttention,
)
from doe_kernels.models.segments import attention_forward
from doe_kernels.ops import attend

FAMILY = "bert"
DESCRIPTION = ("BERT family (BertModel and its task heads, RoBERTa, XLM-RoBERTa, CamemBERT, "
               "ELECTRA)")
# config.model_type of the models whose layers compute as BertLayer does (others share its
# modules but not its computation: RoFormer's rotary positions, YOSO's attention, ...)
MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
# the projections a patch reads as plain nn.Linear (a LoRA wrapper's adapters would be lost)
LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense")


# the FFN's projections in a layer: those whose output rows are its neurons, and the down one
FFN_INPUTS = ("intermediate.dense",)
FFN_DOWN = "output.dense"


def is_layer(module) -> bool:
    return has_modules(module, "attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", *FFN_INPUTS, FFN_DOWN)


def layer_sizes(layer, config) -> dict:
    attention = layer.attention.self
    num_heads = attention.num_attention_heads
    return dict(hidden_size=layer.intermediate.dense.in_features,
                intermediate_size=layer.intermediate.dense.out_features,
                num_heads=num_heads, num_kv_heads=num_heads,
                head_dim=attention.attention_head_size)


def check_supported(layer, config) -> None:
    if getattr(layer, "add_cross_attention", False) or hasattr(layer, "crossattention"):
        raise UnsupportedModelError("BERT layers with cross-attention (encoder-decoder use) are not "
                                    "supported; patch an encoder")
    if getattr(config, "is_decoder", False):
        raise UnsupportedModelError("BERT configured as a decoder (is_decoder=True) is not supported")
    act = getattr(config, "hidden_act", None)
    if act not in HF_ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; supported: "
                                    f"{sorted(HF_ACTIVATIONS)}")
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise UnsupportedModelError(f"position_embedding_type {position!r} is not supported "
                                    "(only 'absolute')")


class PrunedBertSelfAttention(PrunedAttention):
    """BertSelfAttention on the kept heads; returns (batch, seq, kept * head_dim), None."""

    EAGER_SOFTMAX = "input"  # BERT's eager attention: softmax in the scores' dtype

    def run_output_projection(self, output) -> None:
        """Serve mixed batches through the output projection `output` (a KeptColsLinear, passed
        through then): each segment's heads and reconstruction differ."""
        self.__dict__["output"] = output  # not a submodule: the layer already holds it

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if self.segments is not None:
            output = self.__dict__["output"]
            return attention_forward(self.segments, hidden_states, self.qkv_weights(),
                                     output.weight_t, output.bias, attention_mask, self.scaling,
                                     self.dropout_p(), self.backend, eager=self.eager()), None
        if self.selection.num_kept == 0:
            return self.no_heads(hidden_states), None
        q, k, v = self.project(hidden_states)
        return attend(q, k, v, self.selection, attention_mask, scale=self.scaling,
                      dropout=self.dropout_p(), eager=self.eager()), None


def patch_layer(patch: LayerPatch, config, backend: str) -> None:
    """Patch `patch.layer`, recording every change in `patch` as it is made."""
    layer = patch.layer
    sizes = layer_sizes(layer, config)
    self_attention = layer.attention.self
    attention = PrunedBertSelfAttention(
        self_attention.query, self_attention.key, self_attention.value, sizes["num_heads"],
        sizes["num_kv_heads"], sizes["head_dim"], sizes["head_dim"] ** -0.5, backend,
        getattr(getattr(self_attention, "dropout", None), "p", 0.0),
        getattr(self_attention, "config", config))
    patch.replace("attention.self", attention)
    patch.head_modules.append(attention)

    o_proj = layer.attention.output.dense
    o_cols = patch.lay_out_input_major(o_proj.weight,
                                       lambda weight: KeptColsLinear(weight, o_proj.bias, backend))
    patch.replace("attention.output.dense", o_cols)
    patch.head_cols.append(o_cols)
    patch.attn_out.append(o_cols)
    attention.run_output_projection(o_cols)

    up = layer.intermediate.dense
    rows = KeptRowsLinear(up.weight, up.bias, HF_ACTIVATIONS[config.hidden_act], backend)
    patch.replace("intermediate", rows)
    down = layer.output.dense
    cols = patch.lay_out_input_major(down.weight,
                                     lambda weight: KeptColsLinear(weight, down.bias, backend))
    patch.replace("output.dense", cols)
    patch.ffn_modules += [rows, cols]
    patch.ffn_out.append(cols)
    cols.run_up_projection_of(rows)
    patch.mixed_run += [attention, cols]
    patch.mixed_pass += [o_cols, rows]

"""Pruned-head attention: Q, K, V and the output projection computed for the kept heads only.

`HeadSelection` turns a list of kept query heads into the index lists the projections gather
(built once per expert, so a swap only replaces these small tensors). Grouped-query attention
takes any subset of query heads: a KV head is computed only if one of its query heads is kept,
and each kept query head reads its KV head by slot, so groups need not stay even.

`pruned_head_attention` runs the whole layer; `project_qkv`, `attend` and `project_out` are its
three steps, for callers (the model adapters) that apply rotary embeddings or a KV cache between
them. Attention itself runs through torch's scaled_dot_product_attention (with its dropout on
the attention probabilities when a model in training mode asks for it), which reads each KV head
for its group of query heads in place (enable_gqa) where it can: `_sdpa_groups`; for a model
whose attn_implementation is "eager", through transformers' eager arithmetic (`eager_attention`).
"""
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from doe_kernels.backends import check_backend_name
from doe_kernels.ops import library
from doe_kernels.ops.checks import (
    check_bias,
    check_features,
    check_float_tensor,
    check_index,
    check_same_dtype_device,
)
from doe_kernels.ops.linear import dense_cols_linear

RotaryHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Projection rows (or o_proj columns) of the given heads: head * head_dim + 0..head_dim-1."""
    offsets = torch.arange(head_dim, device=heads.device, dtype=torch.int64)
    return (heads[:, None] * head_dim + offsets).reshape(-1)


@dataclass(frozen=True)
class HeadSelection:
    """The kept query heads of one attention layer and the index lists they imply."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    kept_heads: torch.Tensor  # (kept,) query heads
    kept_kv_heads: torch.Tensor  # KV heads used by at least one kept query head
    kv_slot: torch.Tensor  # (kept,) position in kept_kv_heads of each kept query head's KV head
    q_rows: torch.Tensor  # rows of q_proj, and columns of o_proj
    kv_rows: torch.Tensor  # rows of k_proj and v_proj
    # SDPA's grouped-query layout (enable_gqa: query head i reads KV head i // kv_group): the most
    # kept query heads one kept KV head serves (0 when none is kept); where groups are uneven,
    # gqa_pad lists the kept query heads in that layout, each KV head's group padded to kv_group
    # by repeating its last head, and gqa_unpad the place of each kept head in it (else None)
    kv_group: int = 0
    gqa_pad: torch.Tensor | None = None
    gqa_unpad: torch.Tensor | None = None

    @classmethod
    def build(cls, kept_heads, num_heads: int, num_kv_heads: int, head_dim: int,
              device=None) -> "HeadSelection":
        num_heads, num_kv_heads, head_dim = (_size(name, value) for name, value in (
            ("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if not isinstance(kept_heads, torch.Tensor):
            kept_heads = torch.as_tensor(kept_heads)  # a float list is refused by check_index
            if kept_heads.numel() == 0:
                kept_heads = kept_heads.to(torch.int64)
        device = kept_heads.device if device is None else torch.device(device)
        kept = check_index("kept_heads", kept_heads.cpu(), num_heads, torch.device("cpu"))
        kv_of_kept = kept // (num_heads // num_kv_heads)
        kept_kv, kv_slot = torch.unique(kv_of_kept, sorted=True, return_inverse=True)
        return cls(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            kept_heads=kept.to(device),
            kept_kv_heads=kept_kv.to(device),
            kv_slot=kv_slot.to(device),
            q_rows=_head_rows(kept, head_dim).to(device),
            kv_rows=_head_rows(kept_kv, head_dim).to(device),
            **_gqa_layout(kv_slot, kept_kv.numel(), device),
        )

    @property
    def num_kept(self) -> int:
        return self.kept_heads.numel()

    @property
    def is_full(self) -> bool:
        return self.num_kept == self.num_heads

    def apply(self, fn) -> "HeadSelection":
        """A copy with `fn` applied to every tensor (as nn.Module._apply does: moves devices)."""
        tensors = {name: None if getattr(self, name) is None else fn(getattr(self, name))
                   for name in ("kept_heads", "kept_kv_heads", "kv_slot", "q_rows", "kv_rows",
                                "gqa_pad", "gqa_unpad")}
        return HeadSelection(self.num_heads, self.num_kv_heads, self.head_dim, **tensors,
                             kv_group=self.kv_group)


def _size(name: str, value) -> int:
    """A head count or size as an int: a Python or numpy integer (not a bool, nor a float)."""
    try:
        if not isinstance(value, bool):
            return operator.index(value)
    except TypeError:
        pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _gqa_layout(kv_slot: torch.Tensor, kept_kv: int, device) -> dict:
    """HeadSelection's kv_group, gqa_pad and gqa_unpad from kv_slot (non-decreasing: kept heads
    are sorted)."""
    if kept_kv == 0:
        return {}
    counts = torch.bincount(kv_slot, minlength=kept_kv)
    group = int(counts.max())
    if bool((counts == group).all()):
        return {"kv_group": group}
    starts = torch.cumsum(counts, 0) - counts
    # place r of KV head s's group holds its kept head min(r, count - 1)
    place = torch.arange(group).clamp(max=counts[:, None] - 1)
    pad = (starts[:, None] + place).reshape(-1)
    unpad = kv_slot * group + (torch.arange(kv_slot.numel()) - starts[kv_slot])
    return {"kv_group": group, "gqa_pad": pad.to(device), "gqa_unpad": unpad.to(device)}


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    batch, seq, width = x.shape
    return x.view(batch, seq, width // head_dim, head_dim).transpose(1, 2)  # also with no rows


def project_qkv(hidden, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                selection: HeadSelection, backend: str = "auto"):
    """Q (batch, kept, seq, d) and K, V (batch, kept_kv, seq, d) for the kept heads only."""
    check_float_tensor("hidden", hidden, dims=3)
    d = selection.head_dim
    if selection.is_full and not library.dense_in_kernel(hidden, backend, q_weight, k_weight,
                                                         v_weight):  # the dense projections
        q, k, v = (F.linear(hidden, w, b) for w, b in
                   ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias)))
        return _split_heads(q, d), _split_heads(k, d), _split_heads(v, d)
    # the selection's rows were checked when it was made: straight to the ops
    q = library.gather_rows_linear(hidden, q_weight, q_bias, selection.q_rows, "identity", backend)
    k = library.gather_rows_linear(hidden, k_weight, k_bias, selection.kv_rows, "identity", backend)
    v = library.gather_rows_linear(hidden, v_weight, v_bias, selection.kv_rows, "identity", backend)
    return _split_heads(q, d), _split_heads(k, d), _split_heads(v, d)


def _attention_mask(attention_mask, is_causal: bool, q_len: int, kv_len: int, dtype, device):
    """(mask, empty): the mask SDPA takes, broadcastable to (batch, heads, q_len, kv_len), boolean
    (True = attend) or, from a float 4-D mask, additive in `dtype` (its finite values kept: a
    -1e4 mask or a soft bias is added, as transformers adds it; -inf read as the dtype's lowest
    value); and, for a boolean mask, the query rows (batch, 1, q_len, 1), or per head for a
    per-head mask, that see no key (a padded position), whose mask is opened (SDPA would give
    NaN) and whose output `attend` sets to 0, as transformers' sdpa attention gives there. Under
    an additive mask such a row averages every value, as transformers' eager attention does
    (empty is None); None without a mask."""
    _check_mask_type(attention_mask)
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # (batch, kv_len) padding mask, 1 = token, 0 = padding
            if attention_mask.shape[-1] != kv_len:
                raise ValueError(f"attention_mask has {attention_mask.shape[-1]} positions but the "
                                 f"keys have {kv_len}")
            mask = attention_mask[:, None, None, :].to(torch.bool)
        elif attention_mask.dim() == 4:
            if not attention_mask.is_floating_point():  # boolean or 0/1 integers: 1 = attend
                mask = attention_mask.to(torch.bool)
            else:  # additive: 0 where attended, negative where masked
                mask = attention_mask.to(dtype).clamp_min(torch.finfo(dtype).min)
        else:
            _check_mask_dims(attention_mask)
    if is_causal:
        # Queries are the last q_len positions of the kv_len keys (as with a KV cache).
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        if mask is None:
            return causal, None  # (every query sees a key)
        mask = mask & causal if mask.dtype == torch.bool else \
            torch.where(causal, mask, torch.finfo(mask.dtype).min)
    if mask is None or mask.dtype != torch.bool:
        return mask, None
    empty = (~mask).all(dim=-1, keepdim=True)
    return mask.masked_fill(empty, True), empty


def _check_mask_type(attention_mask) -> None:
    """None or a tensor: another mask (flex attention's BlockMask) is refused by name."""
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask is a {type(attention_mask).__name__} (flex attention's?);"
                         " a patched model computes attention from the tensor masks of "
                         "attn_implementation 'sdpa' or 'eager': call "
                         "model.set_attn_implementation('sdpa')")


def _check_mask_dims(attention_mask: torch.Tensor) -> None:
    """A padding mask (batch, kv_len) or a full one (batch, 1 or heads, q_len, kv_len)."""
    if attention_mask.dim() not in (2, 4):
        raise ValueError("attention_mask must be 2-D (batch, kv_len) or 4-D (batch, 1, q_len, "
                         f"kv_len), got shape {tuple(attention_mask.shape)}")


def _check_mask_heads(attention_mask: torch.Tensor, num_heads: int) -> None:
    """A 4-D mask's dimension 1: one plane for every head, or one per head."""
    if attention_mask.shape[1] not in (1, num_heads):
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} heads in dimension 1, but "
                         f"the attention has {num_heads} (a 4-D mask is (batch, 1 or heads, "
                         "q_len, kv_len))")


def _check_mask_shape(attention_mask, hidden: torch.Tensor, num_heads: int) -> None:
    """The public op's mask against hidden (batch, seq, width), whose seq tokens are both the
    queries and the keys (no cache): each size equal to hidden's or 1 (broadcast), except a 2-D
    mask's keys (one per token); on hidden's device. Reads only metadata."""
    if attention_mask is None:
        return
    _check_mask_type(attention_mask)
    _check_mask_dims(attention_mask)
    if attention_mask.device != hidden.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but hidden is on "
                         f"{hidden.device}")
    batch, tokens = hidden.shape[0], hidden.shape[1]
    if attention_mask.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask has {attention_mask.shape[0]} sequences but hidden has "
                         f"{batch}")
    keys = attention_mask.shape[-1]
    if attention_mask.dim() == 2:
        if keys != tokens:
            raise ValueError(f"attention_mask has {keys} positions but the keys have {tokens}")
        return
    _check_mask_heads(attention_mask, num_heads)
    if attention_mask.shape[2] not in (1, tokens):
        raise ValueError(f"attention_mask's query length {attention_mask.shape[2]} does not match "
                         f"the {tokens} tokens of hidden")
    if keys not in (1, tokens):
        raise ValueError(f"attention_mask's key length {keys} does not match the {tokens} tokens "
                         "of hidden (the keys of this call)")


def _check_padding_values(attention_mask: torch.Tensor) -> None:
    """A float 2-D mask holds 1 (token) and 0 (padding), as transformers reads one: other values
    (an additive 0 / -inf mask, whose 0s would read as padding) are refused by name. Checked by
    the public op only (a patched model's masks come from transformers, and the check reads the
    values: a device sync per layer), and not while torch.compile traces."""
    if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
            or not attention_mask.is_floating_point() or torch.compiler.is_compiling()):
        return
    if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask is 2-D, a padding mask (1 = token, 0 = padding), but "
                         "holds values other than 0 and 1 (an additive mask?): give an additive "
                         "mask 4-D, (batch, 1, q_len, kv_len)")


def keys_of_pass(k, v, q_len: int, is_causal: bool):
    """(k, v) of a causal pass without a mask: transformers gives no mask to a first pass into a
    fixed-size (static) cache, whose keys run past the pass's tokens; as its SDPA's is_causal
    (top-left), query i sees keys 0..i, so the keys are cut to the pass's."""
    if is_causal and k.shape[2] > q_len:
        return k[:, :, :q_len], v[:, :, :q_len]
    return k, v


def attend(q, k, v, selection: HeadSelection, attention_mask=None, is_causal=False, scale=None,
           dropout: float = 0.0, eager: str | None = None):
    """SDPA of the kept query heads over their KV heads; returns (batch, seq, kept * head_dim).

    `dropout`: the probability of zeroing an attention probability (SDPA's dropout_p), for a model
    in training mode; 0 in eval mode. `eager`: None runs torch's SDPA; "float32" or "input" the
    arithmetic of transformers' eager attention instead (`eager_attention`), for a model whose
    attn_implementation is "eager": the softmax computed in float32 (the LLaMA family's) or in
    the scores' dtype (BERT's). `is_causal` holds there too without a mask (transformers' eager
    function ignores it, but its models always give eager attention a mask).
    """
    _check_mask_type(attention_mask)  # (flex attention switched on after patching)
    attention_mask = _kept_heads_of_mask(attention_mask, selection)
    unmasked = attention_mask is None and (not is_causal or q.shape[2] == k.shape[2])
    grouped = selection.kept_kv_heads.numel() != selection.num_kept  # some KV heads serve several
    padded = grouped and selection.gqa_pad is not None
    if grouped and (eager or not _sdpa_groups(selection, q, attention_mask, unmasked)):
        k = k.index_select(1, selection.kv_slot)
        v = v.index_select(1, selection.kv_slot)
        grouped = padded = False
    if padded:
        q = q.index_select(1, selection.gqa_pad)
    if eager:  # an additive mask added in its own dtype, as transformers adds it
        float_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 \
            and attention_mask.is_floating_point()
        mask, empty = _attention_mask(attention_mask, is_causal, q.shape[2], k.shape[2],
                                      attention_mask.dtype if float_mask else q.dtype, q.device)
        out = eager_attention(q, k, v, mask, scale, dropout, eager)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
    elif unmasked:
        # No mask tensor: lets SDPA pick its fused (flash / memory-efficient) kernels.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal,
                                             scale=scale, enable_gqa=grouped)
    else:
        mask, empty = _attention_mask(attention_mask, is_causal, q.shape[2], k.shape[2],
                                      q.dtype, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             scale=scale, enable_gqa=grouped)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
    if padded:
        out = out.index_select(1, selection.gqa_unpad)
    batch, heads, seq, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)  # also with no rows


EAGER_SOFTMAXES = ("float32", "input")  # attend's `eager`: where the eager softmax computes


def eager_attention(q, k, v, mask, scale, dropout: float, softmax: str):
    """transformers' eager attention (its `eager_attention_forward`) over (batch, heads, seq,
    head_dim) q, k, v with one KV head per query head: scores by matmul, scaled, `mask` added (an
    additive one, in its dtype: a float32 mask under autocast makes the scores float32, as
    there; a boolean one fills the masked scores with the dtype's lowest value), softmax in
    float32 cast back to q's dtype (`softmax` "float32") or in the scores' dtype ("input"),
    dropout, the weighted values (outside autocast, the weights cast to v's dtype first)."""
    if softmax not in EAGER_SOFTMAXES:
        raise ValueError(f"eager must be None or one of {EAGER_SOFTMAXES}, got {softmax!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    if softmax == "float32":
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        weights = F.softmax(scores, dim=-1)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    if weights.dtype != v.dtype and not torch.is_autocast_enabled(v.device.type):
        weights = weights.to(v.dtype)  # (a mask of another dtype than the model's)
    return torch.matmul(weights, v)


def _kept_heads_of_mask(attention_mask, selection: HeadSelection):
    """A per-head 4-D mask (batch, heads, q_len, kv_len) cut to the kept heads' planes (the
    queries hold only those); other masks as they are."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4 or \
            attention_mask.shape[1] == 1:
        return attention_mask
    _check_mask_heads(attention_mask, selection.num_heads)
    if selection.is_full:
        return attention_mask
    return attention_mask.index_select(1, selection.kept_heads.to(attention_mask.device))


# Padded groups (uneven ones): SDPA computes the padding heads too, so they are used only while
# their extra query rows cost less than copying K and V (a query row per padding head per token,
# against PAD_ROWS per kept head).
PAD_ROWS = 16


def _sdpa_groups(selection: HeadSelection, q: torch.Tensor, attention_mask,
                 unmasked: bool) -> bool:
    """Whether SDPA reads each kept query head's KV head itself (enable_gqa) instead of a copy of
    K and V with one KV head per query head. Where: on the CPU always (its flash kernel takes the
    groups with or without a mask), elsewhere only unmasked and with heads of at most 256
    features (transformers' rule: a masked GQA call falls back to SDPA's math kernel on CUDA).
    Uneven groups go through the padded layout (HeadSelection.gqa_pad) while PAD_ROWS allows
    and the mask is the same for every head.
    On the CPU (Intel Xeon, 2 threads, float32, heads of 64 features, 3 KV heads), a decoding
    step of five sequences of 9 query heads over 65 cached tokens took 26 us against 112 us with
    the copy, over 1025 tokens 0.30 against 1.84 ms; one sequence keeping 5 of the 9 (padded to
    9) over 1025 tokens 56 against 212 us, 16 query tokens 241 against 329 us, but 128 tokens of
    prefill 237 against 153 us. Same values either way."""
    if not selection.kv_group:
        return False
    if not (q.device.type == "cpu" or (unmasked and q.shape[-1] <= 256)):
        return False
    if selection.gqa_pad is None:
        return True
    per_head_mask = attention_mask is not None and attention_mask.dim() == 4 and \
        attention_mask.shape[1] != 1
    extra = selection.gqa_pad.numel() - selection.num_kept
    return not per_head_mask and q.shape[2] * extra <= PAD_ROWS * selection.num_kept


def project_out(attn_out, o_weight_t, o_bias, selection: HeadSelection, backend: str = "auto",
                scales: torch.Tensor | None = None):
    """The output projection reading only the kept heads' columns (o_weight_t input-major);
    `scales` (None, or one per column of attn_out) multiply the columns' contributions."""
    if selection.is_full and not library.dense_in_kernel(attn_out, backend, o_weight_t):
        return dense_cols_linear(attn_out, o_weight_t, o_bias, scales)
    return library.gather_cols_linear(attn_out, o_weight_t, o_bias, selection.q_rows, backend,
                                      scales)


def no_heads_output(hidden, weights: dict, o_weight_t, o_bias, selection: HeadSelection,
                    backend: str = "auto") -> torch.Tensor:
    """The output projection of attention keeping no head (`selection` keeps none): its bias
    alone (zeros without one), shaped like `hidden` with the projection's width. Under autograd
    it comes through the projections' empty gathers (`weights`: project_qkv's keywords), so that
    Q, K, V and O get the zero gradients the dense model with these heads' output columns zeroed
    gives them, not none."""
    if not torch.is_grad_enabled():  # the projection of no input: its bias, in its dtype
        return dense_cols_linear(hidden[..., :0], o_weight_t[:0], o_bias)
    return project_out(empty_heads(hidden, weights, selection, backend), o_weight_t, o_bias,
                       selection, backend)


def empty_heads(hidden, weights: dict, selection: HeadSelection, backend: str = "auto"):
    """The (batch, seq, 0) attention output of no head (`no_heads_output`)."""
    if not torch.is_grad_enabled():  # (in the dtype a projection gives: autocast's under it)
        return F.linear(hidden, weights["q_weight"][:0])
    q, k, v = project_qkv(hidden, selection=selection, backend=backend, **weights)
    return torch.cat([t.transpose(1, 2).flatten(2) for t in (q, k, v)], dim=-1)


def _check_layer(hidden, weights: dict, biases: dict, selection: HeadSelection) -> None:
    """The layer's tensors against each other and against `selection` (a selection made for
    another layer's head counts would read the wrong rows): ValueError/TypeError naming them."""
    if not isinstance(selection, HeadSelection):
        raise TypeError(f"selection must be a HeadSelection, got {type(selection).__name__}")
    check_float_tensor("hidden", hidden, dims=3)
    for name, tensor in weights.items():
        check_float_tensor(name, tensor, dims=2)
    check_same_dtype_device("hidden", hidden, **weights, **biases)
    width, d = hidden.shape[-1], selection.head_dim
    rows = dict(q_weight=selection.num_heads * d, k_weight=selection.num_kv_heads * d,
                v_weight=selection.num_kv_heads * d)
    for name, count in rows.items():
        check_features(name, weights[name], 0, count, "the selection's heads x head_dim")
        check_features(name, weights[name], 1, width, "hidden's width")
    check_features("o_weight_t", weights["o_weight_t"], 0, rows["q_weight"],
                   "the selection's heads x head_dim")
    for name, size in dict(q_bias=rows["q_weight"], k_bias=rows["k_weight"],
                           v_bias=rows["v_weight"],
                           o_bias=weights["o_weight_t"].shape[1]).items():
        check_bias(name, biases[name], size)


def pruned_head_attention(
    hidden: torch.Tensor,
    q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, o_weight_t, o_bias,
    selection: HeadSelection,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    rotary: RotaryHook | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-head (or grouped-query) attention over the kept query heads only.

    hidden: (batch, seq, hidden). Projection weights in nn.Linear layout, except o_weight_t, the
    output projection's weight input-major (`input_major(o_proj.weight)`). attention_mask: (batch,
    kv_len) padding mask (1 = token) or a 4-D boolean / additive mask. rotary: called as
    `q, k = rotary(q, k)` on the kept heads (batch, heads, seq, head_dim) before attention.
    Equals the dense layer whose output projection has the pruned heads' columns zeroed.
    """
    check_backend_name(backend)
    _check_layer(hidden, dict(q_weight=q_weight, k_weight=k_weight, v_weight=v_weight,
                              o_weight_t=o_weight_t),
                 dict(q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias), selection)
    _check_mask_shape(attention_mask, hidden, selection.num_heads)
    _check_padding_values(attention_mask)
    if selection.num_kept == 0:
        weights = dict(q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias,
                       v_weight=v_weight, v_bias=v_bias)
        return no_heads_output(hidden, weights, o_weight_t, o_bias, selection, backend)
    q, k, v = project_qkv(hidden, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                          selection, backend)
    if rotary is not None:
        q, k = rotary(q, k)
    out = attend(q, k, v, selection, attention_mask, is_causal, scale)
    return project_out(out, o_weight_t, o_bias, selection, backend)

"""Pruned-head attention against the masked-dense float64 reference (o_proj columns zeroed)."""
import math

import pytest
import torch

import doe_kernels as dk
from conftest import backend_cases
from reference import assert_close, f64

# (num_heads, num_kv_heads, head_dim): multi-head, grouped-query, multi-query, odd head_dim.
CONFIGS = [(4, 4, 16), (6, 2, 8), (6, 3, 5), (4, 1, 16)]


def rotary(q, k):
    """A rotary embedding over positions 0..seq-1, the same for every head."""
    seq, dim = q.shape[-2], q.shape[-1]
    half = dim // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1)))
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq
    cos, sin = angle.cos().to(q.device, q.dtype), angle.sin().to(q.device, q.dtype)

    def rotate(t):
        a, b, rest = t[..., :half], t[..., half:2 * half], t[..., 2 * half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)

    return rotate(q), rotate(k)


def make_layer(num_heads, num_kv_heads, head_dim, dtype, device, bias):
    hidden = num_heads * head_dim + 3  # hidden need not equal heads * head_dim
    make = lambda *s: (torch.randn(*s) / math.sqrt(s[-1])).to(device, dtype)  # noqa: E731
    q_w, k_w, v_w = (make(n * head_dim, hidden) for n in (num_heads, num_kv_heads, num_kv_heads))
    o_w = make(hidden, num_heads * head_dim)
    biases = [make(n * head_dim) if bias else None for n in (num_heads, num_kv_heads, num_kv_heads)]
    o_b = make(hidden) if bias else None
    return hidden, dict(q_weight=q_w, q_bias=biases[0], k_weight=k_w, k_bias=biases[1],
                        v_weight=v_w, v_bias=biases[2], o_weight=o_w, o_bias=o_b)


def reference(x, layer, kept, num_heads, num_kv_heads, head_dim, mask, is_causal, use_rotary,
              additive=None, dtype=torch.float64):
    """Dense attention in float64 over all heads, pruned heads' o_proj columns zeroed; `mask` a
    2-D padding mask, `additive` a 4-D float mask added to the scores (its minus infinities and
    min-of-dtype values masking); a query row that sees no key gives 0 (as transformers' sdpa
    attention does), or under an additive mask the mean of the values (as its eager one does).
    With another `dtype`, the same in that dtype: plain torch's error there, which assert_close
    allows twice of (not the package's torch backend, which shares its code with the others)."""
    def cast(t):
        return t.to(dtype)

    def proj(w, b):
        out = cast(x) @ cast(w).T
        return out if b is None else out + cast(b)

    batch, seq, _ = x.shape
    split = lambda t: t.view(batch, seq, -1, head_dim).transpose(1, 2)  # noqa: E731
    q = split(proj(layer["q_weight"], layer["q_bias"]))
    k = split(proj(layer["k_weight"], layer["k_bias"]))
    v = split(proj(layer["v_weight"], layer["v_bias"]))
    if use_rotary:
        q, k = rotary(q, k)
    group = num_heads // num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=x.device)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :].bool()
    if is_causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    if additive is not None:
        allowed = allowed & (additive > torch.finfo(additive.dtype).min / 2)
        scores = scores + cast(additive).clamp_min(-1e300 if dtype == torch.float64
                                                   else torch.finfo(dtype).min)
    sees = allowed.any(-1, keepdim=True)
    attn = scores.masked_fill(~allowed, float("-inf")).masked_fill(~sees, 0).softmax(-1) @ v
    attn = attn.masked_fill(~sees, 0) if additive is None else attn  # (the mean of v)
    attn = attn.transpose(1, 2).reshape(batch, seq, -1)
    column_mask = torch.zeros(num_heads, head_dim, dtype=dtype, device=x.device)
    column_mask[kept] = 1
    out = attn @ (cast(layer["o_weight"]) * column_mask.reshape(-1)).T
    return out if layer["o_bias"] is None else out + cast(layer["o_bias"])


def kept_heads_cases(num_heads, num_kv_heads):
    group = num_heads // num_kv_heads
    uneven = [h for h in range(num_heads) if h % group == 0] + [num_heads - 1]
    return {
        "empty": [],
        "single": [num_heads - 1],
        "full": list(range(num_heads)),
        "uneven_groups": sorted(set(uneven)),
        # every query head of every other KV head: even groups with KV heads pruned
        "even_groups": [h for h in range(num_heads) if (h // group) % 2 == 0],
    }


@pytest.mark.parametrize("device,backend,dtype", backend_cases(with_dtype=True))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "h{}kv{}d{}".format(*c))
@pytest.mark.parametrize("variant", ["padded", "causal_rotary", "plain_nobias"])
def test_pruned_head_attention(device, backend, dtype, config, variant):
    num_heads, num_kv_heads, head_dim = config
    hidden, layer = make_layer(*config, dtype, device, bias=variant != "plain_nobias")
    batch, seq = 2, 7
    x = torch.randn(batch, seq, hidden).to(device, dtype)
    mask = None
    if variant == "padded":
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        mask[1, :3] = 0  # left padding in the second sequence
    is_causal = use_rotary = variant == "causal_rotary"
    o_weight_t = dk.input_major(layer["o_weight"])
    args = {k: v for k, v in layer.items() if k != "o_weight"}
    for name, kept in kept_heads_cases(num_heads, num_kv_heads).items():
        selection = dk.HeadSelection.build(kept, num_heads, num_kv_heads, head_dim, device=device)
        call = dict(attention_mask=mask, is_causal=is_causal, rotary=rotary if use_rotary else None)
        out = dk.pruned_head_attention(x, **args, o_weight_t=o_weight_t, selection=selection,
                                       backend=backend, **call)
        dense = None
        if dtype != torch.float32:
            dense = reference(x, layer, kept, *config, mask, is_causal, use_rotary, dtype=dtype)
        ref = reference(x, layer, kept, *config, mask, is_causal, use_rotary)
        assert_close(out, ref, dense, f"attention kept={name}")


def test_head_selection_computes_only_used_kv_heads():
    selection = dk.HeadSelection.build([0, 1, 7], num_heads=8, num_kv_heads=4, head_dim=2)
    assert selection.kept_kv_heads.tolist() == [0, 3]
    assert selection.kv_slot.tolist() == [0, 0, 1]
    assert selection.q_rows.tolist() == [0, 1, 2, 3, 14, 15]
    assert selection.kv_rows.tolist() == [0, 1, 6, 7]
    # KV head 0 serves two kept heads, KV head 3 one: SDPA's layout pads the second group
    assert selection.kv_group == 2
    assert selection.gqa_pad.tolist() == [0, 1, 2, 2] and selection.gqa_unpad.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kept,group,pad", [
    ([0, 1, 6, 7], 2, None), (list(range(8)), 2, None), ([2, 5], 1, None), ([], 0, None),
    ([0, 1, 2], 2, [0, 1, 2, 2]), ([1, 2, 3, 4, 5], 2, [0, 0, 1, 2, 3, 4])])
def test_head_selection_gqa_layout(kept, group, pad):
    selection = dk.HeadSelection.build(kept, num_heads=8, num_kv_heads=4, head_dim=2)
    assert selection.kv_group == group
    assert (selection.gqa_pad is None) == (pad is None)
    if pad is not None:
        assert selection.gqa_pad.tolist() == pad
        # every kept head, at its own place of the padded layout
        assert selection.gqa_pad[selection.gqa_unpad].tolist() == list(range(len(kept)))
        assert (selection.gqa_unpad // group).tolist() == selection.kv_slot.tolist()
    moved = selection.apply(lambda t: t.clone())
    assert moved.kv_group == group and (moved.gqa_pad is None) == (pad is None)


def test_sdpa_reads_kv_groups_without_a_copy():
    """SDPA takes the KV heads for its groups (enable_gqa, no K / V copy) on the CPU, masked or
    not, elsewhere only unmasked with heads of at most 256 features; uneven groups padded while
    the padding heads' extra query rows stay under PAD_ROWS per kept head, and the mask is one
    for all heads."""
    from doe_kernels.ops.attention import PAD_ROWS, _sdpa_groups
    even = dk.HeadSelection.build([0, 1, 6, 7], num_heads=8, num_kv_heads=4, head_dim=2)
    uneven = dk.HeadSelection.build([0, 1, 7], num_heads=8, num_kv_heads=4, head_dim=2)
    cpu, meta = torch.empty(1, 4, 3, 2), torch.empty(1, 4, 3, 2, device="meta")
    assert _sdpa_groups(even, cpu, None, unmasked=False) and _sdpa_groups(even, cpu, None, True)
    assert _sdpa_groups(even, meta, None, True) and not _sdpa_groups(even, meta, None, False)
    assert not _sdpa_groups(even, torch.empty(1, 4, 3, 512, device="meta"), None, True)
    tokens = PAD_ROWS * uneven.num_kept  # one padding head: that many query rows at most
    assert _sdpa_groups(uneven, torch.empty(1, 3, tokens, 2), None, False)
    assert not _sdpa_groups(uneven, torch.empty(1, 3, tokens + 1, 2), None, False)
    per_head = torch.ones(1, 3, 3, 3, dtype=torch.bool)
    assert not _sdpa_groups(uneven, torch.empty(1, 3, 3, 2), per_head, False)
    assert _sdpa_groups(even, torch.empty(1, 4, 3, 2), torch.ones(1, 4, 3, 3), False)


@pytest.mark.parametrize("variant", ["padded", "causal", "decode"])
def test_padded_groups_equal_the_copied_kv(monkeypatch, variant):
    """Uneven groups through SDPA's padded layout give what the K / V copy gives."""
    from doe_kernels.ops import attention
    selection = dk.HeadSelection.build([0, 1, 2, 3, 6], num_heads=9, num_kv_heads=3, head_dim=8)
    queries = 1 if variant == "decode" else 6
    q = torch.randn(2, 5, queries, 8)
    k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)  # the three kept KV heads
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]) if variant != "causal" else None
    call = dict(attention_mask=mask, is_causal=variant == "causal")
    padded = attention.attend(q, k, v, selection, **call)
    monkeypatch.setattr(attention, "PAD_ROWS", 0)  # the copy
    copied = attention.attend(q, k, v, selection, **call)
    torch.testing.assert_close(padded, copied, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masking", ["none", "causal", "additive", "decode"])
def test_eager_attend_is_transformers_eager_attention(family, dtype, masking):
    """attend(eager=...) over kept heads of uneven groups computes transformers' eager attention
    (the family's eager_attention_forward, softmax in float32 for LLaMA's, in the dtype for
    BERT's) on the kept heads, each reading its KV head: bit for bit, and within the float64
    reference's tolerance. An additive mask whose row masks every key averages every value, as
    transformers' does; a causal pass without a mask sees its earlier keys."""
    import importlib

    from doe_kernels.ops import attention
    hf = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    selection = dk.HeadSelection.build([0, 1, 2, 5], num_heads=9, num_kv_heads=3, head_dim=7)
    queries = 1 if masking == "decode" else 5
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, queries, 7, generator=gen).to(dtype)
    k, v = (torch.randn(2, 2, 5, 7, generator=gen).to(dtype) for _ in range(2))
    additive = None
    if masking in ("additive", "decode"):
        allowed = torch.ones(2, 1, queries, 5, dtype=torch.bool)
        allowed[1, :, :, :2] = False  # left padding
        allowed[1, :, 0] = False  # a row seeing no key
        additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed,
                                                                       torch.finfo(dtype).min)
    causal = masking == "causal"
    eager = "float32" if family == "llama" else "input"
    out = attention.attend(q, k, v, selection, additive, is_causal=causal, scale=0.3,
                           eager=eager)

    def theirs(q, k, v, cast):
        k, v = k.index_select(1, selection.kv_slot), v.index_select(1, selection.kv_slot)
        mask = None if additive is None else cast(additive)
        if causal:
            mask = torch.zeros(5, 5, dtype=q.dtype).masked_fill(
                ~torch.ones(5, 5, dtype=torch.bool).tril(), torch.finfo(q.dtype).min)
        module = torch.nn.Module().eval()
        module.num_key_value_groups = 1
        out, _ = hf.eager_attention_forward(module, q, k, v, mask, scaling=0.3)
        return out.reshape(*out.shape[:2], -1)

    assert torch.equal(out, theirs(q, k, v, lambda t: t))
    ref = theirs(*(t.double() for t in (q, k, v)), lambda t: t.double().clamp_min(-1e300))
    rows = torch.ones(out.shape[:2], dtype=torch.bool)
    if dtype == torch.float16 and additive is not None:
        rows[1, 0] = False  # (float16's lowest value, added, leaves scores unequal: no average)
    assert_close(out[rows], ref[rows], what=f"{family} {dtype} {masking}")
    with pytest.raises(ValueError, match="eager must be None or one of"):
        attention.attend(q, k, v, selection, eager="bfloat16")


def test_head_selection_rejects_bad_heads():
    with pytest.raises(ValueError, match="out of range"):
        dk.HeadSelection.build([0, 8], num_heads=8, num_kv_heads=4, head_dim=2)
    with pytest.raises(ValueError, match="duplicate"):
        dk.HeadSelection.build([1, 1], num_heads=8, num_kv_heads=4, head_dim=2)
    with pytest.raises(ValueError, match="multiple"):
        dk.HeadSelection.build([1], num_heads=6, num_kv_heads=4, head_dim=2)
    with pytest.raises(ValueError, match="multiple"):  # was a ZeroDivisionError
        dk.HeadSelection.build([1], num_heads=6, num_kv_heads=0, head_dim=2)
    with pytest.raises(TypeError, match="int32 or int64"):  # a float list was truncated
        dk.HeadSelection.build([0.9, 2.5], num_heads=8, num_kv_heads=4, head_dim=2)


def test_a_layer_that_does_not_match_its_selection_is_refused():
    """pruned_head_attention checks its tensors against each other and against the selection (a
    selection of another layer's head counts read the wrong rows and answered), before any
    work, whatever it keeps."""
    hidden, layer = make_layer(4, 2, 3, torch.float32, "cpu", bias=True)
    args = {k: v for k, v in layer.items() if k != "o_weight"}
    o_weight_t = dk.input_major(layer["o_weight"])
    x = torch.randn(2, 5, hidden)

    def call(x=x, selection=dk.HeadSelection.build([0, 1], 4, 2, 3), **changed):
        return dk.pruned_head_attention(x, **{**args, "o_weight_t": o_weight_t, **changed},
                                        selection=selection, backend="torch")

    for kept, heads, kv in (([0], 2, 1), ([0], 4, 4), ([], 8, 2)):
        with pytest.raises(ValueError, match="the selection's heads x head_dim"):
            call(selection=dk.HeadSelection.build(kept, heads, kv, 3))
    with pytest.raises(ValueError, match="q_weight has size .* hidden's width"):
        call(x=torch.randn(2, 5, hidden + 1))
    with pytest.raises(TypeError, match="k_weight has dtype torch.bfloat16"):
        call(k_weight=layer["k_weight"].bfloat16())
    with pytest.raises(ValueError, match="q_bias has size 3"):
        call(q_bias=layer["q_bias"][:3])
    with pytest.raises(TypeError, match="selection must be a HeadSelection"):
        call(selection=[0, 1])


def test_an_integer_4d_mask_reads_as_a_boolean_one():
    """A 4-D mask of 0/1 integers masks as the same mask of booleans (it was added to the
    scores, masking nothing)."""
    config = 4, 2, 3
    hidden, layer = make_layer(*config, torch.float32, "cpu", bias=True)
    args = {k: v for k, v in layer.items() if k != "o_weight"}
    x = torch.randn(2, 5, hidden)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    outs = [dk.pruned_head_attention(x, **args, o_weight_t=dk.input_major(layer["o_weight"]),
                                     selection=dk.HeadSelection.build([1, 2], *config),
                                     attention_mask=mask, backend="torch")
            for mask in (allowed, allowed.long(), allowed.to(torch.uint8))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["no-sequences", "no-tokens"])
@pytest.mark.parametrize("kept", [[0, 1, 3], [0, 1, 2, 3], []])
def test_attention_of_an_empty_batch(shape, kept):
    """No sequences, or sequences of no tokens: an empty output (a reshape failed)."""
    hidden, layer = make_layer(4, 2, 3, torch.float32, "cpu", bias=True)
    x = torch.randn(*shape, hidden)
    args = {k: v for k, v in layer.items() if k != "o_weight"}
    selection = dk.HeadSelection.build(kept, 4, 2, 3)
    out = dk.pruned_head_attention(x, **args, o_weight_t=dk.input_major(layer["o_weight"]),
                                   selection=selection, backend="torch")
    assert out.shape == (*shape, hidden)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kept", [[], [4]], ids=["no-head", "one-head"])
def test_attention_gradients_equal_the_masked_dense_layers(backend, kept):
    """Gradients of every input and weight, also with no head kept: zeros where the dense layer
    with the pruned heads' output columns zeroed gives zeros (the op returned a tensor outside
    the autograd graph, so a backward raised and the weights got no gradient)."""
    if backend not in dk.available_backends("cpu"):
        pytest.skip(f"{backend} not built")
    config = (6, 2, 5)
    hidden, layer = make_layer(*config, torch.float32, "cpu", bias=True)
    layer["o_weight_t"] = dk.input_major(layer.pop("o_weight"))
    leaves = {name: t.requires_grad_() for name, t in layer.items()}
    x = torch.randn(2, 7, hidden, requires_grad=True)
    selection = dk.HeadSelection.build(kept, *config)
    out = dk.pruned_head_attention(x, **leaves, selection=selection, is_causal=True,
                                   backend=backend)
    weights = dict(leaves, o_weight=leaves["o_weight_t"].T)
    ref = reference(x, weights, kept, *config, None, True, False)
    assert_close(out, ref.detach(), what="output")
    upstream = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, *leaves.values()], upstream)
    want = torch.autograd.grad(ref, [x, *leaves.values()], upstream)
    for name, g, w in zip(["x", *leaves], got, want):  # (w: float64's, rounded to float32)
        assert_close(g, w.double(), what=f"gradient of {name}")


@pytest.mark.parametrize("fill", ["-inf", "min", -1e9, -1e4, "bias"])
def test_additive_4d_masks_are_added_as_transformers_adds_them(fill):
    """A float 4-D mask is added to the scores: finite fills (BERT's classic -1e4, -1e9) and soft
    biases count as they are, not read as attend / do not attend; rows it masks entirely (left
    padding under a causal mask) average every value, as transformers' eager attention does
    (they gave 0, as its sdpa attention does with a boolean mask)."""
    config = num_heads, num_kv_heads, head_dim = 4, 2, 8
    hidden, layer = make_layer(*config, torch.float32, "cpu", bias=True)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, hidden, generator=gen)
    blocked = ~torch.ones(6, 6, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    blocked[1, :, :, :2] = True  # the second sequence left-padded: rows 0-1 see no key
    value = {"-inf": float("-inf"), "min": torch.finfo(torch.float32).min}.get(fill, fill)
    additive = (0.5 * torch.randn(2, 1, 6, 6, generator=gen) if fill == "bias"
                else torch.zeros(2, 1, 6, 6).masked_fill(blocked, value))
    args = {k: v for k, v in layer.items() if k != "o_weight"}
    for kept in ([0, 1, 2, 3], [1, 2]):
        selection = dk.HeadSelection.build(kept, *config)
        out = dk.pruned_head_attention(x, **args, o_weight_t=dk.input_major(layer["o_weight"]),
                                       selection=selection, attention_mask=additive,
                                       backend="torch")
        ref = reference(x, layer, kept, *config, None, False, False, additive=additive)
        if isinstance(fill, float):  # rows it fills entirely: softmax of score - 1e9, which
            out, ref = out[:, 2:], ref[:, 2:]  # float32 rounds to uniform (as eager does)
        assert_close(out, ref, what=f"fill {fill} kept {kept}")


def test_a_per_head_mask_empties_each_heads_rows_on_its_own():
    """A (batch, heads, q, kv) mask that blocks a query row for one head only: that head's row
    outputs 0, the other heads' rows attend as their masks say."""
    from doe_kernels.ops.attention import attend

    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=gen) for _ in range(3))
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool).tril()
    mask[0, 0, 2] = False  # head 0's last query sees nothing
    out = attend(q, k, v, dk.HeadSelection.build([0, 1], 2, 2, 4), mask).view(1, 3, 2, 4)
    scores = (f64(q) @ f64(k).transpose(-1, -2) / 2).masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1).nan_to_num(0.0) @ f64(v)  # (1, 2, 3, 4); the empty row: 0
    torch.testing.assert_close(out.transpose(1, 2).double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0, 2, 0], torch.zeros(4))


def test_additive_4d_mask_equals_padding_mask():
    num_heads, num_kv_heads, head_dim = 4, 2, 8
    hidden, layer = make_layer(num_heads, num_kv_heads, head_dim, torch.float32, "cpu", bias=True)
    x = torch.randn(2, 5, hidden)
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    additive = torch.zeros(2, 1, 5, 5).masked_fill(padding[:, None, None, :] == 0,
                                                   torch.finfo(torch.float32).min)
    selection = dk.HeadSelection.build([1, 2], num_heads, num_kv_heads, head_dim)
    args = {k: v for k, v in layer.items() if k != "o_weight"}
    o_weight_t = dk.input_major(layer["o_weight"])
    a = dk.pruned_head_attention(x, **args, o_weight_t=o_weight_t, selection=selection,
                                 attention_mask=padding, backend="torch")
    b = dk.pruned_head_attention(x, **args, o_weight_t=o_weight_t, selection=selection,
                                 attention_mask=additive, backend="torch")
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, dk.pruned_head_attention(
        x, **args, o_weight_t=o_weight_t, selection=selection, backend="torch"))
    # a float 2-D padding mask reads as the integer one; a 2-D additive one is refused by name
    torch.testing.assert_close(a, dk.pruned_head_attention(
        x, **args, o_weight_t=o_weight_t, selection=selection, attention_mask=padding.float(),
        backend="torch"))
    with pytest.raises(ValueError, match="values other than 0 and 1 .an additive mask"):
        dk.pruned_head_attention(x, **args, o_weight_t=o_weight_t, selection=selection,
                                 attention_mask=additive[:, 0, 0], backend="torch")

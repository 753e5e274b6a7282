"""Bad input gets a ValueError/TypeError that names the argument and the problem."""
import pytest
import torch

import doe_kernels as dk


@pytest.fixture
def ffn():
    return dict(x=torch.randn(3, 40), w_in=torch.randn(37, 40), b_in=torch.randn(37),
                w_out_t=torch.randn(37, 40), b_out=torch.randn(40),
                kept=torch.tensor([1, 5, 9]))


@pytest.mark.parametrize("kept,error,match", [
    (torch.tensor([1, 37]), ValueError, "kept holds index 37, out of range"),
    (torch.tensor([-1, 3]), ValueError, "kept holds index -1, out of range"),
    (torch.tensor([5, 1]), ValueError, "kept must be sorted and unique: unsorted"),
    (torch.tensor([1, 5, 5]), ValueError, "kept must be sorted and unique: duplicate index 5"),
    (torch.tensor([[1, 5]]), ValueError, "kept must be 1-D"),
    (torch.tensor([1.0, 5.0]), TypeError, "kept must have dtype int32 or int64"),
    ([1, 5], TypeError, "kept must be a torch.Tensor"),
    (torch.tensor([1, 5], device="meta"), ValueError, "kept is on meta"),
])
def test_bad_indices(ffn, kept, error, match):
    ffn["kept"] = kept
    with pytest.raises(error, match=match):
        dk.gather_ffn(**ffn)


@pytest.mark.parametrize("name,value,error,match", [
    ("x", torch.randn(3, 41), ValueError, "x has size 41 in dimension -1 but w_in's hidden size is 40"),
    ("w_out_t", torch.randn(40, 37), ValueError, "w_out_t has size 40 in dimension 0"),
    ("w_in", torch.randn(37, 40, 1), ValueError, "w_in must be 2-D"),
    ("b_in", torch.randn(36), ValueError, "b_in has size 36"),
    ("b_out", torch.randn(37), ValueError, "b_out has size 37"),
    ("x", torch.randn(3, 40, dtype=torch.float64), TypeError, "w_in has dtype torch.float32 but x has torch.float64"),
    ("b_out", torch.randn(40, dtype=torch.bfloat16), TypeError, "b_out has dtype torch.bfloat16"),
    ("x", torch.randint(0, 3, (3, 40)), TypeError, "x must be a floating-point tensor"),
    ("w_out_t", torch.randn(37, 40, device="meta"), ValueError, "w_out_t is on meta but x is on cpu"),
    ("b_in", [0.0] * 37, TypeError, "b_in must be a tensor or None, got list"),
    ("w_out_t", [[0.0] * 40] * 37, TypeError, "w_out_t must be a tensor or None, got list"),
])
def test_bad_tensors(ffn, name, value, error, match):
    ffn[name] = value
    with pytest.raises(error, match=match):
        dk.gather_ffn(**ffn)


def test_bad_activation_and_backend(ffn):
    with pytest.raises(ValueError, match="activation must be one of"):
        dk.gather_ffn(**ffn, activation="swish")
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.gather_ffn(**ffn, backend="mkl")
    with pytest.raises(dk.BackendUnavailableError, match="backend 'cuda' is not available for cpu"):
        dk.gather_ffn(**ffn, backend="cuda")
    for nothing in ({"kept": torch.tensor([], dtype=torch.long)}, {"x": torch.randn(0, 40)}):
        with pytest.raises(ValueError, match="backend must be one of"):  # nothing to compute
            dk.gather_ffn(**{**ffn, **nothing}, backend="mkl")
    segments, kept, offsets, _ = dk.pack_segments([3], [[]])
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.segmented_gather_ffn(ffn["x"], ffn["w_in"], ffn["b_in"], ffn["w_out_t"],
                                ffn["b_out"], segments, kept, offsets, backend="mkl")


def test_a_0d_input_is_refused_naming_it(ffn):
    with pytest.raises(ValueError, match="x must have a features dimension"):
        dk.gather_ffn(**{**ffn, "x": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="x_kept must have a features dimension"):
        dk.gather_cols_linear(torch.tensor(1.0), ffn["w_out_t"], None, torch.tensor([1]))


def test_swiglu_shape_mismatch():
    w = torch.randn(37, 40)
    with pytest.raises(ValueError, match="w_up has shape"):
        dk.gather_swiglu_ffn(torch.randn(2, 40), w, torch.randn(36, 40), w, torch.tensor([0]))


def test_gathered_linear_errors():
    weight = torch.randn(37, 40)
    with pytest.raises(ValueError, match="rows holds index 40, out of range"):
        dk.gather_rows_linear(torch.randn(2, 40), weight, None, torch.tensor([40]))
    with pytest.raises(ValueError, match="x_kept has size 3 in dimension -1 but the number of kept columns is 2"):
        dk.gather_cols_linear(torch.randn(2, 3), weight, None, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bias has size 37"):
        dk.gather_cols_linear(torch.randn(2, 2), weight, torch.randn(37), torch.tensor([0, 1]))


@pytest.mark.parametrize("everything", [False, True], ids=["x", "all"])
@pytest.mark.parametrize("check_indices", [True, False])
def test_meta_tensors_are_refused_naming_them(ffn, everything, check_indices):
    """An op given meta tensors (shapes without data) names the tensor (torch.autocast's query
    raised 'unknown device type'), checked indices or not."""
    given = {k: v.to("meta") if everything or k == "x" else v for k, v in ffn.items()}
    with pytest.raises(ValueError, match="x is on the meta device: the ops run on CPU or CUDA"):
        dk.gather_ffn(**given, check_indices=check_indices)
    with pytest.raises(ValueError, match="x_kept is on the meta device"):
        dk.gather_cols_linear(given["x"][:, :3], given["w_out_t"], None, given["kept"],
                              check_indices=check_indices)


def test_input_major_refuses_what_is_not_a_weight():
    with pytest.raises(ValueError, match=r"weight must be at least 2-D, .* got shape \(4,\)"):
        dk.input_major(torch.randn(4))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        dk.input_major([[1.0, 2.0]])


def test_head_selection_refuses_sizes_that_are_not_positive_ints():
    """A head size of 0 or a float head count built a selection; -1 gave torch's arange error."""
    build = dk.HeadSelection.build
    for sizes, error, match in (((6, 2, 0), ValueError, "head_dim must be positive, got 0"),
                                ((6, 2, -1), ValueError, "head_dim must be positive, got -1"),
                                ((0, 2, 8), ValueError, "num_heads must be positive"),
                                ((6.0, 2, 8), TypeError, "num_heads must be an int, got float"),
                                ((6, 2.0, 8), TypeError, "num_kv_heads must be an int"),
                                ((6, 2, True), TypeError, "head_dim must be an int, got bool")):
        with pytest.raises(error, match=match):
            build([0], *sizes)
    np = pytest.importorskip("numpy")
    selection = build([0, 2], np.int64(6), np.int32(2), np.int64(8))
    assert (selection.num_heads, selection.num_kv_heads, selection.head_dim) == (6, 2, 8)
    assert type(selection.head_dim) is int


@pytest.fixture
def attention():
    """A call of pruned_head_attention: hidden (2 sequences of 5 tokens), 6 heads of 8 features
    over 2 KV heads, 3 kept; keywords override its arguments."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, d, width = 6, 2, 8, 48
    args = {"hidden": torch.randn(2, 5, width, generator=gen),
            "q_weight": torch.randn(heads * d, width, generator=gen), "q_bias": None,
            "k_weight": torch.randn(kv_heads * d, width, generator=gen), "k_bias": None,
            "v_weight": torch.randn(kv_heads * d, width, generator=gen), "v_bias": None,
            "o_weight_t": torch.randn(heads * d, width, generator=gen), "o_bias": None,
            "selection": dk.HeadSelection.build([0, 2, 5], heads, kv_heads, d)}
    return lambda **changed: dk.pruned_head_attention(**{**args, **changed})


@pytest.mark.parametrize("mask,match", [
    (torch.ones(3, 5), "attention_mask has 3 sequences but hidden has 2"),
    (torch.ones(3, 1, 5, 5, dtype=torch.bool), "attention_mask has 3 sequences but hidden has 2"),
    (torch.ones(2, 1, 3, 5, dtype=torch.bool),
     "attention_mask's query length 3 does not match the 5 tokens of hidden"),
    (torch.ones(2, 1, 5, 7, dtype=torch.bool),
     "attention_mask's key length 7 does not match the 5 tokens of hidden"),
    (torch.ones(2, 1, 5, 5, device="meta"), "attention_mask is on meta but hidden is on cpu"),
    ([[1] * 5] * 2, "attention_mask is a list"),
])
@pytest.mark.parametrize("kept", [[0, 2, 5], []], ids=["kept", "none-kept"])
def test_attention_masks_that_do_not_fit_hidden_are_refused(attention, mask, match, kept):
    """A mask whose sequences or query / key lengths are not hidden's (nor 1) failed in torch's
    broadcasting (a list: AttributeError), or answered when no head was kept."""
    with pytest.raises(ValueError, match=match):
        attention(attention_mask=mask, selection=dk.HeadSelection.build(kept, 6, 2, 8))


def test_attention_masks_that_broadcast_are_taken(attention):
    """A size-1 batch, query or key dimension broadcasts (BERT's extended mask is (batch, 1, 1,
    kv_len)), as SDPA broadcasts it."""
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    want = attention(attention_mask=padding)
    torch.testing.assert_close(attention(attention_mask=padding[:, None, None, :].bool()), want)
    both = attention(attention_mask=padding[1:].expand(2, 5))
    torch.testing.assert_close(attention(attention_mask=padding[1:]), both)
    everything = attention()
    torch.testing.assert_close(attention(attention_mask=torch.ones(1, 1, 5, 1)), everything)


def test_attention_checks_the_backend_name_with_nothing_to_compute(attention):
    for kept in ([0, 2, 5], []):
        with pytest.raises(ValueError, match="backend must be one of"):
            attention(selection=dk.HeadSelection.build(kept, 6, 2, 8), backend="cpux")

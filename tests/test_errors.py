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

"""torch.library.opcheck on every op and backend present (schema, fake tensor, aot dispatch)."""
import pytest
import torch

from conftest import backend_cases
from reference import index_list

OPS = torch.ops.doe_kernels


def _op_cases(device, backend):
    make = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    kept = index_list("random", 37, device)
    x3d = make(2, 3, 40)
    scales = make(kept.numel())
    return {
        "gather_rows_linear": (OPS.gather_rows_linear.default,
                               (x3d, make(37, 40), make(37), kept, "gelu", backend)),
        "gather_cols_linear": (OPS.gather_cols_linear.default,
                               (make(5, kept.numel()), make(37, 40), make(40), kept, backend)),
        "gather_cols_linear_scaled": (OPS.gather_cols_linear.default,
                                      (make(5, kept.numel()), make(37, 40), make(40), kept,
                                       backend, scales)),
        "gather_ffn": (OPS.gather_ffn.default,
                       (x3d, make(37, 40), make(37), make(37, 40), make(40), kept, "relu", backend)),
        "gather_ffn_scaled": (OPS.gather_ffn.default,
                              (x3d, make(37, 40), make(37), make(37, 40), make(40), kept, "relu",
                               backend, scales)),
        "gather_ffn_empty": (OPS.gather_ffn.default,
                             (x3d, make(37, 40), None, make(37, 40), make(40), kept[:0], "gelu",
                              backend)),
        "gather_ffn_empty_scaled": (OPS.gather_ffn.default,
                                    (x3d, make(37, 40), None, make(37, 40), make(40), kept[:0],
                                     "gelu", backend, scales[:0])),
        "gather_swiglu_ffn": (OPS.gather_swiglu_ffn.default,
                              (x3d, make(37, 40), make(37, 40), make(37, 40), kept, backend)),
        "gather_swiglu_ffn_scaled": (OPS.gather_swiglu_ffn.default,
                                     (x3d, make(37, 40), make(37, 40), make(37, 40), kept, backend,
                                      scales)),
    }


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("case", ["gather_rows_linear", "gather_cols_linear",
                                  "gather_cols_linear_scaled", "gather_ffn", "gather_ffn_scaled",
                                  "gather_ffn_empty", "gather_ffn_empty_scaled",
                                  "gather_swiglu_ffn", "gather_swiglu_ffn_scaled"])
def test_opcheck(device, backend, case):
    op, args = _op_cases(device, backend)[case]
    torch.library.opcheck(op, args)


def test_ops_compile_with_torch_compile():
    import doe_kernels as dk

    w_in, w_out_t = torch.randn(37, 40), torch.randn(37, 40)
    kept = index_list("random", 37)

    def ffn(x):
        return dk.gather_ffn(x, w_in, None, w_out_t, None, kept, "gelu", check_indices=False)

    x = torch.randn(3, 40)
    compiled = torch.compile(ffn, fullgraph=True)
    torch.testing.assert_close(compiled(x), ffn(x))

"""The ops inside a CUDA graph (GPU only): captured once, replayed on new inputs in the same
buffers, they equal eager calls. A serving stack captures its decode step this way, so a host sync
or a launch on another stream inside an op would break it."""
import pytest
import torch

import doe_kernels as dk
from model_utils import build, mixed_mask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _captured(fn):
    """(graph, output): fn() captured once in a CUDA graph, after two warm-up calls off the
    default stream (Triton compiles, cuBLAS picks its kernels), as PyTorch advises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    return graph, captured


def _replayed_equals_eager(fn, inputs):
    """Capture fn() once, refill `inputs` with fresh values, replay: the captured output must equal
    an eager call on the new values."""
    graph, captured = _captured(fn)
    graph.replay()
    torch.cuda.synchronize()
    before = captured.clone()
    for tensor in inputs:
        tensor.copy_(torch.randn_like(tensor))
    graph.replay()
    torch.cuda.synchronize()
    expected = fn()
    # cuBLAS may pick another algorithm inside a capture: bfloat16 rounding apart, not more
    torch.testing.assert_close(captured, expected, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(captured, before, rtol=2e-2, atol=2e-2), "the replay changed nothing"


def _backends():
    present = dk.available_backends("cuda") if torch.cuda.is_available() else []
    return [b for b in ("cuda", "triton", "torch") if b in present] or ["none"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rows", [1, 16, 70])
def test_ffns_replay_in_a_cuda_graph(backend, rows):
    if backend == "none":
        pytest.skip("no CUDA backend")
    make = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x = make(rows, 96)
    w_in, b_in, w_up = make(200, 96), make(200), make(200, 96)
    w_out_t, b_out = make(200, 96), make(96)
    kept = torch.randperm(200, device="cuda")[:77].sort().values
    _replayed_equals_eager(
        lambda: dk.gather_ffn(x, w_in, b_in, w_out_t, b_out, kept, "gelu", backend=backend,
                              check_indices=False), [x])
    _replayed_equals_eager(
        lambda: dk.gather_swiglu_ffn(x, w_in, w_up, w_out_t, kept, backend=backend,
                                     check_indices=False), [x])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("rows", [[1, 1, 1], [12, 0, 30]], ids=["decode", "prefill"])
def test_segmented_ffns_replay_in_a_cuda_graph(backend, rows):
    """A segmented op captures (one single-expert call per segment: the segmented kernels copy
    their tables from the host each call) and replays as eager calls compute."""
    if backend == "none":
        pytest.skip("no CUDA backend")
    make = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    x = make(sum(rows), 96)
    w_in, b_in, w_up, w_out_t, b_out = make(200, 96), make(200), make(200, 96), make(200, 96), \
        make(96)
    lists = [torch.randperm(200)[:n].sort().values for n in (70, 5, 200)]
    segments, kept, offsets, _ = dk.pack_segments(rows, lists)  # the layout on the host
    kept = kept.cuda()
    options = dict(backend=backend, strategy="segments", check_indices=False)
    _replayed_equals_eager(
        lambda: dk.segmented_gather_ffn(x, w_in, b_in, w_out_t, b_out, segments, kept, offsets,
                                        "gelu", **options), [x])
    _replayed_equals_eager(
        lambda: dk.segmented_gather_swiglu_ffn(x, w_in, w_up, w_out_t, segments, kept, offsets,
                                               **options), [x])


@pytest.mark.parametrize("backend", _backends())
def test_pruned_head_attention_replays_in_a_cuda_graph(backend):
    if backend == "none":
        pytest.skip("no CUDA backend")
    make = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    heads, kv_heads, head_dim, hidden = 8, 2, 16, 64
    x = make(2, 5, hidden)
    wq = make(heads * head_dim, hidden)
    wk, wv = make(kv_heads * head_dim, hidden), make(kv_heads * head_dim, hidden)
    wo_t = dk.input_major(make(hidden, heads * head_dim))
    selection = dk.HeadSelection.build(torch.tensor([0, 3, 4, 7]), heads, kv_heads, head_dim,
                                       device="cuda")
    _replayed_equals_eager(
        lambda: dk.pruned_head_attention(x, wq, None, wk, None, wv, None, wo_t, None, selection,
                                         is_causal=True, backend=backend), [x])



@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_patched_model_replays_in_a_cuda_graph(name, backend):
    """A whole patched model's forward pass, captured once, replays on new token ids as eager
    calls compute them: the way to serve a small model on a GPU without paying each op's launch
    from Python (nothing in the patched layers waits for the GPU or leaves the stream)."""
    if backend == "none":
        pytest.skip("no CUDA backend")
    model = build(name, torch.float32).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 120, (2, 7), device="cuda")
    new_ids = torch.randint(3, 120, (2, 7), device="cuda")
    # the last layer's hidden states (of about unit size; a random classifier's logits are tiny)
    hidden = lambda: model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float()  # noqa: E731
    with torch.no_grad(), dk.plugged(model, mixed_mask(model, seed=1), backend=backend):
        graph, captured = _captured(hidden)
        graph.replay()
        torch.cuda.synchronize()
        before = captured.clone()
        torch.testing.assert_close(before, hidden(), rtol=2e-2, atol=2e-2)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        expected = hidden()
        assert not torch.allclose(before, expected, rtol=2e-2, atol=2e-2), "the ids changed nothing"
        torch.testing.assert_close(captured, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", _backends())
def test_a_mixtral_keeping_whole_experts_replays_in_a_cuda_graph(backend):
    """A bfloat16 Mixtral (sizes multiples of 8: PyTorch's grouped GEMM) keeping whole experts,
    some layers dropping some, captures and replays: the routed tokens are grouped by expert on
    the GPU (torch.bincount read the ids' range back, a sync a capture forbids)."""
    if backend == "none":
        pytest.skip("no CUDA backend")
    from moe_utils import mixtral

    model = mixtral().to("cuda", torch.bfloat16)
    ids = torch.randint(3, 120, (2, 7), device="cuda")
    mask = dk.ExpertMask(moe={0: [0, 1, 2, 3, 4, 5], 2: [1, 3, 5, 7]})
    logits = lambda: model(input_ids=ids).logits.float()  # noqa: E731
    with torch.no_grad(), dk.plugged(model, mask, backend=backend):
        graph, captured = _captured(logits)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, logits(), rtol=2e-2, atol=2e-2)
        before = captured.clone()
        ids.copy_(torch.randint(3, 120, (2, 7), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        expected = logits()
        assert not torch.allclose(before, expected, rtol=2e-2, atol=2e-2), "the ids changed nothing"
        torch.testing.assert_close(captured, expected, rtol=2e-2, atol=2e-2)

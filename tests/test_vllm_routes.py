"""doe_kernels.vllm.routes without vLLM: a routed module's target changes reach code that
torch.compile traced before the change, with no recompilation, and its dense target is the module's
own forward."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from doe_kernels.vllm.routes import add_route, route_of


class ReturnsBias(torch.nn.Linear):
    """A linear with vLLM's return convention: (output, bias or None)."""

    def forward(self, x):
        return super().forward(x), None


@pytest.mark.parametrize("returns_bias", [False, True])
def test_a_swap_reaches_the_compiled_graph(returns_bias):
    torch._dynamo.reset()
    torch.manual_seed(0)
    linear = (ReturnsBias if returns_bias else torch.nn.Linear)(8, 5).eval()
    dense = torch.nn.Linear.forward.__get__(linear)
    route = add_route(linear, 5, returns_bias=returns_bias)
    assert add_route(linear, 5, returns_bias=returns_bias) is route  # idempotent
    assert route_of(linear) is route

    def model(x):
        out = linear(x)
        return (out[0] if returns_bias else out).relu() * 2

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(compiled(x), dense(x).relu() * 2)
        route.target = lambda x: x[:, 1:6] * 3  # a plugged expert's forward
        assert torch.equal(compiled(x), (x[:, 1:6] * 3).relu() * 2)
        route.reset()  # unplug
        assert torch.equal(compiled(x), dense(x).relu() * 2)
    assert counter.frame_count == 1
    assert route.calls == 3  # the compiled graph calls the route (else plug would not reach it)

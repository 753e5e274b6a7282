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


def test_a_dropped_model_is_freed_with_its_routes():
    """The process's table of routes holds no module: an engine's model, once dropped, is freed
    (with its weights), and a later module's route takes a new key."""
    import gc
    import weakref

    from doe_kernels.vllm import routes

    linear = torch.nn.Linear(8, 5)
    route = add_route(linear, 5)
    key = next(k for k, r in routes._ROUTES.items() if r is route)
    freed, route = weakref.ref(linear), None
    del linear
    gc.collect()
    assert freed() is None and key not in routes._ROUTES
    other = torch.nn.Linear(8, 5)
    route = add_route(other, 5)
    assert routes._ROUTES[max(routes._ROUTES)] is route and max(routes._ROUTES) > key

"""Attribution: how much each FFN neuron and each attention head matters for a task.

Score of a unit = activation x gradient of the gold label's logit with respect to that activation,
averaged over the (non-padding, soft-prompt included) tokens of an example, then (in magnitude, by
default) over examples.
FFN neuron activations are the input of the down projection (BERT: `output.dense`, LLaMA:
`mlp.down_proj`); head activations are the per-head slices of the input of the attention output
projection (BERT: `attention.output.dense`, LLaMA: `self_attn.o_proj`), a head's score being the
sum over its head_dim slice. `method="ig"` uses integrated gradients instead (activation x the
gradient averaged along the straight path from zero to the activation, one layer's units scaled at
a time, `steps` midpoints). `method="fisher"` scores a unit by the empirical Fisher information of
a mask variable multiplying it (Kwon et al. 2022): the square of the gradient of each example's
cross-entropy loss with respect to that mask (activation x gradient of the loss, summed over the
example's tokens), averaged over the examples (every method's scores are). Runs on the unpatched
model with the expert's soft prompt (and head).
"""
import contextlib

import torch
from tqdm.auto import tqdm

from doe_kernels.caller_state import evaluating, in_own_modes
from doe_kernels.expert import check_batch_size, check_count, numbered, prompted_attention
from doe_kernels.models import UnsupportedModelError, describe
from doe_kernels.patching import is_patched


METHODS = ("grad", "ig", "fisher")


def check_unpatched(model) -> None:
    """Raise ValueError when `model` is patched: the localize steps hook its own modules, which a
    patch replaces."""
    if is_patched(model):
        raise ValueError("attribution, reconstruction (fitted on the unpruned model) and "
                         "re-tuning run on the unpatched model: call doe_kernels.unpatch(model) "
                         "first (or run outside `plugged(...)`)")


def projection_points(model):
    """(per layer: (module whose input is the FFN activation, None in a mixture-of-experts layer;
    module whose input is the heads'), ModelSpec) of an unpatched supported model."""
    check_unpatched(model)
    _, layers, spec = describe(model)
    if spec.family == "bert":
        points = [(layer.output.dense, layer.attention.output.dense) for layer in layers]
    else:  # a mixture-of-experts block has no single down projection
        dense = spec.family == "llama"
        points = [(layer.mlp.down_proj if dense else None, layer.self_attn.o_proj)
                  for layer in layers]
    return points, spec


def hook_points(model):
    """`projection_points` of a BERT- or LLaMA-family model (the ones attribution scores)."""
    points, spec = projection_points(model)
    if spec.family not in ("bert", "llama"):
        raise UnsupportedModelError(
            f"attribution (localize) supports the BERT and LLaMA families, not {spec.family}; "
            "for mixture-of-experts models choose experts with doe_kernels.moe.select_experts")
    return points, spec


@contextlib.contextmanager
def _capture(modules, scale: float = 1.0):
    """Record each module's input (scaled by `scale`, in the graph) while the body runs."""
    captured = [None] * len(modules)

    def make(index):
        def hook(module, args):
            x = args[0] * scale if scale != 1.0 else args[0]
            captured[index] = x
            return (x,) + tuple(args[1:]) if scale != 1.0 else None
        return hook

    handles = [m.register_forward_pre_hook(make(i)) for i, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _token_mean(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, units) -> (batch, units): mean over each example's real tokens."""
    weights = token_mask.to(values.dtype)[..., None]
    return (values * weights).sum(1) / weights.sum(1).clamp_min(1)


def _unit_scores(activation, grad, token_mask, num_heads=None, absolute=True, fisher=False):
    product = activation.detach().double() * grad.double()  # float16's range would not hold it
    if num_heads is not None:  # heads: sum over each head's head_dim slice
        product = product.reshape(*product.shape[:2], num_heads, -1).sum(-1)
    if fisher:  # the squared gradient of the example's loss w.r.t. a mask multiplying the unit
        weights = token_mask.to(product.dtype)[..., None]
        return ((product * weights).sum(1) ** 2).sum(0)
    per_example = _token_mean(product, token_mask)
    return (per_example.abs() if absolute else per_example).sum(0)  # summed over the batch


@in_own_modes
def attribute(model, tokenizer, expert, data, method: str = "grad", steps: int = 5,
              num_examples: int = 256, batch_size: int = 16, absolute: bool = True,
              seed: int = 0, progress: bool = True):
    """(ffn_scores (layers, intermediate), head_scores (layers, heads)) as float64 CPU tensors.

    `expert` supplies the soft prompt, the head and the scoring (an `Expert`, mask ignored);
    `data` is a TaskData, of which `num_examples` (default 256) are drawn at random.
    `absolute` (default) averages the magnitude of each example's score: a unit whose removal
    moves the gold logit a lot either way is important. The signed average ranks units that
    push strongly *against* the gold label last, and pruning those first wrecks the model
    (measured in docs/localize.md). `absolute` does not apply to "fisher" (squares).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "ig" and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if len(data) == 0:
        raise ValueError("no examples to attribute on")
    check_batch_size(batch_size)
    check_count("num_examples", num_examples)
    check_unpatched(model)
    data = data.sample(num_examples, seed=seed) if len(data) > num_examples else data
    points, spec = hook_points(model)
    scorer = _Scorer(model, expert, method, steps, absolute, points, spec)
    gold_all = torch.tensor(data.label_ids)
    batches = list(range(0, len(data), batch_size))
    passes = len(batches) * (2 * spec.num_layers * steps if method == "ig" else 1)
    bar = tqdm(total=passes, desc=f"attribution ({method})", disable=not progress, leave=False)
    try:
        with evaluating(model), expert.plugged(model, prune=False), torch.enable_grad():
            for start in batches:
                with numbered(range(start, start + batch_size)):
                    ids, attention = expert.encode(tokenizer,
                                                   data.texts[start:start + batch_size])
                scorer.add_batch(ids, attention, gold_all[start:start + batch_size], bar)
    finally:
        bar.close()
    return (_finite(scorer.ffn / len(data), "neuron"),
            _finite(scorer.heads / len(data), "head"))


class _Scorer:
    """The scores summed over the batches seen so far (`ffn`, `heads`) and how one batch adds
    to them: one backward pass ("grad", "fisher") or 2 x layers x steps ("ig")."""

    def __init__(self, model, expert, method: str, steps: int, absolute: bool, points, spec):
        self.model, self.expert, self.method = model, expert, method
        self.steps, self.absolute, self.spec = steps, absolute, spec
        self.ffn_mods, self.head_mods = [p[0] for p in points], [p[1] for p in points]
        self.ffn = torch.zeros(spec.num_layers, spec.intermediate_size, dtype=torch.float64)
        self.heads = torch.zeros(spec.num_layers, spec.num_heads, dtype=torch.float64)
        self.prompt = expert.prompt.clone().requires_grad_(True)  # the whole forward in the graph

    def add_batch(self, ids, attention, gold, bar) -> None:
        token_mask = prompted_attention(attention, self.expert.num_virtual_tokens,
                                        self.expert.task_type)  # (as the activations are laid out)
        if self.method == "ig":
            self._integrated(ids, attention, gold, token_mask, bar)
            return
        layers, fisher = self.spec.num_layers, self.method == "fisher"
        captured, grads = self._run(self.ffn_mods + self.head_mods, ids, attention, gold)
        mask = token_mask.to(grads[0].device)
        for l in range(layers):
            self.ffn[l] += _unit_scores(captured[l], grads[l], mask, None, self.absolute,
                                        fisher).cpu()
            self.heads[l] += _unit_scores(captured[layers + l], grads[layers + l], mask,
                                          self.spec.num_heads, self.absolute, fisher).cpu()
        bar.update(1)

    def _run(self, modules, ids, attention, gold, scale: float = 1.0):
        """(the modules' inputs, the gradients of the batch's objective with respect to them)."""
        with _capture(modules, scale) as captured:
            logits = self.expert.logits(self.model, ids, attention, prompt=self.prompt)
        target = gold.to(logits.device)
        if self.method == "fisher":  # each example's loss (examples do not interact)
            objective = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        else:
            objective = logits.gather(1, target[:, None]).sum()
        return captured, torch.autograd.grad(objective, captured)

    def _integrated(self, ids, attention, gold, token_mask, bar) -> None:
        for table, modules, num_heads in ((self.ffn, self.ffn_mods, None),
                                          (self.heads, self.head_mods, self.spec.num_heads)):
            for l in range(self.spec.num_layers):
                total_grad, clean = 0.0, None
                for k in range(self.steps):
                    alpha = (k + 0.5) / self.steps
                    captured, grads = self._run([modules[l]], ids, attention, gold, alpha)
                    clean = captured[0].detach() / alpha
                    total_grad = total_grad + grads[0].double()  # (summed in float64)
                    bar.update(1)
                mask = token_mask.to(clean.device)
                table[l] += _unit_scores(clean, total_grad / self.steps, mask, num_heads,
                                         self.absolute).cpu()


def _finite(scores: torch.Tensor, unit: str) -> torch.Tensor:
    """`scores` if every one is a number; a NaN would rank first and make a meaningless mask."""
    bad = torch.isnan(scores)
    if bad.any():
        layer = int(bad.any(1).nonzero()[0])
        raise ValueError(f"attribution gave NaN {unit} scores ({int(bad.sum())} of "
                         f"{scores.numel()}, first in layer {layer}): the model, the soft prompt "
                         "or the head computes non-finite values on the task's data")
    return scores

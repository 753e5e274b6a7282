"""Property-based test of the patch life cycle (hypothesis): random masks, valid and invalid, and
random sequences of patch, swap, plugged, unpatch and patches that fail part-way. After every
step the model's outputs equal the masked-dense reference of the expert plugged (or the dense
model), and at the end the unpatched model is bitwise the original."""
import copy
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import doe_kernels as dk
import doe_kernels.models.base as base
from model_utils import build, inputs, masked_dense, output_of, snapshot, state_dict_equal

BACKENDS = ["auto"] + dk.available_backends("cpu")
LAYERS, NEURONS, HEADS = 3, {"bert": 72, "llama": 80}, {"bert": 4, "llama": 6}


def kept_lists(size: int):
    """Index lists over `size` units: empty, full, or a random subset."""
    return st.one_of(st.just([]), st.just(list(range(size))),
                     st.sets(st.integers(0, size - 1), max_size=size).map(sorted))


def valid_masks(family: str):
    layer_tables = lambda size: st.dictionaries(st.integers(0, LAYERS - 1), kept_lists(size),  # noqa: E731
                                                max_size=LAYERS)
    return st.builds(dk.ExpertMask, ffn=layer_tables(NEURONS[family]),
                     heads=layer_tables(HEADS[family]))


def invalid_masks(family: str):
    """Masks that construct but do not fit the model: an index out of range, a layer past the
    last, a record of another model's sizes."""
    size, heads = NEURONS[family], HEADS[family]
    return st.one_of(
        st.integers(size, 10 ** 9).map(lambda i: dk.ExpertMask(ffn={1: [0, i]})),
        st.integers(heads, 64).map(lambda i: dk.ExpertMask(heads={2: [i]})),
        st.integers(LAYERS, 40).map(lambda l: dk.ExpertMask(ffn={l: [0]})),
        st.integers(1, 9).map(lambda n: dk.ExpertMask(spec={"num_layers": LAYERS + n})),
    )


def junk_tables():
    """Tables the ExpertMask constructor must refuse."""
    return st.one_of(
        st.lists(st.integers(0, 50), min_size=2).filter(lambda l: l != sorted(set(l)))
        .map(lambda l: {0: l}),
        st.integers(-50, -1).map(lambda i: {0: [i]}),
        st.floats(0.1, 9.5).map(lambda f: {0: [f]}),
        st.text(min_size=1, max_size=3).map(lambda key: {key: [0]}),
        st.just({0: [[0, 1]]}),
    )


class PatchLifeCycle(RuleBasedStateMachine):
    family = "llama"

    def __init__(self):
        super().__init__()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: one thread avoids thread-sync stalls
        self.model = build(self.family)
        self.dense = copy.deepcopy(self.model)
        self.original = snapshot(self.model)
        self.ids, self.attention = inputs(self.family)
        self.mask = None  # the expert plugged, None when unpatched
        self.references = {}

    def output(self):
        with torch.no_grad():
            return output_of(self.model, self.ids, self.attention)

    def reference(self, mask):
        if id(mask) not in self.references:
            model = self.dense if mask is None else masked_dense(self.dense, mask)
            with torch.no_grad():
                self.references[id(mask)] = (mask, output_of(model, self.ids, self.attention))
        return self.references[id(mask)][1]

    def check_output(self, mask):
        expected = self.reference(mask)
        assert torch.allclose(self.output(), expected, atol=1e-4, rtol=1e-4)

    @rule(data=st.data(), backend=st.sampled_from(BACKENDS))
    def patch_or_swap(self, data, backend):
        mask = data.draw(valid_masks(self.family))
        dk.patch(self.model, mask, backend)
        self.mask = mask

    @rule(data=st.data())
    def patch_with_a_mask_that_does_not_fit(self, data):
        with pytest.raises((ValueError, TypeError)):
            dk.patch(self.model, data.draw(invalid_masks(self.family)))

    @rule(table=junk_tables())
    def construct_a_bad_mask(self, table):
        with pytest.raises((ValueError, TypeError)):
            dk.ExpertMask(ffn=table)

    @rule(data=st.data(), fail_at=st.integers(1, 2 * LAYERS))
    def patch_that_fails_part_way(self, data, fail_at):
        """A fresh patch fails while converting a weight; a swap fails while setting a layer."""
        mask, calls = data.draw(valid_masks(self.family)), []
        target = "set" if dk.is_patched(self.model) else "input_major"
        owner = base.LayerPatch if target == "set" else base
        real = getattr(owner, target)

        def failing(*args):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("simulated failure")
            return real(*args)

        with mock.patch.object(owner, target, failing):
            try:
                dk.patch(self.model, mask)
            except RuntimeError as error:
                assert "simulated" in str(error)
                return
        self.mask = mask  # fail_at was past the last call: the patch went through

    @rule(data=st.data())
    def plugged(self, data):
        mask = data.draw(valid_masks(self.family))
        with dk.plugged(self.model, mask):
            self.check_output(mask)
        assert dk.current_mask(self.model) is self.mask

    @precondition(lambda self: self.mask is not None)
    @rule()
    def unpatch(self):
        dk.unpatch(self.model)
        self.mask = None

    @precondition(lambda self: self.mask is None)
    @rule()
    def unpatch_an_unpatched_model(self):
        with pytest.raises(ValueError, match="not patched"):
            dk.unpatch(self.model)

    @invariant()
    def outputs_equal_the_masked_dense_reference(self):
        assert dk.current_mask(self.model) is self.mask
        self.check_output(self.mask)

    def teardown(self):
        torch.set_num_threads(self.threads)
        if dk.is_patched(self.model):
            dk.unpatch(self.model)
        assert state_dict_equal(snapshot(self.model), self.original)


class BertLifeCycle(PatchLifeCycle):
    family = "bert"


SETTINGS = settings(max_examples=40, stateful_step_count=10, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestLlamaPatchLifeCycle = PatchLifeCycle.TestCase
TestLlamaPatchLifeCycle.settings = SETTINGS
TestBertPatchLifeCycle = BertLifeCycle.TestCase
TestBertPatchLifeCycle.settings = SETTINGS

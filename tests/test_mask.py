"""ExpertMask: construction checks, random and score-based masks, summary, files, validation."""
import json

import pytest
import torch

import doe_kernels as dk
from model_utils import build, snapshot, state_dict_equal


def test_constructor_normalises_and_checks_indices():
    mask = dk.ExpertMask(ffn={1: [0, 4, 9]}, heads={0: torch.tensor([2], dtype=torch.int32)})
    assert mask.ffn[1].dtype == torch.int64 and mask.ffn[1].tolist() == [0, 4, 9]
    assert mask.heads[0].tolist() == [2]
    for bad, error, match in [
        ({0: [3, 1]}, ValueError, r"ffn\[0\] must be sorted and unique: unsorted index 1"),
        ({0: [1, 1]}, ValueError, r"ffn\[0\] must be sorted and unique: duplicate index 1"),
        ({0: [-1, 2]}, ValueError, r"ffn\[0\] holds a negative index -1"),
        ({0: [[1, 2]]}, ValueError, r"ffn\[0\] must be 1-D"),
        ({0: [0.5]}, TypeError, r"ffn\[0\] must hold integer indices"),
        ({0: torch.tensor([1, 2], dtype=torch.complex128)}, TypeError, "complex128"),
        ({0: torch.tensor([1, 2], dtype=torch.complex64)}, TypeError, "complex64"),
        ({0: torch.tensor([True])}, TypeError, "torch.bool"),
        ({"0": [1]}, TypeError, "keys must be layer numbers"),
        ({0: None}, TypeError, r"ffn\[0\] must be a list or tensor of integer indices, got "
                               "NoneType"),
        ({0: "12"}, TypeError, "must be a list or tensor of integer indices, got str"),
        ({0: [True, 2]}, TypeError, r"must hold integer indices, got a bool in \[True, 2\]"),
        ({0: torch.tensor([2 ** 63], dtype=torch.uint64)}, ValueError,
         r"holds an index past 2\*\*63 - 1"),
        ({0: [1, 2 ** 63]}, ValueError, r"holds an index past 2\*\*63 - 1"),
    ]:
        with pytest.raises(error, match=match):
            dk.ExpertMask(ffn=bad)


def test_mask_is_a_copy_and_read_only():
    kept = torch.tensor([1, 2])
    mask = dk.ExpertMask(ffn={0: kept})
    kept[0] = 7
    assert mask.ffn[0].tolist() == [1, 2]
    sized = dk.ExpertMask.random(build("bert"), 0.5)
    sized.spec["num_layers"] = 99  # a copy: the mask's recorded sizes stay
    assert sized.spec["num_layers"] == 3
    with pytest.raises(TypeError):
        mask.ffn[1] = torch.tensor([0])
    # nor are its tables or sizes replaced (a patched model's cached plans would then run the
    # old tables under the new ones' name)
    other = dk.ExpertMask(ffn={0: [3]})
    for name, value in (("ffn", other.ffn), ("heads", other.heads), ("_spec", None)):
        with pytest.raises(AttributeError, match=f"cannot be changed \\(setting '{name}'"):
            setattr(mask, name, value)
    with pytest.raises(AttributeError, match="cannot be changed"):
        del mask.ffn
    assert mask.ffn[0].tolist() == [1, 2]
    import copy
    import pickle
    assert copy.deepcopy(mask) == mask and pickle.loads(pickle.dumps(mask)) == mask


def test_empty_lists_keep_nothing():
    for empty in ([], (), torch.empty(0, dtype=torch.int64)):
        mask = dk.ExpertMask(ffn={0: empty}, heads={1: empty})
        assert mask.ffn[0].dtype == torch.int64 and mask.ffn[0].numel() == 0
        assert mask.heads[1].numel() == 0


def test_index_tensors_cannot_be_changed_after_patching():
    """Editing a looked-up index tensor in place changes neither the mask nor a patched model
    (a stale validation once let a middle index read out of bounds)."""
    from model_utils import inputs, masked_dense, output_of

    model = build("llama")
    mask = dk.ExpertMask.random(model, ffn_keep=0.5, seed=1)
    kept = mask.ffn[1].clone()
    ids, attention = inputs("llama")
    with torch.no_grad():
        reference = output_of(masked_dense(model, mask), ids, attention)
        dk.patch(model, mask)
        mask.ffn[1][kept.numel() // 2] = 10 ** 9
        mask.ffn.get(1)[0] = -5
        assert torch.equal(mask.ffn[1], kept)
        dk.patch(model, mask)  # a second patch uses the validated lists
        assert torch.allclose(output_of(model, ids, attention), reference, atol=1e-5)
    dk.unpatch(model)


def test_masks_deep_copy_and_pickle():
    import copy
    import pickle

    mask = dk.ExpertMask.random(build("bert"), ffn_keep=0.3, heads_keep=0.5, seed=2)
    dk.patch(build("bert"), mask)  # a mask in use copies and pickles too
    for clone in (copy.deepcopy(mask), pickle.loads(pickle.dumps(mask))):
        assert clone == mask and clone is not mask
        assert repr(clone) == repr(mask)


def test_nan_scores_are_refused():
    scores = torch.rand(2, 10)
    scores[1, 3] = float("nan")
    for scope in ("layer", "global"):
        with pytest.raises(ValueError, match="NaN in layer 1"):
            dk.ExpertMask.from_scores(scores, scope=scope)
        with pytest.raises(ValueError, match="NaN in layer 0"):
            dk.ExpertMask.from_scores(None, torch.full((2, 4), float("nan")), scope=scope)


def test_random_keeps_the_fraction_in_every_layer():
    model = build("llama")  # 3 layers, 80 neurons, 6 heads
    mask = dk.ExpertMask.random(model, ffn_keep=0.25, heads_keep=0.5, seed=3)
    assert [mask.ffn[l].numel() for l in range(3)] == [20, 20, 20]
    assert [mask.heads[l].numel() for l in range(3)] == [3, 3, 3]
    assert mask == dk.ExpertMask.random(model, ffn_keep=0.25, heads_keep=0.5, seed=3)
    assert mask != dk.ExpertMask.random(model, ffn_keep=0.25, heads_keep=0.5, seed=4)
    summary = mask.summary()
    assert summary["ffn_pruning_rate"] == pytest.approx(0.75)
    assert summary["head_pruning_rate"] == pytest.approx(0.5)
    assert "75.0% pruned" in repr(mask)
    with pytest.raises(ValueError, match="ffn_keep must be in"):
        dk.ExpertMask.random(model, ffn_keep=1.5)


def test_from_scores_per_layer_and_global():
    scores = torch.tensor([[0.0, 5.0, 1.0, 4.0], [9.0, 8.0, 7.0, 6.0]])
    per_layer = dk.ExpertMask.from_scores(scores, ffn_keep=0.5, scope="layer")
    assert per_layer.ffn[0].tolist() == [1, 3] and per_layer.ffn[1].tolist() == [0, 1]
    overall = dk.ExpertMask.from_scores(scores, ffn_keep=0.5, scope="global")
    assert overall.ffn[0].tolist() == [] and overall.ffn[1].tolist() == [0, 1, 2, 3]
    heads = dk.ExpertMask.from_scores(head_scores=[[1.0, 3.0, 2.0]], heads_keep=2 / 3)
    assert heads.heads[0].tolist() == [1, 2] and not heads.ffn
    with pytest.raises(ValueError, match="scope must be"):
        dk.ExpertMask.from_scores(scores, scope="model")


def test_from_scores_balanced_over_shards():
    # layer 0: its top half all lies in shard 0
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.0],
                           [9.5, 9.4, 9.3, 9.2, 9.1, 0.5, 9.0, 0.4]])
    per_layer = dk.ExpertMask.from_scores(scores, ffn_keep=0.5, shards=2)
    assert per_layer.ffn[0].tolist() == [0, 1, 5, 6]  # two from each shard, each shard's top
    assert per_layer.ffn[1].tolist() == [0, 1, 4, 6]
    overall = dk.ExpertMask.from_scores(scores, ffn_keep=9 / 16, scope="global", shards=2)
    assert [overall.ffn[l].numel() for l in (0, 1)] == [3, 6]  # the global budget per layer
    # 3 over 2 shards: the extra unit goes to the shard whose second-best scores higher (4.0 in
    # shard 0 against 0.2 in shard 1)
    assert overall.ffn[0].tolist() == [0, 1, 6]
    assert overall.ffn[1].tolist() == [0, 1, 2, 4, 5, 6]
    assert dk.ExpertMask.from_scores(scores, ffn_keep=0.5, shards=1) == dk.ExpertMask.from_scores(
        scores, ffn_keep=0.5)
    full = dk.ExpertMask.from_scores(scores, ffn_keep=1.0, shards=4)
    assert all(full.ffn[l].tolist() == list(range(8)) for l in (0, 1))
    assert all(row.numel() == 0 for row in dk.ExpertMask.from_scores(scores, ffn_keep=0.0,
                                                                     shards=2).ffn.values())


def _sizes(family="llama", kv_heads=2):
    return dict(family=family, model_type="x", num_layers=3, hidden_size=16,
                intermediate_size=12, num_heads=4, num_kv_heads=kv_heads, head_dim=4)


def test_unit_weights_count_the_projections_a_unit_holds():
    from doe_kernels.mask import unit_weights

    # SwiGLU neuron: up, gate and down (3 x 16); a head: q and o (2 x 16 x 4), plus half of a
    # key and value head (2 query heads per kv head)
    assert unit_weights(_sizes()) == (48, 2 * 64 + 64)
    assert unit_weights(_sizes("bert", 4)) == (32, 4 * 64)  # q, k, v, o
    with pytest.raises(ValueError, match=r"spec lacks \['family', 'hidden_size'"):
        unit_weights(dict(num_heads=4, num_kv_heads=4, head_dim=4))
    with pytest.raises(ValueError, match=r"needs the model's sizes \(a dict.*got NoneType"):
        dk.ExpertMask.from_scores_jointly(torch.rand(2, 8), torch.rand(2, 4), 0.5, None)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_a_masks_spec_serves_the_joint_ranking(name):
    """A mask's recorded spec (the model_type, not the family) is a spec from_scores_jointly
    takes: the same ranking as the model's own sizes give."""
    from doe_kernels.models import spec_of

    model = build(name)
    sizes = spec_of(model).as_dict()
    recorded = dk.ExpertMask.random(model, 0.5, 0.5).spec
    assert "family" not in recorded
    ffn = torch.rand(sizes["num_layers"], sizes["intermediate_size"])
    heads = torch.rand(sizes["num_layers"], sizes["num_heads"])
    got = dk.ExpertMask.from_scores_jointly(ffn, heads, 0.4, recorded)
    want = dk.ExpertMask.from_scores_jointly(ffn, heads, 0.4, sizes)
    assert got.ffn == want.ffn and got.heads == want.heads
    with pytest.raises(ValueError, match=r"spec lacks \['family'\]"):  # (a type of no family)
        dk.ExpertMask.from_scores_jointly(ffn, heads, 0.4, dict(recorded, model_type="gpt2"))


def test_scores_by_layer_in_a_dict_are_refused_by_name():
    """A dict of scores (a mask's tables are dicts by layer) read its keys as rows."""
    with pytest.raises(TypeError, match="scores for ffn_scores are a .layers, units. tensor or a "
                                        "list of 1-D rows, one per layer from the first, not a dict"):
        dk.ExpertMask.from_scores({0: torch.rand(8)})
    with pytest.raises(TypeError, match="scores for head_scores are"):
        dk.ExpertMask.from_scores_jointly(torch.rand(2, 8), {0: torch.rand(4)}, 0.5,
                                          _sizes())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_joint_ranking_keeps_the_best_score_per_weight_within_the_budget(seed, scope):
    from doe_kernels.mask import unit_weights

    gen = torch.Generator().manual_seed(seed)
    sizes = _sizes(kv_heads=(1, 2, 4)[seed % 3])
    ffn, heads = torch.rand(3, 12, generator=gen), torch.rand(3, 4, generator=gen) * 6
    keep = float(torch.rand((), generator=gen))
    mask = dk.ExpertMask.from_scores_jointly(ffn, heads, keep, sizes, scope)
    neuron, head = unit_weights(sizes)
    groups = [[0, 1, 2]] if scope == "global" else [[0], [1], [2]]
    for layers in groups:  # brute force: walk each group's units by score per weight
        units = sorted([(float(ffn[l, i]) / neuron, neuron, "ffn", l, i)
                        for l in layers for i in range(12)] +
                       [(float(heads[l, h]) / head, head, "heads", l, h)
                        for l in layers for h in range(4)], key=lambda u: -u[0])
        budget = keep * (len(layers) * (12 * neuron + 4 * head))
        spent, kept = 0, set()
        for _, cost, kind, l, i in units:
            if spent + cost > budget:
                break
            spent += cost
            kept.add((kind, l, i))
        got = {(kind, l, int(i)) for kind in ("ffn", "heads") for l in layers
               for i in getattr(mask, kind)[l]}
        assert got == kept
    assert mask.spec["num_kv_heads"] == sizes["num_kv_heads"]


def test_joint_ranking_ends_and_checks():
    ffn, heads = torch.rand(3, 12), torch.rand(3, 4)
    full = dk.ExpertMask.from_scores_jointly(ffn, heads, 1.0, _sizes())
    assert all(full.ffn[l].numel() == 12 and full.heads[l].numel() == 4 for l in range(3))
    empty = dk.ExpertMask.from_scores_jointly(ffn, heads, 0.0, _sizes(), "layer")
    assert all(empty.ffn[l].numel() == 0 and empty.heads[l].numel() == 0 for l in range(3))
    # shards: the counts of the joint ranking, each layer's kept units balanced over the shards
    sharded = dk.ExpertMask.from_scores_jointly(ffn, heads, 0.5, _sizes(), shards=2)
    plain = dk.ExpertMask.from_scores_jointly(ffn, heads, 0.5, _sizes())
    for kind in ("ffn", "heads"):
        for l in range(3):
            kept, size = getattr(sharded, kind)[l], (12, 4)[kind == "heads"]
            assert kept.numel() == getattr(plain, kind)[l].numel()
            assert abs(int((kept < size // 2).sum()) - int((kept >= size // 2).sum())) <= 1
    for args, match in [((ffn, heads, 1.5, _sizes()), r"keep must be in \[0, 1\]"),
                        ((ffn, heads[:2], 0.5, _sizes()), "ffn_scores cover 3 layers"),
                        ((ffn, heads * float("nan"), 0.5, _sizes()), "head_scores hold NaN"),
                        ((ffn, heads, 0.5, _sizes(), "model"), "scope must be")]:
        with pytest.raises(ValueError, match=match):
            dk.ExpertMask.from_scores_jointly(*args)
    with pytest.raises(ValueError, match="do not split into 3 equal shards"):
        dk.ExpertMask.from_scores_jointly(ffn, heads, 0.5, _sizes(), shards=3)


def test_unit_weights_count_a_neuron_in_every_expert():
    """A mixture-of-experts mask's neuron index removes that neuron from every expert: a neuron
    weighs num_experts times a dense one's (the joint ranking kept 0.815 of a Mixtral's weights
    at keep=0.5, counting one expert's)."""
    from doe_kernels.mask import unit_weights

    moe = dict(_sizes(), family="mixtral", num_experts=8, top_k=2)
    assert unit_weights(moe) == (8 * 48, 2 * 64 + 64)
    assert unit_weights(dict(_sizes(), num_experts=0)) == unit_weights(_sizes()) == (48, 192)
    ffn, heads = torch.rand(3, 12), torch.rand(3, 4)
    for keep in (0.25, 0.5, 0.8):
        mask = dk.ExpertMask.from_scores_jointly(ffn, heads, keep, moe)
        kept = sum(mask.ffn[l].numel() * 8 * 48 + mask.heads[l].numel() * 192 for l in range(3))
        total = 3 * (12 * 8 * 48 + 4 * 192)
        assert keep - 192 / total <= kept / total <= keep  # within one unit of the budget


def test_scores_must_fit_the_spec_given():
    """Scores of another model (fewer layers, neurons or heads than the spec given) made a mask
    recording the spec silently: layers left out kept everything, short rows never kept the
    missing units. They are refused, naming the mismatch; without a spec any shape goes."""
    sizes = _sizes()  # 3 layers, 12 neurons, 4 heads
    ffn, heads = torch.rand(3, 12), torch.rand(3, 4)
    short = list(ffn[:2]) + [ffn[2, :10]]
    for bad_ffn, bad_heads, match in [
            (ffn[:2], heads[:2], r"ffn_scores cover 2 layers, but the model \(spec\) has 3"),
            (ffn[:, :8], heads, r"ffn_scores: layer 0 has 8 scores, but the model \(spec\) "
                                r"has 12 neurons per layer \(intermediate_size\)"),
            (short, heads, r"ffn_scores: layer 2 has 10 scores"),
            (ffn, heads[:, :3], r"head_scores: layer 0 has 3 scores, but the model \(spec\) "
                                r"has 4 heads per layer \(num_heads\)")]:
        with pytest.raises(ValueError, match=match):
            dk.ExpertMask.from_scores(bad_ffn, bad_heads, 0.5, 0.5, spec=sizes)
        with pytest.raises(ValueError, match=match):
            dk.ExpertMask.from_scores_jointly(bad_ffn, bad_heads, 0.5, sizes)
    with pytest.raises(ValueError, match="head_scores cover 2 layers"):
        dk.ExpertMask.from_scores(None, heads[:2], spec=sizes)
    assert dk.ExpertMask.from_scores(ffn, heads, 0.5, 0.5, spec=sizes).spec["num_layers"] == 3
    assert len(dk.ExpertMask.from_scores(ffn[:2, :8], heads[:2], 0.5).ffn) == 2


@pytest.mark.parametrize("seed", range(5))
def test_balanced_shards_keep_each_shards_top_and_even_counts(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 24, generator=gen)
    keep = float(torch.rand((), generator=gen))
    mask = dk.ExpertMask.from_scores(scores, ffn_keep=keep, scope="global", shards=3)
    plain = dk.ExpertMask.from_scores(scores, ffn_keep=keep, scope="global")
    for layer in range(3):
        kept = mask.ffn[layer]
        assert kept.numel() == plain.ffn[layer].numel()
        counts = torch.bincount(kept // 8, minlength=3)
        assert counts.max() - counts.min() <= 1
        for shard in range(3):  # each shard keeps its own top-scored units
            row = scores[layer, 8 * shard:8 * shard + 8]
            mine = kept[(kept // 8) == shard] - 8 * shard
            assert set(mine.tolist()) == set(row.topk(int(counts[shard])).indices.tolist())


def test_balanced_shards_refuse_bad_values():
    scores = torch.zeros(2, 9)
    with pytest.raises(ValueError, match="do not split into 2 equal shards"):
        dk.ExpertMask.from_scores(scores, shards=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="shards must be an int"):
            dk.ExpertMask.from_scores(scores, shards=bad)


def test_save_and_load_round_trip(tmp_path):
    model = build("bert")
    mask = dk.ExpertMask.random(model, ffn_keep=0.3, heads_keep=0.5, seed=1)
    path = tmp_path / "expert.safetensors"
    mask.save(path)
    loaded = dk.ExpertMask.load(path)
    assert loaded == mask and loaded.spec["model_type"] == "bert"
    loaded.validate(model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a doe_kernels ExpertMask file"):
        dk.ExpertMask.load(tmp_path / "other.safetensors")


def _mask_file(path, tensors, spec="null", kind="ExpertMask"):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"doe_kernels": kind, "spec": spec})
    return path


@pytest.mark.parametrize("write,match", [
    (lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    (lambda p: p.write_text("ffn.0 = [1, 2]"), "not a readable safetensors file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "file not found"),
    (lambda p: _mask_file(p, {"ffn.0": torch.tensor([1])}, kind="Expert"), "not a doe_kernels"),
    (lambda p: _mask_file(p, {"ffn.1": torch.tensor([1]), "ffn.01": torch.tensor([2])}),
     "unknown mask tensor 'ffn.01'"),
    (lambda p: _mask_file(p, {"ffn": torch.tensor([1])}), "unknown mask tensor 'ffn'"),
    (lambda p: _mask_file(p, {"ffn.0.1": torch.tensor([1])}), "unknown mask tensor"),
    (lambda p: _mask_file(p, {"ffn.0": torch.tensor([2, 1])}), "sorted and unique"),
    (lambda p: _mask_file(p, {"ffn.0": torch.tensor([0.5])}), "integer indices"),
    (lambda p: _mask_file(p, {"skip.0": torch.tensor([float("nan")])}), "threshold"),
    (lambda p: _mask_file(p, {}, spec="[1, 2]"), "spec must be a dict"),
    (lambda p: _mask_file(p, {}, spec="{bad json"), "Expecting"),
    (lambda p: _mask_file(p, {}, spec='{"num_layers": -3}'), "not a valid model size"),
    (lambda p: _mask_file(p, {}, spec='{"num_heads": 0}'), "not a valid model size"),
    (lambda p: _mask_file(p, {}, spec="[" * 100000 + "]" * 100000), "nested too deeply"),
    (lambda p: _mask_file(p, {"ffn.0": torch.arange(100)},
                          spec='{"num_layers": 2, "intermediate_size": 4}'),
     r"ffn\[0\] holds index 4, out of range for 4 neurons"),
    (lambda p: _mask_file(p, {"heads.7": torch.tensor([0])}, spec='{"num_layers": 2}'),
     "heads names layer 7, but the model has 2 layers"),
    (lambda p: _mask_file(p, {"skip.0": torch.tensor([0.5]).to(torch.float8_e4m3fn)}),
     "must be a real number"),
    (lambda p: _mask_file(p, {"ffn_scales.0": torch.ones(2).to(torch.float8_e4m3fn)}),
     r"ffn_scales\[0\] must hold floating-point values \(float16, bfloat16"),
])
def test_bad_mask_files_raise_one_error_naming_the_file(tmp_path, write, match):
    from doe_kernels.files import FileFormatError

    path = tmp_path / "mask.safetensors"
    write(path)
    with pytest.raises(FileFormatError, match=match) as error:
        dk.ExpertMask.load(path)
    assert str(path) in str(error.value)


def test_a_mask_with_an_empty_or_partial_spec_still_prints(tmp_path):
    loaded = dk.ExpertMask.load(_mask_file(tmp_path / "m.safetensors", {"ffn.0": torch.tensor([1])},
                                           spec="{}"))
    assert "ffn layers=[0]" in repr(loaded)
    assert "ffn layers=[]" in repr(dk.ExpertMask(spec={"num_experts": 4}))
    with pytest.raises(ValueError, match="records no model sizes"):
        loaded.summary()


def test_a_mask_is_checked_against_the_sizes_it_records():
    """Indices and layers beyond the mask's own spec are refused when it is made, so its repr and
    summary never report more kept units than the model has."""
    spec = {"num_layers": 1, "intermediate_size": 4, "num_heads": 2}
    with pytest.raises(ValueError, match=r"ffn\[0\] holds index 4, out of range for 4"):
        dk.ExpertMask({0: list(range(0, 40, 4))}, spec=spec)
    with pytest.raises(ValueError, match="ffn names layer 5, but the model has 1 layers"):
        dk.ExpertMask({0: [1], 5: [1]}, spec=spec)
    with pytest.raises(ValueError, match=r"spec\['num_heads'\] = 0 is not a valid model size"):
        dk.ExpertMask(spec={**spec, "num_heads": 0})
    for bad in (True, 0.5 + 7j, torch.tensor(0.5, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=r"skip\[0\] must be a real number"):
            dk.ExpertMask(skip={0: bad})
    assert dk.ExpertMask({0: [1, 3]}, spec=spec).summary()["neurons_kept"] == 2


def _tiny_llama(hidden=32, head_dim=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    extra = {} if head_dim is None else {"head_dim": head_dim}
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, vocab_size=100, **extra)).eval()


def test_a_mask_records_the_hidden_size_head_dim_and_top_k():
    """A mask recorded no hidden size, head_dim or top-k: one made for a model of another hidden
    size (or head_dim, or a Mixtral of another top-k) patched in. It records them now, and
    patching refuses a model that differs in one before anything changes."""
    from moe_utils import mixtral

    mask = dk.ExpertMask.random(_tiny_llama(), 0.5, 0.5)
    assert {k: mask.spec[k] for k in ("hidden_size", "head_dim", "top_k")} == \
        dict(hidden_size=32, head_dim=8, top_k=0)
    for model, match in [(_tiny_llama(64), "hidden_size=32, but the model has hidden_size=64"),
                         (_tiny_llama(32, head_dim=16), "head_dim=8, but the model has "
                                                        "head_dim=16")]:
        _refused_unchanged(model, mask, match)
    moe = dk.ExpertMask.random(mixtral(num_experts=4, top_k=2), 1.0, 1.0, experts_keep=0.5)
    _refused_unchanged(mixtral(num_experts=4, top_k=1, seed=1), moe,
                       "top_k=2, but the model has top_k=1")


def _refused_unchanged(model, mask, match):
    """dk.patch(model, mask) raises ValueError matching `match`, and the model is as it was: not
    patched, the same modules, the same state_dict."""
    before, modules = snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        dk.patch(model, mask)
    assert not dk.is_patched(model)
    assert [type(m) for m in model.modules()] == modules
    assert state_dict_equal(before, snapshot(model))


def test_a_mask_file_recording_fewer_sizes_still_loads_and_patches(tmp_path):
    """Mask files of older versions record no hidden_size, head_dim or top_k: they load and
    patch, checked on the sizes they record; a file of this version round-trips all of them."""
    model = _tiny_llama()
    mask = dk.ExpertMask.random(model, 0.5, 0.5)
    old = {k: v for k, v in mask.spec.items() if k not in ("hidden_size", "head_dim", "top_k")}
    path = _mask_file(tmp_path / "old.safetensors", mask.tensors(), spec=json.dumps(old))
    loaded = dk.ExpertMask.load(path)
    assert loaded.spec == old and loaded.ffn == mask.ffn
    with dk.plugged(model, loaded):
        pass
    with pytest.raises(ValueError, match="num_layers=2, but the model has num_layers=3"):
        loaded.validate(build("llama"))
    mask.save(tmp_path / "new.safetensors")
    assert dk.ExpertMask.load(tmp_path / "new.safetensors").spec == mask.spec
    assert dk.ExpertMask.from_tensors(mask.tensors(), mask.spec) == mask
    with pytest.raises(ValueError, match=r"spec\['head_dim'\] = 0 is not a valid model size"):
        dk.ExpertMask(spec={**old, "head_dim": 0})


def test_validate_names_the_first_bad_layer_and_index():
    model = build("bert")  # 3 layers, 72 neurons, 4 heads
    with pytest.raises(ValueError, match=r"ffn\[1\] holds index 72, out of range for 72 neurons"):
        dk.ExpertMask(ffn={0: [1], 1: [5, 72, 90]}).validate(model)
    with pytest.raises(ValueError, match="made for a model with intermediate_size=80"):
        dk.ExpertMask(spec=dict(dk.ExpertMask.random(build("bert")).spec,
                                intermediate_size=80)).validate(model)
    assert dk.ExpertMask().summary(model)["ffn_pruning_rate"] == 0


def test_scores_must_be_one_row_per_layer():
    """One layer's scores alone would read as one unit per layer (all pruned at 50%)."""
    with pytest.raises(ValueError, match=r"one row per layer .* got shape \(4,\)"):
        dk.ExpertMask.from_scores(torch.tensor([0.1, 0.9, 0.5, 0.3]), ffn_keep=0.5)
    with pytest.raises(ValueError, match=r"layer 1 has shape \(2, 2\)"):
        dk.ExpertMask.from_scores([torch.rand(4), torch.rand(2, 2)], ffn_keep=0.5)
    assert dk.ExpertMask.from_scores([torch.rand(4), torch.rand(4)], ffn_keep=0.5).ffn[1].numel() == 2


def test_masks_compare_by_value_table_by_table():
    spec = dict(num_layers=2, intermediate_size=8, num_heads=4)
    mask = dk.ExpertMask({0: torch.tensor([]), 1: [1, 2]}, {0: [0]}, spec=spec,
                         skip={}, ffn_bias=None)
    again = dk.ExpertMask({0: [], 1: torch.tensor([1, 2], dtype=torch.int32)}, {0: [0]},
                          spec=spec)
    assert mask.ffn[0].dtype == torch.int64 and mask.ffn[0].numel() == 0  # an empty tensor
    assert mask.ffn == again.ffn and mask.heads == {0: torch.tensor([0])} and mask == again
    assert mask.ffn != {0: torch.tensor([]), 1: torch.tensor([1, 2])}  # float: another dtype
    assert mask != again.replace(heads={0: [1]})
    with pytest.raises(TypeError, match="unhashable"):
        hash(mask.ffn)


def test_equal_masks_hash_alike(tmp_path):
    """Masks hash by value, as they compare (they hashed by identity: a set kept two equal masks,
    and a dict missed an equal one); a pickled mask hashes as the process it is loaded in
    hashes it (str hashing is salted per process)."""
    import pickle
    import subprocess
    import sys

    spec = dict(num_layers=2, intermediate_size=8, num_heads=4)
    mask = dk.ExpertMask({1: [1, 2]}, {0: [0]}, spec=spec, ffn_bias={1: [0.0, 1.0]})
    again = dk.ExpertMask({1: torch.tensor([1, 2], dtype=torch.int32)}, {0: [0]}, spec=spec,
                          ffn_bias={1: [-0.0, 1.0]})  # -0.0 == 0.0, as torch.equal has it
    assert mask == again and hash(mask) == hash(again) and len({mask, again}) == 1
    assert {mask: "polarity"}[again] == "polarity"
    assert hash(mask.replace(skip={0: 0.5})) != hash(mask)  # (not guaranteed, but expected)
    (tmp_path / "mask.pkl").write_bytes(pickle.dumps(mask))
    child = ("import pickle, sys, torch, doe_kernels as dk; "
             f"loaded = pickle.loads(open({str(tmp_path / 'mask.pkl')!r}, 'rb').read()); "
             f"fresh = dk.ExpertMask({{1: [1, 2]}}, {{0: [0]}}, spec={spec!r}, "
             "ffn_bias={1: [0.0, 1.0]}); "
             "sys.exit(0 if hash(loaded) == hash(fresh) and loaded == fresh else 1)")
    assert subprocess.run([sys.executable, "-c", child], env=dict(
        __import__("os").environ, PYTHONHASHSEED="7")).returncode == 0


@pytest.mark.parametrize("table, match", [
    (dict(attn_bias={0: None}), r"attn_bias\[0\] must be a list or tensor of floating-point"),
    (dict(skip={0: "0.5"}), r"skip\[0\] must be a real number"),
    (dict(attn_bias={5: [0.0] * 4}), "attn_bias names layer 5, but the model has 2 layers"),
    (dict(skip={5: 0.1}), "skip names layer 5, but the model has 2 layers")])
def test_bad_tables_are_refused_naming_table_and_layer(table, match):
    spec = dict(num_layers=2, intermediate_size=8, num_heads=4)
    with pytest.raises((TypeError, ValueError), match=match):
        dk.ExpertMask(spec=spec, **table)


def _unchanged_after(call, error, match, model=None, mask=None, *arguments):
    """`call()` raises `error` matching `match`, and the model (its modules and state_dict, not
    patched), the mask and the arguments given are as they were."""
    import copy

    before = None if model is None else (snapshot(model), [type(m) for m in model.modules()])
    kept_mask, kept_args = copy.deepcopy(mask), copy.deepcopy(arguments)
    with pytest.raises(error, match=match) as raised:
        call()
    if model is not None:
        assert not dk.is_patched(model)
        assert [type(m) for m in model.modules()] == before[1]
        assert state_dict_equal(before[0], snapshot(model))
    assert mask == kept_mask
    for given, kept in zip(arguments, kept_args):
        assert (torch.equal(given, kept) if isinstance(given, torch.Tensor) else given == kept)
    return raised.value


def test_summary_of_a_model_checks_the_mask_against_it_as_validate_does():
    """summary(model) counted a mask of another model: one keeping 100 neurons of a 72-neuron
    BERT reported more neurons kept than the model has (a negative pruning rate), one recorded
    for 3 layers summarised on a 2-layer model dropped layer 2. It refuses both, with
    validate's message, and changes nothing."""
    model = build("bert")  # 3 layers, 72 neurons
    wide = dk.ExpertMask(ffn={0: list(range(100))})
    error = _unchanged_after(lambda: wide.summary(model), ValueError,
                             r"ffn\[0\] holds index 72, out of range for 72 neurons", model, wide)
    with pytest.raises(ValueError) as validated:
        wide.validate(model)
    assert str(error) == str(validated.value)
    three = dk.ExpertMask.random(build("llama"), 0.5, 0.5)  # 3 layers
    small = _tiny_llama()  # 2 layers
    _unchanged_after(lambda: three.summary(small), ValueError,
                     "made for a model with num_layers=3, but the model has num_layers=2",
                     small, three)
    _unchanged_after(lambda: three.summary("llama"), TypeError,
                     "model must be a torch.nn.Module", None, three)
    assert three.summary(build("llama")) == three.summary()


def test_spec_keys_and_family_must_be_known():
    """A mistyped spec key was dropped silently (a mask recording no sizes, scores of 47 neurons
    taken for a model of 48), and an unknown family weighed neurons as another family's. Both
    are refused by name; the sizes the package gives (a ModelSpec's dict with its family, an
    Expert's sizes with the vocabulary size, masks of older files) are still accepted."""
    from doe_kernels.expert import model_sizes
    from doe_kernels.mask import unit_weights

    known = r"the known keys are \['model_type', 'num_layers'.*'family', 'vocab_size'\]"
    typo = {"num_layerz": 2}
    _unchanged_after(lambda: dk.ExpertMask(spec=typo), ValueError,
                     rf"spec holds unknown key\(s\) \['num_layerz'\]; {known}", None, None, typo)
    scores, given = torch.rand(2, 47), {"intermediate": 48}
    _unchanged_after(lambda: dk.ExpertMask.from_scores(scores, spec=given), ValueError,
                     r"unknown key\(s\) \['intermediate'\]", None, None, scores, given)
    model = build("bert")
    sizes = model_sizes(model)  # family and vocab_size too
    ffn, heads = torch.rand(3, 72), torch.rand(3, 4)
    for family in ("BERT", 3, None):
        bad = {**sizes, "family": family}
        match = rf"spec\['family'\] = {family!r} is not a known model family \(one of 'bert', " \
                r"'llama', 'mixtral'\)"
        _unchanged_after(lambda: dk.ExpertMask.from_scores_jointly(ffn, heads, 0.5, bad),
                         ValueError, match, None, None, ffn, heads, bad)
        with pytest.raises(ValueError, match=match):
            unit_weights(bad)
        with pytest.raises(ValueError, match=match):
            dk.ExpertMask(spec=bad)
    with pytest.raises(ValueError, match=r"spec\['vocab_size'\] = 0 is not a valid model size"):
        dk.ExpertMask(spec={**sizes, "vocab_size": 0})
    recorded = {k: v for k, v in sizes.items() if k not in ("family", "vocab_size")}
    assert dk.ExpertMask(spec=sizes).spec == recorded
    assert dk.ExpertMask.random(model).spec == recorded
    assert dk.ExpertMask.from_scores_jointly(ffn, heads, 0.5, sizes).spec == recorded
    assert dk.ExpertMask.from_scores(ffn, heads, spec=sizes).spec == recorded
    first = {k: recorded[k] for k in ("model_type", "num_layers", "intermediate_size",
                                      "num_heads", "num_kv_heads")}  # the first version's keys
    assert dk.ExpertMask.from_tensors({}, first).spec == first


def test_joint_ranking_checks_the_spec_before_using_it():
    """from_scores_jointly weighed units by the spec before checking it: no heads divided by
    zero, a hidden size given as a string raised a TypeError deep inside."""
    from doe_kernels.mask import unit_weights

    ffn, heads = torch.rand(3, 12), torch.rand(3, 4)
    for key, value in (("num_heads", 0), ("hidden_size", "16"), ("head_dim", 0)):
        bad = {**_sizes(), key: value}
        match = rf"spec\['{key}'\] = {value!r} is not a valid model size"
        _unchanged_after(lambda: dk.ExpertMask.from_scores_jointly(ffn, heads, 0.5, bad),
                         ValueError, match, None, None, ffn, heads, bad)
        with pytest.raises(ValueError, match=match):
            unit_weights(bad)


def test_random_and_rankings_refuse_bad_arguments_by_name():
    """random("bert") failed inside the model lookup, a float seed in torch, a keep given as a
    string or a tensor in a comparison or in round(): each is refused naming the argument, with
    the model as it was; numpy numbers are taken (a numpy integer seed too, which torch's
    generator refused)."""
    import numpy as np

    model = build("bert")
    rng = torch.get_rng_state()
    for kwargs, error, match in [
            (dict(seed=1.5), TypeError, "seed must be an int, got float 1.5"),
            (dict(seed="1"), TypeError, "seed must be an int, got str"),
            (dict(seed=None), TypeError, "seed must be an int, got NoneType"),
            (dict(seed=True), TypeError, "seed must be an int, got bool"),
            (dict(seed=2 ** 64), ValueError, r"seed must be in \[-9223372036854775808, "),
            (dict(ffn_keep="0.5"), TypeError, r"ffn_keep must be a number in \[0, 1\], got str"),
            (dict(ffn_keep=torch.tensor(0.5)), TypeError, "ffn_keep must be a number .*Tensor"),
            (dict(heads_keep=True), TypeError, "heads_keep must be a number .* got bool"),
            (dict(experts_keep=float("nan")), ValueError, r"experts_keep must be in \[0, 1\]")]:
        _unchanged_after(lambda: dk.ExpertMask.random(model, **kwargs), error, match, model)
    _unchanged_after(lambda: dk.ExpertMask.random("bert"), TypeError,
                     "model must be a torch.nn.Module .* got str 'bert'")
    _unchanged_after(lambda: dk.ExpertMask().validate("bert"), TypeError,
                     "model must be a torch.nn.Module")
    assert torch.equal(rng, torch.get_rng_state())
    assert dk.ExpertMask.random(model, np.float32(0.5), seed=np.int64(3)) == \
        dk.ExpertMask.random(model, 0.5, seed=3)
    scores = torch.rand(2, 8)
    for keep in ("0.5", torch.tensor(0.5)):
        with pytest.raises(TypeError, match=r"ffn_keep must be a number in \[0, 1\]"):
            dk.ExpertMask.from_scores(scores, ffn_keep=keep)
        with pytest.raises(TypeError, match=r"keep must be a number in \[0, 1\]"):
            dk.ExpertMask.from_scores_jointly(torch.rand(3, 12), torch.rand(3, 4), keep,
                                              _sizes())


@pytest.mark.parametrize("kind", ["ffn", "heads", "moe", "skip", "ffn_bias", "attn_bias",
                                  "ffn_scales", "head_scales"])
def test_meta_tensors_are_refused_by_name(kind):
    """A table entry on the meta device failed copying out of it (NotImplementedError) or
    reading it (Tensor.item() on meta): it is refused naming the table and layer, and replace
    leaves the mask as it was."""
    dtype = torch.int64 if kind in ("ffn", "heads", "moe") else torch.float32
    value = torch.zeros((1,) if kind == "skip" else (2,), dtype=dtype, device="meta")
    match = rf"{kind}\[0\] is on the meta device \(it has no values\)"
    _unchanged_after(lambda: dk.ExpertMask(**{kind: {0: value}}), ValueError, match)
    mask = dk.ExpertMask({0: [1, 2]}, {0: [0, 1]}, spec=dict(num_layers=2))
    _unchanged_after(lambda: mask.replace(**{kind: {0: value}}), ValueError, match, None, mask)

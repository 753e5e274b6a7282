"""ExpertMask: construction checks, random and score-based masks, summary, files, validation."""
import pytest
import torch

import doe_kernels as dk
from model_utils import build


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
        ({"0": [1]}, TypeError, "keys must be layer numbers"),
    ]:
        with pytest.raises(error, match=match):
            dk.ExpertMask(ffn=bad)


def test_mask_is_a_copy_and_read_only():
    kept = torch.tensor([1, 2])
    mask = dk.ExpertMask(ffn={0: kept})
    kept[0] = 7
    assert mask.ffn[0].tolist() == [1, 2]
    with pytest.raises(TypeError):
        mask.ffn[1] = torch.tensor([0])


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


def test_validate_names_the_first_bad_layer_and_index():
    model = build("bert")  # 3 layers, 72 neurons, 4 heads
    with pytest.raises(ValueError, match=r"ffn\[1\] holds index 72, out of range for 72 neurons"):
        dk.ExpertMask(ffn={0: [1], 1: [5, 72, 90]}).validate(model)
    with pytest.raises(ValueError, match="made for a model with intermediate_size=80"):
        dk.ExpertMask(spec=dict(dk.ExpertMask.random(build("bert")).spec,
                                intermediate_size=80)).validate(model)
    assert dk.ExpertMask().summary(model)["ffn_pruning_rate"] == 0

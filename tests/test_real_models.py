"""patch / unpatch on the two real pretrained models shipped by PyPI packages (offline)."""
import pytest
import torch

import doe_kernels as dk
from model_utils import masked_dense, snapshot, state_dict_equal
from real_models import load_minilm, load_smollm2, smollm2_dir
from reference import assert_close

TEXTS = ["the movie was a delight from start to finish",
         "a tedious, overlong mess",
         "I would not watch it again"]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_minilm_patched_equals_masked_dense_and_restores(minilm, tmp_path):
    model, tokenizer = minilm
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    keep = batch["attention_mask"][..., None]
    before = snapshot(model)
    mask = dk.ExpertMask.random(model, ffn_keep=0.35, heads_keep=0.5, seed=3)
    with torch.no_grad():
        reference = masked_dense(model, mask)
        same_dtype = reference(**batch).last_hidden_state * keep
        expected = reference.double()(**batch).last_hidden_state * keep
        dense = model(**batch).last_hidden_state
        with dk.plugged(model, mask):
            got = model(**batch).last_hidden_state * keep
        assert_close(got, expected, same_dtype, what="all-MiniLM-L6-v2")
        assert torch.equal(model(**batch).last_hidden_state, dense)
    assert state_dict_equal(snapshot(model), before)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(saved[k], before[k]) for k in saved)


def test_smollm2_generation_equals_masked_dense_and_restores(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer(["The capital of France is", "Once upon a time"], padding=True,
                       padding_side="left", return_tensors="pt")
    before = snapshot(model)
    mask = dk.ExpertMask.random(model, ffn_keep=0.5, heads_keep=7 / 9, seed=1)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        reference = masked_dense(model, mask)
        same_dtype_logits = reference(**prompt).logits[:, -1]
        expected = reference.generate(**prompt, **settings)
        expected_logits = reference.double()(**prompt).logits[:, -1]
        del reference
        with dk.plugged(model, mask):
            got_logits = model(**prompt).logits[:, -1]
            got = model.generate(**prompt, **settings)
    # 30 float32 layers summed in another order than PyTorch's: up to about 2.5x its own float32
    # error (seen with transformers 5.19), so a whole-model bound of 5e-5 of the logits' scale;
    # a wrong neuron or head moves them by orders of magnitude more
    error = (got_logits.double() - expected_logits).abs().max().item()
    scale = expected_logits.abs().max().item()
    dense_error = (same_dtype_logits.double() - expected_logits).abs().max().item()
    assert error <= max(5e-5 * scale, 2 * dense_error), (error, dense_error, scale)
    assert torch.isfinite(got_logits).all()
    assert torch.equal(got, expected)
    assert state_dict_equal(snapshot(model), before)


def test_upcycled_smollm2_expert_pruning_and_skipping(smollm2):
    """SmolLM2 upcycled to 8 experts (top-2): selection keeps 6 experts in three layers (all 30
    would take minutes on a CPU); the patched model (with skipping in every layer) equals the
    -inf-logits reference, generates the same tokens, and restores bitwise."""
    from moe_utils import moe_reference

    dense, tokenizer = smollm2
    prompt = tokenizer(TEXTS, padding=True, padding_side="left", return_tensors="pt")
    calibration = {"input_ids": prompt["input_ids"], "attention_mask": prompt["attention_mask"]}
    model = dk.moe.upcycle(dense, num_experts=8, top_k=2, noise=0.1, calibration=calibration)
    pruned = (0, 14, 29)
    mask = dk.moe.select_experts(model, calibration, keep={l: 6 for l in pruned}, progress=False)
    mask = mask.with_skip(dk.moe.skip_thresholds(model, calibration, mask))
    before = snapshot(model)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        reference = moe_reference(model, mask, dynamic_skip=True)
        expected_logits = reference(**prompt).logits[:, -1]
        expected = reference.generate(**prompt, **settings)
        del reference
        with dk.plugged(model, mask, dynamic_skip=True):
            got_logits = model(**prompt).logits[:, -1]
            got = model.generate(**prompt, **settings)
    torch.testing.assert_close(got_logits, expected_logits, rtol=1e-3, atol=1e-3)
    assert torch.equal(got, expected)
    assert state_dict_equal(snapshot(model), before)
    assert sorted(mask.moe) == list(pruned) and all(mask.moe[l].numel() == 6 for l in pruned)
    assert len(mask.skip) == 30


def test_a_smollm2_copy_cached_without_a_padding_token_gets_one(tmp_path, monkeypatch):
    """A copy converted under transformers before 5.19 (and cached by the module then) had no
    padding token, and batches of its tokenizer failed; it is given one where it is found."""
    import json
    import shutil

    from transformers import AutoTokenizer

    import offline_models

    cached = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(smollm2_dir(), cached, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((cached / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (cached / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(cached).pad_token is None
    monkeypatch.setattr(offline_models, "CACHE", str(tmp_path))
    assert offline_models.smollm2_dir.__wrapped__() == str(cached)
    assert AutoTokenizer.from_pretrained(cached).pad_token == "<|im_end|>"

"""Expert: save/load round trips, fit checks, plugging (restored on exit and on error), and the
soft-prompt injection against PEFT's own forward after training (BERT classifier, LLaMA LM)."""
import pytest
import torch

import doe_kernels as dk
from doe_kernels.data import TaskData
from doe_kernels.expert import (Expert, encode, label_logits, label_token_ids, model_sizes,
                                token_counts)
from doe_kernels.localize import prompt as prompt_tuning
from expert_utils import LABELS, TEXTS, seq_cls_expert, tiny_bert, tiny_llama
from model_utils import snapshot, state_dict_equal

pytestmark = pytest.mark.usefixtures("one_thread")

def test_save_load_round_trip_seq_cls(tmp_path, tokenizer):
    model = tiny_bert()
    expert = seq_cls_expert(model)
    expert.save(tmp_path / "e.safetensors")
    loaded = Expert.load(tmp_path / "e.safetensors")
    assert loaded.mask == expert.mask
    assert torch.equal(loaded.prompt, expert.prompt)
    assert loaded.head.keys() == expert.head.keys()
    assert all(loaded.head[k].dtype == expert.head[k].dtype
               and torch.equal(loaded.head[k], expert.head[k]) for k in expert.head)
    for key in ("task_type", "label_names", "label_words", "label_token_ids", "template", "sizes",
                "figures", "name", "max_length"):
        assert getattr(loaded, key) == getattr(expert, key), key
    assert torch.equal(loaded.predict_logits(model, tokenizer, TEXTS),
                       expert.predict_logits(model, tokenizer, TEXTS))


def test_save_load_round_trip_causal(tmp_path, tokenizer):
    model = tiny_llama()
    ids = label_token_ids(tokenizer, [" positive", " negative"])
    expert = Expert(dk.ExpertMask.random(model, 0.5, 0.5), torch.randn(4, 32), "causal_lm",
                    ["positive", "negative"], label_words=[" positive", " negative"],
                    label_token_ids=ids, template="{text} Mood:", sizes=model_sizes(model))
    expert.save(tmp_path / "c.safetensors")
    loaded = Expert.load(tmp_path / "c.safetensors")
    assert loaded.head is None and loaded.template == "{text} Mood:"
    assert loaded.label_token_ids == ids
    assert torch.equal(loaded.predict_logits(model, tokenizer, TEXTS),
                       expert.predict_logits(model, tokenizer, TEXTS))


def test_recovered_expert_keeps_its_dense_baseline(tmp_path, tokenizer):
    model = tiny_bert()
    expert = seq_cls_expert(model)
    assert expert.dense_prompt is None and expert.dense_head is None
    plain = expert.dense()
    assert plain.mask is None and torch.equal(plain.prompt, expert.prompt)
    assert all(torch.equal(plain.head[k], expert.head[k]) for k in expert.head)
    base_prompt = torch.randn_like(expert.prompt)
    base_head = {k: torch.randn_like(v) for k, v in expert.head.items()}
    recovered = Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names,
                       head=expert.head, sizes=expert.sizes, dense_prompt=base_prompt,
                       dense_head=base_head)
    recovered.save(tmp_path / "r.safetensors")
    loaded = Expert.load(tmp_path / "r.safetensors")
    for x in (recovered, loaded):
        dense = x.dense()
        assert dense.mask is None and torch.equal(dense.prompt, base_prompt)
        assert all(torch.equal(dense.head[k], base_head[k]) for k in base_head)
        assert torch.equal(x.prompt, expert.prompt)  # what it serves is unchanged
        assert all(torch.equal(x.head[k], expert.head[k]) for k in expert.head)
    assert torch.equal(loaded.predict_logits(model, tokenizer, TEXTS),
                       expert.predict_logits(model, tokenizer, TEXTS))
    with pytest.raises(ValueError, match="dense_prompt is"):
        Expert(None, expert.prompt, "seq_cls", ["a", "b"], head=expert.head,
               dense_prompt=torch.zeros(1, 32))
    with pytest.raises(ValueError, match="dense_head has parameters"):
        Expert(None, expert.prompt, "seq_cls", ["a", "b"], head=expert.head,
               dense_head={"classifier.weight": torch.zeros(2, 32)})


def test_save_an_expert_whose_dense_baseline_is_itself(tmp_path, tokenizer):
    """localize with recovery whose search keeps rate 0: prompt and dense prompt are one tensor."""
    model = tiny_bert()
    expert = seq_cls_expert(model)
    same = Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names, head=expert.head,
                  sizes=expert.sizes, dense_prompt=expert.prompt, dense_head=expert.head)
    same.save(tmp_path / "s.safetensors")
    loaded = Expert.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.dense().prompt, expert.prompt)
    assert torch.equal(loaded.prompt, expert.prompt)
    assert all(torch.equal(loaded.dense().head[k], expert.head[k]) for k in expert.head)


def test_load_rejects_other_files(tmp_path):
    mask = dk.ExpertMask.random(tiny_bert(), 0.5)
    mask.save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a doe_kernels Expert"):
        Expert.load(tmp_path / "m.safetensors")


@pytest.mark.parametrize("other, match", [
    (lambda: tiny_bert(layers=3), "num_layers"),
    (lambda: tiny_llama(), "intermediate_size|model_type|family"),
])
def test_plugging_into_another_model_is_refused(tmp_path, tokenizer, other, match):
    expert = seq_cls_expert(tiny_bert())
    expert.save(tmp_path / "e.safetensors")
    loaded = Expert.load(tmp_path / "e.safetensors")
    model = other()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        with loaded.plugged(model):
            pass
    with pytest.raises(ValueError, match=match):
        loaded.predict_logits(model, tokenizer, TEXTS[:2])
    assert not dk.is_patched(model) and state_dict_equal(before, snapshot(model))


def test_an_expert_with_another_label_count_swaps_the_whole_head(tokenizer):
    """One model serves tasks with different numbers of labels: the head is swapped whole."""
    model = tiny_bert(num_labels=3)
    before = snapshot(model)
    expert = seq_cls_expert(tiny_bert())  # two labels
    assert expert.predict_logits(model, tokenizer, TEXTS[:3]).shape == (3, 2)
    assert state_dict_equal(before, snapshot(model))
    bad_head = {k: v[:, :8] if v.dim() == 2 else v for k, v in expert.head.items()}
    narrow = Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names, head=bad_head)
    with pytest.raises(ValueError, match="does not fit the model's"):
        narrow.check_fits(model)
    # a head names exactly the head module's Parameters: none missing (the model's own would
    # stay), none elsewhere in the model (a file could overwrite any weight while plugged)
    embedding = model.bert.embeddings.token_type_embeddings.weight
    for key, value in (("classifier.gain", expert.head["classifier.weight"]),
                       ("classifier", expert.head["classifier.weight"]),
                       ("missing.weight", expert.head["classifier.weight"]),
                       ("bert.embeddings.token_type_embeddings.weight", embedding + 1e4),
                       ("classifier.bias", None)):
        head = {**expert.head, key: value}
        head = {k: v for k, v in head.items() if v is not None}
        stray = Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names, head=head)
        with pytest.raises(ValueError, match=r"has head parameters \[.*\], but "
                                             r"BertForSequenceClassification's head has"):
            stray.check_fits(model)
        with pytest.raises(ValueError, match="head parameters"):
            stray.predict_logits(model, tokenizer, TEXTS[:1])
        assert state_dict_equal(before, snapshot(model))
    # the head's values must stay finite in the model's dtype
    huge = {**expert.head, "classifier.bias": torch.tensor([1e300, 0.0], dtype=torch.float64)}
    overflowing = Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names, head=huge)
    with pytest.raises(ValueError, match="beyond the range of the model's torch.float32"):
        overflowing.check_fits(model)
    with pytest.raises(ValueError, match="soft prompt holds values beyond .* torch.float16"):
        Expert(None, torch.full((2, 32), 1e5), "seq_cls", expert.label_names,
               head=expert.head).check_fits(tiny_bert().to(torch.float16))


def test_texts_past_a_berts_positions_are_refused(tokenizer):
    """The soft prompt and texts of up to max_length tokens must fit a BERT's position table
    (the model would fail on the first text that long), checked before anything changes."""
    model = tiny_bert(positions=16)
    before = snapshot(model)
    expert = seq_cls_expert(model, virtual=3)
    expert.max_length = 14
    message = ("expert 'sentiment': 3 virtual tokens and texts of up to 14 tokens need 17 positions, "
               "but the model has 16: use a max_length of 13 or less")
    with pytest.raises(ValueError, match=message):
        expert.check_fits(model)
    with pytest.raises(ValueError, match=message):
        expert.predict_logits(model, tokenizer, TEXTS[:1])
    with pytest.raises(ValueError, match=message):
        dk.ExpertRouter(model, tokenizer).add("task", expert)
    assert state_dict_equal(before, snapshot(model)) and not dk.is_patched(model)
    expert.max_length = 13
    assert expert.predict_logits(model, tokenizer, [" ".join(TEXTS)]).shape == (1, 2)


def test_prompt_width_and_task_type_mismatch():
    model = tiny_bert()
    expert = seq_cls_expert(model)
    wide = Expert(expert.mask, torch.zeros(3, 16), "seq_cls", expert.label_names, head=expert.head)
    with pytest.raises(ValueError, match="soft prompt of width 16"):
        wide.check_fits(model)
    causal = Expert(None, torch.zeros(3, 32), "causal_lm", ["a", "b"], label_words=[" a", " b"],
                    label_token_ids=[5, 6])
    with pytest.raises(ValueError, match="causal_lm expert"):
        causal.check_fits(model)
    from transformers import BertForMaskedLM

    masked_lm = BertForMaskedLM(model.config)  # bidirectional: no causal LM to score labels on
    with pytest.raises(ValueError, match="BertForMaskedLM: a BERT-family model serves experts as "
                                         "a sequence classifier"):
        causal.check_fits(masked_lm)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_a_bad_batch_size_is_refused(tokenizer, batch_size):
    model = tiny_bert()
    expert = seq_cls_expert(model)
    for call in (lambda: expert.predict_logits(model, tokenizer, TEXTS, batch_size=batch_size),
                 lambda: list(expert.calibration_batches(model, tokenizer, TEXTS, batch_size))):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            call()


def test_plugged_restores_model_and_head_even_on_error(tokenizer):
    model = tiny_bert()
    expert = seq_cls_expert(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with expert.plugged(model):
            assert dk.is_patched(model) and dk.current_mask(model) is expert.mask
            assert torch.equal(model.classifier.weight, expert.head["classifier.weight"])
            raise RuntimeError("boom")
    assert not dk.is_patched(model) and state_dict_equal(before, snapshot(model))
    expert.predict_logits(model, tokenizer, TEXTS)  # plugs for the call, restores after
    assert not dk.is_patched(model) and state_dict_equal(before, snapshot(model))


def test_predict_logits_equals_masked_dense_with_manual_prompt(tokenizer):
    """Plugged expert == the masked-dense model fed cat(prompt, embeddings) by hand."""
    from model_utils import masked_dense

    model = tiny_bert()
    expert = seq_cls_expert(model)
    dense = masked_dense(model, expert.mask)
    dense.classifier.load_state_dict({k.split(".", 1)[1]: v for k, v in expert.head.items()})
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    embeds = torch.cat((expert.prompt.expand(len(TEXTS), -1, -1),
                        dense.get_input_embeddings()(batch["input_ids"])), 1)
    attention = torch.cat((torch.ones(len(TEXTS), 3, dtype=torch.long), batch["attention_mask"]), 1)
    with torch.no_grad():
        want = dense(inputs_embeds=embeds, attention_mask=attention).logits
    got = expert.predict_logits(model, tokenizer, TEXTS, batch_size=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert expert.predict(model, tokenizer, TEXTS) == [expert.label_names[i]
                                                       for i in want.argmax(-1).tolist()]
    data = TaskData(TEXTS, LABELS, ["negative", "positive"])
    gold = torch.tensor(data.label_ids)
    assert expert.evaluate(model, tokenizer, data) == pytest.approx(
        float((want.argmax(-1) == gold).float().mean()))


def test_batches_by_length_answers_in_the_order_given(tokenizer):
    """predict_logits batches texts of like lengths together and answers in the order given."""
    from doe_kernels.expert import by_length

    texts = ["a fine film", "a long, slow and entirely pointless film that nobody liked", "bad",
             "the actors were good but the story was thin", "great"]
    assert by_length(tokenizer, texts) == [2, 4, 0, 3, 1]
    assert by_length(tokenizer, ["ab", "cd"]) == [0, 1]  # ties keep their order
    for family in ("bert", "llama"):
        model, task_type, _, ids = sentiment_setup(family, tokenizer)
        expert = seq_cls_expert(model) if family == "bert" else Expert(
            None, torch.randn(3, 32), task_type, ["negative", "positive"],
            label_words=[" negative", " positive"], label_token_ids=ids, sizes=model_sizes(model))
        alone = torch.cat([expert.predict_logits(model, tokenizer, [t]) for t in texts])
        torch.testing.assert_close(expert.predict_logits(model, tokenizer, texts, batch_size=2),
                                   alone, atol=1e-5, rtol=1e-4)
        assert expert.predict_logits(model, tokenizer, []).shape == (0, 2)


def sentiment_setup(family, tokenizer):
    """(tiny model, task type, the TEXTS task, label token ids or None) of a model family."""
    model = tiny_bert() if family == "bert" else tiny_llama()
    task_type = "seq_cls" if family == "bert" else "causal_lm"
    data = TaskData(TEXTS, LABELS, ["negative", "positive"])
    ids = None if family == "bert" else label_token_ids(tokenizer, [" negative", " positive"])
    return model, task_type, data, ids


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_training_forward_matches_the_served_expert(tokenizer, family):
    """The logits prompt tuning trains on (a padded batch) == the Expert's, each text served alone
    (no PEFT): training sees the forward that serves."""
    model, task_type, data, ids = sentiment_setup(family, tokenizer)
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = prompt_tuning.wrap(model, task_type, num_virtual_tokens=4)
    losses = prompt_tuning.fit(peft_model, tokenizer, data, task_type, ids, None, epochs=3,
                               batch_size=4, progress=False)
    assert losses[-1] < losses[0]
    with torch.no_grad():  # one batch, padded (left for the causal LM)
        want = prompt_tuning.trained_label_logits(
            peft_model, *encode(tokenizer, TEXTS, task_type, None), task_type, ids)
    prompt, head = prompt_tuning.extract(peft_model)
    prompt_tuning.unwrap(peft_model)
    head_name = "classifier" if family == "bert" else "lm_head"
    assert type(model.get_submodule(head_name)).__name__ == "Linear"
    assert state_dict_equal(before, snapshot(model))  # PEFT trained copies, not the model
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert (head is not None) == (family == "bert")
    if head is not None:  # the trained head is PEFT's copy, which the forward went through
        assert not torch.equal(head["classifier.weight"], before["classifier.weight"])
    expert = Expert(None, prompt, task_type, ["negative", "positive"],
                    label_words=None if ids is None else [" negative", " positive"],
                    label_token_ids=ids, head=head, sizes=model_sizes(model))
    alone = expert.predict_logits(model, tokenizer, TEXTS, batch_size=1)
    torch.testing.assert_close(alone, want, atol=1e-5, rtol=1e-4)
    # batches padded differently give the same answers (right padding; left padding with the
    # positions counted over real tokens)
    for size in (3, len(TEXTS)):
        torch.testing.assert_close(expert.predict_logits(model, tokenizer, TEXTS, size),
                                   want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prompt_tuning_loss_is_the_served_experts(tokenizer, family):
    """With learning rates 0, fit's loss is the cross-entropy of the Expert's answers, each text
    served alone: in batches of 4 padded texts, PEFT's own forward (which ignores position ids)
    would give a causal LM other logits."""
    model, task_type, data, ids = sentiment_setup(family, tokenizer)
    if family == "llama":  # sharper attention: positions matter as in a trained model
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(30)
                layer.self_attn.k_proj.weight.mul_(30)
    peft_model = prompt_tuning.wrap(model, task_type, num_virtual_tokens=4)
    try:
        losses = prompt_tuning.fit(peft_model, tokenizer, data, task_type, ids, None, epochs=1,
                                   lr=0.0, head_lr=0.0, batch_size=4, progress=False,
                                   precision="float32")
        prompt, head = prompt_tuning.extract(peft_model)
        with torch.no_grad():
            peft_logits = label_logits(
                peft_model(*encode(tokenizer, TEXTS, task_type, None)).logits, task_type, ids)
    finally:
        prompt_tuning.unwrap(peft_model)
    expert = Expert(None, prompt, task_type, ["negative", "positive"],
                    label_words=None if ids is None else [" negative", " positive"],
                    label_token_ids=ids, head=head, sizes=model_sizes(model))
    alone = expert.predict_logits(model, tokenizer, TEXTS, batch_size=1)
    gold = torch.tensor(data.label_ids)
    served = float(torch.nn.functional.cross_entropy(alone, gold))
    assert losses == [pytest.approx(served, rel=1e-4)]
    if family == "llama":  # the geometry PEFT trains on is another network
        assert (peft_logits.float() - alone).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prompt_starts_as_the_init_texts_token_embeddings(tokenizer, family):
    model, task_type, data, ids = sentiment_setup(family, tokenizer)
    text = "is this review negative or positive"  # 6 tokens, cycled to 8 virtual tokens
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) == 6
    embeddings = model.get_input_embeddings().weight.detach()
    start = prompt_tuning.train_prompt(model, tokenizer, data, task_type, ids,
                                       num_virtual_tokens=8, epochs=0, progress=False,
                                       init_text=text)
    torch.testing.assert_close(start.prompt, embeddings[tokens + tokens[:2]], atol=0, rtol=0)
    random_start = prompt_tuning.train_prompt(model, tokenizer, data, task_type, ids,
                                              num_virtual_tokens=8, epochs=0, progress=False)
    assert not torch.equal(random_start.prompt, start.prompt)
    trained = prompt_tuning.train_prompt(model, tokenizer, data, task_type, ids,
                                         num_virtual_tokens=8, epochs=1, batch_size=4,
                                         progress=False, init_text=text)
    assert not torch.equal(trained.prompt, start.prompt)
    with pytest.raises(ValueError, match="has no tokens"):
        prompt_tuning.train_prompt(model, tokenizer, data, task_type, ids, epochs=0,
                                   progress=False, init_text="")


def test_nested_experts_restore_the_outer_one(tokenizer):
    model = tiny_bert()
    outer, inner = seq_cls_expert(model, seed=1), seq_cls_expert(model, rate=0.7, seed=2)
    before = snapshot(model)
    with outer.plugged(model):
        want = outer.predict_logits(model, tokenizer, TEXTS)
        inner_logits = inner.predict_logits(model, tokenizer, TEXTS)  # plugs inner for the call
        assert dk.current_mask(model) is outer.mask
        assert torch.equal(model.classifier.weight, outer.head["classifier.weight"])
        torch.testing.assert_close(outer.predict_logits(model, tokenizer, TEXTS), want)
    assert not torch.allclose(inner_logits, want)
    assert not dk.is_patched(model) and state_dict_equal(before, snapshot(model))


@pytest.mark.parametrize("task_type", ["causal_lm", "seq_cls"])
def test_texts_that_are_not_strings_are_refused(tokenizer, task_type):
    """A causal LM's template would format None or 42 into a text: refused, as for classifiers."""
    with pytest.raises(ValueError, match="texts must be strings, got a NoneType"):
        encode(tokenizer, ["a fine film", None], task_type, None, 32)


def test_bad_texts_tokenizers_and_options_are_refused_before_the_expert_is_plugged(tokenizer):
    """predict / predict_logits checked their texts and tokenizer only once the expert was
    plugged (a patch and an unpatch run for nothing; the down projections' storage replaced),
    with torch's or Python's messages ('NoneType' object is not callable); a misspelled backend
    or a non-bool prune of an expert without a mask went unchecked (no mask to plug)."""
    model = tiny_bert()
    expert = seq_cls_expert(model, rate=0.5, seed=1)
    before, storage = snapshot(model), model.bert.encoder.layer[0].output.dense.weight.data_ptr()
    refusals = [
        (lambda: expert.predict(model, tokenizer, [None]), ValueError, "texts must be strings"),
        (lambda: expert.predict(model, tokenizer, None), TypeError, "texts must be a text or"),
        (lambda: expert.predict(model, None, ["a fine film"]), TypeError,
         "tokenizer must be a HuggingFace tokenizer, got NoneType"),
        (lambda: expert.dense().predict_logits(model, tokenizer, TEXTS, backend="cpux"),
         ValueError, "cpux"),
        (lambda: expert.dense().plugged(model, prune="no").__enter__(), TypeError,
         "prune must be True or False"),
        (lambda: expert.evaluate(model, tokenizer, {"test": TaskData(TEXTS, LABELS)}), TypeError,
         "data must be a doe_kernels.data.TaskData, got a dict"),
    ]
    for call, error, message in refusals:
        with pytest.raises(error, match=message):
            call()
        assert not dk.is_patched(model) and state_dict_equal(snapshot(model), before)
        assert model.bert.encoder.layer[0].output.dense.weight.data_ptr() == storage


def test_long_texts_lose_their_end_never_the_template(tokenizer):
    """A causal LM is scored at the last position, so the template's end must survive truncation."""
    template = "Review: {text}\nMood:"
    long_text = " ".join(f"word{i}" for i in range(300))
    ids, attention = encode(tokenizer, [long_text, "a fine film"], "causal_lm", template, 40)
    assert ids.shape == (2, 40) and bool(attention[0].all())
    ending = tokenizer("Mood:", add_special_tokens=False)["input_ids"]
    assert ids[0, -len(ending):].tolist() == ending  # MiniLM's closing [SEP] is dropped
    kept = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert kept.startswith("review : word0 word1") and "word299" not in kept
    short = tokenizer(template.format(text="a fine film"))["input_ids"][:-1]
    assert ids[1][attention[1].bool()].tolist() == short  # short texts: all but the [SEP]
    with pytest.raises(ValueError, match="template .* alone is longer than max_length"):
        encode(tokenizer, [long_text], "causal_lm", template, 3)


def test_chat_template_asks_in_the_models_chat_format():
    from transformers import AutoTokenizer

    from real_models import smollm2_dir

    chat = AutoTokenizer.from_pretrained(smollm2_dir())
    template = dk.chat_template(chat, "Negative or positive? {braces} stay")
    filled = template.format(text="a fine film")
    assert filled == chat.apply_chat_template(
        [{"role": "user", "content": "Negative or positive? {braces} stay\n\na fine film"}],
        tokenize=False, add_generation_prompt=True)
    assert filled.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="no chat template"):
        dk.chat_template(_without_chat_template(chat), "Negative or positive?")


def test_an_end_of_text_the_tokenizer_appends_is_not_scored():
    """A tokenizer made with add_eos_token=True closes each text with its end-of-text token: a
    causal LM would score the label words after it. encode drops it, and a long text keeps
    max_length tokens of its own (SmolLM2's tokenizer with and without the option)."""
    from transformers import AutoTokenizer

    from real_models import smollm2_dir

    plain = AutoTokenizer.from_pretrained(smollm2_dir())
    closing = AutoTokenizer.from_pretrained(smollm2_dir(), add_eos_token=True)
    assert closing("a fine film")["input_ids"][-1] == closing.eos_token_id  # what it does
    texts = ["a fine film", " ".join(f"word{i}" for i in range(300)), "dull"]
    want = encode(plain, texts, "causal_lm", "Review: {text}\nMood:", 40)
    got = encode(closing, texts, "causal_lm", "Review: {text}\nMood:", 40)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[0].shape == (3, 40) and plain.decode(want[0][1, -3:]).endswith("Mood:")


def _without_chat_template(tokenizer):
    import copy

    bare = copy.copy(tokenizer)
    bare.chat_template = None
    return bare


@pytest.mark.parametrize("template, message", [
    ("no field", "exactly one {text} field"), ("{text} and {text}", "exactly one {text} field"),
    ("{text!r}", "exactly one {text} field"), ("{{text}}", "exactly one {text} field"),
    ("{text", "not a format string")])
def test_bad_templates_are_refused(template, message):
    from doe_kernels.expert import check_template

    assert check_template("Review: {text}\n{{Mood}}:") == "Review: {text}\n{{Mood}}:"
    with pytest.raises(ValueError, match=message):
        check_template(template)


def test_chat_template_does_not_double_a_bos_the_tokenizer_adds():
    class Tokenizer:  # the parts of a Llama-style tokenizer chat_template reads
        chat_template, bos_token, bos_token_id = "(jinja)", "<s>", 1

        def __init__(self, adds_bos):
            self.adds_bos = adds_bos

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<s>[INST] {messages[0]['content']} [/INST]"

        def __call__(self, text):
            return {"input_ids": [1] if self.adds_bos else []}

    assert dk.chat_template(Tokenizer(True), "Why?") == "[INST] Why?\n\n{text} [/INST]"
    assert dk.chat_template(Tokenizer(False), "Why?") == "<s>[INST] Why?\n\n{text} [/INST]"


@pytest.mark.parametrize("task_type", ["seq_cls", "causal_lm"])
def test_calibration_batches_weigh_the_readout_token(tokenizer, task_type):
    """readout_weight=w: the token the answer is read from (a classifier's first position, the
    prompt's first soft token; a causal LM's last) weighs 1 + w x the example's other real
    tokens; the other real tokens 1, padding 0. Without it, no token_weights."""
    if task_type == "seq_cls":
        model = tiny_bert()
        expert = seq_cls_expert(model, virtual=3)
    else:
        model = tiny_llama()
        expert = Expert(None, torch.randn(3, 32), "causal_lm", ["positive", "negative"],
                        label_words=[" positive", " negative"],
                        label_token_ids=label_token_ids(tokenizer, [" positive", " negative"]),
                        sizes=model_sizes(model))
    texts = ["a wonderful film", "dull"]
    plain = list(expert.calibration_batches(model, tokenizer, texts))
    assert len(plain) == 1 and "token_weights" not in plain[0]
    batch = list(expert.calibration_batches(model, tokenizer, texts, readout_weight=0.5))[0]
    attention = batch["attention_mask"].float()
    assert torch.equal(batch["inputs_embeds"], plain[0]["inputs_embeds"])
    readout = 0 if task_type == "seq_cls" else -1
    expected = attention.clone()
    expected[:, readout] = 1 + 0.5 * (attention.sum(1) - 1)
    assert attention[:, readout].eq(1).all() and torch.equal(batch["token_weights"], expected)
    with pytest.raises(ValueError, match="readout_weight must be a finite number >= 0"):
        next(expert.calibration_batches(model, tokenizer, texts, readout_weight=-1.0))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prompt_tuning_under_bfloat16_autocast(tokenizer, family):
    """precision="bfloat16": the forward runs under bfloat16 autocast (with learning rates 0 the
    loss is the served cross-entropy to bfloat16's precision, not float32's bit for bit), training
    follows float32's, and the prompt and head it gives are float32."""
    model, task_type, data, ids = sentiment_setup(family, tokenizer)

    def train(precision, **rates):
        peft_model = prompt_tuning.wrap(model, task_type, num_virtual_tokens=4)
        try:
            losses = prompt_tuning.fit(peft_model, tokenizer, data, task_type, ids, None,
                                       batch_size=4, progress=False, precision=precision,
                                       **rates)
            return losses, prompt_tuning.extract(peft_model)
        finally:
            prompt_tuning.unwrap(peft_model)

    frozen = {p: train(p, epochs=1, lr=0.0, head_lr=0.0)[0][0] for p in ("float32", "bfloat16")}
    assert frozen["bfloat16"] != frozen["float32"]
    assert frozen["bfloat16"] == pytest.approx(frozen["float32"], rel=2e-2)
    (full, _), (half, (prompt, head)) = train("float32", epochs=3), train("bfloat16", epochs=3)
    assert half[-1] < half[0]
    assert half == pytest.approx(full, rel=5e-2)
    assert prompt.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in (head or {}).values())
    with pytest.raises(ValueError, match="precision must be one of"):
        prompt_tuning.train_prompt(model, tokenizer, data, task_type, ids, epochs=1,
                                   progress=False, precision="float16")


def test_epoch_batches_shuffled_or_by_length():
    """"shuffled" cuts the shuffled order into batches as it is; "by_length" holds each example
    once, sorts each pool of LENGTH_POOL batches by token count (so a batch spans a run of
    lengths) and shuffles the batches."""
    import random

    order = list(range(1000))
    random.Random(0).shuffle(order)
    assert prompt_tuning.epoch_batches(order, 16) == [order[i:i + 16] for i in range(0, 1000, 16)]
    lengths = [random.Random(i).randrange(5, 120) for i in range(1000)]
    rng = random.Random(1)
    batches = prompt_tuning.epoch_batches(order, 16, lengths, rng)
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert sorted(map(len, batches)) == [8] + [16] * 62  # one short batch per pool's end
    pool = prompt_tuning.LENGTH_POOL * 16
    first_pool = set(order[:pool])
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert all(set(b) <= first_pool or not set(b) & first_pool for b in batches)  # within pools
    # like lengths together: the first pool holds 800 examples over 115 lengths, the last 200
    assert max(span for span, b in zip(spans, batches) if set(b) <= first_pool) <= 5
    assert max(spans) <= 15
    padding = sum(len(b) * max(lengths[i] for i in b) for b in batches) / sum(lengths) - 1
    shuffled = sum(len(b) * max(lengths[i] for i in b)
                   for b in prompt_tuning.epoch_batches(order, 16)) / sum(lengths) - 1
    assert padding < 0.05 < 0.5 < shuffled
    firsts = [min(lengths[i] for i in b) for b in batches]
    assert firsts != sorted(firsts)  # the batches in a random order, not by length
    assert prompt_tuning.epoch_batches(order, 16, lengths, random.Random(1)) == batches


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prompt_tuning_batched_by_length(tokenizer, family):
    """batching="by_length" trains on the same examples in batches of like lengths: other batches,
    other losses, a prompt as good at its task; a bad name is refused."""
    model, task_type, data, ids = sentiment_setup(family, tokenizer)
    seen = []
    real_encode = prompt_tuning.encode

    def spy(tokenizer_, texts, *rest):
        seen.append(list(texts))
        return real_encode(tokenizer_, texts, *rest)

    results = {}
    for batching in ("shuffled", "by_length"):
        seen.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(prompt_tuning, "encode", spy)
            results[batching] = prompt_tuning.train_prompt(
                model, tokenizer, data, task_type, ids, num_virtual_tokens=4, epochs=3,
                batch_size=3, progress=False, batching=batching)
        counts = token_counts(tokenizer, data.texts)
        length_of = dict(zip(data.texts, counts))
        spans = [max(map(length_of.get, b)) - min(map(length_of.get, b)) for b in seen]
        assert sorted(t for b in seen for t in b) == sorted(data.texts * 3)
        results[batching].spans = spans
    assert max(results["by_length"].spans) < max(results["shuffled"].spans)
    assert results["by_length"].losses != results["shuffled"].losses
    assert results["by_length"].losses[-1] < results["by_length"].losses[0]
    with pytest.raises(ValueError, match="batching must be one of"):
        prompt_tuning.train_prompt(model, tokenizer, data, task_type, ids, epochs=1,
                                   progress=False, batching="sorted")


def test_auto_precision_takes_bfloat16_where_the_device_computes_it(monkeypatch):
    """"auto": bfloat16 autocast for a float32 model on a CPU with AVX512-BF16 or AMX, else the
    model's own dtype; a bfloat16 model is never autocast again."""
    model = tiny_llama()
    for avx512_bf16, amx, want in ((True, False, "bfloat16"), (False, True, "bfloat16"),
                                   (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert prompt_tuning.resolve_precision("auto", model) == want
        assert prompt_tuning.resolve_precision("float32", model) == "float32"
        assert prompt_tuning.resolve_precision("bfloat16", model) == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert prompt_tuning.resolve_precision("auto", model.to(torch.bfloat16)) == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        prompt_tuning.resolve_precision("half", model)


def test_causal_encoding_pads_left_without_giving_the_tokenizer_a_pad_token():
    """A tokenizer without a pad token (many causal LMs') is padded with its end-of-text token
    and left as it was (it was given a pad token, which changed the caller's later calls)."""
    from transformers import AutoTokenizer

    from doe_kernels.expert import fit_template
    from real_models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    tokenizer.pad_token = None
    texts = ["a fine film", "dreadful and boring, the worst in years", "ok"]
    ids, attention = encode(tokenizer, texts, "causal_lm", None, 12)
    assert tokenizer.pad_token is None
    fitted = fit_template(tokenizer, "{text}\nAnswer:", texts, 12)
    for row, text in enumerate(fitted):
        real = attention[row].bool()
        assert ids[row, real].tolist() == tokenizer(text)["input_ids"]
        assert not real[:len(real) - int(real.sum())].any()  # padding on the left only
        assert (ids[row, ~real] == tokenizer.eos_token_id).all()
    empty = encode(tokenizer, [], "causal_lm", None, 12)
    assert [tuple(t.shape) for t in empty] == [(0, 0), (0, 0)]


def test_a_dense_expert_runs_the_whole_model_on_a_model_patched_with_another(tokenizer):
    """An expert without a mask (`dense()`, the unpruned baseline) answers as on the unpatched
    model also while another expert is plugged (it ran under that expert's mask), which is
    back after the call."""
    model = tiny_bert()
    expert = seq_cls_expert(model, rate=0.6)
    dense = expert.dense()
    want = dense.predict_logits(model, tokenizer, TEXTS)
    with expert.plugged(model):
        pruned = expert.predict_logits(model, tokenizer, TEXTS)
        got = dense.predict_logits(model, tokenizer, TEXTS)
        assert dk.current_mask(model) is expert.mask
    assert (pruned - want).abs().max() > 1e-3  # (the two answer apart)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not dk.is_patched(model)


def test_texts_that_are_not_strings_are_refused_in_a_batch_of_any_size(tokenizer):
    """predict checks the texts before sorting them by tokenized length (with more texts than
    batch_size the tokenizer's own TypeError came first); an empty head is refused when made
    (saved, it would not load)."""
    model = tiny_bert()
    expert = seq_cls_expert(model, rate=0.5)
    for batch_size in (2, 32):
        with pytest.raises(ValueError, match="texts must be strings, got a NoneType"):
            expert.predict(model, tokenizer, ["a", None, "b"], batch_size=batch_size)
    with pytest.raises(ValueError, match="head holds no parameter"):
        Expert(None, torch.zeros(2, 32), "seq_cls", ["a", "b"], head={})


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prompt_tuning_leaves_a_checkpointing_model_as_it_was(tokenizer, family):
    """On a model with gradient checkpointing on, PEFT makes the input embeddings require grad
    (a forward hook) and sets config.pretraining_tp: training a prompt takes both back (a hook
    was left per call: every later forward built an autograd graph)."""
    model, task_type, data, ids = sentiment_setup(family, tokenizer)
    model.gradient_checkpointing_enable()
    model.config.pretraining_tp = 2
    embeddings = model.get_input_embeddings()
    hooks, attributes = dict(embeddings._forward_hooks), set(model.__dict__)
    prompt_tuning.train_prompt(model, tokenizer, data, task_type, ids, num_virtual_tokens=4,
                               epochs=1, batch_size=4, progress=False)
    assert embeddings._forward_hooks == hooks and set(model.__dict__) == attributes
    assert model.config.pretraining_tp == 2


def smollm2_expert(template="{text}", virtual=2):
    """A tiny LLaMA with SmolLM2's tokenizer (which encodes "" to no token and adds no BOS) and
    a causal-LM expert for it with `template`."""
    from transformers import AutoTokenizer

    from real_models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    model = tiny_llama(vocab=len(tokenizer))
    words = [" positive", " negative"]
    expert = Expert(None, torch.randn(virtual, 32), "causal_lm", ["positive", "negative"],
                    label_words=words, label_token_ids=label_token_ids(tokenizer, words),
                    template=template, sizes=model_sizes(model))
    return model, tokenizer, expert


@pytest.mark.parametrize("virtual", [2, 0])
def test_a_text_that_encodes_to_no_token_is_refused(virtual):
    """A causal LM's text that encodes to no token with its template ("{text}" and "") was read
    at a padding position: its answer depended on its batch (and with no virtual token, alone,
    it raised IndexError). Refused, named by its place among the texts given, also where the
    texts are sorted by length into several batches; the template itself is served."""
    model, tokenizer, expert = smollm2_expert(virtual=virtual)
    assert tokenizer("")["input_ids"] == []
    expert.check_tokenizer(tokenizer)  # "{text}" alone is no token: other texts are served
    assert expert.predict_logits(model, tokenizer, ["a fine film"]).shape == (1, 2)
    for texts, batch_size, index in ((["a fine film", ""], 32, 1), ([""], 32, 0),
                                     (["a fine film", "ok", "a long dull film", ""], 1, 3)):
        with pytest.raises(ValueError, match=f"text {index}: '' encodes to no token with the "
                           "template '{text}'"):
            expert.predict_logits(model, tokenizer, texts, batch_size=batch_size)
    with pytest.raises(ValueError, match="text 1: '' encodes to no token"):
        encode(tokenizer, ["ok", ""], "causal_lm", "{text}", 16)
    texts = ["a fine film", "ok", "a long dull film", ""]  # (in batches of 2: the 2nd's 2nd)
    with pytest.raises(ValueError, match="text 3: '' encodes to no token"):
        list(expert.calibration_batches(model, tokenizer, texts, batch_size=2))
    assert not dk.is_patched(model)


@pytest.mark.parametrize("max_length", [2 ** 31, 2 ** 64, 10 ** 30])
def test_a_max_length_no_tokenizer_takes_is_refused(tmp_path, tokenizer, max_length):
    """A max_length past 2**31 - 1 (a tokenizer raises OverflowError past 2**64): refused when
    the expert is made, when its file is loaded (FileFormatError naming the file) and when one
    set on the expert afterwards meets a model."""
    from expert_utils import edit, write_expert_file

    from doe_kernels.files import FileFormatError

    model = tiny_bert()
    expert = seq_cls_expert(model)
    with pytest.raises(ValueError, match="max_length must be at most 2147483647"):
        Expert(None, expert.prompt, "seq_cls", expert.label_names, head=expert.head,
               max_length=max_length)
    expert.save(tmp_path / "e.safetensors")
    bad = write_expert_file(tmp_path / "e.safetensors", tmp_path / "bad.safetensors",
                            header=edit({"max_length": max_length}))
    with pytest.raises(FileFormatError, match=f"{bad}: max_length must be at most 2147483647"):
        Expert.load(bad)
    expert.max_length = max_length
    with pytest.raises(ValueError, match="max_length must be at most 2147483647"):
        expert.check_fits(model)
    with pytest.raises(ValueError, match="max_length must be at most 2147483647"):
        encode(tokenizer, ["ok"], "seq_cls", None, max_length)


def test_a_dense_head_of_another_shape_is_refused(tmp_path):
    """The unpruned baseline's head must have the head's shapes (it is served by the same
    model): refused when the expert is made and when its file is loaded (FileFormatError naming
    the file and the dense head), not when `eval --dense` has timed the expert."""
    from expert_utils import write_expert_file

    from doe_kernels.files import FileFormatError

    expert = seq_cls_expert(tiny_bert())
    wrong = {**expert.head, "classifier.weight": torch.zeros(7, 3)}
    with pytest.raises(ValueError, match=r"dense_head parameter 'classifier.weight' has shape "
                       r"\(7, 3\), the head's \(2, 32\)"):
        Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names, head=expert.head,
               dense_head=wrong)
    Expert(expert.mask, expert.prompt, "seq_cls", expert.label_names, head=expert.head,
           dense_head={k: v + 1 for k, v in expert.head.items()}).save(tmp_path / "e.safetensors")
    bad = write_expert_file(tmp_path / "e.safetensors", tmp_path / "bad.safetensors",
                            tensors=lambda t: {**t, "dense.head.classifier.weight":
                                               torch.zeros(7, 3)})
    with pytest.raises(FileFormatError, match=f"{bad}: dense_head parameter 'classifier.weight' "
                       r"has shape \(7, 3\)"):
        Expert.load(bad)


@pytest.mark.parametrize("layout", ["left", "right"])
def test_a_text_batched_with_a_longer_one_gets_its_answer_alone_under_a_sliding_window(
        tokenizer, layout):
    """A causal expert's soft prompt comes after the batch's padding: a sliding window (Mistral)
    counts positions, padding included, so padding between the prompt and the text cut the
    prompt off by how much longer another text of the batch was. Alone, batched with a longer
    text (through predict_logits and mixed_logits) and padded on either side, the same."""
    from transformers import MistralConfig, MistralForCausalLM

    from doe_kernels.expert import prompted_inputs
    from model_utils import _causal_config

    torch.manual_seed(0)
    config = _causal_config(MistralConfig, sliding_window=8)
    config.vocab_size = tokenizer.vocab_size
    model = MistralForCausalLM(config).eval()
    words = [" positive", " negative"]
    expert = Expert(dk.ExpertMask.random(model, 0.5, 0.5, seed=0), torch.randn(3, 48),
                    "causal_lm", ["positive", "negative"], label_words=words,
                    label_token_ids=label_token_ids(tokenizer, words), sizes=model_sizes(model),
                    max_length=32)
    short, longer = "a fine film", "word " * 25
    with torch.no_grad():
        alone = expert.predict_logits(model, tokenizer, [short])[0]
        batched = expert.predict_logits(model, tokenizer, [short, longer])[0]
        mixed = dk.mixed_logits(model, tokenizer, [(expert, short), (expert, longer)])[0]
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-5)
        # padding on either side ends up first, the real tokens in order after it
        first = [0, 0, 5, 6, 7] if layout == "left" else [5, 6, 7, 0, 0]
        ids = torch.tensor([first, [5, 6, 7, 8, 9]])
        attention = (ids > 0).long()
        got = prompted_inputs(model, ids, attention, expert.prompt, "causal_lm")
        assert got["attention_mask"].tolist() == [[0, 0] + [1] * 6, [1] * 8]
        embeddings = model.get_input_embeddings()
        torch.testing.assert_close(got["inputs_embeds"][0, 2:5], expert.prompt)
        torch.testing.assert_close(got["inputs_embeds"][0, 5:], embeddings(torch.tensor([5, 6, 7])))
        assert got["position_ids"][0, 2:].tolist() == list(range(6))

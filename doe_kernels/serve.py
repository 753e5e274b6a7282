"""ExpertRouter: serve requests for several tasks from one model, one expert at a time.

Each request runs the four DoE steps: plug the task's expert (mask, soft prompt, head), run
inference, unplug. The router keeps the model patched with a keep-everything mask between
requests, so plugging and unplugging an expert only swaps index tensors and head Parameters'
storage; `close()` (or leaving the `with` block) unpatches the model. Requests may come from several
threads in any order: a lock serialises them, so each answer equals what that task's expert gives
alone.
"""
import threading

import torch

from doe_kernels.expert import Expert
from doe_kernels.mask import ExpertMask
from doe_kernels.patching import is_patched, patch, unpatch


class ExpertRouter:
    def __init__(self, model, tokenizer, backend: str = "auto", batch_size: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.backend, self.batch_size = backend, batch_size
        self._experts: dict[str, Expert] = {}
        self._lock = threading.Lock()
        self._patched_here = False

    # ---- experts ------------------------------------------------------------------------
    def add(self, name: str, expert: Expert) -> None:
        """Register a task's expert; raises ValueError if it does not fit the model."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"task names are non-empty strings, got {name!r}")
        if not isinstance(expert, Expert):
            raise TypeError(f"expert must be a doe_kernels.Expert, got {type(expert).__name__}")
        expert.check_fits(self.model)
        with self._lock:
            self._experts[name] = expert

    def remove(self, name: str) -> None:
        with self._lock:
            self._experts.pop(self._known(name))

    @property
    def tasks(self) -> list[str]:
        return sorted(self._experts.copy())  # dict.copy is atomic: no lock (used under it)

    def _known(self, name) -> str:
        if not isinstance(name, str) or name not in self._experts:  # a list is not hashable
            raise KeyError(f"unknown task {name!r}; known tasks: {self.tasks}")
        return name

    # ---- requests -----------------------------------------------------------------------
    def run_logits(self, name: str, batch) -> torch.Tensor:
        """(len(batch), num_labels) label logits of task `name`'s expert for a batch of texts."""
        return self._run(name, batch)[1]

    def run(self, name: str, batch) -> list[str]:
        """Predicted label names of task `name` for a batch of texts (or one text)."""
        expert, logits = self._run(name, batch)
        return [expert.label_names[i] for i in logits.argmax(-1).tolist()]

    def _run(self, name: str, batch) -> tuple[Expert, torch.Tensor]:
        """(the expert that answered, its logits): the expert is read once, under the lock, so a
        task re-added meanwhile cannot pair one expert's logits with another's labels."""
        texts = _texts(batch)
        with self._lock:
            expert = self._experts[self._known(name)]
            if not is_patched(self.model):
                patch(self.model, ExpertMask(), self.backend)  # keep-everything: swaps stay cheap
                self._patched_here = True
            with expert.plugged(self.model, backend=self.backend):
                return expert, expert.predict_logits(self.model, self.tokenizer, texts,
                                                     self.batch_size, backend=self.backend)

    def close(self) -> None:
        """Restore the unpatched model (if the router patched it)."""
        with self._lock:
            if self._patched_here and is_patched(self.model):
                unpatch(self.model)
            self._patched_here = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _texts(batch) -> list[str]:
    """A batch as a non-empty list of texts that are valid Unicode (no lone surrogates)."""
    if isinstance(batch, str):
        batch = [batch]
    elif not isinstance(batch, (list, tuple)) or not batch:
        raise ValueError(f"a batch is a text or a non-empty list of texts, got {type(batch).__name__}"
                         + ("" if batch else " (empty)"))
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise ValueError(f"batch item {i} is a {type(text).__name__}, not a text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"batch item {i} is not valid Unicode text: {error.reason} "
                             f"({text[error.start]!r} at position {error.start})") from None
    return list(batch)

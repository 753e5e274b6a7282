"""doe-kernels: gather-based sparse FFN and pruned-head attention for task-expert inference.

The ops take index lists of kept neurons and heads directly (no copies of sliced weights) and run
on one of four backends: `torch` (reference), `cpu` (C++), `triton` and `cuda` (GPU).
`patch(model, mask)` runs a HuggingFace BERT- or LLaMA-family model on an expert's neurons and
heads; `unpatch(model)` restores it exactly; `with plugged(model, mask): ...` does both.
`localize(...)` finds a task's expert (prompt tuning, attribution, pruning-rate search; options in
`PromptConfig`, `AttributionConfig`, `SearchConfig`, `RecoveryConfig`) and
`ExpertRouter` serves several tasks' experts from one model; `mixed(model, masks)` and
`mixed_logits(model, tokenizer, requests)` serve a batch whose sequences belong to different
experts in one forward pass. `doe_kernels.moe` prunes and skips
the experts of Mixtral-style mixture-of-experts models (masks with `moe=`, `patch(dynamic_skip=)`).
"""
from doe_kernels.backends import BackendUnavailableError, available_backends
from doe_kernels.expert import Expert, chat_template
from doe_kernels.files import FileFormatError
from doe_kernels.localize import (
    AttributionConfig,
    PromptConfig,
    RecoveryConfig,
    SearchConfig,
    localize,
)
from doe_kernels.mask import ExpertMask
from doe_kernels.models import UnsupportedModelError
from doe_kernels.ops import (
    HeadSelection,
    gather_cols_linear,
    gather_ffn,
    gather_rows_linear,
    gather_swiglu_ffn,
    input_major,
    pack_segments,
    pruned_head_attention,
    segmented_gather_ffn,
    segmented_gather_swiglu_ffn,
)
from doe_kernels.patching import current_mask, is_patched, patch, plugged, unpatch
from doe_kernels.mixed import mixed, mixed_logits
from doe_kernels.serve import ExpertRouter
from doe_kernels import moe  # noqa: E402  (after patching, which it uses)

__version__ = "0.1.0"

__all__ = [
    "AttributionConfig",
    "PromptConfig",
    "RecoveryConfig",
    "SearchConfig",
    "BackendUnavailableError",
    "Expert",
    "ExpertMask",
    "ExpertRouter",
    "FileFormatError",
    "UnsupportedModelError",
    "chat_template",
    "current_mask",
    "is_patched",
    "localize",
    "mixed",
    "mixed_logits",
    "moe",
    "patch",
    "plugged",
    "unpatch",
    "HeadSelection",
    "available_backends",
    "gather_cols_linear",
    "gather_ffn",
    "gather_rows_linear",
    "gather_swiglu_ffn",
    "input_major",
    "pack_segments",
    "pruned_head_attention",
    "segmented_gather_ffn",
    "segmented_gather_swiglu_ffn",
]

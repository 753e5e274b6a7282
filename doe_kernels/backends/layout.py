"""The segment layout that the cuda backend's segmented kernels take, rebuilt from the library's
bounds (ops/library.py `_segment_bounds`)."""
import torch


def segment_layout(bounds, kept_count: int):
    """(segments, kept_offsets), int64 CPU tensors, of `bounds` (first row, end row, first kept,
    end kept of each segment with rows), each run of kept entries between them (the lists of
    segments without rows, which bounds leaves out) given to a segment without rows."""
    rows, offsets = [0], [0]
    for r0, r1, k0, k1 in bounds:
        if k0 > offsets[-1]:
            rows.append(r0)
            offsets.append(k0)
        rows.append(r1)
        offsets.append(k1)
    if kept_count > offsets[-1]:
        rows.append(rows[-1])
        offsets.append(kept_count)
    return torch.tensor(rows), torch.tensor(offsets)

"""Argument checks shared by the ops: clear ValueError/TypeError messages naming the argument.

Shape, dtype and device checks read only metadata. Index checks (range, sorted, unique) read the
index values, which costs a device synchronisation on the GPU; the ops run them unless called with
`check_indices=False` (the patched modules validate their masks once, at patch time).
"""
import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts


def check_float_tensor(name: str, tensor, dims: int | None = None) -> None:
    """A floating-point tensor of `dims` dimensions (None: at least one, its features)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if dims is not None and tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")
    if dims is None and tensor.dim() == 0:
        raise ValueError(f"{name} must have a features dimension (..., features), got a 0-D "
                         "tensor")


def check_same_dtype_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Every tensor in `others` (None allowed) has the reference's dtype and device (under
    torch.autocast, which casts them, any of float32, float16 and bfloat16); the reference is
    not on the meta device (the others, then, neither)."""
    if reference.is_meta:  # (False for torch.compile's FakeTensors, which carry their device)
        raise ValueError(f"{reference_name} is on the meta device: the ops run on CPU or CUDA "
                         "tensors")
    autocast = (torch.is_autocast_enabled(reference.device.type)
                and reference.dtype in AUTOCAST_DTYPES)
    for name, tensor in others.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(tensor).__name__}")
        if tensor.device != reference.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {reference_name} is on {reference.device}; "
                "all tensors of one call must be on one device"
            )
        mixed_by_autocast = autocast and tensor.dtype in AUTOCAST_DTYPES
        if tensor.dtype != reference.dtype and not mixed_by_autocast:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but {reference_name} has {reference.dtype}; "
                "all tensors of one call must have one dtype"
            )


def check_index(name: str, index, size: int, device: torch.device, check_values: bool = True):
    """Validate a kept-index list over a dimension of `size`; returns it as contiguous int64."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 or int64, got {type(index).__name__}")
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the weights are on {device}")
    if size == 0 and index.numel() > 0:  # (no value can be in range: checked without reading any)
        raise ValueError(f"{name} holds {index.numel()} indices but the dimension it indexes has "
                         "size 0")
    if check_values and index.numel() > 0:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds index {bad}, out of range for a dimension of size {size}")
        check_sorted_unique(name, index)
    if index.dtype != torch.int64 or not index.is_contiguous():  # (.to alone costs ~0.7 us)
        index = index.to(torch.int64).contiguous()
    return index


def check_sorted_unique(name: str, index: torch.Tensor) -> None:
    """Raise ValueError naming the first entry that breaks a strictly increasing index list."""
    steps = index[1:] - index[:-1]
    if steps.numel() > 0 and int(steps.min()) <= 0:
        position = int(torch.nonzero(steps <= 0)[0]) + 1
        problem = "duplicate" if int(steps[position - 1]) == 0 else "unsorted"
        raise ValueError(f"{name} must be sorted and unique: {problem} index "
                         f"{int(index[position])} at position {position}")


def check_features(name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name} has size {tensor.shape[dim]} in dimension {dim} but {what} is {expected} "
            f"(shape {tuple(tensor.shape)})"
        )


def check_bias(name: str, bias, size: int) -> None:
    if bias is None:
        return
    check_float_tensor(name, bias, dims=1)
    check_features(name, bias, 0, size, "the matching weight dimension")


def check_scales(scales, size: int, what: str, reference_name: str,
                 reference: torch.Tensor) -> None:
    """None, or a floating 1-D tensor of `size` entries with the reference's dtype and device."""
    if scales is None:
        return
    check_float_tensor("scales", scales, dims=1)
    check_same_dtype_device(reference_name, reference, scales=scales)
    check_features("scales", scales, 0, size, what)

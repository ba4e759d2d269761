"""The kernels' parameters, named once. Each kernel's parameter list is declared in
csrc/params.cuh (TF_FORWARD_PARAMS ...: its signature is that list); ``FIELDS`` lists the same
parameters in the same order with the same C types, and ``pack`` fills them by name: the host
build hands the kernel pointers to the packed values (ctypes, cuLaunchKernel's convention), the
GPU build the same bytes through CuPy (``_cuda.kernel_args``). A missing or unknown name, or a
tensor of the wrong dtype for its parameter, is an error here instead of memory read through the
wrong pointer. tests/test_kernel_params.py checks the header's lists against this table and
compiles the signatures it implies with g++ and NVRTC.

C types: ``scalar_t`` is the kernel's dtype (fp16, bf16, fp32, fp64), ``acc_t`` the state
precision (``acc_type<scalar_t>``: fp64 for fp64, else fp32); a pointer is one 64-bit word
whatever it points to, its ``__restrict__`` left out here."""
from __future__ import annotations

import ctypes
import functools
from typing import Mapping

import torch

# kernel -> ((C type, name), ...) in the kernel's parameter order (csrc/params.cuh's list).
FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "neuron_forward": (
        ("const scalar_t*", "x"),
        ("const acc_t*", "v_init"),
        ("const acc_t*", "aux_init"),
        ("scalar_t*", "spike"),
        ("acc_t*", "v_last"),
        ("acc_t*", "aux_last"),
        ("scalar_t*", "v_seq"),
        ("acc_t*", "checkpoints"),
        ("const acc_t*", "params"),
        ("int", "T"),
        ("long long", "N"),
        ("const acc_t*", "bn_scale"),
        ("const acc_t*", "bn_shift"),
        ("long long", "bn_inner"),
        ("int", "bn_channels"),
    ),
    "neuron_backward": (
        ("const scalar_t*", "grad_spike"),
        ("const scalar_t*", "grad_v_seq"),
        ("const acc_t*", "grad_v_last"),
        ("const acc_t*", "grad_aux_last"),
        ("const scalar_t*", "x"),
        ("const acc_t*", "checkpoints"),
        ("const acc_t*", "params"),
        ("scalar_t*", "grad_x"),
        ("acc_t*", "grad_v_init"),
        ("acc_t*", "grad_aux_init"),
        ("acc_t*", "grad_params"),
        ("int", "grad_params_mask"),
        ("acc_t*", "a_prod"),
        ("acc_t", "sg_a"),
        ("acc_t", "sg_b"),
        ("int", "T"),
        ("long long", "N"),
        ("long long", "grad_spike_step"),
        ("const acc_t*", "bn_scale"),
        ("const acc_t*", "bn_shift"),
        ("long long", "bn_inner"),
        ("int", "bn_channels"),
    ),
    "neuron_fixup": (
        ("const scalar_t*", "x"),
        ("const acc_t*", "v_true_init"),
        ("acc_t*", "checkpoints"),
        ("scalar_t*", "spike"),
        ("scalar_t*", "v_seq"),
        ("acc_t*", "v_last"),
        ("int*", "fixup_len"),
        ("const acc_t*", "params"),
        ("int", "T"),
        ("long long", "N"),
    ),
}

_VALUES = {"int": ctypes.c_int, "long long": ctypes.c_longlong}
# The dtypes a scalar_t pointer may point to, by the launch's state precision (every scalar_t
# tensor of one launch must then share one of them).
_SCALARS = {False: (torch.float16, torch.bfloat16, torch.float32), True: (torch.float64,)}


def kernel_of(expression: str) -> str:
    """The kernel a variant's name expression launches: 'neuron_forward<LifModel, float, 0>' ->
    'neuron_forward'."""
    kernel = expression.split("<", 1)[0].strip()
    if kernel not in FIELDS:
        raise ValueError(f"no parameter list for kernel {kernel!r} (from {expression!r}); the kernels are "
                         f"{', '.join(FIELDS)}: add its list to csrc/params.cuh and kernel_params.FIELDS")
    return kernel


def ctype_of(ctype: str, acc_is_double: bool):
    """The ctypes type of a parameter's C type (of the same size and alignment)."""
    if ctype.endswith("*"):
        return ctypes.c_void_p
    if ctype == "acc_t":
        return ctypes.c_double if acc_is_double else ctypes.c_float
    return _VALUES[ctype]


@functools.lru_cache(maxsize=None)
def _plan(kernel: str, acc_is_double: bool) -> tuple:
    """Per parameter: (name, C type, ctypes type, the dtypes a tensor for it may hold (None for a
    number), whether it points to scalar_t, the integer range it holds (None for floats and
    pointers)); worked out once per kernel and precision, as launches are frequent."""
    acc = torch.float64 if acc_is_double else torch.float32
    pointees = {"scalar_t": _SCALARS[acc_is_double], "acc_t": (acc,), "int": (torch.int32,)}
    plan = []
    for ctype, name in FIELDS[kernel]:
        ctype_t = ctype_of(ctype, acc_is_double)
        pointee = ctype.removeprefix("const ").removesuffix("*").strip() if ctype.endswith("*") else None
        bits = 8 * ctypes.sizeof(ctype_t)
        plan.append((name, ctype, ctype_t, pointees[pointee] if pointee else None, pointee == "scalar_t",
                     range(-2 ** (bits - 1), 2 ** (bits - 1)) if ctype in _VALUES else None))
    return tuple(plan)


def _wrong_names(kernel: str, args: Mapping[str, object]) -> TypeError:
    names = [name for _, name in FIELDS[kernel]]
    missing, unknown = [n for n in names if n not in args], [n for n in args if n not in names]
    got = "; ".join(([f"no {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else []))
    return TypeError(f"{kernel}'s parameters (csrc/params.cuh) are {', '.join(names)}; got {got}: name every "
                     f"parameter, None for an unused pointer")


def values(expression: str, args: Mapping[str, object], acc_is_double: bool) -> list:
    """[(ctypes type, value), ...] of variant ``expression`` in the kernel's parameter order, from
    ``args``: one entry per parameter by name (a tensor or None for a pointer, a number
    otherwise); a pointer's value is its address (0 for None)."""
    kernel = kernel_of(expression)
    plan = _plan(kernel, acc_is_double)
    if len(args) != len(plan):
        raise _wrong_names(kernel, args)
    scalar = None  # the launch's scalar_t dtype, once a tensor fixed it
    out = []
    for name, ctype, ctype_t, allowed, is_scalar, integers in plan:
        try:
            value = args[name]
        except KeyError:  # as many names as parameters, so one of them is unknown too
            raise _wrong_names(kernel, args) from None
        if allowed is not None:
            if value is None:
                value = 0
            elif not isinstance(value, torch.Tensor):
                raise TypeError(f"{kernel} parameter {name} ({ctype}) takes a tensor or None, got "
                                f"{type(value).__name__}")
            else:
                if is_scalar and scalar is not None:
                    allowed = (scalar,)
                if value.dtype not in allowed:
                    raise TypeError(f"{kernel} parameter {name} ({ctype}) must point to "
                                    f"{' or '.join(map(str, allowed))} in this launch, got a {value.dtype} tensor: "
                                    f"pass the tensor that parameter names")
                if is_scalar:
                    scalar = value.dtype
                value = value.data_ptr()
        elif integers is not None and value not in integers:  # ctypes would wrap it silently
            raise OverflowError(f"{kernel} parameter {name} ({ctype}) cannot hold {value}")
        out.append((ctype_t, value))
    return out


def pack(expression: str, args: Mapping[str, object], acc_is_double: bool) -> list:
    """``values`` as ctypes values: what the host build's launcher points the kernel at."""
    return [ctype_t(value) for ctype_t, value in values(expression, args, acc_is_double)]

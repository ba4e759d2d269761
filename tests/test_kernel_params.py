"""Kernel parameters named once (sj_temporal_fusion/kernel_params.py <-> csrc/params.cuh): the
header's lists equal the table, name for name and type for type; the kernels' signatures, as g++
and NVRTC compile them, are the ones the table implies for every dtype; the launchers pack by name
and refuse what the kernels would misread; the GPU launcher hands CuPy the host build's bytes."""
import contextlib
import ctypes
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
import torch

from sj_temporal_fusion import _cuda, _host, _nvrtc, kernel_params, ops
from sj_temporal_fusion.neurons import REGISTRY
from sj_temporal_fusion.surrogate import DEFAULT_ID
from sj_temporal_fusion.variants import CUDA_TYPES, backward_variant, fixup_variant, forward_variant
from conftest import require_nvrtc

HEADER = _host.CSRC / "params.cuh"
SHARDABLE = next(m for m in REGISTRY.values() if m.shardable)


def header_lists(text: str) -> dict[str, list[tuple[str, str]]]:
    """{kernel: [(C type, name), ...]} of params.cuh's TF_<KERNEL>_PARAMS lists, in the table's
    spelling: __restrict__ left out, acc_type<scalar_t> as acc_t."""
    lists = {}
    for macro, body in re.findall(r"#define TF_(\w+)_PARAMS\(F\)((?:.*\\\n)*.*)", text):
        entries = []
        for ctype, name in re.findall(r"\bF\(([^,()]+(?:<[^>]*>)?[^,()]*),\s*(\w+)\)", body):
            ctype = ctype.replace("__restrict__", "").replace("acc_type<scalar_t>", "acc_t")
            entries.append((re.sub(r"\s+", " ", ctype).replace(" *", "*").strip(), name))
        lists[f"neuron_{macro.lower()}"] = entries
    return lists


def header_disagreements(fields: dict, text: str) -> list[str]:
    lists = header_lists(text)
    problems = [f"{k}: in kernel_params.FIELDS, no list in params.cuh" for k in fields if k not in lists]
    problems += [f"{k}: a list in params.cuh, not in kernel_params.FIELDS" for k in lists if k not in fields]
    for kernel in set(fields) & set(lists):
        if list(fields[kernel]) != lists[kernel]:
            problems.append(f"{kernel}: kernel_params.FIELDS {list(fields[kernel])} != params.cuh {lists[kernel]}")
    return problems


def _expressions():
    """One variant per kernel and dtype: the signature depends on the dtype only."""
    m = SHARDABLE
    for dtype in CUDA_TYPES:
        yield dtype, forward_variant(m, dtype, m.forms[0] & ~m.detach_bit)
        yield dtype, forward_variant(m, dtype, m.forms[0] & ~m.detach_bit, True)
        yield dtype, backward_variant(m, dtype, DEFAULT_ID, m.forms[0], True)
        yield dtype, backward_variant(m, dtype, DEFAULT_ID, m.forms[0], True, shard=True)
        yield dtype, fixup_variant(m, dtype, m.forms[0] & ~m.detach_bit)


def signature_checks(fields: dict) -> str:
    """C++ static_asserts that each kernel's type is the one ``fields`` implies, and that each C
    type has its ctypes type's size, for the translation unit of the kernels."""
    lines = [f'#include "neurons/{name}.cuh"' for name in REGISTRY] + ['#include "temporal.cu"']
    lines += ["template <class A, class B> struct same_type { static constexpr bool value = false; };",
              "template <class A> struct same_type<A, A> { static constexpr bool value = true; };"]
    for dtype, expression in _expressions():
        acc = "double" if dtype == torch.float64 else "float"
        kernel = kernel_params.kernel_of(expression)
        params = ", ".join(re.sub(r"\bacc_t\b", acc, re.sub(r"\bscalar_t\b", CUDA_TYPES[dtype], ctype))
                           for ctype, _ in fields[kernel])
        lines.append(f"static_assert(same_type<decltype(&{expression}), void (*)({params})>::value, "
                     f"\"{expression}: its signature is not the one kernel_params.FIELDS lists\");")
    for ctype, c_name in (("int", "int"), ("long long", "long long"), ("acc_t", "float"), ("acc_t", "double"),
                          ("int*", "int*")):
        size = ctypes.sizeof(kernel_params.ctype_of(ctype, c_name == "double"))
        lines.append(f'static_assert(sizeof({c_name}) == {size}, "{c_name}: not the size of its ctypes type");')
    return "\n".join(lines) + "\n"


def gxx_errors(fields: dict, tmp_path) -> str:
    """g++'s errors compiling ``signature_checks(fields)`` (empty when it compiles)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ here")
    src = tmp_path / "signatures.cpp"
    src.write_text(signature_checks(fields))
    proc = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", "-fopenmp", f"-I{_host.CSRC}", str(src)],
                          capture_output=True, text=True)
    return "" if proc.returncode == 0 else proc.stderr


def _swapped(fields: dict, kernel: str, a: str, b: str) -> dict:
    entries = list(fields[kernel])
    names = [n for _, n in entries]
    i, j = names.index(a), names.index(b)
    entries[i], entries[j] = entries[j], entries[i]
    return {**fields, kernel: tuple(entries)}


def _retyped(fields: dict, kernel: str, name: str, ctype: str) -> dict:
    return {**fields, kernel: tuple((ctype if n == name else t, n) for t, n in fields[kernel])}


# ------------------------------------------------------------------ the header against the table

def test_header_lists_equal_the_table():
    assert header_lists(HEADER.read_text()).keys() == kernel_params.FIELDS.keys()
    assert header_disagreements(kernel_params.FIELDS, HEADER.read_text()) == []


def test_header_check_catches_a_reordered_or_retyped_table():
    # v_last and aux_last have the same type: only the names can tell them apart.
    swapped = _swapped(kernel_params.FIELDS, "neuron_forward", "v_last", "aux_last")
    assert any("neuron_forward" in p for p in header_disagreements(swapped, HEADER.read_text()))
    retyped = _retyped(kernel_params.FIELDS, "neuron_backward", "T", "long long")
    assert any("neuron_backward" in p for p in header_disagreements(retyped, HEADER.read_text()))
    # ... and a header whose list lost an entry.
    assert header_disagreements(kernel_params.FIELDS, HEADER.read_text().replace("F(int, bn_channels)", "", 1))


def test_the_kernels_signatures_are_their_lists():
    """temporal.cu declares each kernel's parameters as its params.cuh list, nothing else."""
    source = (_host.CSRC / "temporal.cu").read_text()
    for kernel in kernel_params.FIELDS:
        macro = f"TF_{kernel.removeprefix('neuron_').upper()}_PARAMS"
        assert re.search(rf"void {kernel}\(TF_SIGNATURE\({macro}\)\)", source), kernel


# ------------------------------------------------------------------ compiled signatures

def test_gxx_compiles_the_signatures_the_table_implies(tmp_path):
    errors = gxx_errors(kernel_params.FIELDS, tmp_path)
    assert not errors, errors


def test_gxx_check_fails_on_a_retyped_table(tmp_path):
    # Same names, one type off: the header check's twin, here from the compiled kernels.
    errors = gxx_errors(_retyped(kernel_params.FIELDS, "neuron_forward", "N", "int"), tmp_path)
    assert "neuron_forward" in errors and "kernel_params.FIELDS" in errors


def test_nvrtc_compiles_the_signatures_the_table_implies():
    require_nvrtc()
    _nvrtc.compile_cubin(signature_checks(kernel_params.FIELDS), _nvrtc.OPTIONS, [], "90")
    with pytest.raises(_nvrtc.NVRTCCompileError, match="kernel_params.FIELDS"):
        _nvrtc.compile_cubin(signature_checks(_retyped(kernel_params.FIELDS, "neuron_fixup", "fixup_len",
                                                       "long long*")), _nvrtc.OPTIONS, [], "90")


# ------------------------------------------------------------------ packing by name

def _forward_args(dtype=torch.float32, **override):
    acc = ops.state_dtype(dtype)
    T, n = 3, 5
    x = torch.randn(T, n).to(dtype)
    args = dict(x=x, v_init=torch.zeros(n, dtype=acc), aux_init=None, spike=torch.empty_like(x),
                v_last=torch.empty(n, dtype=acc), aux_last=None, v_seq=None, checkpoints=None,
                params=torch.zeros(4, dtype=acc), T=T, N=n, bn_scale=None, bn_shift=None, bn_inner=1,
                bn_channels=1)
    args.update(override)
    return args


def test_pack_fills_every_parameter_by_name():
    args = _forward_args()
    values = kernel_params.pack("neuron_forward<LifModel, float, 0>", args, False)
    assert len(values) == len(kernel_params.FIELDS["neuron_forward"])
    by_name = dict(zip((n for _, n in kernel_params.FIELDS["neuron_forward"]), values))
    assert by_name["x"].value == args["x"].data_ptr() and by_name["v_last"].value == args["v_last"].data_ptr()
    assert by_name["aux_last"].value is None and by_name["T"].value == 3 and by_name["N"].value == 5
    assert isinstance(by_name["N"], ctypes.c_longlong) and isinstance(by_name["T"], ctypes.c_int)


def test_pack_refuses_missing_and_unknown_names():
    args = _forward_args()
    del args["checkpoints"]
    args["checkpoint"] = None
    with pytest.raises(TypeError, match=r"no checkpoints; unknown checkpoint: name every parameter"):
        kernel_params.pack("neuron_forward<LifModel, float, 0>", args, False)
    with pytest.raises(ValueError, match="no parameter list for kernel 'neuron_sideways'"):
        kernel_params.pack("neuron_sideways<LifModel, float, 0>", _forward_args(), False)


@pytest.mark.parametrize("name, value, message", [
    ("v_init", torch.zeros(5, dtype=torch.float16), r"v_init \(const acc_t\*\) must point to torch.float32"),
    ("spike", torch.zeros(3, 5, dtype=torch.bfloat16), r"spike \(scalar_t\*\) must point to torch.float32"),
    ("x", torch.zeros(3, 5, dtype=torch.float64), r"x \(const scalar_t\*\) must point to torch.float16 or"),
    ("checkpoints", 0, r"checkpoints \(acc_t\*\) takes a tensor or None, got int"),
    ("T", 2 ** 31, r"T \(int\) cannot hold 2147483648"),
])
def test_pack_refuses_what_the_kernel_would_misread(name, value, message):
    with pytest.raises((TypeError, OverflowError), match=message):
        kernel_params.pack("neuron_forward<LifModel, float, 0>", _forward_args(**{name: value}), False)


def test_fixup_len_must_be_int32():
    n = 5
    x = torch.randn(3, n)
    args = dict(x=x, v_true_init=torch.zeros(n), checkpoints=torch.zeros(1, 1, n), spike=torch.empty_like(x),
                v_seq=None, v_last=torch.zeros(n), fixup_len=torch.zeros(n, dtype=torch.int64),
                params=torch.zeros(4), T=3, N=n)
    with pytest.raises(TypeError, match=r"fixup_len \(int\*\) must point to torch.int32"):
        kernel_params.pack("neuron_fixup<LifModel, float, 0>", args, False)


# ------------------------------------------------------------------ the GPU launcher's arguments

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_gpu_arguments_are_the_host_bytes(dtype):
    """What _cuda hands CuPy: one numpy scalar per parameter, of its C type's size, holding the
    bytes the host build's launcher points the kernel at."""
    expression = backward_variant(SHARDABLE, dtype, DEFAULT_ID, SHARDABLE.forms[0], True)
    acc = ops.state_dtype(dtype)
    T, n = 4, 6
    x = torch.randn(T, n).to(dtype)
    args = dict(grad_spike=torch.randn_like(x), grad_v_seq=None, grad_v_last=torch.zeros(n, dtype=acc),
                grad_aux_last=None, x=x, checkpoints=torch.zeros(1, 1, n, dtype=acc),
                params=torch.zeros(4, dtype=acc), grad_x=torch.empty_like(x), grad_v_init=torch.empty(n, dtype=acc),
                grad_aux_init=None, grad_params=torch.empty(2, n, dtype=acc), grad_params_mask=5,
                a_prod=None, sg_a=4.0, sg_b=0.1, T=T, N=n, grad_spike_step=n, bn_scale=None, bn_shift=None, bn_inner=1,
                bn_channels=1)
    host = kernel_params.pack(expression, args, dtype == torch.float64)
    gpu = _cuda.kernel_args(expression, args, dtype == torch.float64)
    assert len(gpu) == len(host) == len(kernel_params.FIELDS["neuron_backward"])
    for (ctype, name), h, g in zip(kernel_params.FIELDS["neuron_backward"], host, gpu):
        assert isinstance(g, np.generic) and g.tobytes() == bytes(h), (name, g, h)
        assert g.itemsize == ctypes.sizeof(kernel_params.ctype_of(ctype, dtype == torch.float64)), name


def test_gpu_launch_passes_kernel_args_to_the_function(monkeypatch):
    """_cuda.launch up to the CuPy call, without a GPU: the function gets kernel_args' tuple, the
    grid covers n neurons, and it runs on PyTorch's current stream of the device."""
    calls = []
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=lambda index: contextlib.nullcontext()))
    monkeypatch.setattr(_cuda, "import_cupy", lambda: fake_cupy)
    monkeypatch.setattr(_cuda, "_function", lambda expression, index: (None, lambda *a: calls.append(a)))
    monkeypatch.setattr(_cuda, "_cupy_stream", lambda ptr, index: calls.append(("stream", ptr, index))
                        or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=1234))
    args = _forward_args()
    expression = "neuron_forward<LifModel, float, 0>"
    _cuda.launch(expression, torch.device("cuda", 0), 5, args, False)
    assert calls[0] == ("stream", 1234, 0)
    grid, block, packed = calls[1]
    assert grid == (max(1, -(-(-(-5 // _cuda.LANES)) // _cuda.BLOCK)),) and block == (_cuda.BLOCK,)
    expected = _cuda.kernel_args(expression, args, False)
    assert [a.tobytes() for a in packed] == [a.tobytes() for a in expected]


# ------------------------------------------------------------------ gradients by input name

def test_autograd_inputs_come_from_the_op_schema():
    schema = torch.ops.sj_temporal_fusion.neuron_forward.default._schema
    assert ops._FORWARD_INPUTS == tuple(a.name for a in schema.arguments)
    grads = ops.gradients(ops._FORWARD_INPUTS, x="gx", params="gp", bn_shift="gs")
    assert len(grads) == len(schema.arguments)
    assert {ops._FORWARD_INPUTS[i]: g for i, g in enumerate(grads) if g is not None} == {
        "x": "gx", "params": "gp", "bn_shift": "gs"}
    with pytest.raises(TypeError, match=r"gradients for \['bn_offset'\], which are not among the inputs"):
        ops.gradients(ops._FORWARD_INPUTS, bn_offset=None)


def test_folded_gradients_reach_their_inputs():
    """The registered backward's gradients land on the inputs they belong to (by schema name):
    x, params, bn_scale and bn_shift, against the same op run on x_eff = x * scale + shift."""
    from sj_temporal_fusion.functional import parameter_tensor
    g = torch.Generator().manual_seed(0)
    T, B, C, inner = 3, 2, 3, 4
    x = torch.randn(T, B, C, inner, generator=g, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    shift = (torch.randn(C, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    m = REGISTRY["lif"]
    options = dict(m.defaults, tau=2.0)
    p_fold, p_ref = (parameter_tensor(m.param_values(options), torch.float64, x.device)[0].clone().requires_grad_()
                     for _ in range(2))
    v0 = torch.zeros(B, C, inner, dtype=torch.float64)

    def run(x, params, **fold):
        return ops.neuron_forward(
            x=x, v_init=v0, aux_init=v0.new_empty(0), params=params, model="lif", form=m.forward_form(options),
            backward_form=m.form(options), surrogate_id=DEFAULT_ID, surrogate_a=4.0, surrogate_b=0.0,
            param_grad_mask=(1 << params.shape[0]) - 1, store_v_seq=True, save_checkpoints=True, **fold)

    x_eff = (x * scale.view(1, 1, C, 1) + shift.view(1, 1, C, 1)).detach().requires_grad_()
    w = torch.randn(T, B, C, inner, generator=g, dtype=torch.float64)
    (run(x, p_fold, bn_scale=scale, bn_shift=shift, bn_inner=inner, bn_channels=C)[3] * w).sum().backward()
    (run(x_eff, p_ref)[3] * w).sum().backward()
    torch.testing.assert_close(x.grad, x_eff.grad * scale.view(1, 1, C, 1))
    torch.testing.assert_close(scale.grad, (x_eff.grad * x).sum((0, 1, 3)))
    torch.testing.assert_close(shift.grad, x_eff.grad.sum((0, 1, 3)))
    torch.testing.assert_close(p_fold.grad, p_ref.grad)

"""Global-memory traffic of the kernels: the bytes the design says each kernel moves, and the
bytes the host build's counting variant (``-DTF_COUNT_BYTES``: every global load and store in
csrc/temporal.cu goes through ``tf_load`` / ``tf_store``, which count) actually moves.

The design, per neuron-step, in words of the input dtype (w bytes), for a model with S state
variables, a checkpoint every C steps (its header's CHUNK) and states of s bytes (4, 8 for fp64):

    forward, inference   2 words                read x, write spike
    forward, training    2 words + S s / C      + a checkpoint of the state every C steps
    backward             3 words + S s / C      read x and grad_spike, write grad_x; read checkpoints
    store_v_seq          +1 word forward        write v_seq
    grad_v_seq given     +1 word backward       read it

so in the long-T limit (``words_per_neuron_step``), fp32 training moves 20.5 bytes per neuron-step
for IF/LIF/PLIF, QIF and EIF (C = 16), 21 for KLIF (C = 8) and 22 for Izhikevich (S = 2, C = 8).
BatchNorm folded (``fold_bn``): x is the BatchNorm's input, read where the BatchNorm's output
would have been, so the per-step words are unchanged; each neuron's lane reads its channel's scale
and shift once per launch (+2 s per neuron, forward and backward).
Plus O(1) terms per neuron: the initial state read and the final state written (state dtype); the
given final-state gradients read, the initial-state gradients written, and one row per learnable
parameter of per-neuron gradients (backward); and per thread the model's parameters read.
``tests/test_bench_traffic.py`` asserts that the counted bytes equal these for every model, so a
kernel change that adds memory traffic fails CI. The same model is the numerator of the roofline
in ``bench.lif``.

CLI: ``python -m sj_temporal_fusion.bench traffic`` prints counted vs design for every variant.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import _host, ops
from ..neurons import REGISTRY
from ..surrogate import DEFAULT_ID
from . import harness

FORWARD_WORDS = 2   # read x, write spike
BACKWARD_WORDS = 3  # read x and grad_spike, write grad_x


@dataclass(frozen=True)
class Traffic:
    """Bytes read from and written to global memory by one or more kernel launches."""
    read: int
    written: int

    @property
    def total(self) -> int:
        return self.read + self.written

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.read + other.read, self.written + other.written)


def state_bytes(dtype: torch.dtype) -> int:
    return ops.state_dtype(dtype).itemsize


def _param_reads(N: int, dtype: torch.dtype, model: str) -> int:
    # every (emulated) thread reads the model's parameters once
    return -(-N // _host.LANES) * len(REGISTRY[model].params) * state_bytes(dtype)


def forward_traffic(T: int, N: int, dtype: torch.dtype, *, model: str, train: bool, store_v_seq: bool = False,
                    fold_bn: bool = False) -> Traffic:
    """Design bytes of one ``neuron_forward`` launch over x (T, N)."""
    w, s, S = dtype.itemsize, state_bytes(dtype), REGISTRY[model].num_states
    read = T * N * w + S * N * s + _param_reads(N, dtype, model)   # x, initial state, parameters
    if fold_bn:
        read += 2 * N * s                                          # each lane's scale and shift
    written = T * N * w + S * N * s                                # spike, final state
    if store_v_seq:
        written += T * N * w                                       # v_seq
    if train:
        written += ops.num_checkpoints(T, model) * S * N * s
    return Traffic(read, written)


def backward_traffic(T: int, N: int, dtype: torch.dtype, *, model: str, grad_v_seq: bool = False,
                     grad_state_last: int = 0, param_grads: int = 0, fold_bn: bool = False) -> Traffic:
    """Design bytes of one ``neuron_backward`` launch over x (T, N); ``grad_state_last``: how many
    final-state gradients are given, ``param_grads``: how many learnable parameters."""
    w, s, S = dtype.itemsize, state_bytes(dtype), REGISTRY[model].num_states
    read = 2 * T * N * w + ops.num_checkpoints(T, model) * S * N * s + _param_reads(N, dtype, model)
    if grad_v_seq:
        read += T * N * w
    read += grad_state_last * N * s
    if fold_bn:
        read += 2 * N * s                                    # each lane's scale and shift
    written = T * N * w + S * N * s + param_grads * N * s   # grad_x, initial-state grads, parameter grads
    return Traffic(read, written)


def step_traffic(mode: str, T: int, N: int, dtype: torch.dtype, model: str) -> Traffic:
    """Design bytes of one benchmark step of a layer: 'infer' (forward, no grad) or 'train'
    (forward with checkpoints + backward; an unused final state brings no gradient to read)."""
    if mode == "infer":
        return forward_traffic(T, N, dtype, train=False, model=model)
    if mode == "train":
        return forward_traffic(T, N, dtype, train=True, model=model) + backward_traffic(T, N, dtype, model=model)
    raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")


def words_per_neuron_step(mode: str, dtype: torch.dtype, model: str) -> float:
    """The T -> infinity bytes per neuron-step of ``mode``, in bytes (not words)."""
    w, s, m = dtype.itemsize, state_bytes(dtype), REGISTRY[model]
    if mode == "infer":
        return FORWARD_WORDS * w
    return (FORWARD_WORDS + BACKWARD_WORDS) * w + 2 * m.num_states * s / m.chunk


# ---------------------------------------------------------------- counting

@contextlib.contextmanager
def counting():
    """Inside the block the custom ops run the byte-counting host build (single-threaded); each
    launch appends ``(kernel, Traffic)`` to the yielded list (kernel: neuron_forward ...). CPU
    tensors only.

    It swaps ``_host.launch``, the one function through which ``ops`` reaches the host kernels,
    for one that passes ``count_bytes=True`` and reads the counters after each launch."""
    launches: list[tuple[str, Traffic]] = []
    original = _host.launch

    def launch(expression, n, args, acc_is_double, count_bytes=False):
        lib = original(expression, n, args, acc_is_double, count_bytes=True)
        launches.append((expression.split("<")[0], Traffic(int(lib.tf_read_bytes()), int(lib.tf_written_bytes()))))
        return lib

    _host.launch = launch
    try:
        yield launches
    finally:
        _host.launch = original


def _only(launches, kernel: str) -> Traffic:
    found = [t for e, t in launches if e == kernel]
    if len(found) != 1:
        raise RuntimeError(f"expected one launch of {kernel}, saw {[e for e, _ in launches]}: "
                           f"did ops stop launching through _host.launch?")
    return found[0]


def _layer(model: str, dtype: torch.dtype, learnable: bool):
    """A layer of ``model`` with its defaults, and its parameter tensor and learnable mask as
    functional.neuron_multi_step builds them. ``learnable``: with the model's ``learned`` options
    (what its SpikingJelly class learns: PLIF's w, KLIF's k), or where it learns nothing, with a
    learnable v_threshold (every model can learn it)."""
    from ..functional import parameter_tensor
    m = REGISTRY[model]
    o = dict(m.defaults)
    if learnable:  # float values learn; others (PLIF's kind) select the form that learns them
        learned = m.learned or {"v_threshold": float(o["v_threshold"])}
        o.update({k: torch.tensor(v, requires_grad=True) if isinstance(v, float) else v for k, v in learned.items()})
    params, mask = parameter_tensor(m.param_values(o), ops.state_dtype(dtype), torch.device("cpu"))
    return m, o, params.detach(), mask


def _fold_args(N: int, dtype: torch.dtype, fold_bn: bool) -> tuple:
    """(scale, shift, inner, channels) of a BatchNorm over N neurons per step, or ()."""
    if not fold_bn:
        return ()
    inner = next(d for d in (5, 3, 2, 1) if N % d == 0)  # N = 131 (prime): one channel per neuron
    channels = N // inner
    g = torch.Generator().manual_seed(2)
    acc = ops.state_dtype(dtype)
    return (torch.rand(channels, generator=g, dtype=acc) + 0.5, torch.randn(channels, generator=g, dtype=acc) * 0.1,
            inner, channels)


def _forward(model, x, dtype, *, train: bool, store_v_seq: bool, learnable: bool = False, fold_bn: bool = False):
    m, o, params, mask = _layer(model, dtype, learnable)
    acc = ops.state_dtype(dtype)
    z = [torch.zeros(x.shape[1:], dtype=acc) for _ in m.states]
    aux = z[1] if m.num_states == 2 else torch.empty(0, dtype=acc)
    fold = _fold_args(x[0].numel(), dtype, fold_bn)
    out = ops.neuron_forward(x, z[0], aux, params, model, m.forward_form(o), m.form(o), DEFAULT_ID, 4.0, 0.0, mask,
                             store_v_seq, train, *fold)
    return out, params, m.form(o), mask, fold


def _input(T: int, N: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, N, generator=g, dtype=torch.float64) * 0.5 + 0.3).to(dtype)


def count_forward(T: int, N: int, dtype: torch.dtype, *, model: str, train: bool,
                  store_v_seq: bool = False, fold_bn: bool = False) -> Traffic:
    """Counted bytes of one ``sj_temporal_fusion::neuron_forward`` launch."""
    x = _input(T, N, dtype)
    with counting() as launches:
        _forward(model, x, dtype, train=train, store_v_seq=store_v_seq, fold_bn=fold_bn)
    return _only(launches, "neuron_forward")


def count_backward(T: int, N: int, dtype: torch.dtype, *, model: str, grad_v_seq: bool = False,
                   grad_state_last: bool = False, learnable: bool = False, fold_bn: bool = False) -> Traffic:
    """Counted bytes of one ``sj_temporal_fusion::neuron_backward`` launch."""
    x = _input(T, N, dtype)
    (_, _, _, _, checkpoints), params, form, mask, fold = _forward(model, x, dtype, train=True, store_v_seq=False,
                                                                   learnable=learnable, fold_bn=fold_bn)
    g = torch.Generator().manual_seed(1)
    grad = lambda *shape, d=dtype: torch.randn(*shape, generator=g, dtype=torch.float64).to(d)  # noqa: E731
    acc, two = ops.state_dtype(dtype), REGISTRY[model].num_states == 2
    with counting() as launches:
        ops.neuron_backward(grad(T, N), grad(T, N) if grad_v_seq else None,
                            grad(N, d=acc) if grad_state_last else None,
                            grad(N, d=acc) if grad_state_last and two else None, x, checkpoints, params, model,
                            form, DEFAULT_ID, 4.0, 0.0, mask, True, False, *fold)
    return _only(launches, "neuron_backward")


def count_step(mode: str, T: int, N: int, dtype: torch.dtype) -> Traffic:
    """Counted bytes of one benchmark step through the public path: ``functional.lif_multi_step``
    with the Fig. 5 neuron, and for 'train' ``spike.backward(grad)`` through autograd."""
    from ..functional import lif_multi_step
    from spikingjelly.activation_based import surrogate
    x = _input(T, N, dtype)
    kwargs = dict(kind="lif", tau=1.25, decay_input=False, v_threshold=0.3, v_reset=0.0,
                  surrogate_function=surrogate.Sigmoid(alpha=4.0))
    with counting() as launches:
        if mode == "infer":
            with torch.no_grad():
                lif_multi_step(x, **kwargs)
        else:
            x.requires_grad_(True)
            spike, _, _ = lif_multi_step(x, **kwargs)
            spike.backward(torch.ones_like(spike))
    total = Traffic(0, 0)
    for _, t in launches:
        total = total + t
    return total


# ---------------------------------------------------------------- CLI

VARIANT_DTYPES = ("fp32", "fp16", "bf16", "fp64")
# The model counted in every dtype: IF/LIF/PLIF, the neuron of the benchmarks' networks. The
# others in fp32 and bf16 (a 2-byte input with fp32 states): the dtypes change the kernels'
# loads and stores, not the models' code, so this keeps the per-model variants few.
EVERY_DTYPE_MODEL = "lif"


def model_dtypes(model: str, fold_bn: bool) -> tuple[str, ...]:
    if model == EVERY_DTYPE_MODEL:
        return VARIANT_DTYPES
    return ("fp32",) if fold_bn else ("fp32", "bf16")


def variants():
    """Every (model, pass, dtype, store_v_seq, grad_v_seq, grad_state_last, learnable, fold_bn)
    the accounting covers, for every model of the registry: in ``model_dtypes``; with BatchNorm
    folded, the forward (inference and training) and the backward with every gradient."""
    for model in REGISTRY:
        for dtype in model_dtypes(model, fold_bn=False):
            for train, store in itertools.product((False, True), (False, True)):
                yield dict(model=model, pass_="forward-train" if train else "forward-infer", dtype=dtype,
                           store_v_seq=store, grad_v_seq=False, grad_state_last=False, learnable=False,
                           fold_bn=False)
            for gseq, glast, learn in itertools.product((False, True), (False, True), (False, True)):
                if learn and not glast:
                    continue
                yield dict(model=model, pass_="backward", dtype=dtype, store_v_seq=False, grad_v_seq=gseq,
                           grad_state_last=glast, learnable=learn, fold_bn=False)
        for dtype in model_dtypes(model, fold_bn=True):
            for pass_ in ("forward-infer", "forward-train"):
                yield dict(model=model, pass_=pass_, dtype=dtype, store_v_seq=False, grad_v_seq=False,
                           grad_state_last=False, learnable=False, fold_bn=True)
            yield dict(model=model, pass_="backward", dtype=dtype, store_v_seq=False, grad_v_seq=True,
                       grad_state_last=True, learnable=True, fold_bn=True)


def measure_variant(v: dict, T: int, N: int) -> tuple[Traffic, Traffic]:
    """(counted, design) for one variant of ``variants()``."""
    dtype, model = harness.DTYPES[v["dtype"]], v["model"]
    if v["pass_"] == "backward":
        counted = count_backward(T, N, dtype, model=model, grad_v_seq=v["grad_v_seq"],
                                 grad_state_last=v["grad_state_last"], learnable=v["learnable"],
                                 fold_bn=v["fold_bn"])
        mask = _layer(model, dtype, v["learnable"])[3]
        design = backward_traffic(T, N, dtype, grad_v_seq=v["grad_v_seq"], model=model,
                                  grad_state_last=REGISTRY[model].num_states if v["grad_state_last"] else 0,
                                  param_grads=bin(mask).count("1"), fold_bn=v["fold_bn"])
    else:
        train = v["pass_"] == "forward-train"
        counted = count_forward(T, N, dtype, model=model, train=train, store_v_seq=v["store_v_seq"],
                                fold_bn=v["fold_bn"])
        design = forward_traffic(T, N, dtype, train=train, store_v_seq=v["store_v_seq"], model=model,
                                 fold_bn=v["fold_bn"])
    return counted, design


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--T", type=int, default=64, help="time steps (default 64)")
    p.add_argument("--neurons", type=int, default=1000, help="neurons (default 1000)")
    p.add_argument("--out", type=Path, default=None, help="directory for traffic-<device>.json")


def main(args) -> dict:
    T, N = args.T, args.neurons
    rows = []
    for v in variants():
        counted, design = measure_variant(v, T, N)
        rows.append({**{k.rstrip("_"): val for k, val in v.items()}, "T": T, "N": N,
                     "counted": asdict(counted), "design": asdict(design),
                     "counted_bytes_per_neuron_step": counted.total / (T * N),
                     "match": counted == design})
    header = f"{'model':<11}{'pass':<14}{'dtype':<6}{'v_seq':>6}{'g_vseq':>7}{'g_last':>7}{'learn':>6}{'bn':>4}" \
             f"{'counted B/n-step':>18}{'design B/n-step':>17}  ok"
    print(f"global-memory traffic, T={T}, N={N} (host counting build)\n{header}")
    for r in rows:
        design_total = r["design"]["read"] + r["design"]["written"]
        print(f"{r['model']:<11}{r['pass']:<14}{r['dtype']:<6}{r['store_v_seq']!s:>6}{r['grad_v_seq']!s:>7}"
              f"{r['grad_state_last']!s:>7}{r['learnable']!s:>6}{'yes' if r['fold_bn'] else '':>4}"
              f"{r['counted_bytes_per_neuron_step']:>18.4f}"
              f"{design_total / (T * N):>17.4f}  {'yes' if r['match'] else 'NO'}")
    payload = {"benchmark": "traffic", "environment": harness.finish_environment(
        harness.environment(torch.device("cpu"))), "rows": rows}
    if args.out is not None:
        path = harness.write_json(args.out / "traffic-cpu.json", payload)
        print(f"wrote {path}")
    if not all(r["match"] for r in rows):
        raise SystemExit("counted traffic differs from the design for the variants marked NO")
    return payload

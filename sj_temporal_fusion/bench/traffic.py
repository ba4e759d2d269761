"""Global-memory traffic of the kernels: the bytes the design says each kernel moves, and the
bytes the host build's counting variant (``-DLIF_COUNT_BYTES``: every global load and store in
csrc/lif.cu goes through ``lif_load`` / ``lif_store``, which count) actually moves.

The design, per neuron-step, in words of the input dtype (w bytes; state s = 4 bytes, 8 for fp64):

    forward, inference   2 words              read x, write spike
    forward, training    2 words + s/16       + a checkpoint of v every ops.CHUNK = 16 steps
    backward             3 words + s/16       read x and grad_spike, write grad_x; read checkpoints
    store_v_seq          +1 word forward      write v_seq
    grad_v_seq given     +1 word backward     read it

plus per-neuron O(1) terms: v_init read and v_last write (forward); grad_v_last read when given,
grad_v_init write, and PLIF's per-neuron dL/dk write in the state dtype (backward).
``tests/test_bench_traffic.py`` asserts that the counted bytes equal these, so a kernel change that
adds memory traffic fails CI. The same model is the numerator of the roofline in ``bench.lif``.

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


def forward_traffic(T: int, N: int, dtype: torch.dtype, *, train: bool,
                    store_v_seq: bool = False) -> Traffic:
    """Design bytes of one ``lif_forward`` launch over x (T, N)."""
    w = dtype.itemsize
    read = T * N * w + N * w                   # x, v_init
    written = T * N * w + N * w                # spike, v_last
    if store_v_seq:
        written += T * N * w                   # v_seq
    if train:
        written += ops.num_checkpoints(T) * N * state_bytes(dtype)
    return Traffic(read, written)


def backward_traffic(T: int, N: int, dtype: torch.dtype, *, grad_v_seq: bool = False,
                     grad_v_last: bool = False, grad_k: bool = False) -> Traffic:
    """Design bytes of one ``lif_backward`` launch over x (T, N)."""
    w, s = dtype.itemsize, state_bytes(dtype)
    read = 2 * T * N * w + ops.num_checkpoints(T) * N * s   # x, grad_spike, checkpoints
    if grad_v_seq:
        read += T * N * w
    if grad_v_last:
        read += N * w
    written = T * N * w + N * w                              # grad_x, grad_v_init
    if grad_k:
        written += N * s                                     # PLIF: per-neuron dL/dk
    return Traffic(read, written)


def step_traffic(mode: str, T: int, N: int, dtype: torch.dtype) -> Traffic:
    """Design bytes of one benchmark step of an LIF layer: 'infer' (forward, no grad) or 'train'
    (forward with checkpoints + backward; an unused v_last brings no gradient to read)."""
    if mode == "infer":
        return forward_traffic(T, N, dtype, train=False)
    if mode == "train":
        return forward_traffic(T, N, dtype, train=True) + backward_traffic(T, N, dtype)
    raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")


def words_per_neuron_step(mode: str, dtype: torch.dtype) -> float:
    """The T -> infinity bytes per neuron-step of ``mode``, in bytes (not words)."""
    w, s = dtype.itemsize, state_bytes(dtype)
    if mode == "infer":
        return FORWARD_WORDS * w
    return (FORWARD_WORDS + BACKWARD_WORDS) * w + 2 * s / ops.CHUNK


# ---------------------------------------------------------------- counting

@contextlib.contextmanager
def counting():
    """Inside the block the custom ops run the byte-counting host build (single-threaded); each
    launch appends ``(entry, Traffic)`` to the yielded list. CPU tensors only.

    It swaps ``_host.launch``, the one function through which ``ops`` reaches the host kernels,
    for one that passes ``count_bytes=True`` and reads the counters around each launch."""
    launches: list[tuple[str, Traffic]] = []
    original = _host.launch

    def launch(entry, dtype, surrogate_id, args, count_bytes=False):
        lib = _host.library(True)  # the very library _host.call(count_bytes=True) runs
        lib.tf_reset_byte_counts()
        original(entry, dtype, surrogate_id, args, count_bytes=True)
        launches.append((entry, Traffic(int(lib.tf_bytes_read()), int(lib.tf_bytes_written()))))

    _host.launch = launch
    try:
        yield launches
    finally:
        _host.launch = original


def _only(launches, entry: str) -> Traffic:
    found = [t for e, t in launches if e == entry]
    if len(found) != 1:
        raise RuntimeError(f"expected one launch of {entry}, saw {[e for e, _ in launches]}: "
                           f"did ops stop launching through _host.launch?")
    return found[0]


_LIF = dict(tau=1.25, keep=0.2, v_threshold=0.3, v_reset=0.0, decay_input=False, hard_reset=True,
            detach_reset=False, surrogate_id=2, surrogate_a=4.0, surrogate_b=0.0)  # Fig. 5, Sigmoid(4)


def _inputs(T: int, N: int, dtype: torch.dtype, kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, N, generator=g, dtype=torch.float64) * 0.5 + 0.3).to(dtype)
    v = torch.zeros(N, dtype=dtype)
    k_tensor = _plif_k(0.2, dtype) if kind == "plif" else None
    return x, v, k_tensor


def _plif_k(k: float, dtype: torch.dtype) -> torch.Tensor:
    # PLIF's decay as functional.lif_multi_step hands it to the ops: (sigmoid(w), 1 - sigmoid(w)).
    return torch.tensor([k, 1.0 - k], dtype=ops.state_dtype(dtype))


def _forward(x, v, k_tensor, *, train: bool, store_v_seq: bool):
    kind = ops.Kind.PLIF if k_tensor is not None else ops.Kind.LIF
    o = _LIF
    return ops.lif_forward(x, v, k_tensor, o["tau"], o["keep"], o["v_threshold"], o["v_reset"], int(kind),
                           o["decay_input"], o["hard_reset"], o["detach_reset"], o["surrogate_id"],
                           o["surrogate_a"], o["surrogate_b"], store_v_seq, train)


def count_forward(T: int, N: int, dtype: torch.dtype, *, kind: str = "lif", train: bool,
                  store_v_seq: bool = False) -> Traffic:
    """Counted bytes of one ``sj_temporal_fusion::lif_forward`` launch."""
    x, v, k_tensor = _inputs(T, N, dtype, kind)
    with counting() as launches:
        _forward(x, v, k_tensor, train=train, store_v_seq=store_v_seq)
    return _only(launches, "tf_lif_forward")


def count_backward(T: int, N: int, dtype: torch.dtype, *, kind: str = "lif", grad_v_seq: bool = False,
                   grad_v_last: bool = False) -> Traffic:
    """Counted bytes of one ``sj_temporal_fusion::lif_backward`` launch (PLIF asks for dL/dk)."""
    x, v, k_tensor = _inputs(T, N, dtype, kind)
    _, _, _, checkpoints = _forward(x, v, k_tensor, train=True, store_v_seq=False)
    g = torch.Generator().manual_seed(1)
    grad = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    kind_id = ops.Kind.PLIF if k_tensor is not None else ops.Kind.LIF
    o = _LIF
    with counting() as launches:
        ops.lif_backward(grad(T, N), grad(T, N) if grad_v_seq else None, grad(N) if grad_v_last else None,
                         x, checkpoints, k_tensor, o["tau"], o["keep"], o["v_threshold"], o["v_reset"],
                         int(kind_id), o["decay_input"], o["hard_reset"], o["detach_reset"],
                         o["surrogate_id"], o["surrogate_a"], o["surrogate_b"], k_tensor is not None)
    return _only(launches, "tf_lif_backward")


def count_step(mode: str, T: int, N: int, dtype: torch.dtype) -> Traffic:
    """Counted bytes of one benchmark step through the public path: ``functional.lif_multi_step``
    with the Fig. 5 neuron, and for 'train' ``spike.backward(grad)`` through autograd."""
    from ..functional import lif_multi_step
    from spikingjelly.activation_based import surrogate
    x, _, _ = _inputs(T, N, dtype, "lif")
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


def variants():
    """Every (pass, dtype, kind, store_v_seq, grad_v_seq, grad_v_last) the accounting covers."""
    for dtype, kind in itertools.product(VARIANT_DTYPES, ("lif", "plif")):
        for train, store in itertools.product((False, True), (False, True)):
            yield dict(pass_="forward-train" if train else "forward-infer", dtype=dtype, kind=kind,
                       store_v_seq=store, grad_v_seq=False, grad_v_last=False)
        for gseq, glast in itertools.product((False, True), (False, True)):
            yield dict(pass_="backward", dtype=dtype, kind=kind, store_v_seq=False, grad_v_seq=gseq,
                       grad_v_last=glast)


def measure_variant(v: dict, T: int, N: int) -> tuple[Traffic, Traffic]:
    """(counted, design) for one variant of ``variants()``."""
    dtype = harness.DTYPES[v["dtype"]]
    if v["pass_"] == "backward":
        counted = count_backward(T, N, dtype, kind=v["kind"], grad_v_seq=v["grad_v_seq"],
                                 grad_v_last=v["grad_v_last"])
        design = backward_traffic(T, N, dtype, grad_v_seq=v["grad_v_seq"], grad_v_last=v["grad_v_last"],
                                  grad_k=v["kind"] == "plif")
    else:
        train = v["pass_"] == "forward-train"
        counted = count_forward(T, N, dtype, kind=v["kind"], train=train, store_v_seq=v["store_v_seq"])
        design = forward_traffic(T, N, dtype, train=train, store_v_seq=v["store_v_seq"])
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
    header = f"{'pass':<14}{'dtype':<6}{'kind':<5}{'v_seq':>6}{'g_vseq':>7}{'g_vlast':>8}" \
             f"{'counted B/n-step':>18}{'design B/n-step':>17}  ok"
    print(f"global-memory traffic, T={T}, N={N} (host counting build)\n{header}")
    for r in rows:
        design_total = r["design"]["read"] + r["design"]["written"]
        print(f"{r['pass']:<14}{r['dtype']:<6}{r['kind']:<5}{r['store_v_seq']!s:>6}{r['grad_v_seq']!s:>7}"
              f"{r['grad_v_last']!s:>8}{r['counted_bytes_per_neuron_step']:>18.4f}"
              f"{design_total / (T * N):>17.4f}  {'yes' if r['match'] else 'NO'}")
    payload = {"benchmark": "traffic", "environment": harness.finish_environment(
        harness.environment(torch.device("cpu"))), "rows": rows}
    if args.out is not None:
        path = harness.write_json(args.out / "traffic-cpu.json", payload)
        print(f"wrote {path}")
    if not all(r["match"] for r in rows):
        raise SystemExit("counted traffic differs from the design for the variants marked NO")
    return payload

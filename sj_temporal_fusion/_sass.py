"""GPU machine code without a GPU: ptxas's report of the kernel variants compiled by ``_nvrtc``
(the same compile, options and sm_XY machine code the launcher loads, plus
``--ptxas-options=-v``, which only adds the report to NVRTC's log and does not change the code),
read into each kernel's registers, spills and stack (local memory), and the occupancy they allow.

    python -m sj_temporal_fusion._sass            # markdown table of every variant, sm_80 + sm_90

Occupancy (``occupancy``): sm_80 and sm_90 have 65,536 32-bit registers and at most 2,048
resident threads (64 warps, 32 blocks) per SM; registers are allocated per warp in units of 256
(a thread's count rounded up to a multiple of 8). A block of B threads fits when its warps'
registers fit in the file; resident blocks = min(32, 2048 // B, 65536 // (B/32 * per-warp regs)).
At B = 256: <= 64 registers per thread gives >= 50% occupancy (1,024 threads).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional, Sequence

ARCHS = ("80", "90")
REGISTER_FILE = 65536        # 32-bit registers per SM, sm_80 and sm_90
MAX_THREADS_PER_SM = 2048    # sm_80 and sm_90
MAX_BLOCKS_PER_SM = 32
REGISTER_UNIT_PER_WARP = 256  # allocation granularity: 8 registers per thread x 32 lanes
MIN_OCCUPANCY = 0.5


@dataclasses.dataclass
class KernelResources:
    """ptxas's report for one compiled kernel variant on one architecture."""
    name: str            # the name expression, e.g. 'neuron_forward<LifModel, float, 0>'
    arch: str            # '80', '90'
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int     # per-thread stack frame: local memory
    mangled: str = ""

    @property
    def uses_local_memory(self) -> bool:
        return self.stack_bytes > 0 or self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def warp_registers(registers: int) -> int:
    """Registers one warp of a kernel using ``registers`` per thread occupies in the file."""
    return -(-registers * 32 // REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP


def fits(registers: int, block: int) -> bool:
    """Whether a block of ``block`` threads can launch at all (else CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES)."""
    warps = -(-block // 32)
    return block <= 1024 and warps * warp_registers(registers) <= REGISTER_FILE


def occupancy(registers: int, block: int) -> float:
    """Fraction of the SM's 2,048 thread slots resident at ``registers`` per thread and ``block``
    threads per block, limited by registers only (no shared memory is used)."""
    warps = -(-block // 32)
    if not fits(registers, block):
        return 0.0
    blocks = min(MAX_BLOCKS_PER_SM, MAX_THREADS_PER_SM // block,
                 REGISTER_FILE // (warps * warp_registers(registers)))
    return blocks * block / MAX_THREADS_PER_SM


def max_registers_for(occupancy_floor: float, block: int) -> int:
    """The largest register count whose occupancy at ``block`` is >= ``occupancy_floor``."""
    best = 0
    for r in range(1, 256):
        if occupancy(r, block) >= occupancy_floor:
            best = r
    return best


_ENTRY = re.compile(r"Compiling entry function '(?P<mangled>[^']+)' for 'sm_(?P<arch>\d+)'")
_FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_REGS = re.compile(r"Used (?P<regs>\d+) registers")


def parse_ptxas_log(log: str, mapping: dict, arch: str) -> list[KernelResources]:
    """KernelResources per entry function in a ``ptxas -v`` report; names from ``mapping``."""
    by_mangled = {m: n for n, m in mapping.items()}
    out, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = KernelResources(by_mangled.get(m["mangled"], m["mangled"]), m["arch"], -1, 0, 0, 0,
                                      m["mangled"])
            out.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = (
                int(m["stack"]), int(m["st"]), int(m["ld"]))
        elif current is not None and (m := _REGS.search(line)):
            current.registers = int(m["regs"])
    if any(r.registers < 0 for r in out):
        raise RuntimeError(f"ptxas report without a register count:\n{log}")
    return out


def resources(source: str, options: Sequence[str], name_expressions: Sequence[str],
              arch: str) -> list[KernelResources]:
    """Registers, spills and stack of every kernel in ``name_expressions`` on ``sm_<arch>``, in
    the order given."""
    from . import _nvrtc
    _, mapping, log = _nvrtc.compile_cubin(source, options, name_expressions, arch, verbose=True)
    found = {r.name: r for r in parse_ptxas_log(log, mapping, arch)}
    missing = [n for n in name_expressions if n not in found]
    if missing:
        raise RuntimeError(f"ptxas reported nothing for {missing}:\n{log}")
    return [found[n] for n in name_expressions]


def package_resources(archs: Iterable[str] = ARCHS, options: Optional[Sequence[str]] = None,
                      name_expressions: Optional[Sequence[str]] = None) -> dict[str, list[KernelResources]]:
    """``resources`` of the package's kernels (``_nvrtc.source()``, ``_nvrtc.OPTIONS``,
    ``_nvrtc.all_name_expressions()``) per architecture; the architectures compile in parallel
    (NVRTC releases the GIL: both archs of every variant, 379 with five models, take minutes on
    2 cores). Cached per
    (source, options, names, archs) for the process, so several tests share one compile."""
    from . import _nvrtc
    options = tuple(_nvrtc.OPTIONS if options is None else options)
    names = tuple(_nvrtc.all_name_expressions() if name_expressions is None else name_expressions)
    return _package_resources(_nvrtc.source(), options, names, tuple(archs))


@functools.lru_cache(maxsize=8)
def _package_resources(source: str, options: tuple, names: tuple, archs: tuple):
    with ThreadPoolExecutor(max_workers=len(archs)) as pool:
        results = list(pool.map(lambda a: resources(source, options, names, a), archs))
    return dict(zip(archs, results))


def param_grads_of(name: str) -> bool:
    """'neuron_backward<LifModel, float, 2, 5, true, ...>' -> True: the variant with parameter
    gradients (template argument PGRAD, the fifth)."""
    args = [a.strip() for a in name.split("<", 1)[1].rstrip(">").split(",")]
    return name.startswith("neuron_backward<") and len(args) >= 5 and args[4] == "true"


def dtype_of(name: str) -> str:
    """'neuron_backward<LifModel, bf16_t, 2, 8, true>' -> 'bf16_t'."""
    args = [a.strip() for a in name.split("<", 1)[1].rstrip(">").split(",")]
    return next(a for a in args if a in ("float", "double", "f16_t", "bf16_t"))


def markdown_table(per_arch: dict[str, list[KernelResources]], block: int) -> str:
    """One row per (kernel, dtype): registers on each architecture (min-max over surrogate
    variants), spills and stack (worst variant), occupancy at ``block`` (worst variant)."""
    archs = list(per_arch)
    groups: dict[tuple[str, str], dict[str, list[KernelResources]]] = {}
    for arch, rows in per_arch.items():
        for r in rows:
            groups.setdefault((r.name.split("<")[0], dtype_of(r.name)), {}).setdefault(arch, []).append(r)
    head = ["kernel", "dtype", "variants"] + [f"regs sm_{a}" for a in archs] + [
        "spill / stack bytes", f"occupancy at {block} threads"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, dtype), by_arch in groups.items():
        cells = [f"`{kernel}`", dtype, str(len(by_arch[archs[0]]))]
        worst_local, worst_occ = 0, 1.0
        for a in archs:
            regs = [r.registers for r in by_arch[a]]
            cells.append(f"{min(regs)}" if min(regs) == max(regs) else f"{min(regs)}-{max(regs)}")
            worst_local = max(worst_local, *(r.stack_bytes + r.spill_store_bytes + r.spill_load_bytes
                                             for r in by_arch[a]))
            worst_occ = min(worst_occ, *(occupancy(r.registers, block) for r in by_arch[a]))
        cells += [str(worst_local), f"{worst_occ:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import sys

    from . import _nvrtc
    p = argparse.ArgumentParser(prog="python -m sj_temporal_fusion._sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default=",".join(ARCHS), help="e.g. 80,90")
    args = p.parse_args(argv)
    per_arch = package_resources(args.archs.split(","))
    major, minor = _nvrtc.nvrtc_version()
    print(f"NVRTC {major}.{minor} (its ptxas), options {' '.join(_nvrtc.compile_options(_nvrtc.OPTIONS[:-1], '<arch>'))}, "
          f"block {_nvrtc.BLOCK}\n", file=sys.stderr)
    print(markdown_table(per_arch, _nvrtc.BLOCK))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The NCCL smoke run (sj_temporal_fusion/distributed/smoke.py) on the CPU: the host build, and
NCCL's rules emulated (_nccl_emulation.py) under the transport's own watchdog. ``./dev gpu
--cpu-smoke`` runs it; so do the tests. Arguments as the smoke command's, the device the CPU:

    python tests/_smoke_on_cpu.py --json out.json
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_smoke_on_cpu.py --ranks
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _nccl_emulation, when run as a script

from _nccl_emulation import nccl_transport  # noqa: E402
from sj_temporal_fusion.distributed import smoke  # noqa: E402


def main(argv=None) -> int:
    return smoke.main(["--device", "cpu", *(sys.argv[1:] if argv is None else argv)], make_nccl=nccl_transport)


if __name__ == "__main__":
    smoke.exit_process(main())

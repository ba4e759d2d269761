"""python -m sj_temporal_fusion.bench {lif,memory,net,traffic,tune,shard} [options]; --help on each."""
from __future__ import annotations

import argparse
import sys
import warnings

BENCHMARKS = ("lif", "memory", "net", "traffic", "tune", "shard")


def parser() -> argparse.ArgumentParser:
    from . import lif, memory, net, shard, traffic, tune
    p = argparse.ArgumentParser(prog="python -m sj_temporal_fusion.bench", description=__doc__)
    sub = p.add_subparsers(dest="benchmark", required=True)
    for name, module in (("lif", lif), ("memory", memory), ("net", net), ("traffic", traffic), ("tune", tune), ("shard", shard)):
        s = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0],
                           description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name != "traffic":
            s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
            s.add_argument("--out", default="bench-results", help="output directory (default bench-results)")
            s.add_argument("--name", default=None, help=f"file name stem (default {name}-<device type>)")
            s.add_argument("--no-plots", action="store_true", help="write JSON and CSV only")
            s.add_argument("--quiet", action="store_true", help="no progress bar")
            s.add_argument("--cpu-allocator", default="system", choices=("system", "retain"),
                           help="glibc as configured (default), or keep freed memory mapped like "
                                "CUDA's caching allocator: see harness.configure_cpu_allocator")
        s.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
        module.add_arguments(s)
        s.set_defaults(module=module)
    return p


def main(argv=None):
    # SpikingJelly's TorchScript helpers warn on import under torch >= 2.9; not ours to fix.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    args = parser().parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "cpu_allocator", None) is not None:
        from .harness import configure_cpu_allocator
        args.cpu_allocator_setting = configure_cpu_allocator(args.cpu_allocator)
    return args.module.main(args)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

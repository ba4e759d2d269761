"""Where a run executes: device choice, torchrun process group, clocks that wait for the device,
peak memory, and the versions and hardware a result must carry to be compared."""
from __future__ import annotations

import datetime
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    world: int = 1
    rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sync(self) -> None:
        """Wait for the device's queued work: call before every clock read."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clock(self) -> float:
        self.sync()
        return time.perf_counter()

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max over the processes (identity for one process)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; a CUDA request on a machine without one is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for but torch.cuda.is_available() is False "
                              f"(no GPU, or a CPU-only torch build): use --device cpu or auto")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for but only {torch.cuda.device_count()} "
                              f"CUDA devices are visible")
        device = torch.device("cuda", index)
    return device


def start(device_name: str) -> Runtime:
    """The runtime of this process; under torchrun (WORLD_SIZE > 1) it joins the process group,
    NCCL on GPUs and gloo on the CPU, and takes cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=30))
    return Runtime(device, dist.get_world_size(), rank)


def stop(runtime: Runtime) -> None:
    if runtime.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """CUDA: the allocator's peak since the last reset; CPU: the process's peak resident set
    (it cannot be reset, so it covers everything this process did before)."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)),
                "kind": "torch.cuda.max_memory_allocated"}
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "kind": "peak resident set size of the process (ru_maxrss)"}


def environment(runtime: Runtime) -> dict:
    """Versions, commit and hardware of this run (``sj_temporal_fusion.environment`` collects
    them; the layout is the one metrics.json has always had)."""
    import sj_temporal_fusion
    from sj_temporal_fusion import environment as shared_env

    common = shared_env.collect(runtime.device)
    v = common["versions"]
    device = {"type": runtime.device.type, "world_size": runtime.world,
              "cpu": common["cpu"], "cpu_count": common["cpu_count"], "torch_threads": common["torch_threads"]}
    if runtime.device.type == "cuda":
        gpu = common["gpu"]
        device.update(name=gpu["name"], capability=gpu["capability"], memory_bytes=gpu["memory_bytes"],
                      count=torch.cuda.device_count())
    else:
        device["name"] = device["cpu"]
    return {
        "versions": {
            "python": v["python"], "torch": torch.__version__,
            "spikingjelly": v["spikingjelly"], "sj_temporal_fusion": sj_temporal_fusion.__version__,
            "torchvision": v["torchvision"], "cupy": v["cupy-cuda13x"] or v["cupy-cuda12x"] or v["cupy"],
            "numpy": v["numpy"], "cuda": common["cuda"],
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        },
        "git": common["git"],
        "device": device,
        "platform": common["platform"],
        "command": [Path(sys.argv[0]).name] + sys.argv[1:],
    }

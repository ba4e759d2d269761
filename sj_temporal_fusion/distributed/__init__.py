"""Time sharding: a layer's T time steps split over the ranks of a process group, exact (spikes and
v bit for bit equal to one device) and parallel (speculative forward with a short fix-up; backward
as an affine scan). See docs/time_sharding.md.

    # torchrun --nproc-per-node 4 script.py
    dist.init_process_group()                  # NCCL on GPUs, gloo on CPU
    node = TimeShardedNode(neuron.LIFNode(tau=1.25, decay_input=False, v_threshold=0.3, step_mode='m'))
    y_local = node(x_local)                    # x_local: this rank's contiguous (T_j, *) slice

Whole networks: ``shard_network(net)`` wraps every neuron, synchronises batch norm over the group;
``time_mean`` reduces outputs over time; ``sync_gradients`` sums parameter gradients.
"""
from .network import TimeSyncBatchNorm, shard_network, sync_gradients, time_mean, time_sum
from .node import TimeShardedNode, shard_input, time_slice
from .errors import TimeShardingError

__all__ = ["TimeShardedNode", "TimeShardingError", "TimeSyncBatchNorm", "shard_input", "shard_network",
           "sync_gradients", "time_mean", "time_slice", "time_sum"]

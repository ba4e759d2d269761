"""LIF T=32 N=262144 fp32 on the CPU: SpikingJelly 2's own path vs set_backend 'temporal_fusion', interleaved."""
import statistics, time, torch, sj_temporal_fusion
from spikingjelly.activation_based import neuron, functional, surrogate
T, N = 32, 262144
g = torch.Generator().manual_seed(0)
x = torch.rand(T, N, generator=g) * 0.5
def make(fused):
    n = neuron.LIFNode(tau=1.25, decay_input=False, v_threshold=0.3, surrogate_function=surrogate.Sigmoid(alpha=4.), step_mode="m")
    if fused: sj_temporal_fusion.set_backend(n, "temporal_fusion")
    return n
nodes = {"spikingjelly2": make(False), "temporal_fusion": make(True)}
# correctness first
ys = {k: n(x) for k, n in nodes.items()}; assert torch.equal(ys["spikingjelly2"], ys["temporal_fusion"])
def infer(n):
    functional.reset_net(n)
    with torch.no_grad(): n(x)
def train(n):
    functional.reset_net(n); xi = x.clone().requires_grad_(); n(xi).sum().backward()
res = {}
for mode, fn in (("infer", infer), ("train", train)):
    for n in nodes.values(): fn(n); fn(n)  # warm-up
    times = {k: [] for k in nodes}
    for _ in range(7):
        for k, n in nodes.items():
            t0 = time.perf_counter(); fn(n); times[k].append((time.perf_counter() - t0) * 1e3)
    for k, v in times.items():
        print(f"{mode:6s} {k:16s} median {statistics.median(v):7.1f} ms  [{min(v):.1f}, {max(v):.1f}]")
    print(f"{mode:6s} speedup {statistics.median(times['spikingjelly2'])/statistics.median(times['temporal_fusion']):.2f}x")
print(torch.__version__, torch.get_num_threads(), "threads")

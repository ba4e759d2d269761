"""Benchmarks of the temporal-fusion kernels: ``python -m sj_temporal_fusion.bench <name>``.

    lif      one LIF layer (the paper's Fig. 5): time vs T per method, speedup, roofline
    memory   peak memory of one training step: an LIF layer and Spiking-ResNet18, per method
    traffic  global-memory bytes each kernel moves (host counting build) against the design
    tune     launch-shape sweep: BLOCK x LANES of the NVRTC build on CUDA, LANES of the host build

One shared harness (``harness``: timing, copy bandwidth, environment, writers) and one module per
benchmark, each with one setup per method. Results: JSON (environment, config, every figure),
CSV, PNG; see docs/performance.md.
"""

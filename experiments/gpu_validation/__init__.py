"""./dev gpu: everything only a GPU can show, in one command, within 8 minutes on one H100, with
no network: the doctor, the GPU tests, bench lif / memory / net, the NCCL smoke run and, when
``ncu`` is on the PATH, DRAM throughput and achieved occupancy of each of our kernels.

    ./dev gpu                               # on a GPU machine: writes docs/results/gpu-<gpu>-<date>-<commit>/
    ./dev gpu --cpu-smoke --out /tmp/smoke  # the same pipeline on the CPU with small sizes (CI runs it)

After the doctor, the prebuild stage builds every kernel variant the later stages launch, host
and GPU, in parallel (``variants.py`` finds them by running each stage's workload at tiny sizes
with launches recorded, not run), so no stage's budget is spent compiling. Each stage runs in its
own process with its own time budget; a stage that overruns is cut (its process group killed),
says so, and the next stage starts: a slow stage cannot eat the others. Each stage records the
variants it launches, and one that was not prebuilt is named in its row. The benchmarks write
their rows as they finish, so a cut stage keeps what it measured. Stages that need CUDA (the GPU
tests, ncu) are skipped on the CPU, each saying so. Results: ``validation.json`` (every stage's
status, seconds, command, log tail), ``summary.md`` (a short digest) and each stage's own files,
in a folder named by GPU, date and commit.

Modules, one job each: ``run`` (the command line and the run), ``stage`` (a stage's process,
budget and record), ``stages`` (what each stage runs, and its budget), ``variants`` (the variants
each stage needs, and the prebuild), ``record`` (launches recorded in a stage's process), ``ncu``
(the profiler's command and CSV), ``summary`` (summary.md).
"""

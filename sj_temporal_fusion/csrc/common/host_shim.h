// What lets g++ compile the kernels for the CPU: CUDA qualifiers become plain inline functions and
// host_launch() runs the grid with OpenMP. Two shapes of "thread":
//   default         one emulated thread per block (blockDim.x = 1), so its TF_LANES lanes are
//                   contiguous neurons and the lane loop vectorises (the fast CPU path);
//   TF_EMULATE_GPU  TF_EMU_BLOCK emulated threads per block whose lanes are blockDim.x apart, with
//                   the GPU's unrolled, length-guarded chunk loops and loads issued ahead (lanes.cuh):
//                   the GPU build's code shape, run on the CPU so CI executes it.
#pragma once
#include <math.h>
// glibc's libmvec has SIMD variants of expf and exp; declaring them (with -fno-math-errno) lets
// g++ vectorise lane loops that call them, as the Sigmoid, PiecewiseExp, Erf and S2NN
// surrogates' derivatives and EIF's charge do. Link -lmvec; only where _host.py defines TF_LIBMVEC.
#ifdef TF_LIBMVEC
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
double exp(double);
}
#endif
#include <cstring>
#include <omp.h>
#include <type_traits>
#include <utility>

#define __global__
#define __host__
#define __device__
#define __forceinline__ inline

struct tf_block_index { long long x; };
static thread_local tf_block_index blockIdx;
#ifdef TF_EMULATE_GPU
#ifndef TF_EMU_BLOCK
#define TF_EMU_BLOCK 4
#endif
struct tf_block_dim { static constexpr long long x = TF_EMU_BLOCK; };
struct tf_thread_index { long long x; };
static thread_local tf_thread_index threadIdx;
#else
#define TF_EMU_BLOCK 1
struct tf_block_dim { static constexpr long long x = 1; };
struct tf_thread_index { static constexpr long long x = 0; };
static constexpr tf_thread_index threadIdx{};
#endif
static constexpr tf_block_dim blockDim{};

#ifdef TF_COUNT_BYTES
// Byte-accounting build: every global load and store is counted (run it single-threaded).
static unsigned long long tf_bytes_read = 0, tf_bytes_written = 0;
#define TF_COUNT_READ(n) (tf_bytes_read += (n))
#define TF_COUNT_WRITE(n) (tf_bytes_written += (n))
#else
#define TF_COUNT_READ(n) ((void)0)
#define TF_COUNT_WRITE(n) ((void)0)
#endif

template <typename Kernel, typename... Args>
static void host_launch(long long blocks, int threads, Kernel kernel, Args... args) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long long b = 0; b < blocks; ++b) {
    blockIdx.x = b;
#ifdef TF_EMULATE_GPU
    for (long long t = 0; t < TF_EMU_BLOCK; ++t) {
      threadIdx.x = t;
      kernel(args...);
    }
#else
    kernel(args...);
#endif
  }
}

// cuLaunchKernel's calling convention on the host: args[i] points at the i-th argument's value,
// so one C entry point (tf_launch) serves every kernel variant whatever its parameter list.
template <typename... A, std::size_t... I>
static void host_launch_packed(void (*kernel)(A...), void** args, long long blocks, int threads,
                               std::index_sequence<I...>) {
  host_launch(blocks, threads, kernel, *static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <typename... A>
static void host_launch_packed(void (*kernel)(A...), void** args, long long blocks, int threads) {
  host_launch_packed(kernel, args, blocks, threads, std::index_sequence_for<A...>{});
}

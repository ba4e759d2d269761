// What lets g++ compile lif.cu for the host: CUDA qualifiers become plain inline functions,
// and a "block" is one emulated thread with blockDim.x = 1, so its LIF_LANES lanes are
// contiguous neurons and the lane loop vectorises. host_launch() runs the grid with OpenMP.
#pragma once
#include <math.h>
// glibc's libmvec has SIMD variants of expf and exp; declaring them (with -fno-math-errno) lets
// g++ vectorise lane loops that call them, as the Sigmoid, PiecewiseExp, Erf and S2NN
// surrogates' derivatives do (fp32 backward, T=32, N=262,144, 1 thread: 78 -> 26 ms). Link -lmvec.
// Only where _host.py found libmvec (x86-64 glibc) and defined LIF_LIBMVEC.
#ifdef LIF_LIBMVEC
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
double exp(double);
}
#endif
#include <cstring>
#include <omp.h>
#include <utility>

#define __global__
#define __host__
#define __device__
#define __forceinline__ inline


struct lif_block_index { long long x; };
struct lif_block_dim { static constexpr long long x = 1; };
struct lif_thread_index { static constexpr long long x = 0; };
static thread_local lif_block_index blockIdx;
static constexpr lif_block_dim blockDim{};
static constexpr lif_thread_index threadIdx{};

#ifdef LIF_COUNT_BYTES
// Byte-accounting build: every global load and store is counted (run it single-threaded).
static unsigned long long lif_bytes_read = 0, lif_bytes_written = 0;
#define LIF_COUNT_READ(n) (lif_bytes_read += (n))
#define LIF_COUNT_WRITE(n) (lif_bytes_written += (n))
#else
#define LIF_COUNT_READ(n) ((void)0)
#define LIF_COUNT_WRITE(n) ((void)0)
#endif

// Calls body(form, hard) with both as std::integral_constant, so the kernel's time loop is
// compiled once per charge formula and reset kind (16 copies) with no branch in the lane loop.
template <typename Body, int... F>
static void host_dispatch_forms(int form, bool hard, Body body, std::integer_sequence<int, F...>) {
  ((form == F ? (hard ? body(std::integral_constant<int, F>{}, std::integral_constant<int, 1>{})
                      : body(std::integral_constant<int, F>{}, std::integral_constant<int, 0>{}),
                 0)
              : 0),
   ...);
}

template <int COUNT, typename Body>
static void host_dispatch_forms(int form, bool hard, Body body) {
  host_dispatch_forms(form, hard, body, std::make_integer_sequence<int, COUNT>{});
}

template <typename Kernel, typename... Args>
static void host_launch(long long blocks, int threads, Kernel kernel, Args... args) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long long b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    kernel(args...);
  }
}

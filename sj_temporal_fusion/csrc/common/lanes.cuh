// How a thread walks its neurons and time steps. One thread owns TF_LANES neurons and runs the
// whole time loop; sequences are (T, N) contiguous, neuron i of step t at t * N + i (64-bit).
//   GPU shape (NVRTC, and the host's TF_EMULATE_GPU build): lanes blockDim.x apart (coalesced),
//     chunk loops fully unrolled with a length guard (register arrays), x loaded a chunk ahead.
//   CPU shape (the host's default build): lanes contiguous so the lane loop vectorises, plain
//     chunk loops, x read where it is used.
#pragma once
#include "common/fp.cuh"

#ifndef TF_LANES
#define TF_LANES 1
#endif
// A model keeps a checkpoint of its state every M::CHUNK steps (16, or 8 where a step's backward
// needs more registers: two state variables, KLIF); the backward holds one chunk's states and
// inputs in registers, so CHUNK bounds its register use.
#define CHUNK_OF(M) ((int)M::CHUNK)

// Loops over a model's state variables and parameters (a few, known at compile time): unrolled
// early on the host, so they leave no loop inside the lane loop.
#ifdef __CUDACC__
#define TF_UNROLL _Pragma("unroll")
#else
#define TF_UNROLL _Pragma("GCC unroll 16")
#endif

#if defined(__CUDACC__) || defined(TF_EMULATE_GPU)
#define TF_GPU_SHAPE 1
#define TF_LANE_STRIDE ((long long)blockDim.x)
#define LANE_FOR(l, nl) _Pragma("unroll") for (int l = 0; l < TF_LANES; ++l) if (l < (nl))
#define CHUNK_UP(j, len, C) _Pragma("unroll") for (int j = 0; j < (C); ++j) if (j < (len))
#define CHUNK_DOWN(j, len, C) _Pragma("unroll") for (int j = (C) - 1; j >= 0; --j) if (j < (len))
#else
#define TF_GPU_SHAPE 0
#define TF_LANE_STRIDE 1LL
// GCC's own vectoriser, not `omp simd`: under omp simd a model step's small local arrays become
// per-lane "simd arrays" and the loop is not vectorised at all (3x slower training).
#define LANE_FOR(l, nl) _Pragma("GCC ivdep") for (int l = 0; l < (nl); ++l)
#define CHUNK_UP(j, len, C) for (int j = 0; j < (len); ++j)
#define CHUNK_DOWN(j, len, C) for (int j = (len) - 1; j >= 0; --j)
#endif
#ifdef __CUDACC__
#define TF_COUNT_READ(n) ((void)0)
#define TF_COUNT_WRITE(n) ((void)0)
#endif

template <typename T>
TF_HD T tf_load(const T* __restrict__ p, long long i) {
  TF_COUNT_READ(sizeof(T));
  return p[i];
}

template <typename T>
TF_HD void tf_store(T* __restrict__ p, long long i, T v) {
  TF_COUNT_WRITE(sizeof(T));
  p[i] = v;
}

// First neuron of this thread and how many of its lanes lie below N.
struct LaneRange {
  long long base;
  int count;
};

// A thread whose lanes all lie below N (on the host: every block but the last). Its count is a
// compile-time constant, so g++ unrolls the lane loops and keeps the lanes' state in vector
// registers instead of on the stack (fp32 LIF inference, T = 32, N = 262,144: 20% faster).
struct FullLanes {
  long long base;
  static constexpr int count = TF_LANES;
};

TF_HD LaneRange lane_range(long long N) {
  LaneRange r;
  r.base = (long long)blockIdx.x * blockDim.x * TF_LANES + threadIdx.x;
  long long left = r.base < N ? (N - r.base + TF_LANE_STRIDE - 1) / TF_LANE_STRIDE : 0;
  r.count = left < TF_LANES ? (int)left : TF_LANES;
  return r;
}

// Host shape: a thread walks all T rows of each sequence for one block of lanes, then its next
// block (host_launch gives it consecutive blocks). The hardware prefetchers do not follow T
// interleaved streams a row apart, so at each row the lines of the next block are requested while
// this one computes (fp32 LIF inference, T = 32, N = 262,144, after a cache flush: 3x faster).
// A prefetch never faults, so past the end of the array is harmless (the address is computed in
// integers: a pointer past the end would be undefined).
template <int WRITE, typename T>
TF_HD void prefetch_next_block(const T* p, long long row) {
#if !TF_GPU_SHAPE
  const unsigned long long next = (unsigned long long)p + (unsigned long long)(row + TF_LANES) * sizeof(T);
TF_UNROLL
  for (int q = 0; q < (int)(TF_LANES * sizeof(T)); q += 64) __builtin_prefetch((const void*)(next + q), WRITE, 3);
#endif
}

// Runs body(lanes) for this thread's lanes: on the host with FullLanes where all are in range (the
// kernel body is compiled twice there); on the GPU the lane loops are unrolled anyway, so once.
template <class Body>
TF_HD void with_lanes(const LaneRange& r, Body&& body) {
#if TF_GPU_SHAPE
  body(r);
#else
  if (r.count == TF_LANES) body(FullLanes{r.base});
  else body(r);
#endif
}

// Fused multi-step LIF kernels: one thread owns LIF_LANES neurons and runs the whole time loop.
// Layout: every sequence is (T, N) contiguous, neuron i of step t at t * N + i (64-bit indices).
//
//   lif_forward   x -> spikes, final v (+ v sequence if asked, + fp32 checkpoints of v every
//                 LIF_CHUNK steps when training). Inference is the same kernel with no checkpoints:
//                 2 words per neuron-step (read x, write spike).
//   lif_backward  walks chunks last to first: reloads the chunk's checkpoint, recomputes the
//                 chunk's h in registers from x, then sweeps backward. 3 words per neuron-step
//                 (read x and grad_spike, write grad_x) + 4/LIF_CHUNK bytes of checkpoint.
// A single step ('s' mode) is the T = 1 case of the same kernels.
#ifndef __CUDACC__
#include "host_shim.h"
#endif
#include "lif_core.cuh"

#ifndef LIF_LANES
#define LIF_LANES 1
#endif
#ifndef LIF_CHUNK
#define LIF_CHUNK 16  // register array h[16] + u[16]: fits without spilling at one lane per thread
#endif

#ifdef __CUDACC__
// Lanes of a thread are blockDim apart, so a warp's loads are coalesced.
#define LANE_STRIDE ((long long)blockDim.x)
#define LANE_FOR(l, nl) _Pragma("unroll") for (int l = 0; l < LIF_LANES; ++l) if (l < (nl))
#define CHUNK_UP(j, len) _Pragma("unroll") for (int j = 0; j < LIF_CHUNK; ++j) if (j < (len))
#define CHUNK_DOWN(j, len) _Pragma("unroll") for (int j = LIF_CHUNK - 1; j >= 0; --j) if (j < (len))
#define LIF_COUNT_READ(n) ((void)0)
#define LIF_COUNT_WRITE(n) ((void)0)
#else
// Lanes are contiguous on the host, so the lane loop vectorises.
#define LANE_STRIDE 1LL
#define LANE_FOR(l, nl) _Pragma("omp simd") for (int l = 0; l < (nl); ++l)
#define CHUNK_UP(j, len) for (int j = 0; j < (len); ++j)
#define CHUNK_DOWN(j, len) for (int j = (len) - 1; j >= 0; --j)
#endif

template <typename T>
LIF_HD T lif_load(const T* __restrict__ p, long long i) {
  LIF_COUNT_READ(sizeof(T));
  return p[i];
}

template <typename T>
LIF_HD void lif_store(T* __restrict__ p, long long i, T v) {
  LIF_COUNT_WRITE(sizeof(T));
  p[i] = v;
}

// First neuron of this thread and how many of its lanes lie below N.
struct LaneRange {
  long long base;
  int count;
};

LIF_HD LaneRange lane_range(long long N) {
  LaneRange r;
  r.base = (long long)blockIdx.x * blockDim.x * LIF_LANES + threadIdx.x;
  long long left = r.base < N ? (N - r.base + LANE_STRIDE - 1) / LANE_STRIDE : 0;
  r.count = left < LIF_LANES ? (int)left : LIF_LANES;
  return r;
}

// k_ptr (PLIF) holds {sigmoid(w), 1 - sigmoid(w)}, read on the device: no host sync per call.
template <typename acc_t>
LIF_HD LifParams<acc_t> make_params(int kind, int flags, acc_t tau, acc_t keep, const acc_t* k_ptr,
                                    acc_t v_threshold, acc_t v_reset) {
  LifParams<acc_t> p;
  p.kind = kind;
  p.flags = flags;
  p.tau = tau;
  p.k = k_ptr ? k_ptr[0] : acc_t(0);
  p.keep = k_ptr ? k_ptr[1] : keep;
  p.v_threshold = v_threshold;
  p.v_reset = v_reset;
  return p;
}

// The time loop of the forward kernel, specialised on the charge formula and the reset kind.
template <int FORM, int HARD, typename scalar_t, typename acc_t>
LIF_HD void forward_steps(const scalar_t* __restrict__ x, scalar_t* __restrict__ spike,
                          scalar_t* __restrict__ v_seq, acc_t* __restrict__ checkpoints,
                          const LifParams<acc_t> p, acc_t* __restrict__ v, const LaneRange r, int T,
                          long long N) {
  for (int t = 0; t < T; ++t) {
    const long long row = (long long)t * N + r.base;
    if (checkpoints && t % LIF_CHUNK == 0) {
      const long long crow = (long long)(t / LIF_CHUNK) * N + r.base;
      LANE_FOR(l, r.count) lif_store(checkpoints, crow + l * LANE_STRIDE, v[l]);
    }
    if (v_seq) {
      LANE_FOR(l, r.count) {
        const long long idx = row + l * LANE_STRIDE;
        const acc_t h = lif_charge<FORM>(v[l], to_acc(lif_load(x, idx)), p);
        const acc_t s = lif_fire(h, p);
        lif_store(spike, idx, from_acc<scalar_t>(s));
        v[l] = lif_reset<HARD>(h, s, p);
        lif_store(v_seq, idx, from_acc<scalar_t>(v[l]));
      }
    } else {
      LANE_FOR(l, r.count) {
        const long long idx = row + l * LANE_STRIDE;
        const acc_t h = lif_charge<FORM>(v[l], to_acc(lif_load(x, idx)), p);
        const acc_t s = lif_fire(h, p);
        lif_store(spike, idx, from_acc<scalar_t>(s));
        v[l] = lif_reset<HARD>(h, s, p);
      }
    }
  }
}

template <typename scalar_t>
__global__ void lif_forward(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init,
                            scalar_t* __restrict__ spike, scalar_t* __restrict__ v_last,
                            scalar_t* __restrict__ v_seq,                             // nullable
                            typename acc_of<scalar_t>::type* __restrict__ checkpoints,  // nullable
                            const typename acc_of<scalar_t>::type* __restrict__ k_ptr,  // nullable
                            typename acc_of<scalar_t>::type tau, typename acc_of<scalar_t>::type keep,
                            typename acc_of<scalar_t>::type v_threshold,
                            typename acc_of<scalar_t>::type v_reset, int kind, int flags, int T,
                            long long N) {
  typedef typename acc_of<scalar_t>::type acc_t;
  const LaneRange r = lane_range(N);
  if (r.count == 0) return;
  const LifParams<acc_t> p = make_params<acc_t>(kind, flags, tau, keep, k_ptr, v_threshold, v_reset);
  acc_t v[LIF_LANES];
  LANE_FOR(l, r.count) v[l] = to_acc(lif_load(v_init, r.base + l * LANE_STRIDE));
#ifdef __CUDACC__
  forward_steps<LIF_RUNTIME, LIF_RUNTIME>(x, spike, v_seq, checkpoints, p, v, r, T, N);
#else
  host_dispatch_forms<LIF_H_COUNT>(lif_charge_form(p), p.hard(), [&](auto form, auto hard) {
    forward_steps<decltype(form)::value, decltype(hard)::value>(x, spike, v_seq, checkpoints, p, v, r, T, N);
  });
#endif
  LANE_FOR(l, r.count) lif_store(v_last, r.base + l * LANE_STRIDE, from_acc<scalar_t>(v[l]));
}

// The backward's two passes over one checkpoint chunk, each specialised on what it branches on, so
// that on the host their lane loops have no branches and vectorise: the recompute of h on the
// charge formula and reset kind (like forward_steps), the sweep on the reset kind and on which
// optional inputs / outputs are present. LIF_RUNTIME (the GPU, and the host's shard path) reads
// them at run time. The recompute is not inlined on the host, so its 16 specialisations per
// dtype are compiled once rather than once per surrogate (host build 140 s -> 50 s).
#ifdef __CUDACC__
#define LIF_HD_SHARED LIF_HD
#else
#define LIF_HD_SHARED __attribute__((noinline))
#endif
template <int FORM, int HARD, typename scalar_t, typename acc_t>
LIF_HD_SHARED void backward_recompute(const scalar_t* __restrict__ x, const LifParams<acc_t> p, bool want_k,
                                      acc_t* __restrict__ v, acc_t (*__restrict__ h)[LIF_LANES],
                                      acc_t (*__restrict__ u)[LIF_LANES], const LaneRange r, int t0,
                                      int len, long long N) {
  CHUNK_UP(j, len) {
    const long long row = (long long)(t0 + j) * N + r.base;
    LANE_FOR(l, r.count) {
      const acc_t xv = to_acc(lif_load(x, row + l * LANE_STRIDE));
      u[j][l] = want_k ? lif_dh_dk(v[l], xv, p) : acc_t(0);
      const acc_t hh = lif_charge<FORM>(v[l], xv, p);
      h[j][l] = hh;
      v[l] = lif_reset<HARD>(hh, lif_fire(hh, p), p);
    }
  }
}

// VSEQ: grad_v_seq given; GX: grad_x wanted; A: the shard's carry factor a wanted (1 / 0 /
// LIF_RUNTIME: test the pointer).
template <int SG, int HARD, int VSEQ, int GX, int A, typename scalar_t, typename acc_t>
LIF_HD void backward_sweep(const scalar_t* __restrict__ grad_spike, const scalar_t* __restrict__ grad_v_seq,
                           scalar_t* __restrict__ grad_x, const LifParams<acc_t> p, acc_t sg_a, acc_t sg_b,
                           acc_t dh_dx, acc_t dh_dv, acc_t* __restrict__ carry, acc_t* __restrict__ gk,
                           acc_t* __restrict__ a, const acc_t (*__restrict__ h)[LIF_LANES],
                           const acc_t (*__restrict__ u)[LIF_LANES], const LaneRange r, int t0, int len,
                           long long N) {
  const bool vseq = VSEQ == LIF_RUNTIME ? grad_v_seq != 0 : VSEQ == 1;
  const bool gx = GX == LIF_RUNTIME ? grad_x != 0 : GX == 1;
  const bool want_a = A == LIF_RUNTIME ? a != 0 : A == 1;
  CHUNK_DOWN(j, len) {
    const long long row = (long long)(t0 + j) * N + r.base;
    LANE_FOR(l, r.count) {
      const long long idx = row + l * LANE_STRIDE;
      const acc_t hh = h[j][l];
      const acc_t s = lif_fire(hh, p);
      const acc_t sg = surrogate_grad<SG, acc_t>(hh - p.v_threshold, sg_a, sg_b);
      const acc_t dv_dh = lif_dv_dh<HARD>(hh, s, sg, p);
      const acc_t dv = vseq ? carry[l] + to_acc(lif_load(grad_v_seq, idx)) : carry[l];
      const acc_t gh = to_acc(lif_load(grad_spike, idx)) * sg + dv * dv_dh;
      if (gx) lif_store(grad_x, idx, from_acc<scalar_t>(gh * dh_dx));
      gk[l] += gh * u[j][l];
      carry[l] = gh * dh_dv;
      if (want_a) a[l] *= dh_dv * dv_dh;
    }
  }
}

// The backward time loop shared by lif_backward and the time-sharded backward (shard.cu).
// carry (dL/dv after the last step, per lane) comes in and leaves as dL/dv_init; gk sums dL/dk;
// a (nullable) multiplies in the carry's linear factor prod_t dh/dv * dv/dh; grad_x is nullable.
template <int SG, typename scalar_t, typename acc_t>
LIF_HD void backward_steps(const scalar_t* __restrict__ grad_spike,
                           const scalar_t* __restrict__ grad_v_seq, const scalar_t* __restrict__ x,
                           const acc_t* __restrict__ checkpoints, scalar_t* __restrict__ grad_x,
                           const LifParams<acc_t>& p, acc_t sg_a, acc_t sg_b, bool want_k,
                           const LaneRange& r, int T, long long N, acc_t* carry, acc_t* gk, acc_t* a) {
  const acc_t dh_dx = lif_dh_dx(p), dh_dv = lif_dh_dv(p);
  acc_t v[LIF_LANES];
  acc_t h[LIF_CHUNK][LIF_LANES], u[LIF_CHUNK][LIF_LANES];  // pre-spike h and dh/dk of one chunk
  for (int c = (T - 1) / LIF_CHUNK; c >= 0; --c) {
    const int t0 = c * LIF_CHUNK;
    const int len = T - t0 < LIF_CHUNK ? T - t0 : LIF_CHUNK;
    const long long crow = (long long)c * N + r.base;
    LANE_FOR(l, r.count) v[l] = lif_load(checkpoints, crow + l * LANE_STRIDE);
#ifdef __CUDACC__
    backward_recompute<LIF_RUNTIME, LIF_RUNTIME>(x, p, want_k, v, h, u, r, t0, len, N);
    backward_sweep<SG, LIF_RUNTIME, LIF_RUNTIME, LIF_RUNTIME, LIF_RUNTIME>(
        grad_spike, grad_v_seq, grad_x, p, sg_a, sg_b, dh_dx, dh_dv, carry, gk, a, h, u, r, t0, len, N);
#else
    host_dispatch_forms<LIF_H_COUNT>(lif_charge_form(p), p.hard(), [&](auto form, auto hard) {
      backward_recompute<decltype(form)::value, decltype(hard)::value>(x, p, want_k, v, h, u, r, t0, len, N);
    });
    if (grad_x && !a) {  // lif_backward: the vectorised sweeps
      host_dispatch_forms<2>(grad_v_seq ? 1 : 0, p.hard(), [&](auto vseq, auto hard) {
        backward_sweep<SG, decltype(hard)::value, decltype(vseq)::value, 1, 0>(
            grad_spike, grad_v_seq, grad_x, p, sg_a, sg_b, dh_dx, dh_dv, carry, gk, a, h, u, r, t0, len, N);
      });
    } else {
      backward_sweep<SG, LIF_RUNTIME, LIF_RUNTIME, LIF_RUNTIME, LIF_RUNTIME>(
          grad_spike, grad_v_seq, grad_x, p, sg_a, sg_b, dh_dx, dh_dv, carry, gk, a, h, u, r, t0, len, N);
    }
#endif
  }
}

template <typename scalar_t, int SG>
__global__ void lif_backward(const scalar_t* __restrict__ grad_spike,
                             const scalar_t* __restrict__ grad_v_seq,   // nullable
                             const scalar_t* __restrict__ grad_v_last,  // nullable
                             const scalar_t* __restrict__ x,
                             const typename acc_of<scalar_t>::type* __restrict__ checkpoints,
                             const typename acc_of<scalar_t>::type* __restrict__ k_ptr,  // nullable
                             scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_v_init,
                             typename acc_of<scalar_t>::type* __restrict__ grad_k,  // nullable, (N,)
                             typename acc_of<scalar_t>::type tau, typename acc_of<scalar_t>::type keep,
                             typename acc_of<scalar_t>::type v_threshold,
                             typename acc_of<scalar_t>::type v_reset,
                             typename acc_of<scalar_t>::type sg_a,
                             typename acc_of<scalar_t>::type sg_b, int kind, int flags, int T,
                             long long N) {
  typedef typename acc_of<scalar_t>::type acc_t;
  const LaneRange r = lane_range(N);
  if (r.count == 0) return;
  const LifParams<acc_t> p = make_params<acc_t>(kind, flags, tau, keep, k_ptr, v_threshold, v_reset);
  const bool want_k = grad_k != 0;
  acc_t carry[LIF_LANES], gk[LIF_LANES];
  LANE_FOR(l, r.count) {
    carry[l] = grad_v_last ? to_acc(lif_load(grad_v_last, r.base + l * LANE_STRIDE)) : acc_t(0);
    gk[l] = acc_t(0);
  }
  backward_steps<SG>(grad_spike, grad_v_seq, x, checkpoints, grad_x, p, sg_a, sg_b, want_k, r, T, N,
                     carry, gk, (acc_t*)0);
  LANE_FOR(l, r.count) {
    lif_store(grad_v_init, r.base + l * LANE_STRIDE, from_acc<scalar_t>(carry[l]));
    if (want_k) lif_store(grad_k, r.base + l * LANE_STRIDE, gk[l]);
  }
}

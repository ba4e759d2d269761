// The fused multi-step kernels, written once for every neuron model (csrc/neurons/<name>.cuh, see
// neurons/base.cuh for what a model provides). The build puts the model's header before this file;
// a variant is one (kernel, model, dtype, FORM[, surrogate]) and is compiled when first used.
//
//   neuron_forward   x -> spikes, final state (+ v sequence if asked, + the state every CHUNK
//                    steps when training). Inference: 2 words per neuron-step (read x, write spike).
//   neuron_backward  walks chunks last to first: reloads the chunk's state, recomputes the chunk in
//                    registers from x, then sweeps backward. 3 words per neuron-step (read x and
//                    grad_spike, write grad_x) + the checkpoints; 2 when grad_spike is one (N,) row
//                    for every step (grad_spike_step 0: autograd's expanded gradient of
//                    spike.sum(), read as it comes instead of copied T times). Optionally the per-neuron
//                    gradients of the parameters, and (time sharding, one state variable) the
//                    product of the steps' dz_{t-1}/dz_t factors, which makes dL/dz_init affine in
//                    the carry from the next rank.
//   neuron_fixup     time sharding: re-runs a slice from its true initial state beside the
//                    speculative run until their pre-spike h agree bitwise (one state variable).
// States and checkpoints are in the state precision (fp32 for fp16/bf16/fp32, fp64 for fp64),
// laid out (S, N) and (chunks, S, N); a single step ('s' mode) is T = 1. Each kernel's parameters
// are its list in params.cuh (TF_SIGNATURE), which the launchers fill by name.
//
// GPU-only lines (everything else runs on the CPU in the host build, the GPU's loop shapes in its
// TF_EMULATE_GPU variant): the fp16 conversions' inline PTX in common/fp.cuh, and blockIdx /
// blockDim / threadIdx being hardware registers.
#include "common/lanes.cuh"
#include "params.cuh"
#include "surrogate.cuh"

#define TF_RUNTIME -1  // template argument: decide at run time (the pointer is tested)

// On the GPU every kernel is bounded to TF_BLOCK threads per block and TF_MIN_BLOCKS resident blocks
// per SM (_cuda.py: half occupancy at 256 threads), so ptxas keeps it within 64 registers.
#ifdef __CUDACC__
// fp64 is for exactness, not speed: unbounded, so it does not spill.
#define TF_KERNEL __global__ __launch_bounds__(TF_BLOCK, sizeof(scalar_t) == 8 ? 1 : TF_MIN_BLOCKS)
// The backward with parameter gradients (PLIF's w, KLIF's k, a learnable threshold) keeps the
// chunk's states, inputs and pre-spike values live at once: 3/4 of the blocks (85 registers at
// 256 threads, 37.5% occupancy) instead of spilling.
#define TF_KERNEL_BACKWARD __global__ __launch_bounds__(TF_BLOCK, sizeof(scalar_t) == 8 ? 1 : PGRAD ? TF_MIN_BLOCKS * 3 / 4 : TF_MIN_BLOCKS)
#else
#define TF_KERNEL __global__
#define TF_KERNEL_BACKWARD __global__
#endif

template <class M, typename acc_t>
TF_HD void load_params(const acc_t* __restrict__ params, acc_t* p) {
TF_UNROLL
  for (int i = 0; i < M::NP; ++i) p[i] = tf_load(params, i);
}

// A state lives in one (S, N) block (checkpoints) or as v plus the second variable (a node's
// attributes, which SpikingJelly's detach_net detaches in place, so they must not be views).
template <class M, typename acc_t, class R>
TF_HD void load_state(const acc_t* __restrict__ v, const acc_t* __restrict__ aux, long long N,
                      acc_t (*z)[TF_LANES], const R& r) {
  static_assert(M::S >= 1 && M::S <= 2, "a model has one or two state variables");
TF_UNROLL
  for (int k = 0; k < M::S; ++k) LANE_FOR(l, r.count) z[k][l] = tf_load(k ? aux : v, r.base + l * TF_LANE_STRIDE);
}

template <class M, typename acc_t, class R>
TF_HD void store_state(acc_t* __restrict__ v, acc_t* __restrict__ aux, long long N, acc_t (*z)[TF_LANES],
                       const R& r) {
TF_UNROLL
  for (int k = 0; k < M::S; ++k) LANE_FOR(l, r.count) tf_store(k ? aux : v, r.base + l * TF_LANE_STRIDE, z[k][l]);
}

// BatchNorm folded into the read of x (FOLD): x_eff = x * scale[c] + shift[c], c = (i / inner) %
// channels for neuron i of a step ((T, B, C, *) flattened to (T, N): inner = prod(*)). A neuron's
// channel is the same at every step, so each lane reads its scale and shift once per thread (2
// state words per neuron, nothing per step) and x_eff never reaches memory. Without FOLD the
// read of x is untouched: the unfolded variants compile to the code they had before.
template <bool FOLD, typename acc_t>
struct Affine {
  template <class R>
  TF_HD void load(const acc_t* __restrict__, const acc_t* __restrict__, long long, int, const R&) {}
  TF_HD acc_t operator()(acc_t x, int) const { return x; }
};

template <typename acc_t>
struct Affine<true, acc_t> {
  acc_t scale[TF_LANES], shift[TF_LANES];
  template <class R>
  TF_HD void load(const acc_t* __restrict__ bn_scale, const acc_t* __restrict__ bn_shift, long long inner,
                  int channels, const R& r) {
    LANE_FOR(l, r.count) {
      const long long c = (r.base + l * TF_LANE_STRIDE) / inner % channels;
      scale[l] = tf_load(bn_scale, c);
      shift[l] = tf_load(bn_shift, c);
    }
  }
  TF_HD acc_t operator()(acc_t x, int l) const { return x * scale[l] + shift[l]; }
};

template <class M, typename acc_t>
TF_HD acc_t* checkpoint_row(acc_t* checkpoints, int c, int k, long long N) {
  return checkpoints + ((long long)c * M::S + k) * N;
}

// One chunk of the forward time loop. In the GPU shape the chunk's x is loaded first, so the
// loads are in flight together instead of one per dependent step.
template <class M, int FORM, bool VSEQ, typename scalar_t, typename acc_t, class BN, class R>
TF_HD void forward_chunk(const scalar_t* __restrict__ x, scalar_t* __restrict__ spike,
                         scalar_t* __restrict__ v_seq, const acc_t* p, acc_t (*z)[TF_LANES],
                         const BN& bn, const R& r, int t0, int len, long long N) {
#if TF_GPU_SHAPE
  acc_t xs[CHUNK_OF(M)][TF_LANES];
  CHUNK_UP(j, len, CHUNK_OF(M)) LANE_FOR(l, r.count) xs[j][l] = bn(to_acc(tf_load(x, (long long)(t0 + j) * N + r.base + l * TF_LANE_STRIDE)), l);
#endif
  CHUNK_UP(j, len, CHUNK_OF(M)) {
    const long long row = (long long)(t0 + j) * N + r.base;
    prefetch_next_block<0>(x, row);
    prefetch_next_block<1>(spike, row);
    if (VSEQ) prefetch_next_block<1>(v_seq, row);
    LANE_FOR(l, r.count) {
      const long long idx = row + l * TF_LANE_STRIDE;
#if TF_GPU_SHAPE
      const acc_t xv = xs[j][l];
#else
      const acc_t xv = bn(to_acc(tf_load(x, idx)), l);
#endif
      acc_t zl[M::S];
TF_UNROLL
      for (int k = 0; k < M::S; ++k) zl[k] = z[k][l];
      const acc_t h = M::template charge<FORM>(zl, xv, p);
      const acc_t s = tf_fire(h, p[M::V_TH]);
      M::template reset<FORM>(zl, h, s, p);
      tf_store(spike, idx, from_acc<scalar_t>(s));
      if (VSEQ) tf_store(v_seq, idx, from_acc<scalar_t>(zl[0]));
TF_UNROLL
      for (int k = 0; k < M::S; ++k) z[k][l] = zl[k];
    }
  }
}

template <class M, typename scalar_t, int FORM, bool FOLD = false>
TF_KERNEL void neuron_forward(TF_SIGNATURE(TF_FORWARD_PARAMS)) {
  typedef acc_type<scalar_t> acc_t;
  const LaneRange lanes = lane_range(N);
  if (lanes.count == 0) return;
  with_lanes(lanes, [&](const auto& r) {
    acc_t p[M::NP];
    load_params<M>(params, p);
    Affine<FOLD, acc_t> bn;
    bn.load(bn_scale, bn_shift, bn_inner, bn_channels, r);
    acc_t z[M::S][TF_LANES];
    load_state<M>(v_init, aux_init, N, z, r);
    for (int c = 0; c * CHUNK_OF(M) < T; ++c) {
      const int t0 = c * CHUNK_OF(M), len = T - t0 < CHUNK_OF(M) ? T - t0 : CHUNK_OF(M);
      if (checkpoints)
        store_state<M>(checkpoint_row<M>(checkpoints, c, 0, N), checkpoint_row<M>(checkpoints, c, 1, N), N, z, r);
      if (v_seq) forward_chunk<M, FORM, true>(x, spike, v_seq, p, z, bn, r, t0, len, N);
      else forward_chunk<M, FORM, false>(x, spike, v_seq, p, z, bn, r, t0, len, N);
    }
    store_state<M>(v_last, aux_last, N, z, r);
  });
}

// The backward's recompute of one chunk: the state before each step and x, kept in registers.
template <class M, int FORM, typename scalar_t, typename acc_t, class BN, class R>
TF_HD void backward_recompute(const scalar_t* __restrict__ x, const acc_t* p, acc_t (*z)[TF_LANES],
                              acc_t (*zs)[M::S][TF_LANES], acc_t (*xs)[TF_LANES], acc_t (*hs)[TF_LANES],
                              const BN& bn, const R& r, int t0, int len, long long N) {
  CHUNK_UP(j, len, CHUNK_OF(M)) {
    const long long row = (long long)(t0 + j) * N + r.base;
    prefetch_next_block<0>(x, row);
    LANE_FOR(l, r.count) {
      const acc_t xv = bn(to_acc(tf_load(x, row + l * TF_LANE_STRIDE)), l);
      xs[j][l] = xv;
      acc_t zl[M::S];
TF_UNROLL
      for (int k = 0; k < M::S; ++k) zs[j][k][l] = zl[k] = z[k][l];
      const acc_t h = M::template charge<FORM>(zl, xv, p);
      hs[j][l] = h;
      M::template reset<FORM>(zl, h, tf_fire(h, p[M::V_TH]), p);
TF_UNROLL
      for (int k = 0; k < M::S; ++k) z[k][l] = zl[k];
    }
  }
}

// dL/d(state before the step) from dL/d(state after it) (gz, in: after; out: before) and dL/ds;
// adds to gp and returns dL/dx. h is the step's recomputed pre-spike v: the state before the step
// and x are read only where the model's vjps need them, so for most forms the compiler keeps
// neither in registers (the chunk's h alone, as the LIF-only kernels did).
template <class M, int SG, int FORM, typename acc_t>
TF_HD acc_t step_vjp(const acc_t* zp, acc_t xv, acc_t h, const acc_t* p, acc_t sg_a, acc_t sg_b, acc_t* gz,
                     acc_t grad_s, acc_t* gp) {
  const acc_t s = tf_fire(h, p[M::V_TH]);
  const acc_t sg = surrogate_grad<SG, acc_t>(h - p[M::V_TH], sg_a, sg_b);
  acc_t gh, gs, gzp[M::S], gx;
  M::template reset_vjp<FORM>(zp, h, s, p, gz, gh, gs, gzp, gp);
  gs += grad_s;
  gh += gs * sg;
  gp[M::V_TH] -= gs * sg;
  M::template charge_vjp<FORM>(zp, xv, p, gh, gzp, gx, gp);
TF_UNROLL
  for (int k = 0; k < M::S; ++k) gz[k] = gzp[k];
  return gx;
}

// The backward sweep over one recomputed chunk. VSEQ: grad_v_seq given; GX: grad_x wanted; A: the
// carry factor wanted (1 / 0 / TF_RUNTIME: test the pointer). PGRAD: parameter gradients wanted.
template <class M, int SG, int FORM, bool PGRAD, int VSEQ, int GX, int A, typename scalar_t, typename acc_t, class R>
TF_HD void backward_sweep(const scalar_t* __restrict__ grad_spike, const scalar_t* __restrict__ grad_v_seq,
                          scalar_t* __restrict__ grad_x, const acc_t* p, acc_t sg_a, acc_t sg_b,
                          acc_t (*gz)[TF_LANES], acc_t (*gp)[TF_LANES], acc_t* __restrict__ a,
                          acc_t (*zs)[M::S][TF_LANES], acc_t (*xs)[TF_LANES], acc_t (*hs)[TF_LANES],
                          const R& r, int t0, int len, long long N, long long gs_step) {
  const bool vseq = VSEQ == TF_RUNTIME ? grad_v_seq != 0 : VSEQ == 1;
  const bool gx_wanted = GX == TF_RUNTIME ? grad_x != 0 : GX == 1;
  const bool a_wanted = A == TF_RUNTIME ? a != 0 : A == 1;
  CHUNK_DOWN(j, len, CHUNK_OF(M)) {
    const long long row = (long long)(t0 + j) * N + r.base, gs_row = (long long)(t0 + j) * gs_step + r.base;
    prefetch_next_block<0>(grad_spike, gs_row);
    if (vseq) prefetch_next_block<0>(grad_v_seq, row);
    if (gx_wanted) prefetch_next_block<1>(grad_x, row);
    LANE_FOR(l, r.count) {
      const long long idx = row + l * TF_LANE_STRIDE;
      acc_t zp[M::S], g[M::S], gpl[M::NP];
TF_UNROLL
      for (int k = 0; k < M::S; ++k) { zp[k] = zs[j][k][l]; g[k] = gz[k][l]; }
TF_UNROLL
      for (int i = 0; i < M::NP; ++i) gpl[i] = PGRAD ? gp[i][l] : acc_t(0);
      if (vseq) g[0] += to_acc(tf_load(grad_v_seq, idx));
      const acc_t gx = step_vjp<M, SG, FORM>(zp, xs[j][l], hs[j][l], p, sg_a, sg_b, g,
                                             to_acc(tf_load(grad_spike, gs_row + l * TF_LANE_STRIDE)), gpl);
      if (gx_wanted) tf_store(grad_x, idx, from_acc<scalar_t>(gx));
TF_UNROLL
      for (int k = 0; k < M::S; ++k) gz[k][l] = g[k];
      if (PGRAD) {
TF_UNROLL
        for (int i = 0; i < M::NP; ++i) gp[i][l] = gpl[i];
      }
      if (a_wanted) {  // the linear factor dz_{t-1}/dz_t: the vjp of a unit carry with no spike gradient
        acc_t unit[M::S] = {}, ignored[M::NP] = {};
        unit[0] = acc_t(1);
        step_vjp<M, SG, FORM>(zp, xs[j][l], hs[j][l], p, sg_a, sg_b, unit, acc_t(0), ignored);
        a[l] *= unit[0];
      }
    }
  }
}

// With FOLD, grad_x is dL/dx_eff (the BatchNorm's output): ops.py takes it through the affine.
// SHARD: the time-sharded node's variant (grad_x optional, the carry factor a_prod), separate so
// that the plain backward does not pay its registers.
template <class M, typename scalar_t, int SG, int FORM, bool PGRAD, bool FOLD = false, bool SHARD = false>
TF_KERNEL_BACKWARD void neuron_backward(TF_SIGNATURE(TF_BACKWARD_PARAMS)) {
  typedef acc_type<scalar_t> acc_t;
  const LaneRange lanes = lane_range(N);
  if (lanes.count == 0) return;
  with_lanes(lanes, [&](const auto& r) {
    acc_t p[M::NP];
    load_params<M>(params, p);
    Affine<FOLD, acc_t> bn;
    bn.load(bn_scale, bn_shift, bn_inner, bn_channels, r);
    acc_t gz[M::S][TF_LANES], gp[PGRAD ? M::NP : 1][TF_LANES], a[TF_LANES], z[M::S][TF_LANES];
TF_UNROLL
    for (int k = 0; k < M::S; ++k) {
      const acc_t* g = k ? grad_aux_last : grad_v_last;
      LANE_FOR(l, r.count) gz[k][l] = g ? tf_load(g, r.base + l * TF_LANE_STRIDE) : acc_t(0);
    }
TF_UNROLL
    for (int i = 0; i < (PGRAD ? M::NP : 1); ++i) LANE_FOR(l, r.count) gp[i][l] = acc_t(0);
    LANE_FOR(l, r.count) a[l] = acc_t(1);
    acc_t zs[CHUNK_OF(M)][M::S][TF_LANES], xs[CHUNK_OF(M)][TF_LANES], hs[CHUNK_OF(M)][TF_LANES];  // a chunk, recomputed
    for (int c = (T - 1) / CHUNK_OF(M); c >= 0; --c) {
      const int t0 = c * CHUNK_OF(M), len = T - t0 < CHUNK_OF(M) ? T - t0 : CHUNK_OF(M);
      load_state<M>(checkpoint_row<M>(checkpoints, c, 0, N), checkpoint_row<M>(checkpoints, c, 1, N), N, z, r);
      backward_recompute<M, FORM>(x, p, z, zs, xs, hs, bn, r, t0, len, N);
      if (SHARD)  // decided per pointer
        backward_sweep<M, SG, FORM, PGRAD, TF_RUNTIME, TF_RUNTIME, TF_RUNTIME>(
            grad_spike, grad_v_seq, grad_x, p, sg_a, sg_b, gz, gp, a_prod ? a : (acc_t*)0, zs, xs, hs, r, t0, len, N, grad_spike_step);
      else if (grad_v_seq)
        backward_sweep<M, SG, FORM, PGRAD, 1, 1, 0>(grad_spike, grad_v_seq, grad_x, p, sg_a, sg_b, gz, gp, a, zs, xs, hs, r, t0, len, N, grad_spike_step);
      else
        backward_sweep<M, SG, FORM, PGRAD, 0, 1, 0>(grad_spike, grad_v_seq, grad_x, p, sg_a, sg_b, gz, gp, a, zs, xs, hs, r, t0, len, N, grad_spike_step);
    }
    store_state<M>(grad_v_init, grad_aux_init, N, gz, r);
    if (PGRAD) {  // one row per masked entry, in entry order: unlearned entries take no memory
      int row = 0;
TF_UNROLL
      for (int i = 0; i < M::NP; ++i)
        if (grad_params_mask >> i & 1) {
          LANE_FOR(l, r.count) tf_store(grad_params, (long long)row * N + r.base + l * TF_LANE_STRIDE, gp[i][l]);
          ++row;
        }
    }
    if (SHARD && a_prod) LANE_FOR(l, r.count) tf_store(a_prod, r.base + l * TF_LANE_STRIDE, a[l]);
  });
}

#ifdef __CUDACC__
TF_HD bool same_bits(float a, float b) { return __float_as_uint(a) == __float_as_uint(b); }
TF_HD bool same_bits(double a, double b) { return __double_as_longlong(a) == __double_as_longlong(b); }
#else
TF_HD bool same_bits(float a, float b) { return tf_float_to_bits(a) == tf_float_to_bits(b); }
TF_HD bool same_bits(double a, double b) {
  unsigned long long u, w;
  std::memcpy(&u, &a, 8);
  std::memcpy(&w, &b, 8);
  return u == w;
}
#endif

// checkpoints: in, the speculative run's (row 0 is its guessed initial state); out, the true run's.
// v_last: in, the speculative final state; out, the true one. fixup_len[i] = the first step
// whose h matched (steps before it were rewritten), or T if none did. With one state variable equal
// h means equal spike and state from that step on; a model with more state cannot use it.
template <class M, typename scalar_t, int FORM>
TF_KERNEL void neuron_fixup(TF_SIGNATURE(TF_FIXUP_PARAMS)) {
  static_assert(M::S == 1, "the speculative fix-up needs a model with one state variable");
  typedef acc_type<scalar_t> acc_t;
  const LaneRange r = lane_range(N);
  if (r.count == 0) return;
  acc_t p[M::NP];
  load_params<M>(params, p);
  acc_t vt[TF_LANES], vs[TF_LANES];  // true and speculative state
  int len[TF_LANES];                 // T while the lane still differs
  LANE_FOR(l, r.count) {
    vt[l] = tf_load(v_true_init, r.base + l * TF_LANE_STRIDE);
    vs[l] = tf_load(checkpoints, r.base + l * TF_LANE_STRIDE);
    len[l] = T;
  }
  for (int t = 0; t < T; ++t) {
    const long long row = (long long)t * N + r.base;
    if (t % CHUNK_OF(M) == 0) {
      // The true state before step t; once a lane has matched, its later checkpoints already agree.
      const long long crow = (long long)(t / CHUNK_OF(M)) * N + r.base;
      LANE_FOR(l, r.count) if (len[l] == T) tf_store(checkpoints, crow + l * TF_LANE_STRIDE, vt[l]);
    }
    LANE_FOR(l, r.count) {
      if (len[l] == T) {
        const long long idx = row + l * TF_LANE_STRIDE;
        const acc_t xv = to_acc(tf_load(x, idx));
        const acc_t ht = M::template charge<FORM>(&vt[l], xv, p), hs = M::template charge<FORM>(&vs[l], xv, p);
        if (same_bits(ht, hs)) {
          len[l] = t;  // equal h: equal spike and state from step t on, nothing left to rewrite
        } else {
          const acc_t st = tf_fire(ht, p[M::V_TH]);
          tf_store(spike, idx, from_acc<scalar_t>(st));
          M::template reset<FORM>(&vt[l], ht, st, p);
          M::template reset<FORM>(&vs[l], hs, tf_fire(hs, p[M::V_TH]), p);
          if (v_seq) tf_store(v_seq, idx, from_acc<scalar_t>(vt[l]));
        }
      }
    }
    int active = 0;
    for (int l = 0; l < r.count; ++l) active += len[l] == T;
    if (active == 0) break;  // every lane matched: the rest of the slice is already right
  }
  LANE_FOR(l, r.count) {
    if (len[l] == T) tf_store(v_last, r.base + l * TF_LANE_STRIDE, vt[l]);
    tf_store(fixup_len, r.base + l * TF_LANE_STRIDE, len[l]);
  }
}

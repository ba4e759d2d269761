// Time-sharding kernels (sj_temporal_fusion.distributed): a rank owns a contiguous slice of the
// time axis and runs these on its (T_local, N) slice. Compiled after lif.cu, whose lane layout,
// LANE_FOR, lane_range, make_params and forward time loop they reuse: host_api.cpp includes both, and
// _cuda.source() appends this file to lif.cu.
//
//   shard_forward   lif_forward with the initial and final state in the state precision (fp32 for
//                   fp16/bf16), so the state handed between ranks is never rounded to the storage
//                   dtype: a sharded fp16 run equals the one-device run, where v stays fp32.
//   shard_fixup     given the true initial state, re-runs the slice beside the speculative run
//                   (recomputed from its checkpoints) until the pre-spike h of the two is bitwise
//                   equal; from then on the trajectories coincide. Rewrites spikes, v_seq and the
//                   checkpoints before that step, and reports the fix-up length per neuron.
//   shard_backward  lif_backward that also takes the carry dL/dv in the state precision, may skip
//                   grad_x, and returns the product A of a_t = dh/dv * dv/dh over the slice, so
//                   grad_v_init = A * carry_in + B is affine in the carry from the next rank.
#ifndef LIF_CHUNK
#error "shard.cu is compiled after lif.cu (host_api.cpp and _cuda.source() put it there)"
#endif

#ifdef __CUDACC__
LIF_HD bool shard_same_bits(float a, float b) { return __float_as_uint(a) == __float_as_uint(b); }
LIF_HD bool shard_same_bits(double a, double b) {
  return __double_as_longlong(a) == __double_as_longlong(b);
}
#else
LIF_HD bool shard_same_bits(float a, float b) { return lif_float_to_bits(a) == lif_float_to_bits(b); }
LIF_HD bool shard_same_bits(double a, double b) {
  unsigned long long u, w;
  std::memcpy(&u, &a, 8);
  std::memcpy(&w, &b, 8);
  return u == w;
}
#endif

template <typename scalar_t>
__global__ void shard_forward(const scalar_t* __restrict__ x,
                              const typename acc_of<scalar_t>::type* __restrict__ v_init,
                              scalar_t* __restrict__ spike,
                              typename acc_of<scalar_t>::type* __restrict__ v_last,
                              scalar_t* __restrict__ v_seq,                               // nullable
                              typename acc_of<scalar_t>::type* __restrict__ checkpoints,  // nullable
                              const typename acc_of<scalar_t>::type* __restrict__ k_ptr,  // nullable
                              typename acc_of<scalar_t>::type tau,
                              typename acc_of<scalar_t>::type keep,
                              typename acc_of<scalar_t>::type v_threshold,
                              typename acc_of<scalar_t>::type v_reset, int kind, int flags, int T,
                              long long N) {
  typedef typename acc_of<scalar_t>::type acc_t;
  const LaneRange r = lane_range(N);
  if (r.count == 0) return;
  const LifParams<acc_t> p = make_params<acc_t>(kind, flags, tau, keep, k_ptr, v_threshold, v_reset);
  acc_t v[LIF_LANES];
  LANE_FOR(l, r.count) v[l] = lif_load(v_init, r.base + l * LANE_STRIDE);
  // lif_forward's time loop, so the two runs round identically by construction.
#ifdef __CUDACC__
  forward_steps<LIF_RUNTIME, LIF_RUNTIME>(x, spike, v_seq, checkpoints, p, v, r, T, N);
#else
  host_dispatch_forms<LIF_H_COUNT>(lif_charge_form(p), p.hard(), [&](auto form, auto hard) {
    forward_steps<decltype(form)::value, decltype(hard)::value>(x, spike, v_seq, checkpoints, p, v, r, T, N);
  });
#endif
  LANE_FOR(l, r.count) lif_store(v_last, r.base + l * LANE_STRIDE, v[l]);
}

// checkpoints: in, the speculative run's (v before steps 0, 16, 32, ...; row 0 is its guessed
// initial state); out, the true run's. v_last: in, the speculative final state; out, the true one.
// fixup_len[i] = the first step whose h matched (steps before it were rewritten), or T if none did.
template <int FORM, int HARD, typename scalar_t, typename acc_t>
LIF_HD void fixup_steps(const scalar_t* __restrict__ x, acc_t* __restrict__ checkpoints,
                        scalar_t* __restrict__ spike, scalar_t* __restrict__ v_seq,
                        const LifParams<acc_t> p, acc_t* __restrict__ vt, acc_t* __restrict__ vs,
                        int* __restrict__ len, const LaneRange r, int T, long long N) {
  for (int t = 0; t < T; ++t) {
    const long long row = (long long)t * N + r.base;
    if (t % LIF_CHUNK == 0) {
      // The true v before step t; once a lane has matched, its later checkpoints already agree.
      const long long crow = (long long)(t / LIF_CHUNK) * N + r.base;
      LANE_FOR(l, r.count) if (len[l] == T) lif_store(checkpoints, crow + l * LANE_STRIDE, vt[l]);
    }
    LANE_FOR(l, r.count) {
      if (len[l] == T) {
        const long long idx = row + l * LANE_STRIDE;
        const acc_t xv = to_acc(lif_load(x, idx));
        const acc_t ht = lif_charge<FORM>(vt[l], xv, p), hs = lif_charge<FORM>(vs[l], xv, p);
        if (shard_same_bits(ht, hs)) {
          len[l] = t;  // equal h: equal spike and v from step t on, nothing left to rewrite
        } else {
          const acc_t s = lif_fire(ht, p);
          lif_store(spike, idx, from_acc<scalar_t>(s));
          vt[l] = lif_reset<HARD>(ht, s, p);
          vs[l] = lif_reset<HARD>(hs, lif_fire(hs, p), p);
          if (v_seq) lif_store(v_seq, idx, from_acc<scalar_t>(vt[l]));
        }
      }
    }
    int active = 0;
    for (int l = 0; l < r.count; ++l) active += len[l] == T;
    if (active == 0) break;  // every lane matched: the rest of the slice is already right
  }
}

// checkpoints: in, the speculative run's (v before steps 0, 16, 32, ...; row 0 is its guessed
// initial state); out, the true run's. v_last: in, the speculative final state; out, the true one.
// fixup_len[i] = the first step whose h matched (steps before it were rewritten), or T if none did.
template <typename scalar_t>
__global__ void shard_fixup(const scalar_t* __restrict__ x,
                            const typename acc_of<scalar_t>::type* __restrict__ v_true_init,
                            typename acc_of<scalar_t>::type* __restrict__ checkpoints,
                            scalar_t* __restrict__ spike,
                            scalar_t* __restrict__ v_seq,  // nullable
                            typename acc_of<scalar_t>::type* __restrict__ v_last,
                            int* __restrict__ fixup_len,
                            const typename acc_of<scalar_t>::type* __restrict__ k_ptr,  // nullable
                            typename acc_of<scalar_t>::type tau,
                            typename acc_of<scalar_t>::type keep,
                            typename acc_of<scalar_t>::type v_threshold,
                            typename acc_of<scalar_t>::type v_reset, int kind, int flags, int T,
                            long long N) {
  typedef typename acc_of<scalar_t>::type acc_t;
  const LaneRange r = lane_range(N);
  if (r.count == 0) return;
  const LifParams<acc_t> p = make_params<acc_t>(kind, flags, tau, keep, k_ptr, v_threshold, v_reset);
  acc_t vt[LIF_LANES], vs[LIF_LANES];  // true and speculative state
  int len[LIF_LANES];                  // T while the lane still differs
  LANE_FOR(l, r.count) {
    vt[l] = lif_load(v_true_init, r.base + l * LANE_STRIDE);
    vs[l] = lif_load(checkpoints, r.base + l * LANE_STRIDE);
    len[l] = T;
  }
#ifdef __CUDACC__
  fixup_steps<LIF_RUNTIME, LIF_RUNTIME>(x, checkpoints, spike, v_seq, p, vt, vs, len, r, T, N);
#else
  host_dispatch_forms<LIF_H_COUNT>(lif_charge_form(p), p.hard(), [&](auto form, auto hard) {
    fixup_steps<decltype(form)::value, decltype(hard)::value>(x, checkpoints, spike, v_seq, p, vt, vs, len,
                                                              r, T, N);
  });
#endif
  LANE_FOR(l, r.count) {
    if (len[l] == T) lif_store(v_last, r.base + l * LANE_STRIDE, vt[l]);
    lif_store(fixup_len, r.base + l * LANE_STRIDE, len[l]);
  }
}

// carry = dL/dv after the slice's last step: grad_v_last (storage dtype, the user's gradient on
// the node's state) + carry_in (state dtype, from the next rank); both nullable. Outputs in the
// state dtype: grad_v_init = dL/dv_init, a_prod = prod_t dh/dv * dv/dh (nullable).
template <typename scalar_t, int SG>
__global__ void shard_backward(const scalar_t* __restrict__ grad_spike,
                               const scalar_t* __restrict__ grad_v_seq,   // nullable
                               const scalar_t* __restrict__ grad_v_last,  // nullable
                               const typename acc_of<scalar_t>::type* __restrict__ carry_in,  // nullable
                               const scalar_t* __restrict__ x,
                               const typename acc_of<scalar_t>::type* __restrict__ checkpoints,
                               const typename acc_of<scalar_t>::type* __restrict__ k_ptr,  // nullable
                               scalar_t* __restrict__ grad_x,                              // nullable
                               typename acc_of<scalar_t>::type* __restrict__ grad_v_init,
                               typename acc_of<scalar_t>::type* __restrict__ a_prod,  // nullable
                               typename acc_of<scalar_t>::type* __restrict__ grad_k,  // nullable
                               typename acc_of<scalar_t>::type tau,
                               typename acc_of<scalar_t>::type keep,
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
  acc_t carry[LIF_LANES], gk[LIF_LANES], a[LIF_LANES];
  LANE_FOR(l, r.count) {
    const long long i = r.base + l * LANE_STRIDE;
    carry[l] = (grad_v_last ? to_acc(lif_load(grad_v_last, i)) : acc_t(0)) +
               (carry_in ? lif_load(carry_in, i) : acc_t(0));
    gk[l] = acc_t(0);
    a[l] = acc_t(1);
  }
  backward_steps<SG>(grad_spike, grad_v_seq, x, checkpoints, grad_x, p, sg_a, sg_b, want_k, r, T, N,
                     carry, gk, a);
  LANE_FOR(l, r.count) {
    const long long i = r.base + l * LANE_STRIDE;
    lif_store(grad_v_init, i, carry[l]);
    if (a_prod) lif_store(a_prod, i, a[l]);
    if (want_k) lif_store(grad_k, i, gk[l]);
  }
}

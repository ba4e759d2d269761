// C entry points of the host build (loaded by _host.py through ctypes). One function per kernel;
// dtype codes: 0 fp32, 1 fp64, 2 fp16, 3 bf16 (_host.DTYPE_CODES).
#include "lif.cu"

namespace {

long long blocks_for(long long n) { return (n + LIF_LANES - 1) / LIF_LANES; }

template <typename scalar_t>
void forward(const void* x, const void* v_init, void* spike, void* v_last, void* v_seq,
             void* checkpoints, const void* k_ptr, double tau, double keep, double v_threshold,
             double v_reset, int kind, int flags, int T, long long N, int threads) {
  typedef typename acc_of<scalar_t>::type acc_t;
  host_launch(blocks_for(N), threads, lif_forward<scalar_t>, (const scalar_t*)x,
              (const scalar_t*)v_init, (scalar_t*)spike, (scalar_t*)v_last, (scalar_t*)v_seq,
              (acc_t*)checkpoints, (const acc_t*)k_ptr, (acc_t)tau, (acc_t)keep, (acc_t)v_threshold,
              (acc_t)v_reset, kind, flags, T, N);
}

template <typename scalar_t, int SG>
void backward_sg(const void* grad_spike, const void* grad_v_seq, const void* grad_v_last,
                 const void* x, const void* checkpoints, const void* k_ptr, void* grad_x,
                 void* grad_v_init, void* grad_k, double tau, double keep, double v_threshold,
                 double v_reset, double sg_a, double sg_b, int kind, int flags, int T, long long N,
                 int threads) {
  typedef typename acc_of<scalar_t>::type acc_t;
  host_launch(blocks_for(N), threads, lif_backward<scalar_t, SG>, (const scalar_t*)grad_spike,
              (const scalar_t*)grad_v_seq, (const scalar_t*)grad_v_last, (const scalar_t*)x,
              (const acc_t*)checkpoints, (const acc_t*)k_ptr, (scalar_t*)grad_x,
              (scalar_t*)grad_v_init, (acc_t*)grad_k, (acc_t)tau, (acc_t)keep, (acc_t)v_threshold,
              (acc_t)v_reset, (acc_t)sg_a, (acc_t)sg_b, kind, flags, T, N);
}

typedef decltype(&backward_sg<float, 0>) backward_fn;

template <typename scalar_t, int... SG>
backward_fn pick_backward(int sg, std::integer_sequence<int, SG...>) {
  static const backward_fn table[] = {&backward_sg<scalar_t, SG>...};
  return table[sg];
}

template <typename scalar_t>
backward_fn pick_backward(int sg) {
  return pick_backward<scalar_t>(sg, std::make_integer_sequence<int, SG_COUNT>{});
}

}  // namespace

extern "C" {

int tf_lanes() { return LIF_LANES; }
int tf_chunk() { return LIF_CHUNK; }

int tf_lif_forward(int dtype, const void* x, const void* v_init, void* spike, void* v_last,
                   void* v_seq, void* checkpoints, const void* k_ptr, double tau, double keep,
                   double v_threshold, double v_reset, int kind, int flags, int T, long long N,
                   int threads) {
  switch (dtype) {
    case 0: forward<float>(x, v_init, spike, v_last, v_seq, checkpoints, k_ptr, tau, keep, v_threshold, v_reset, kind, flags, T, N, threads); return 0;
    case 1: forward<double>(x, v_init, spike, v_last, v_seq, checkpoints, k_ptr, tau, keep, v_threshold, v_reset, kind, flags, T, N, threads); return 0;
    case 2: forward<f16_t>(x, v_init, spike, v_last, v_seq, checkpoints, k_ptr, tau, keep, v_threshold, v_reset, kind, flags, T, N, threads); return 0;
    case 3: forward<bf16_t>(x, v_init, spike, v_last, v_seq, checkpoints, k_ptr, tau, keep, v_threshold, v_reset, kind, flags, T, N, threads); return 0;
  }
  return -1;
}

int tf_lif_backward(int dtype, int sg, const void* grad_spike, const void* grad_v_seq,
                    const void* grad_v_last, const void* x, const void* checkpoints,
                    const void* k_ptr, void* grad_x, void* grad_v_init, void* grad_k, double tau,
                    double keep, double v_threshold, double v_reset, double sg_a, double sg_b,
                    int kind, int flags, int T, long long N, int threads) {
  if (sg < 0 || sg >= SG_COUNT) return -2;
  backward_fn fn;
  switch (dtype) {
    case 0: fn = pick_backward<float>(sg); break;
    case 1: fn = pick_backward<double>(sg); break;
    case 2: fn = pick_backward<f16_t>(sg); break;
    case 3: fn = pick_backward<bf16_t>(sg); break;
    default: return -1;
  }
  fn(grad_spike, grad_v_seq, grad_v_last, x, checkpoints, k_ptr, grad_x, grad_v_init, grad_k, tau,
     keep, v_threshold, v_reset, sg_a, sg_b, kind, flags, T, N, threads);
  return 0;
}

#ifdef LIF_COUNT_BYTES
void tf_reset_byte_counts() { lif_bytes_read = lif_bytes_written = 0; }
unsigned long long tf_bytes_read() { return lif_bytes_read; }
unsigned long long tf_bytes_written() { return lif_bytes_written; }
#endif

}  // extern "C"

// ---- time-sharding kernels (csrc/shard.cu, sj_temporal_fusion.distributed) ----
#include "shard.cu"

namespace {

template <typename scalar_t>
void shard_forward_host(const void* x, const void* v_init, void* spike, void* v_last, void* v_seq,
                        void* checkpoints, const void* k_ptr, double tau, double keep,
                        double v_threshold, double v_reset, int kind, int flags, int T, long long N,
                        int threads) {
  typedef typename acc_of<scalar_t>::type acc_t;
  host_launch(blocks_for(N), threads, shard_forward<scalar_t>, (const scalar_t*)x,
              (const acc_t*)v_init, (scalar_t*)spike, (acc_t*)v_last, (scalar_t*)v_seq,
              (acc_t*)checkpoints, (const acc_t*)k_ptr, (acc_t)tau, (acc_t)keep,
              (acc_t)v_threshold, (acc_t)v_reset, kind, flags, T, N);
}

template <typename scalar_t>
void shard_fixup_host(const void* x, const void* v_true_init, void* checkpoints, void* spike,
                      void* v_seq, void* v_last, void* fixup_len, const void* k_ptr, double tau,
                      double keep, double v_threshold, double v_reset, int kind, int flags, int T,
                      long long N, int threads) {
  typedef typename acc_of<scalar_t>::type acc_t;
  host_launch(blocks_for(N), threads, shard_fixup<scalar_t>, (const scalar_t*)x,
              (const acc_t*)v_true_init, (acc_t*)checkpoints, (scalar_t*)spike, (scalar_t*)v_seq,
              (acc_t*)v_last, (int*)fixup_len, (const acc_t*)k_ptr, (acc_t)tau, (acc_t)keep,
              (acc_t)v_threshold, (acc_t)v_reset, kind, flags, T, N);
}

template <typename scalar_t, int SG>
void shard_backward_sg(const void* grad_spike, const void* grad_v_seq, const void* grad_v_last,
                       const void* carry_in, const void* x, const void* checkpoints,
                       const void* k_ptr, void* grad_x, void* grad_v_init, void* a_prod,
                       void* grad_k, double tau, double keep, double v_threshold, double v_reset,
                       double sg_a, double sg_b, int kind, int flags, int T, long long N,
                       int threads) {
  typedef typename acc_of<scalar_t>::type acc_t;
  host_launch(blocks_for(N), threads, shard_backward<scalar_t, SG>, (const scalar_t*)grad_spike,
              (const scalar_t*)grad_v_seq, (const scalar_t*)grad_v_last, (const acc_t*)carry_in,
              (const scalar_t*)x, (const acc_t*)checkpoints, (const acc_t*)k_ptr,
              (scalar_t*)grad_x, (acc_t*)grad_v_init, (acc_t*)a_prod, (acc_t*)grad_k, (acc_t)tau,
              (acc_t)keep, (acc_t)v_threshold, (acc_t)v_reset, (acc_t)sg_a, (acc_t)sg_b, kind,
              flags, T, N);
}

typedef decltype(&shard_backward_sg<float, 0>) shard_backward_fn;

template <typename scalar_t, int... SG>
shard_backward_fn pick_shard_backward(int sg, std::integer_sequence<int, SG...>) {
  static const shard_backward_fn table[] = {&shard_backward_sg<scalar_t, SG>...};
  return table[sg];
}

template <typename scalar_t>
shard_backward_fn pick_shard_backward(int sg) {
  return pick_shard_backward<scalar_t>(sg, std::make_integer_sequence<int, SG_COUNT>{});
}

}  // namespace

extern "C" {

int tf_shard_forward(int dtype, const void* x, const void* v_init, void* spike, void* v_last,
                     void* v_seq, void* checkpoints, const void* k_ptr, double tau, double keep,
                     double v_threshold, double v_reset, int kind, int flags, int T, long long N,
                     int threads) {
  decltype(&shard_forward_host<float>) fn;
  switch (dtype) {
    case 0: fn = shard_forward_host<float>; break;
    case 1: fn = shard_forward_host<double>; break;
    case 2: fn = shard_forward_host<f16_t>; break;
    case 3: fn = shard_forward_host<bf16_t>; break;
    default: return -1;
  }
  fn(x, v_init, spike, v_last, v_seq, checkpoints, k_ptr, tau, keep, v_threshold, v_reset, kind,
     flags, T, N, threads);
  return 0;
}

int tf_shard_fixup(int dtype, const void* x, const void* v_true_init, void* checkpoints,
                   void* spike, void* v_seq, void* v_last, void* fixup_len, const void* k_ptr,
                   double tau, double keep, double v_threshold, double v_reset, int kind, int flags,
                   int T, long long N, int threads) {
  decltype(&shard_fixup_host<float>) fn;
  switch (dtype) {
    case 0: fn = shard_fixup_host<float>; break;
    case 1: fn = shard_fixup_host<double>; break;
    case 2: fn = shard_fixup_host<f16_t>; break;
    case 3: fn = shard_fixup_host<bf16_t>; break;
    default: return -1;
  }
  fn(x, v_true_init, checkpoints, spike, v_seq, v_last, fixup_len, k_ptr, tau, keep, v_threshold,
     v_reset, kind, flags, T, N, threads);
  return 0;
}

int tf_shard_backward(int dtype, int sg, const void* grad_spike, const void* grad_v_seq,
                      const void* grad_v_last, const void* carry_in, const void* x,
                      const void* checkpoints, const void* k_ptr, void* grad_x, void* grad_v_init,
                      void* a_prod, void* grad_k, double tau, double keep, double v_threshold,
                      double v_reset, double sg_a, double sg_b, int kind, int flags, int T,
                      long long N, int threads) {
  if (sg < 0 || sg >= SG_COUNT) return -2;
  shard_backward_fn fn;
  switch (dtype) {
    case 0: fn = pick_shard_backward<float>(sg); break;
    case 1: fn = pick_shard_backward<double>(sg); break;
    case 2: fn = pick_shard_backward<f16_t>(sg); break;
    case 3: fn = pick_shard_backward<bf16_t>(sg); break;
    default: return -1;
  }
  fn(grad_spike, grad_v_seq, grad_v_last, carry_in, x, checkpoints, k_ptr, grad_x, grad_v_init,
     a_prod, grad_k, tau, keep, v_threshold, v_reset, sg_a, sg_b, kind, flags, T, N, threads);
  return 0;
}

}  // extern "C"

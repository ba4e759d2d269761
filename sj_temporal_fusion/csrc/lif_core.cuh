// Scalar LIF dynamics: charge, fire, reset and the surrogate derivative.
// Framework-free and __host__ __device__: NVRTC compiles it for the GPU, g++ for the host
// (through host_shim.h). Both builds run with FP contraction off (NVRTC --fmad=false,
// g++ -ffp-contract=off), so the forward pass is bitwise identical on host and GPU.
#pragma once

#ifndef LIF_HD
#define LIF_HD __host__ __device__ __forceinline__
#endif

// Neuron kinds (Python: sj_temporal_fusion.ops.Kind).
#define LIF_KIND_IF 0    // h = v + x
#define LIF_KIND_LIF 1   // decay 1/tau, divides by tau like SpikingJelly's LIFNode
#define LIF_KIND_PLIF 2  // decay k = sigmoid(w), multiplies by k like ParametricLIFNode

// Option bits packed in one int, so one compiled kernel serves every node option.
#define LIF_DECAY_INPUT 1
#define LIF_HARD_RESET 2
#define LIF_DETACH_RESET 4

// Surrogate ids (Python: sj_temporal_fusion.surrogate.SURROGATES, same order).
#define SG_PIECEWISE_QUADRATIC 0
#define SG_PIECEWISE_EXP 1
#define SG_SIGMOID 2
#define SG_SOFT_SIGN 3
#define SG_ATAN 4
#define SG_NONZERO_SIGN_LOG_ABS 5
#define SG_ERF 6
#define SG_PIECEWISE_LEAKY_RELU 7
#define SG_SQUAREWAVE_FOURIER_SERIES 8
#define SG_S2NN 9
#define SG_Q_PSEUDO_SPIKE 10
#define SG_LEAKY_K_RELU 11
#define SG_FAKE_NUMERICAL_GRADIENT 12
#define SG_LOG_TAILED_RELU 13
#define SG_COUNT 14

// ---- bit casts and IEEE fp16 conversions (round to nearest even in both builds) ----
#ifdef __CUDACC__
LIF_HD float lif_bits_to_float(unsigned int u) { return __uint_as_float(u); }
LIF_HD unsigned int lif_float_to_bits(float f) { return __float_as_uint(f); }
LIF_HD float lif_half_to_float(unsigned short h) {
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
  return f;
}
LIF_HD unsigned short lif_float_to_half(float f) {
  unsigned short h;
  asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
  return h;
}
#else
LIF_HD float lif_bits_to_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
LIF_HD unsigned int lif_float_to_bits(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
// IEEE fp16 <-> fp32 in integer and fp32 arithmetic with selects only (the FP16 library's
// fp16_ieee_to/from_fp32_value, which c10::Half uses on the CPU): round to nearest even, exact
// for every non-NaN input (checked against _Float16 on all 65,536 halves and 2e8 floats); NaN
// becomes the quiet NaN 0x7E00. g++ 12 does not vectorise _Float16 conversions without
// AVX512-FP16, so with _Float16 the fp16 lane loops ran scalar (fp16 forward 5x slower than fp32).
LIF_HD float lif_half_to_float(unsigned short h) {
  const unsigned int w = (unsigned int)h << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = lif_bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = lif_bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return lif_bits_to_float(sign | (two_w < (1u << 27) ? lif_float_to_bits(denormalized)
                                                      : lif_float_to_bits(normalized)));
}
LIF_HD unsigned short lif_float_to_half(float f) {
  float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;  // needs -ffp-contract=off, no FTZ
  const unsigned int w = lif_float_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  unsigned int bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = lif_bits_to_float((bias >> 1) + 0x07800000u) + base;
  const unsigned int bits = lif_float_to_bits(base);
  const unsigned int nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return (unsigned short)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
#endif

// ---- storage types: fp16/bf16 are stored as raw bits, state is fp32 (fp64 for fp64) ----
struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

template <typename scalar_t> struct acc_of { typedef float type; };
template <> struct acc_of<double> { typedef double type; };

LIF_HD float to_acc(float v) { return v; }
LIF_HD double to_acc(double v) { return v; }
LIF_HD float to_acc(bf16_t v) { return lif_bits_to_float((unsigned int)v.bits << 16); }
LIF_HD float to_acc(f16_t v) { return lif_half_to_float(v.bits); }

template <typename scalar_t> LIF_HD scalar_t from_acc(typename acc_of<scalar_t>::type v);
template <> LIF_HD float from_acc<float>(float v) { return v; }
template <> LIF_HD double from_acc<double>(double v) { return v; }
template <> LIF_HD f16_t from_acc<f16_t>(float v) { f16_t r; r.bits = lif_float_to_half(v); return r; }
template <> LIF_HD bf16_t from_acc<bf16_t>(float v) {
  // Round to nearest even, NaN kept quiet: the same rule as c10::BFloat16.
  unsigned int u = lif_float_to_bits(v);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = (unsigned short)((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = (unsigned short)(u >> 16);
  return r;
}

// ---- math in the state precision ----
LIF_HD float lif_exp(float x) { return expf(x); }
LIF_HD double lif_exp(double x) { return exp(x); }
LIF_HD float lif_cos(float x) { return cosf(x); }
LIF_HD double lif_cos(double x) { return cos(x); }
LIF_HD float lif_pow(float x, float y) { return powf(x, y); }
LIF_HD double lif_pow(double x, double y) { return pow(x, y); }
LIF_HD float lif_abs(float x) { return fabsf(x); }
LIF_HD double lif_abs(double x) { return fabs(x); }

// ---- one neuron-step, written exactly as SpikingJelly 0.0.0.0.14 writes it, so fp32/fp64
// results equal its torch backend bit for bit (division by tau, not multiplication by 1/tau).
template <typename acc_t>
struct LifParams {
  int kind;
  int flags;
  acc_t tau;          // LIF: tau
  acc_t k;            // PLIF: sigmoid(w)
  acc_t keep;         // v's factor in the no-decay-input reset-0 charge: 1 - 1/tau or 1 - sigmoid(w),
                      // computed by the caller in the precision SpikingJelly uses (double / w's dtype)
  acc_t v_threshold;
  acc_t v_reset;      // hard reset value; ignored for soft reset

  LIF_HD bool decay_input() const { return flags & LIF_DECAY_INPUT; }
  LIF_HD bool hard() const { return flags & LIF_HARD_RESET; }
  LIF_HD bool detach() const { return flags & LIF_DETACH_RESET; }
  // SpikingJelly drops v_reset from the charge when it is None or 0.
  LIF_HD bool reset0() const { return !hard() || v_reset == acc_t(0); }
};

// SpikingJelly's charge formulas; which one applies follows from kind, decay_input and reset0.
#define LIF_H_IF 0           // v + x
#define LIF_H_DIV_DECAY0 1   // v + (x - v) / tau
#define LIF_H_DIV_DECAY 2    // v + (x - (v - v_reset)) / tau
#define LIF_H_DIV_NODECAY 3  // v - (v - v_reset) / tau + x
#define LIF_H_MUL_DECAY0 4   // v + (x - v) * k
#define LIF_H_MUL_DECAY 5    // v + (x - (v - v_reset)) * k
#define LIF_H_MUL_NODECAY 6  // v - (v - v_reset) * k + x
#define LIF_H_KEEP 7         // v * keep + x
#define LIF_H_COUNT 8
#define LIF_RUNTIME -1       // template argument: read the choice from LifParams at run time

template <typename acc_t>
LIF_HD int lif_charge_form(const LifParams<acc_t>& p) {
  if (p.kind == LIF_KIND_IF) return LIF_H_IF;
  if (!p.decay_input() && p.reset0()) return LIF_H_KEEP;
  const int base = p.kind == LIF_KIND_LIF ? LIF_H_DIV_DECAY0 : LIF_H_MUL_DECAY0;
  return base + (p.decay_input() ? (p.reset0() ? 0 : 1) : 2);
}

// FORM: one of LIF_H_*, fixed at compile time where the caller specialises (the host build, so
// the lane loop has no branches and vectorises), or LIF_RUNTIME (the GPU: the branch is uniform).
template <int FORM = LIF_RUNTIME, typename acc_t>
LIF_HD acc_t lif_charge(acc_t v, acc_t x, const LifParams<acc_t>& p) {
  switch (FORM == LIF_RUNTIME ? lif_charge_form(p) : FORM) {
    case LIF_H_IF: return v + x;
    case LIF_H_DIV_DECAY0: return v + (x - v) / p.tau;
    case LIF_H_DIV_DECAY: return v + (x - (v - p.v_reset)) / p.tau;
    case LIF_H_DIV_NODECAY: return v - (v - p.v_reset) / p.tau + x;
    case LIF_H_MUL_DECAY0: return v + (x - v) * p.k;
    case LIF_H_MUL_DECAY: return v + (x - (v - p.v_reset)) * p.k;
    case LIF_H_MUL_NODECAY: return v - (v - p.v_reset) * p.k + x;
    default: return v * p.keep + x;
  }
}

template <typename acc_t>
LIF_HD acc_t lif_fire(acc_t h, const LifParams<acc_t>& p) {
  return h >= p.v_threshold ? acc_t(1) : acc_t(0);
}

// (1 - s) * h + s * v_reset, not a select: h = inf with s = 1 gives NaN, as in the reference.
// HARD: 1 hard reset, 0 soft reset, LIF_RUNTIME from the flags.
template <int HARD = LIF_RUNTIME, typename acc_t>
LIF_HD acc_t lif_reset(acc_t h, acc_t s, const LifParams<acc_t>& p) {
  const bool hard = HARD == LIF_RUNTIME ? p.hard() : HARD == 1;
  return hard ? (acc_t(1) - s) * h + s * p.v_reset : h - s * p.v_threshold;
}

// d h / d v_prev and d h / d x.
template <typename acc_t>
LIF_HD acc_t lif_dh_dv(const LifParams<acc_t>& p) {
  if (p.kind == LIF_KIND_IF) return acc_t(1);
  if (!p.decay_input() && p.reset0()) return p.keep;  // h = v * keep + x
  return p.kind == LIF_KIND_LIF ? acc_t(1) - acc_t(1) / p.tau : acc_t(1) - p.k;
}

template <typename acc_t>
LIF_HD acc_t lif_dh_dx(const LifParams<acc_t>& p) {
  if (!p.decay_input() || p.kind == LIF_KIND_IF) return acc_t(1);
  return p.kind == LIF_KIND_LIF ? acc_t(1) / p.tau : p.k;
}

// d h / d k for PLIF: x - (v - v_reset) with decay_input, else -(v - v_reset).
template <typename acc_t>
LIF_HD acc_t lif_dh_dk(acc_t v_prev, acc_t x, const LifParams<acc_t>& p) {
  acc_t vr = p.reset0() ? acc_t(0) : p.v_reset;
  return p.decay_input() ? x - (v_prev - vr) : -(v_prev - vr);
}

// d v_after_reset / d h, the surrogate term included unless detach_reset.
template <int HARD = LIF_RUNTIME, typename acc_t>
LIF_HD acc_t lif_dv_dh(acc_t h, acc_t s, acc_t sg, const LifParams<acc_t>& p) {
  if (HARD == LIF_RUNTIME ? p.hard() : HARD == 1) return p.detach() ? acc_t(1) - s : (acc_t(1) - s) + sg * (p.v_reset - h);
  return p.detach() ? acc_t(1) : acc_t(1) - sg * p.v_threshold;
}

// The surrogate derivative g'(x), x = h - v_threshold, as SpikingJelly 0.0.0.0.14 defines it.
template <int SG, typename acc_t>
LIF_HD acc_t surrogate_grad(acc_t x, acc_t a, acc_t b) {
  const acc_t one = acc_t(1), zero = acc_t(0);
  const acc_t ax = lif_abs(x);
  switch (SG) {
    case SG_PIECEWISE_QUADRATIC: return ax > one / a ? zero : -(a * a) * ax + a;
    case SG_PIECEWISE_EXP: return a / acc_t(2) * lif_exp(-a * ax);
    case SG_SIGMOID: {
      acc_t s = one / (one + lif_exp(-(x * a)));
      return (one - s) * s * a;
    }
    case SG_SOFT_SIGN: {
      acc_t d = one / a + ax;
      return one / (acc_t(2) * a * (d * d));
    }
    case SG_ATAN: {
      acc_t u = acc_t(1.57079632679489661923) * a * x;
      return a / acc_t(2) / (one + u * u);
    }
    case SG_NONZERO_SIGN_LOG_ABS: return one / (one / a + ax);
    case SG_ERF: return lif_exp(-((x * a) * (x * a))) * (a / acc_t(1.77245385090551602730));
    case SG_PIECEWISE_LEAKY_RELU: return ax < a ? one / a : b;  // a = w, b = c
    case SG_SQUAREWAVE_FOURIER_SERIES: {                         // a = n, b = T_period
      acc_t w = acc_t(6.28318530717958647692) / b, g = zero;
      for (int i = 1; i < (int)a; ++i) g += lif_cos(acc_t(2 * i - 1) * w * x);
      return g * (acc_t(4) / b);
    }
    case SG_S2NN: {                                              // a = alpha, b = beta
      acc_t s = one / (one + lif_exp(-(a * x)));
      return x < zero ? a * s * (one - s) : b / (x + one);
    }
    case SG_Q_PSEUDO_SPIKE: return lif_pow(one + acc_t(2) / (a - one) * ax, -a);
    case SG_LEAKY_K_RELU: return x >= zero ? b : a;              // a = leak, b = k
    case SG_FAKE_NUMERICAL_GRADIENT: {
      acc_t g = (x >= zero ? one : -one) / x;
      return g > a ? a : g;                                      // clamp_max, NaN kept
    }
    case SG_LOG_TAILED_RELU: return x > one ? one / x : (x <= zero ? a : one);
    default: return zero;
  }
}

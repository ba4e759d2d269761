// The 14 surrogate derivatives of SpikingJelly 0.0.0.0.14, on scalars, for every neuron model.
// Each SG_<NAME> is an entry (id, name) of the table in sj_temporal_fusion/surrogate.py, and each
// has its case below (tests/test_reference.py checks both).
#pragma once
#include "common/fp.cuh"

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

// The surrogate derivative g'(x), x = h - v_threshold, as SpikingJelly 0.0.0.0.14 defines it.
template <int SG, typename acc_t>
TF_HD acc_t surrogate_grad(acc_t x, acc_t a, acc_t b) {
  const acc_t one = acc_t(1), zero = acc_t(0);
  const acc_t ax = tf_abs(x);
  switch (SG) {
    case SG_PIECEWISE_QUADRATIC: return ax > one / a ? zero : -(a * a) * ax + a;
    case SG_PIECEWISE_EXP: return a / acc_t(2) * tf_exp(-a * ax);
    case SG_SIGMOID: {
      acc_t s = one / (one + tf_exp(-(x * a)));
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
    case SG_ERF: return tf_exp(-((x * a) * (x * a))) * (a / acc_t(1.77245385090551602730));
    case SG_PIECEWISE_LEAKY_RELU: return ax < a ? one / a : b;  // a = w, b = c
    case SG_SQUAREWAVE_FOURIER_SERIES: {                         // a = n, b = T_period
      // cos((2i - 1) 2 pi x / T_period) as cospi((2i - 1) 2 x / T_period)
      // Not unrolled: one term's registers at a time (the backward's chunk holds the rest).
      acc_t w = acc_t(2) / b, g = zero;
#pragma unroll 1
      for (int i = 1; i < (int)a; ++i) g += tf_cospi(acc_t(2 * i - 1) * w * x);
      return g * (acc_t(4) / b);
    }
    case SG_S2NN: {                                              // a = alpha, b = beta
      acc_t s = one / (one + tf_exp(-(a * x)));
      return x < zero ? a * s * (one - s) : b / (x + one);
    }
    case SG_Q_PSEUDO_SPIKE: return tf_pow(one + acc_t(2) / (a - one) * ax, -a);
    case SG_LEAKY_K_RELU: return x >= zero ? b : a;              // a = leak, b = k
    case SG_FAKE_NUMERICAL_GRADIENT: {
      // sign(x) / x is 1 / |x|: x = h - v_threshold is never -0 (a difference of equal finite
      // numbers is +0), and +0 gives +inf either way.
      acc_t g = one / ax;
      return g > a ? a : g;                                      // clamp_max, NaN kept
    }
    case SG_LOG_TAILED_RELU: return x > one ? one / x : (x <= zero ? a : one);
    default: return zero;
  }
}

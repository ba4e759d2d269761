// KLIFNode (sj_temporal_fusion/neurons/klif.py): LIF's charge scaled by the learnable k and
// rectified, h = relu(k (v + (x - (v - v_reset)) / tau)) (decay_input) or
// relu(k (v - (v - v_reset) / tau + x)); with scale_reset the reset divides by k again. With soft
// reset (v_reset=None) SpikingJelly 0.0.0.0.14's own code raises; we follow the documented dynamics
// with v_reset = 0 in the charge.
#pragma once
#include "neurons/base.cuh"

struct KlifModel {
  enum { S = 1, NP = 4, CHUNK = 8, TAU = 0, K = 1, V_TH = 2, V_RESET = 3 };
  template <int FORM> struct Form {
    enum { DECAY_INPUT = FORM & 1, HARD = (FORM >> 1) & 1, DETACH = (FORM >> 2) & 1, SCALE = (FORM >> 3) & 1 };
  };

  template <int FORM, typename acc_t>
  static TF_HD acc_t pre_relu(acc_t v, acc_t x, const acc_t* p) {
    return Form<FORM>::DECAY_INPUT ? v + (x - (v - p[V_RESET])) / p[TAU] : v - (v - p[V_RESET]) / p[TAU] + x;
  }

  template <int FORM, typename acc_t>
  static TF_HD acc_t charge(const acc_t* z, acc_t x, const acc_t* p) {
    const acc_t t = p[K] * pre_relu<FORM>(z[0], x, p);
    return t < acc_t(0) ? acc_t(0) : t;  // relu, NaN kept
  }

  template <int FORM, typename acc_t>
  static TF_HD void reset(acc_t* z, acc_t h, acc_t s, const acc_t* p) {
    if (!Form<FORM>::SCALE) z[0] = base_reset<Form<FORM>::HARD>(h, s, p[V_TH], p[V_RESET]);
    else if (Form<FORM>::HARD) z[0] = base_reset<true>(h / p[K], s, p[V_TH], p[V_RESET]);
    else z[0] = base_reset<false>(h, s, p[V_TH], p[V_RESET]) / p[K];
  }

  template <int FORM, typename acc_t>
  static TF_HD void reset_vjp(const acc_t* z, acc_t h, acc_t s, const acc_t* p, const acc_t* gz,
                              acc_t& gh, acc_t& gs, acc_t* gz_prev, acc_t* gp) {
    enum { HARD = Form<FORM>::HARD, DETACH = Form<FORM>::DETACH };
    gz_prev[0] = acc_t(0);
    if (!Form<FORM>::SCALE) {
      gh = base_reset_vjp<HARD, DETACH>(h, s, p[V_TH], p[V_RESET], gz[0], gs, gp[V_TH], gp[V_RESET]);
    } else if (HARD) {  // v' = (1 - s) u + s v_reset, u = h / k
      const acc_t u = h / p[K];
      const acc_t gu = base_reset_vjp<true, DETACH>(u, s, p[V_TH], p[V_RESET], gz[0], gs, gp[V_TH], gp[V_RESET]);
      gh = gu / p[K];
      gp[K] -= gu * u / p[K];
    } else {  // v' = (h - s v_threshold) / k
      const acc_t gq = gz[0] / p[K];
      gh = base_reset_vjp<false, DETACH>(h, s, p[V_TH], p[V_RESET], gq, gs, gp[V_TH], gp[V_RESET]);
      gp[K] -= gq * base_reset<false>(h, s, p[V_TH], p[V_RESET]) / p[K];
    }
  }

  template <int FORM, typename acc_t>
  static TF_HD void charge_vjp(const acc_t* z, acc_t x, const acc_t* p, acc_t gh, acc_t* gz_prev,
                               acc_t& gx, acc_t* gp) {
    const acc_t one = acc_t(1), hp = pre_relu<FORM>(z[0], x, p);
    const acc_t gt = p[K] * hp > acc_t(0) ? gh : acc_t(0);  // relu passes gradient where k hp > 0
    const acc_t ghp = gt * p[K];
    gp[K] += gt * hp;
    gz_prev[0] += ghp * (one - one / p[TAU]);
    gx = Form<FORM>::DECAY_INPUT ? ghp / p[TAU] : ghp;
    gp[V_RESET] += ghp / p[TAU];
  }
};

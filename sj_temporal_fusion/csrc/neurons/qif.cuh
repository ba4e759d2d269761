// QIFNode (sj_temporal_fusion/neurons/qif.py): h = v + (x + a0 (v - v_rest)(v - v_c)) / tau,
// SpikingJelly 0.0.0.0.14's formula in its order of operations; its BaseNode reset.
#pragma once
#include "neurons/base.cuh"

struct QifModel : BaseNodeReset<QifModel> {  // its reset: BaseNode's
  enum { S = 1, NP = 6, CHUNK = 16, TAU = 0, V_C = 1, A0 = 2, V_TH = 3, V_RESET = 4, V_REST = 5 };
  template <int FORM> struct Form { enum { HARD = FORM & 1, DETACH = (FORM >> 1) & 1 }; };

  template <int FORM, typename acc_t>
  static TF_HD acc_t charge(const acc_t* z, acc_t x, const acc_t* p) {
    const acc_t v = z[0];
    return v + (x + p[A0] * (v - p[V_REST]) * (v - p[V_C])) / p[TAU];
  }

  template <int FORM, typename acc_t>
  static TF_HD void charge_vjp(const acc_t* z, acc_t x, const acc_t* p, acc_t gh, acc_t* gz_prev,
                               acc_t& gx, acc_t* gp) {
    const acc_t v = z[0];
    gz_prev[0] += gh * (acc_t(1) + p[A0] * ((v - p[V_C]) + (v - p[V_REST])) / p[TAU]);
    gx = gh / p[TAU];
  }
};

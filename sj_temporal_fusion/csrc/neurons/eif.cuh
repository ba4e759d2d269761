// EIFNode (sj_temporal_fusion/neurons/eif.py):
// h = v + (x + v_rest - v + delta_T exp((v - theta_rh) / delta_T)) / tau, as SpikingJelly 0.0.0.0.14
// writes it; its BaseNode reset. exp rounds differently in libm, CUDA and PyTorch: results agree
// with the torch backend to rounding, not bit for bit.
#pragma once
#include "neurons/base.cuh"

struct EifModel : BaseNodeReset<EifModel> {  // its reset: BaseNode's
  enum { S = 1, NP = 6, CHUNK = 16, TAU = 0, DELTA_T = 1, THETA_RH = 2, V_TH = 3, V_RESET = 4, V_REST = 5 };
  template <int FORM> struct Form { enum { HARD = FORM & 1, DETACH = (FORM >> 1) & 1 }; };

  template <typename acc_t>
  static TF_HD acc_t spike_current(acc_t v, const acc_t* p) {
    return p[DELTA_T] * tf_exp((v - p[THETA_RH]) / p[DELTA_T]);
  }

  template <int FORM, typename acc_t>
  static TF_HD acc_t charge(const acc_t* z, acc_t x, const acc_t* p) {
    const acc_t v = z[0];
    return v + (x + p[V_REST] - v + spike_current(v, p)) / p[TAU];
  }

  template <int FORM, typename acc_t>
  static TF_HD void charge_vjp(const acc_t* z, acc_t x, const acc_t* p, acc_t gh, acc_t* gz_prev,
                               acc_t& gx, acc_t* gp) {
    const acc_t v = z[0];
    // d/dv of delta_T exp((v - theta_rh) / delta_T) is exp((v - theta_rh) / delta_T).
    gz_prev[0] += gh * (acc_t(1) + (tf_exp((v - p[THETA_RH]) / p[DELTA_T]) - acc_t(1)) / p[TAU]);
    gx = gh / p[TAU];
  }
};

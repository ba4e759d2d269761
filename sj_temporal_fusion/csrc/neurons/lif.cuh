// IF, LIF and ParametricLIF (sj_temporal_fusion/neurons/lif.py): one state variable, SpikingJelly
// 0.0.0.0.14's charge formulas written as it writes them (division by tau, PLIF's k and 1 - k
// computed by the caller in w's dtype), so fp32/fp64 results equal its torch backend bit for bit.
#pragma once
#include "neurons/base.cuh"

// Charge formulas (FORM bits 0-2): which one applies follows from the class, decay_input and
// whether v_reset is 0 / None (SpikingJelly then drops it from the charge).
#define LIF_H_IF 0           // v + x
#define LIF_H_DIV_DECAY0 1   // v + (x - v) / tau
#define LIF_H_DIV_DECAY 2    // v + (x - (v - v_reset)) / tau
#define LIF_H_DIV_NODECAY 3  // v - (v - v_reset) / tau + x
#define LIF_H_MUL_DECAY0 4   // v + (x - v) * k
#define LIF_H_MUL_DECAY 5    // v + (x - (v - v_reset)) * k
#define LIF_H_MUL_NODECAY 6  // v - (v - v_reset) * k + x
#define LIF_H_KEEP 7         // v * keep + x  (keep = 1 - 1/tau in double, or 1 - k)

struct LifModel : BaseNodeReset<LifModel> {  // its reset: BaseNode's
  enum { S = 1, NP = 5, CHUNK = 16, TAU = 0, K = 1, KEEP = 2, V_TH = 3, V_RESET = 4 };
  template <int FORM> struct Form {
    enum { CHARGE = FORM & 7, HARD = (FORM >> 3) & 1, DETACH = (FORM >> 4) & 1 };
  };

  template <int FORM, typename acc_t>
  static TF_HD acc_t charge(const acc_t* z, acc_t x, const acc_t* p) {
    const acc_t v = z[0];
    switch (Form<FORM>::CHARGE) {
      case LIF_H_IF: return v + x;
      case LIF_H_DIV_DECAY0: return v + (x - v) / p[TAU];
      case LIF_H_DIV_DECAY: return v + (x - (v - p[V_RESET])) / p[TAU];
      case LIF_H_DIV_NODECAY: return v - (v - p[V_RESET]) / p[TAU] + x;
      case LIF_H_MUL_DECAY0: return v + (x - v) * p[K];
      case LIF_H_MUL_DECAY: return v + (x - (v - p[V_RESET])) * p[K];
      case LIF_H_MUL_NODECAY: return v - (v - p[V_RESET]) * p[K] + x;
      default: return v * p[KEEP] + x;
    }
  }

  template <int FORM, typename acc_t>
  static TF_HD void charge_vjp(const acc_t* z, acc_t x, const acc_t* p, acc_t gh, acc_t* gz_prev,
                               acc_t& gx, acc_t* gp) {
    const acc_t one = acc_t(1), v = z[0];
    switch (Form<FORM>::CHARGE) {
      case LIF_H_IF: gz_prev[0] += gh; gx = gh; break;
      case LIF_H_DIV_DECAY0: gz_prev[0] += gh * (one - one / p[TAU]); gx = gh / p[TAU]; break;
      case LIF_H_DIV_DECAY:
        gz_prev[0] += gh * (one - one / p[TAU]); gx = gh / p[TAU]; gp[V_RESET] += gh / p[TAU]; break;
      case LIF_H_DIV_NODECAY:
        gz_prev[0] += gh * (one - one / p[TAU]); gx = gh; gp[V_RESET] += gh / p[TAU]; break;
      case LIF_H_MUL_DECAY0: gz_prev[0] += gh * (one - p[K]); gx = gh * p[K]; gp[K] += gh * (x - v); break;
      case LIF_H_MUL_DECAY:
        gz_prev[0] += gh * (one - p[K]); gx = gh * p[K];
        gp[K] += gh * (x - (v - p[V_RESET])); gp[V_RESET] += gh * p[K]; break;
      case LIF_H_MUL_NODECAY:
        gz_prev[0] += gh * (one - p[K]); gx = gh;
        gp[K] -= gh * (v - p[V_RESET]); gp[V_RESET] += gh * p[K]; break;
      default: gz_prev[0] += gh * p[KEEP]; gx = gh; gp[KEEP] += gh * v; break;
    }
  }
};

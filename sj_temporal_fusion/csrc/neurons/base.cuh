// What a neuron model is to the kernels (csrc/temporal.cu), and SpikingJelly's BaseNode reset,
// which most models share. A model is a struct with
//   S, NP, V_TH, V_RESET    state variables (z[0] is v, the one that fires; at most two), parameters,
//                           the indices of v_threshold and v_reset among them;
//   CHUNK                   steps between checkpoints: the backward keeps a chunk's states and
//                           inputs in registers, so a heavier step takes a shorter chunk (8 or 16);
//   charge<FORM>(z, x, p)   -> h, the pre-spike v;
//   reset<FORM>(z, h, s, p) z (the state before the step) becomes the state after it;
//   reset_vjp<FORM>(z, h, s, p, gz, gh, gs, gz_prev, gp)
//                           given gz = dL/d(state after the step): gh = dL/dh and gs = dL/ds
//                           through the reset (gs = 0 where the reset is detached), gz_prev =
//                           dL/dz through the reset's direct use of the old state, gp += dL/dp;
//   charge_vjp<FORM>(z, x, p, gh, gz_prev, gx, gp)
//                           gz_prev += dh/dz * gh, gx = dh/dx * gh, gp += dh/dp * gh.
// FORM is an integer the model's Python file computes from a node's options (which formula, hard
// or soft reset, detach_reset): every variant is compiled for one FORM, with no branch on options.
// Gradients are carried for the parameters SpikingJelly can learn (v_threshold, v_reset, PLIF's
// k, KLIF's k); a model's other parameters are plain floats there, and here.
#pragma once
#include "common/fp.cuh"

template <typename acc_t>
TF_HD acc_t tf_fire(acc_t h, acc_t v_threshold) {
  return h >= v_threshold ? acc_t(1) : acc_t(0);
}

// (1 - s) * h + s * v_reset, not a select: h = inf with s = 1 gives NaN, as in SpikingJelly.
template <bool HARD, typename acc_t>
TF_HD acc_t base_reset(acc_t h, acc_t s, acc_t v_threshold, acc_t v_reset) {
  return HARD ? (acc_t(1) - s) * h + s * v_reset : h - s * v_threshold;
}

// The reset's vjp for v: gv is dL/dv after the reset; returns dL/dh, sets dL/ds (0 if detached)
// and adds to the gradients of v_threshold (soft) or v_reset (hard).
template <bool HARD, bool DETACH, typename acc_t>
TF_HD acc_t base_reset_vjp(acc_t h, acc_t s, acc_t v_threshold, acc_t v_reset, acc_t gv, acc_t& gs,
                           acc_t& g_threshold, acc_t& g_reset) {
  if (HARD) {
    gs = DETACH ? acc_t(0) : gv * (v_reset - h);
    g_reset += gv * s;
    return gv * (acc_t(1) - s);
  }
  gs = DETACH ? acc_t(0) : -(gv * v_threshold);
  g_threshold -= gv * s;
  return gv;
}

// SpikingJelly's BaseNode reset as a model's reset / reset_vjp: a model with one state variable and
// that reset derives from BaseNodeReset<itself> and defines Form<FORM>::HARD / DETACH, V_TH, V_RESET.
template <class M>
struct BaseNodeReset {
  template <int FORM, typename acc_t>
  static TF_HD void reset(acc_t* z, acc_t h, acc_t s, const acc_t* p) {
    z[0] = base_reset<(bool)M::template Form<FORM>::HARD>(h, s, p[M::V_TH], p[M::V_RESET]);
  }

  template <int FORM, typename acc_t>
  static TF_HD void reset_vjp(const acc_t*, acc_t h, acc_t s, const acc_t* p, const acc_t* gz, acc_t& gh,
                              acc_t& gs, acc_t* gz_prev, acc_t* gp) {
    enum { HARD = M::template Form<FORM>::HARD, DETACH = M::template Form<FORM>::DETACH };
    gh = base_reset_vjp<(bool)HARD, (bool)DETACH>(h, s, p[M::V_TH], p[M::V_RESET], gz[0], gs, gp[M::V_TH],
                                                  gp[M::V_RESET]);
    gz_prev[0] = acc_t(0);
  }
};

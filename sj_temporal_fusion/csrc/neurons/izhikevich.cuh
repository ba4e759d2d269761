// IzhikevichNode (sj_temporal_fusion/neurons/izhikevich.py): two state variables, v and the
// adaptation current w, as SpikingJelly 0.0.0.0.14 steps them:
//   h  = v + (x + a0 (v - v_rest)(v - v_c) - w) / tau                        (charge)
//   w  = w + 1/tau_w (a (h - v_rest) - w)                                   (adaptation, uses h)
//   s  = h >= v_threshold
//   v' = (1 - s_d) h + s v_reset  or  h - s_d v_threshold;   w' = w + b s    (AdaptBaseNode reset)
// with s_d the spike detached when detach_reset; SpikingJelly's hard reset and w's jump use the
// undetached s, and so do we.
#pragma once
#include "neurons/base.cuh"

struct IzhikevichModel {
  enum { S = 2, NP = 9, CHUNK = 8, TAU = 0, V_C = 1, A0 = 2, V_TH = 3, V_RESET = 4, V_REST = 5, INV_TAU_W = 6,
         A = 7, B = 8 };
  template <int FORM> struct Form { enum { HARD = FORM & 1, DETACH = (FORM >> 1) & 1 }; };

  template <int FORM, typename acc_t>
  static TF_HD acc_t charge(const acc_t* z, acc_t x, const acc_t* p) {
    const acc_t v = z[0];
    return v + (x + p[A0] * (v - p[V_REST]) * (v - p[V_C]) - z[1]) / p[TAU];
  }

  template <int FORM, typename acc_t>
  static TF_HD void reset(acc_t* z, acc_t h, acc_t s, const acc_t* p) {
    const acc_t w = z[1] + p[INV_TAU_W] * (p[A] * (h - p[V_REST]) - z[1]);
    z[0] = Form<FORM>::HARD ? (acc_t(1) - s) * h + s * p[V_RESET] : h - s * p[V_TH];
    z[1] = w + p[B] * s;
  }

  template <int FORM, typename acc_t>
  static TF_HD void reset_vjp(const acc_t* z, acc_t h, acc_t s, const acc_t* p, const acc_t* gz,
                              acc_t& gh, acc_t& gs, acc_t* gz_prev, acc_t* gp) {
    const acc_t gv = gz[0], gw = gz[1];
    if (Form<FORM>::HARD) {  // v' = (1 - s_d) h + s v_reset: the second s is never detached
      gh = gv * (acc_t(1) - s);
      gs = Form<FORM>::DETACH ? gv * p[V_RESET] : gv * (p[V_RESET] - h);
      gp[V_RESET] += gv * s;
    } else {
      gh = gv;
      gs = Form<FORM>::DETACH ? acc_t(0) : -(gv * p[V_TH]);
      gp[V_TH] -= gv * s;
    }
    gh += gw * p[INV_TAU_W] * p[A];
    gs += gw * p[B];
    gz_prev[0] = acc_t(0);
    gz_prev[1] = gw * (acc_t(1) - p[INV_TAU_W]);
  }

  template <int FORM, typename acc_t>
  static TF_HD void charge_vjp(const acc_t* z, acc_t x, const acc_t* p, acc_t gh, acc_t* gz_prev,
                               acc_t& gx, acc_t* gp) {
    const acc_t v = z[0];
    gz_prev[0] += gh * (acc_t(1) + p[A0] * ((v - p[V_C]) + (v - p[V_REST])) / p[TAU]);
    gz_prev[1] -= gh / p[TAU];
    gx = gh / p[TAU];
  }
};

// The kernels' parameters, named once: one list per kernel, F(type, name) per parameter in order.
// A kernel's signature is its list (TF_SIGNATURE), so its body uses these names;
// sj_temporal_fusion/kernel_params.py lists the same parameters (acc_t standing for
// acc_type<scalar_t>, __restrict__ left out) and both launchers pack them by name from it.
// tests/test_kernel_params.py checks the lists against that table and compiles the signatures it
// implies with g++ and NVRTC, so the two cannot drift apart unnoticed.
//
// Separate __restrict__ parameters, not one struct: nvcc honours __restrict__ on a kernel's own
// pointer parameters (read-only inputs then load through the non-coherent path, LDG.E.CONSTANT)
// but not on a struct's members nor, in every variant, on locals copied from them (bf16 x loads
// and the time-sharding backward lost LDG.E.CONSTANT that way).
//
// Layouts: x and sequences (T, N) in scalar_t; states (N,) and checkpoints (ceil(T / chunk), S, N)
// in the state precision acc_type<scalar_t>. "S = 2": read only by models with two state variables
// (null otherwise); "FOLD": only by the BatchNorm-folded variants (null otherwise).
// One F(...) per line: the test reads them so.
#pragma once
#include "common/fp.cuh"

template <typename scalar_t> using acc_type = typename acc_of<scalar_t>::type;

#define TF_FORWARD_PARAMS(F)                                                                        \
  F(const scalar_t* __restrict__, x)                                                                \
  F(const acc_type<scalar_t>* __restrict__, v_init)                                                 \
  F(const acc_type<scalar_t>* __restrict__, aux_init)        /* S = 2 */                            \
  F(scalar_t* __restrict__, spike)                                                                  \
  F(acc_type<scalar_t>* __restrict__, v_last)                                                       \
  F(acc_type<scalar_t>* __restrict__, aux_last)              /* S = 2 */                            \
  F(scalar_t* __restrict__, v_seq)                           /* nullable: not stored */             \
  F(acc_type<scalar_t>* __restrict__, checkpoints)           /* nullable: inference */              \
  F(const acc_type<scalar_t>* __restrict__, params)          /* (NP,) */                            \
  F(int, T)                                                                                         \
  F(long long, N)                                                                                   \
  F(const acc_type<scalar_t>* __restrict__, bn_scale)        /* FOLD, (channels,) */                \
  F(const acc_type<scalar_t>* __restrict__, bn_shift)        /* FOLD, (channels,) */                \
  F(long long, bn_inner)                                     /* FOLD: channel = i / inner % channels */ \
  F(int, bn_channels)                                        /* FOLD */

#define TF_BACKWARD_PARAMS(F)                                                                       \
  F(const scalar_t* __restrict__, grad_spike)                                                       \
  F(const scalar_t* __restrict__, grad_v_seq)                /* nullable */                         \
  F(const acc_type<scalar_t>* __restrict__, grad_v_last)     /* nullable */                         \
  F(const acc_type<scalar_t>* __restrict__, grad_aux_last)   /* nullable, S = 2 */                  \
  F(const scalar_t* __restrict__, x)                                                                \
  F(const acc_type<scalar_t>* __restrict__, checkpoints)                                            \
  F(const acc_type<scalar_t>* __restrict__, params)          /* (NP,) */                            \
  F(scalar_t* __restrict__, grad_x)                          /* nullable: time sharding's 1st pass */ \
  F(acc_type<scalar_t>* __restrict__, grad_v_init)                                                  \
  F(acc_type<scalar_t>* __restrict__, grad_aux_init)         /* S = 2 */                            \
  F(acc_type<scalar_t>* __restrict__, grad_params)           /* (rows, N) if PGRAD */               \
  F(int, grad_params_mask)                                   /* entries of params to write */       \
  F(acc_type<scalar_t>* __restrict__, a_prod)                /* nullable, S = 1: carry factors */   \
  F(acc_type<scalar_t>, sg_a)                                /* the surrogate's parameters */       \
  F(acc_type<scalar_t>, sg_b)                                                                       \
  F(int, T)                                                                                         \
  F(long long, N)                                                                                   \
  F(long long, grad_spike_step)                              /* N; 0: one (N,) row for every step */ \
  F(const acc_type<scalar_t>* __restrict__, bn_scale)        /* FOLD */                             \
  F(const acc_type<scalar_t>* __restrict__, bn_shift)        /* FOLD */                             \
  F(long long, bn_inner)                                     /* FOLD */                             \
  F(int, bn_channels)                                        /* FOLD */

#define TF_FIXUP_PARAMS(F)                                                                          \
  F(const scalar_t* __restrict__, x)                                                                \
  F(const acc_type<scalar_t>* __restrict__, v_true_init)                                            \
  F(acc_type<scalar_t>* __restrict__, checkpoints)           /* in: speculative; out: true */       \
  F(scalar_t* __restrict__, spike)                                                                  \
  F(scalar_t* __restrict__, v_seq)                           /* nullable */                         \
  F(acc_type<scalar_t>* __restrict__, v_last)                                                       \
  F(int* __restrict__, fixup_len)                            /* (N,) */                             \
  F(const acc_type<scalar_t>* __restrict__, params)          /* (NP,) */                            \
  F(int, T)                                                                                         \
  F(long long, N)

// A list as a parameter list: ", type name" per entry, then the leading comma dropped.
#define TF_COMMA_PARAM(type, name) , type name
#define TF_DROP_FIRST_(empty, ...) __VA_ARGS__
#define TF_DROP_FIRST(...) TF_DROP_FIRST_(__VA_ARGS__)
#define TF_SIGNATURE(LIST) TF_DROP_FIRST(LIST(TF_COMMA_PARAM))

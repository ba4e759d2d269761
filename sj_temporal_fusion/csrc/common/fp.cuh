// Floating-point plumbing shared by every kernel: bit casts, IEEE fp16 / bf16 conversions (round to
// nearest even in both builds), the storage types and the math functions in the state precision.
// Framework-free and __host__ __device__: NVRTC compiles it for the GPU, g++ for the host.
#pragma once
#ifndef __CUDACC__
#include "common/host_shim.h"  // the host build: CUDA qualifiers as plain C++
#endif

#ifndef TF_HD
#define TF_HD __host__ __device__ __forceinline__
#endif

// ---- bit casts and IEEE fp16 conversions (round to nearest even in both builds) ----
#ifdef __CUDACC__
TF_HD float tf_bits_to_float(unsigned int u) { return __uint_as_float(u); }
TF_HD unsigned int tf_float_to_bits(float f) { return __float_as_uint(f); }
TF_HD float tf_half_to_float(unsigned short h) {
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
  return f;
}
TF_HD unsigned short tf_float_to_half(float f) {
  unsigned short h;
  asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
  return h;
}
#else
TF_HD float tf_bits_to_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
TF_HD unsigned int tf_float_to_bits(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
// IEEE fp16 <-> fp32 in integer and fp32 arithmetic with selects only (the FP16 library's
// fp16_ieee_to/from_fp32_value, which c10::Half uses on the CPU): round to nearest even, exact
// for every non-NaN input (checked against _Float16 on all 65,536 halves and 2e8 floats); NaN
// becomes the quiet NaN 0x7E00. g++ 12 does not vectorise _Float16 conversions without
// AVX512-FP16, so with _Float16 the fp16 lane loops ran scalar (fp16 forward 5x slower than fp32).
TF_HD float tf_half_to_float(unsigned short h) {
  const unsigned int w = (unsigned int)h << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = tf_bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = tf_bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return tf_bits_to_float(sign | (two_w < (1u << 27) ? tf_float_to_bits(denormalized)
                                                      : tf_float_to_bits(normalized)));
}
TF_HD unsigned short tf_float_to_half(float f) {
  float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;  // needs -ffp-contract=off, no FTZ
  const unsigned int w = tf_float_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  unsigned int bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = tf_bits_to_float((bias >> 1) + 0x07800000u) + base;
  const unsigned int bits = tf_float_to_bits(base);
  const unsigned int nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return (unsigned short)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
#endif

// ---- storage types: fp16/bf16 are stored as raw bits, state is fp32 (fp64 for fp64) ----
struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

template <typename scalar_t> struct acc_of { typedef float type; };
template <> struct acc_of<double> { typedef double type; };

TF_HD float to_acc(float v) { return v; }
TF_HD double to_acc(double v) { return v; }
TF_HD float to_acc(bf16_t v) { return tf_bits_to_float((unsigned int)v.bits << 16); }
TF_HD float to_acc(f16_t v) { return tf_half_to_float(v.bits); }

template <typename scalar_t> TF_HD scalar_t from_acc(typename acc_of<scalar_t>::type v);
template <> TF_HD float from_acc<float>(float v) { return v; }
template <> TF_HD double from_acc<double>(double v) { return v; }
template <> TF_HD f16_t from_acc<f16_t>(float v) { f16_t r; r.bits = tf_float_to_half(v); return r; }
template <> TF_HD bf16_t from_acc<bf16_t>(float v) {
  // Round to nearest even, NaN kept quiet: the same rule as c10::BFloat16.
  unsigned int u = tf_float_to_bits(v);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = (unsigned short)((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = (unsigned short)(u >> 16);
  return r;
}

// ---- math in the state precision ----
TF_HD float tf_exp(float x) { return expf(x); }
TF_HD double tf_exp(double x) { return exp(x); }
// cos(pi x): CUDA's cospi needs no large-argument reduction (cosf's slow path uses local memory).
#ifdef __CUDACC__
TF_HD float tf_cospi(float x) { return cospif(x); }
TF_HD double tf_cospi(double x) { return cospi(x); }
#else
TF_HD float tf_cospi(float x) { return cosf(3.14159265358979323846f * x); }
TF_HD double tf_cospi(double x) { return cos(3.14159265358979323846 * x); }
#endif
TF_HD float tf_pow(float x, float y) { return powf(x, y); }
TF_HD double tf_pow(double x, double y) { return pow(x, y); }
TF_HD float tf_abs(float x) { return fabsf(x); }
TF_HD double tf_abs(double x) { return fabs(x); }


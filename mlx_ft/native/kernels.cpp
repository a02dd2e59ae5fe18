// Fused float32 CPU kernels for the MLX backend (posttrain.mlx_ft.native).
//
// MLX's CPU backend runs each elementwise op as its own pass over memory and computes exp with
// a scalar polynomial (~14 ns per element). These primitives do the hot elementwise chains of
// a training step in one pass each, with an exp the compiler vectorises:
//
//   exp(x)                        e^x
//   swiglu(g, u)                  g u sigmoid(g)
//   swiglu_grad(c, g, u)          (c u s (1 + g (1 - s)), c g s),  s = sigmoid(g)
//   softmax(x, bias)              softmax over the last axis of x + bias (bias [L, S]; row r
//                                 of x [..., R * L, S] adds bias row r mod L)
//   softmax_grad(p, dp)           p (dp - sum(p dp)) over the last axis
//   exp_shift_sum(z)              (e^(z - m), m, sum e^(z - m)), m = max over the last axis
//   rope(x, cos, sin, traditional) rotary embedding of x [N, H, D] at per-token angles
//                                 (cos, sin [N, D/2]): pairs (x_i, x_{i+D/2}) (or (x_2i,
//                                 x_2i+1) when traditional) -> (a cos - b sin, b cos + a sin);
//                                 its gradient is the same rotation with -sin
//   rms_norm(x, w, eps)           x r w, r = 1 / sqrt(mean(x^2) + eps) over the last axis
//   rms_norm_grad(x, w, g, eps)   (r (w g - x r^2 mean(w g x)), sum over rows of g x r)
//
// Only CPU evaluation; gradients are given in Python (mlx_ft.fastmath) with mx.custom_function.
// Inputs are made float32 and row-contiguous when the op is built.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/tuple.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace mlx::core;

namespace {

constexpr int LANES = 16;

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2), e^r by a degree-7
// polynomial (Cephes expf coefficients), 2^n as two exact power-of-two factors so that
// results down to the subnormal range round correctly. Branch-free so the loops vectorise.
static inline float exp1(float x) {
  const float hi = 88.72283935546875f, lo = -103.97208404541015625f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t ni = static_cast<int32_t>(n);
  int32_t n1 = ni >> 1;
  int32_t b1 = (n1 + 127) << 23, b2 = (ni - n1 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, 4);
  std::memcpy(&s2, &b2, 4);
  float y = (p * s1) * s2;
  y = x < lo ? 0.0f : y;
  y = x > hi ? INFINITY : y;
  return x != x ? x : y;
}

void exp_n(const float* __restrict x, float* __restrict y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] = exp1(x[i]);
}

float row_max(const float* __restrict x, size_t n) {
  float acc[LANES];
  for (int j = 0; j < LANES; ++j) acc[j] = -INFINITY;
  size_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) acc[j] = x[i + j] > acc[j] ? x[i + j] : acc[j];
  float m = -INFINITY;
  for (int j = 0; j < LANES; ++j) m = acc[j] > m ? acc[j] : m;
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum of x, in double lanes (the rows of a head chunk are 49k long)
double row_sum(const float* __restrict x, size_t n) {
  double acc[LANES] = {0};
  size_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) acc[j] += x[i + j];
  double s = 0;
  for (int j = 0; j < LANES; ++j) s += acc[j];
  for (; i < n; ++i) s += x[i];
  return s;
}

double row_dot(const float* __restrict a, const float* __restrict b, size_t n) {
  double acc[LANES] = {0};
  size_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) acc[j] += double(a[i + j]) * b[i + j];
  double s = 0;
  for (int j = 0; j < LANES; ++j) s += acc[j];
  for (; i < n; ++i) s += double(a[i]) * b[i];
  return s;
}

// y = e^(x + bias - m) for one row (bias null: x alone), m = the row max, 0 for a fully masked
// row (all zeros then); returns the row sum and stores m in *m_out when given.
double shifted_exp_row(const float* x, const float* bias, float* y, size_t n,
                       float* m_out = nullptr) {
  const float* src = x;
  if (bias) {
    for (size_t i = 0; i < n; ++i) y[i] = x[i] + bias[i];
    src = y;  // exponentiated in place below
  }
  float m = row_max(src, n);
  if (m == -INFINITY) m = 0.0f;
  for (size_t i = 0; i < n; ++i) y[i] = exp1(src[i] - m);
  if (m_out) *m_out = m;
  return row_sum(y, n);
}

using Kernel = std::function<void(std::vector<array>&, std::vector<array>&)>;

// A primitive whose CPU evaluation allocates its outputs and runs `kernel` on the stream.
class Fused : public Primitive {
 public:
  Fused(Stream s, const char* name, Kernel kernel)
      : Primitive(s), name_(name), kernel_(std::move(kernel)) {}
  void eval_cpu(const std::vector<array>& inputs, std::vector<array>& outputs) override {
    for (auto& out : outputs) out.set_data(allocator::malloc(out.nbytes()));
    auto& enc = cpu::get_command_encoder(stream());
    std::vector<array> ins, outs;
    for (auto& a : inputs) {
      enc.set_input_array(a);
      ins.push_back(array::unsafe_weak_copy(a));
    }
    for (auto& a : outputs) {
      enc.set_output_array(a);
      outs.push_back(array::unsafe_weak_copy(a));
    }
    enc.dispatch([ins = std::move(ins), outs = std::move(outs), k = kernel_]() mutable {
      k(ins, outs);
    });
  }
  void eval_gpu(const std::vector<array>&, std::vector<array>&) override {
    throw std::runtime_error(std::string("[") + name_ + "] has no GPU implementation");
  }
  const char* name() const override { return name_; }

 private:
  const char* name_;
  Kernel kernel_;
};

Stream cpu_stream() {
  return default_stream(Device::cpu);
}

array prepared(const array& a, Stream s) {
  return contiguous(astype(a, float32, s), false, s);
}

std::vector<array> fused(const char* name, Kernel kernel, std::vector<array> inputs,
                         std::vector<Shape> shapes) {
  auto s = cpu_stream();
  for (auto& a : inputs) a = prepared(a, s);
  std::vector<Dtype> dtypes(shapes.size(), float32);
  return array::make_arrays(std::move(shapes), dtypes,
                            std::make_shared<Fused>(s, name, std::move(kernel)), inputs);
}

void need_same_shape(const array& a, const array& b, const char* name) {
  if (a.shape() != b.shape())
    throw std::invalid_argument(std::string("[") + name + "] inputs must have the same shape");
}

size_t last_dim(const array& a, const char* name) {
  if (a.ndim() == 0 || a.shape().back() == 0)
    throw std::invalid_argument(std::string("[") + name + "] needs a non-empty last axis");
  return a.shape().back();
}

array fast_exp(const array& x) {
  return fused("posttrain.exp",
               [](auto& in, auto& out) {
                 exp_n(in[0].template data<float>(), out[0].template data<float>(),
                       out[0].size());
               },
               {x}, {x.shape()})[0];
}

array swiglu_fwd(const array& g, const array& u) {
  need_same_shape(g, u, "posttrain.swiglu");
  return fused("posttrain.swiglu",
               [](auto& in, auto& out) {
                 const float* __restrict gp = in[0].template data<float>();
                 const float* __restrict up = in[1].template data<float>();
                 float* __restrict y = out[0].template data<float>();
                 size_t n = out[0].size();
                 for (size_t i = 0; i < n; ++i) y[i] = gp[i] * up[i] / (1.0f + exp1(-gp[i]));
               },
               {g, u}, {g.shape()})[0];
}

std::tuple<array, array> swiglu_bwd(const array& c, const array& g, const array& u) {
  need_same_shape(g, u, "posttrain.swiglu_grad");
  need_same_shape(c, g, "posttrain.swiglu_grad");
  auto outs = fused("posttrain.swiglu_grad",
                    [](auto& in, auto& out) {
                      const float* __restrict cp = in[0].template data<float>();
                      const float* __restrict gp = in[1].template data<float>();
                      const float* __restrict up = in[2].template data<float>();
                      float* __restrict dg = out[0].template data<float>();
                      float* __restrict du = out[1].template data<float>();
                      size_t n = out[0].size();
                      for (size_t i = 0; i < n; ++i) {
                        float s = 1.0f / (1.0f + exp1(-gp[i]));
                        float cs = cp[i] * s;
                        dg[i] = cs * up[i] * (1.0f + gp[i] * (1.0f - s));
                        du[i] = cs * gp[i];
                      }
                    },
                    {c, g, u}, {g.shape(), g.shape()});
  return {outs[0], outs[1]};
}

array softmax_bias(const array& x, const std::optional<array>& bias) {
  size_t n = last_dim(x, "posttrain.softmax");
  size_t rows_per_bias = 0;
  std::vector<array> inputs = {x};
  if (bias) {
    auto& b = *bias;
    if (b.ndim() != 2 || x.ndim() < 2 || b.shape(0) == 0 || x.shape(-2) % b.shape(0) != 0 ||
        b.shape(1) != x.shape(-1))
      throw std::invalid_argument(
          "[posttrain.softmax] bias must be [L, S] for x [..., R * L, S] (row r: bias row r % L)");
    rows_per_bias = b.shape(0);
    inputs.push_back(b);
  }
  return fused("posttrain.softmax",
               [n, rows_per_bias](auto& in, auto& out) {
                 const float* x = in[0].template data<float>();
                 const float* b = in.size() > 1 ? in[1].template data<float>() : nullptr;
                 float* y = out[0].template data<float>();
                 size_t rows = out[0].size() / n;
                 for (size_t r = 0; r < rows; ++r) {
                   const float* br = b ? b + (r % rows_per_bias) * n : nullptr;
                   double s = shifted_exp_row(x + r * n, br, y + r * n, n);
                   float inv = s > 0 ? float(1.0 / s) : 0.0f;
                   float* yr = y + r * n;
                   for (size_t i = 0; i < n; ++i) yr[i] *= inv;
                 }
               },
               inputs, {x.shape()})[0];
}

array softmax_bwd(const array& p, const array& dp) {
  need_same_shape(p, dp, "posttrain.softmax_grad");
  size_t n = last_dim(p, "posttrain.softmax_grad");
  return fused("posttrain.softmax_grad",
               [n](auto& in, auto& out) {
                 const float* p = in[0].template data<float>();
                 const float* dp = in[1].template data<float>();
                 float* y = out[0].template data<float>();
                 size_t rows = out[0].size() / n;
                 for (size_t r = 0; r < rows; ++r) {
                   const float* __restrict pr = p + r * n;
                   const float* __restrict dr = dp + r * n;
                   float* __restrict yr = y + r * n;
                   float d = float(row_dot(pr, dr, n));
                   for (size_t i = 0; i < n; ++i) yr[i] = pr[i] * (dr[i] - d);
                 }
               },
               {p, dp}, {p.shape()})[0];
}

std::tuple<array, array, array> exp_shift_sum(const array& z) {
  size_t n = last_dim(z, "posttrain.exp_shift_sum");
  Shape rows_shape(z.shape().begin(), z.shape().end() - 1);
  auto outs = fused("posttrain.exp_shift_sum",
                    [n](auto& in, auto& out) {
                      const float* z = in[0].template data<float>();
                      float* e = out[0].template data<float>();
                      float* m = out[1].template data<float>();
                      float* s = out[2].template data<float>();
                      size_t rows = out[0].size() / n;
                      for (size_t r = 0; r < rows; ++r)
                        s[r] = float(shifted_exp_row(z + r * n, nullptr, e + r * n, n, m + r));
                    },
                    {z}, {z.shape(), rows_shape, rows_shape});
  return {outs[0], outs[1], outs[2]};
}

array rope_apply(const array& x, const array& cos, const array& sin, bool traditional) {
  if (x.ndim() != 3 || cos.ndim() != 2 || sin.shape() != cos.shape() ||
      cos.shape(0) != x.shape(0) || 2 * cos.shape(1) != x.shape(2))
    throw std::invalid_argument(
        "[posttrain.rope] needs x [N, H, D] and cos, sin [N, D/2]");
  size_t heads = x.shape(1), half = cos.shape(1);
  return fused("posttrain.rope",
               [heads, half, traditional](auto& in, auto& out) {
                 const float* x = in[0].template data<float>();
                 const float* c = in[1].template data<float>();
                 const float* s = in[2].template data<float>();
                 float* y = out[0].template data<float>();
                 size_t tokens = in[1].shape(0), d = 2 * half;
                 for (size_t t = 0; t < tokens; ++t) {
                   const float* __restrict ct = c + t * half;
                   const float* __restrict st = s + t * half;
                   for (size_t h = 0; h < heads; ++h) {
                     const float* __restrict xr = x + (t * heads + h) * d;
                     float* __restrict yr = y + (t * heads + h) * d;
                     if (traditional) {
                       for (size_t i = 0; i < half; ++i) {
                         float a = xr[2 * i], b = xr[2 * i + 1];
                         yr[2 * i] = a * ct[i] - b * st[i];
                         yr[2 * i + 1] = b * ct[i] + a * st[i];
                       }
                     } else {
                       for (size_t i = 0; i < half; ++i) {
                         float a = xr[i], b = xr[i + half];
                         yr[i] = a * ct[i] - b * st[i];
                         yr[i + half] = b * ct[i] + a * st[i];
                       }
                     }
                   }
                 }
               },
               {x, cos, sin}, {x.shape()})[0];
}

void need_norm_weight(const array& x, const array& w, const char* name) {
  last_dim(x, name);
  if (w.ndim() != 1 || w.shape(0) != x.shape(-1))
    throw std::invalid_argument(std::string("[") + name +
                                "] weight must be [H] for x [..., H]");
}

array rms_norm_fwd(const array& x, const array& w, float eps) {
  need_norm_weight(x, w, "posttrain.rms_norm");
  size_t n = x.shape(-1);
  return fused("posttrain.rms_norm",
               [n, eps](auto& in, auto& out) {
                 const float* x = in[0].template data<float>();
                 const float* __restrict w = in[1].template data<float>();
                 float* y = out[0].template data<float>();
                 size_t rows = out[0].size() / n;
                 for (size_t r = 0; r < rows; ++r) {
                   const float* __restrict xr = x + r * n;
                   float* __restrict yr = y + r * n;
                   float rs = float(1.0 / std::sqrt(row_dot(xr, xr, n) / n + eps));
                   for (size_t i = 0; i < n; ++i) yr[i] = xr[i] * rs * w[i];
                 }
               },
               {x, w}, {x.shape()})[0];
}

std::tuple<array, array> rms_norm_bwd(const array& x, const array& w, const array& g, float eps) {
  need_norm_weight(x, w, "posttrain.rms_norm_grad");
  need_same_shape(x, g, "posttrain.rms_norm_grad");
  size_t n = x.shape(-1);
  auto outs = fused(
      "posttrain.rms_norm_grad",
      [n, eps](auto& in, auto& out) {
        const float* x = in[0].template data<float>();
        const float* __restrict w = in[1].template data<float>();
        const float* g = in[2].template data<float>();
        float* dx = out[0].template data<float>();
        float* __restrict dw = out[1].template data<float>();
        std::vector<double> acc(n, 0.0);
        std::vector<float> wg(n);
        size_t rows = out[0].size() / n;
        for (size_t r = 0; r < rows; ++r) {
          const float* __restrict xr = x + r * n;
          const float* __restrict gr = g + r * n;
          float* __restrict dr = dx + r * n;
          float rs = float(1.0 / std::sqrt(row_dot(xr, xr, n) / n + eps));
          for (size_t i = 0; i < n; ++i) wg[i] = w[i] * gr[i];
          float k = float(row_dot(wg.data(), xr, n) / n) * rs * rs;
          double* __restrict a = acc.data();
          for (size_t i = 0; i < n; ++i) {
            dr[i] = rs * (wg[i] - xr[i] * k);
            a[i] += double(gr[i] * xr[i] * rs);
          }
        }
        for (size_t i = 0; i < n; ++i) dw[i] = float(acc[i]);
      },
      {x, w, g}, {x.shape(), w.shape()});
  return {outs[0], outs[1]};
}

}  // namespace

NB_MODULE(_kernels, m) {
  m.def("exp", &fast_exp, nb::arg("x"));
  m.def("swiglu", &swiglu_fwd, nb::arg("gate"), nb::arg("up"));
  m.def("swiglu_grad", &swiglu_bwd, nb::arg("cotangent"), nb::arg("gate"), nb::arg("up"));
  m.def("softmax", &softmax_bias, nb::arg("x"), nb::arg("bias") = nb::none());
  m.def("softmax_grad", &softmax_bwd, nb::arg("p"), nb::arg("dp"));
  m.def("exp_shift_sum", &exp_shift_sum, nb::arg("z"));
  m.def("rope", &rope_apply, nb::arg("x"), nb::arg("cos"), nb::arg("sin"),
        nb::arg("traditional") = false);
  m.def("rms_norm", &rms_norm_fwd, nb::arg("x"), nb::arg("weight"), nb::arg("eps"));
  m.def("rms_norm_grad", &rms_norm_bwd, nb::arg("x"), nb::arg("weight"), nb::arg("cotangent"),
        nb::arg("eps"));
}

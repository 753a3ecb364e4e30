// Fused CPU kernel of the local subnetwork's cross-attention with an L2 score norm (docs/METHOD.md section 4).
//
// Same formula and inputs as model_local._L2Attention: raw scores (nC, Lc, nQ, Lq) in the context-major
// layout, context Gram matrices (nC, Lc, Lc), the queries' squared fragment norms and masks (nQ, Lq), the
// context mask (nC, Lc). One context item at a time: its (Lc, nQ * Lq) tile stays in cache through every
// step, where the tensor-op form makes a pass over the whole batch per step. Loops run along the flat
// nQ * Lq axis so that the compiler vectorises them (exp included, through glibc's vector math library).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#pragma omp declare simd notinbranch
extern "C" double exp(double);
#pragma omp declare simd notinbranch
extern "C" float expf(float);

namespace {

inline float vector_exp(float x) { return expf(x); }
inline double vector_exp(double x) { return exp(x); }

constexpr double kLeakySlope = 0.1;  // model_local.LEAKY_SLOPE
constexpr double kL2Eps = 1e-8;      // encoders.L2_EPS
constexpr double kCosineEps = 1e-8;  // model_local.COSINE_EPS

struct Shape {
  int64_t n_ctx, ctx_len, n_query, query_len, row;  // row = n_query * query_len, one context fragment's scores
  explicit Shape(const at::Tensor& raw)
      : n_ctx(raw.size(0)), ctx_len(raw.size(1)), n_query(raw.size(2)), query_len(raw.size(3)),
        row(raw.size(2) * raw.size(3)) {}
};

// The clipped norm's leaky ReLU; negative_slope is 1 for the plain L2 norm (branch-free, so loops vectorise).
template <typename T>
inline T leaky(T v, T negative_slope) { return v > 0 ? v : v * negative_slope; }

// Softmax weights w, G w, <Q_l, v_l> and |v_l|^2 of one context item against every query; scale[k, a] is
// lambda / |h_k + eps| of the released-code L2 norm over the query's positions l.
template <typename T>
void forward_item(const Shape& d, const T* raw, const T* gram, const T* query_mask, const T* ctx_mask, bool clipped,
                  T lambda, T* scores, T* scale_row, T* scale, T* w, T* gram_w, T* dot, T* att) {
  const int64_t row = d.row, len = d.query_len;
  const T eps = T(kL2Eps), negative_slope = clipped ? T(kLeakySlope) : T(1);
  T* inv_sum = att;  // the softmax denominators live in att's buffer until att is computed
  for (int64_t i = 0; i < row; ++i) inv_sum[i] = 0;
  for (int64_t k = 0; k < d.ctx_len; ++k) {
    const T* r = raw + k * row;
    T* s = scores + k * row;
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) s[i] = leaky(r[i], negative_slope);
    for (int64_t a = 0; a < d.n_query; ++a) {
      T sq = 0;
      for (int64_t l = a * len; l < (a + 1) * len; ++l) {
        const T shifted = s[l] + eps * query_mask[l];
        sq += shifted * shifted;
      }
      const T f = lambda / std::sqrt(sq);
      scale[k * d.n_query + a] = f;
      for (int64_t l = a * len; l < (a + 1) * len; ++l) scale_row[l] = f;
    }
    T* wk = w + k * row;
    const T present = ctx_mask[k];
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) {
      const T e = vector_exp(s[i] * scale_row[i]) * present;  // logits lie in [-lambda, lambda]: no max shift
      wk[i] = e;
      inv_sum[i] += e;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < row; ++i) {
    inv_sum[i] = T(1) / inv_sum[i];
    dot[i] = 0;
  }
  for (int64_t k = 0; k < d.ctx_len; ++k) {
    T* wk = w + k * row;
    const T* r = raw + k * row;
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) {
      wk[i] *= inv_sum[i];
      dot[i] += wk[i] * r[i];
    }
  }
  for (int64_t i = 0; i < row; ++i) att[i] = 0;
  for (int64_t k = 0; k < d.ctx_len; ++k) {
    T* gk = gram_w + k * row;
    for (int64_t i = 0; i < row; ++i) gk[i] = 0;
    for (int64_t j = 0; j < d.ctx_len; ++j) {
      const T g = gram[k * d.ctx_len + j];
      const T* wj = w + j * row;
#pragma omp simd
      for (int64_t i = 0; i < row; ++i) gk[i] += g * wj[i];
    }
    const T* wk = w + k * row;
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) att[i] += wk[i] * gk[i];
  }
}

// Mean over the query's true positions of cos(Q_l, v_l) = dot_l / max(|Q_l| |v_l|, eps).
template <typename T>
void mean_cosines(const Shape& d, const T* dot, const T* att, const T* query_sq, const T* query_mask, T* out) {
  const T eps_sq = T(kCosineEps * kCosineEps);
  for (int64_t a = 0; a < d.n_query; ++a) {
    T total = 0, count = 0;
    for (int64_t l = a * d.query_len; l < (a + 1) * d.query_len; ++l) {
      const T product = query_sq[l] * att[l];
      total += dot[l] / std::sqrt(product > eps_sq ? product : eps_sq) * query_mask[l];
      count += query_mask[l];
    }
    out[a] = total / count;
  }
}

template <typename T>
void forward_all(const at::Tensor& raw, const at::Tensor& gram, const at::Tensor& query_sq,
                 const at::Tensor& query_mask, const at::Tensor& ctx_mask, bool clipped, double lambda,
                 at::Tensor& out, at::Tensor& w, at::Tensor& gram_w, at::Tensor& scale, at::Tensor& dot,
                 at::Tensor& att) {
  const Shape d(raw);
  const int64_t tile = d.ctx_len * d.row;
  const bool save = w.numel() > 0;  // without a backward, w and G w live in per-thread scratch tiles
  at::parallel_for(0, d.n_ctx, 1, [&](int64_t first, int64_t end) {
    std::vector<T> scores(tile), scale_row(d.row), scratch(save ? 0 : 2 * tile);
    for (int64_t b = first; b < end; ++b) {
      T* w_item = save ? w.data_ptr<T>() + b * tile : scratch.data();
      T* gram_w_item = save ? gram_w.data_ptr<T>() + b * tile : scratch.data() + tile;
      forward_item<T>(d, raw.data_ptr<T>() + b * tile, gram.data_ptr<T>() + b * d.ctx_len * d.ctx_len,
                      query_mask.data_ptr<T>(), ctx_mask.data_ptr<T>() + b * d.ctx_len, clipped, T(lambda),
                      scores.data(), scale_row.data(), scale.data_ptr<T>() + b * d.ctx_len * d.n_query,
                      w_item, gram_w_item, dot.data_ptr<T>() + b * d.row, att.data_ptr<T>() + b * d.row);
      mean_cosines<T>(d, dot.data_ptr<T>() + b * d.row, att.data_ptr<T>() + b * d.row, query_sq.data_ptr<T>(),
                      query_mask.data_ptr<T>(), out.data_ptr<T>() + b * d.n_query);
    }
  });
}

// Gradients of one context item: raw (its tile), Gram (Lc x Lc) and the per-item part of the query norms'.
template <typename T>
void backward_item(const Shape& d, const T* grad_out, const T* raw, const T* query_sq, const T* query_mask,
                   const T* inv_count, const T* w, const T* gram_w, const T* scale, const T* dot, const T* att,
                   bool clipped, T lambda, T* grad_raw, T* grad_gram, T* grad_query_sq, T* grad_dot, T* grad_att,
                   T* weighted_sum, T* buffer) {
  const int64_t row = d.row, len = d.query_len, lc = d.ctx_len;
  const T eps = T(kL2Eps), eps_sq = T(kCosineEps * kCosineEps);
  const T negative_slope = clipped ? T(kLeakySlope) : T(1);
  for (int64_t a = 0; a < d.n_query; ++a) {
    const T g = grad_out[a] * inv_count[a];
    for (int64_t l = a * len; l < (a + 1) * len; ++l) {
      const T grad_cos = g * query_mask[l];
      const T product = query_sq[l] * att[l];
      const T norm_product = std::sqrt(product > eps_sq ? product : eps_sq);
      grad_dot[l] = grad_cos / norm_product;
      // d / d(|Q|^2 |v|^2), zero where the clamp holds
      const T grad_product = product > eps_sq ? -grad_cos * dot[l] / (norm_product * norm_product * norm_product) / 2
                                              : T(0);
      grad_query_sq[l] = grad_product * att[l];
      grad_att[l] = grad_product * query_sq[l];
      weighted_sum[l] = grad_dot[l] * dot[l] + 2 * grad_att[l] * att[l];
    }
  }
  // dL/dG = sum over l of grad_att_l w_l w_l^T, symmetric
  for (int64_t k = 0; k < lc; ++k) {
    const T* wk = w + k * row;
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) buffer[i] = wk[i] * grad_att[i];
    for (int64_t j = k; j < lc; ++j) {
      const T* wj = w + j * row;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < row; ++i) acc += buffer[i] * wj[i];
      grad_gram[k * lc + j] = acc;
      grad_gram[j * lc + k] = acc;
    }
  }
  for (int64_t k = 0; k < lc; ++k) {
    const T* wk = w + k * row;
    const T* gk = gram_w + k * row;
    const T* r = raw + k * row;
    T* grad_logits = buffer;
    // softmax backward: w_kl (dL/dw_kl - sum_k' w_k'l dL/dw_k'l), the sum rebuilt from dot_l and att_l
#pragma omp simd
    for (int64_t i = 0; i < row; ++i)
      grad_logits[i] = (2 * grad_att[i] * gk[i] + r[i] * grad_dot[i] - weighted_sum[i]) * wk[i];
    T* gr = grad_raw + k * row;
    for (int64_t a = 0; a < d.n_query; ++a) {
      const T f = scale[k * d.n_query + a];
      T along = 0;  // back through the norm over l: logits_kl = lambda h_kl / n_k
      for (int64_t l = a * len; l < (a + 1) * len; ++l) along += grad_logits[l] * leaky(r[l], negative_slope);
      along *= f * f / (lambda * lambda);
#pragma omp simd
      for (int64_t l = a * len; l < (a + 1) * len; ++l) {
        const T grad_score = (grad_logits[l] - (leaky(r[l], negative_slope) + eps * query_mask[l]) * along) * f;
        gr[l] = grad_score * (r[l] > 0 ? T(1) : negative_slope) + wk[l] * grad_dot[l];  // raw also enters dot_l directly
      }
    }
  }
}

template <typename T>
void backward_all(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& query_sq,
                  const at::Tensor& query_mask, const at::Tensor& w, const at::Tensor& gram_w,
                  const at::Tensor& scale, const at::Tensor& dot, const at::Tensor& att, bool clipped, double lambda,
                  at::Tensor& grad_raw, at::Tensor& grad_gram, at::Tensor& grad_query_sq) {
  const Shape d(raw);
  const int64_t tile = d.ctx_len * d.row;
  const at::Tensor inv_count = query_mask.sum(-1).reciprocal().contiguous();
  at::parallel_for(0, d.n_ctx, 1, [&](int64_t first, int64_t end) {
    std::vector<T> grad_dot(d.row), grad_att(d.row), weighted_sum(d.row), buffer(d.row);
    for (int64_t b = first; b < end; ++b) {
      backward_item<T>(d, grad_out.data_ptr<T>() + b * d.n_query, raw.data_ptr<T>() + b * tile,
                       query_sq.data_ptr<T>(), query_mask.data_ptr<T>(), inv_count.data_ptr<T>(),
                       w.data_ptr<T>() + b * tile, gram_w.data_ptr<T>() + b * tile,
                       scale.data_ptr<T>() + b * d.ctx_len * d.n_query, dot.data_ptr<T>() + b * d.row,
                       att.data_ptr<T>() + b * d.row, clipped, T(lambda), grad_raw.data_ptr<T>() + b * tile,
                       grad_gram.data_ptr<T>() + b * d.ctx_len * d.ctx_len, grad_query_sq.data_ptr<T>() + b * d.row,
                       grad_dot.data(), grad_att.data(), weighted_sum.data(), buffer.data());
    }
  });
}

void check_inputs(const at::Tensor& raw, const at::Tensor& gram, const at::Tensor& query_sq,
                  const at::Tensor& query_mask, const at::Tensor& ctx_mask) {
  TORCH_CHECK(raw.dim() == 4 && raw.is_contiguous() && raw.device().is_cpu(), "raw: contiguous (nC, Lc, nQ, Lq) on CPU");
  const auto dtype = raw.scalar_type();
  TORCH_CHECK(gram.is_contiguous() && gram.sizes() == at::IntArrayRef({raw.size(0), raw.size(1), raw.size(1)}) &&
              gram.scalar_type() == dtype, "gram: contiguous (nC, Lc, Lc) of raw's dtype");
  for (const auto* t : {&query_sq, &query_mask})
    TORCH_CHECK(t->is_contiguous() && t->sizes() == at::IntArrayRef({raw.size(2), raw.size(3)}) &&
                t->scalar_type() == dtype, "query norms and mask: contiguous (nQ, Lq) of raw's dtype");
  TORCH_CHECK(ctx_mask.is_contiguous() && ctx_mask.sizes() == at::IntArrayRef({raw.size(0), raw.size(1)}) &&
              ctx_mask.scalar_type() == dtype, "context mask: contiguous (nC, Lc) of raw's dtype");
}

}  // namespace

// (out (nC, nQ), and what backward needs: w, G w (as raw; empty unless save), scale (nC, Lc, nQ), dot and
// att (nC, nQ, Lq)).
std::vector<at::Tensor> forward(const at::Tensor& raw, const at::Tensor& gram, const at::Tensor& query_sq,
                                const at::Tensor& query_mask, const at::Tensor& ctx_mask, bool clipped,
                                double lambda, bool save) {
  check_inputs(raw, gram, query_sq, query_mask, ctx_mask);
  auto out = at::empty({raw.size(0), raw.size(2)}, raw.options());
  auto w = save ? at::empty_like(raw) : at::empty({0}, raw.options()), gram_w = at::empty_like(w);
  auto scale = at::empty({raw.size(0), raw.size(1), raw.size(2)}, raw.options());
  auto dot = at::empty({raw.size(0), raw.size(2), raw.size(3)}, raw.options()), att = at::empty_like(dot);
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_forward", [&] {
    forward_all<scalar_t>(raw, gram, query_sq, query_mask, ctx_mask, clipped, lambda, out, w, gram_w, scale, dot, att);
  });
  return {out, w, gram_w, scale, dot, att};
}

// (dL/draw, dL/dgram, dL/dquery_sq) from dL/dout and forward's saved tensors.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& query_sq,
                                 const at::Tensor& query_mask, const at::Tensor& w, const at::Tensor& gram_w,
                                 const at::Tensor& scale, const at::Tensor& dot, const at::Tensor& att, bool clipped,
                                 double lambda) {
  const at::Tensor grad = grad_out.contiguous();
  auto grad_raw = at::empty_like(raw);
  auto grad_gram = at::empty({raw.size(0), raw.size(1), raw.size(1)}, raw.options());
  auto grad_query_sq = at::empty({raw.size(0), raw.size(2), raw.size(3)}, raw.options());
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_backward", [&] {
    backward_all<scalar_t>(grad, raw, query_sq, query_mask, w, gram_w, scale, dot, att, clipped, lambda, grad_raw,
                           grad_gram, grad_query_sq);
  });
  return {grad_raw, grad_gram, grad_query_sq.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused L2-norm cross-attention, all (context, query) pairs");
  m.def("backward", &backward, "its gradients with respect to raw, gram and the query norms");
}

// Fused CPU kernel of the local subnetwork's cross-attention with an L2 score norm (docs/METHOD.md section 4).
//
// Same formula and inputs as model_local._L2Attention: raw scores (nC, Lc, nQ, Lq) in the context-major
// layout, context Gram matrices (nC, Lc, Lc), the queries' squared fragment norms and masks (nQ, Lq), the
// context mask (nC, Lc). One context item at a time: its (Lc, nQ * Lq) tile stays in cache through every
// step, where the tensor-op form makes a pass over the whole batch per step. Loops run along the flat
// nQ * Lq axis so that the compiler vectorises them (exp included, through glibc's vector math library).
// paired_forward / paired_backward run both directions of one tile of paired scores (model_local's
// _FusedPairedAttention): the second direction gathers each of its tiles from the first's layout.
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
  Shape(int64_t n_ctx, int64_t ctx_len, int64_t n_query, int64_t query_len)
      : n_ctx(n_ctx), ctx_len(ctx_len), n_query(n_query), query_len(query_len), row(n_query * query_len) {}
  explicit Shape(const at::Tensor& raw) : Shape(raw.size(0), raw.size(1), raw.size(2), raw.size(3)) {}
  // The other direction of the same scores: the queries become the context items.
  Shape transposed() const { return Shape(n_query, query_len, n_ctx, ctx_len); }
};

// Context item c's tile of the other direction, tile[k, (b, l)] = raw[b, l, c, k], gathered from raw
// (n_ctx, ctx_len, n_query, query_len) of shape d; and the sum of such a tile's gradient back into raw.
template <typename T>
void gather_transposed(const Shape& d, const T* raw, int64_t c, T* tile) {
  const int64_t columns = d.n_ctx * d.ctx_len;
  for (int64_t bl = 0; bl < columns; ++bl) {
    const T* from = raw + bl * d.row + c * d.query_len;
    for (int64_t k = 0; k < d.query_len; ++k) tile[k * columns + bl] = from[k];
  }
}

template <typename T>
void add_transposed(const Shape& d, const T* tile, int64_t c, T* raw) {
  const int64_t columns = d.n_ctx * d.ctx_len;
  for (int64_t bl = 0; bl < columns; ++bl) {
    T* to = raw + bl * d.row + c * d.query_len;
    for (int64_t k = 0; k < d.query_len; ++k) to[k] += tile[k * columns + bl];
  }
}

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

// One direction of the attention: its raw scores, query norms and mask, and the state forward writes for the
// backward (w, G w: (n_ctx, ctx_len, n_query, query_len), null without a backward; scale (n_ctx, ctx_len,
// n_query); dot and att (n_ctx, n_query, query_len)).
template <typename T>
struct Direction {
  Shape d;
  bool transposed;  // raw is stored in the other direction's layout (d.transposed()): its tiles are gathered
  const T *raw, *query_sq, *query_mask;
  T *w, *gram_w, *scale, *dot, *att;
};

std::vector<at::Tensor> new_state(const Shape& d, bool save, const at::TensorOptions& options) {
  const std::vector<int64_t> tile = save ? std::vector<int64_t>{d.n_ctx, d.ctx_len, d.n_query, d.query_len}
                                          : std::vector<int64_t>{0};
  return {at::empty(tile, options), at::empty(tile, options), at::empty({d.n_ctx, d.ctx_len, d.n_query}, options),
          at::empty({d.n_ctx, d.n_query, d.query_len}, options), at::empty({d.n_ctx, d.n_query, d.query_len}, options)};
}

template <typename T>
Direction<T> direction(const Shape& d, bool transposed, const at::Tensor& raw, const at::Tensor& query_sq,
                       const at::Tensor& query_mask, const std::vector<at::Tensor>& state) {
  const bool save = state[0].numel() > 0;
  return {d, transposed, raw.data_ptr<T>(), query_sq.data_ptr<T>(), query_mask.data_ptr<T>(),
          save ? state[0].data_ptr<T>() : nullptr, save ? state[1].data_ptr<T>() : nullptr, state[2].data_ptr<T>(),
          state[3].data_ptr<T>(), state[4].data_ptr<T>()};
}

// The forward of every context item of one direction, spread over torch's threads.
template <typename T>
void forward_all(const Direction<T>& x, const T* gram, const T* ctx_mask, bool clipped, double lambda, T* out) {
  const Shape& d = x.d;
  const int64_t tile = d.ctx_len * d.row;
  const bool save = x.w != nullptr;  // without a backward, w and G w live in per-thread scratch tiles
  at::parallel_for(0, d.n_ctx, 1, [&](int64_t first, int64_t end) {
    std::vector<T> scores(tile), scale_row(d.row), scratch(save ? 0 : 2 * tile), gathered(x.transposed ? tile : 0);
    for (int64_t b = first; b < end; ++b) {
      const T* raw_item = x.raw + b * tile;
      if (x.transposed) {
        gather_transposed(d.transposed(), x.raw, b, gathered.data());
        raw_item = gathered.data();
      }
      T* w_item = save ? x.w + b * tile : scratch.data();
      T* gram_w_item = save ? x.gram_w + b * tile : scratch.data() + tile;
      forward_item<T>(d, raw_item, gram + b * d.ctx_len * d.ctx_len, x.query_mask, ctx_mask + b * d.ctx_len,
                      clipped, T(lambda), scores.data(), scale_row.data(), x.scale + b * d.ctx_len * d.n_query,
                      w_item, gram_w_item, x.dot + b * d.row, x.att + b * d.row);
      mean_cosines<T>(d, x.dot + b * d.row, x.att + b * d.row, x.query_sq, x.query_mask, out + b * d.n_query);
    }
  });
}

// One thread's flat-axis work rows of backward_item.
template <typename T>
struct BackwardScratch {
  std::vector<T> grad_dot, grad_att, weighted_sum, buffer, products, along_row, scale_row;
  explicit BackwardScratch(int64_t row)
      : grad_dot(row), grad_att(row), weighted_sum(row), buffer(row), products(row), along_row(row), scale_row(row) {}
};

// Gradients of one context item: raw (its tile), Gram (Lc x Lc) and the per-item part of the query norms'.
template <typename T>
void backward_item(const Shape& d, const T* grad_out, const T* raw, const T* query_sq, const T* query_mask,
                   const T* inv_count, const T* w, const T* gram_w, const T* scale, const T* dot, const T* att,
                   bool clipped, T lambda, T* grad_raw, T* grad_gram, T* grad_query_sq, BackwardScratch<T>& scratch) {
  const int64_t row = d.row, len = d.query_len, lc = d.ctx_len;
  T *grad_dot = scratch.grad_dot.data(), *grad_att = scratch.grad_att.data();
  T *weighted_sum = scratch.weighted_sum.data(), *buffer = scratch.buffer.data(), *products = scratch.products.data();
  T *along_row = scratch.along_row.data(), *scale_row = scratch.scale_row.data();
  const T eps = T(kL2Eps), eps_sq = T(kCosineEps * kCosineEps);
  const T negative_slope = clipped ? T(kLeakySlope) : T(1);
  for (int64_t a = 0; a < d.n_query; ++a) {
    const T g = grad_out[a] * inv_count[a];
    for (int64_t l = a * len; l < (a + 1) * len; ++l) grad_dot[l] = g * query_mask[l];  // dL/dcos_l
  }
#pragma omp simd
  for (int64_t l = 0; l < row; ++l) {
    const T grad_cos = grad_dot[l];
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
  // dL/dG = sum over l of grad_att_l w_l w_l^T, symmetric; four j at a time share the loads of buffer
  for (int64_t k = 0; k < lc; ++k) {
    const T* wk = w + k * row;
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) buffer[i] = wk[i] * grad_att[i];
    int64_t j = k;
    for (; j + 4 <= lc; j += 4) {
      const T *w0 = w + j * row, *w1 = w0 + row, *w2 = w1 + row, *w3 = w2 + row;
      T acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
#pragma omp simd reduction(+ : acc0, acc1, acc2, acc3)
      for (int64_t i = 0; i < row; ++i) {
        acc0 += buffer[i] * w0[i];
        acc1 += buffer[i] * w1[i];
        acc2 += buffer[i] * w2[i];
        acc3 += buffer[i] * w3[i];
      }
      const T accs[4] = {acc0, acc1, acc2, acc3};
      for (int64_t q = 0; q < 4; ++q) grad_gram[k * lc + j + q] = grad_gram[(j + q) * lc + k] = accs[q];
    }
    for (; j < lc; ++j) {
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
    // back through the norm over l (logits_kl = lambda h_kl / n_k): the products of each query's sum, the sums in
    // order, then one pass along the flat axis with each position's query factors
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) products[i] = grad_logits[i] * leaky(r[i], negative_slope);
    for (int64_t a = 0; a < d.n_query; ++a) {
      const T f = scale[k * d.n_query + a];
      T along = 0;
      for (int64_t l = a * len; l < (a + 1) * len; ++l) along += products[l];
      along *= f * f / (lambda * lambda);
      for (int64_t l = a * len; l < (a + 1) * len; ++l) {
        along_row[l] = along;
        scale_row[l] = f;
      }
    }
#pragma omp simd
    for (int64_t i = 0; i < row; ++i) {
      const T grad_score = (grad_logits[i] - (leaky(r[i], negative_slope) + eps * query_mask[i]) * along_row[i]) *
                           scale_row[i];
      gr[i] = grad_score * (r[i] > 0 ? T(1) : negative_slope) + wk[i] * grad_dot[i];  // raw also enters dot_l directly
    }
  }
}

// The backward of every context item of one direction: dL/draw is written into grad_raw (added to it for a
// transposed direction, whose tiles scatter back into raw's layout), dL/dgram per item, and the per-item parts
// of dL/dquery_sq (n_ctx, n_query, query_len).
template <typename T>
void backward_all(const Direction<T>& x, const T* grad_out, bool clipped, double lambda, T* grad_raw, T* grad_gram,
                  T* grad_query_sq) {
  const Shape& d = x.d;
  const int64_t tile = d.ctx_len * d.row;
  std::vector<T> inv_count(d.n_query);
  for (int64_t a = 0; a < d.n_query; ++a) {
    T count = 0;
    for (int64_t l = a * d.query_len; l < (a + 1) * d.query_len; ++l) count += x.query_mask[l];
    inv_count[a] = T(1) / count;
  }
  at::parallel_for(0, d.n_ctx, 1, [&](int64_t first, int64_t end) {
    BackwardScratch<T> scratch(d.row);
    std::vector<T> gathered(x.transposed ? tile : 0), grad_tile(x.transposed ? tile : 0);
    for (int64_t b = first; b < end; ++b) {
      const T* raw_item = x.raw + b * tile;
      T* grad_item = grad_raw + b * tile;
      if (x.transposed) {
        gather_transposed(d.transposed(), x.raw, b, gathered.data());
        raw_item = gathered.data();
        grad_item = grad_tile.data();
      }
      backward_item<T>(d, grad_out + b * d.n_query, raw_item, x.query_sq, x.query_mask, inv_count.data(),
                       x.w + b * tile, x.gram_w + b * tile, x.scale + b * d.ctx_len * d.n_query, x.dot + b * d.row,
                       x.att + b * d.row, clipped, T(lambda), grad_item, grad_gram + b * d.ctx_len * d.ctx_len,
                       grad_query_sq + b * d.row, scratch);
      if (x.transposed) add_transposed(d.transposed(), grad_tile.data(), b, grad_raw);
    }
  });
}

void check_raw(const at::Tensor& raw) {
  TORCH_CHECK(raw.dim() == 4 && raw.is_contiguous() && raw.device().is_cpu(), "raw: contiguous (nC, Lc, nQ, Lq) on CPU");
}

// The inputs of one direction of scores of shape d (raw checked by check_raw).
void check_direction(const Shape& d, at::ScalarType dtype, const at::Tensor& gram, const at::Tensor& query_sq,
                     const at::Tensor& query_mask, const at::Tensor& ctx_mask) {
  TORCH_CHECK(gram.is_contiguous() && gram.sizes() == at::IntArrayRef({d.n_ctx, d.ctx_len, d.ctx_len}) &&
              gram.scalar_type() == dtype, "gram: contiguous (nC, Lc, Lc) of raw's dtype");
  for (const auto* t : {&query_sq, &query_mask})
    TORCH_CHECK(t->is_contiguous() && t->sizes() == at::IntArrayRef({d.n_query, d.query_len}) &&
                t->scalar_type() == dtype, "query norms and mask: contiguous (nQ, Lq) of raw's dtype");
  TORCH_CHECK(ctx_mask.is_contiguous() && ctx_mask.sizes() == at::IntArrayRef({d.n_ctx, d.ctx_len}) &&
              ctx_mask.scalar_type() == dtype, "context mask: contiguous (nC, Lc) of raw's dtype");
}

}  // namespace

// (out (nC, nQ), and the state backward needs: w, G w (empty unless save), scale, dot, att).
std::vector<at::Tensor> forward(const at::Tensor& raw, const at::Tensor& gram, const at::Tensor& query_sq,
                                const at::Tensor& query_mask, const at::Tensor& ctx_mask, bool clipped,
                                double lambda, bool save) {
  check_raw(raw);
  const Shape d(raw);
  check_direction(d, raw.scalar_type(), gram, query_sq, query_mask, ctx_mask);
  auto out = at::empty({d.n_ctx, d.n_query}, raw.options());
  auto state = new_state(d, save, raw.options());
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_forward", [&] {
    forward_all<scalar_t>(direction<scalar_t>(d, false, raw, query_sq, query_mask, state), gram.data_ptr<scalar_t>(),
                          ctx_mask.data_ptr<scalar_t>(), clipped, lambda, out.data_ptr<scalar_t>());
  });
  state.insert(state.begin(), out);
  return state;
}

// (dL/draw, dL/dgram, dL/dquery_sq) from dL/dout and forward's state.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& query_sq,
                                 const at::Tensor& query_mask, const at::Tensor& w, const at::Tensor& gram_w,
                                 const at::Tensor& scale, const at::Tensor& dot, const at::Tensor& att, bool clipped,
                                 double lambda) {
  const at::Tensor grad = grad_out.contiguous();
  const Shape d(raw);
  auto grad_raw = at::empty_like(raw);
  auto grad_gram = at::empty({d.n_ctx, d.ctx_len, d.ctx_len}, raw.options());
  auto grad_query_sq = at::empty({d.n_ctx, d.n_query, d.query_len}, raw.options());
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_backward", [&] {
    backward_all<scalar_t>(direction<scalar_t>(d, false, raw, query_sq, query_mask, {w, gram_w, scale, dot, att}),
                           grad.data_ptr<scalar_t>(), clipped, lambda, grad_raw.data_ptr<scalar_t>(),
                           grad_gram.data_ptr<scalar_t>(), grad_query_sq.data_ptr<scalar_t>());
  });
  return {grad_raw, grad_gram, grad_query_sq.sum(0)};
}

// Both directions of paired scores raw (nR, Lr, nC, Lc) in one call: out (nR, nC) = att(Q = col c, C = row r)
// + att(Q = row r, C = col c), the second direction's tiles gathered from raw instead of a transposed copy;
// then the state of each direction (as forward's).
std::vector<at::Tensor> paired_forward(const at::Tensor& raw, const at::Tensor& row_gram, const at::Tensor& col_gram,
                                       const at::Tensor& row_sq, const at::Tensor& col_sq, const at::Tensor& row_mask,
                                       const at::Tensor& col_mask, bool clipped, double lambda, bool save) {
  check_raw(raw);
  const Shape cols_query(raw), rows_query = cols_query.transposed();
  check_direction(cols_query, raw.scalar_type(), row_gram, col_sq, col_mask, row_mask);
  check_direction(rows_query, raw.scalar_type(), col_gram, row_sq, row_mask, col_mask);
  auto out = at::empty({cols_query.n_ctx, cols_query.n_query}, raw.options());
  auto rows_out = at::empty({rows_query.n_ctx, rows_query.n_query}, raw.options());
  auto first = new_state(cols_query, save, raw.options()), second = new_state(rows_query, save, raw.options());
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_paired_forward", [&] {
    forward_all<scalar_t>(direction<scalar_t>(cols_query, false, raw, col_sq, col_mask, first),
                          row_gram.data_ptr<scalar_t>(), row_mask.data_ptr<scalar_t>(), clipped, lambda,
                          out.data_ptr<scalar_t>());
    forward_all<scalar_t>(direction<scalar_t>(rows_query, true, raw, row_sq, row_mask, second),
                          col_gram.data_ptr<scalar_t>(), col_mask.data_ptr<scalar_t>(), clipped, lambda,
                          rows_out.data_ptr<scalar_t>());
  });
  out.add_(rows_out.t());
  std::vector<at::Tensor> result{out};
  result.insert(result.end(), first.begin(), first.end());
  result.insert(result.end(), second.begin(), second.end());
  return result;
}

// (dL/draw, dL/drow_gram, dL/dcol_gram, dL/drow_sq, dL/dcol_sq) from dL/dout and paired_forward's states.
std::vector<at::Tensor> paired_backward(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& row_sq,
                                        const at::Tensor& col_sq, const at::Tensor& row_mask,
                                        const at::Tensor& col_mask, const std::vector<at::Tensor>& first,
                                        const std::vector<at::Tensor>& second, bool clipped, double lambda) {
  const at::Tensor grad = grad_out.contiguous(), grad_t = grad_out.t().contiguous();
  const Shape cols_query(raw), rows_query = cols_query.transposed();
  auto grad_raw = at::empty_like(raw);
  auto grad_row_gram = at::empty({cols_query.n_ctx, cols_query.ctx_len, cols_query.ctx_len}, raw.options());
  auto grad_col_gram = at::empty({rows_query.n_ctx, rows_query.ctx_len, rows_query.ctx_len}, raw.options());
  auto grad_col_sq = at::empty({cols_query.n_ctx, cols_query.n_query, cols_query.query_len}, raw.options());
  auto grad_row_sq = at::empty({rows_query.n_ctx, rows_query.n_query, rows_query.query_len}, raw.options());
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_paired_backward", [&] {
    backward_all<scalar_t>(direction<scalar_t>(cols_query, false, raw, col_sq, col_mask, first),
                           grad.data_ptr<scalar_t>(), clipped, lambda, grad_raw.data_ptr<scalar_t>(),
                           grad_row_gram.data_ptr<scalar_t>(), grad_col_sq.data_ptr<scalar_t>());
    backward_all<scalar_t>(direction<scalar_t>(rows_query, true, raw, row_sq, row_mask, second),
                           grad_t.data_ptr<scalar_t>(), clipped, lambda, grad_raw.data_ptr<scalar_t>(),
                           grad_col_gram.data_ptr<scalar_t>(), grad_row_sq.data_ptr<scalar_t>());
  });
  return {grad_raw, grad_row_gram, grad_col_gram, grad_row_sq.sum(0), grad_col_sq.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused L2-norm cross-attention, all (context, query) pairs");
  m.def("backward", &backward, "its gradients with respect to raw, gram and the query norms");
  m.def("paired_forward", &paired_forward, "both directions of paired scores in one call");
  m.def("paired_backward", &paired_backward, "their gradients");
}

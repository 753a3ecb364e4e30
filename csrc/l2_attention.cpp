// Fused CPU kernel of the local subnetwork's cross-attention with an L2 score norm (docs/METHOD.md section 4).
//
// Same formula and inputs as model_local._L2Attention. Raw scores come as (n_rows, row_len, n_cols, col_len):
// raw[b, k, c, l] = <row fragment b_k, column fragment c_l>. The work is cut into tiles, one row item against a
// block of W columns, copied into tile[k][l][c] with the columns along the vector lanes (or read, and their gradient
// written, in place: position-major scores of exactly W columns are laid out as the tiles). Every sum of the formula
// (a query's positions for the norm and the mean, the context for the softmax, the Gram products) then runs over
// whole vectors of W independent columns, and both directions of paired scores read the same tile:
// att(Q = column, C = row) ("rows as context") and att(Q = row, C = column) ("columns as context"). A tile
// (9 x 20 x 16 floats at RSICD sizes) stays in the first-level cache through every step; exp is vectorised
// through glibc's vector math library.
#include "l2_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr double kLeakySlope = 0.1;  // model_local.LEAKY_SLOPE
constexpr double kL2Eps = 1e-8;      // encoders.L2_EPS
constexpr double kCosineEps = 1e-8;  // model_local.COSINE_EPS
// Columns scored side by side, one per lane. Per-column loops have this fixed length and compile to whole vector
// operations; the last block's spare lanes hold zero scores, whose results are finite and never read back.
constexpr int64_t W = 16;
// Row items per accumulator of the columns' gradients in the backward: a fixed split, so that no sum depends on
// the number of threads.
constexpr int64_t kRowsPerBlock = 8;

#define FOR_LANES(c) _Pragma("omp simd") for (int64_t c = 0; c < W; ++c)

// The clipped norm's leaky ReLU; negative_slope is 1 for the plain L2 norm (branch-free, so loops vectorise).
template <typename T>
inline T leaky(T v, T negative_slope) { return v > 0 ? v : v * negative_slope; }

template <typename T>
inline T lane_sum(const T* v) {
  T total = 0;
  for (int64_t c = 0; c < W; ++c) total += v[c];
  return total;
}

// raw is (n_rows, row_len, n_cols, col_len), its last two axes in either order in memory: column-major (each
// column's positions contiguous, as a matmul of the columns' flat fragments gives it) or position-major (each
// position's columns contiguous: then tiles load by whole vectors).
bool position_major(const at::Tensor& raw) { return !raw.is_contiguous() && raw.transpose(2, 3).is_contiguous(); }

struct Dims {
  int64_t n_rows, row_len, n_cols, col_len, blocks, tile;  // blocks of W columns; tile = row_len * col_len * W
  bool position_major;
  explicit Dims(const at::Tensor& raw)
      : n_rows(raw.size(0)), row_len(raw.size(1)), n_cols(raw.size(2)), col_len(raw.size(3)),
        blocks((n_cols + W - 1) / W), tile(row_len * col_len * W), position_major(::position_major(raw)) {}
  // Position-major scores of exactly one block of columns are laid out as the tiles: read and written in place.
  bool in_place() const { return position_major && n_cols == W; }
  int64_t tile_of(int64_t i, int64_t j) const { return (i * col_len + j) * W; }  // tile[i][j][0]
  // raw[b, k, c, l] in memory
  int64_t raw_at(int64_t b, int64_t k, int64_t c, int64_t l) const {
    const int64_t inner = position_major ? l * n_cols + c : c * col_len + l;
    return (b * row_len + k) * n_cols * col_len + inner;
  }
};

// What the kernel reads of one row item: its Gram matrix (as a context), squared norms and mask (as a query), and
// its true length.
template <typename T>
struct Row {
  const T *gram, *sq, *mask;
  T count;
};

// The rows' inputs (null where the rows take no such part: a single direction reads only their Gram matrices).
template <typename T>
struct Rows {
  const T *gram, *sq, *mask;
  Row<T> item(const Dims& d, int64_t b) const {
    const T* m = mask ? mask + b * d.row_len : nullptr;
    T count = 0;
    for (int64_t k = 0; m && k < d.row_len; ++k) count += m[k];
    return {gram ? gram + b * d.row_len * d.row_len : nullptr, sq ? sq + b * d.row_len : nullptr, m, count};
  }
};

// The columns' inputs in lane layout, built once per call: per block, sq and mask [l][c], Gram [l][l'][c] (as a
// context), true lengths [c]. sq and mask (n_cols, col_len) may have any strides (the model passes transposed
// views of its position-major packing); Gram (n_cols, col_len, col_len) is contiguous or undefined. Spare lanes:
// mask 1, norms 1, Gram 0.
template <typename T>
struct Columns {
  int64_t len;
  std::vector<T> sq, mask, gram, count;
  Columns(const Dims& d, const at::Tensor& sq_in, const at::Tensor& mask_in, const at::Tensor& gram_in)
      : len(d.col_len), sq(d.blocks * len * W, T(1)), mask(d.blocks * len * W, T(1)),
        gram(gram_in.defined() ? d.blocks * len * len * W : 0, T(0)), count(d.blocks * W, T(0)) {
    const T *sq_at = sq_in.data_ptr<T>(), *mask_at = mask_in.data_ptr<T>();
    const T* gram_at = gram.empty() ? nullptr : gram_in.data_ptr<T>();
    const int64_t sq_col = sq_in.stride(0), sq_pos = sq_in.stride(1);
    const int64_t mask_col = mask_in.stride(0), mask_pos = mask_in.stride(1);
    for (int64_t col = 0; col < d.blocks * W; ++col) {
      const int64_t q = col / W, c = col % W;
      for (int64_t l = 0; l < len; ++l) {
        const int64_t at = (q * len + l) * W + c;
        if (col < d.n_cols) {
          sq[at] = sq_at[col * sq_col + l * sq_pos];
          mask[at] = mask_at[col * mask_col + l * mask_pos];
        }
        count[col] += mask[at];
      }
      if (gram_at && col < d.n_cols)
        for (int64_t i = 0; i < len * len; ++i) gram[(q * len * len + i) * W + c] = gram_at[col * len * len + i];
    }
  }
};

// One block of columns, as Columns holds it.
template <typename T>
struct Block {
  const T *sq, *mask, *gram, *count;
};

template <typename T>
Block<T> block_of(const Columns<T>& cols, int64_t q) {
  const int64_t len = cols.len;
  return {cols.sq.data() + q * len * W, cols.mask.data() + q * len * W,
          cols.gram.empty() ? nullptr : cols.gram.data() + q * len * len * W, cols.count.data() + q * W};
}

// n <= W values, by whole vectors when n == W.
template <typename T>
inline void copy_lanes(const T* from, T* to, int64_t n) {
  if (n == W) {
    FOR_LANES(c) to[c] = from[c];
  } else {
    std::copy(from, from + n, to);
  }
}

// tile[k][l][c] = raw[b, k, q W + c, l] (0 in spare lanes); store_tile moves a tile's gradient back.
template <typename T>
void load_tile(const Dims& d, const T* raw, int64_t b, int64_t q, T* tile) {
  const int64_t lanes = std::min(W, d.n_cols - q * W);
  if (lanes < W) std::fill(tile, tile + d.tile, T(0));
  for (int64_t k = 0; k < d.row_len; ++k)
    for (int64_t l = 0; l < d.col_len; ++l) {
      T* to = tile + d.tile_of(k, l);
      if (d.position_major) {
        copy_lanes(raw + d.raw_at(b, k, q * W, l), to, lanes);
      } else {
        for (int64_t c = 0; c < lanes; ++c) to[c] = raw[d.raw_at(b, k, q * W + c, l)];
      }
    }
}

template <typename T>
void store_tile(const Dims& d, const T* tile, int64_t b, int64_t q, T* raw) {
  const int64_t lanes = std::min(W, d.n_cols - q * W);
  for (int64_t k = 0; k < d.row_len; ++k)
    for (int64_t l = 0; l < d.col_len; ++l) {
      const T* from = tile + d.tile_of(k, l);
      if (d.position_major) {
        copy_lanes(from, raw + d.raw_at(b, k, q * W, l), lanes);
      } else {
        for (int64_t c = 0; c < lanes; ++c) raw[d.raw_at(b, k, q * W + c, l)] = from[c];
      }
    }
}

template <typename T>
void leaky_tile(const Dims& d, const T* raw, T negative_slope, T* scores) {
#pragma omp simd
  for (int64_t i = 0; i < d.tile; ++i) scores[i] = leaky(raw[i], negative_slope);
}

// What one direction keeps of a tile for its backward: the softmax weights w and G w [k][l][c], the norm's
// factor lambda / |h + eps| [context position][c], and <Q, v>, |v|^2 [query position][c].
template <typename T>
struct TileState {
  T *w, *gram_w, *scale, *dot, *att;
};

// One direction's state tensors (tiles, ...): w, G w, scale, dot, att; all empty without a backward.
std::vector<at::Tensor> new_state(const Dims& d, bool save, int64_t context_len, int64_t query_len,
                                  const at::TensorOptions& options) {
  const int64_t tiles = save ? d.n_rows * d.blocks : 0;
  return {at::empty({tiles, d.tile}, options), at::empty({tiles, d.tile}, options),
          at::empty({tiles, context_len * W}, options), at::empty({tiles, query_len * W}, options),
          at::empty({tiles, query_len * W}, options)};
}

// One direction's state tensors by tile, their data pointers read once per call.
template <typename T>
struct SavedState {
  T* data[5] = {};
  int64_t per_tile[5] = {};
  explicit SavedState(const std::vector<at::Tensor>& state) {
    for (size_t i = 0; i < state.size(); ++i) {
      data[i] = state[i].data_ptr<T>();
      per_tile[i] = state[i].size(1);
    }
  }
  TileState<T> tile(int64_t t) const {
    return {data[0] + t * per_tile[0], data[1] + t * per_tile[1], data[2] + t * per_tile[2],
            data[3] + t * per_tile[3], data[4] + t * per_tile[4]};
  }
};

// A thread's scratch state of one direction, for a forward without a backward (empty when the state is saved).
template <typename T>
struct ScratchState {
  std::vector<T> buffer;
  TileState<T> view;
  ScratchState(const Dims& d, int64_t context_len, int64_t query_len, bool needed)
      : buffer(needed ? 2 * d.tile + (context_len + 2 * query_len) * W : 0) {
    T* p = buffer.data();
    view = {p, p + d.tile, p + 2 * d.tile, p + 2 * d.tile + context_len * W,
            p + 2 * d.tile + (context_len + query_len) * W};
  }
};

// Sums of lane-wise products out_i = sum_j coef(i, j, lane) w(j)[lane] (the Gram products and their gradients)
// of n_out outputs, j ascending, handed to sink(i, out_i) in the order of i. R outputs at a time: R independent
// multiply-add chains hide each one's latency.
template <int64_t R, typename T, typename Coef, typename Vectors, typename Sink>
inline void lane_products_from(int64_t i, int64_t n_in, Coef& coef, Vectors& w, Sink& sink) {
  T acc[R][W] = {};
  for (int64_t j = 0; j < n_in; ++j) {
    const T* wj = w(j);
    for (int64_t r = 0; r < R; ++r) FOR_LANES(c) acc[r][c] += coef(i + r, j, c) * wj[c];
  }
  for (int64_t r = 0; r < R; ++r) sink(i + r, acc[r]);
}

template <typename T, typename Coef, typename Vectors, typename Sink>
inline void lane_products(int64_t n_out, int64_t n_in, Coef coef, Vectors w, Sink sink) {
  int64_t i = 0;
  for (; i + 4 <= n_out; i += 4) lane_products_from<4, T>(i, n_in, coef, w, sink);
  for (; i < n_out; ++i) lane_products_from<1, T>(i, n_in, coef, w, sink);
}

// ---- forward ----

// One query position's (G w)_i (kept in gram_w) and |v|^2 = sum_i w_i (G w)_i (into att), for the n context
// positions whose weights stand at x.w + at(i); gram(i, j, lane) is the context's Gram matrix.
template <typename T, typename Gram, typename At>
inline void attended_sq_norm(int64_t n, Gram gram, At at, const TileState<T>& x, T* att) {
  T sum[W] = {};
  lane_products<T>(n, n, gram, [&](int64_t j) { return x.w + at(j); }, [&](int64_t i, const T* gw) {
    const T* wi = x.w + at(i);
    T* gi = x.gram_w + at(i);
    FOR_LANES(c) {
      gi[c] = gw[c];
      sum[c] += wi[c] * gw[c];
    }
  });
  FOR_LANES(c) att[c] = sum[c];
}

// att(Q = the block's columns, C = row item) of one tile: softmax over k of lambda s_kl / |s_k. + eps| (the norm
// over each column's positions l), <Q_l, v_l> = sum_k w_kl raw_kl, |v_l|^2 = w_l^T G w_l, mean over l of cos.
template <typename T>
void forward_rows_as_context(const Dims& d, const T* raw, const T* s, const Row<T>& row, const Block<T>& col,
                             T lambda, const TileState<T>& x, T* out) {
  const int64_t lr = d.row_len, lq = d.col_len;
  const T eps = T(kL2Eps), eps_sq = T(kCosineEps * kCosineEps);
  for (int64_t k = 0; k < lr; ++k) {
    T sq[W] = {};
    for (int64_t l = 0; l < lq; ++l) {
      const T *sk = s + d.tile_of(k, l), *m = col.mask + l * W;
      FOR_LANES(c) {
        const T shifted = sk[c] + eps * m[c];
        sq[c] += shifted * shifted;
      }
    }
    FOR_LANES(c) x.scale[k * W + c] = lambda / std::sqrt(sq[c]);
  }
  T* inv_sum = x.att;  // the softmax denominators live in att's buffer until att is computed
  std::fill(inv_sum, inv_sum + lq * W, T(0));
  for (int64_t k = 0; k < lr; ++k) {
    const T *f = x.scale + k * W, present = row.mask[k];
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      FOR_LANES(c) {
        const T e = vector_exp(s[at + c] * f[c]) * present;  // logits lie in [-lambda, lambda]: no max shift
        x.w[at + c] = e;
        inv_sum[l * W + c] += e;
      }
    }
  }
  for (int64_t i = 0; i < lq * W; ++i) {
    inv_sum[i] = T(1) / inv_sum[i];
    x.dot[i] = 0;
  }
  for (int64_t k = 0; k < lr; ++k)
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      FOR_LANES(c) {
        x.w[at + c] *= inv_sum[l * W + c];
        x.dot[l * W + c] += x.w[at + c] * raw[at + c];
      }
    }
  for (int64_t l = 0; l < lq; ++l)
    attended_sq_norm<T>(
        lr, [&](int64_t k, int64_t j, int64_t) { return row.gram[k * lr + j]; },
        [&](int64_t k) { return d.tile_of(k, l); }, x, x.att + l * W);
  T total[W] = {};
  for (int64_t l = 0; l < lq; ++l) {
    const T *dot = x.dot + l * W, *att = x.att + l * W, *sq = col.sq + l * W, *m = col.mask + l * W;
    FOR_LANES(c) {
      const T product = sq[c] * att[c];  // cos = dot / max(|Q| |v|, eps)
      total[c] += dot[c] / std::sqrt(product > eps_sq ? product : eps_sq) * m[c];
    }
  }
  FOR_LANES(c) out[c] = total[c] / col.count[c];
}

// att(Q = row item, C = each of the block's columns) of one tile: softmax over l of lambda s_kl / |s_.l + eps|
// (the norm over the row's positions k), G the column's Gram matrix, mean over k of cos; added to out.
template <typename T>
void forward_cols_as_context(const Dims& d, const T* raw, const T* s, const Row<T>& row, const Block<T>& col,
                             T lambda, const TileState<T>& x, T* out) {
  const int64_t lr = d.row_len, lq = d.col_len;
  const T eps = T(kL2Eps), eps_sq = T(kCosineEps * kCosineEps);
  T* sq = x.scale;
  std::fill(sq, sq + lq * W, T(0));
  for (int64_t k = 0; k < lr; ++k) {
    const T shift = eps * row.mask[k];
    for (int64_t l = 0; l < lq; ++l) {
      const T* sk = s + d.tile_of(k, l);
      FOR_LANES(c) {
        const T shifted = sk[c] + shift;
        sq[l * W + c] += shifted * shifted;
      }
    }
  }
  for (int64_t i = 0; i < lq * W; ++i) x.scale[i] = lambda / std::sqrt(sq[i]);
  for (int64_t k = 0; k < lr; ++k) {
    T sum[W] = {}, dot[W] = {};
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      const T *f = x.scale + l * W, *m = col.mask + l * W;
      FOR_LANES(c) {
        const T e = vector_exp(s[at + c] * f[c]) * m[c];
        x.w[at + c] = e;
        sum[c] += e;
      }
    }
    FOR_LANES(c) sum[c] = T(1) / sum[c];
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      FOR_LANES(c) {
        x.w[at + c] *= sum[c];
        dot[c] += x.w[at + c] * raw[at + c];
      }
    }
    FOR_LANES(c) x.dot[k * W + c] = dot[c];
  }
  for (int64_t k = 0; k < lr; ++k)
    attended_sq_norm<T>(
        lq, [&](int64_t l, int64_t j, int64_t c) { return col.gram[(l * lq + j) * W + c]; },
        [&](int64_t l) { return d.tile_of(k, l); }, x, x.att + k * W);
  T total[W] = {};
  for (int64_t k = 0; k < lr; ++k) {
    const T *dot = x.dot + k * W, *att = x.att + k * W, sq_k = row.sq[k], m = row.mask[k];
    FOR_LANES(c) {
      const T product = sq_k * att[c];
      total[c] += dot[c] / std::sqrt(product > eps_sq ? product : eps_sq) * m;
    }
  }
  FOR_LANES(c) out[c] += total[c] / row.count;
}

// The state of the directions one call computes: rows as context always, columns as context in paired calls.
struct Directions {
  std::vector<at::Tensor> rows_state, cols_state;  // new_state of each (cols_state empty for a single direction)
  bool paired() const { return !cols_state.empty(); }
};

template <typename T>
void forward_all(const Dims& d, const T* raw, const Rows<T>& rows, const Columns<T>& cols, bool clipped,
                 double lambda, bool save, Directions& dirs, T* out) {
  const T negative_slope = clipped ? T(kLeakySlope) : T(1);
  const SavedState<T> rows_saved(dirs.rows_state), cols_saved(dirs.cols_state);
  at::parallel_for(0, d.n_rows * d.blocks, 1, [&](int64_t first, int64_t end) {
    std::vector<T> tile(d.tile), scores(d.tile), tile_out(W);
    ScratchState<T> rows_scratch(d, d.row_len, d.col_len, !save), cols_scratch(d, d.col_len, d.row_len, !save);
    for (int64_t t = first; t < end; ++t) {
      const int64_t b = t / d.blocks, q = t % d.blocks;
      const Row<T> row = rows.item(d, b);
      const Block<T> col = block_of(cols, q);
      const T* scores_in = d.in_place() ? raw + b * d.tile : tile.data();
      if (!d.in_place()) load_tile(d, raw, b, q, tile.data());
      leaky_tile(d, scores_in, negative_slope, scores.data());
      std::fill(tile_out.begin(), tile_out.end(), T(0));
      forward_rows_as_context(d, scores_in, scores.data(), row, col, T(lambda),
                              save ? rows_saved.tile(t) : rows_scratch.view, tile_out.data());
      if (dirs.paired())
        forward_cols_as_context(d, scores_in, scores.data(), row, col, T(lambda),
                                save ? cols_saved.tile(t) : cols_scratch.view, tile_out.data());
      const int64_t lanes = std::min(W, d.n_cols - q * W);
      std::copy(tile_out.begin(), tile_out.begin() + lanes, out + b * d.n_cols + q * W);
    }
  });
}

// ---- backward ----

// A thread's backward buffers: the tile, its scores and gradient, and per-query / per-context rows.
template <typename T>
struct BackwardScratch {
  std::vector<T> tile, scores, grad, logits, grad_dot, grad_att, weighted_sum, along, buffer;
  BackwardScratch(const Dims& d)
      : tile(d.tile), scores(d.tile), grad(d.tile), logits(d.tile), grad_dot(std::max(d.row_len, d.col_len) * W),
        grad_att(grad_dot.size()), weighted_sum(grad_dot.size()), along(grad_dot.size()), buffer(d.tile) {}
};

// The per-query-position part of the cosine's backward: dL/d<Q, v>, dL/d|v|^2, their w-weighted sum for the
// softmax, and dL/d|Q|^2 (grad_sq, a product the callers sum: no multiply-add fused into their sums) for one
// query position of W lanes. g: dL/dcos of each lane.
template <typename T>
inline void cosine_backward(const T* g, const T* dot, const T* att, const T* sq, const T* mask, T* grad_dot,
                            T* grad_att, T* weighted_sum, T* grad_sq) {
  const T eps_sq = T(kCosineEps * kCosineEps);
  FOR_LANES(c) {
    const T grad_cos = g[c] * mask[c];
    const T product = sq[c] * att[c];
    const T norm_product = std::sqrt(product > eps_sq ? product : eps_sq);
    grad_dot[c] = grad_cos / norm_product;
    // d / d(|Q|^2 |v|^2), zero where the clamp holds
    const T grad_product =
        product > eps_sq ? -grad_cos * dot[c] / (norm_product * norm_product * norm_product) / 2 : T(0);
    grad_sq[c] = grad_product * att[c];
    grad_att[c] = grad_product * sq[c];
    weighted_sum[c] = grad_dot[c] * dot[c] + 2 * grad_att[c] * att[c];
  }
}

// dL/dlogit of a softmax weight w: w (dL/dw - sum over the context of w dL/dw), that sum rebuilt from dot and att
// (weighted_sum); dL/dw = raw dL/d<Q, v> + 2 (G w) dL/d|v|^2.
template <typename T>
inline T logit_grad(T w, T gram_w, T raw, T grad_dot, T grad_att, T weighted_sum) {
  return (2 * grad_att * gram_w + raw * grad_dot - weighted_sum) * w;
}

// dL/draw of one score: back through logit = lambda h / n with n = |h + eps| (shifted: h + eps; along: the logits'
// gradient times h summed along the norm's axis, times f^2 / lambda^2), the leaky ReLU h = leaky(raw), and raw's
// direct part in <Q, v>.
template <typename T>
inline T raw_grad(T logit_grad, T shifted, T along, T f, T raw, T negative_slope, T w, T grad_dot) {
  return (logit_grad - shifted * along) * f * (raw > 0 ? T(1) : negative_slope) + w * grad_dot;
}

// Gradients of one tile through att(Q = columns, C = row): written into grad (the tile's dL/draw), added to the
// row's dL/dG (upper triangle) and to the block's dL/d|Q|^2 [l][c].
template <typename T>
void backward_rows_as_context(const Dims& d, const T* raw, const T* s, const Block<T>& col, T lambda,
                              T negative_slope, const TileState<T>& x, const T* grad_out, BackwardScratch<T>& scratch,
                              T* grad, T* grad_row_gram, T* grad_col_sq) {
  const int64_t lr = d.row_len, lq = d.col_len;
  const T eps = T(kL2Eps);
  T *grad_dot = scratch.grad_dot.data(), *grad_att = scratch.grad_att.data();
  T *weighted_sum = scratch.weighted_sum.data(), *buffer = scratch.buffer.data();
  T g[W];
  FOR_LANES(c) g[c] = grad_out[c] * (T(1) / col.count[c]);
  for (int64_t l = 0; l < lq; ++l) {
    T grad_sq[W];
    cosine_backward(g, x.dot + l * W, x.att + l * W, col.sq + l * W, col.mask + l * W, grad_dot + l * W,
                    grad_att + l * W, weighted_sum + l * W, grad_sq);
    // no omp simd here: it lets the compiler fuse grad_sq's product into this sum (other bits than the sum of
    // products the other direction takes, tests/test_attention_kernel.py)
    for (int64_t c = 0; c < W; ++c) grad_col_sq[l * W + c] += grad_sq[c];
  }
  // dL/dG_kj = sum over (l, c) of grad_att w_k w_j, symmetric
  for (int64_t k = 0; k < lr; ++k) {
    for (int64_t l = 0; l < lq; ++l) {
      const T* wk = x.w + d.tile_of(k, l);
      FOR_LANES(c) buffer[l * W + c] = wk[c] * grad_att[l * W + c];
    }
    lane_products<T>(
        lr - k, lq, [&](int64_t i, int64_t l, int64_t c) { return x.w[d.tile_of(k + i, l) + c]; },
        [&](int64_t l) { return buffer + l * W; },
        [&](int64_t i, const T* sum) { grad_row_gram[k * lr + k + i] += lane_sum(sum); });
  }
  for (int64_t k = 0; k < lr; ++k) {
    // softmax backward: w_kl (dL/dw_kl - sum_k' w_k'l dL/dw_k'l), the sum rebuilt from dot_l and att_l; then back
    // through the norm over l (logits_kl = lambda h_kl / n_k)
    T along[W] = {};
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      const T *gd = grad_dot + l * W, *ga = grad_att + l * W, *ws = weighted_sum + l * W;
      FOR_LANES(c) {
        const T logit = logit_grad(x.w[at + c], x.gram_w[at + c], raw[at + c], gd[c], ga[c], ws[c]);
        buffer[l * W + c] = logit;
        along[c] += logit * s[at + c];
      }
    }
    const T* f = x.scale + k * W;
    FOR_LANES(c) along[c] *= f[c] * f[c] / (lambda * lambda);
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      const T *gd = grad_dot + l * W, *m = col.mask + l * W;
      FOR_LANES(c) {
        grad[at + c] = raw_grad(buffer[l * W + c], s[at + c] + eps * m[c], along[c], f[c], raw[at + c],
                                negative_slope, x.w[at + c], gd[c]);
      }
    }
  }
}

// Gradients of one tile through att(Q = row, C = columns): added to grad, to the block's dL/dG [l][l'][c] (upper
// triangle) and to the row's dL/d|Q|^2.
template <typename T>
void backward_cols_as_context(const Dims& d, const T* raw, const T* s, const Row<T>& row, T lambda,
                              T negative_slope, const TileState<T>& x, const T* grad_out, BackwardScratch<T>& scratch,
                              T* grad, T* grad_col_gram, T* grad_row_sq) {
  const int64_t lr = d.row_len, lq = d.col_len;
  const T eps = T(kL2Eps);
  T *grad_dot = scratch.grad_dot.data(), *grad_att = scratch.grad_att.data();
  T *weighted_sum = scratch.weighted_sum.data(), *buffer = scratch.buffer.data(), *logits = scratch.logits.data();
  T g[W], mask[W], sq[W], grad_sq[W];
  FOR_LANES(c) g[c] = grad_out[c] * (T(1) / row.count);
  for (int64_t k = 0; k < lr; ++k) {
    FOR_LANES(c) {
      mask[c] = row.mask[k];
      sq[c] = row.sq[k];
    }
    cosine_backward(g, x.dot + k * W, x.att + k * W, sq, mask, grad_dot + k * W, grad_att + k * W,
                    weighted_sum + k * W, grad_sq);
    grad_row_sq[k] += lane_sum(grad_sq);
  }
  // dL/dG_ll' of each column = sum over k of grad_att w_l w_l', symmetric
  for (int64_t k = 0; k < lr; ++k)
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      FOR_LANES(c) buffer[at + c] = x.w[at + c] * grad_att[k * W + c];
    }
  for (int64_t l = 0; l < lq; ++l)
    lane_products<T>(
        lq - l, lr, [&](int64_t i, int64_t k, int64_t c) { return x.w[d.tile_of(k, l + i) + c]; },
        [&](int64_t k) { return buffer + d.tile_of(k, l); },
        [&](int64_t i, const T* sum) {
          T* to = grad_col_gram + (l * lq + l + i) * W;
          FOR_LANES(c) to[c] += sum[c];
        });
  T* along = scratch.along.data();
  std::fill(along, along + lq * W, T(0));
  for (int64_t k = 0; k < lr; ++k) {
    const T *gd = grad_dot + k * W, *ga = grad_att + k * W, *ws = weighted_sum + k * W;
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      FOR_LANES(c) {
        const T logit = logit_grad(x.w[at + c], x.gram_w[at + c], raw[at + c], gd[c], ga[c], ws[c]);
        logits[at + c] = logit;
        along[l * W + c] += logit * s[at + c];
      }
    }
  }
  for (int64_t i = 0; i < lq * W; ++i) along[i] *= x.scale[i] * x.scale[i] / (lambda * lambda);
  for (int64_t k = 0; k < lr; ++k) {
    const T *gd = grad_dot + k * W, shift = eps * row.mask[k];
    for (int64_t l = 0; l < lq; ++l) {
      const int64_t at = d.tile_of(k, l);
      const T *f = x.scale + l * W, *a = along + l * W;
      FOR_LANES(c) {
        grad[at + c] += raw_grad(logits[at + c], s[at + c] + shift, a[c], f[c], raw[at + c],
                                 negative_slope, x.w[at + c], gd[c]);
      }
    }
  }
}

// The full symmetric n x n matrix from its upper triangle.
template <typename T>
void mirror_upper(int64_t n, T* m) {
  for (int64_t k = 0; k < n; ++k)
    for (int64_t j = k + 1; j < n; ++j) m[j * n + k] = m[k * n + j];
}

template <typename T>
void backward_all(const Dims& d, const T* raw, const T* grad_out, const Rows<T>& rows, const Columns<T>& cols,
                  bool clipped, double lambda, const Directions& dirs, T* grad_raw, T* grad_row_gram,
                  T* grad_row_sq, std::vector<T>& col_gram_parts, std::vector<T>& col_sq_parts) {
  const T negative_slope = clipped ? T(kLeakySlope) : T(1);
  const int64_t lr = d.row_len, lq = d.col_len, parts = (d.n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t gram_part = d.blocks * lq * lq * W, sq_part = d.blocks * lq * W;
  col_gram_parts.assign(dirs.paired() ? parts * gram_part : 0, T(0));
  col_sq_parts.assign(parts * sq_part, T(0));
  const SavedState<T> rows_saved(dirs.rows_state), cols_saved(dirs.cols_state);
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t end) {
    BackwardScratch<T> scratch(d);
    std::vector<T> lanes_out(W);
    for (int64_t part = first; part < end; ++part)
      for (int64_t b = part * kRowsPerBlock; b < std::min(d.n_rows, (part + 1) * kRowsPerBlock); ++b) {
        const Row<T> row = rows.item(d, b);
        T* row_gram = grad_row_gram + b * lr * lr;
        std::fill(row_gram, row_gram + lr * lr, T(0));
        if (grad_row_sq) std::fill(grad_row_sq + b * lr, grad_row_sq + (b + 1) * lr, T(0));
        for (int64_t q = 0; q < d.blocks; ++q) {
          const int64_t t = b * d.blocks + q, lanes = std::min(W, d.n_cols - q * W);
          const Block<T> col = block_of(cols, q);
          std::fill(lanes_out.begin(), lanes_out.end(), T(0));
          std::copy(grad_out + b * d.n_cols + q * W, grad_out + b * d.n_cols + q * W + lanes, lanes_out.begin());
          const T* tile = d.in_place() ? raw + b * d.tile : scratch.tile.data();
          T* grad = d.in_place() ? grad_raw + b * d.tile : scratch.grad.data();  // the rows' pass writes all of it
          if (!d.in_place()) load_tile(d, raw, b, q, scratch.tile.data());
          leaky_tile(d, tile, negative_slope, scratch.scores.data());
          backward_rows_as_context(d, tile, scratch.scores.data(), col, T(lambda), negative_slope, rows_saved.tile(t),
                                   lanes_out.data(), scratch, grad, row_gram,
                                   col_sq_parts.data() + part * sq_part + q * lq * W);
          if (dirs.paired())
            backward_cols_as_context(d, tile, scratch.scores.data(), row, T(lambda), negative_slope,
                                     cols_saved.tile(t), lanes_out.data(), scratch, grad,
                                     col_gram_parts.data() + part * gram_part + q * lq * lq * W, grad_row_sq + b * lr);
          if (!d.in_place()) store_tile(d, grad, b, q, grad_raw);
        }
        mirror_upper(lr, row_gram);
      }
  });
}

// A column gradient summed over the blocks of rows, in block order: parts [part][block][i][c] (per_col values i of
// each column) into out (n_cols, per_col).
template <typename T>
void sum_over_row_blocks(const Dims& d, const std::vector<T>& parts, int64_t per_col, T* out) {
  const int64_t part = d.blocks * per_col * W;
  for (int64_t col = 0; col < d.n_cols; ++col) {
    const int64_t q = col / W, c = col % W;
    for (int64_t i = 0; i < per_col; ++i) {
      T total = 0;
      for (int64_t p = 0; p * part < static_cast<int64_t>(parts.size()); ++p)
        total += parts[p * part + (q * per_col + i) * W + c];
      out[col * per_col + i] = total;
    }
  }
}

void check_raw(const at::Tensor& raw) {
  TORCH_CHECK(raw.dim() == 4 && (raw.is_contiguous() || position_major(raw)) && raw.device().is_cpu(),
              "raw: (nR, Lr, nC, Lc) on CPU, contiguous or a transpose(2, 3) of a contiguous tensor");
}

// A tensor shaped and laid out as raw, for its gradient.
at::Tensor like_raw(const at::Tensor& raw) {
  return position_major(raw) ? at::empty_like(raw.transpose(2, 3)).transpose(2, 3) : at::empty_like(raw);
}

// A (contiguous, unless strided) input of this shape and raw's dtype.
void check_shape(const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const char* what,
                 bool strided = false) {
  TORCH_CHECK((strided || t.is_contiguous()) && t.sizes() == shape && t.scalar_type() == dtype, what, ": ",
              strided ? "" : "contiguous ", shape, " of raw's dtype");
}

// The columns' dL/dG, summed over the blocks of rows and mirrored from its upper triangle.
template <typename T>
void sum_col_gram(const Dims& d, const std::vector<T>& parts, T* out) {
  const int64_t len = d.col_len;
  sum_over_row_blocks(d, parts, len * len, out);
  for (int64_t col = 0; col < d.n_cols; ++col) mirror_upper(len, out + col * len * len);
}

}  // namespace

// One direction, att(Q = column, C = row) of raw (nC_context, Lc, nQ, Lq): out (nC_context, nQ) and the state
// backward needs (5 tensors, empty unless save).
std::vector<at::Tensor> forward(const at::Tensor& raw, const at::Tensor& gram, const at::Tensor& query_sq,
                                const at::Tensor& query_mask, const at::Tensor& ctx_mask, bool clipped,
                                double lambda, bool save) {
  check_raw(raw);
  const Dims d(raw);
  const auto dtype = raw.scalar_type();
  check_shape(gram, {d.n_rows, d.row_len, d.row_len}, dtype, "gram");
  check_shape(query_sq, {d.n_cols, d.col_len}, dtype, "query norms", true);
  check_shape(query_mask, {d.n_cols, d.col_len}, dtype, "query mask", true);
  check_shape(ctx_mask, {d.n_rows, d.row_len}, dtype, "context mask");
  auto out = at::empty({d.n_rows, d.n_cols}, raw.options());
  Directions dirs{new_state(d, save, d.row_len, d.col_len, raw.options()), {}};
  AT_DISPATCH_FLOATING_TYPES(dtype, "l2_attention_forward", [&] {
    const Rows<scalar_t> rows{gram.data_ptr<scalar_t>(), nullptr, ctx_mask.data_ptr<scalar_t>()};
    const Columns<scalar_t> cols(d, query_sq, query_mask, at::Tensor());
    forward_all<scalar_t>(d, raw.data_ptr<scalar_t>(), rows, cols, clipped, lambda, save, dirs,
                          out.data_ptr<scalar_t>());
  });
  std::vector<at::Tensor> result{out};
  result.insert(result.end(), dirs.rows_state.begin(), dirs.rows_state.end());
  return result;
}

// (dL/draw, dL/dgram, dL/dquery_sq) from dL/dout and forward's state.
std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& query_sq,
                                 const at::Tensor& query_mask, const at::Tensor& w, const at::Tensor& gram_w,
                                 const at::Tensor& scale, const at::Tensor& dot, const at::Tensor& att, bool clipped,
                                 double lambda) {
  const at::Tensor grad = grad_out.contiguous();
  const Dims d(raw);
  auto grad_raw = like_raw(raw);
  auto grad_gram = at::empty({d.n_rows, d.row_len, d.row_len}, raw.options());
  auto grad_query_sq = at::empty({d.n_cols, d.col_len}, raw.options());
  const Directions dirs{{w, gram_w, scale, dot, att}, {}};
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_backward", [&] {
    const Rows<scalar_t> rows{nullptr, nullptr, nullptr};  // the backward reads no context mask
    const Columns<scalar_t> cols(d, query_sq, query_mask, at::Tensor());
    std::vector<scalar_t> col_gram_parts, col_sq_parts;
    backward_all<scalar_t>(d, raw.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), rows, cols, clipped, lambda,
                           dirs, grad_raw.data_ptr<scalar_t>(), grad_gram.data_ptr<scalar_t>(), nullptr,
                           col_gram_parts, col_sq_parts);
    sum_over_row_blocks(d, col_sq_parts, d.col_len, grad_query_sq.data_ptr<scalar_t>());
  });
  return {grad_raw, grad_gram, grad_query_sq};
}

// Both directions of paired scores raw (nR, Lr, nC, Lc) in one call: out (nR, nC) = att(Q = col c, C = row r)
// + att(Q = row r, C = col c); then the state of each direction (as forward's).
std::vector<at::Tensor> paired_forward(const at::Tensor& raw, const at::Tensor& row_gram, const at::Tensor& col_gram,
                                       const at::Tensor& row_sq, const at::Tensor& col_sq, const at::Tensor& row_mask,
                                       const at::Tensor& col_mask, bool clipped, double lambda, bool save) {
  check_raw(raw);
  const Dims d(raw);
  const auto dtype = raw.scalar_type();
  check_shape(row_gram, {d.n_rows, d.row_len, d.row_len}, dtype, "row gram");
  check_shape(col_gram, {d.n_cols, d.col_len, d.col_len}, dtype, "column gram");
  check_shape(row_sq, {d.n_rows, d.row_len}, dtype, "row norms");
  check_shape(row_mask, {d.n_rows, d.row_len}, dtype, "row mask");
  check_shape(col_sq, {d.n_cols, d.col_len}, dtype, "column norms", true);
  check_shape(col_mask, {d.n_cols, d.col_len}, dtype, "column mask", true);
  auto out = at::empty({d.n_rows, d.n_cols}, raw.options());
  Directions dirs{new_state(d, save, d.row_len, d.col_len, raw.options()),
                  new_state(d, save, d.col_len, d.row_len, raw.options())};
  AT_DISPATCH_FLOATING_TYPES(dtype, "l2_attention_paired_forward", [&] {
    const Rows<scalar_t> rows{row_gram.data_ptr<scalar_t>(), row_sq.data_ptr<scalar_t>(),
                              row_mask.data_ptr<scalar_t>()};
    const Columns<scalar_t> cols(d, col_sq, col_mask, col_gram);
    forward_all<scalar_t>(d, raw.data_ptr<scalar_t>(), rows, cols, clipped, lambda, save, dirs,
                          out.data_ptr<scalar_t>());
  });
  std::vector<at::Tensor> result{out};
  result.insert(result.end(), dirs.rows_state.begin(), dirs.rows_state.end());
  result.insert(result.end(), dirs.cols_state.begin(), dirs.cols_state.end());
  return result;
}

// (dL/draw, dL/drow_gram, dL/dcol_gram, dL/drow_sq, dL/dcol_sq) from dL/dout and paired_forward's states.
std::vector<at::Tensor> paired_backward(const at::Tensor& grad_out, const at::Tensor& raw, const at::Tensor& row_sq,
                                        const at::Tensor& col_sq, const at::Tensor& row_mask,
                                        const at::Tensor& col_mask, const std::vector<at::Tensor>& first,
                                        const std::vector<at::Tensor>& second, bool clipped, double lambda) {
  const at::Tensor grad = grad_out.contiguous();
  const Dims d(raw);
  auto grad_raw = like_raw(raw);
  auto grad_row_gram = at::empty({d.n_rows, d.row_len, d.row_len}, raw.options());
  auto grad_col_gram = at::empty({d.n_cols, d.col_len, d.col_len}, raw.options());
  auto grad_row_sq = at::empty({d.n_rows, d.row_len}, raw.options());
  auto grad_col_sq = at::empty({d.n_cols, d.col_len}, raw.options());
  const Directions dirs{first, second};
  AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "l2_attention_paired_backward", [&] {
    const Rows<scalar_t> rows{nullptr, row_sq.data_ptr<scalar_t>(), row_mask.data_ptr<scalar_t>()};
    const Columns<scalar_t> cols(d, col_sq, col_mask, at::Tensor());
    std::vector<scalar_t> col_gram_parts, col_sq_parts;
    backward_all<scalar_t>(d, raw.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), rows, cols, clipped, lambda,
                           dirs, grad_raw.data_ptr<scalar_t>(), grad_row_gram.data_ptr<scalar_t>(),
                           grad_row_sq.data_ptr<scalar_t>(), col_gram_parts, col_sq_parts);
    sum_col_gram(d, col_gram_parts, grad_col_gram.data_ptr<scalar_t>());
    sum_over_row_blocks(d, col_sq_parts, d.col_len, grad_col_sq.data_ptr<scalar_t>());
  });
  return {grad_raw, grad_row_gram, grad_col_gram, grad_row_sq, grad_col_sq};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused L2-norm cross-attention, all (context, query) pairs");
  m.def("backward", &backward, "its gradients with respect to raw, gram and the query norms");
  m.def("paired_forward", &paired_forward, "both directions of paired scores in one call");
  m.def("paired_backward", &paired_backward, "their gradients");
  m.def("column_packing", &column_packing, "packed rows and weights of caption groups");
  m.def("grouped_forward", &grouped_forward, "paired scores of all caption groups (csrc/paired_groups.cpp)");
  m.def("grouped_backward", &grouped_backward, "their gradients with respect to the rows and the columns");
  m.def("msb_loss", &msb_loss, "MSB loss of a stack of square similarity matrices, and its gradient (msb_loss.cpp)");
}

// All caption groups of one paired_attention call (model_local._FusedPairedAttention), forward and backward.
//
// The columns (captions) are scored in groups of similar length, each trimmed to its longest member and packed
// position-major (position l of every column of the group, then l + 1), so that the raw-score matmul of a group
// gives the kernel (l2_attention.cpp) its scores with the columns along the vector lanes. Rows come in slices that
// keep a call's intermediates cache-sized. This file is the loop over groups and slices, with the matmuls, Gram
// matrices and norms around each kernel call and their gradients (a Python loop of tensor ops cost more in
// interpreter and dispatch time than in arithmetic at training sizes). The Gram matrices, norms and their gradients
// are loops of their own: one item's sets are too small for batched matmuls to pay.
#include "l2_attention.h"

#include <algorithm>

namespace {

struct Group {
  int64_t first, end, length;  // positions first..end-1 of the columns in group order, trimmed to length
  int64_t rows_per_slice;      // rows scored against the group in one kernel call (model_local._slice_items)
  int64_t size() const { return end - first; }
};

std::vector<Group> groups_of(const std::vector<int64_t>& bounds) {
  TORCH_CHECK(bounds.size() % 4 == 0, "bounds: (first, end, length, rows a slice) of each group, flattened");
  std::vector<Group> groups;
  for (size_t i = 0; i < bounds.size(); i += 4)
    groups.push_back({bounds[i], bounds[i + 1], bounds[i + 2], std::max<int64_t>(1, bounds[i + 3])});
  return groups;
}

// One group's packed columns: vectors (L, n, d), and squared norms and weights as (n, L) transposed views (the
// kernel reads them through their strides).
struct GroupView {
  Group group;
  int64_t offset;  // first packed row
  at::Tensor vectors, sq, weight;
};

std::vector<GroupView> group_views(const std::vector<Group>& groups, const at::Tensor& packed,
                                   const at::Tensor& packed_sq, const at::Tensor& packed_weight) {
  std::vector<GroupView> views;
  int64_t offset = 0;
  for (const Group& g : groups) {
    const int64_t rows = g.size() * g.length;
    views.push_back({g, offset, packed.narrow(0, offset, rows).view({g.length, g.size(), -1}),
                     packed_sq.narrow(0, offset, rows).view({g.length, g.size()}).t(),
                     packed_weight.narrow(0, offset, rows).view({g.length, g.size()}).t()});
    offset += rows;
  }
  return views;
}

// Slices [first, first + count) of the rows, the group's rows_per_slice each.
std::vector<std::pair<int64_t, int64_t>> row_slices(int64_t n_rows, const Group& g) {
  const int64_t step = g.rows_per_slice;
  std::vector<std::pair<int64_t, int64_t>> slices;
  for (int64_t first = 0; first < n_rows; first += step) slices.emplace_back(first, std::min(step, n_rows - first));
  return slices;
}

// a[b, k, l, c] = <rows[b, k], vectors[l, c]>, viewed as (n_rows, Lr, n, L): position-major scores.
at::Tensor raw_scores(const at::Tensor& rows, const at::Tensor& vectors) {
  const int64_t dim = rows.size(2);
  return at::mm(rows.reshape({-1, dim}), vectors.reshape({-1, dim}).t())
      .view({rows.size(0), rows.size(1), vectors.size(0), vectors.size(1)})
      .transpose(2, 3);
}

// Products of fragment vectors (d contiguous values each) for the Gram matrices, their norms and their gradients,
// written for the small sets of one item (9 blocks, up to about 20 words) that batched matmuls serve poorly.
constexpr int64_t kRowsAtOnce = 4;  // independent sums at a time: hides each one's latency
constexpr int64_t kValuesAtOnce = 32;  // values of a vector a sum keeps in registers

// out[j] = <a, b_j> for the n <= kRowsAtOnce vectors b_j at b + j stride.
template <typename T>
inline void dots(const T* a, const T* b, int64_t stride, int64_t n, int64_t dim, T* out) {
  const T *b0 = b, *b1 = n > 1 ? b + stride : b, *b2 = n > 2 ? b + 2 * stride : b, *b3 = n > 3 ? b + 3 * stride : b;
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t e = 0; e < dim; ++e) {
    s0 += a[e] * b0[e];
    s1 += a[e] * b1[e];
    s2 += a[e] * b2[e];
    s3 += a[e] * b3[e];
  }
  const T sums[kRowsAtOnce] = {s0, s1, s2, s3};
  for (int64_t j = 0; j < n; ++j) out[j] = sums[j];
}

// to_r += sum_j coef[r][j] x_j for the kRowsAtOnce rows r (coef rows of n values; rows past n_rows are not written)
// of the n vectors x_j at x + j x_stride, a chunk of kValuesAtOnce values at a time.
template <typename T>
void add_combinations(const T* coef, int64_t n_rows, const T* x, int64_t x_stride, int64_t n, int64_t dim, T* to,
                      int64_t to_stride) {
  int64_t e0 = 0;
  for (; e0 + kValuesAtOnce <= dim; e0 += kValuesAtOnce) {
    T acc[kRowsAtOnce][kValuesAtOnce] = {};
    for (int64_t j = 0; j < n; ++j) {
      const T* xj = x + j * x_stride + e0;
      for (int64_t r = 0; r < kRowsAtOnce; ++r) {
        const T c = coef[r * n + j];
#pragma omp simd
        for (int64_t e = 0; e < kValuesAtOnce; ++e) acc[r][e] += c * xj[e];
      }
    }
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t e = 0; e < kValuesAtOnce; ++e) to[r * to_stride + e0 + e] += acc[r][e];
  }
  for (; e0 < dim; ++e0)  // the rest of a dimension not a multiple of kValuesAtOnce
    for (int64_t r = 0; r < n_rows; ++r) {
      T sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += coef[r * n + j] * x[j * x_stride + e0];
      to[r * to_stride + e0] += sum;
    }
}

// |x|^2 of one vector.
template <typename T>
inline T squared_norm(const T* x, int64_t dim) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < dim; ++e) sum += x[e] * x[e];
  return sum;
}

// The Gram matrices X X^T (n, L, L) of fragment sets (n, L, d), each vector contiguous, the sets and positions in any
// strides (the packed columns are a transposed view).
at::Tensor gram_matrices(const at::Tensor& fragments) {
  const at::Tensor x = fragments.stride(2) == 1 ? fragments : fragments.contiguous();
  const int64_t n = x.size(0), len = x.size(1), dim = x.size(2), set_stride = x.stride(0), pos_stride = x.stride(1);
  auto gram = at::empty({n, len, len}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gram_matrices", [&] {
    const scalar_t* at_x = x.data_ptr<scalar_t>();
    scalar_t* g = gram.data_ptr<scalar_t>();
    for (int64_t c = 0; c < n; ++c, g += len * len) {
      const scalar_t* item = at_x + c * set_stride;
      for (int64_t k = 0; k < len; ++k) {
        for (int64_t j = k; j < len; j += kRowsAtOnce)
          dots(item + k * pos_stride, item + j * pos_stride, pos_stride, std::min(kRowsAtOnce, len - j), dim,
               g + k * len + j);
        for (int64_t j = k + 1; j < len; ++j) g[j * len + k] = g[k * len + j];
      }
    }
  });
  return gram;
}

// |x|^2 of the vectors (..., d) of a tensor, shaped (...).
at::Tensor squared_norms(const at::Tensor& vectors) {
  const at::Tensor x = vectors.contiguous();
  const int64_t dim = x.size(-1), m = dim ? x.numel() / dim : 0;
  auto sq = at::empty(x.sizes().slice(0, x.dim() - 1), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "squared_norms", [&] {
    const scalar_t* at_x = x.data_ptr<scalar_t>();
    scalar_t* out = sq.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m; ++i) out[i] = squared_norm(at_x + i * dim, dim);
  });
  return sq;
}

// grad (n, L, d) += (dG + dG^T + 2 diag(d|x|^2)) X, the gradients through G = X X^T and |x|^2 of fragments X (n, L,
// d); grad in any strides with each vector contiguous (the packed columns' gradient is a transposed view).
void add_gram_and_norm_grads(const at::Tensor& grad, const at::Tensor& fragments, const at::Tensor& grad_gram,
                             const at::Tensor& grad_sq) {
  TORCH_CHECK(grad.stride(2) == 1, "the fragments' gradient: each vector contiguous");
  const at::Tensor x = fragments.stride(2) == 1 ? fragments : fragments.contiguous();
  const int64_t n = x.size(0), len = x.size(1), dim = x.size(2);
  const int64_t padded = (len + kRowsAtOnce - 1) / kRowsAtOnce * kRowsAtOnce;
  const at::Tensor gg = grad_gram.contiguous(), gs = grad_sq.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "add_gram_and_norm_grads", [&] {
    const scalar_t *at_x = x.data_ptr<scalar_t>(), *at_gg = gg.data_ptr<scalar_t>(), *at_gs = gs.data_ptr<scalar_t>();
    scalar_t* at_grad = grad.data_ptr<scalar_t>();
    std::vector<scalar_t> m(padded * len, scalar_t(0));  // rows past len stay 0
    for (int64_t c = 0; c < n; ++c) {
      const scalar_t *dg = at_gg + c * len * len, *ds = at_gs + c * len;
      for (int64_t l = 0; l < len; ++l)
        for (int64_t j = 0; j < len; ++j) m[l * len + j] = dg[l * len + j] + dg[j * len + l];
      for (int64_t l = 0; l < len; ++l) m[l * len + l] += 2 * ds[l];
      for (int64_t l = 0; l < len; l += kRowsAtOnce)
        add_combinations(m.data() + l * len, std::min(kRowsAtOnce, len - l), at_x + c * x.stride(0), x.stride(1), len,
                         dim, at_grad + c * grad.stride(0) + l * grad.stride(1), grad.stride(1));
    }
  });
}

constexpr size_t kFixedSaved = 6;  // row_weight, packed, row_sq, packed_sq, packed_weight, index; then each call's
constexpr size_t kPerCall = 11;    // raw scores and the kernel's 10 state tensors

}  // namespace

// The packed rows of the flat (n_cols * padded_len, d) columns, group after group, each position-major, and the
// packed positions' weights (true positions 1, padding 0).
std::vector<at::Tensor> column_packing(const at::Tensor& col_lengths, const std::optional<at::Tensor>& order,
                                       const std::vector<int64_t>& bounds, int64_t padded_len) {
  const at::Tensor lengths = col_lengths.to(at::kLong).contiguous();
  const at::Tensor ids = order ? order->to(at::kLong).contiguous() : at::arange(lengths.numel(), lengths.options());
  const int64_t *length = lengths.data_ptr<int64_t>(), *id = ids.data_ptr<int64_t>();
  const auto groups = groups_of(bounds);
  int64_t packed = 0;
  for (const Group& g : groups) packed += g.size() * g.length;
  auto index = at::empty({packed}, lengths.options());
  auto weight = at::empty({packed}, lengths.options().dtype(at::kBool));
  int64_t* at_index = index.data_ptr<int64_t>();
  bool* at_weight = weight.data_ptr<bool>();
  for (const Group& g : groups)
    for (int64_t l = 0; l < g.length; ++l)
      for (int64_t j = g.first; j < g.end; ++j) {
        *at_index++ = id[j] * padded_len + l;
        *at_weight++ = l < length[id[j]];
      }
  return {index, weight};
}

// out (n_rows, n_cols) = att(Q = col, C = row) + att(Q = row, C = col) of trimmed rows (n_rows, Lr, d) and padded
// columns (n_cols, padded_len, d) with col_lengths, the columns in the caption groups bounds ((first, end, length,
// rows a slice) of each, flattened) of the columns' order (None: their own); then what grouped_backward needs when
// save.
std::vector<at::Tensor> grouped_forward(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_mask,
                                        const at::Tensor& col_lengths, const std::optional<at::Tensor>& order,
                                        const std::vector<int64_t>& bounds, bool clipped, double lambda, bool save) {
  TORCH_CHECK(rows.dim() == 3 && cols.dim() == 3 && rows.size(2) == cols.size(2) && rows.device().is_cpu(),
              "rows (n, Lr, d) and columns (n, L, d) on CPU");
  const int64_t dim = rows.size(2), n_rows = rows.size(0);
  auto packing = column_packing(col_lengths, order, bounds, cols.size(1));
  const at::Tensor row_weight = row_mask.to(rows.scalar_type()), packed_weight = packing[1].to(rows.scalar_type());
  const at::Tensor packed = cols.reshape({-1, dim}).index_select(0, packing[0]).mul_(packed_weight.unsqueeze(1));
  const at::Tensor row_sq = squared_norms(rows), packed_sq = squared_norms(packed), row_gram = gram_matrices(rows);
  auto out = at::empty({n_rows, cols.size(0)}, rows.options());
  std::vector<at::Tensor> result{out};
  if (save) result.insert(result.end(), {row_weight, packed, row_sq, packed_sq, packed_weight, packing[0]});
  for (const GroupView& view : group_views(groups_of(bounds), packed, packed_sq, packed_weight)) {
    const at::Tensor col_gram = gram_matrices(view.vectors.transpose(0, 1));
    for (const auto& [first, count] : row_slices(n_rows, view.group)) {
      const at::Tensor raw = raw_scores(rows.narrow(0, first, count), view.vectors);
      auto call = paired_forward(raw, row_gram.narrow(0, first, count), col_gram, row_sq.narrow(0, first, count),
                                 view.sq, row_weight.narrow(0, first, count), view.weight, clipped, lambda, save);
      out.narrow(0, first, count).narrow(1, view.group.first, view.group.size()).copy_(call[0]);
      if (save) {
        result.push_back(raw);
        result.insert(result.end(), call.begin() + 1, call.end());
      }
    }
  }
  if (order) result[0] = out.index_select(1, at::argsort(*order));  // back in the columns' own order
  return result;
}

// (dL/drows, dL/dcols) from dL/dout and grouped_forward's saved tensors (its result after out).
std::vector<at::Tensor> grouped_backward(const at::Tensor& grad_out, const at::Tensor& rows,
                                         const std::vector<at::Tensor>& saved, const std::vector<int64_t>& col_shape,
                                         const std::optional<at::Tensor>& order, const std::vector<int64_t>& bounds,
                                         bool clipped, double lambda) {
  const at::Tensor &row_weight = saved[0], &packed = saved[1], &row_sq = saved[2], &packed_sq = saved[3],
                   &packed_weight = saved[4], &index = saved[5];
  const int64_t dim = rows.size(2), n_rows = rows.size(0), row_len = rows.size(1);
  const at::Tensor grad = order ? grad_out.index_select(1, *order) : grad_out;
  auto grad_rows = at::zeros_like(rows, at::MemoryFormat::Contiguous), grad_packed = at::zeros_like(packed);
  auto grad_row_gram = at::zeros({n_rows, row_len, row_len}, rows.options()), grad_row_sq = at::zeros_like(row_sq);
  size_t call = kFixedSaved;
  for (const GroupView& view : group_views(groups_of(bounds), packed, packed_sq, packed_weight)) {
    const int64_t n = view.group.size(), length = view.group.length;
    at::Tensor grad_cols = grad_packed.narrow(0, view.offset, n * length).view({-1, dim});
    auto grad_col_gram = at::zeros({n, length, length}, rows.options()), grad_col_sq = at::zeros_like(view.sq);
    for (const auto& [first, count] : row_slices(n_rows, view.group)) {
      TORCH_CHECK(call + kPerCall <= saved.size(), "grouped_backward: fewer saved tensors than kernel calls");
      const std::vector<at::Tensor> first_state(saved.begin() + call + 1, saved.begin() + call + 6),
          second_state(saved.begin() + call + 6, saved.begin() + call + kPerCall);
      const at::Tensor slice_rows = rows.narrow(0, first, count);
      auto grads = paired_backward(grad.narrow(0, first, count).narrow(1, view.group.first, n), saved[call],
                                   row_sq.narrow(0, first, count), view.sq, row_weight.narrow(0, first, count),
                                   view.weight, first_state, second_state, clipped, lambda);
      call += kPerCall;
      // raw = R C^T: d/dR = grad_raw C, d/dC = grad_raw^T R
      const at::Tensor flat = grads[0].transpose(2, 3).reshape({-1, n * length});
      grad_rows.narrow(0, first, count).view({-1, dim}).addmm_(flat, view.vectors.view({-1, dim}));
      grad_cols.addmm_(flat.t(), slice_rows.reshape({-1, dim}));
      grad_row_gram.narrow(0, first, count) += grads[1];
      grad_row_sq.narrow(0, first, count) += grads[3];
      grad_col_gram += grads[2];
      grad_col_sq += grads[4];
    }
    add_gram_and_norm_grads(grad_cols.view({length, n, dim}).transpose(0, 1), view.vectors.transpose(0, 1),
                            grad_col_gram, grad_col_sq);
  }
  add_gram_and_norm_grads(grad_rows, rows, grad_row_gram, grad_row_sq);
  // back from the packed layout; padding positions get no gradient
  auto grad_cols = at::zeros({col_shape[0] * col_shape[1], dim}, rows.options());
  grad_cols.index_copy_(0, index, grad_packed.mul_(packed_weight.unsqueeze(1)));
  return {grad_rows, grad_cols.view(col_shape)};
}

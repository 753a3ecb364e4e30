// The multi-spring balance loss of a stack of square similarity matrices, and its gradient, on a CPU (loss._MSBLoss,
// docs/METHOD.md section 5): the same steps as loss._msb_terms, one anchor at a time over its B entries, where the
// tensor ops cost far more in dispatch than in arithmetic at batch sizes (about 30 ops over a (2, 3, 64, 64) stack).
#include "l2_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// What one anchor of one direction adds to the loss.
template <typename T>
struct Anchor {
  T term;      // (positive log-sum-exp + negative log-sum-exp) / gamma_1
  bool valid;  // both kept sets non-empty
};

// The anchor's kept sets (mined on the unmined sets), log-sum-exps and, into grad (B), the softmax weights of its kept
// negatives minus those of its kept positives: d term / d s. s and pos are the anchor's B entries, contiguous. An
// anchor with a NaN similarity is skipped with a NaN gradient, as the tensor ops give it (the trainer then stops).
template <typename T>
Anchor<T> anchor_terms(const T* s, const T* pos, int64_t n, T g1, T g2, T delta, std::vector<T>& buffer, T* grad) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  T hardest_neg = -inf, easiest_pos = inf, nans = 0;
#pragma omp simd reduction(max : hardest_neg) reduction(min : easiest_pos) reduction(+ : nans)
  for (int64_t j = 0; j < n; ++j) {
    const T as_pos = pos[j] != 0 ? s[j] : inf, as_neg = pos[j] != 0 ? -inf : s[j];
    easiest_pos = as_pos < easiest_pos ? as_pos : easiest_pos;
    hardest_neg = as_neg > hardest_neg ? as_neg : hardest_neg;
    nans += s[j] != s[j] ? T(1) : T(0);
  }
  if (nans != 0) {
    std::fill(grad, grad + n, std::numeric_limits<T>::quiet_NaN());
    return {T(0), false};
  }
  T *keep_pos = buffer.data(), *keep_neg = keep_pos + n, *pos_logit = keep_neg + n, *neg_logit = pos_logit + n;
  const T pos_bound = hardest_neg + delta, neg_bound = easiest_pos - delta;
  T pos_max = -inf, neg_max = -inf, pos_count = 0, neg_count = 0;
#pragma omp simd reduction(max : pos_max, neg_max) reduction(+ : pos_count, neg_count)
  for (int64_t j = 0; j < n; ++j) {
    keep_pos[j] = (pos[j] != 0) & (s[j] < pos_bound) ? T(1) : T(0);
    keep_neg[j] = (pos[j] == 0) & (s[j] > neg_bound) ? T(1) : T(0);
    pos_logit[j] = g2 - g1 * s[j];
    neg_logit[j] = g1 * s[j] - g2;
    const T kept_pos = keep_pos[j] != 0 ? pos_logit[j] : -inf, kept_neg = keep_neg[j] != 0 ? neg_logit[j] : -inf;
    pos_max = kept_pos > pos_max ? kept_pos : pos_max;
    neg_max = kept_neg > neg_max ? kept_neg : neg_max;
    pos_count += keep_pos[j];
    neg_count += keep_neg[j];
  }
  if (pos_count == 0 || neg_count == 0) {
    std::fill(grad, grad + n, T(0));
    return {T(0), false};
  }
  // log-sum-exps over the kept entries; the others take exp(0) times 0, so that every exp stays in range
  T pos_sum = 0, neg_sum = 0;
#pragma omp simd reduction(+ : pos_sum, neg_sum)
  for (int64_t j = 0; j < n; ++j) {
    pos_sum += vector_exp(keep_pos[j] != 0 ? pos_logit[j] - pos_max : T(0)) * keep_pos[j];
    neg_sum += vector_exp(keep_neg[j] != 0 ? neg_logit[j] - neg_max : T(0)) * keep_neg[j];
  }
  const T pos_term = std::log(pos_sum) + pos_max, neg_term = std::log(neg_sum) + neg_max;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    grad[j] = vector_exp(keep_neg[j] != 0 ? neg_logit[j] - neg_term : T(0)) * keep_neg[j] -
              vector_exp(keep_pos[j] != 0 ? pos_logit[j] - pos_term : T(0)) * keep_pos[j];
  return {(pos_term + neg_term) / g1, true};
}

// The relevance (B x B) as 0 / 1 values, by rows and by columns (its transpose): what each anchor direction reads.
template <typename T>
struct Relevance {
  std::vector<T> rows, cols;
  Relevance(const bool* pos, int64_t n) : rows(n * n), cols(n * n) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) rows[i * n + j] = cols[j * n + i] = pos[i * n + j];
  }
};

// One matrix (B x B): its loss, and its gradient into grad when not null.
template <typename T>
T matrix_loss(const T* sims, const Relevance<T>& pos, int64_t n, T g1, T g2, T delta, T* grad) {
  std::vector<T> transposed(n * n), row_grads(n * n), col_grads(n * n), buffer(4 * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) transposed[j * n + i] = sims[i * n + j];
  std::vector<Anchor<T>> rows(n), cols(n);
  for (int64_t i = 0; i < n; ++i) {
    rows[i] = anchor_terms(sims + i * n, pos.rows.data() + i * n, n, g1, g2, delta, buffer, row_grads.data() + i * n);
    cols[i] = anchor_terms(transposed.data() + i * n, pos.cols.data() + i * n, n, g1, g2, delta, buffer,
                           col_grads.data() + i * n);
  }
  // an anchor needs both of its kept sets, both ways (as its row and as its column)
  T row_total = 0, col_total = 0;
  std::vector<T> valid(n);
  for (int64_t i = 0; i < n; ++i) {
    valid[i] = rows[i].valid && cols[i].valid;
    row_total += valid[i] != 0 ? rows[i].term : T(0);
    col_total += valid[i] != 0 ? cols[i].term : T(0);
  }
  if (grad)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        grad[i * n + j] = row_grads[i * n + j] * valid[i] / T(n) + col_grads[j * n + i] * valid[j] / T(n);
  return (row_total + col_total) / T(n);
}

}  // namespace

// (loss (...), d loss / d sims (..., B, B) or undefined) of sims (..., B, B) and the relevance pos (B, B).
std::vector<at::Tensor> msb_loss(const at::Tensor& sims, const at::Tensor& pos, double gamma_1, double gamma_2,
                                 double delta, bool with_grad) {
  TORCH_CHECK(sims.dim() >= 2 && sims.size(-1) == sims.size(-2) && sims.device().is_cpu(),
              "sims: (..., B, B) on CPU");
  TORCH_CHECK(pos.dim() == 2 && pos.size(0) == sims.size(-1) && pos.size(1) == sims.size(-1) &&
                  pos.scalar_type() == at::kBool,
              "pos: (B, B) booleans");
  const at::Tensor s = sims.contiguous(), relevant = pos.contiguous();
  const int64_t n = s.size(-1), matrices = n ? s.numel() / (n * n) : 0;
  auto loss = at::empty(s.sizes().slice(0, s.dim() - 2), s.options());
  at::Tensor grad = with_grad ? at::empty_like(s) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "msb_loss", [&] {
    const scalar_t* at_s = s.data_ptr<scalar_t>();
    scalar_t* at_loss = loss.data_ptr<scalar_t>();
    const Relevance<scalar_t> relevance(relevant.data_ptr<bool>(), n);  // the same for every matrix of the stack
    for (int64_t m = 0; m < matrices; ++m)
      at_loss[m] = matrix_loss<scalar_t>(at_s + m * n * n, relevance, n, scalar_t(gamma_1), scalar_t(gamma_2),
                                         scalar_t(delta), with_grad ? grad.data_ptr<scalar_t>() + m * n * n : nullptr);
  });
  return {loss, grad};
}

// Fused CPU kernels of the AdamP and SGDP steps (hf_adamp, DESIGN.md section 2).
//
// A call works on one run of a flat tensor viewed as (rows, len). Parameters are fp32/fp64/fp16/bf16; the state
// (moments) and all arithmetic are in T = float for fp32/fp16/bf16 parameters and double for fp64 ones.
//
// Pass 1 updates the moments and adds the four row sums g.p, g.g, p.p, p.u into a (4, total_rows) stats
// buffer. "full" runs (never projected) finish the step in that pass. Speculating runs also finish it, guessing
// the outcome from the previous step: "spec" as not projected, "spec_channel" as projected row by row (whole
// rows only: each row's coefficient is computed from its own sums exactly as projection.decide computes it, and
// written to spec_coef). When the guess is right, the result is bit-identical to the two-pass step. Pass 2
// applies the decided coefficient and weight decay, or, after a speculating pass 1, repairs only the rows whose
// decided (coefficient, decay) differ from the guessed ones, recovering the old weight in double (an ulp or two
// of the weight's dtype, so speculation is only used for fp32/fp64 parameters).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Elements per block of the row sums (see blocked_sums).
constexpr int64_t kBlock = 512;
// Elements of work per thread below which a call stays on one thread.
constexpr int64_t kGrain = 1 << 15;

enum Pass1 { kFirst = 0, kFull = 1, kSpec = 2, kSpecChannel = 3 };
// Pass 2: apply the decision, or repair a pass 1 that speculated (kSpec / kSpecChannel).
enum Pass2 { kApply = 0, kRepair = 1, kRepairChannel = 2 };

// a * b + c for the row sums. The file is built without FMA contraction so that the step rounds like torch's
// separate ops (closer to the reference); the sums only feed the decision and the coefficient, and an explicit
// FMA there saves a quarter of the vector instructions. Without hardware FMA, std::fma would be a slow call.
template <typename T>
inline T madd(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

template <typename T, typename P>
inline T up(P x) { return static_cast<T>(x); }
template <>
inline double up<double, c10::Half>(c10::Half x) { return static_cast<float>(x); }
template <>
inline double up<double, c10::BFloat16>(c10::BFloat16 x) { return static_cast<float>(x); }

struct AdamScalars {
  double beta1, beta2, eps_s, step, decay;  // eps_s = eps * sqrt(1 - beta2^t); step = lr / bc1 * sqrt(bc2)
  double eps;                               // the group's eps: the norm floor of the projection coefficient
  bool nesterov, maximize;
};

struct SgdScalars {
  double momentum, damp1, lr, decay;  // damp1 = 1 - dampening
  double eps;
  bool nesterov, maximize;
};

// The channel coefficient p.u / (|p| + eps)^2 of one row, rounded as projection.decide computes it from the
// stats buffer (dtype S), then to the state dtype T, so that a right guess gives the two-pass step's bits.
template <typename S, typename T>
inline T channel_coef(double pp, double pu, double eps) {
  const S den = std::sqrt(static_cast<S>(pp)) + static_cast<S>(eps);
  return static_cast<T>(static_cast<S>(pu) / (den * den));
}

template <typename T>
inline T row_coef(bool stats_double, const double* acc, double eps) {
  return stats_double ? channel_coef<double, T>(acc[2], acc[3], eps) : channel_coef<float, T>(acc[2], acc[3], eps);
}

// Rows [0, rows) of a run; fn(r0, r1) handles a range of rows. Parallel when the run is big enough.
template <typename F>
void for_rows(int64_t rows, int64_t len, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1));
  at::parallel_for(0, rows, grain, fn);
}

// Where pass 1 adds each row's four sums: stats[:, row0 + r] of the (4, total_rows) buffer, float or double. Each
// row is summed by one thread, so the rows are written straight from the row loop (no buffer to allocate).
struct StatsOut {
  void* base;
  bool dbl;
  int64_t stride, row0;
  void add(int64_t r, const double* acc) const {
    if (dbl) {
      double* out = static_cast<double*>(base) + row0 + r;
      for (int k = 0; k < 4; ++k) out[k * stride] += acc[k];
    } else {
      float* out = static_cast<float*>(base) + row0 + r;
      for (int k = 0; k < 4; ++k) out[k * stride] += static_cast<float>(acc[k]);
    }
  }
};

StatsOut stats_out(const torch::Tensor& stats, int64_t stat_row, int64_t rows) {
  const auto st = stats.scalar_type();
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 2 && stats.size(0) == 4 && stats.stride(1) == 1 &&
                  (st == at::kFloat || st == at::kDouble),
              "hf_adamp fused: stats must be a (4, rows) float32/float64 CPU tensor with contiguous rows");
  TORCH_CHECK(stat_row >= 0 && stat_row + rows <= stats.size(1), "hf_adamp fused: rows out of range of stats");
  return StatsOut{stats.data_ptr(), st == at::kDouble, stats.stride(0), stat_row};
}

double read_scalar(const torch::Tensor& t, int64_t index, double* as_plain, double plain) {
  double value = 0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "hf_adamp_read", [&] {
    value = static_cast<double>(t.data_ptr<scalar_t>()[index]);
    *as_plain = static_cast<double>(static_cast<scalar_t>(plain));  // `plain` rounded like the decay tensor
  });
  return value;
}

// Row sums of elem(j, gp, gg, pp, pu) over [lo, hi), added into out[4]. Accumulates in T over short blocks
// with per-lane accumulators (vectorises without reassociation flags), then in double across blocks, so long
// rows keep double-like accuracy.
template <typename T, typename F>
inline void blocked_sums(int64_t lo, int64_t hi, double* out, const F& elem) {
  constexpr int L = 64 / sizeof(T);  // lanes: two AVX2 vectors
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t be = std::min(hi, b0 + kBlock);
    T a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
    int64_t j = b0;
    for (; j + L <= be; j += L) {
#pragma omp simd
      for (int l = 0; l < L; ++l) elem(j + l, a0[l], a1[l], a2[l], a3[l]);
    }
    for (; j < be; ++j) elem(j, a0[0], a1[0], a2[0], a3[0]);
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int l = 0; l < L; ++l) s0 += a0[l], s1 += a1[l], s2 += a2[l], s3 += a3[l];
    out[0] += s0, out[1] += s1, out[2] += s2, out[3] += s3;
  }
}

// Element-wise loop over [lo, hi) (no sums).
template <typename F>
inline void elementwise(int64_t lo, int64_t hi, const F& elem) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) elem(j);
}

// ------------------------------------------------------------------------------------------------ AdamP
// Pass 1. spec_coef (kSpecChannel only) receives each row's guessed coefficient; stats_double says whether the
// stats buffer (and so projection.decide) works in double.
template <typename P, typename T, int MODE, bool NEST>
void adam_pass1_impl(const P* g, P* p, T* m, T* v, int64_t rows, int64_t len, const AdamScalars& s,
                     const StatsOut* sums, T* spec_coef, bool stats_double) {
  for_rows(rows, len, [&](int64_t r0, int64_t r1) {
    // locals, not captures: the compiler keeps them in registers (a captured reference might alias m or p)
    const T b1 = s.beta1, b2 = s.beta2, ob1 = 1 - s.beta1, ob2 = 1 - s.beta2, eps = s.eps_s, step = s.step;
    const T decay = s.decay, sign = s.maximize ? -1 : 1;
    auto moments = [&](int64_t j, T& gj, T& uj) {
      gj = sign * up<T>(g[j]);
      const T mj = b1 * m[j] + ob1 * gj;
      const T vj = b2 * v[j] + ob2 * gj * gj;
      m[j] = mj;
      v[j] = vj;
      uj = (NEST ? b1 * mj + ob1 * gj : mj) / (std::sqrt(vj) + eps);
    };
    if constexpr (MODE == kFull) {
      elementwise(r0 * len, r1 * len, [&](int64_t j) {
        T gj, uj;
        moments(j, gj, uj);
        p[j] = static_cast<P>(up<T>(p[j]) * decay - step * uj);
      });
      return;
    }
    std::vector<T> row_u(MODE == kSpecChannel ? len : 0);  // the row's update, in cache until it is applied
    T* u = row_u.data();
    for (int64_t r = r0; r < r1; ++r) {
      double acc[4] = {0, 0, 0, 0};
      const int64_t base = r * len;
      blocked_sums<T>(base, base + len, acc, [&](int64_t j, T& gp, T& gg, T& pp, T& pu) {
        T gj, uj;
        moments(j, gj, uj);
        const T pj = up<T>(p[j]);
        gp = madd(gj, pj, gp);  // FMA in the sums only (see madd)
        gg = madd(gj, gj, gg);
        pp = madd(pj, pj, pp);
        pu = madd(pj, uj, pu);
        if (MODE == kSpec) p[j] = static_cast<P>(pj * decay - step * uj);
        if (MODE == kSpecChannel) u[j - base] = uj;
      });
      if constexpr (MODE == kSpecChannel) {  // the same expression as pass 2's, with this row's coefficient
        const T c = row_coef<T>(stats_double, acc, s.eps);
        spec_coef[r] = c;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
          const T pj = up<T>(p[base + k]);
          p[base + k] = static_cast<P>(pj * decay - step * (u[k] - pj * c));
        }
      }
      sums->add(r, acc);
    }
  });
}

// Rows whose decided (coefficient, decay) equal what a speculating pass 1 applied need no repair.
template <typename T>
bool guessed_right(int repair, T c, T d, const T* spec_coef, int64_t r, T d_spec) {
  return d == d_spec && c == (repair == kRepairChannel ? spec_coef[r] : T(0));
}

// Pass 2: apply the decision (kApply), or repair the rows of a speculating pass 1 that guessed wrong. Returns the
// rows written.
template <typename P, typename T, bool NEST, int REPAIR>
int64_t adam_pass2_impl(const P* g, P* p, const T* m, const T* v, const T* coef, const T* spec_coef, int64_t rows,
                        int64_t len, const AdamScalars& s, double decay_slot) {
  const T d = decay_slot, d_spec = s.decay;
  if (REPAIR != kApply) {
    bool all_right = true;
    for (int64_t r = 0; r < rows && all_right; ++r) all_right = guessed_right<T>(REPAIR, coef[r], d, spec_coef, r, d_spec);
    if (all_right) return 0;  // no parallel region at all
  }
  std::vector<char> touched(rows, 0);
  for_rows(rows, len, [&](int64_t r0, int64_t r1) {
    const T b1 = s.beta1, ob1 = 1 - s.beta1, eps = s.eps_s, step = s.step, sign = s.maximize ? -1 : 1;
    for (int64_t r = r0; r < r1; ++r) {
      const T c = coef[r];
      if (REPAIR != kApply && guessed_right<T>(REPAIR, c, d, spec_coef, r, d_spec)) continue;
      touched[r] = 1;
      // the old weight was p_spec = p_old * (d_spec + step * c_spec) - step * u
      const double undo = static_cast<double>(d_spec) +
                          (REPAIR == kRepairChannel ? static_cast<double>(step) * spec_coef[r] : 0.0);
#pragma omp simd
      for (int64_t j = r * len; j < (r + 1) * len; ++j) {
        const T mj = m[j];
        const T num = NEST ? b1 * mj + ob1 * (sign * up<T>(g[j])) : mj;
        const T uj = num / (std::sqrt(v[j]) + eps);
        if constexpr (REPAIR != kApply) {  // in double: the only error left is the rounding of the speculated weight
          const double pj = (static_cast<double>(p[j]) + static_cast<double>(step) * uj) / undo;
          p[j] = static_cast<P>(pj * d - static_cast<double>(step) * (uj - pj * c));
        } else {
          const T pj = up<T>(p[j]);
          p[j] = static_cast<P>(pj * d - step * (uj - pj * c));
        }
      }
    }
  });
  int64_t count = 0;
  for (char t : touched) count += t;
  return count;
}

// ------------------------------------------------------------------------------------------------ SGDP
template <typename P, typename T, int MODE, bool NEST>
void sgd_pass1_impl(const P* g, P* p, T* b, int64_t rows, int64_t len, const SgdScalars& s,
                    const StatsOut* sums, T* spec_coef, bool stats_double) {
  for_rows(rows, len, [&](int64_t r0, int64_t r1) {
    const T mu = s.momentum, damp1 = s.damp1, lr = s.lr, decay = s.decay, sign = s.maximize ? -1 : 1;
    auto momentum = [&](int64_t j, T& gj, T& dj) {
      gj = sign * up<T>(g[j]);
      const T bj = mu * b[j] + damp1 * gj;
      b[j] = bj;
      dj = NEST ? gj + mu * bj : bj;
    };
    if constexpr (MODE == kFull) {
      elementwise(r0 * len, r1 * len, [&](int64_t j) {
        T gj, dj;
        momentum(j, gj, dj);
        p[j] = static_cast<P>(up<T>(p[j]) * decay - lr * dj);
      });
      return;
    }
    std::vector<T> row_d(MODE == kSpecChannel ? len : 0);
    T* u = row_d.data();
    for (int64_t r = r0; r < r1; ++r) {
      double acc[4] = {0, 0, 0, 0};
      const int64_t base = r * len;
      blocked_sums<T>(base, base + len, acc, [&](int64_t j, T& gp, T& gg, T& pp, T& pu) {
        T gj, dj;
        momentum(j, gj, dj);
        const T pj = up<T>(p[j]);
        gp = madd(gj, pj, gp);  // FMA in the sums only (see madd)
        gg = madd(gj, gj, gg);
        pp = madd(pj, pj, pp);
        pu = madd(pj, dj, pu);
        if (MODE == kSpec) p[j] = static_cast<P>(pj * decay - lr * dj);
        if (MODE == kSpecChannel) u[j - base] = dj;
      });
      if constexpr (MODE == kSpecChannel) {  // pass 2's expression; without Nesterov the buffer takes the projection
        const T c = row_coef<T>(stats_double, acc, s.eps);
        spec_coef[r] = c;
        auto apply = [&](auto write_buf) {  // the branch hoisted out of the loop, so that it vectorises
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) {
            const T pj = up<T>(p[base + k]);
            const T dp = u[k] - pj * c;
            if constexpr (decltype(write_buf)::value) b[base + k] = dp;
            p[base + k] = static_cast<P>(pj * decay - lr * dp);
          }
        };
        if (!NEST && c != 0) apply(std::true_type{});
        else apply(std::false_type{});
      }
      sums->add(r, acc);
    }
  });
}

// Without Nesterov the update is the momentum buffer itself, and (as in the reference) the projected update
// is written back into it; a repair also restores the un-projected buffer where the guess projected wrongly.
template <typename P, typename T, bool NEST, int REPAIR>
int64_t sgd_pass2_impl(const P* g, P* p, T* b, const T* coef, const T* spec_coef, int64_t rows, int64_t len,
                       const SgdScalars& s, double decay_slot) {
  const T d = decay_slot, d_spec = s.decay;
  if (REPAIR != kApply) {
    bool all_right = true;
    for (int64_t r = 0; r < rows && all_right; ++r) all_right = guessed_right<T>(REPAIR, coef[r], d, spec_coef, r, d_spec);
    if (all_right) return 0;
  }
  std::vector<char> touched(rows, 0);
  for_rows(rows, len, [&](int64_t r0, int64_t r1) {
    const T mu = s.momentum, lr = s.lr, sign = s.maximize ? -1 : 1;
    for (int64_t r = r0; r < r1; ++r) {
      const T c = coef[r];
      if (REPAIR != kApply && guessed_right<T>(REPAIR, c, d, spec_coef, r, d_spec)) continue;
      touched[r] = 1;
      const double cs = REPAIR == kRepairChannel ? static_cast<double>(spec_coef[r]) : 0.0;
      const bool write_buf = !NEST && (c != 0 || cs != 0);
#pragma omp simd
      for (int64_t j = r * len; j < (r + 1) * len; ++j) {
        const T bj = b[j];
        const T dj = NEST ? sign * up<T>(g[j]) + mu * bj : bj;
        if constexpr (REPAIR != kApply) {  // in double, as for AdamP
          // p_spec = p_old * d_spec - lr * (d_old - p_old * cs); without Nesterov b holds d_old - p_old * cs
          double pj, d_old;
          if (NEST) {
            pj = (static_cast<double>(p[j]) + static_cast<double>(lr) * dj) / (d_spec + static_cast<double>(lr) * cs);
            d_old = dj;
          } else {
            pj = (static_cast<double>(p[j]) + static_cast<double>(lr) * bj) / d_spec;
            d_old = bj + pj * cs;
          }
          const double dp = d_old - pj * c;
          if (write_buf) b[j] = static_cast<T>(c != 0 ? dp : d_old);
          p[j] = static_cast<P>(pj * d - static_cast<double>(lr) * dp);
        } else {
          const T pj = up<T>(p[j]);
          const T dp = dj - pj * c;
          if (write_buf) b[j] = dp;
          p[j] = static_cast<P>(pj * d - lr * dp);
        }
      }
    }
  });
  int64_t count = 0;
  for (char t : touched) count += t;
  return count;
}

// ------------------------------------------------------------------------------------------------ dispatch
void check_run(const torch::Tensor& t, int64_t start, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "hf_adamp fused: ", what, " must be on the CPU");
  TORCH_CHECK(start >= 0 && start + n <= t.numel(), "hf_adamp fused: run out of range of ", what);
}

// The tensors of one parameter are addressed as flat storage from data_ptr: they must share the parameter's
// dense layout, with the first dimension outermost (rows are contiguous), as hf_adamp.optim._base.flat needs.
void check_tensors(std::initializer_list<const torch::Tensor*> tensors, const torch::Tensor& param, int64_t start,
                   int64_t n) {
  TORCH_CHECK(param.is_non_overlapping_and_dense(), "hf_adamp fused: the parameter is not dense");
  TORCH_CHECK(param.dim() <= 1 || param.stride(0) * param.size(0) == param.numel(),
              "hf_adamp fused: the parameter's first dimension is not outermost");
  for (const auto* t : tensors) {
    check_run(*t, start, n, "a tensor");
    TORCH_CHECK(t->sizes() == param.sizes() && t->strides() == param.strides(),
                "hf_adamp fused: gradient or state laid out unlike the parameter");
  }
}

// Calls fn with the parameter type P and the state type T of a (param, state) pair.
template <typename F>
void dispatch(const torch::Tensor& param, const torch::Tensor& state, const F& fn) {
  const auto st = state.scalar_type();
  switch (param.scalar_type()) {
    case at::kFloat:
      TORCH_CHECK(st == at::kFloat, "hf_adamp fused: fp32 parameters need fp32 state");
      return fn(float{}, float{});
    case at::kDouble:
      TORCH_CHECK(st == at::kDouble, "hf_adamp fused: fp64 parameters need fp64 state");
      return fn(double{}, double{});
    case at::kHalf:
      TORCH_CHECK(st == at::kFloat, "hf_adamp fused: fp16 parameters need fp32 state");
      return fn(c10::Half{}, float{});
    case at::kBFloat16:
      TORCH_CHECK(st == at::kFloat, "hf_adamp fused: bf16 parameters need fp32 state");
      return fn(c10::BFloat16{}, float{});
    default:
      TORCH_CHECK(false, "hf_adamp fused: unsupported parameter dtype ", param.scalar_type());
  }
}

// Calls fn(mode, nesterov) with both as compile-time constants; pass-1 modes 0-3, pass-2 modes 0-2.
template <int N, typename F>
void with_mode(int64_t mode, bool nesterov, const F& fn) {
  auto nest = [&](auto mode_c) { nesterov ? fn(mode_c, std::true_type{}) : fn(mode_c, std::false_type{}); };
  TORCH_CHECK(mode >= 0 && mode < N, "hf_adamp fused: unknown mode ", mode);
  switch (mode) {
    case 0: return nest(std::integral_constant<int, 0>{});
    case 1: return nest(std::integral_constant<int, 1>{});
    case 2: return nest(std::integral_constant<int, 2>{});
    default:
      if constexpr (N > 3) return nest(std::integral_constant<int, 3>{});
  }
}

// The rows [stat_row, stat_row + rows) of a per-row tensor (coef, spec_coef) in the state dtype.
template <typename T>
T* row_ptr(const torch::Tensor& t, int64_t stat_row, int64_t rows, const torch::Tensor& state, const char* what) {
  TORCH_CHECK(t.scalar_type() == state.scalar_type(), "hf_adamp fused: ", what, " dtype differs from the state");
  TORCH_CHECK(t.is_contiguous(), "hf_adamp fused: ", what, " is not contiguous");
  check_run(t, stat_row, rows, what);
  return t.data_ptr<T>() + stat_row;
}

// A run is the elements [start, start + rows * len) of the tensors' storage, viewed as (rows, len). spec_coef is
// a per-stats-row buffer (state dtype) that kSpecChannel fills; decay is what full and speculating runs apply.
void adam_first(torch::Tensor grad, torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                int64_t start, int64_t rows, int64_t len, int64_t mode, torch::Tensor stats, int64_t stat_row,
                torch::Tensor spec_coef, double beta1, double beta2, double eps_s, double step, double decay,
                double eps, bool nesterov, bool maximize) {
  const int64_t n = rows * len;
  check_tensors({&grad, &param, &exp_avg, &exp_avg_sq}, param, start, n);
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "hf_adamp fused: gradient dtype differs from parameter");
  const AdamScalars s{beta1, beta2, eps_s, step, decay, eps, nesterov, maximize};
  const bool stats_double = stats.scalar_type() == at::kDouble;
  const StatsOut sums = mode == kFull ? StatsOut{} : stats_out(stats, stat_row, rows);
  dispatch(param, exp_avg, [&](auto p0, auto t0) {
    using P = decltype(p0);
    using T = decltype(t0);
    const P* g = grad.data_ptr<P>() + start;
    P* p = param.data_ptr<P>() + start;
    T* m = exp_avg.data_ptr<T>() + start;
    T* v = exp_avg_sq.data_ptr<T>() + start;
    T* sc = mode == kSpecChannel ? row_ptr<T>(spec_coef, stat_row, rows, exp_avg, "spec_coef") : nullptr;
    with_mode<4>(mode, nesterov, [&](auto mode_c, auto nest_c) {
      constexpr int M = decltype(mode_c)::value;
      constexpr bool NEST = decltype(nest_c)::value;
      if constexpr (M == kFull) {  // element-wise: split the elements, not the rows
        at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
          adam_pass1_impl<P, T, M, NEST>(g + a, p + a, m + a, v + a, 1, b - a, s, nullptr, nullptr, false);
        });
      } else {
        adam_pass1_impl<P, T, M, NEST>(g, p, m, v, rows, len, s, &sums, sc, stats_double);
      }
    });
  });
}

// decay_spec is what a speculating pass 1 applied (rounded here like the decay tensor, to compare with it).
int64_t adam_second(torch::Tensor grad, torch::Tensor param, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                    int64_t start, int64_t rows, int64_t len, int64_t repair, torch::Tensor coef, int64_t stat_row,
                    torch::Tensor spec_coef, torch::Tensor decay, int64_t slot, double beta1, double eps_s,
                    double step, double decay_spec, bool nesterov, bool maximize) {
  const int64_t n = rows * len;
  check_tensors({&grad, &param, &exp_avg, &exp_avg_sq}, param, start, n);
  double spec_rounded = 0;
  const double d = read_scalar(decay, slot, &spec_rounded, decay_spec);
  const AdamScalars s{beta1, 0, eps_s, step, spec_rounded, 0, nesterov, maximize};
  int64_t count = 0;
  dispatch(param, exp_avg, [&](auto p0, auto t0) {
    using P = decltype(p0);
    using T = decltype(t0);
    const P* g = grad.data_ptr<P>() + start;
    P* p = param.data_ptr<P>() + start;
    const T* m = exp_avg.data_ptr<T>() + start;
    const T* v = exp_avg_sq.data_ptr<T>() + start;
    const T* c = row_ptr<T>(coef, stat_row, rows, exp_avg, "coef");
    const T* sc = repair == kRepairChannel ? row_ptr<T>(spec_coef, stat_row, rows, exp_avg, "spec_coef") : nullptr;
    with_mode<3>(repair, nesterov, [&](auto mode_c, auto nest_c) {
      count = adam_pass2_impl<P, T, decltype(nest_c)::value, decltype(mode_c)::value>(g, p, m, v, c, sc, rows, len,
                                                                                          s, d);
    });
  });
  return count;
}

void sgd_first(torch::Tensor grad, torch::Tensor param, torch::Tensor momentum_buffer, int64_t start, int64_t rows,
               int64_t len, int64_t mode, torch::Tensor stats, int64_t stat_row, torch::Tensor spec_coef,
               double momentum, double dampening, double lr, double decay, double eps, bool nesterov, bool maximize) {
  const int64_t n = rows * len;
  check_tensors({&grad, &param, &momentum_buffer}, param, start, n);
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "hf_adamp fused: gradient dtype differs from parameter");
  const SgdScalars s{momentum, 1 - dampening, lr, decay, eps, nesterov, maximize};
  const bool stats_double = stats.scalar_type() == at::kDouble;
  const StatsOut sums = mode == kFull ? StatsOut{} : stats_out(stats, stat_row, rows);
  dispatch(param, momentum_buffer, [&](auto p0, auto t0) {
    using P = decltype(p0);
    using T = decltype(t0);
    const P* g = grad.data_ptr<P>() + start;
    P* p = param.data_ptr<P>() + start;
    T* b = momentum_buffer.data_ptr<T>() + start;
    T* sc = mode == kSpecChannel ? row_ptr<T>(spec_coef, stat_row, rows, momentum_buffer, "spec_coef") : nullptr;
    with_mode<4>(mode, nesterov, [&](auto mode_c, auto nest_c) {
      constexpr int M = decltype(mode_c)::value;
      constexpr bool NEST = decltype(nest_c)::value;
      if constexpr (M == kFull) {
        at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t c) {
          sgd_pass1_impl<P, T, M, NEST>(g + a, p + a, b + a, 1, c - a, s, nullptr, nullptr, false);
        });
      } else {
        sgd_pass1_impl<P, T, M, NEST>(g, p, b, rows, len, s, &sums, sc, stats_double);
      }
    });
  });
}

int64_t sgd_second(torch::Tensor grad, torch::Tensor param, torch::Tensor momentum_buffer, int64_t start,
                   int64_t rows, int64_t len, int64_t repair, torch::Tensor coef, int64_t stat_row,
                   torch::Tensor spec_coef, torch::Tensor decay, int64_t slot, double momentum, double lr,
                   double decay_spec, bool nesterov, bool maximize) {
  const int64_t n = rows * len;
  check_tensors({&grad, &param, &momentum_buffer}, param, start, n);
  double spec_rounded = 0;
  const double d = read_scalar(decay, slot, &spec_rounded, decay_spec);
  const SgdScalars s{momentum, 0, lr, spec_rounded, 0, nesterov, maximize};
  int64_t count = 0;
  dispatch(param, momentum_buffer, [&](auto p0, auto t0) {
    using P = decltype(p0);
    using T = decltype(t0);
    const P* g = grad.data_ptr<P>() + start;
    P* p = param.data_ptr<P>() + start;
    T* b = momentum_buffer.data_ptr<T>() + start;
    const T* c = row_ptr<T>(coef, stat_row, rows, momentum_buffer, "coef");
    const T* sc =
        repair == kRepairChannel ? row_ptr<T>(spec_coef, stat_row, rows, momentum_buffer, "spec_coef") : nullptr;
    with_mode<3>(repair, nesterov, [&](auto mode_c, auto nest_c) {
      count = sgd_pass2_impl<P, T, decltype(nest_c)::value, decltype(mode_c)::value>(g, p, b, c, sc, rows, len, s,
                                                                                         d);
    });
  });
  return count;
}

// ------------------------------------------------------------------------------------------------ decision
// projection.decide for a CPU stats buffer, in one sequential pass instead of a dozen tensor ops (its cost is
// per row, and at GPT-2 shapes the ops' overhead was a tenth of the step). Same maths and dtype S; layer sums
// are accumulated in double. Square roots are IEEE here, so the channel coefficients are exactly the ones a
// speculating pass 1 computes (channel_coef).
template <typename S>
void decide_impl(const S* stats, int64_t stride, const int64_t* counts, const double* row_len, const double* numel,
                 const double* delta, const double* eps, int64_t slots, S* coef, bool* projected, int8_t* kind,
                 S* weight_norm) {
  const S* gp = stats;
  const S* gg = stats + stride;
  const S* pp = stats + 2 * stride;
  const S* pu = stats + 3 * stride;
  int64_t r0 = 0;
  for (int64_t k = 0; k < slots; ++k) {
    const int64_t r1 = r0 + counts[k];
    const S e = static_cast<S>(eps[k]);
    S cos_max = -1;
    bool nan = false;  // a NaN cosine fails the test, as torch's amax would make it
    double l_gp = 0, l_gg = 0, l_pp = 0, l_pu = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const S cos = std::abs(gp[r]) / (std::max(std::sqrt(gg[r]), e) * std::max(std::sqrt(pp[r]), e));
      nan |= std::isnan(cos);
      cos_max = std::max(cos_max, cos);
      l_gp += gp[r], l_gg += gg[r], l_pp += pp[r], l_pu += pu[r];
    }
    // slots without rows (1-D parameters listed in a layout) are never projected
    const bool channel =
        counts[k] > 0 && !nan && cos_max < static_cast<S>(delta[k]) / std::sqrt(static_cast<S>(row_len[k]));
    const S lgp = static_cast<S>(l_gp), lgg = static_cast<S>(l_gg), lpp = static_cast<S>(l_pp);
    const S l_norm = std::sqrt(lpp);
    const S layer_cos = std::abs(lgp) / (std::max(std::sqrt(lgg), e) * std::max(l_norm, e));
    const bool layer = !channel && counts[k] > 0 &&
                       layer_cos < static_cast<S>(delta[k]) / std::sqrt(static_cast<S>(numel[k]));
    const S l_den = l_norm + e;
    const S l_coef = static_cast<S>(l_pu) / (l_den * l_den);
    for (int64_t r = r0; r < r1; ++r) {
      if (channel) {
        const S den = std::sqrt(pp[r]) + e;
        coef[r] = pu[r] / (den * den);
      } else {
        coef[r] = layer ? l_coef : S(0);
      }
    }
    projected[k] = channel || layer;
    kind[k] = channel ? 1 : layer ? 2 : 0;
    weight_norm[k] = l_norm;
    r0 = r1;
  }
}

std::vector<torch::Tensor> decide(torch::Tensor stats, torch::Tensor counts, torch::Tensor row_len,
                                  torch::Tensor numel, torch::Tensor delta, torch::Tensor eps) {
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 2 && stats.size(0) == 4 && stats.stride(1) == 1,
              "hf_adamp decide: stats must be a (4, rows) CPU tensor with contiguous rows");
  const int64_t slots = counts.numel();
  for (const auto* t : {&row_len, &numel, &delta, &eps})
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->numel() == slots && t->is_contiguous(),
                "hf_adamp decide: per-slot arguments must be contiguous float64 tensors of one length");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous(), "hf_adamp decide: counts must be int64");
  TORCH_CHECK(counts.sum().item<int64_t>() == stats.size(1), "hf_adamp decide: row counts do not add up to the rows");
  auto coef = torch::empty({stats.size(1)}, stats.options());
  auto projected = torch::empty({slots}, stats.options().dtype(at::kBool));
  auto kind = torch::empty({slots}, stats.options().dtype(at::kChar));
  auto weight_norm = torch::empty({slots}, stats.options());
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "hf_adamp_decide", [&] {
    decide_impl<scalar_t>(stats.data_ptr<scalar_t>(), stats.stride(0), counts.data_ptr<int64_t>(),
                          row_len.data_ptr<double>(), numel.data_ptr<double>(), delta.data_ptr<double>(),
                          eps.data_ptr<double>(), slots, coef.data_ptr<scalar_t>(), projected.data_ptr<bool>(),
                          kind.data_ptr<int8_t>(), weight_norm.data_ptr<scalar_t>());
  });
  return {coef, projected, kind, weight_norm};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_first", &adam_first, "AdamP pass 1: moments, row sums; finishes full/speculated runs");
  m.def("adam_second", &adam_second, "AdamP pass 2: projection, weight decay, step (or repair); rows written");
  m.def("sgd_first", &sgd_first, "SGDP pass 1: momentum, row sums; finishes full/speculated runs");
  m.def("sgd_second", &sgd_second, "SGDP pass 2: projection, weight decay, step (or repair); rows written");
  m.def("decide", &decide, "projection.decide on a CPU stats buffer: coef, projected, kind, weight_norm");
}

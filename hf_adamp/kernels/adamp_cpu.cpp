// Fused CPU kernels of the AdamP and SGDP steps (hf_adamp; the maths is hf_adamp/projection.py).
//
// A call steps all the runs of a step (pieces of flat tensors, each viewed as (rows, len)) in one parallel region,
// its work split evenly over the threads. Parameters are fp32/fp64/fp16/bf16; the state (moments) and all
// arithmetic are in T = float for fp32/fp16/bf16 parameters and double for fp64 ones.
//
// Pass 1 updates the moments and adds the four row sums g.p, g.g, p.p, p.u into a (4, total_rows) stats
// buffer. "full" runs (never projected) finish the step in that pass. Speculating runs also finish it, guessing
// the outcome from the previous step: "spec" as not projected, "spec_channel" as projected row by row (whole
// rows only: each row's coefficient is computed from its own sums exactly as projection.decide computes it, and
// written to spec_coef). When the guess is right, the result is bit-identical to the two-pass step. Pass 2
// applies the decided coefficient and weight decay, or, after a speculating pass 1, repairs only the rows whose
// decided (coefficient, decay) differ from the guessed ones, as a small correction of the guessed weight (an ulp or two
// of the weight's dtype, so speculation is only used for fp32/fp64 parameters).
//
// The file needs no torch headers: it is built with the system compiler alone into a plain shared library, whose
// extern "C" entry points (at the end) take raw pointers, sizes and dtype codes; hf_adamp/kernels/__init__.py
// loads it with ctypes and checks the tensors' layouts before each call. OpenMP is torch's own runtime (the
// library links libgomp.so.1, which resolves to the copy torch has already loaded), with the thread count passed in.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------------------ half precision
// fp16 and bf16 weights, converted to and from float with round-to-nearest-even (NaN becomes a quiet NaN), as
// torch rounds them.
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct BFloat16 {
  uint16_t x;
  BFloat16() = default;
  BFloat16(float f) {  // NOLINT: implicit, like the float it stands for
    const uint32_t u = float_bits(f);
    x = f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
  operator float() const { return bits_float(static_cast<uint32_t>(x) << 16); }
};

struct Half {
  uint16_t x;
  Half() = default;
  Half(float f) {  // NOLINT: implicit, like the float it stands for
    const uint32_t u = float_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFF;
    uint32_t h;
    if (a > 0x7F800000) {
      h = 0x7E00;  // NaN
    } else if (a >= 0x477FF000) {
      h = 0x7C00;  // rounds past the largest half (65504): infinity
    } else if (a >= 0x38800000) {  // a normal half: drop 13 mantissa bits, ties to even, rebias the exponent
      h = (a + 0xFFF + ((a >> 13) & 1) - (112u << 23)) >> 13;
    } else {  // a subnormal half: adding 0.5 puts its unit (2^-24) at the float's last bit, rounded by the FPU
      h = float_bits(bits_float(a) + 0.5f) - float_bits(0.5f);
    }
    x = static_cast<uint16_t>(sign | h);
  }
  operator float() const {
    const uint32_t sign = static_cast<uint32_t>(x & 0x8000) << 16, e = (x >> 10) & 0x1F, m = x & 0x3FF;
    if (e == 0x1F) return bits_float(sign | 0x7F800000 | (m << 13));
    if (e == 0) return bits_float(sign | float_bits(static_cast<float>(m) * 0x1p-24f));
    return bits_float(sign | ((e + 112) << 23) | (m << 13));
  }
};

// An error to report through the C entry points (every check runs before the parallel region).
template <typename... A>
void check(bool ok, const A&... parts) {
  if (ok) return;
  std::ostringstream msg;
  msg << "hf_adamp fused: ";
  (msg << ... << parts);
  throw std::invalid_argument(msg.str());
}

// Elements per block of the row sums (see blocked_sums).
constexpr int64_t kBlock = 1024;
// Elements of work per thread below which fewer threads are used.
constexpr int64_t kGrain = 1 << 15;

// The tables shared with Python are declared as lists (enumerator, name), from which both the enums and the text
// that hf_adamp_layout() exports are made; the loader compares that text with hf_adamp/kernels/tables.py.
#define HF_ADAMP_ENUM(enumerator, name) enumerator,
#define HF_ADAMP_TEXT(enumerator, name) +std::string(#name "=") + std::to_string(static_cast<int>(enumerator)) + ","

// Pass 1 modes of a run.
#define HF_ADAMP_PASS1(X) X(kFirst, first) X(kFull, full) X(kSpec, spec) X(kSpecChannel, spec_channel)
enum Pass1 { HF_ADAMP_PASS1(HF_ADAMP_ENUM) };
// Pass 2: apply the decision, or repair a pass 1 that speculated (kSpec / kSpecChannel).
#define HF_ADAMP_PASS2(X) X(kApply, apply) X(kRepair, repair) X(kRepairChannel, repair_channel)
enum Pass2 { HF_ADAMP_PASS2(HF_ADAMP_ENUM) };

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
inline double up<double, Half>(Half x) { return static_cast<float>(x); }
template <>
inline double up<double, BFloat16>(BFloat16 x) { return static_cast<float>(x); }

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

// The coefficient a channel guess applies. A non-finite one (a NaN/Inf gradient or weight element in the row)
// fails the decision's cosine test, so the guess takes the row as unprojected: applied, it would spread the one
// bad element over the whole row, and the repair (from a NaN factor) could not undo it.
template <typename T>
inline T guessed_coef(bool stats_double, const double* acc, double eps) {
  const T c = row_coef<T>(stats_double, acc, eps);
  return std::isfinite(c) ? c : T(0);
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

// The sum of L lanes by halving (vector adds, then a few scalar ones), in T.
template <typename T, int L>
inline double lane_sum(T* a) {
  for (int w = L / 2; w > 0; w /= 2) {
#pragma omp simd
    for (int l = 0; l < w; ++l) a[l] += a[l + w];
  }
  return a[0];
}

// Row sums of elem(j, o, gp, gg, pp, pu) over [lo, hi) (o: j's offset in its block), added into out[4].
// Accumulates in A over blocks of kBlock with per-lane accumulators (vectorises without reassociation flags), then
// in double across blocks, so long rows keep double-like accuracy. The lanes are summed by halving: a lane-by-lane
// scalar sum cost a fifth of the whole pass on rows of 768. A float block whose sums are not finite (products
// overflow at |g| or |p| ~ 1e19, where the reference's normalised sums do not) is summed again by
// redo(j, o, gp, gg, pp, pu) with double products; doing so for every block made the whole step 10-25 % slower.
template <typename A, typename F, typename R>
inline void blocked_sums(int64_t lo, int64_t hi, double* out, const F& elem, const R& redo) {
  constexpr int L = 64 / sizeof(A);  // lanes: two AVX2 vectors
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t be = std::min(hi, b0 + kBlock);
    A a0[L] = {}, a1[L] = {}, a2[L] = {}, a3[L] = {};
    int64_t j = b0;
    for (; j + L <= be; j += L) {
#pragma omp simd
      for (int l = 0; l < L; ++l) elem(j + l, j + l - b0, a0[l], a1[l], a2[l], a3[l]);
    }
    for (; j < be; ++j) elem(j, j - b0, a0[0], a1[0], a2[0], a3[0]);
    double block[4] = {lane_sum<A, L>(a0), lane_sum<A, L>(a1), lane_sum<A, L>(a2), lane_sum<A, L>(a3)};
    if constexpr (!std::is_same_v<A, double>) {
      if (!(std::isfinite(block[0]) && std::isfinite(block[1]) && std::isfinite(block[2]) &&
            std::isfinite(block[3]))) {
        std::fill(block, block + 4, 0.0);
        blocked_sums<double>(b0, be, block, redo, redo);
      }
    }
    for (int k = 0; k < 4; ++k) out[k] += block[k];
  }
}

// One element's terms of the row sums, added in A: g.p, g.g, p.p and p.u (FMA in the sums only, see madd).
template <typename A, typename T>
inline void add_terms(T gj, T pj, T uj, A& gp, A& gg, A& pp, A& pu) {
  gp = madd<A>(gj, pj, gp);
  gg = madd<A>(gj, gj, gg);
  pp = madd<A>(pj, pj, pp);
  pu = madd<A>(pj, uj, pu);
}

// Element-wise loop over [lo, hi) (no sums).
template <typename F>
inline void elementwise(int64_t lo, int64_t hi, const F& elem) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) elem(j);
}

// ------------------------------------------------------------------------------------------------ AdamP
// The impl functions step rows [r0, r1) of one run (pointers at the run's first element) on the calling thread.
// Pass 1. spec_coef (kSpecChannel only) receives each row's guessed coefficient; stats_double says whether the
// stats buffer (and so projection.decide) works in double; u is a row of scratch (kSpecChannel only).
template <typename P, typename T, int MODE, bool NEST>
void adam_pass1_rows(const P* g, P* p, T* m, T* v, int64_t r0, int64_t r1, int64_t len, const AdamScalars& s,
                     const StatsOut& sums, T* spec_coef, bool stats_double, T* u) {
  // locals, not members: the compiler keeps them in registers (a reference might alias m or p)
  const T b1 = s.beta1, b2 = s.beta2, ob1 = 1 - s.beta1, ob2 = 1 - s.beta2, eps = s.eps_s, step = s.step;
  const T decay = s.decay, sign = s.maximize ? -1 : 1;
  auto grad = [&](int64_t j) -> T { return sign * up<T>(g[j]); };
  auto direction = [&](T gj, T mj, T vj) -> T { return (NEST ? b1 * mj + ob1 * gj : mj) / (std::sqrt(vj) + eps); };
  auto moments = [&](int64_t j, T& gj, T& uj) {
    gj = grad(j);
    const T mj = b1 * m[j] + ob1 * gj;
    const T vj = b2 * v[j] + ob2 * gj * gj;
    m[j] = mj;
    v[j] = vj;
    uj = direction(gj, mj, vj);
  };
  if constexpr (MODE == kFull) {
    elementwise(r0 * len, r1 * len, [&](int64_t j) {
      T gj, uj;
      moments(j, gj, uj);
      p[j] = static_cast<P>(up<T>(p[j]) * decay - step * uj);
    });
    return;
  }
  P p_old[MODE == kSpec ? kBlock : 1];  // kSpec writes p as it sums: the block's old weights, for redo_terms
  for (int64_t r = r0; r < r1; ++r) {
    double acc[4] = {0, 0, 0, 0};
    const int64_t base = r * len;
    auto terms = [&](int64_t j, int64_t o, auto& gp, auto& gg, auto& pp, auto& pu) {
      T gj, uj;
      moments(j, gj, uj);
      const T pj = up<T>(p[j]);
      add_terms(gj, pj, uj, gp, gg, pp, pu);
      if (MODE == kSpec) p_old[o] = p[j], p[j] = static_cast<P>(pj * decay - step * uj);
      if (MODE == kSpecChannel) u[j - base] = uj;
    };
    // the same terms in double, from the state (m and v are already updated) and the old weights
    auto redo_terms = [&](int64_t j, int64_t o, double& gp, double& gg, double& pp, double& pu) {
      const T gj = grad(j), uj = direction(gj, m[j], v[j]), pj = up<T>(MODE == kSpec ? p_old[o] : p[j]);
      add_terms(gj, pj, uj, gp, gg, pp, pu);
    };
    blocked_sums<T>(base, base + len, acc, terms, redo_terms);
    if constexpr (MODE == kSpecChannel) {  // the same expression as pass 2's, with this row's coefficient
      const T c = guessed_coef<T>(stats_double, acc, s.eps);
      spec_coef[r] = c;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) {
        const T pj = up<T>(p[base + k]);
        p[base + k] = static_cast<P>(pj * decay - step * (c == 0 ? u[k] : u[k] - pj * c));
      }
    }
    sums.add(r, acc);
  }
}

// Rows whose decided (coefficient, decay) equal what a speculating pass 1 applied need no repair.
template <typename T>
bool guessed_right(int repair, T c, T d, const T* spec_coef, int64_t r, T d_spec) {
  return d == d_spec && c == (repair == kRepairChannel ? spec_coef[r] : T(0));
}

// Pass 2: apply the decision (kApply), or repair the rows of a speculating pass 1 that guessed wrong. Returns the
// rows written.
//
// A repair turns the speculated weight p_s = p_old * a_s - step * u into p_old * a - step * u, where a_s and a are
// the speculated and decided factors (decay + step * coefficient). With x = p_s + step * u (= p_old * a_s) that is
// p_s + k * x, k = (a - a_s) / a_s, computed once per row in double. The correction k * x is small beside p_s
// (k is of the order of lr), so working in T adds almost nothing to the rounding that p_s itself already holds,
// and the loop stays as cheap as kApply's (recovering p_old in double per element made it compute-bound).
template <typename P, typename T, bool NEST, int REPAIR>
int64_t adam_pass2_rows(const P* g, P* p, const T* m, const T* v, const T* coef, const T* spec_coef, int64_t r0,
                        int64_t r1, int64_t len, const AdamScalars& s, double decay_slot) {
  const T d = decay_slot, d_spec = s.decay;
  const T b1 = s.beta1, ob1 = 1 - s.beta1, eps = s.eps_s, step = s.step, sign = s.maximize ? -1 : 1;
  int64_t count = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T c = coef[r];
    if (REPAIR != kApply && guessed_right<T>(REPAIR, c, d, spec_coef, r, d_spec)) continue;
    ++count;
    T k = 0;
    if constexpr (REPAIR != kApply) {
      const double cs = REPAIR == kRepairChannel ? static_cast<double>(spec_coef[r]) : 0.0;
      const double a_s = static_cast<double>(d_spec) + static_cast<double>(step) * cs;
      k = static_cast<T>((static_cast<double>(d) + static_cast<double>(step) * static_cast<double>(c) - a_s) / a_s);
    }
#pragma omp simd
    for (int64_t j = r * len; j < (r + 1) * len; ++j) {
      const T mj = m[j];
      const T num = NEST ? b1 * mj + ob1 * (sign * up<T>(g[j])) : mj;
      const T uj = num / (std::sqrt(v[j]) + eps);
      const T pj = up<T>(p[j]);
      if constexpr (REPAIR != kApply) {
        p[j] = static_cast<P>(std::isfinite(pj) ? pj + k * (pj + step * uj) : pj);
      } else {
        p[j] = static_cast<P>(pj * d - step * (c == 0 ? uj : uj - pj * c));
      }
    }
  }
  return count;
}

// ------------------------------------------------------------------------------------------------ SGDP
template <typename P, typename T, int MODE, bool NEST>
void sgd_pass1_rows(const P* g, P* p, T* b, int64_t r0, int64_t r1, int64_t len, const SgdScalars& s,
                    const StatsOut& sums, T* spec_coef, bool stats_double, T* u) {
  const T mu = s.momentum, damp1 = s.damp1, lr = s.lr, decay = s.decay, sign = s.maximize ? -1 : 1;
  // a one-pass channel guess without Nesterov writes the buffer once, in its second sweep (u holds it meanwhile)
  constexpr bool kBufferLater = MODE == kSpecChannel && !NEST;
  auto grad = [&](int64_t j) -> T { return sign * up<T>(g[j]); };
  auto direction = [&](T gj, T bj) -> T { return NEST ? gj + mu * bj : bj; };
  auto momentum = [&](int64_t j, T& gj, T& dj) {
    gj = grad(j);
    const T bj = mu * b[j] + damp1 * gj;
    if (!kBufferLater) b[j] = bj;
    dj = direction(gj, bj);
  };
  if constexpr (MODE == kFull) {
    elementwise(r0 * len, r1 * len, [&](int64_t j) {
      T gj, dj;
      momentum(j, gj, dj);
      p[j] = static_cast<P>(up<T>(p[j]) * decay - lr * dj);
    });
    return;
  }
  P p_old[MODE == kSpec ? kBlock : 1];  // kSpec writes p as it sums: the block's old weights, for redo_terms
  for (int64_t r = r0; r < r1; ++r) {
    double acc[4] = {0, 0, 0, 0};
    const int64_t base = r * len;
    auto terms = [&](int64_t j, int64_t o, auto& gp, auto& gg, auto& pp, auto& pu) {
      T gj, dj;
      momentum(j, gj, dj);
      const T pj = up<T>(p[j]);
      add_terms(gj, pj, dj, gp, gg, pp, pu);
      if (MODE == kSpec) p_old[o] = p[j], p[j] = static_cast<P>(pj * decay - lr * dj);
      if (MODE == kSpecChannel) u[j - base] = dj;
    };
    // the same terms in double, from the updated buffer (u holds it until written) and the old weights
    auto redo_terms = [&](int64_t j, int64_t o, double& gp, double& gg, double& pp, double& pu) {
      const T gj = grad(j), dj = kBufferLater ? u[j - base] : direction(gj, b[j]);
      const T pj = up<T>(MODE == kSpec ? p_old[o] : p[j]);
      add_terms(gj, pj, dj, gp, gg, pp, pu);
    };
    blocked_sums<T>(base, base + len, acc, terms, redo_terms);
    if constexpr (MODE == kSpecChannel) {  // pass 2's expression; without Nesterov the buffer takes the projection
      const T c = guessed_coef<T>(stats_double, acc, s.eps);
      spec_coef[r] = c;
      auto apply = [&](auto projected) {  // the branch hoisted out of the loop, so that it vectorises
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) {
          const T pj = up<T>(p[base + k]);
          const T dp = decltype(projected)::value ? u[k] - pj * c : u[k];
          if constexpr (kBufferLater) b[base + k] = dp;
          p[base + k] = static_cast<P>(pj * decay - lr * dp);
        }
      };
      if (c != 0) apply(std::true_type{});
      else apply(std::false_type{});
    }
    sums.add(r, acc);
  }
}

// Without Nesterov the update is the momentum buffer itself, and (as in the reference) the projected update
// is written back into it; a repair also restores the un-projected buffer where the guess projected wrongly.
// Repairs take adam_pass2_rows's form: p_s + k * x with x = p_old * a_s. With Nesterov, x = p_s + lr * (g + mu * b)
// and a = decay + lr * c. Without it, the buffer holds d - p_old * cs (d: the un-projected update), so
// x = p_s + lr * b, a_s = the decay alone, a = decay + lr * (c - cs), and the buffer becomes b + q * x with
// q = (cs - c) / a_s.
template <typename P, typename T, bool NEST, int REPAIR>
int64_t sgd_pass2_rows(const P* g, P* p, T* b, const T* coef, const T* spec_coef, int64_t r0, int64_t r1,
                       int64_t len, const SgdScalars& s, double decay_slot) {
  const T d = decay_slot, d_spec = s.decay;
  const T mu = s.momentum, lr = s.lr, sign = s.maximize ? -1 : 1;
  int64_t count = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T c = coef[r];
    if (REPAIR != kApply && guessed_right<T>(REPAIR, c, d, spec_coef, r, d_spec)) continue;
    ++count;
    const T cs = REPAIR == kRepairChannel ? spec_coef[r] : T(0);
    const bool write_buf = !NEST && (c != 0 || cs != 0);
    T k = 0, q = 0;
    if constexpr (REPAIR != kApply) {
      const double lr_d = lr, c_d = c, cs_d = cs;
      const double a_s = static_cast<double>(d_spec) + (NEST ? lr_d * cs_d : 0.0);
      const double a = static_cast<double>(d) + lr_d * (NEST ? c_d : c_d - cs_d);
      k = static_cast<T>((a - a_s) / a_s);
      q = static_cast<T>((cs_d - c_d) / a_s);
    }
    auto rows = [&](auto buffer) {  // the buffer's branch hoisted out of the loop, so that it vectorises
      constexpr bool kWrite = decltype(buffer)::value;
#pragma omp simd
      for (int64_t j = r * len; j < (r + 1) * len; ++j) {
        const T bj = b[j];
        const T dj = NEST ? sign * up<T>(g[j]) + mu * bj : bj;
        const T pj = up<T>(p[j]);
        if constexpr (REPAIR != kApply) {
          const T xj = pj + lr * dj;
          if (kWrite) b[j] = bj + q * xj;
          p[j] = static_cast<P>(std::isfinite(pj) ? pj + k * xj : pj);
        } else {
          const T dp = c == 0 ? dj : dj - pj * c;
          if (kWrite) b[j] = dp;
          p[j] = static_cast<P>(pj * d - lr * dp);
        }
      }
    };
    if (write_buf) rows(std::true_type{});
    else rows(std::false_type{});
  }
  return count;
}

// ------------------------------------------------------------------------------------------------ one step's runs
// A call steps all the runs of one state dtype in one parallel region. `tensors` holds, per tensor of the step,
// its gradient, parameter and state tensors (kPer of them); `runs` is an (R, 7) int64 table, one row per run:
// the tensor's index, the run's first element, rows, row length, mode, first stats row and slot; `scalars` is an
// (R, K) float64 table of the run's hyperparameters (AdamRow / SgdRow columns).
#define HF_ADAMP_RUN_COLS(X) \
  X(kItem, tensor) X(kStart, start) X(kRows, rows) X(kLen, row_len) X(kMode, mode) X(kStatRow, stat_row) X(kSlot, slot)
#define HF_ADAMP_ADAM_COLS(X)                                                                                 \
  X(kBeta1, beta1) X(kBeta2, beta2) X(kEpsS, eps_scaled) X(kStep, step_scaled) X(kDecay, decay) X(kEps, eps) \
      X(kNesterov, nesterov) X(kMaximize, maximize)
#define HF_ADAMP_SGD_COLS(X)                                                                                         \
  X(kMomentum, momentum) X(kDampening, dampening) X(kLr, lr) X(kSgdDecay, decay) X(kSgdEps, eps) \
      X(kSgdNesterov, nesterov) X(kSgdMaximize, maximize)
enum RunCol { HF_ADAMP_RUN_COLS(HF_ADAMP_ENUM) kRunCols };
enum AdamRow { HF_ADAMP_ADAM_COLS(HF_ADAMP_ENUM) kAdamCols };
enum SgdRow { HF_ADAMP_SGD_COLS(HF_ADAMP_ENUM) kSgdCols };

struct Task {
  int64_t run, lo, hi;  // rows [lo, hi) of the run; elements for element-wise (kFull) runs
};

// The runs' work split into one contiguous share per thread, cut at row boundaries (element-wise runs at
// elements, in multiples of 64), so that a whole step runs in one parallel region with balanced threads.
std::vector<std::vector<Task>> shares(const std::vector<int64_t>& units, const std::vector<int64_t>& unit_cost,
                                      const std::vector<char>& elementwise_run, int64_t threads) {
  int64_t total = 0;
  for (size_t i = 0; i < units.size(); ++i) total += units[i] * unit_cost[i];
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, total / kGrain));
  std::vector<std::vector<Task>> out(1);
  const int64_t per = (total + threads - 1) / threads;
  int64_t budget = per;
  for (size_t i = 0; i < units.size(); ++i) {
    int64_t lo = 0;
    while (lo < units[i]) {
      if (budget <= 0 && static_cast<int64_t>(out.size()) < threads) {
        out.emplace_back();
        budget = per;
      }
      int64_t take = (budget + unit_cost[i] - 1) / unit_cost[i];
      if (elementwise_run[i]) take = (take + 63) / 64 * 64;
      if (static_cast<int64_t>(out.size()) == threads) take = units[i];  // the last share takes the rest
      const int64_t hi = std::min(units[i], lo + std::max<int64_t>(take, 1));
      out.back().push_back(Task{static_cast<int64_t>(i), lo, hi});
      budget -= (hi - lo) * unit_cost[i];
      lo = hi;
    }
  }
  return out;
}

// Runs body(task) for every task, each share on its own thread.
template <typename F>
void run_shares(const std::vector<std::vector<Task>>& work, const F& body) {
  const int64_t n = static_cast<int64_t>(work.size());
  auto each = [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t)
      for (const Task& task : work[t]) body(task);
  };
  if (n <= 1) return each(0, n);
#pragma omp parallel for schedule(static, 1) num_threads(n)
  for (int64_t t = 0; t < n; ++t) each(t, t + 1);
}


// Dtype codes of the C entry points (hf_adamp/kernels/__init__.py: DTYPE_CODES).
#define HF_ADAMP_DTYPES(X) X(kF32, float32) X(kF64, float64) X(kF16, float16) X(kBF16, bfloat16)
enum DType { HF_ADAMP_DTYPES(HF_ADAMP_ENUM) };

// The state dtype of a parameter dtype: float for fp32/fp16/bf16, double for fp64; -1 for an unknown code.
int32_t state_dtype_of(int32_t param) {
  switch (param) {
    case kF32: case kF16: case kBF16: return kF32;
    case kF64: return kF64;
    default: return -1;
  }
}

// Calls fn with the parameter type P and the state type T of a parameter dtype (checked by batch()).
template <typename F>
void dispatch(int32_t param, const F& fn) {
  switch (param) {
    case kF32: return fn(float{}, float{});
    case kF64: return fn(double{}, double{});
    case kF16: return fn(Half{}, float{});
    default: return fn(BFloat16{}, float{});
  }
}

// Calls fn(mode, nesterov) with both as compile-time constants; pass-1 modes 0-3, pass-2 modes 0-2.
template <int N, typename F>
void with_mode(int64_t mode, bool nesterov, const F& fn) {
  auto nest = [&](auto mode_c) { nesterov ? fn(mode_c, std::true_type{}) : fn(mode_c, std::false_type{}); };
  switch (mode) {
    case 0: return nest(std::integral_constant<int, 0>{});
    case 1: return nest(std::integral_constant<int, 1>{});
    case 2: return nest(std::integral_constant<int, 2>{});
    default:
      if constexpr (N > 3) return nest(std::integral_constant<int, 3>{});
  }
}

// A flat buffer passed in: data, elements, dtype code.
struct Buf {
  void* data;
  int64_t numel;
  int32_t dtype;
};

// A per-stats-row vector (coef, spec_coef) in the state dtype, covering the run's stats rows.
void check_rows_buf(const Buf& t, int32_t state, int64_t rows, const char* what) {
  check(t.dtype == state, what, " must be a vector of the state dtype");
  check(t.numel >= rows, what, " does not cover the stats rows");
}

// What every call checks and derives from its tables before the parallel region (no check can fail inside it).
// `ptrs`, `numels` and `dtypes` describe, per tensor of the step, its gradient, parameter and state tensors (kPer
// of them; their layouts were checked by the caller).
struct Batch {
  void* const* ptrs;
  const int64_t* numels;
  const int32_t* dtypes;
  int64_t per;
  const int64_t* runs;
  const double* scalars;
  int64_t count, cols;
  const int64_t* run(int64_t i) const { return runs + i * kRunCols; }
  const double* row(int64_t i) const { return scalars + i * cols; }
  int64_t item(int64_t i) const { return run(i)[kItem] * per; }     // the run's first tensor
  void* const* item_ptrs(int64_t i) const { return ptrs + item(i); }
  int32_t param_dtype(int64_t i) const { return dtypes[item(i) + 1]; }
  int32_t state_dtype(int64_t i) const { return dtypes[item(i) + 2]; }
};

Batch batch(void* const* ptrs, const int64_t* numels, const int32_t* dtypes, int64_t n_tensors, int64_t per,
            const int64_t* runs, int64_t n_runs, const double* scalars, int64_t cols, int64_t want_cols, int modes) {
  check(n_tensors % per == 0, "tensors are not whole tensor sets");
  check(n_runs >= 0 && cols == want_cols, "scalars must be a (R, ", want_cols, ") float64 table");
  Batch b{ptrs, numels, dtypes, per, runs, scalars, n_runs, cols};
  const int64_t items = n_tensors / per;
  for (int64_t i = 0; i < b.count; ++i) {
    const int64_t* r = b.run(i);
    check(r[kItem] >= 0 && r[kItem] < items, "run ", i, " names no tensor");
    check(r[kRows] >= 0 && r[kLen] >= 0, "negative run shape");
    check(r[kMode] >= 0 && r[kMode] < modes, "unknown mode ", r[kMode]);
    const int64_t first = b.item(i), n = r[kRows] * r[kLen];
    const int32_t param = dtypes[first + 1], state = state_dtype_of(param);
    check(state >= 0, "unsupported parameter dtype code ", param);
    check(dtypes[first] == param, "gradient dtype differs from parameter");
    for (int64_t k = 2; k < per; ++k)
      check(dtypes[first + k] == state, param == kF64 ? "fp64 parameters need fp64 state"
                                                      : "fp32/fp16/bf16 parameters need fp32 state");
    for (int64_t k = 0; k < per; ++k)
      check(r[kStart] >= 0 && r[kStart] + n <= numels[first + k], "run out of range of a tensor");
  }
  return b;
}

template <typename T>
T* data_at(void* base, int64_t offset) {
  return static_cast<T*>(base) + offset;
}

// The element of `decay` (per slot) a run applies, and the pass-1 decay rounded like that tensor.
std::pair<double, double> slot_decay(const Buf& decay, int64_t slot, double spec) {
  check(slot >= 0 && slot < decay.numel, "slot out of range of decay");
  check(decay.dtype == kF32 || decay.dtype == kF64, "decay must be float32 or float64");
  if (decay.dtype == kF64) return {static_cast<const double*>(decay.data)[slot], spec};
  return {static_cast<double>(static_cast<const float*>(decay.data)[slot]), static_cast<double>(static_cast<float>(spec))};
}

// The (4, rows) float32/float64 stats buffer with contiguous rows: stride between its rows, and its rows.
struct StatsBuf {
  void* data;
  int32_t dtype;
  int64_t stride, rows;
};

StatsOut stats_out(const StatsBuf& stats, int64_t stat_row, int64_t rows) {
  check(stats.dtype == kF32 || stats.dtype == kF64, "stats must be float32 or float64");
  check(stat_row >= 0 && stat_row + rows <= stats.rows, "rows out of range of stats");
  return StatsOut{stats.data, stats.dtype == kF64, stats.stride, stat_row};
}

// Pass 1 of every run: moments, row sums into stats; full and speculating runs are finished.
template <typename Scalars, typename Step>
void first_pass(const Batch& b, const StatsBuf& stats, const Buf& spec_coef, const std::vector<Scalars>& scalars,
                int64_t threads, const Step& step) {
  std::vector<int64_t> units(b.count), cost(b.count);
  std::vector<char> elementwise_run(b.count);
  std::vector<StatsOut> sums(b.count);
  for (int64_t i = 0; i < b.count; ++i) {
    const int64_t* r = b.run(i);
    const bool full = r[kMode] == kFull;
    elementwise_run[i] = full;
    units[i] = full ? r[kRows] * r[kLen] : r[kRows];
    cost[i] = full ? 1 : std::max<int64_t>(r[kLen], 1);
    if (!full) sums[i] = stats_out(stats, r[kStatRow], r[kRows]);
    if (r[kMode] == kSpecChannel) check_rows_buf(spec_coef, b.state_dtype(i), r[kStatRow] + r[kRows], "spec_coef");
  }
  const bool stats_double = stats.dtype == kF64;
  run_shares(shares(units, cost, elementwise_run, threads), [&](const Task& task) {
    step(task, b.run(task.run), b.item_ptrs(task.run), b.param_dtype(task.run), scalars[task.run], sums[task.run],
         stats_double);
  });
}

// Pass 2 of every run: runs of a speculating pass 1 whose every row was guessed right are skipped whole. Adds
// the rows written per run to `written`.
template <typename Scalars, typename Step>
void second_pass(const Batch& b, const Buf& coef, const Buf& spec_coef, const Buf& decay,
                 std::vector<Scalars>& scalars, int64_t* written, int64_t threads, const Step& step) {
  std::vector<int64_t> units(b.count), cost(b.count);
  std::vector<char> elementwise_run(b.count, 0);
  std::vector<double> decays(b.count);
  for (int64_t i = 0; i < b.count; ++i) {
    const int64_t* r = b.run(i);
    check(r[kStatRow] >= 0, "a pass-2 run needs stats rows");
    check_rows_buf(coef, b.state_dtype(i), r[kStatRow] + r[kRows], "coef");
    if (r[kMode] == kRepairChannel) check_rows_buf(spec_coef, b.state_dtype(i), r[kStatRow] + r[kRows], "spec_coef");
    const auto decided = slot_decay(decay, r[kSlot], scalars[i].decay);
    const double d = decided.first, spec = decided.second;
    decays[i] = d;
    scalars[i].decay = spec;
    bool active = true;
    if (r[kMode] != kApply) {
      dispatch(b.param_dtype(i), [&](auto, auto t0) {
        using T = decltype(t0);
        const T* c = data_at<T>(coef.data, r[kStatRow]);
        const T* sc = r[kMode] == kRepairChannel ? data_at<T>(spec_coef.data, r[kStatRow]) : nullptr;
        active = false;
        for (int64_t k = 0; k < r[kRows] && !active; ++k)
          active = !guessed_right<T>(r[kMode], c[k], static_cast<T>(d), sc, k, static_cast<T>(spec));
      });
    }
    units[i] = active ? r[kRows] : 0;  // no work at all where the guess was right
    cost[i] = std::max<int64_t>(r[kLen], 1);
  }
  run_shares(shares(units, cost, elementwise_run, threads), [&](const Task& task) {
    const int64_t n = step(task, b.run(task.run), b.item_ptrs(task.run), b.param_dtype(task.run), scalars[task.run],
                           decays[task.run]);
    __atomic_fetch_add(&written[task.run], n, __ATOMIC_RELAXED);
  });
}

// What the entry points need of each optimizer: its scalars, tensors per parameter, and the row kernels.
struct AdamKernels {
  using Scalars = AdamScalars;
  static constexpr int64_t kPer = 4, kCols = kAdamCols;  // grad, param, exp_avg, exp_avg_sq
  static Scalars scalars(const double* x) {
    return Scalars{x[kBeta1], x[kBeta2], x[kEpsS], x[kStep], x[kDecay], x[kEps], x[kNesterov] != 0, x[kMaximize] != 0};
  }
  template <typename P, typename T, int M, bool NEST>
  static void pass1(void* const* t, int64_t at, int64_t lo, int64_t hi, int64_t len, const Scalars& s,
                    const StatsOut& sums, T* coef, bool stats_double, T* row) {
    adam_pass1_rows<P, T, M, NEST>(data_at<P>(t[0], at), data_at<P>(t[1], at), data_at<T>(t[2], at),
                                   data_at<T>(t[3], at), lo, hi, len, s, sums, coef, stats_double, row);
  }
  template <typename P, typename T, int R, bool NEST>
  static int64_t pass2(void* const* t, int64_t at, const T* coef, const T* spec_coef, int64_t lo, int64_t hi,
                       int64_t len, const Scalars& s, double decay) {
    return adam_pass2_rows<P, T, NEST, R>(data_at<P>(t[0], at), data_at<P>(t[1], at), data_at<T>(t[2], at),
                                          data_at<T>(t[3], at), coef, spec_coef, lo, hi, len, s, decay);
  }
};

struct SgdKernels {
  using Scalars = SgdScalars;
  static constexpr int64_t kPer = 3, kCols = kSgdCols;  // grad, param, momentum_buffer
  static Scalars scalars(const double* x) {
    return Scalars{x[kMomentum], 1 - x[kDampening], x[kLr], x[kSgdDecay], x[kSgdEps], x[kSgdNesterov] != 0,
                   x[kSgdMaximize] != 0};
  }
  template <typename P, typename T, int M, bool NEST>
  static void pass1(void* const* t, int64_t at, int64_t lo, int64_t hi, int64_t len, const Scalars& s,
                    const StatsOut& sums, T* coef, bool stats_double, T* row) {
    sgd_pass1_rows<P, T, M, NEST>(data_at<P>(t[0], at), data_at<P>(t[1], at), data_at<T>(t[2], at), lo, hi, len, s,
                                  sums, coef, stats_double, row);
  }
  template <typename P, typename T, int R, bool NEST>
  static int64_t pass2(void* const* t, int64_t at, const T* coef, const T* spec_coef, int64_t lo, int64_t hi,
                       int64_t len, const Scalars& s, double decay) {
    return sgd_pass2_rows<P, T, NEST, R>(data_at<P>(t[0], at), data_at<P>(t[1], at), data_at<T>(t[2], at), coef,
                                         spec_coef, lo, hi, len, s, decay);
  }
};

// Calls fn(P, T, mode, nesterov) for a run's parameter dtype and mode, all as compile-time types.
template <int Modes, typename F>
void for_run(int32_t param_dtype, int64_t mode, bool nesterov, const F& fn) {
  dispatch(param_dtype, [&](auto p0, auto t0) {
    with_mode<Modes>(mode, nesterov, [&](auto mode_c, auto nest_c) { fn(p0, t0, mode_c, nest_c); });
  });
}

template <typename K>
std::vector<typename K::Scalars> run_scalars(const Batch& b) {
  std::vector<typename K::Scalars> s(b.count);
  for (int64_t i = 0; i < b.count; ++i) s[i] = K::scalars(b.row(i));
  return s;
}

// Pass 1 over all runs. spec_coef is a per-stats-row buffer (state dtype) that kSpecChannel runs fill.
template <typename K>
void first(const Batch& b, const StatsBuf& stats, const Buf& spec_coef, int64_t threads) {
  first_pass(b, stats, spec_coef, run_scalars<K>(b), threads, [&](const Task& task, const int64_t* r,
                                                                  void* const* t, int32_t param_dtype,
                                                                  const typename K::Scalars& s, const StatsOut& sums,
                                                                  bool stats_double) {
    for_run<4>(param_dtype, r[kMode], s.nesterov, [&](auto p0, auto t0, auto mode_c, auto nest_c) {
      using P = decltype(p0);
      using T = decltype(t0);
      constexpr int M = decltype(mode_c)::value;
      constexpr bool NEST = decltype(nest_c)::value;
      if constexpr (M == kFull) {  // element-wise: the task's range is elements
        K::template pass1<P, T, M, NEST>(t, r[kStart], task.lo, task.hi, 1, s, sums, nullptr, false, nullptr);
      } else {
        std::vector<T> row(M == kSpecChannel ? r[kLen] : 0);  // the row's update, in cache until applied
        T* coef = M == kSpecChannel ? data_at<T>(spec_coef.data, r[kStatRow]) : nullptr;
        K::template pass1<P, T, M, NEST>(t, r[kStart], task.lo, task.hi, r[kLen], s, sums, coef, stats_double,
                                         row.data());
      }
    });
  });
}

// Pass 2 over all runs (mode: kApply, kRepair, kRepairChannel). Adds the rows written per run to `written`.
template <typename K>
void second(const Batch& b, const Buf& coef, const Buf& spec_coef, const Buf& decay, int64_t* written,
            int64_t threads) {
  auto s = run_scalars<K>(b);
  second_pass(b, coef, spec_coef, decay, s, written, threads, [&](const Task& task, const int64_t* r, void* const* t,
                                                                  int32_t param_dtype, const typename K::Scalars& sc,
                                                                  double d) {
    int64_t n = 0;
    for_run<3>(param_dtype, r[kMode], sc.nesterov, [&](auto p0, auto t0, auto mode_c, auto nest_c) {
      using P = decltype(p0);
      using T = decltype(t0);
      const T* c = data_at<T>(coef.data, r[kStatRow]);
      const T* spc = r[kMode] == kRepairChannel ? data_at<T>(spec_coef.data, r[kStatRow]) : nullptr;
      n = K::template pass2<P, T, decltype(mode_c)::value, decltype(nest_c)::value>(t, r[kStart], c, spc, task.lo,
                                                                                    task.hi, r[kLen], sc, d);
    });
    return n;
  });
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
    int nan = 0;  // a NaN cosine fails the test, as torch's amax would make it
    double l_gp = 0, l_gg = 0, l_pp = 0, l_pu = 0;
    // vector reductions: the max is exact in any order; the layer sums are added in double, in lanes
#pragma omp simd reduction(max : cos_max) reduction(| : nan) reduction(+ : l_gp, l_gg, l_pp, l_pu)
    for (int64_t r = r0; r < r1; ++r) {
      const S g_norm = std::sqrt(gg[r]), p_norm = std::sqrt(pp[r]);
      const S cos = std::abs(gp[r]) / ((g_norm < e ? e : g_norm) * (p_norm < e ? e : p_norm));  // std::max, NaN kept
      nan |= cos != cos;
      cos_max = cos > cos_max ? cos : cos_max;
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

// Runs fn, turning an exception into a return code of 1 and its message into err (err_size bytes, terminated).
template <typename F>
int guarded(char* err, int64_t err_size, const F& fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr && err_size > 0) {
      std::strncpy(err, e.what(), static_cast<size_t>(err_size - 1));
      err[err_size - 1] = '\0';
    }
    return 1;
  }
}

// The bodies of the entry points, per optimizer K (the tensor table as in batch()).
template <typename K>
int first_entry(void* const* ptrs, const int64_t* numels, const int32_t* dtypes, int64_t n_tensors,
                const int64_t* runs, int64_t n_runs, const double* scalars, int64_t cols, void* stats,
                int32_t stats_dtype, int64_t stats_stride, int64_t stats_rows, void* spec_coef, int32_t spec_dtype,
                int64_t spec_numel, int32_t threads, char* err, int64_t err_size) {
  return guarded(err, err_size, [&] {
    const Batch b = batch(ptrs, numels, dtypes, n_tensors, K::kPer, runs, n_runs, scalars, cols, K::kCols, 4);
    first<K>(b, StatsBuf{stats, stats_dtype, stats_stride, stats_rows}, Buf{spec_coef, spec_numel, spec_dtype},
             threads);
  });
}

template <typename K>
int second_entry(void* const* ptrs, const int64_t* numels, const int32_t* dtypes, int64_t n_tensors,
                 const int64_t* runs, int64_t n_runs, const double* scalars, int64_t cols, void* coef,
                 int32_t coef_dtype, int64_t coef_numel, void* spec_coef, int32_t spec_dtype, int64_t spec_numel,
                 void* decay, int32_t decay_dtype, int64_t decay_numel, int64_t* written, int32_t threads, char* err,
                 int64_t err_size) {
  return guarded(err, err_size, [&] {
    const Batch b = batch(ptrs, numels, dtypes, n_tensors, K::kPer, runs, n_runs, scalars, cols, K::kCols, 3);
    second<K>(b, Buf{coef, coef_numel, coef_dtype}, Buf{spec_coef, spec_numel, spec_dtype},
              Buf{decay, decay_numel, decay_dtype}, written, threads);
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------------ C entry points
// Every entry returns 0, or 1 with the reason in err. The library may be compiled as two units in parallel
// (HF_ADAMP_PART 0: AdamP and the decision, 1: SGDP), then linked; without HF_ADAMP_PART one unit has them all.
#define HF_ADAMP_FIRST_ARGS                                                                                         \
  void *const *ptrs, const int64_t *numels, const int32_t *dtypes, int64_t n_tensors, const int64_t *runs,          \
      int64_t n_runs, const double *scalars, int64_t cols, void *stats, int32_t stats_dtype, int64_t stats_stride, \
      int64_t stats_rows, void *spec_coef, int32_t spec_dtype, int64_t spec_numel, int32_t threads, char *err,     \
      int64_t err_size
#define HF_ADAMP_FIRST_CALL                                                                                      \
  ptrs, numels, dtypes, n_tensors, runs, n_runs, scalars, cols, stats, stats_dtype, stats_stride, stats_rows, \
      spec_coef, spec_dtype, spec_numel, threads, err, err_size
#define HF_ADAMP_SECOND_ARGS                                                                                     \
  void *const *ptrs, const int64_t *numels, const int32_t *dtypes, int64_t n_tensors, const int64_t *runs,       \
      int64_t n_runs, const double *scalars, int64_t cols, void *coef, int32_t coef_dtype, int64_t coef_numel,   \
      void *spec_coef, int32_t spec_dtype, int64_t spec_numel, void *decay, int32_t decay_dtype,                \
      int64_t decay_numel, int64_t *written, int32_t threads, char *err, int64_t err_size
#define HF_ADAMP_SECOND_CALL                                                                                    \
  ptrs, numels, dtypes, n_tensors, runs, n_runs, scalars, cols, coef, coef_dtype, coef_numel, spec_coef,     \
      spec_dtype, spec_numel, decay, decay_dtype, decay_numel, written, threads, err, err_size

extern "C" {

#if !defined(HF_ADAMP_PART) || HF_ADAMP_PART == 0
#ifndef HF_ADAMP_BUILD_KEY
#define HF_ADAMP_BUILD_KEY "unkeyed"
#endif
// The key this library was built for (the loader checks it: a library never runs under another source's key).
const char* hf_adamp_build_key() { return HF_ADAMP_BUILD_KEY; }

// The layout of the tables (run columns, modes, scalar columns, dtype codes, tensors per parameter), as text.
const char* hf_adamp_layout() {
  static const std::string text = std::string("runs:") HF_ADAMP_RUN_COLS(HF_ADAMP_TEXT) + ";pass1:"
      HF_ADAMP_PASS1(HF_ADAMP_TEXT) + ";pass2:" HF_ADAMP_PASS2(HF_ADAMP_TEXT) + ";adam:"
      HF_ADAMP_ADAM_COLS(HF_ADAMP_TEXT) + ";sgd:" HF_ADAMP_SGD_COLS(HF_ADAMP_TEXT) + ";dtypes:"
      HF_ADAMP_DTYPES(HF_ADAMP_TEXT) + ";tensors:adam=" + std::to_string(AdamKernels::kPer) +
      ",sgd=" + std::to_string(SgdKernels::kPer) + ",";
  return text.c_str();
}

// AdamP pass 1: moments, row sums; finishes full and speculated runs.
int hf_adamp_adam_first(HF_ADAMP_FIRST_ARGS) { return first_entry<AdamKernels>(HF_ADAMP_FIRST_CALL); }

// AdamP pass 2: projection, decay, step (or repair); adds the rows written per run to written[n_runs].
int hf_adamp_adam_second(HF_ADAMP_SECOND_ARGS) { return second_entry<AdamKernels>(HF_ADAMP_SECOND_CALL); }

// projection.decide on a (4, rows) stats buffer (float32/float64, rows contiguous); outputs of the caller's
// making: coef[rows] and weight_norm[slots] in the stats dtype, projected[slots] (bool), kind[slots] (int8).
int hf_adamp_decide(const void* stats, int32_t dtype, int64_t stride, int64_t rows, const int64_t* counts,
                    const double* row_len, const double* numel, const double* delta, const double* eps, int64_t slots,
                    void* coef, bool* projected, int8_t* kind, void* weight_norm, char* err, int64_t err_size) {
  return guarded(err, err_size, [&] {
    int64_t total = 0;
    for (int64_t k = 0; k < slots; ++k) {
      check(counts[k] >= 0, "decide: negative row count");
      total += counts[k];
    }
    check(total == rows, "decide: row counts do not add up to the rows");
    check(dtype == kF32 || dtype == kF64, "decide: stats must be float32 or float64");
    if (dtype == kF64) {
      decide_impl<double>(static_cast<const double*>(stats), stride, counts, row_len, numel, delta, eps, slots,
                          static_cast<double*>(coef), projected, kind, static_cast<double*>(weight_norm));
    } else {
      decide_impl<float>(static_cast<const float*>(stats), stride, counts, row_len, numel, delta, eps, slots,
                         static_cast<float*>(coef), projected, kind, static_cast<float*>(weight_norm));
    }
  });
}
#endif

#if !defined(HF_ADAMP_PART) || HF_ADAMP_PART == 1
// SGDP pass 1 and pass 2, as AdamP's.
int hf_adamp_sgd_first(HF_ADAMP_FIRST_ARGS) { return first_entry<SgdKernels>(HF_ADAMP_FIRST_CALL); }
int hf_adamp_sgd_second(HF_ADAMP_SECOND_ARGS) { return second_entry<SgdKernels>(HF_ADAMP_SECOND_CALL); }
#endif

}  // extern "C"

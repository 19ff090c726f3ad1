/* Native CPU kernels for the task-vector merges, called through ctypes by kernels.py.
 *
 * - ws_mix_range: θ_base + λ·merge(δ) over a range of flat indices; TIES' trim, sign election and disjoint
 *   mean fused into one pass that reads each input once. The float32 arithmetic is that of mixing.mix's
 *   torch kernel, in the same order, so both give bitwise-equal results (no FMA contraction: the build
 *   passes -ffp-contract=off).
 * - ws_ties_scan + ws_ties_fixup: a whole TIES merge before its thresholds are known (sparsify.ties_fused),
 *   with the same arithmetic as ws_mix_range.
 * - ws_bracket_range: the counting pass of a top-k threshold search; ws_nth_equal: where a run of tied
 *   magnitudes is cut; ws_magnitude_histogram(s): the counting passes of a whole-model top-k threshold.
 * - ws_sort_ties: the order in which torch's (unstable) CPU sort leaves equal keys, for the keys equal to
 *   one or two given values, without sorting the rest (mergekit keeps tied magnitudes at a top-k cut in
 *   that order).
 *
 * Work goes in blocks of BLOCK elements per input, so the K + 3 scratch rows stay in cache. The per-input
 * loops are branch-free so the compiler vectorises them; data-dependent branches are left only where they
 * are rarely taken. The module has no Python-level functions: importing it only makes the shared object
 * findable, and ctypes (which releases the GIL during a call) does the rest.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 2048

/* AVX2 and baseline versions of the hot loops, picked at load time (GCC, or clang 14+, on x86-64 Linux). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

static inline float sign_of(float total) { return total >= 0.0f ? 1.0f : -1.0f; }

/* o[j] = b[j] + λ·Σ agreeing d[i][j] (÷ their weights when normalize), given total[j] = Σ d[i][j]. */
static inline void elect_block(const float *d, int64_t k, int64_t n, const float *total, float *restrict agree,
                               float *restrict divisor, const float *weight, int normalize, float lambda,
                               const float *b, float *o)
{
    memset(agree, 0, (size_t)n * sizeof(float));
    memset(divisor, 0, (size_t)n * sizeof(float));
    for (int64_t i = 0; i < k; i++) {
        const float *di = d + i * BLOCK;
        const float w = weight[i];
        for (int64_t j = 0; j < n; j++) {
            const float a = di[j] * sign_of(total[j]);
            const int positive = a > 0.0f;
            agree[j] += positive ? a : 0.0f;
            divisor[j] += positive ? w : 0.0f;
        }
    }
    for (int64_t j = 0; j < n; j++) {
        float mixed = agree[j] * sign_of(total[j]);
        if (normalize)
            mixed = mixed / (divisor[j] != 0.0f ? divisor[j] : 1.0f);
        if (lambda != 1.0f)
            mixed = mixed * lambda;
        o[j] = b[j] + mixed;
    }
}

/* The elected-sign disjoint mean of one position's weighted, trimmed deltas d[0..k), as elect_block. */
static inline float elect(const float *d, int64_t k, const float *weight, int normalize, float lambda)
{
    float total = 0.0f, agree = 0.0f, divisor = 0.0f;
    for (int64_t i = 0; i < k; i++)
        total += d[i];
    const float sign = sign_of(total);
    for (int64_t i = 0; i < k; i++) {
        const float a = d[i] * sign;
        if (a > 0.0f) {
            agree += a;
            divisor += weight[i];
        }
    }
    float mixed = agree * sign;
    if (normalize)
        mixed = mixed / (divisor != 0.0f ? divisor : 1.0f);
    if (lambda != 1.0f)
        mixed = mixed * lambda;
    return mixed;
}

/* out[j] = base[j] + λ·merge(δ)[j] for j in [lo, hi). Input i is a delta when is_delta[i], else θ with
 * δ = θ − base trimmed to |δ| > threshold[i], or |δ| == threshold[i] before flat index tie_end[i]
 * (threshold −1 keeps all, +inf none). Returns 0, or −1 when out of memory. */
EXPORT HOT int ws_mix_range(int64_t k, const float *const *xs, const uint8_t *is_delta, const float *threshold,
                            const int64_t *tie_end, const float *weight, const float *base, float *out,
                            int64_t lo, int64_t hi, int consensus, int normalize, float total_weight,
                            float lambda, int unit)
{
    float *d = malloc((size_t)(k > 0 ? k : 1) * BLOCK * sizeof(float));
    float *scratch = malloc(3 * BLOCK * sizeof(float));
    if (d == NULL || scratch == NULL) {
        free(d);
        free(scratch);
        return -1;
    }
    float *total = scratch, *agree = scratch + BLOCK, *divisor = scratch + 2 * BLOCK;
    for (int64_t s = lo; s < hi; s += BLOCK) {
        const int64_t n = (hi < s + BLOCK ? hi : s + BLOCK) - s;
        const float *b = base + s;
        float *o = out + s;
        memset(total, 0, (size_t)n * sizeof(float));
        for (int64_t i = 0; i < k; i++) {
            const float *x = xs[i] + s;
            float *restrict di = d + i * BLOCK;
            const float w = weight[i];
            if (is_delta[i]) {
                for (int64_t j = 0; j < n; j++) {
                    float v = x[j];
                    if (!unit)
                        v = v * w;
                    di[j] = v;
                    total[j] += v;
                }
            } else {
                /* ties at the threshold are kept before tie_end: |δ| >= t there, |δ| > t after (two loops,
                 * so that neither compares indices) */
                const float t = threshold[i];
                int64_t split = tie_end[i] - s;
                split = split < 0 ? 0 : (split > n ? n : split);
                for (int64_t j = 0; j < split; j++) {
                    float v = x[j] - b[j];
                    v = fabsf(v) >= t ? v : 0.0f;
                    if (!unit)
                        v = v * w;
                    di[j] = v;
                    total[j] += v;
                }
                for (int64_t j = split; j < n; j++) {
                    float v = x[j] - b[j];
                    v = fabsf(v) > t ? v : 0.0f;
                    if (!unit)
                        v = v * w;
                    di[j] = v;
                    total[j] += v;
                }
            }
        }
        if (consensus) {
            elect_block(d, k, n, total, agree, divisor, weight, normalize, lambda, b, o);
        } else {
            for (int64_t j = 0; j < n; j++) {
                float mixed = normalize ? total[j] / total_weight : total[j];
                if (lambda != 1.0f)
                    mixed = mixed * lambda;
                o[j] = b[j] + mixed;
            }
        }
    }
    free(d);
    free(scratch);
    return 0;
}

/* Over [lo, hi): result[0] = how many |x − base| exceed high; those in [low, high] are copied into
 * kept[0..cap) (result[1] of them) and result[2] = how many more did not fit. */
EXPORT HOT void ws_bracket_range(const float *x, const float *base, int has_base, float low, float high,
                                 int64_t lo, int64_t hi, float *kept, int64_t cap, int64_t *result)
{
    int64_t above = 0, copied = 0, spilled = 0;
    float flags[BLOCK];
    for (int64_t s = lo; s < hi; s += BLOCK) {
        const int64_t n = (hi < s + BLOCK ? hi : s + BLOCK) - s;
        const float *xb = x + s, *bb = base + s;
        int32_t count = 0, hits = 0;
        for (int64_t j = 0; j < n; j++) {
            const float m = has_base ? fabsf(xb[j] - bb[j]) : fabsf(xb[j]);
            /* fl(a − b) has the sign of a − b and is zero only when a == b: one compare tests low <= m <= high */
            const float under = m - low, over = high - m;
            const int flag = (under < over ? under : over) >= 0.0f;
            count += m > high;
            hits += flag;
            flags[j] = flag ? 1.0f : 0.0f;
        }
        above += count;
        if (hits) {
            for (int64_t j = 0; j < n; j++) {
                if (flags[j] != 0.0f) {
                    if (copied < cap)
                        kept[copied++] = has_base ? fabsf(xb[j] - bb[j]) : fabsf(xb[j]);
                    else
                        spilled++;
                }
            }
        }
    }
    result[0] = above;
    result[1] = copied;
    result[2] = spilled;
}

/* The flat index just past the count-th entry whose |x − base| equals value (n if fewer). */
EXPORT int64_t ws_nth_equal(const float *x, const float *base, int has_base, float value, int64_t count, int64_t n)
{
    int64_t seen = 0;
    for (int64_t j = 0; j < n; j++) {
        const float m = has_base ? fabsf(x[j] - base[j]) : fabsf(x[j]);
        if (m == value && ++seen == count)
            return j + 1;
    }
    return n;
}

/* Histogram of the float32 bits of |x − base| over [lo, hi), added into counts: by their top 16 bits when
 * high < 0 (32768 bins: a magnitude's sign bit is 0), else by their low 16 bits among the entries whose top
 * 16 bits equal high (65536 bins). Non-negative floats order as their bit patterns, so the two histograms
 * find an exact order statistic. Returns 0, or −1 when out of memory. */
static inline uint32_t magnitude_bits(float x, float base)
{
    const float m = fabsf(x - base);
    uint32_t bits;
    memcpy(&bits, &m, sizeof bits);
    return bits;
}

/* One input's block into its four interleaved histograms (so runs of one bin do not wait on each other's
 * increments): by the top 16 bits when high < 0, else the low 16 bits of the entries whose top bits are high. */
static inline void histogram_block(const float *x, const float *b, int64_t n, int32_t high, uint32_t *part)
{
    const int64_t bins = high < 0 ? (1 << 15) : (1 << 16);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        for (int r = 0; r < 4; r++) {
            const uint32_t bits = magnitude_bits(x[j + r], b[j + r]);
            if (high < 0)
                part[r * bins + (bits >> 16)]++;
            else if ((int32_t)(bits >> 16) == high)
                part[r * bins + (bits & 0xFFFFu)]++;
        }
    }
    for (; j < n; j++) {
        const uint32_t bits = magnitude_bits(x[j], b[j]);
        if (high < 0)
            part[bits >> 16]++;
        else if ((int32_t)(bits >> 16) == high)
            part[bits & 0xFFFFu]++;
    }
}

static void flush_histograms(int64_t k, const int32_t *high, uint32_t *part, int64_t *const *counts)
{
    for (int64_t i = 0; i < k; i++) {
        const int64_t bins = high[i] < 0 ? (1 << 15) : (1 << 16);
        uint32_t *p = part + i * 4 * (1 << 16);
        for (int64_t b = 0; b < bins; b++) {
            counts[i][b] += (int64_t)p[b] + p[bins + b] + p[2 * bins + b] + p[3 * bins + b];
            p[b] = p[bins + b] = p[2 * bins + b] = p[3 * bins + b] = 0;
        }
    }
}

/* The histograms of k inputs' |x_i − base| at once (each block of base read once for all of them), added into
 * counts[i] as ws_magnitude_histogram does for one. Returns 0, or −1 when out of memory. */
EXPORT int ws_magnitude_histograms(int64_t k, const float *const *xs, const float *base, int64_t lo, int64_t hi,
                                   const int32_t *high, int64_t *const *counts)
{
    const int64_t flush = (int64_t)1 << 30; /* a uint32 lane takes at most a quarter of this many */
    uint32_t *part = calloc((size_t)(k > 0 ? k : 1) * 4 * (1 << 16), sizeof(uint32_t));
    if (part == NULL)
        return -1;
    int64_t since = 0;
    for (int64_t s = lo; s < hi; s += BLOCK) {
        const int64_t n = (hi < s + BLOCK ? hi : s + BLOCK) - s;
        for (int64_t i = 0; i < k; i++)
            histogram_block(xs[i] + s, base + s, n, high[i], part + i * 4 * (1 << 16));
        since += n;
        if (since >= flush) {
            flush_histograms(k, high, part, counts);
            since = 0;
        }
    }
    flush_histograms(k, high, part, counts);
    free(part);
    return 0;
}

EXPORT int ws_magnitude_histogram(const float *x, const float *base, int64_t lo, int64_t hi, int32_t high,
                                  int64_t *counts)
{
    return ws_magnitude_histograms(1, &x, base, lo, hi, &high, &counts);
}

/* One pass of a TIES merge before its thresholds are known, over [lo, hi).
 *
 * Input i's threshold lies in [low[i], high[i]] (a bracket from a sample): |δ| above it is kept for sure,
 * below it dropped. Every position gets the output those decisions give; positions where some input falls
 * inside its bracket are also listed in pending[0..pcap) for ws_ties_fixup to redo, and each input's
 * in-bracket magnitudes are copied into values[i][0..cap) with their flat indices[i] (ascending).
 * counts[i] = (above, in bracket). Returns the pending count, or −1 on overflow (the buffers were too small
 * and nothing is usable) or when out of memory.
 *
 * Blocks as in ws_mix_range: the per-input loop is branch-free (vectorised) and flags the in-bracket
 * entries; a scalar loop copies them out only in blocks that have any. */
EXPORT HOT int64_t ws_ties_scan(int64_t k, const float *const *xs, const float *base, float *out, const float *low,
                                const float *high, const float *weight, int normalize, float lambda, int unit,
                                int64_t lo, int64_t hi, float *values, int64_t *indices, int64_t cap,
                                int64_t *counts, int64_t *pending, int64_t pcap)
{
    float *d = malloc((size_t)(k > 0 ? k : 1) * BLOCK * sizeof(float));
    float *inside = malloc((size_t)(k > 0 ? k : 1) * BLOCK * sizeof(float));
    float *scratch = malloc(3 * BLOCK * sizeof(float));
    uint8_t undecided[BLOCK];
    int64_t waiting = 0;
    if (d == NULL || inside == NULL || scratch == NULL) {
        waiting = -1;
        goto done;
    }
    float *total = scratch, *agree = scratch + BLOCK, *divisor = scratch + 2 * BLOCK;
    for (int64_t s = lo; s < hi; s += BLOCK) {
        const int64_t n = (hi < s + BLOCK ? hi : s + BLOCK) - s;
        const float *b = base + s;
        float *o = out + s;
        int any_inside = 0;
        memset(total, 0, (size_t)n * sizeof(float));
        for (int64_t i = 0; i < k; i++) {
            const float *x = xs[i] + s;
            float *restrict di = d + i * BLOCK;
            float *restrict fi = inside + i * BLOCK;
            const float w = weight[i], bottom = low[i], top = high[i];
            int32_t above = 0, hits = 0;
            for (int64_t j = 0; j < n; j++) {
                float v = x[j] - b[j];
                const float m = fabsf(v);
                const int keep = m > top;
                /* one compare for bottom <= m <= top (see ws_bracket_range) */
                const float under = m - bottom, over = top - m;
                const int flag = (under < over ? under : over) >= 0.0f;
                above += keep;
                hits += flag;
                fi[j] = flag ? 1.0f : 0.0f;
                v = keep ? v : 0.0f;
                if (!unit)
                    v = v * w;
                di[j] = v;
                total[j] += v;
            }
            counts[2 * i] += above;
            if (hits) {
                int64_t c = counts[2 * i + 1];
                if (c + hits > cap) {
                    waiting = -1;
                    goto done;
                }
                if (!any_inside) {
                    memset(undecided, 0, (size_t)n);
                    any_inside = 1;
                }
                for (int64_t j = 0; j < n; j++) {
                    if (fi[j] != 0.0f) {
                        values[i * cap + c] = fabsf(x[j] - b[j]);
                        indices[i * cap + c] = s + j;
                        c++;
                        undecided[j] = 1;
                    }
                }
                counts[2 * i + 1] = c;
            }
        }
        elect_block(d, k, n, total, agree, divisor, weight, normalize, lambda, b, o);
        if (any_inside) {
            for (int64_t j = 0; j < n; j++) {
                if (undecided[j]) {
                    if (waiting >= pcap) {
                        waiting = -1;
                        goto done;
                    }
                    pending[waiting++] = s + j;
                }
            }
        }
    }
done:
    free(d);
    free(inside);
    free(scratch);
    return waiting;
}

/* The outputs ws_ties_scan left pending, now that every input's threshold is known. Returns 0, or −1 when
 * out of memory. */
EXPORT int ws_ties_fixup(int64_t k, const float *const *xs, const float *base, float *out, const float *threshold,
                         const int64_t *tie_end, const float *weight, int normalize, float lambda, int unit,
                         const int64_t *pending, int64_t npending)
{
    float *d = malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
    if (d == NULL)
        return -1;
    for (int64_t p = 0; p < npending; p++) {
        const int64_t j = pending[p];
        const float b = base[j];
        for (int64_t i = 0; i < k; i++) {
            float v = xs[i][j] - b;
            const float m = fabsf(v), t = threshold[i];
            v = (m > t) || (m == t && j < tie_end[i]) ? v : 0.0f;
            d[i] = unit ? v : v * weight[i];
        }
        out[j] = b + elect(d, k, weight, normalize, lambda);
    }
    free(d);
    return 0;
}

/* torch.sort(stable=False) on a contiguous CPU float tensor is std::sort (libstdc++'s introsort) over
 * (key, index) pairs with comparator a > b (descending) or a < b. Its final insertion sort never reorders
 * equal keys, so the order of tied keys is fixed by the partitioning phase, and a subrange's partitioning
 * depends on that subrange alone. The code below replays that phase step for step, except that a
 * subrange holding no key equal to t1 or t2 is left alone: only subranges around the tied keys are
 * partitioned further, so the work is a few passes over the data instead of a sort. Keys must be finite
 * (no NaN: torch orders those by other rules).
 *
 * Where the keys came from is followed either for every key (ix, permuted with them) or for the tied keys
 * alone (a list of where each is now and where it started, sorted by position), which needs no index array:
 * 16 bytes a tied key instead of 4 bytes a key, and nothing to swap but the keys. */
#define SORT_THRESHOLD 16

/* The vector scans of the replay (SSE2, on every x86-64); elsewhere _tie_replay.h has scalar ones. */
#if defined(__SSE2__)
#define REPLAY_SIMD 1
static inline uint64_t stop_block_f32(const float *v, float p, int le)
{
    uint64_t m = 0;
    const __m128 pv = _mm_set1_ps(p);
    for (int q = 0; q < 16; q++) {
        const __m128 x = _mm_loadu_ps(v + 4 * q);
        m |= (uint64_t)_mm_movemask_ps(le ? _mm_cmple_ps(x, pv) : _mm_cmpge_ps(x, pv)) << (4 * q);
    }
    return m;
}

static inline int any_of16_f32(const float *v, float t1, float t2)
{
    const __m128 a = _mm_set1_ps(t1), b = _mm_set1_ps(t2);
    __m128 hit = _mm_setzero_ps();
    for (int q = 0; q < 4; q++) {
        const __m128 x = _mm_loadu_ps(v + 4 * q);
        hit = _mm_or_ps(hit, _mm_or_ps(_mm_cmpeq_ps(x, a), _mm_cmpeq_ps(x, b)));
    }
    return _mm_movemask_ps(hit) != 0;
}

/* 16-bit keys are the bits of non-negative bfloat16/float16 values, which order as the values do, and as
 * signed 16-bit integers (all below 0x8000) */
static inline uint64_t stop_block_u16(const uint16_t *v, uint16_t p, int le)
{
    uint64_t m = 0;
    const __m128i pv = _mm_set1_epi16((int16_t)p);
    for (int q = 0; q < 4; q++) {
        const __m128i x0 = _mm_loadu_si128((const __m128i *)(v + 16 * q));
        const __m128i x1 = _mm_loadu_si128((const __m128i *)(v + 16 * q + 8));
        /* v <= p is !(v > p); v >= p is !(p > v) */
        const __m128i g0 = le ? _mm_cmpgt_epi16(x0, pv) : _mm_cmpgt_epi16(pv, x0);
        const __m128i g1 = le ? _mm_cmpgt_epi16(x1, pv) : _mm_cmpgt_epi16(pv, x1);
        m |= (uint64_t)(~_mm_movemask_epi8(_mm_packs_epi16(g0, g1)) & 0xFFFF) << (16 * q);
    }
    return m;
}

static inline int any_of16_u16(const uint16_t *v, uint16_t t1, uint16_t t2)
{
    const __m128i a = _mm_set1_epi16((int16_t)t1), b = _mm_set1_epi16((int16_t)t2);
    const __m128i x0 = _mm_loadu_si128((const __m128i *)v), x1 = _mm_loadu_si128((const __m128i *)(v + 8));
    const __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi16(x0, a), _mm_cmpeq_epi16(x0, b)),
                                     _mm_or_si128(_mm_cmpeq_epi16(x1, a), _mm_cmpeq_epi16(x1, b)));
    return _mm_movemask_epi8(hit) != 0;
}
#endif

/* one replay per key type: float (torch.sort's own keys) and 16-bit (half-precision magnitudes) */
#define KEY float
#define KEY_NAN(x) ((x) != (x))
#define NAME(x) x##_f32
#include "_tie_replay.h"
#undef KEY
#undef KEY_NAN
#undef NAME
#define KEY uint16_t
#define KEY_NAN(x) 0
#define NAME(x) x##_u16
#include "_tie_replay.h"
#undef KEY
#undef KEY_NAN
#undef NAME

/* The replay on float keys (torch.sort's own) or on 16-bit ones (magnitudes of half-precision values, kept
 * below 0x8000 and finite by the caller); see sort_ties in _tie_replay.h. */
EXPORT int ws_sort_ties(float *v, int32_t *ix, int64_t n, int desc, float t1, float t2, int64_t b1, int64_t b2)
{
    return sort_ties_f32(v, ix, n, desc, t1, t2, b1, b2);
}

EXPORT int ws_sort_ties16(uint16_t *v, int32_t *ix, int64_t n, int desc, int32_t t1, int32_t t2, int64_t b1,
                          int64_t b2)
{
    return sort_ties_u16(v, ix, n, desc, (uint16_t)t1, (uint16_t)t2, b1, b2);
}

EXPORT int ws_sort_ties_list(float *v, int64_t n, int desc, float t1, float t2, int64_t b1, int64_t b2,
                             int32_t *pos, int32_t *id, int32_t *tmp, int64_t cap, int64_t *count)
{
    return sort_ties_list_f32(v, n, desc, t1, t2, b1, b2, pos, id, tmp, cap, count);
}

EXPORT int ws_sort_ties_list16(uint16_t *v, int64_t n, int desc, int32_t t1, int32_t t2, int64_t b1, int64_t b2,
                               int32_t *pos, int32_t *id, int32_t *tmp, int64_t cap, int64_t *count)
{
    return sort_ties_list_u16(v, n, desc, (uint16_t)t1, (uint16_t)t2, b1, b2, pos, id, tmp, cap, count);
}

/* ---- Half precision under compat: mergekit (bfloat16 = 1, float16 = 2) ----
 *
 * mergekit runs its arithmetic in the recipe's dtype; torch does each bfloat16/float16 op on CPU by widening
 * to float, computing in float and rounding the result to the dtype (round to nearest even), and it adds
 * the rows of a small reduction (fewer than 16) in float one after another from +0, rounding once. The
 * kernels below do the same float operations and round at the same places, so they give mergekit's bits.
 * Values are carried as floats that the dtype represents exactly. */

static inline float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float half_float(uint16_t h, int dtype)
{
    if (dtype == 1)
        return bits_float((uint32_t)h << 16);
    /* float16: move the exponent and mantissa into place and rescale by 2^112 (exact, subnormals too) */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, rest = h & 0x7FFFu;
    const float scaled = bits_float(rest << 13) * 0x1p112f;
    const uint32_t special = 0x7F800000u | ((rest & 0x3FFu) << 13); /* inf or NaN */
    return bits_float(sign | (rest >= 0x7C00u ? special : float_bits(scaled)));
}

/* f rounded to the dtype, nearest even, as its 16 bits. */
static inline uint16_t float_half(float f, int dtype)
{
    const uint32_t u = float_bits(f);
    if (dtype == 1) {
        const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
    }
    const uint32_t sign = (u >> 16) & 0x8000u, mag = u & 0x7FFFFFFFu;
    /* below 2^-14 the result is subnormal: adding 0.5 lines the float's rounding up with the half's */
    const uint32_t small = float_bits(bits_float(mag) + 0.5f) - 0x3F000000u;
    const uint32_t normal = (mag + 0xC8000FFFu + ((mag >> 13) & 1u)) >> 13;
    const uint32_t big = mag > 0x7F800000u ? 0x7E00u : 0x7C00u;
    const uint32_t r = mag >= 0x47800000u ? big : (mag < 0x38800000u ? small : normal);
    return (uint16_t)(sign | r);
}

static inline float round_half(float f, int dtype) { return half_float(float_half(f, dtype), dtype); }

/* The histogram of |δ| = |round(x − base)| over [lo, hi) by its 15 magnitude bits, added into counts[32768]
 * (non-finite magnitudes land in the top bins); keys[j], when given, receives those bits (sort keys). */
static inline __attribute__((always_inline)) void half_keys_body(const uint16_t *x, const uint16_t *base, int dtype,
                                                                int64_t lo, int64_t hi, uint16_t *keys, int64_t *counts)
{
    uint16_t bins[BLOCK];
    /* four partial histograms, one per lane of four keys: runs of equal magnitudes (a half has few) then
     * do not chain each increment on the one before through the same counter */
    uint32_t *part = calloc(4 * 32768, sizeof(uint32_t));
    for (int64_t s = lo; s < hi; s += BLOCK) {
        const int64_t n = (hi < s + BLOCK ? hi : s + BLOCK) - s;
        for (int64_t j = 0; j < n; j++)
            bins[j] = float_half(half_float(x[s + j], dtype) - half_float(base[s + j], dtype), dtype) & 0x7FFFu;
        if (keys != NULL)
            memcpy(keys + s, bins, (size_t)n * sizeof(uint16_t));
        int64_t j = 0;
        if (part != NULL) {
            for (; j + 4 <= n; j += 4) {
                part[bins[j]]++;
                part[32768 + bins[j + 1]]++;
                part[65536 + bins[j + 2]]++;
                part[98304 + bins[j + 3]]++;
            }
        }
        for (; j < n; j++)
            counts[bins[j]]++;
        if (part != NULL && s + BLOCK < hi && (s - lo) / BLOCK % 512 == 511) {  /* flush before 2^32 */
            for (int64_t q = 0; q < 32768; q++) {
                counts[q] += (int64_t)part[q] + part[32768 + q] + part[65536 + q] + part[98304 + q];
                part[q] = part[32768 + q] = part[65536 + q] = part[98304 + q] = 0;
            }
        }
    }
    if (part != NULL) {
        for (int64_t q = 0; q < 32768; q++)
            counts[q] += (int64_t)part[q] + part[32768 + q] + part[65536 + q] + part[98304 + q];
        free(part);
    }
}

EXPORT HOT void ws_half_keys(const uint16_t *x, const uint16_t *base, int dtype, int64_t lo, int64_t hi, uint16_t *keys,
                             int64_t *counts)
{
    if (dtype == 1)
        half_keys_body(x, base, 1, lo, hi, keys, counts);
    else
        half_keys_body(x, base, 2, lo, hi, keys, counts);
}

/* Input i's trimmed δ over one block into d (not yet weighted): kept where lower[i] < |δ| < upper[i], or
 * where |δ| equals one of them and the position is listed (listed: ascending flat indices, *cursor the
 * first not yet passed); elsewhere δ·0 (a signed zero, as mergekit's δ·mask). */
static inline __attribute__((always_inline)) void half_trim_block(const uint16_t *x, const float *b, int dtype,
                                                                 int64_t s, int64_t n, float lower, float upper,
                                                                 const int64_t *listed, int64_t count,
                                                                 int64_t *cursor, float *restrict d)
{
    for (int64_t j = 0; j < n; j++) {
        const float v = round_half(half_float(x[j], dtype) - b[j], dtype);
        const float m = fabsf(v);
        d[j] = (m > lower) & (m < upper) ? v : v * 0.0f;
    }
    /* the listed positions are all ties at a cut, kept: put their δ back */
    int64_t c = *cursor;
    for (; c < count && listed[c] < s + n; c++) {
        const int64_t j = listed[c] - s;
        if (j >= 0)
            d[j] = round_half(half_float(x[j], dtype) - b[j], dtype);
    }
    *cursor = c;
}

/* Elected-sign disjoint mean (consensus) or weighted sum of one block's weighted deltas, then ÷, ×λ and
 * + base, each rounded as mergekit's ops; written to o in the dtype. */
static inline __attribute__((always_inline)) void half_elect_block(const float *d, int64_t k, int64_t n,
                                                                  const float *weight, int dtype, int consensus,
                                                                  int normalize, float divisor_all, float lambda,
                                                                  const float *total, float *restrict agree,
                                                                  float *restrict divisor, const float *b,
                                                                  uint16_t *o)
{
    memset(agree, 0, (size_t)n * sizeof(float));
    memset(divisor, 0, (size_t)n * sizeof(float));
    if (consensus) {
        for (int64_t i = 0; i < k; i++) {
            const float *di = d + i * BLOCK;
            const float w = weight[i];
            for (int64_t j = 0; j < n; j++) {
                const float sign = round_half(total[j], dtype) >= 0.0f ? 1.0f : -1.0f;
                const int same = di[j] * sign > 0.0f;
                agree[j] += same ? di[j] : 0.0f;
                divisor[j] += same ? w : 0.0f;
            }
        }
    }
    /* each step its own loop, so that every one of them is vector code */
    float *restrict mixed = agree;
    const float *sum = consensus ? agree : total;
    for (int64_t j = 0; j < n; j++)
        mixed[j] = round_half(sum[j], dtype);
    if (normalize && consensus) {
        for (int64_t j = 0; j < n; j++) {
            const float by = round_half(divisor[j], dtype);
            mixed[j] = round_half(mixed[j] / (by == 0.0f ? 1.0f : by), dtype);
        }
    } else if (normalize) {
        for (int64_t j = 0; j < n; j++)
            mixed[j] = round_half(mixed[j] / divisor_all, dtype);
    }
    if (lambda != 1.0f)
        for (int64_t j = 0; j < n; j++)
            mixed[j] = round_half(mixed[j] * lambda, dtype);
    for (int64_t j = 0; j < n; j++)
        o[j] = float_half(b[j] + mixed[j], dtype);
}

static inline __attribute__((always_inline)) int half_mix_body(int64_t k, const uint16_t *const *xs,
                                                              const uint8_t *is_delta,
                                                              const uint16_t *base, uint16_t *out, int dtype,
                                                              const float *lower, const float *upper,
                                                              const int64_t *const *listed, const int64_t *counts,
                                                              const int64_t *start, const float *weight,
                                                              int consensus, int normalize, float divisor_all,
                                                              float lambda, int64_t lo, int64_t hi)
{
    float *d = malloc((size_t)(k > 0 ? k : 1) * BLOCK * sizeof(float));
    float *scratch = malloc(4 * BLOCK * sizeof(float));
    int64_t *cursor = malloc((size_t)(k > 0 ? k : 1) * sizeof(int64_t));
    if (d == NULL || scratch == NULL || cursor == NULL) {
        free(d);
        free(scratch);
        free(cursor);
        return -1;
    }
    float *total = scratch, *agree = scratch + BLOCK, *divisor = scratch + 2 * BLOCK, *b = scratch + 3 * BLOCK;
    for (int64_t i = 0; i < k; i++)
        cursor[i] = start[i];
    for (int64_t s = lo; s < hi; s += BLOCK) {
        const int64_t n = (hi < s + BLOCK ? hi : s + BLOCK) - s;
        for (int64_t j = 0; j < n; j++) {
            b[j] = half_float(base[s + j], dtype);
            total[j] = 0.0f;
        }
        for (int64_t i = 0; i < k; i++) {
            float *restrict di = d + i * BLOCK;
            const float w = weight[i];
            if (is_delta[i])
                for (int64_t j = 0; j < n; j++)
                    di[j] = half_float(xs[i][s + j], dtype);
            else
                half_trim_block(xs[i] + s, b, dtype, s, n, lower[i], upper[i], listed[i], counts[i], &cursor[i], di);
            for (int64_t j = 0; j < n; j++) {
                di[j] = round_half(di[j] * w, dtype);
                total[j] += di[j];
            }
        }
        half_elect_block(d, k, n, weight, dtype, consensus, normalize, divisor_all, lambda, total, agree, divisor, b,
                         out + s);
    }
    free(d);
    free(scratch);
    free(cursor);
    return 0;
}

/* θ_base + λ·merge(trim(δ)) over [lo, hi) in bfloat16/float16 with mergekit's rounding: δᵢ = xᵢ itself where
 * is_delta[i] (sparsified by the caller), else round(xᵢ − base) trimmed as half_trim_block, × wᵢ (weights given already rounded to the dtype), then TIES' elected sign
 * and disjoint mean (consensus) or the plain sum, ÷ the kept weights' sum (0 → 1) or divisor_all when
 * normalize, × λ, + base. out may be base itself. Returns 0, or −1 when out of memory. */
EXPORT HOT int ws_half_mix(int64_t k, const uint16_t *const *xs, const uint8_t *is_delta, const uint16_t *base,
                           uint16_t *out, int dtype, const float *lower, const float *upper,
                           const int64_t *const *listed, const int64_t *counts, const int64_t *start,
                           const float *weight, int consensus, int normalize, float divisor_all, float lambda,
                           int64_t lo, int64_t hi)
{
    if (dtype == 1)
        return half_mix_body(k, xs, is_delta, base, out, 1, lower, upper, listed, counts, start, weight, consensus,
                             normalize, divisor_all, lambda, lo, hi);
    return half_mix_body(k, xs, is_delta, base, out, 2, lower, upper, listed, counts, start, weight, consensus,
                         normalize, divisor_all, lambda, lo, hi);
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "weightsmith's native merge kernels; weightsmith.merge.kernels calls them through ctypes.", -1, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }

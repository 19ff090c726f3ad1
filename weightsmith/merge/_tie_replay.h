/* The replay of std::sort's partitioning phase (see _kernels.c), written once for any key type: the
 * includer defines KEY, KEY_NAN(x) (whether key x is a NaN) and NAME(x) (a suffixed name), and with
 * REPLAY_SIMD its own vector versions of
 *     uint64_t NAME(stop_block)(const KEY *v, KEY p, int le)     bit j: v[j] <= p (le) or v[j] >= p, j < 64
 *     int NAME(any_of16)(const KEY *v, KEY t1, KEY t2)           whether one of v[0..16) equals t1 or t2
 * (without, the scalar ones below). Keys must not be NaN. */

#if !defined(REPLAY_SIMD)
static inline uint64_t NAME(stop_block)(const KEY *v, KEY p, int le)
{
    uint64_t m = 0;
    for (int j = 0; j < 64; j++)
        m |= (uint64_t)(le ? v[j] <= p : v[j] >= p) << j;
    return m;
}

static inline int NAME(any_of16)(const KEY *v, KEY t1, KEY t2)
{
    int hit = 0;
    for (int j = 0; j < 16; j++)
        hit |= (v[j] == t1) | (v[j] == t2);
    return hit;
}
#endif

struct NAME(replay) {
    KEY *v;
    int32_t *ix;        /* NULL: only the tied keys are followed, in pos/id */
    int64_t *pos, *id;  /* where each followed key is now, and its index before the sort */
    int64_t tracked, n;
    KEY t1, t2;
    int desc;
};

static inline int NAME(before)(KEY a, KEY b, int desc) { return desc ? a > b : a < b; }

static inline void NAME(swap_pair)(struct NAME(replay) *r, int64_t a, int64_t b)
{
    KEY *v = r->v;
    const KEY va = v[a], vb = v[b];
    v[a] = vb;
    v[b] = va;
    if (r->ix != NULL) {
        const int32_t ti = r->ix[a];
        r->ix[a] = r->ix[b];
        r->ix[b] = ti;
    } else if (va == r->t1 || va == r->t2 || vb == r->t1 || vb == r->t2) {
        for (int64_t q = 0; q < r->tracked; q++)
            r->pos[q] = r->pos[q] == a ? b : (r->pos[q] == b ? a : r->pos[q]);
    }
}

static void NAME(median_to_first)(struct NAME(replay) *r, int64_t result, int64_t a, int64_t b, int64_t c)
{
    const KEY *v = r->v;
    const int desc = r->desc;
    if (NAME(before)(v[a], v[b], desc)) {
        if (NAME(before)(v[b], v[c], desc))
            NAME(swap_pair)(r, result, b);
        else if (NAME(before)(v[a], v[c], desc))
            NAME(swap_pair)(r, result, c);
        else
            NAME(swap_pair)(r, result, a);
    } else if (NAME(before)(v[a], v[c], desc))
        NAME(swap_pair)(r, result, a);
    else if (NAME(before)(v[b], v[c], desc))
        NAME(swap_pair)(r, result, c);
    else
        NAME(swap_pair)(r, result, b);
}

/* Bit j: whether key base + j stops a scan (v <= p when le, else v >= p); keys outside [0, n) do not. */
static inline uint64_t NAME(stop_mask)(const KEY *v, int64_t base, int64_t n, KEY p, int le)
{
    if (base >= 0 && base + 64 <= n)
        return NAME(stop_block)(v + base, p, le);
    uint64_t m = 0;
    const int64_t lo = base < 0 ? 0 : base, hi = base + 64 < n ? base + 64 : n;
    for (int64_t j = lo; j < hi; j++)
        m |= (uint64_t)(le ? v[j] <= p : v[j] >= p) << (j - base);
    return m;
}

/* The first stop at or after from (n if none), through a cached 64-key mask. */
static inline int64_t NAME(next_stop_up)(const KEY *v, int64_t n, KEY p, int le, int64_t from, int64_t *base,
                                         uint64_t *mask)
{
    while (from < n) {
        if (from < *base || from >= *base + 64) {
            *base = from & ~(int64_t)63;
            *mask = NAME(stop_mask)(v, *base, n, p, le);
        }
        const uint64_t m = *mask & (~(uint64_t)0 << (from - *base));
        if (m)
            return *base + __builtin_ctzll(m);
        from = *base + 64;
    }
    return n;
}

/* The last stop at or before from (−1 if none). */
static inline int64_t NAME(next_stop_down)(const KEY *v, int64_t n, KEY p, int le, int64_t from, int64_t *base,
                                           uint64_t *mask)
{
    while (from >= 0) {
        if (from < *base || from >= *base + 64) {
            *base = from & ~(int64_t)63;
            *mask = NAME(stop_mask)(v, *base, n, p, le);
        }
        const int shift = (int)(from - *base);
        const uint64_t m = *mask & (shift == 63 ? ~(uint64_t)0 : (((uint64_t)1 << (shift + 1)) - 1));
        if (m)
            return *base + 63 - __builtin_clzll(m);
        from = *base - 1;
    }
    return -1;
}

/* libstdc++'s unguarded partition of [first, last) around the key at pivot:
 *     for (;;) { while (v[first] before p) ++first;  --last;  while (p before v[last]) --last;
 *                if (!(first < last)) return first;  swap(first, last);  ++first; }
 * with each scan reading 64-key masks instead of branching per key (keys in random order make those
 * branches unpredictable). No key between the two scans has moved since the partition began, so a mask
 * stays right there; a scan that reaches the key swapped last in its way stops on it, as the loop's would. */
static int64_t NAME(unguarded_partition)(struct NAME(replay) *r, int64_t first, int64_t last, int64_t pivot)
{
    const KEY p = r->v[pivot];
    const int desc = r->desc;
    int64_t up_base = INT64_MIN / 2, down_base = INT64_MIN / 2, cap_up = r->n, cap_down = -1;
    uint64_t up_mask = 0, down_mask = 0;
    for (;;) {
        /* the left scan stops on !(v before p), the right one on !(p before v) */
        const int64_t f = NAME(next_stop_up)(r->v, r->n, p, desc, first, &up_base, &up_mask);
        first = f < cap_up ? f : cap_up;
        const int64_t l = NAME(next_stop_down)(r->v, r->n, p, !desc, last - 1, &down_base, &down_mask);
        last = l > cap_down ? l : cap_down;
        if (!(first < last))
            return first;
        NAME(swap_pair)(r, first, last);
        cap_down = first;
        cap_up = last;
        ++first;
    }
}

static int NAME(holds)(const KEY *v, int64_t first, int64_t last, KEY t1, KEY t2)
{
    for (; first + 16 <= last; first += 16)
        if (NAME(any_of16)(v + first, t1, t2))
            return 1;
    for (int64_t j = first; j < last; j++)
        if (v[j] == t1 || v[j] == t2)
            return 1;
    return 0;
}

/* Returns 0, or 1 where std::sort would fall back to heapsort on a subrange holding tied keys (the caller
 * then sorts for real). */
static int NAME(introsort_ties)(struct NAME(replay) *r, int64_t first, int64_t last, int depth)
{
    while (last - first > SORT_THRESHOLD) {
        if (!NAME(holds)(r->v, first, last, r->t1, r->t2))
            return 0;
        if (depth == 0)
            return 1;
        --depth;
        const int64_t mid = first + (last - first) / 2;
        NAME(median_to_first)(r, first, first + 1, mid, last - 1);
        const int64_t cut = NAME(unguarded_partition)(r, first + 1, last, first);
        if (NAME(introsort_ties)(r, cut, last, depth))
            return 1;
        last = cut;
    }
    return 0;
}

/* Permutes keys v[0..n) as std::sort's partitioning phase would, on every subrange that holds a key equal to
 * t1 or t2; the keys equal to t1 (or t2) then appear in v in the order the sort leaves them. With ix, ix is
 * filled with 0..n−1 first and permuted along; without, the tied keys (at most cap) are followed in
 * pos/id (*tracked of them: their final positions and original indices). Returns 0, 1 (heapsort fallback
 * reached: not replayed), 2 (more than cap tied keys and no ix: nothing done) or −1 for a NaN key or more
 * than 2^31 − 1 keys. */
static int NAME(sort_ties)(KEY *v, int32_t *ix, int64_t n, int desc, KEY t1, KEY t2, int64_t *pos, int64_t *id,
                           int64_t cap, int64_t *tracked)
{
    struct NAME(replay) r = {v, ix, pos, id, 0, n, t1, t2, desc};
    if (n > INT32_MAX)
        return -1;
    int nan = 0;
    for (int64_t j = 0; j < n; j++)
        nan |= KEY_NAN(v[j]);
    if (nan)
        return -1;
    for (int64_t j = 0; ix != NULL && j < n; j++)
        ix[j] = (int32_t)j;
    for (int64_t j = 0; ix == NULL && j < n; j++) {
        if (v[j] == t1 || v[j] == t2) {
            if (r.tracked == cap || r.tracked == TRACK_MAX)
                return 2;
            pos[r.tracked] = id[r.tracked] = j;
            r.tracked++;
        }
    }
    *tracked = r.tracked;
    if (n < 2)
        return 0;
    int lg = 0;
    while (((int64_t)1 << (lg + 1)) <= n)
        lg++;
    return NAME(introsort_ties)(&r, 0, n, 2 * lg);
}

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
    int32_t *ix;        /* every key's index before the sort, permuted with the keys */
    int64_t n;
    KEY t1, t2;
    int desc;
    int64_t b1, b2;     /* where the caller cuts the sorted keys (−1: nowhere given): see straddles */
};

static inline int NAME(before)(KEY a, KEY b, int desc) { return desc ? a > b : a < b; }

static inline void NAME(swap_pair)(struct NAME(replay) *r, int64_t a, int64_t b)
{
    KEY *v = r->v;
    const KEY va = v[a], vb = v[b];
    v[a] = vb;
    v[b] = va;
    const int32_t ti = r->ix[a];
    r->ix[a] = r->ix[b];
    r->ix[b] = ti;
}

/* Which of a, b, c holds the median of the three keys, as libstdc++'s __move_median_to_first picks it (the
 * key there is then swapped to the front of the range). */
static inline int64_t NAME(median_of)(const KEY *v, int64_t a, int64_t b, int64_t c, int desc)
{
    if (NAME(before)(v[a], v[b], desc)) {
        if (NAME(before)(v[b], v[c], desc))
            return b;
        if (NAME(before)(v[a], v[c], desc))
            return c;
        return a;
    }
    if (NAME(before)(v[a], v[c], desc))
        return a;
    if (NAME(before)(v[b], v[c], desc))
        return c;
    return b;
}

static void NAME(median_to_first)(struct NAME(replay) *r, int64_t result, int64_t a, int64_t b, int64_t c)
{
    NAME(swap_pair)(r, result, NAME(median_of)(r->v, a, b, c, r->desc));
}

/* The tied keys alone, followed through a partition without an index array: pos/id list them sorted by
 * where they are (and where they started). The two scans of a partition move monotonically, so a cursor from
 * each end of the list meets every tied key a swap takes; the list is rewritten in order into tp/tid: from
 * the front, the keys the left scan passed or brought in; from the back, those of the right scan; between
 * them, those no swap moved. A cursor moves only when a swap takes a tied key: the keys it passes then
 * (before x, after y) are those the scans passed without moving them. */
struct NAME(follow) {
    int32_t *pos, *id, *tp, *tid;
    int64_t lc, rc;  /* the entries [lc, rc] not reached by a scan yet */
    int64_t a, b;    /* the next entry written from the front (a) and from the back (b) of tp/tid */
};

static inline void NAME(swap_followed)(struct NAME(replay) *r, struct NAME(follow) *f, int64_t x, int64_t y)
{
    KEY *v = r->v;
    const KEY vx = v[x], vy = v[y];
    v[x] = vy;
    v[y] = vx;
    const int tie_x = (vx == r->t1) | (vx == r->t2), tie_y = (vy == r->t1) | (vy == r->t2);
    if (__builtin_expect(!(tie_x | tie_y), 1))
        return;  /* the cursors catch up at the next swap that moves a tied key, or at the end */
    const int32_t *pos = f->pos, *id = f->id;
    while (pos[f->lc] < x) {  /* passed by the left scan: they stay */
        f->tp[f->a] = pos[f->lc];
        f->tid[f->a++] = id[f->lc++];
    }
    while (pos[f->rc] > y) {  /* passed by the right scan */
        f->tp[f->b] = pos[f->rc];
        f->tid[f->b--] = id[f->rc--];
    }
    if (tie_y) {  /* the tied key at y comes to x */
        f->tp[f->a] = (int32_t)x;
        f->tid[f->a++] = id[f->rc--];
    }
    if (tie_x) {  /* and the one at x goes to y */
        f->tp[f->b] = (int32_t)y;
        f->tid[f->b--] = id[f->lc++];
    }
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

#ifndef REPLAY_REVERSE64
#define REPLAY_REVERSE64
/* x with its bits in the opposite order */
static inline uint64_t reverse64(uint64_t x)
{
    x = __builtin_bswap64(x);
    x = ((x >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((x & 0x0F0F0F0F0F0F0F0FULL) << 4);
    x = ((x >> 2) & 0x3333333333333333ULL) | ((x & 0x3333333333333333ULL) << 2);
    return ((x >> 1) & 0x5555555555555555ULL) | ((x & 0x5555555555555555ULL) << 1);
}
#endif

/* libstdc++'s unguarded partition of [first, last) around the key at pivot:
 *     for (;;) { while (v[first] before p) ++first;  --last;  while (p before v[last]) --last;
 *                if (!(first < last)) return first;  swap(first, last);  ++first; }
 * Its swaps pair the i-th key from the left that stops the left scan with the i-th key from the right that
 * stops the right one, as long as the first lies before the second. Here each scan keeps a 64-key mask of
 * its stops in its current block and takes them off bit by bit (the right scan's mask bit-reversed, so that
 * both take their lowest bit: the next stop never waits on the position of the last), so a swap costs a
 * few bit operations and no branch on a key. No key between the two scans has moved since the partition
 * began, so a mask stays right there; a key a swap placed in a scan's way stops that scan (cap_up,
 * cap_down), as in the loop above. Inlined into each caller, with fl (the tied-key list, or NULL) fixed. */
static inline __attribute__((always_inline)) int64_t NAME(unguarded_partition)(struct NAME(replay) *r, int64_t first,
                                                                              int64_t last, int64_t pivot,
                                                                              struct NAME(follow) *fl)
{
    KEY *v = r->v;
    const KEY p = v[pivot];
    const int64_t n = r->n;
    const int left_le = r->desc, right_le = !r->desc;  /* the left scan stops on !(v before p), the right on !(p before v) */
    int64_t cap_up = n, cap_down = -1;
    int64_t lb = first & ~(int64_t)63;
    uint64_t ml = NAME(stop_mask)(v, lb, n, p, left_le) & (~(uint64_t)0 << (first - lb));
    int64_t rb = (last - 1) & ~(int64_t)63;
    const int top = (int)(last - 1 - rb);
    /* bit j of mr: position rb + 63 − j */
    uint64_t mr = reverse64(NAME(stop_mask)(v, rb, n, p, right_le) &
                            (top == 63 ? ~(uint64_t)0 : (((uint64_t)1 << (top + 1)) - 1)));
    for (;;) {
        while (ml == 0 && lb + 64 <= cap_up) {
            lb += 64;
            ml = NAME(stop_mask)(v, lb, n, p, left_le);
        }
        while (mr == 0 && rb - 1 >= cap_down && rb > 0) {
            rb -= 64;
            mr = reverse64(NAME(stop_mask)(v, rb, n, p, right_le));
        }
        int64_t f = ml ? lb + __builtin_ctzll(ml) : cap_up;
        int64_t l = mr ? rb + 63 - __builtin_ctzll(mr) : cap_down;
        f = f < cap_up ? f : cap_up;
        l = l > cap_down ? l : cap_down;
        if (!(f < l))
            return f;
        if (fl == NULL)
            NAME(swap_pair)(r, f, l);
        else
            NAME(swap_followed)(r, fl, f, l);
        ml &= ml - 1;
        mr &= mr - 1;
        cap_up = l;
        cap_down = f;
    }
}

/* Whether the order of the tied keys inside [first, last) can matter: a cut through it (b with first < b < last)
 * keeps some of them and drops the others. A subrange on one side of every cut keeps all its keys or none,
 * whatever their order, so it needs no further partitioning. With no cuts given, every subrange may matter. */
static inline int NAME(straddles)(const struct NAME(replay) *r, int64_t first, int64_t last)
{
    if (r->b1 < 0 && r->b2 < 0)
        return 1;
    return (first < r->b1 && r->b1 < last) || (first < r->b2 && r->b2 < last);
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
        if (!NAME(straddles)(r, first, last) || !NAME(holds)(r->v, first, last, r->t1, r->t2))
            return 0;
        if (depth == 0)
            return 1;
        --depth;
        const int64_t mid = first + (last - first) / 2;
        NAME(median_to_first)(r, first, first + 1, mid, last - 1);
        const int64_t cut = NAME(unguarded_partition)(r, first + 1, last, first, NULL);
        if (NAME(introsort_ties)(r, cut, last, depth))
            return 1;
        last = cut;
    }
    return 0;
}

static int NAME(finite)(const KEY *v, int64_t n)
{
    int nan = 0;
    for (int64_t j = 0; j < n; j++)
        nan |= KEY_NAN(v[j]);
    return !nan;
}

static int NAME(depth_limit)(int64_t n)
{
    int lg = 0;
    while (((int64_t)1 << (lg + 1)) <= n)
        lg++;
    return 2 * lg;
}

/* Permutes keys v[0..n) as std::sort's partitioning phase would, on every subrange that holds a key equal to
 * t1 or t2 and that a cut b1 or b2 passes through (see straddles); the keys equal to t1 (or t2) then appear
 * in v in the order the sort leaves them, as far as the cuts can tell, and ix (filled with 0..n−1 first,
 * permuted along) says where each came from. Returns 0, 1 (heapsort fallback reached: not
 * replayed) or −1 for a NaN key or more than 2^31 − 1 keys. */
static int NAME(sort_ties)(KEY *v, int32_t *ix, int64_t n, int desc, KEY t1, KEY t2, int64_t b1, int64_t b2)
{
    struct NAME(replay) r = {v, ix, n, t1, t2, desc, b1, b2};
    if (n > INT32_MAX || !NAME(finite)(v, n))
        return -1;
    for (int64_t j = 0; j < n; j++)
        ix[j] = (int32_t)j;
    if (n < 2)
        return 0;
    return NAME(introsort_ties)(&r, 0, n, NAME(depth_limit)(n));
}

/* The first entry of pos[s, e) (sorted) at or after position x. */
static int64_t NAME(lower_bound)(const int32_t *pos, int64_t s, int64_t e, int64_t x)
{
    while (s < e) {
        const int64_t mid = s + (e - s) / 2;
        if (pos[mid] < x)
            s = mid + 1;
        else
            e = mid;
    }
    return s;
}

/* The partitioning of sort_ties with the tied keys followed in a list (pos/id, entries [s, e): those in
 * [first, last), sorted by position) instead of an index array. */
static int NAME(introsort_list)(struct NAME(replay) *r, int32_t *pos, int32_t *id, int32_t *tp, int32_t *tid,
                                int64_t first, int64_t last, int64_t s, int64_t e, int depth)
{
    while (last - first > SORT_THRESHOLD) {
        if (s == e || !NAME(straddles)(r, first, last))
            return 0;
        if (depth == 0)
            return 1;
        --depth;
        const int64_t mid = first + (last - first) / 2;
        const int64_t m = NAME(median_of)(r->v, first + 1, mid, last - 1, r->desc);
        /* the median goes to the front; the list stays sorted by position */
        KEY *v = r->v;
        const KEY vf = v[first];
        v[first] = v[m];
        v[m] = vf;
        const int64_t im = NAME(lower_bound)(pos, s, e, m);
        const int tie_first = pos[s] == first, tie_m = im < e && pos[im] == m;
        if (tie_first && tie_m) {
            const int32_t t = id[s];
            id[s] = id[im];
            id[im] = t;
        } else if (tie_first) {  /* first's entry moves up to m's place in the order */
            const int32_t t = id[s];
            memmove(pos + s, pos + s + 1, (size_t)(im - s - 1) * sizeof(int32_t));
            memmove(id + s, id + s + 1, (size_t)(im - s - 1) * sizeof(int32_t));
            pos[im - 1] = (int32_t)m;
            id[im - 1] = t;
        } else if (tie_m) {  /* m's entry moves to the front */
            const int32_t t = id[im];
            memmove(pos + s + 1, pos + s, (size_t)(im - s) * sizeof(int32_t));
            memmove(id + s + 1, id + s, (size_t)(im - s) * sizeof(int32_t));
            pos[s] = (int32_t)first;
            id[s] = t;
        }
        /* the pivot's entry (at first) stays; the others go through the partition */
        const int64_t s1 = s + (pos[s] == first);
        struct NAME(follow) fl = {pos, id, tp, tid, s1, e - 1, 0, e - s1 - 1};
        const int64_t cut = NAME(unguarded_partition)(r, first + 1, last, first, &fl);
        const int64_t rest = fl.rc - fl.lc + 1;  /* not reached by either scan: they stay */
        memcpy(tp + fl.a, pos + fl.lc, (size_t)rest * sizeof(int32_t));
        memcpy(tid + fl.a, id + fl.lc, (size_t)rest * sizeof(int32_t));
        memcpy(pos + s1, tp, (size_t)(e - s1) * sizeof(int32_t));
        memcpy(id + s1, tid, (size_t)(e - s1) * sizeof(int32_t));
        const int64_t split = NAME(lower_bound)(pos, s1, e, cut);
        if (NAME(introsort_list)(r, pos, id, tp, tid, cut, last, split, e, depth))
            return 1;
        last = cut;
        e = split;
    }
    return 0;
}

/* sort_ties without an index array: the keys equal to t1 or t2 (at most cap; *count says how many there
 * are) are listed in pos/id, which end sorted by where the sort leaves them, with where each started; tmp
 * holds 2·cap int32. Returns as sort_ties does, or 2 (more than cap tied keys: nothing done). */
static int NAME(sort_ties_list)(KEY *v, int64_t n, int desc, KEY t1, KEY t2, int64_t b1, int64_t b2, int32_t *pos,
                                int32_t *id, int32_t *tmp, int64_t cap, int64_t *count)
{
    struct NAME(replay) r = {v, NULL, n, t1, t2, desc, b1, b2};
    if (n > INT32_MAX || !NAME(finite)(v, n))
        return -1;
    int64_t m = 0;
    for (int64_t s = 0; s < n; s += 16) {
        const int64_t e = s + 16 < n ? s + 16 : n;
        if (e - s == 16 && !NAME(any_of16)(v + s, t1, t2))
            continue;  /* most blocks of 16 hold no tied key */
        for (int64_t j = s; j < e; j++) {
            if (v[j] == t1 || v[j] == t2) {
                if (m < cap)
                    pos[m] = id[m] = (int32_t)j;
                m++;
            }
        }
    }
    *count = m;
    if (m > cap)
        return 2;
    if (n < 2)
        return 0;
    return NAME(introsort_list)(&r, pos, id, tmp, tmp + cap, 0, n, 0, m, NAME(depth_limit)(n));
}

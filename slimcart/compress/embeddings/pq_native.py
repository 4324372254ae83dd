"""One fused C kernel per call for a product-quantized table (pq.py) at inference time.

Why: the torch path of a lookup is a chain of ops (gather codes, centroid index, gather centroids,
rotate, a binary search and a blend per hot tier, the padding mask), and at batch 1 each op costs
microseconds of dispatch against one nn.Embedding call; the chain made a DIN with PQ tables ~0.5x and
SASRec ~0.5x fp32 at batch 1. Here each lookup (and each batch-1 scoring of every row) is one call,
reading the table's own tensors. The one derived structure is each hot tier's rank bitmap, 1.5 bits
per table row per tier in memory (2% of an 8-byte-per-row PQ table), never stored on disk.

Lookup of id i, in one pass over the ids:
    the previous position's id -> a copy of the row just written (padded histories repeat one id)
    padding id                 -> the zero row
    id in a hot tier           -> that tier's row, dequantized; its position in the tier's sorted ids is
                                  the rank of i in a bitmap of the tier (set bits before i: a popcount
                                  within i's 64-bit word plus a per-word running count), O(1) where a
                                  binary search costs ~11 dependent, mispredicted steps per id
                                  (fused row-wise layout of packed_rows.py: q * scale + bias)
    otherwise                  -> x = [C_1[c_1(i)] | ... | C_M[c_M(i)]], then x R with the OPQ rotation
                                  (d axpys over R's rows; a table of centroids pre-turned by R would
                                  save them but cost M K d floats, 1 MB on SASRec's table).

Batch-1 scoring of every row: out[n] = sum_m T[m K + c_m(n)], T = (h R^T)_m C_m^T (asymmetric distance
computation; T is M K floats, L1-resident), then hot-tier rows get h . row and the padding column 0.

Only float32 inference: the torch path runs whenever autograd, tracing, torch.compile or an export
needs to see the ops, and for 16-bit tiers, which this kernel does not read (32-, 8- and 4-bit tiers
it does).
"""
from __future__ import annotations

import ctypes

import torch

from ... import native

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

typedef struct {
    const void *ids; int64_t n; int32_t ids64; int32_t bits;
    const uint8_t *data; int64_t row_bytes; int64_t pdim;
    const uint64_t *member;            /* bit i set: row i is in this tier (NULL: binary search) */
    const uint32_t *before;            /* before[w]: set bits in member[0..w) */
} Tier;

typedef struct {
    const uint8_t *codes; int64_t n_rows; int32_t m, k, bits, s, d;
    const float *book;                 /* the codebooks stacked: (m k, s) */
    const float *rot;                  /* R (d, d), row-major, or NULL */
    int64_t pad;                       /* -1: no padding row */
    int32_t n_tiers; const Tier *tiers;
} Table;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, man = h & 0x3ffu, f;
    if (e == 0) {
        float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    f = (e == 31) ? (sign | 0x7f800000u | (man << 13)) : (sign | ((e + 112u) << 23) | (man << 13));
    float out; memcpy(&out, &f, 4); return out;
}

static inline int64_t tier_id(const Tier *t, int64_t p) {
    return t->ids64 ? ((const int64_t *)t->ids)[p] : (int64_t)((const int32_t *)t->ids)[p];
}

static int64_t find(const Tier *t, int64_t id) {
    if (t->member) {
        const uint64_t word = t->member[id >> 6], below = word & ((1ull << (id & 63)) - 1);
        if (!((word >> (id & 63)) & 1)) return -1;
        return (int64_t)t->before[id >> 6] + __builtin_popcountll(below);
    }
    int64_t lo = 0, hi = t->n - 1;
    while (lo <= hi) {
        int64_t mid = (lo + hi) >> 1;
        int64_t v = tier_id(t, mid);
        if (v == id) return mid;
        if (v < id) lo = mid + 1; else hi = mid - 1;
    }
    return -1;
}

/* a quantized row's scale and bias, stored after its codes: float32 at 8 bits, float16 at 4 */
static void scale_bias(const Tier *t, const uint8_t *q, float *scale, float *bias) {
    if (t->bits == 8) {
        memcpy(scale, q + t->pdim, 4); memcpy(bias, q + t->pdim + 4, 4);
        return;
    }
    uint16_t hs, hb; int64_t off = t->pdim / 2;
    memcpy(&hs, q + off, 2); memcpy(&hb, q + off + 2, 2);
    *scale = half_to_float(hs); *bias = half_to_float(hb);
}

static void tier_row(const Tier *t, int64_t pos, int d, float *out) {
    const uint8_t *q = t->data + pos * t->row_bytes;
    if (t->bits == 32) { memcpy(out, q, (size_t)d * 4); return; }
    float scale, bias;
    scale_bias(t, q, &scale, &bias);
    if (t->bits == 8)
        for (int j = 0; j < d; j++) out[j] = (float)q[j] * scale + bias;
    else
        for (int j = 0; j < d; j++) out[j] = (float)((q[j >> 1] >> ((j & 1) * 4)) & 15) * scale + bias;
}

static inline int code_of(const Table *t, const uint8_t *c, int m) {
    return t->bits == 8 ? c[m] : (c[m >> 1] >> ((m & 1) * 4)) & 15;
}

static void decode(const Table *t, int64_t row, float *restrict out) {
    const int m = t->m, k = t->k, s = t->s, d = t->d;
    const uint8_t *c = t->codes + row * (t->bits == 8 ? m : m / 2);
    float x[d];
    float *dst = t->rot ? x : out;
    for (int i = 0; i < m; i++)
        memcpy(dst + i * s, t->book + ((int64_t)i * k + code_of(t, c, i)) * s, (size_t)s * 4);
    if (!t->rot) return;
    /* out = x R, as d axpys over R's rows (each a vector op over out) */
    for (int j = 0; j < d; j++) out[j] = 0.0f;
    for (int i = 0; i < d; i++) {
        const float xi = x[i], *restrict r = t->rot + (int64_t)i * d;
        for (int j = 0; j < d; j++) out[j] += xi * r[j];
    }
}

/* rows of ids[0..n) into out (n, d); returns 0, or 1 + the position of the first id out of range */
int64_t pq_lookup(const Table *t, const int64_t *ids, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        int64_t id = ids[i];
        float *o = out + i * t->d;
        if (id < 0 || id >= t->n_rows) return i + 1;
        if (i > 0 && id == ids[i - 1]) { memcpy(o, o - t->d, (size_t)t->d * 4); continue; }
        if (id == t->pad) { memset(o, 0, (size_t)t->d * 4); continue; }
        int done = 0;
        for (int32_t q = 0; q < t->n_tiers && !done; q++) {
            int64_t pos = find(&t->tiers[q], id);
            if (pos >= 0) { tier_row(&t->tiers[q], pos, t->d, o); done = 1; }
        }
        if (!done) decode(t, id, o);
    }
    return 0;
}

/* h . row of a tier row without materialising it: for the quantized layouts
   h . (q scale + bias) = scale (h . q) + bias sum(h). LANES partial sums keep the adds independent and
   let the compiler vectorise; 4-bit rows read each byte once against h's even and odd columns (he, ho). */
#define LANES 16
static float lanes_sum(float *acc) {
    for (int w = LANES / 2; w > 0; w /= 2) for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

static float tier_dot(const Tier *t, int64_t pos, const float *h, const float *he, const float *ho, float hsum, int d) {
    const uint8_t *q = t->data + pos * t->row_bytes;
    float acc[LANES] = {0};
    int j = 0;
    if (t->bits == 32) {
        const float *w = (const float *)q;  /* float32 rows, 4-byte aligned */
        for (; j + LANES <= d; j += LANES) for (int l = 0; l < LANES; l++) acc[l] += h[j + l] * w[j + l];
        for (; j < d; j++) acc[0] += h[j] * w[j];
        return lanes_sum(acc);
    }
    if (t->bits == 8) {
        for (; j + LANES <= d; j += LANES) for (int l = 0; l < LANES; l++) acc[l] += h[j + l] * (float)q[j + l];
        for (; j < d; j++) acc[0] += h[j] * (float)q[j];
    } else {
        const int nb = d / 2;  /* d is even for 4-bit rows (stored_dim) */
        for (; j + LANES <= nb; j += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += he[j + l] * (float)(q[j + l] & 15) + ho[j + l] * (float)(q[j + l] >> 4);
        for (; j < nb; j++) acc[0] += he[j] * (float)(q[j] & 15) + ho[j] * (float)(q[j] >> 4);
    }
    float scale, bias;
    scale_bias(t, q, &scale, &bias);
    return scale * lanes_sum(acc) + bias * hsum;
}

/* out[n] = sum_m table[m k + c_m(n)] for every row, ROWS rows at a time: their sums are independent
   chains, so the adds pipeline instead of each waiting on the last (one row's 16 dependent adds were
   latency-bound at ~3x this cost). A sub-space-major copy of the codes with AVX-512 gathers measured
   no faster on this EPYC and would double the codes' memory. Then tier rows h . row, padding 0. */
#define ROWS 16
void pq_scores1(const Table *t, const float *table, const float *h, float *out) {
    const int m = t->m, k = t->k, bytes = t->bits == 8 ? t->m : t->m / 2;
    const int64_t n = t->n_rows;
    int64_t r = 0;
    for (; r + ROWS <= n; r += ROWS) {
        const uint8_t *c = t->codes + r * bytes;
        float acc[ROWS];
        if (t->bits == 8) {
            for (int l = 0; l < ROWS; l++) acc[l] = table[c[l * bytes]];
            for (int i = 1; i < m; i++) {
                const float *ti = table + i * k;
                for (int l = 0; l < ROWS; l++) acc[l] += ti[c[l * bytes + i]];
            }
        } else {
            for (int l = 0; l < ROWS; l++) acc[l] = 0.0f;
            for (int i = 0; i < m; i += 2) {
                const float *lo = table + i * k, *hi = lo + k;
                for (int l = 0; l < ROWS; l++) {
                    uint8_t b = c[l * bytes + (i >> 1)];
                    acc[l] += lo[b & 15] + hi[b >> 4];
                }
            }
        }
        memcpy(out + r, acc, sizeof acc);
    }
    for (const uint8_t *c = t->codes + r * bytes; r < n; r++, c += bytes) {
        float acc = 0.0f;
        for (int i = 0; i < m; i++) acc += table[i * k + code_of(t, c, i)];
        out[r] = acc;
    }
    float hsum = 0.0f, he[t->d / 2 + 1], ho[t->d / 2 + 1];
    for (int j = 0; j < t->d; j++) hsum += h[j];
    for (int j = 0; j < t->d / 2; j++) { he[j] = h[2 * j]; ho[j] = h[2 * j + 1]; }
    for (int32_t q = 0; q < t->n_tiers; q++) {
        const Tier *tr = &t->tiers[q];
        for (int64_t p = 0; p < tr->n; p++) {
            out[tier_id(tr, p)] = tier_dot(tr, p, h, he, ho, hsum, t->d);
        }
    }
    if (t->pad >= 0) out[t->pad] = 0.0f;
}
"""


class _Tier(ctypes.Structure):
    _fields_ = [("ids", ctypes.c_void_p), ("n", ctypes.c_int64), ("ids64", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("data", ctypes.c_void_p), ("row_bytes", ctypes.c_int64), ("pdim", ctypes.c_int64),
                ("member", ctypes.c_void_p), ("before", ctypes.c_void_p)]


class _Table(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("n_rows", ctypes.c_int64), ("m", ctypes.c_int32), ("k", ctypes.c_int32),
                ("bits", ctypes.c_int32), ("s", ctypes.c_int32), ("d", ctypes.c_int32),
                ("book", ctypes.c_void_p), ("rot", ctypes.c_void_p), ("pad", ctypes.c_int64), ("n_tiers", ctypes.c_int32),
                ("tiers", ctypes.POINTER(_Tier))]


def library():
    lib = native.load("pq_kernels", SOURCE)
    if lib is not None and not getattr(lib, "_typed", False):
        lib.pq_lookup.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        lib.pq_lookup.restype = ctypes.c_int64
        lib.pq_scores1.argtypes = [ctypes.c_void_p] * 4
        lib.pq_scores1.restype = None
        lib._typed = True
    return lib


def inference_only() -> bool:
    """Whether ops may run outside torch's view: no autograd, tracing, compiling or ONNX export."""
    # torch.export (and so the ONNX exporter) runs under is_compiling; TorchScript tracing sets a tracing
    # state. torch.onnx.is_in_onnx_export() is left out: ~1 us a call, and its exports trace as above.
    return not (torch.is_grad_enabled() or torch._C._get_tracing_state() is not None or torch.compiler.is_compiling())


def rank_bitmap(ids: torch.Tensor, n_rows: int):
    """(member, before) for a tier's ids: member bit i set when row i is in the tier, before[w] the set
    bits in words 0..w-1, so the rank of a member id is its position in the sorted ids. None when the
    ids are not strictly increasing within [0, n_rows) (the kernel then binary-searches, as the torch
    path does)."""
    import numpy as np

    a = ids.detach().cpu().numpy().astype(np.int64, copy=False)
    if a.size and (a[0] < 0 or a[-1] >= n_rows or (a.size > 1 and not (np.diff(a) > 0).all())):
        return None
    words = max(1, (n_rows + 63) // 64)
    bits = np.zeros(words * 64, dtype=bool)
    bits[a] = True
    member = np.packbits(bits, bitorder="little").view(np.uint64)  # bit i of word w: row 64 w + i
    before = np.zeros(words, dtype=np.uint32)
    np.cumsum(bits.reshape(words, 64).sum(axis=1, dtype=np.uint32)[:-1], out=before[1:])
    return member, before


class NativePQ:
    """The C view of one ProductQuantizedEmbedding: raw pointers to its tensors, rebuilt whenever a
    tensor is replaced (.to(), load_state_dict of new storage) or the codebooks / rotation change.
    A call takes the current view into a local first, so a rebuild by another thread never frees
    what a running call reads."""

    def __init__(self, table):
        self.lib = library()
        self.table = table
        self._tiers = list(zip(table.tier_ids, table.tier_rows))  # the modules (fixed); their tensors may change
        self._view = None

    @staticmethod
    def supported(table) -> bool:
        return all(rows.bits in (32, 8, 4) for rows in table.tier_rows)

    def _key(self):
        """What the view depends on, read straight from the modules' tensor dicts (an attribute read
        through nn.Module.__getattr__ costs ~1 us, and this runs on every call)."""
        t = self.table
        books, rot = t._parameters["codebooks"], t._buffers["rotation"]
        key = [t._buffers["codes"].data_ptr(), books.data_ptr(), books._version]
        if rot is not None:
            key += [rot.data_ptr(), rot._version]
        for held, rows in self._tiers:
            data = rows._parameters.get("data")
            ids = held._buffers["ids"]
            key += [ids.data_ptr(), ids._version, (rows._buffers["data"] if data is None else data).data_ptr()]
        return tuple(key)

    def _build(self, key) -> tuple:
        t = self.table
        m, k, s = t.codebooks.shape
        book = t.codebooks.detach().reshape(m * k, s)  # the parameter's own storage, no copy
        rot = None if t.rotation is None else t.rotation.contiguous()
        tiers = [(held.ids, rows.data.detach(), rows) for held, rows in self._tiers if len(held)]
        arr = (_Tier * max(1, len(tiers)))()
        ranks = [rank_bitmap(ids, t.num_embeddings) for ids, _, _ in tiers]
        for i, ((ids, data, rows), rank) in enumerate(zip(tiers, ranks)):
            member, before = rank if rank is not None else (None, None)
            arr[i] = _Tier(ids.data_ptr(), ids.numel(), int(ids.dtype == torch.int64), rows.bits, data.data_ptr(),
                           data.shape[1] * data.element_size(), rows.pdim,
                           None if member is None else member.ctypes.data, None if before is None else before.ctypes.data)
        pad = -1 if t.padding_idx is None else int(t.padding_idx) % t.num_embeddings
        struct = _Table(t.codes.data_ptr(), t.num_embeddings, m, k, t.code_bits, s, t.embedding_dim, book.data_ptr(),
                        None if rot is None else rot.data_ptr(), pad, len(tiers), ctypes.cast(arr, ctypes.POINTER(_Tier)))
        # the view holds every tensor and struct its pointers name, so none is freed while it lives
        return key, ctypes.addressof(struct), struct, arr, book, rot, tiers, t.codes, ranks

    def _current(self) -> tuple:
        view, key = self._view, self._key()
        if view is None or view[0] != key:
            view = self._view = self._build(key)
        return view

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows [n, d] of flat ids (any integer dtype); IndexError for an id outside the table."""
        view = self._current()
        if ids.dtype != torch.int64:
            ids = ids.to(torch.int64)
        ids = ids.contiguous()
        out = torch.empty(ids.numel(), self.table.embedding_dim)
        bad = self.lib.pq_lookup(view[1], ids.data_ptr(), ids.numel(), out.data_ptr())
        if bad:
            raise IndexError(f"index {int(ids[bad - 1])} is out of range for a table of {self.table.num_embeddings} rows")
        return out

    def scores1(self, table: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Scores [1, N] from the product table T [M K] of one query h [d] (unrotated, for tier rows)."""
        view = self._current()
        table, h = table.contiguous(), h.contiguous()
        out = torch.empty(1, self.table.num_embeddings)
        self.lib.pq_scores1(view[1], table.data_ptr(), h.data_ptr(), out.data_ptr())
        return out

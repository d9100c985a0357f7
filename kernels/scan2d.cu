// Row-sweep CUDA kernels of the two 2D selective scans (docs/scans.md).
//
// Row sweep (scan2d_fwd, scan2d_bwd): one thread block per (batch, channel). Threads are laid out as
// (32*CW) x NGRP: thread (tx, ty)
// owns the K consecutive columns [tx*K, tx*K+K) of every row and the S states [ty*S, ty*S+S)
// (NGRP*S == NS). The block sweeps the H rows top to bottom; each row is a 1D linear scan along the
// columns (sequential within a thread, warp shuffles across a warp, shared memory across warps),
// and the vertical carry of each column stays in registers. Hidden states never reach global
// memory except one checkpoint row every R rows, from which the backward recomputes the states of
// R rows into shared memory before sweeping them bottom to top. The per-cell inputs of a row (u, the
// steps, the gated output gradient) go once per block through shared memory, loaded a row step ahead.
//
// Tiled forward (scan2d_tile_fwd, MODE 0 only): the 2DMamba forward of wide rows on 32 x 32 tiles.
// Tiled backward (scan2d_tile_bwd, MODE 0 only): the 2DMamba backward on tiles of 32 / BTS rows x 32
// columns, BCH channels per block, from the checkpoint rows and the horizontal states at every 32nd
// column (gck), which both forwards write when given the pointers. See their own headers below.
//
// MODE 0: 2DMamba (horizontal scan, then vertical scan with the same decay, gate y*silu(z)).
// MODE 1: Mamba2D (½ average of the left and upper terms inside the grid, plain scans on the
//         first row and column).
// IN_KIND 0: float, 1: bfloat16, 2: float16 for activations; A, D and dt_bias are always float.
// The recurrence state is float. No host headers, so NVRTC and nvcc both compile it.

#ifndef MODE
#define MODE 0
#endif
#ifndef IN_KIND
#define IN_KIND 0
#endif
#ifndef NS
#define NS 16
#endif
#ifndef S
#define S 4
#endif
#ifndef K
#define K 8
#endif
#ifndef CW
#define CW 1
#endif

#define NGRP (NS / S)
#define NTX (32 * CW)
#define ROWCAP (NTX * K)
#define LOG2E 1.4426950408889634f
#define FIXED_SCALE 4294967296.0f  // 2^32: fixed point of the deterministic dB, dC sums

#if IN_KIND == 0
typedef float T;
__device__ __forceinline__ float ld(const T* p, long i) { return p[i]; }
__device__ __forceinline__ void st(T* p, long i, float v) { p[i] = v; }
#elif IN_KIND == 1
typedef unsigned short T;
__device__ __forceinline__ float ld(const T* p, long i) { return __uint_as_float(((unsigned int)p[i]) << 16); }
__device__ __forceinline__ void st(T* p, long i, float v) {
    unsigned int x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) { p[i] = (unsigned short)((x >> 16) | 0x40u); return; }  // NaN stays NaN
    x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
    p[i] = (unsigned short)(x >> 16);
}
#else
typedef unsigned short T;
__device__ __forceinline__ float ld(const T* p, long i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i]));
    return f;
}
__device__ __forceinline__ void st(T* p, long i, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i] = h;
}
#endif

// 2^x on the special-function unit (ex2.approx: about 2 ulp, like exp2f). The arguments here are decays
// A*dt*log2(e) <= 0; results under 2^-126 flush to zero, which a decay of that size is anyway.
__device__ __forceinline__ float ex2_(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }
// softplus with PyTorch's threshold (identity above 20)
__device__ __forceinline__ float softplusf_(float x) { return x > 20.f ? x : log1pf(expf(x)); }

#ifndef PF_ROWS
#define PF_ROWS 8  // rows fetched ahead into L2 by the bulk prefetches below
#endif

// Ask the copy engine to bring bytes [p, p + bytes) into L2 (a hint: no data comes back, nothing
// waits). The range is cut to whole 16-byte units inside it, as cp.async.bulk requires.
__device__ __forceinline__ void l2_prefetch(const void* p, long bytes) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900  // a Hopper instruction; older GPUs go without the hint
    if (!p || bytes <= 0) return;
    unsigned long long g;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(p));
    const unsigned long long lo = g & ~15ull, hi = (g + (unsigned long long)bytes) & ~15ull;
    if (hi > lo) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"((unsigned)(hi - lo)) : "memory");
#endif
}

// Rows [r0, r1) of one (batch, channel) grid: the per-channel planes and the NS planes of each B and
// C. One range per thread of the block (at most 5 + 3*NS of them).
__device__ __forceinline__ void prefetch_rows(int r0, int r1, int W, long HW, int tid, const T* up, const T* d1p,
                                              const T* d2p, const T* zp, const T* gp, const T* B1p, const T* B2p,
                                              const T* Cp) {
#ifdef NO_PREFETCH
    return;
#endif
    if (r1 <= r0) return;
    const long off = (long)r0 * W, len = (long)(r1 - r0) * W * (long)sizeof(T);
    const T* p = nullptr;
    if (tid < 5) {
        p = tid == 0 ? up : tid == 1 ? d1p : tid == 2 ? d2p : tid == 3 ? zp : gp;
        if (p) l2_prefetch(p + off, len);
    } else if (tid < 5 + 3 * NS) {
        const int q = (tid - 5) / NS, n = (tid - 5) % NS;
        p = q == 0 ? B1p : q == 1 ? B2p : Cp;
        if (p) l2_prefetch(p + n * HW + off, len);
    }
}

// Inclusive left-to-right scan h[c] = a[c]*h[c-1] + b[c] of S independent rows from zero state.
// The results replace b; inc[s] receives the state entering this thread's first column.
// sm: this state group's scratch, S*CW*2 floats. Every thread of the block must call it.
__device__ __forceinline__ void scan_fwd(float (&a)[S][K], float (&b)[S][K], float (&inc)[S], float* sm,
                                         int lane, int warp) {
    float ca[S], cb[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        ca[s] = 1.f;
        cb[s] = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            cb[s] = a[s][k] * cb[s] + b[s][k];
            ca[s] *= a[s][k];
        }
    }
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
#pragma unroll
        for (int s = 0; s < S; ++s) {
            float pa = __shfl_up_sync(0xffffffffu, ca[s], d);
            float pb = __shfl_up_sync(0xffffffffu, cb[s], d);
            if (lane >= d) {
                cb[s] = ca[s] * pb + cb[s];
                ca[s] *= pa;
            }
        }
    }
#pragma unroll
    for (int s = 0; s < S; ++s) {
        float ea = __shfl_up_sync(0xffffffffu, ca[s], 1);
        float eb = __shfl_up_sync(0xffffffffu, cb[s], 1);
        if (lane == 0) { ea = 1.f; eb = 0.f; }
        float carry = 0.f;
#if CW > 1
        if (lane == 31) { sm[(s * CW + warp) * 2] = ca[s]; sm[(s * CW + warp) * 2 + 1] = cb[s]; }
#endif
        ca[s] = ea;
        cb[s] = eb;
        inc[s] = carry;
    }
#if CW > 1
    __syncthreads();
#pragma unroll
    for (int s = 0; s < S; ++s) {
        float carry = 0.f;
        for (int w = 0; w < warp; ++w) carry = sm[(s * CW + w) * 2] * carry + sm[(s * CW + w) * 2 + 1];
        inc[s] = carry;
    }
    __syncthreads();
#endif
#pragma unroll
    for (int s = 0; s < S; ++s) {
        float h = ca[s] * inc[s] + cb[s];
        inc[s] = h;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            h = a[s][k] * h + b[s][k];
            b[s][k] = h;
        }
    }
}

// Inclusive right-to-left scan h[c] = a[c]*h[c+1] + b[c] from zero state; results replace b.
__device__ __forceinline__ void scan_rev(float (&a)[S][K], float (&b)[S][K], float* sm, int lane, int warp) {
    float ca[S], cb[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        ca[s] = 1.f;
        cb[s] = 0.f;
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
            cb[s] = a[s][k] * cb[s] + b[s][k];
            ca[s] *= a[s][k];
        }
    }
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
#pragma unroll
        for (int s = 0; s < S; ++s) {
            float pa = __shfl_down_sync(0xffffffffu, ca[s], d);
            float pb = __shfl_down_sync(0xffffffffu, cb[s], d);
            if (lane + d < 32) {
                cb[s] = ca[s] * pb + cb[s];
                ca[s] *= pa;
            }
        }
    }
    float inc[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        float ea = __shfl_down_sync(0xffffffffu, ca[s], 1);
        float eb = __shfl_down_sync(0xffffffffu, cb[s], 1);
        if (lane == 31) { ea = 1.f; eb = 0.f; }
#if CW > 1
        if (lane == 0) { sm[(s * CW + warp) * 2] = ca[s]; sm[(s * CW + warp) * 2 + 1] = cb[s]; }
#endif
        ca[s] = ea;
        cb[s] = eb;
        inc[s] = 0.f;
    }
#if CW > 1
    __syncthreads();
#pragma unroll
    for (int s = 0; s < S; ++s) {
        float carry = 0.f;
        for (int w = CW - 1; w > warp; --w) carry = sm[(s * CW + w) * 2] * carry + sm[(s * CW + w) * 2 + 1];
        inc[s] = carry;
    }
    __syncthreads();
#endif
#pragma unroll
    for (int s = 0; s < S; ++s) {
        float h = ca[s] * inc[s] + cb[s];
#pragma unroll
        for (int k = K - 1; k >= 0; --k) {
            h = a[s][k] * h + b[s][k];
            b[s][k] = h;
        }
    }
}

// Mamba2D weights of the horizontal (left) and vertical (upper) terms at cell (i, j).
__device__ __forceinline__ float w_left(int i, int j) { return i == 0 ? 1.f : (j == 0 ? 0.f : 0.5f); }
__device__ __forceinline__ float w_up(int i, int j) { return i == 0 ? 0.f : (j == 0 ? 1.f : 0.5f); }

// One forward row: given the states hv of row i-1 (zero for i = 0), leave the states of row i in hv.
// d1, d2: the steps (2DMamba: softplus(dt + bias) in d1); du1, du2: the steps times u.
// b1r, b2r: row i of B1 (, B2) for each of this thread's states.
// gk (2DMamba, may be null): this grid's horizontal states at the last column of every 32-column chunk
// but the last, [chunk][NS][H], for the tiled backward.
__device__ __forceinline__ void forward_row(int i, int H, int W, int c0, const float (&d1)[K], const float (&du1)[K],
                                            const float (&d2)[K], const float (&du2)[K], const T* const (&b1r)[S],
                                            const T* const (&b2r)[S], const float (&A1r)[S], const float (&A2r)[S],
                                            int ty, float (&hv)[S][K], float* scan_sm, int lane, int warp,
                                            float* gk) {
    float a[S][K], b[S][K], inc[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int col = c0 + k;
            if (col < W) {
#if MODE == 0
                a[s][k] = ex2_(d1[k] * A1r[s]);
                b[s][k] = du1[k] * ld(b1r[s], col);
#else
                const float at = ex2_(d1[k] * A1r[s]);
                const float al = ex2_(d2[k] * A2r[s]);
                const float ut = du1[k] * ld(b1r[s], col);
                const float ul = du2[k] * ld(b2r[s], col);
                const float wl = w_left(i, col), wu = w_up(i, col);
                a[s][k] = wl * al;
                b[s][k] = wl * ul + wu * (at * hv[s][k] + ut);
#endif
            } else {
                a[s][k] = 1.f;
                b[s][k] = 0.f;
            }
        }
    }
    scan_fwd(a, b, inc, scan_sm, lane, warp);
#if MODE == 0
    if (gk) {
        // at most one of this thread's columns ends a 32-column chunk (K <= 32)
        const int kk = 31 - (c0 & 31);
        if (kk < K && c0 + kk + 1 < W) {
#pragma unroll
            for (int s = 0; s < S; ++s) {
                float v = b[s][0];
#pragma unroll
                for (int k = 1; k < K; ++k) v = k == kk ? b[s][k] : v;
                gk[((long)((c0 + kk) >> 5) * NS + ty * S + s) * H + i] = v;
            }
        }
    }
#endif
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
        for (int k = 0; k < K; ++k) {
#if MODE == 0
            hv[s][k] = a[s][k] * hv[s][k] + b[s][k];
#else
            hv[s][k] = b[s][k];
#endif
        }
}

// The per-cell inputs of row i, once per block: the forward's warps (one per state group) all read
// them from shared memory instead of each loading u and dt and evaluating the softplus again.
// cells: [NCELLP][ROWCAP] = 2DMamba: d1, d1*u; Mamba2D: d1, d1*u, d2, d2*u. Thread tid handles columns
// cell_col(tid, c), c < CPT: the columns whose output it also writes, so u (and the 2DMamba gate, loaded
// into d2) stay in its registers for that.
#define CPT ((K + NGRP - 1) / NGRP)
#define NCELLP (MODE == 0 ? 2 : 4)

// The column of thread tid's c-th cell of a row, in every per-cell pass of both row-sweep kernels (loads,
// stores, the output): the registers a thread keeps for its columns rely on this one mapping.
__device__ __forceinline__ int cell_col(int tid, int c) { return tid + c * NTX * NGRP; }
struct RawCells {
    float u[CPT], d1[CPT], d2[CPT];
};

__device__ __forceinline__ void load_cells(int i, int W, const T* up, const T* d1p, const T* d2p, int tid,
                                           RawCells& r) {
    const long row = (long)i * W;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
        const int col = cell_col(tid, c);
        if (col < W) {
            r.u[c] = ld(up, row + col);
            r.d1[c] = ld(d1p, row + col);
            r.d2[c] = d2p ? ld(d2p, row + col) : 0.f;
        }
    }
}

__device__ __forceinline__ void store_cells(int W, float bias, const RawCells& r, float* cells, int tid) {
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
        const int col = cell_col(tid, c);
        if (col < W) {
#if MODE == 0
            const float d = softplusf_(r.d1[c] + bias);
            cells[col] = d;
            cells[ROWCAP + col] = d * r.u[c];
#else
            cells[col] = r.d1[c];
            cells[ROWCAP + col] = r.d1[c] * r.u[c];
            cells[2 * ROWCAP + col] = r.d2[c];
            cells[3 * ROWCAP + col] = r.d2[c] * r.u[c];
#endif
        }
    }
}

// The per-cell inputs of the backward's adjoint row i: [ADJ_CELLS][ROWCAP] = u, d1 (2DMamba:
// softplus(dt + bias)), [d2 (Mamba2D),] and the output gradient dy (2DMamba: times silu(z)); loaded
// into registers a row step ahead, then stored (as for the forward's cells).
#define ADJ_CELLS (MODE == 0 ? 3 : 4)
#define RED_ROWS (3 * NGRP > 4 ? 3 * NGRP : 4)  // rows of the backward's red[] (also holds the cells)
struct RawAdjoint {
    float u[CPT], d1[CPT], d2[CPT], g[CPT], z[CPT];
};

__device__ __forceinline__ void load_adjoint_cells(int i, int W, const T* up, const T* d1p, const T* d2p, const T* gp,
                                                   const T* zp, int tid, RawAdjoint& r) {
    const long row = (long)i * W;
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
        const int col = cell_col(tid, c);
        if (col < W) {
            r.u[c] = ld(up, row + col);
            r.d1[c] = ld(d1p, row + col);
            r.g[c] = ld(gp, row + col);
#if MODE == 0
            r.z[c] = zp ? ld(zp, row + col) : 0.f;
#else
            r.d2[c] = ld(d2p, row + col);
#endif
        }
    }
}

__device__ __forceinline__ void store_adjoint_cells(int W, float bias, bool gated, const RawAdjoint& r, float* cells,
                                                    int tid) {
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
        const int col = cell_col(tid, c);
        if (col < W) {
            cells[col] = r.u[c];
            float dy = r.g[c];
#if MODE == 0
            cells[ROWCAP + col] = softplusf_(r.d1[c] + bias);
            if (gated) dy *= r.z[c] * sigmoidf_(r.z[c]);
#else
            cells[ROWCAP + col] = r.d1[c];
            cells[2 * ROWCAP + col] = r.d2[c];
#endif
            cells[(ADJ_CELLS - 1) * ROWCAP + col] = dy;
        }
    }
}

__device__ __forceinline__ void read_cells(int W, int c0, const float* cells, float (&d1)[K], float (&du1)[K],
                                           float (&d2)[K], float (&du2)[K]) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const int col = c0 + k;
        const bool in = col < W;
        d1[k] = in ? cells[col] : 0.f;
        du1[k] = in ? cells[ROWCAP + col] : 0.f;
#if MODE == 1
        d2[k] = in ? cells[2 * ROWCAP + col] : 0.f;
        du2[k] = in ? cells[3 * ROWCAP + col] : 0.f;
#else
        d2[k] = 0.f;
        du2[k] = 0.f;
#endif
    }
}

// Shared memory of scan2d_fwd, in this order (the host's LaunchConfig.fwd_smem mirrors it): the scan
// scratch [NGRP][S * CW * 2], NBUF rows of per-group sums of y [NBUF][NGRP][ROWCAP] and NBUF rows of
// cells [NBUF][NCELLP][ROWCAP]. With two of each a row step needs one barrier, not two.
#ifndef NBUF
#define NBUF 2
#endif
// C of a row is loaded before its scan, which then covers the loads' latency, where a thread holds at
// most 16 (state, column) pairs; more would spill registers. (-DEARLY_C=0 / 1 forces either, to measure.)
#ifndef EARLY_C
#define EARLY_C (S * K <= 16)
#endif
extern "C" __global__ void __launch_bounds__(NTX * NGRP)
scan2d_fwd(const T* __restrict__ u, const T* __restrict__ dt1, const T* __restrict__ dt2, const T* __restrict__ z,
           const T* __restrict__ B1, const T* __restrict__ B2, const T* __restrict__ C, const float* __restrict__ A1,
           const float* __restrict__ A2, const float* __restrict__ D, const float* __restrict__ dt_bias,
           T* __restrict__ out, float* __restrict__ ckpt, float* __restrict__ gck, int H, int W, int E, int R) {
    extern __shared__ float smem[];
    const int be = blockIdx.x, b = be / E, e = be % E;
    const int tx = threadIdx.x, ty = threadIdx.y, lane = tx & 31, warp = tx >> 5;
    const int c0 = tx * K;
    const long HW = (long)H * W;
    const int tid = ty * NTX + tx;
    float* scan_sm = smem;
    float* ypart = scan_sm + NGRP * S * CW * 2;  // [NBUF][NGRP][ROWCAP]
    float* cells = ypart + NBUF * NGRP * ROWCAP;  // [NBUF][NCELLP][ROWCAP], see store_cells
    scan_sm += ty * (S * CW * 2);
    const T* up = u + (long)be * HW;
    const T* d1p = dt1 + (long)be * HW;
    const T* zp = z ? z + (long)be * HW : nullptr;
    // 2DMamba's raw cells carry the gate where Mamba2D's carry the second step
    const T* d2p = MODE == 0 ? zp : dt2 + (long)be * HW;
    const T* B1p = B1 + (long)b * NS * HW;
    const T* B2p = B2 ? B2 + (long)b * NS * HW : nullptr;
    const T* Cp = C + (long)b * NS * HW;
    const float bias = dt_bias ? dt_bias[e] : 0.f;
    const float Dv = D ? D[e] : 0.f;
    const int nseg = (H + R - 1) / R;
    float* gk = gck ? gck + (long)be * ((W + 31) / 32 - 1) * NS * H : nullptr;
    float A1r[S], A2r[S];
    long plane_off[S];  // where state ty*S+s's plane starts in B and C
#pragma unroll
    for (int s = 0; s < S; ++s) {
        A1r[s] = A1[e * NS + ty * S + s] * LOG2E;
        A2r[s] = A2 ? A2[e * NS + ty * S + s] * LOG2E : 0.f;
        plane_off[s] = (long)(ty * S + s) * HW;
    }
    float hv[S][K];
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
        for (int k = 0; k < K; ++k) hv[s][k] = 0.f;

    prefetch_rows(0, min(H, PF_ROWS), W, HW, tid, up, d1p, d2p, zp, nullptr, B1p, B2p, Cp);
    // the raw inputs of a row are loaded into registers two rows ahead of their use, one row ahead of
    // going to shared memory, so that their latency hides behind a row step; the thread keeps u (and
    // the gate) of the columns whose output it writes
    RawCells raw;
    load_cells(0, W, up, d1p, d2p, tid, raw);
    store_cells(W, bias, raw, cells, tid);
    float ucur[CPT], zcur[CPT];
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
        ucur[c] = raw.u[c];
        zcur[c] = raw.d2[c];
    }
    if (H > 1) load_cells(1, W, up, d1p, d2p, tid, raw);
    __syncthreads();
    int next_ckpt = R - 1;  // the row after which the next checkpoint row is saved
    for (int i = 0; i < H; ++i) {
        if (i % PF_ROWS == 0)
            prefetch_rows(i + PF_ROWS, min(H, i + 2 * PF_ROWS), W, HW, tid, up, d1p, d2p, zp, nullptr, B1p, B2p, Cp);
        const int buf = NBUF == 2 ? (i & 1) : 0;
        float d1[K], du1[K], d2[K], du2[K];
        read_cells(W, c0, cells + buf * NCELLP * ROWCAP, d1, du1, d2, du2);
        const long row = (long)i * W;
        const T* b1r[S];
        const T* b2r[S];
        const T* cr[S];
#pragma unroll
        for (int s = 0; s < S; ++s) {
            b1r[s] = B1p + plane_off[s] + row;
            b2r[s] = B2p ? B2p + plane_off[s] + row : nullptr;
            cr[s] = Cp + plane_off[s] + row;
        }
        float cv[S][K];  // (EARLY_C) this row's C
#pragma unroll
        for (int s = 0; s < S; ++s)
#pragma unroll
            for (int k = 0; k < K; ++k) cv[s][k] = EARLY_C && c0 + k < W ? ld(cr[s], c0 + k) : 0.f;
        forward_row(i, H, W, c0, d1, du1, d2, du2, b1r, b2r, A1r, A2r, ty, hv, scan_sm, lane, warp, gk);
        float yp[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            yp[k] = 0.f;
            const int col = c0 + k;
            if (col < W) {
#pragma unroll
                for (int s = 0; s < S; ++s) yp[k] += (EARLY_C ? cv[s][k] : ld(cr[s], col)) * hv[s][k];
            }
        }
        if (i == next_ckpt && i + 1 < H) {
            next_ckpt += R;
            float* cp = ckpt + ((long)be * (nseg - 1) + (i + 1) / R - 1) * NS * W;
#pragma unroll
            for (int s = 0; s < S; ++s)
#pragma unroll
                for (int k = 0; k < K; ++k)
                    if (c0 + k < W) cp[(ty * S + s) * W + c0 + k] = hv[s][k];
        }
        float* yrow = ypart + buf * NGRP * ROWCAP;
#pragma unroll
        for (int k = 0; k < K; ++k) yrow[ty * ROWCAP + c0 + k] = yp[k];
        float unext[CPT], znext[CPT];
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            unext[c] = raw.u[c];
            znext[c] = raw.d2[c];
        }
        // (NBUF 2) the other cell buffer last held row i-1's cells, all read before the previous barrier
        if (NBUF == 2 && i + 1 < H) {
            store_cells(W, bias, raw, cells + (buf ^ 1) * NCELLP * ROWCAP, tid);
            if (i + 2 < H) load_cells(i + 2, W, up, d1p, d2p, tid, raw);
        }
        __syncthreads();
        // the whole block finishes the row, one column per thread: fixed-order sum over state groups
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            const int col = cell_col(tid, c);
            if (col < W) {
                float y = 0.f;
                for (int g = 0; g < NGRP; ++g) y += yrow[g * ROWCAP + col];
                y += Dv * ucur[c];
#if MODE == 0
                if (z) y *= zcur[c] * sigmoidf_(zcur[c]);
#endif
                st(out, (long)be * HW + row + col, y);
            }
            ucur[c] = unext[c];
            zcur[c] = znext[c];
        }
        if (NBUF == 1 && i + 1 < H) {
            // every warp read this row's cells and sums before the barrier above
            store_cells(W, bias, raw, cells, tid);
            if (i + 2 < H) load_cells(i + 2, W, up, d1p, d2p, tid, raw);
            __syncthreads();
        }
    }
}

__device__ __forceinline__ void fixed_add(unsigned long long* p, float v) {
    atomicAdd(p, (unsigned long long)__float2ll_rn(v * FIXED_SCALE));
}

// fixed_add of a term already scaled by FIXED_SCALE. The tiled backward calls it on every lane, lanes past
// the grid with a zero term (at a valid cell): without a branch around the atomic, the compiler can overlap
// the conversions of several terms.
__device__ __forceinline__ void fixed_add_scaled(unsigned long long* p, float scaled) {
    atomicAdd(p, (unsigned long long)__float2ll_rn(scaled));
}

// The sums of a and c over the block's nthr threads, in thread order (bitwise the same on every run),
// stored by thread t == 0. red: 2 * nthr floats of shared memory; every thread of the block must call it.
__device__ __forceinline__ void block_sum_pair(float* red, int t, int nthr, float a, float c, float* out_a,
                                               float* out_c) {
    red[t] = a;
    red[nthr + t] = c;
    __syncthreads();
    if (t == 0) {
        float sa = 0.f, sc = 0.f;
        for (int q = 0; q < nthr; ++q) {
            sa += red[q];
            sc += red[nthr + q];
        }
        *out_a = sa;
        *out_c = sc;
    }
}

#if MODE == 0
// ---------------------------------------------------------------------------------------------------
// Tiled 2DMamba forward. The 2DMamba scan is separable: a 1D scan along every row (g), then a 1D scan
// down every column of g (h), with the same decay. So a block can take the grid in 32 x 32 tiles and
// run each pass with lanes along the direction that needs no communication: lanes over columns to
// form x = dt*u*B, lanes over rows for the horizontal pass, lanes over columns for the vertical one,
// each lane's scan sequential in registers, the tile handed between the layouts through shared memory.
// There is no warp-shuffle scan and no per-row barrier; a warp works only on its own (channel, states)
// slices of the tile, so its three passes need only __syncwarp, and the block meets twice per tile.
// Every global load goes into registers a phase ahead of its use (loaded at their use, the same kernel
// ran 3x slower): the next tile's B after the vertical pass, C before the horizontal pass, the next
// tile's per-cell inputs before the vertical pass. Rows and columns past the grid cost a branch in
// the passes that run along them; a partial tile still costs a full one in the passes across them,
// which is why rows of 196 columns (7 tiles for 6.1 tiles of cells) run faster on scan2d_fwd.
//
// Block: TCH channels of one batch element (they share the loads of B and C through L1), NS/TS warps
// per channel; warp (c, grp) owns the states [grp*TS, grp*TS + TS) of channel e0 + c. The carries
// cross tiles in registers (horizontal: the tiles of a band of 32 rows go left to right) and in shared memory
// (vertical: one row of states per channel). Checkpoint rows for the backward (every R rows) are
// written exactly as by scan2d_fwd. On an H100, TCH = TS = 1 (16 warps, 128 registers, no spill) ran
// fastest; 2 channels or 2 states per thread spill registers.
#ifndef TCH
#define TCH 1
#endif
#ifndef TS
#define TS 1
#endif
#define TILE 32
#define TP (TILE + 1)  // padded pitch: lanes over rows and lanes over columns both conflict-free
#define TGRP (NS / TS)
#define TTHREADS (32 * TCH * TGRP)
#define TCELLS ((TCH * TILE * TILE + TTHREADS - 1) / TTHREADS)  // per-cell inputs per thread and tile

struct TileCells {
    float u[TCELLS], dt[TCELLS], z[TCELLS];
};

// Raw per-cell inputs of the tile at (i0, j0): thread tid takes cells q = tid + k * TTHREADS of the
// [TCH][TILE][TILE] tile (the output pass uses the same cells, so it may overwrite their planes).
__device__ __forceinline__ void tile_load_cells(int i0, int j0, int b, int e0, int E, int H, int W, const T* u,
                                                const T* dt1, const T* z, int tid, TileCells& r) {
#pragma unroll
    for (int k = 0; k < TCELLS; ++k) {
        const int q = tid + k * TTHREADS;
        const int cc = q / (TILE * TILE), i = i0 + (q / TILE) % TILE, j = j0 + q % TILE;
        if (q < TCH * TILE * TILE && e0 + cc < E && i < H && j < W) {
            const long idx = ((long)b * E + e0 + cc) * H * W + (long)i * W + j;
            r.u[k] = ld(u, idx);
            r.dt[k] = ld(dt1, idx);
            r.z[k] = z ? ld(z, idx) : 0.f;
        } else {
            r.u[k] = r.dt[k] = r.z[k] = 0.f;
        }
    }
}

// Planes [4][TCH][TILE][TP]: softplus(dt + bias) * log2(e), softplus(dt + bias) * u, u, z. Cells out
// of the grid get step 0: decay 1 and input 0, so carries pass through them unchanged.
__device__ __forceinline__ void tile_store_cells(int i0, int j0, int e0, int E, int H, int W,
                                                 const float* __restrict__ dt_bias, const TileCells& r, float* planes,
                                                 int tid) {
#pragma unroll
    for (int k = 0; k < TCELLS; ++k) {
        const int q = tid + k * TTHREADS;
        if (q >= TCH * TILE * TILE) break;
        const int cc = q / (TILE * TILE), rr = (q / TILE) % TILE, j = q % TILE;
        const bool in = e0 + cc < E && i0 + rr < H && j0 + j < W;
        const float d = in ? softplusf_(r.dt[k] + (dt_bias ? dt_bias[e0 + cc] : 0.f)) : 0.f;
        const int o = (cc * TILE + rr) * TP + j;
        planes[o] = d * LOG2E;
        planes[TCH * TILE * TP + o] = d * r.u[k];
        planes[2 * TCH * TILE * TP + o] = r.u[k];
        planes[3 * TCH * TILE * TP + o] = r.z[k];
    }
}

// This lane's column j of B (or C) in the tile of rows [i0, i0 + ROWS), NST states: issued together, used a
// phase later. Columns past the grid read the last column instead: finite values that meet a zero input
// there (B) or reach no output (C). 32-bit offsets within a state's plane.
template <int NST, int ROWS>
__device__ __forceinline__ void load_column(const T* p, long HW, int i0, int j, int H, int W, float (&v)[NST][ROWS]) {
    const int rmax = min(ROWS, H - i0) - 1;
    const T* q = p + (long)i0 * W + min(j, W - 1);
    if (rmax == ROWS - 1) {  // a full band: no clamping
#pragma unroll
        for (int s = 0; s < NST; ++s) {
            const T* qs = q + s * HW;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                v[s][r] = ld(qs, 0);
                qs += W;
            }
        }
    } else {  // the last band: rows past the grid are not loaded (the passes stop at the last row)
#pragma unroll
        for (int s = 0; s < NST; ++s) {
            const T* qs = q + s * HW;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (r > rmax) break;
                v[s][r] = ld(qs, r * W);
            }
        }
    }
}

// The passes of both tiled kernels are functions with __restrict__ pointers, so that the compiler may issue
// the next cells' shared-memory loads before this cell's stores (otherwise each step of a lane's scan waits
// out a load's latency); the row passes also load their cells BGRP at a time.
#define BGRP 8

// g = a * g + x along one row of a tile (this lane's) of each of NC channels (DLS, PS: the channels' strides
// in dl and p), in place, from the carries g (left in g). Whole groups of BGRP columns: cells past the grid
// have decay 1 and x = 0, so they pass g through.
template <int NC, int DLS, int PS>
__device__ __forceinline__ void tile_scan_right(const float* __restrict__ dl, float* __restrict__ p, const float (&A)[NC],
                                                float (&g)[NC], int cols) {
    for (int j0 = 0; j0 < cols; j0 += BGRP) {
        float d[NC][BGRP], x[NC][BGRP];
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int k = 0; k < BGRP; ++k) {
                d[c][k] = dl[c * DLS + j0 + k];
                x[c][k] = p[c * PS + j0 + k];
            }
#pragma unroll
        for (int k = 0; k < BGRP; ++k)
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                g[c] = ex2_(d[c][k] * A[c]) * g[c] + x[c][k];
                x[c][k] = g[c];
            }
#pragma unroll
        for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int k = 0; k < BGRP; ++k) p[c * PS + j0 + k] = x[c][k];
    }
}

// The tiled forward's vertical pass down one column of a tile (this lane's; ds, Gc: its cells in the step
// plane and in this warp's slices): h = a * h + g from the carry h (left in h), C * h summed over the
// warp's states into the slice of its first state, and the states of every R-th row (rows R - 1, 2R - 1,
// ... of the grid, but the last) to the checkpoint rows at ckp (where ckw: a channel and column in the grid).
__device__ __forceinline__ void tile_columns_down(const float* __restrict__ ds, float* __restrict__ Gc,
                                                  float* __restrict__ ckp, const float (&cv)[TS][TILE],
                                                  const float (&a2)[TS], float (&h)[TS], int i0, int rows, int R,
                                                  int H, int W, bool ckw) {
    int next_ck = (i0 / R + 1) * R - 1;  // the next row whose states are a checkpoint
#pragma unroll
    for (int r = 0; r < TILE; ++r) {
        if (r >= rows) break;
        const float d = ds[r * TP];
        float yp = 0.f;
#pragma unroll
        for (int s = 0; s < TS; ++s) {
            h[s] = ex2_(d * a2[s]) * h[s] + Gc[(s * TILE + r) * TP];
            yp += cv[s][r] * h[s];
        }
        if (i0 + r == next_ck) {
            if (ckw && next_ck + 1 < H)
#pragma unroll
                for (int s = 0; s < TS; ++s) ckp[s * W] = h[s];
            next_ck += R;
            ckp += NS * W;
        }
        Gc[r * TP] = yp;
    }
}

extern "C" __global__ void __launch_bounds__(TTHREADS, TTHREADS <= 256 ? 2 : 1)
scan2d_tile_fwd(const T* __restrict__ u, const T* __restrict__ dt1, const T* __restrict__ z, const T* __restrict__ B1,
                const T* __restrict__ C, const float* __restrict__ A1, const float* __restrict__ D,
                const float* __restrict__ dt_bias, T* __restrict__ out, float* __restrict__ ckpt,
                float* __restrict__ gck, int H, int W, int E, int R) {
    extern __shared__ float smem[];
    float* G = smem;                           // [TCH][NS][TILE][TP]: x, then g, then per-group sums of C*h
    float* planes = G + TCH * NS * TILE * TP;  // [4][TCH][TILE][TP], see tile_store_cells
    float* hcar = planes + 4 * TCH * TILE * TP;  // [TCH][NS][W]: the states of the row above the band
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int c = warp / TGRP, grp = warp % TGRP;
    const int eblocks = (E + TCH - 1) / TCH;
    const int b = blockIdx.x / eblocks, e0 = (blockIdx.x % eblocks) * TCH, e = e0 + c;
    const bool live = e < E;
    const long HW = (long)H * W;
    const int nseg = (H + R - 1) / R;
    float a2[TS];  // A; the step plane carries log2(e)
#pragma unroll
    for (int s = 0; s < TS; ++s) a2[s] = live ? A1[e * NS + grp * TS + s] : 0.f;
    float* Gc = G + (c * NS + grp * TS) * TILE * TP;  // this warp's TS slices
    const float* dsp = planes + c * TILE * TP;
    const float* dxu = planes + (TCH + c) * TILE * TP;
    float* hc = hcar + (c * NS + grp * TS) * W;
    for (int j = lane; j < W; j += 32)
#pragma unroll
        for (int s = 0; s < TS; ++s) hc[s * W + j] = 0.f;
    const T* Bp = B1 + ((long)b * NS + grp * TS) * HW;
    const T* Cp = C + ((long)b * NS + grp * TS) * HW;
    // (a channel past E computes on clamped inputs and writes nothing)
    float* ck = ckpt + ((long)b * E + min(e, E - 1)) * (nseg - 1) * NS * W + (grp * TS) * W;
    const int nchunk = (W + TILE - 1) / TILE, ntile = nchunk * ((H + TILE - 1) / TILE);

    TileCells raw;
    float g[TS], bv[TS][TILE], cv[TS][TILE];
    tile_load_cells(0, 0, b, e0, E, H, W, u, dt1, z, tid, raw);
    tile_store_cells(0, 0, e0, E, H, W, dt_bias, raw, planes, tid);
    load_column<TS, TILE>(Bp, HW, 0, lane, H, W, bv);
    __syncthreads();
    for (int t = 0; t < ntile; ++t) {
        const int i0 = (t / nchunk) * TILE, j0 = (t % nchunk) * TILE;
        const int tn = t + 1, i0n = (tn / nchunk) * TILE, j0n = (tn % nchunk) * TILE;
        if (j0 == 0)
#pragma unroll
            for (int s = 0; s < TS; ++s) g[s] = 0.f;
        // x = dt * u * B, lanes over columns
        const int rows = min(TILE, H - i0), cols = min(TILE, W - j0);
#pragma unroll
        for (int r = 0; r < TILE; ++r) {
            if (r >= rows) break;  // rows past the grid: left stale, they reach no output
            const float xu = dxu[r * TP + lane];
#pragma unroll
            for (int s = 0; s < TS; ++s) Gc[(s * TILE + r) * TP + lane] = xu * bv[s][r];
        }
        load_column<TS, TILE>(Cp, HW, i0, j0 + lane, H, W, cv);
        __syncwarp();
        // horizontal pass, lanes over rows: g = a * g + x along the tile's columns
#pragma unroll
        for (int s = 0; s < TS; ++s) {
            const float as[1] = {a2[s]};
            float gs[1] = {g[s]};
            tile_scan_right<1, 0, 0>(dsp + lane * TP, Gc + (s * TILE + lane) * TP, as, gs, cols);
            g[s] = gs[0];
        }
        // the horizontal carries into the next chunk, for the tiled backward
        if (gck && live && j0 + TILE < W && i0 + lane < H) {
            float* gk = gck + (((long)b * E + e) * (nchunk - 1) + j0 / TILE) * NS * H + i0 + lane;
#pragma unroll
            for (int s = 0; s < TS; ++s) gk[(long)(grp * TS + s) * H] = g[s];
        }
        __syncwarp();
        if (tn < ntile) tile_load_cells(i0n, j0n, b, e0, E, H, W, u, dt1, z, tid, raw);
        // vertical pass, lanes over columns: h = a * h + g down the tile's rows; C * h summed over this
        // warp's states replaces the slice of its first state
        {
            const int col = j0 + lane;
            const bool colin = col < W;
            float h[TS];
#pragma unroll
            for (int s = 0; s < TS; ++s) h[s] = colin ? hc[s * W + col] : 0.f;
            float* ckp = ck + (long)(i0 / R) * NS * W + min(col, W - 1);
            tile_columns_down(dsp + lane, Gc + lane, ckp, cv, a2, h, i0, rows, R, H, W, live && colin);
            if (colin)
#pragma unroll
                for (int s = 0; s < TS; ++s) hc[s * W + col] = h[s];
        }
        // the next tile's B: its latency hides behind the barrier and the output pass
        if (tn < ntile) load_column<TS, TILE>(Bp, HW, i0n, j0n + lane, H, W, bv);
        __syncthreads();
        // outputs: the fixed-order sum over state groups, the skip term and the gate; then the next
        // tile's per-cell inputs take the planes (each thread overwrites only the cells it just read)
#pragma unroll
        for (int k = 0; k < TCELLS; ++k) {
            const int q = tid + k * TTHREADS;
            if (q >= TCH * TILE * TILE) break;
            const int cc = q / (TILE * TILE), r = (q / TILE) % TILE, j = q % TILE, ee = e0 + cc;
            if (ee < E && i0 + r < H && j0 + j < W) {
                float y = 0.f;
#pragma unroll
                for (int gg = 0; gg < TGRP; ++gg) y += G[((cc * NS + gg * TS) * TILE + r) * TP + j];
                const int o = (cc * TILE + r) * TP + j;
                if (D) y += D[ee] * planes[2 * TCH * TILE * TP + o];
                if (z) {
                    const float zz = planes[3 * TCH * TILE * TP + o];
                    y *= zz * sigmoidf_(zz);
                }
                st(out, ((long)b * E + ee) * HW + (long)(i0 + r) * W + j0 + j, y);
            }
        }
        if (tn < ntile) {
            tile_store_cells(i0n, j0n, e0, E, H, W, dt_bias, raw, planes, tid);
        }
        __syncthreads();
    }
}
// ---------------------------------------------------------------------------------------------------
// Tiled 2DMamba backward. The adjoint of the separable scan is separable too: with c = C * dy,
//     G = reverse column scan of c (G[i] = c[i] + a[i+1] * G[i+1]),  F = reverse row scan of G,
// dL/dx = F, and dL/da at a cell = G * h_above + F * g_left. So a tile recomputes its g and h from two
// carries the forward saved (the states of the row above the tile, a checkpoint row every BTH rows, and
// the horizontal states g left of the tile, gck), then runs the two adjoint scans from two carries of
// its own (G from the tile below, in a row of global scratch, and F from the tile to the right, in
// registers), sweeping the tiles bottom to top and right to left. Five passes, each with lanes along the
// direction that needs no communication:
//   X      lanes over columns   x = dt * u * B
//   H1     lanes over rows      g = a * g + x, left to right
//   V      lanes over columns   G bottom to top; then h top to bottom with dL/da's vertical part and dC
//   H2     lanes over rows      F right to left, with dL/da's horizontal part
//   final  lanes over columns   F * B and dB
// then the block sums the per-cell terms over its warps (fixed order) and writes du, d dt and dz. dB, dC
// are summed over channels with the fixed-point atomics of the row-sweep backward (consecutive lanes on
// consecutive columns).
//
// Block: BCH channels of one batch element, NS / BTS warps, warp w owning the states [w*BTS, w*BTS + BTS)
// of every channel of the block; a tile is BTH = 32 / BTS rows by 32 columns, so that a row-pass lane is
// one (state, row) of its warp, for each channel. With BCH = 2 the two channels share every load of B and
// C, and each dB / dC atomic adds the two channels' terms (in a fixed order): half the L2 traffic of one
// channel per block, which is what bounds the kernel (Nsight Compute: L2 75-80 % busy at 196 x 196).
#ifndef BTS
#define BTS 2
#endif
#ifndef BCH
#define BCH 1
#endif
#define BTH (32 / BTS)
#define BWARPS (NS / BTS)
#define BTHREADS (32 * BWARPS)
#define BSL (BTH * TP)         // one tile slot
#define BCS (NS * BSL)         // one channel's slots of a per-state array
#define BTC (BTH * TILE)       // cells of one channel's tile
#define BCELLS ((BCH * BTC + BTHREADS - 1) / BTHREADS)

// v[c] for a c known only at run time, without indexing a register array (which would go to local memory)
__device__ __forceinline__ float pick(const float (&v)[BCH], int c) {
    float r = v[0];
#pragma unroll
    for (int k = 1; k < BCH; ++k)
        if (c == k) r = v[k];
    return r;
}

__device__ __forceinline__ void add_at(float (&v)[BCH], int c, float x) {
#pragma unroll
    for (int k = 0; k < BCH; ++k)
        if (c == k) v[k] += x;
}

struct BwdCells {
    float u[BCELLS], dt[BCELLS], z[BCELLS], g[BCELLS];  // g: the output gradient
};

// The raw per-cell inputs of the tile at (i0, j0), cell q = tid + k * BTHREADS of the [BCH][BTH][TILE]
// tile, loaded into registers a phase before their use (nothing here may consume them: a use would wait
// for the load). base: the block's first channel; nlive: its channels inside E.
__device__ __forceinline__ void btile_load_cells(int i0, int j0, long base, long HW, int nlive, int H, int W,
                                                 const T* u, const T* dt1, const T* z, const T* go, int tid,
                                                 BwdCells& r) {
#pragma unroll
    for (int k = 0; k < BCELLS; ++k) {
        const int q = tid + k * BTHREADS, c = q / BTC, i = i0 + (q % BTC) / TILE, j = j0 + q % TILE;
        if (c < nlive && i < H && j < W) {
            const long idx = base + c * HW + (long)i * W + j;
            r.u[k] = ld(u, idx);
            r.dt[k] = ld(dt1, idx);
            r.z[k] = z ? ld(z, idx) : 0.f;
            r.g[k] = ld(go, idx);
        } else {
            r.u[k] = r.dt[k] = r.z[k] = r.g[k] = 0.f;
        }
    }
}

// Planes [3][BCH][BSL]: softplus(dt + bias) * log2(e), softplus(dt + bias) * u, the gated output gradient.
// Cells out of the grid (and channels past E) get zeros: decay 1, no input, no gradient.
__device__ __forceinline__ void btile_store_cells(int i0, int j0, int nlive, int H, int W, const float (&bias)[BCH],
                                                  bool gated, const BwdCells& r, float* planes, int tid) {
#pragma unroll
    for (int k = 0; k < BCELLS; ++k) {
        const int q = tid + k * BTHREADS;
        if (q >= BCH * BTC) break;
        const int c = q / BTC, rr = (q % BTC) / TILE, j = q % TILE, o = c * BSL + rr * TP + j;
        const bool in = c < nlive && i0 + rr < H && j0 + j < W;
        const float d = in ? softplusf_(r.dt[k] + pick(bias, c)) : 0.f;
        planes[o] = d * LOG2E;
        planes[BCH * BSL + o] = d * r.u[k];
        planes[2 * BCH * BSL + o] = in ? (gated ? r.g[k] * r.z[k] * sigmoidf_(r.z[k]) : r.g[k]) : 0.f;
    }
}

// The forward's states of the row above band tb at this lane's column (its checkpoint row tb - 1; zeros
// above the grid and past its last column). ckw: this warp's first state in the grid's checkpoints.
__device__ __forceinline__ void btile_load_top(const float* ckw, int tb, int col, int W, float (&h)[BTS]) {
#pragma unroll
    for (int s = 0; s < BTS; ++s) h[s] = tb > 0 && col < W ? ckw[((long)(tb - 1) * NS + s) * W + col] : 0.f;
}

// The forward's horizontal state left of chunk tc at this lane's row (zero at the left edge and below the
// grid). gkw: this lane's state in the grid's carries.
__device__ __forceinline__ float btile_load_left(const float* gkw, int tc, int row, int H) {
    return tc > 0 && row < H ? gkw[(long)(tc - 1) * NS * H + row] : 0.f;
}

// The tiled backward's other passes, with __restrict__ pointers for the same reason as tile_scan_right.
// Per-channel arrays are BSL (planes) or BCS (per-state slots) apart.

// H2: F = G + a[j+1] * F[j+1] right to left along this lane's row of each channel, from the carry
// Fp = a * F of the tile to the right (left in Fp for the tile to the left). G in p2 becomes F; g in p1
// becomes A * Hq, with Hq = F * a * g_left (gl: g left of the tile) dL/da's horizontal part, whose sum of
// Hq * d goes to dA. Cells past the grid have F = 0.
__device__ __forceinline__ void btile_adjoint_left(const float* __restrict__ dl, float* __restrict__ p1,
                                                   float* __restrict__ p2, const float (&A)[BCH],
                                                   const float (&gl)[BCH], float (&Fp)[BCH], float (&dA)[BCH],
                                                   int cols) {
    for (int j1 = (cols + BGRP - 1) / BGRP * BGRP; j1 > 0; j1 -= BGRP) {
        const int j0 = j1 - BGRP;
        float d[BCH][BGRP], G[BCH][BGRP], gL[BCH][BGRP];
#pragma unroll
        for (int c = 0; c < BCH; ++c)
#pragma unroll
            for (int k = 0; k < BGRP; ++k) {
                d[c][k] = dl[c * BSL + j0 + k];
                G[c][k] = p2[c * BCS + j0 + k];
                gL[c][k] = p1[c * BCS + max(j0 + k - 1, 0)];
            }
        if (j0 == 0)
#pragma unroll
            for (int c = 0; c < BCH; ++c) gL[c][0] = gl[c];
#pragma unroll
        for (int k = BGRP - 1; k >= 0; --k)
#pragma unroll
            for (int c = 0; c < BCH; ++c) {
                const float a = ex2_(d[c][k] * A[c]), F = G[c][k] + Fp[c], Hq = F * a * gL[c][k];
                dA[c] = fmaf(Hq, d[c][k], dA[c]);
                gL[c][k] = A[c] * Hq;
                G[c][k] = F;
                Fp[c] = a * F;
            }
#pragma unroll
        for (int c = 0; c < BCH; ++c)
#pragma unroll
            for (int k = 0; k < BGRP; ++k) {
                p1[c * BCS + j0 + k] = gL[c][k];
                p2[c * BCS + j0 + k] = G[c][k];
            }
    }
}

// X: x = dt * u * B into this warp's slots, lanes over columns.
__device__ __forceinline__ void btile_inputs(const float* __restrict__ dup, float* __restrict__ s1w,
                                             const float (&bv)[BTS][BTH], int rows, int lane) {
#pragma unroll
    for (int r = 0; r < BTH; ++r) {
        if (r >= rows) break;
#pragma unroll
        for (int c = 0; c < BCH; ++c) {
            const float xu = dup[c * BSL + r * TP + lane];
#pragma unroll
            for (int s = 0; s < BTS; ++s) s1w[c * BCS + s * BSL + r * TP + lane] = xu * bv[s][r];
        }
    }
}

// V, first half: G = c + a[i+1] * G[i+1] bottom to top down this lane's column (c = C * dy), from the carry
// Gp = a * G of the tile below (left in Gp for the tile above), into this warp's G slots.
__device__ __forceinline__ void btile_adjoint_up(const float* __restrict__ dlp, const float* __restrict__ dyp,
                                                 float* __restrict__ s2w, const float (&cv)[BTS][BTH],
                                                 const float (&Ac)[BCH][BTS], float (&Gp)[BCH][BTS], int rows,
                                                 int lane) {
#pragma unroll
    for (int r = BTH - 1; r >= 0; --r) {
        if (r >= rows) continue;
#pragma unroll
        for (int c = 0; c < BCH; ++c) {
            const float dl = dlp[c * BSL + r * TP + lane], dy = dyp[c * BSL + r * TP + lane];
#pragma unroll
            for (int s = 0; s < BTS; ++s) {
                const float G = fmaf(cv[s][r], dy, Gp[c][s]);
                s2w[c * BCS + s * BSL + r * TP + lane] = G;
                Gp[c][s] = ex2_(dl * Ac[c][s]) * G;
            }
        }
    }
}

// V, second half: h = a * h + g top to bottom from the states above the tile; dL/da's vertical part
// P = G * a * h_above into dA (as P * d) and this warp's sum of A * P (qww); the sum of C * h (yww);
// dC += sum over channels of dy * h (dCt: this lane's cells of the tile's first row, per state; on: the
// column is in the grid, otherwise the terms are zeros).
__device__ __forceinline__ void btile_states_down(const float* __restrict__ dlp, const float* __restrict__ dyp,
                                                  const float* __restrict__ s1w, const float* __restrict__ s2w,
                                                  float* __restrict__ qww, float* __restrict__ yww,
                                                  const float (&cv)[BTS][BTH], const float (&Ac)[BCH][BTS],
                                                  const float (&htop)[BCH][BTS], float (&dAc)[BCH][BTS],
                                                  unsigned long long* const (&dCt)[BTS], bool on, int W, int rows,
                                                  int lane) {
    float h[BCH][BTS];
#pragma unroll
    for (int c = 0; c < BCH; ++c)
#pragma unroll
        for (int s = 0; s < BTS; ++s) h[c][s] = htop[c][s];
    int ro = 0;  // row r's offset from the tile's first row in a plane of dC
#pragma unroll
    for (int r = 0; r < BTH; ++r) {
        if (r >= rows) break;
        float term[BTS];
#pragma unroll
        for (int s = 0; s < BTS; ++s) term[s] = 0.f;
#pragma unroll
        for (int c = 0; c < BCH; ++c) {
            const float dl = dlp[c * BSL + r * TP + lane], dys = on ? dyp[c * BSL + r * TP + lane] * FIXED_SCALE : 0.f;
            float q = 0.f, y = 0.f;
#pragma unroll
            for (int s = 0; s < BTS; ++s) {
                const int o = c * BCS + s * BSL + r * TP + lane;
                const float ahup = ex2_(dl * Ac[c][s]) * h[c][s];
                h[c][s] = ahup + s1w[o];
                const float P = s2w[o] * ahup;
                dAc[c][s] = fmaf(P, dl, dAc[c][s]);
                q = fmaf(Ac[c][s], P, q);
                y = fmaf(cv[s][r], h[c][s], y);
                term[s] = fmaf(dys, h[c][s], term[s]);
            }
            qww[c * BSL + r * TP + lane] = q;
            yww[c * BSL + r * TP + lane] = y;
        }
#pragma unroll
        for (int s = 0; s < BTS; ++s) fixed_add_scaled(dCt[s] + ro, term[s]);
        ro += W;
    }
}

// The final column pass: this warp's sums of F * B (into its first G slot of each channel) and of
// A * dL/da * a (qww, adding the horizontal parts left in s1w by H2); dB += sum over channels of F * dt * u.
__device__ __forceinline__ void btile_finish_column(const float* __restrict__ dup, const float* __restrict__ s1w,
                                                    float* __restrict__ s2w, float* __restrict__ qww,
                                                    const float (&bv)[BTS][BTH],
                                                    unsigned long long* const (&dBt)[BTS], bool on, int W, int rows,
                                                    int lane) {
    int ro = 0;
#pragma unroll
    for (int r = 0; r < BTH; ++r) {
        if (r >= rows) break;
        float term[BTS];
#pragma unroll
        for (int s = 0; s < BTS; ++s) term[s] = 0.f;
#pragma unroll
        for (int c = 0; c < BCH; ++c) {
            const float xus = on ? dup[c * BSL + r * TP + lane] * FIXED_SCALE : 0.f;
            float fb = 0.f, q = qww[c * BSL + r * TP + lane];
#pragma unroll
            for (int s = 0; s < BTS; ++s) {
                const int o = c * BCS + s * BSL + r * TP + lane;
                const float F = s2w[o];
                fb = fmaf(F, bv[s][r], fb);
                q += s1w[o];
                term[s] = fmaf(F, xus, term[s]);
            }
            qww[c * BSL + r * TP + lane] = q;
            s2w[c * BCS + r * TP + lane] = fb;
        }
#pragma unroll
        for (int s = 0; s < BTS; ++s) fixed_add_scaled(dBt[s] + ro, term[s]);
        ro += W;
    }
}

extern "C" __global__ void __launch_bounds__(BTHREADS, BCH == 1 && BTHREADS <= 256 ? 2 : 1)
scan2d_tile_bwd(const T* __restrict__ u, const T* __restrict__ dt1, const T* __restrict__ z, const T* __restrict__ B1,
                const T* __restrict__ C, const float* __restrict__ A1, const float* __restrict__ D,
                const float* __restrict__ dt_bias, const T* __restrict__ dout, const float* __restrict__ ckpt,
                const float* __restrict__ gck, float* __restrict__ gcar, T* __restrict__ du, T* __restrict__ ddt1,
                T* __restrict__ dz, unsigned long long* __restrict__ dB1, unsigned long long* __restrict__ dC,
                float* __restrict__ dA1, float* __restrict__ dD, float* __restrict__ dbias, int H, int W, int E) {
    extern __shared__ float smem[];
    float* s1 = smem;                         // [BCH][NS][BSL]: x, then g, then dL/da's horizontal part * A
    float* s2 = s1 + BCH * BCS;               // [BCH][NS][BSL]: G, then F; a warp's first slot then its sum of F * B
    float* qw = s2 + BCH * BCS;               // [BWARPS][BCH][BSL]: per-warp sums of A * dL/da * a
    float* yw = qw + BWARPS * BCH * BSL;      // [BWARPS][BCH][BSL]: per-warp sums of C * h
    float* planes = yw + BWARPS * BCH * BSL;  // [3][BCH][BSL], see btile_store_cells
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int eblocks = (E + BCH - 1) / BCH;
    const int b = blockIdx.x / eblocks, e0 = (blockIdx.x % eblocks) * BCH, nlive = min(BCH, E - e0);
    const long HW = (long)H * W;
    const int n0 = w * BTS;
    const int rs = lane / BTH, rr = lane % BTH;  // row passes: this lane's state n0 + rs and row rr
    const int nchunk = (W + TILE - 1) / TILE, nband = (H + BTH - 1) / BTH, ntile = nchunk * nband;
    // per channel (a channel past E reads the last one's parameters and carries, and writes nothing)
    float Ac[BCH][BTS], Ar[BCH], bias[BCH], Dv[BCH];  // A: the step plane carries log2(e)
    float* gcw[BCH];        // the adjoint's vertical carries, [BTS][W]
    const float* ckw[BCH];  // checkpoint k: + k * NS * W
    const float* gkw[BCH];  // chunk m: + m * NS * H
#pragma unroll
    for (int c = 0; c < BCH; ++c) {
        const int e = min(e0 + c, E - 1);
        const long be = (long)b * E + e;
#pragma unroll
        for (int s = 0; s < BTS; ++s) Ac[c][s] = A1[e * NS + n0 + s];
        Ar[c] = A1[e * NS + n0 + rs];
        bias[c] = dt_bias ? dt_bias[e] : 0.f;
        Dv[c] = D ? D[e] : 0.f;
        gcw[c] = gcar + (be * NS + n0) * W;
        ckw[c] = ckpt + be * (nband - 1) * NS * W + n0 * W;
        gkw[c] = gck + be * (nchunk - 1) * NS * H + (long)(n0 + rs) * H;
    }
    const T* Bp = B1 + ((long)b * NS + n0) * HW;
    const T* Cp = C + ((long)b * NS + n0) * HW;
    unsigned long long* dBp = dB1 + ((long)b * NS + n0) * HW;
    unsigned long long* dCp = dC + ((long)b * NS + n0) * HW;
    float* s1w = s1 + n0 * BSL;
    float* s2w = s2 + n0 * BSL;
    float* qww = qw + w * BCH * BSL;
    float* yww = yw + w * BCH * BSL;
    const float* dlp = planes;
    const float* dup = planes + BCH * BSL;
    const float* dyp = planes + 2 * BCH * BSL;
    const long base = ((long)b * E + e0) * HW;
    const bool gated = z != nullptr;

    float dAc[BCH][BTS], dAr[BCH], dDacc[BCH], dbacc[BCH], Fcar[BCH], gl[BCH], htop[BCH][BTS];
    float bv[BTS][BTH], cv[BTS][BTH];
#pragma unroll
    for (int c = 0; c < BCH; ++c) {
        dAr[c] = dDacc[c] = dbacc[c] = Fcar[c] = 0.f;
#pragma unroll
        for (int s = 0; s < BTS; ++s) dAc[c][s] = 0.f;
    }
    BwdCells raw, cur;
    {
        const int t = ntile - 1, tb = t / nchunk, tc = t % nchunk, i0 = tb * BTH, j0 = tc * TILE;
        btile_load_cells(i0, j0, base, HW, nlive, H, W, u, dt1, z, dout, tid, raw);
        load_column<BTS, BTH>(Bp, HW, i0, j0 + lane, H, W, bv);
        load_column<BTS, BTH>(Cp, HW, i0, j0 + lane, H, W, cv);
#pragma unroll
        for (int c = 0; c < BCH; ++c) {
            btile_load_top(ckw[c], tb, j0 + lane, W, htop[c]);
            gl[c] = btile_load_left(gkw[c], tc, i0 + rr, H);
        }
        btile_store_cells(i0, j0, nlive, H, W, bias, gated, raw, planes, tid);
        cur = raw;
    }
    __syncthreads();
    for (int t = ntile - 1; t >= 0; --t) {
        const int tb = t / nchunk, tc = t % nchunk, i0 = tb * BTH, j0 = tc * TILE;
        const int tn = t - 1, tbn = tn / nchunk, tcn = tn % nchunk, i0n = tbn * BTH, j0n = tcn * TILE;
        const int rows = min(BTH, H - i0), cols = min(TILE, W - j0);
        const int col = j0 + lane;
        const bool colin = col < W;
        // the adjoint's carry from the tile below, which this lane stored a band ago: loaded two passes
        // before its use
        float Gp[BCH][BTS];
#pragma unroll
        for (int c = 0; c < BCH; ++c) {
            if (tc == nchunk - 1) Fcar[c] = 0.f;
#pragma unroll
            for (int s = 0; s < BTS; ++s) Gp[c][s] = tb < nband - 1 && colin && c < nlive ? gcw[c][s * W + col] : 0.f;
        }
        // this lane's dB and dC cells in the tile's first row, per state (32-bit offsets within a plane); a
        // lane past the grid adds zeros a chunk to the left, so that a warp's atomics still cover 32
        // consecutive cells (or, on grids narrower than 32 columns, to column 0)
        unsigned long long *dBt[BTS], *dCt[BTS];
        const int acol = colin ? col : max(col - TILE, 0);
#pragma unroll
        for (int s = 0; s < BTS; ++s) {
            dBt[s] = dBp + s * HW + (i0 * W + acol);
            dCt[s] = dCp + s * HW + (i0 * W + acol);
        }

        // X, lanes over columns
        btile_inputs(dup, s1w, bv, rows, lane);
        __syncwarp();
        // H1, lanes over rows: g, left to right from the forward's carry
        if (rr < rows) {
            float g[BCH];
#pragma unroll
            for (int c = 0; c < BCH; ++c) g[c] = gl[c];
            tile_scan_right<BCH, BSL, BCS>(dlp + rr * TP, s1w + rs * BSL + rr * TP, Ar, g, cols);
        }
        __syncwarp();
        if (tn >= 0) btile_load_cells(i0n, j0n, base, HW, nlive, H, W, u, dt1, z, dout, tid, raw);
        // V, lanes over columns: G bottom to top (the carry is a[i+1] * G[i+1] of the tile below), then h
        // top to bottom from the checkpoint row
        btile_adjoint_up(dlp, dyp, s2w, cv, Ac, Gp, rows, lane);
        if (tb > 0 && colin)
#pragma unroll
            for (int c = 0; c < BCH; ++c)
                if (c < nlive)
#pragma unroll
                    for (int s = 0; s < BTS; ++s) gcw[c][s * W + col] = Gp[c][s];
        btile_states_down(dlp, dyp, s1w, s2w, qww, yww, cv, Ac, htop, dAc, dCt, colin, W, rows, lane);
        // the next tile's C column and checkpoint rows: their latency hides behind H2 and the final pass
        if (tn >= 0) {
            load_column<BTS, BTH>(Cp, HW, i0n, j0n + lane, H, W, cv);
#pragma unroll
            for (int c = 0; c < BCH; ++c) btile_load_top(ckw[c], tbn, j0n + lane, W, htop[c]);
        }
        __syncwarp();
        // H2, lanes over rows: F right to left (the carry is a[j+1] * F[j+1] of the tile to the right)
        if (rr < rows)
            btile_adjoint_left(dlp + rr * TP, s1w + rs * BSL + rr * TP, s2w + rs * BSL + rr * TP, Ar, gl, Fcar, dAr,
                               cols);
        if (tn >= 0)
#pragma unroll
            for (int c = 0; c < BCH; ++c) gl[c] = btile_load_left(gkw[c], tcn, i0n + rr, H);
        __syncwarp();
        btile_finish_column(dup, s1w, s2w, qww, bv, dBt, colin, W, rows, lane);
        if (tn >= 0) load_column<BTS, BTH>(Bp, HW, i0n, j0n + lane, H, W, bv);
        __syncthreads();
        // the tile's cells: fixed-order sums over warps, then the per-cell gradients
#pragma unroll
        for (int k = 0; k < BCELLS; ++k) {
            const int q = tid + k * BTHREADS;
            if (q >= BCH * BTC) break;
            const int c = q / BTC, r = (q % BTC) / TILE, j = q % TILE;
            if (c < nlive && i0 + r < H && j0 + j < W) {
                const int o = c * BSL + r * TP + j;
                float Qt = 0.f, St = 0.f, Yt = 0.f;
#pragma unroll
                for (int v = 0; v < BWARPS; ++v) {
                    Qt += qw[v * BCH * BSL + o];
                    St += s2[c * BCS + v * BTS * BSL + r * TP + j];
                    Yt += yw[v * BCH * BSL + o];
                }
                // the step and the gated output gradient from the planes, rather than evaluated again
                const float uv = cur.u[k], x = cur.dt[k] + pick(bias, c), zv = cur.z[k], gov = cur.g[k];
                const float d = dlp[o] * (1.f / LOG2E), dyg = dyp[o], Dc = pick(Dv, c);
                const long idx = base + c * HW + (long)(i0 + r) * W + j0 + j;
                const float gdt = (Qt + uv * St) * (x > 20.f ? 1.f : sigmoidf_(x));
                st(ddt1, idx, gdt);
                add_at(dbacc, c, gdt);
                st(du, idx, d * St + Dc * dyg);
                add_at(dDacc, c, dyg * uv);
                if (gated) {
                    const float y = Yt + Dc * uv, sg = sigmoidf_(zv);
                    st(dz, idx, gov * y * sg * (1.f + zv * (1.f - sg)));
                }
            }
        }
        if (tn >= 0) {
            btile_store_cells(i0n, j0n, nlive, H, W, bias, gated, raw, planes, tid);
            cur = raw;
        }
        __syncthreads();
    }

    // dA per state: the column passes' sums (over the warp) and the row passes' (over the lanes of a state)
#pragma unroll
    for (int c = 0; c < BCH; ++c) {
#pragma unroll
        for (int s = 0; s < BTS; ++s)
#pragma unroll
            for (int m = 16; m > 0; m >>= 1) dAc[c][s] += __shfl_xor_sync(0xffffffffu, dAc[c][s], m);
#pragma unroll
        for (int m = BTH / 2; m > 0; m >>= 1) dAr[c] += __shfl_xor_sync(0xffffffffu, dAr[c], m);
        float colsum = dAc[c][0];
#pragma unroll
        for (int s = 1; s < BTS; ++s)
            if (rs == s) colsum = dAc[c][s];
        if (rr == 0 && c < nlive)  // the sums were of d * log2(e)
            dA1[((long)b * E + e0 + c) * NS + n0 + rs] = (colsum + dAr[c]) * (1.f / LOG2E);
    }
    // dD and d dt_bias: block sums in a fixed order (each channel in its own scratch)
#pragma unroll
    for (int c = 0; c < BCH; ++c)
        if (c < nlive) {
            const long be = (long)b * E + e0 + c;
            block_sum_pair(s1 + c * 2 * BTHREADS, tid, BTHREADS, dDacc[c], dbacc[c], dD + be, dbias + be);
        }
}
#endif


// KEEP_ADJ: a thread keeps the raw inputs of the adjoint row's columns it finishes in registers (acur),
// rather than loading them again after the row's barrier; not on rows of several warps, whose threads
// are short of registers already.
#define KEEP_ADJ (CW == 1)
// Backward. Gradients of the per-cell inputs are written directly; dB, dC (summed over channels)
// are accumulated as 2^-32 fixed point in int64, whose integer sums do not depend on the order;
// dA, dD and d dt_bias are written per (batch, channel) and summed over the batch by the caller.
extern "C" __global__ void __launch_bounds__(NTX * NGRP)
scan2d_bwd(const T* __restrict__ u, const T* __restrict__ dt1, const T* __restrict__ dt2, const T* __restrict__ z,
           const T* __restrict__ B1, const T* __restrict__ B2, const T* __restrict__ C, const float* __restrict__ A1,
           const float* __restrict__ A2, const float* __restrict__ D, const float* __restrict__ dt_bias,
           const T* __restrict__ dout, const float* __restrict__ ckpt, T* __restrict__ du, T* __restrict__ ddt1,
           T* __restrict__ ddt2, T* __restrict__ dz, unsigned long long* __restrict__ dB1,
           unsigned long long* __restrict__ dB2, unsigned long long* __restrict__ dC, float* __restrict__ dA1,
           float* __restrict__ dA2, float* __restrict__ dD, float* __restrict__ dbias, int H, int W, int E, int R) {
    extern __shared__ float smem[];
    const int be = blockIdx.x, b = be / E, e = be % E;
    const int tx = threadIdx.x, ty = threadIdx.y, lane = tx & 31, warp = tx >> 5;
    const int c0 = tx * K;
    const long HW = (long)H * W;
    float* scan_sm = smem + ty * (S * CW * 2);
    // [3][NGRP][ROWCAP] per-group sums of the adjoint rows; during the recompute of a segment, which does
    // not use them, its first rows hold the cells of store_cells
    float* red = smem + NGRP * S * CW * 2;
    float* cells_r = red;
    // this row's dB1 (, dB2) terms [NS][ROWCAP] each and its (gated) dy [ROWCAP], added to global memory
    // by coalesced atomics; the dC terms dy*h are formed there from the recomputed states
    float* gsm = red + RED_ROWS * ROWCAP;
    float* dysm = gsm + (MODE == 0 ? 1 : 2) * NS * ROWCAP;
    // the adjoint's per-cell inputs of the row, once per block (see fill_adjoint_cells)
    float* cells_a = dysm + ROWCAP;
    float* hrows = cells_a + ADJ_CELLS * ROWCAP;  // [R+1][NS][W]
    const T* up = u + (long)be * HW;
    const T* d1p = dt1 + (long)be * HW;
    const T* d2p = dt2 ? dt2 + (long)be * HW : nullptr;
    const T* B1p = B1 + (long)b * NS * HW;
    const T* B2p = B2 ? B2 + (long)b * NS * HW : nullptr;
    const T* Cp = C + (long)b * NS * HW;
    unsigned long long* dB1p = dB1 + (long)b * NS * HW;
#if MODE == 1
    unsigned long long* dB2p = dB2 + (long)b * NS * HW;
#endif
    unsigned long long* dCp = dC + (long)b * NS * HW;
    const float bias = dt_bias ? dt_bias[e] : 0.f;
    const float Dv = D ? D[e] : 0.f;
    const int nseg = (H + R - 1) / R;
    float A1r[S], A2r[S], A1n[S], A2n[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
        A1n[s] = A1[e * NS + ty * S + s];
        A2n[s] = A2 ? A2[e * NS + ty * S + s] : 0.f;
        A1r[s] = A1n[s] * LOG2E;
        A2r[s] = A2n[s] * LOG2E;
    }
    float carry[S][K], dA1acc[S], dA2acc[S];
    float dDacc = 0.f, dbacc = 0.f;
#pragma unroll
    for (int s = 0; s < S; ++s) {
        dA1acc[s] = 0.f;
        dA2acc[s] = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) carry[s][k] = 0.f;
    }

    const int tid = ty * NTX + tx;
    const T* zp = z ? z + (long)be * HW : nullptr;
    const T* gp = dout + (long)be * HW;
    // this thread's first (state, column) pair of a row's dB / dC atomics, and its step between pairs
    const int pair_n = tid / W, pair_col = tid % W, pair_dn = NTX * NGRP / W, pair_dc = NTX * NGRP % W;
    for (int seg = nseg - 1; seg >= 0; --seg) {
        const int i0 = seg * R, i1 = min(H, i0 + R);
        // this segment's rows are read twice (recompute, adjoint), the next segment's after that
        if (seg == nseg - 1) prefetch_rows(i0, i1, W, HW, tid, up, d1p, d2p, zp, gp, B1p, B2p, Cp);
        if (seg > 0) prefetch_rows(max(0, i0 - R), i0, W, HW, tid, up, d1p, d2p, zp, gp, B1p, B2p, Cp);
        // recompute the states of rows i0..i1-1 into shared memory; row slot 0 holds row i0-1
        float hv[S][K];
        const float* cp = seg > 0 ? ckpt + ((long)be * (nseg - 1) + seg - 1) * NS * W : nullptr;
#pragma unroll
        for (int s = 0; s < S; ++s)
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const int col = c0 + k;
                hv[s][k] = (cp && col < W) ? cp[(ty * S + s) * W + col] : 0.f;
                if (col < W) hrows[(ty * S + s) * W + col] = hv[s][k];
            }
        RawCells raw;  // the next row's raw inputs, loaded a row step ahead of their use
        load_cells(i0, W, up, d1p, d2p, tid, raw);
        for (int i = i0; i < i1; ++i) {
            store_cells(W, bias, raw, cells_r, tid);
            if (i + 1 < i1) load_cells(i + 1, W, up, d1p, d2p, tid, raw);
            __syncthreads();
            float d1[K], du1[K], d2[K], du2[K];
            read_cells(W, c0, cells_r, d1, du1, d2, du2);
            __syncthreads();  // all warps have read the cells: the next row may replace them
            const T* b1r[S];
            const T* b2r[S];
#pragma unroll
            for (int s = 0; s < S; ++s) {
                b1r[s] = B1p + (long)(ty * S + s) * HW + (long)i * W;
                b2r[s] = B2p ? B2p + (long)(ty * S + s) * HW + (long)i * W : nullptr;
            }
            forward_row(i, H, W, c0, d1, du1, d2, du2, b1r, b2r, A1r, A2r, ty, hv, scan_sm, lane, warp, nullptr);
            float* hr = hrows + (long)(i - i0 + 1) * NS * W;
#pragma unroll
            for (int s = 0; s < S; ++s)
#pragma unroll
                for (int k = 0; k < K; ++k)
                    if (c0 + k < W) hr[(ty * S + s) * W + c0 + k] = hv[s][k];
        }
        // likewise for the adjoint rows, bottom to top; the thread keeps the raw inputs of the current row's
        // columns that it finishes (acur)
        RawAdjoint araw, acur;
        load_adjoint_cells(i1 - 1, W, up, d1p, d2p, gp, zp, tid, araw);
        store_adjoint_cells(W, bias, zp != nullptr, araw, cells_a, tid);
        if (KEEP_ADJ) acur = araw;
        if (i1 - 2 >= i0) load_adjoint_cells(i1 - 2, W, up, d1p, d2p, gp, zp, tid, araw);
        __syncthreads();

        for (int i = i1 - 1; i >= i0; --i) {
            const long row = (long)i * W;
            const float* hcur = hrows + (long)(i - i0 + 1) * NS * W;
            const float* hup = hcur - NS * W;
            float uu[K], d1[K], d2[K], dy[K];
#pragma unroll
            for (int k = 0; k < K; ++k) {
                const bool in = c0 + k < W;
                uu[k] = in ? cells_a[c0 + k] : 0.f;
                d1[k] = in ? cells_a[ROWCAP + c0 + k] : 0.f;
#if MODE == 1
                d2[k] = in ? cells_a[2 * ROWCAP + c0 + k] : 0.f;
#else
                d2[k] = 0.f;
#endif
            }
            // the step of the next column (for the right-to-left decay)
#if MODE == 0
            const float d1x = c0 + K < W ? cells_a[ROWCAP + c0 + K] : 0.f;
#else
            const float d2x = c0 + K < W ? cells_a[2 * ROWCAP + c0 + K] : 0.f;
#endif
#pragma unroll
            for (int k = 0; k < K; ++k) dy[k] = c0 + k < W ? cells_a[(ADJ_CELLS - 1) * ROWCAP + c0 + k] : 0.f;
#if MODE == 0
            // this row's decays; the adjoint's right-to-left decay at a column is the next column's
            float a[S][K];
#pragma unroll
            for (int s = 0; s < S; ++s)
#pragma unroll
                for (int k = 0; k < K; ++k) a[s][k] = c0 + k < W ? ex2_(d1[k] * A1r[s]) : 1.f;
#endif
            // adjoint scan along the row, right to left
            float dec[S][K], adj[S][K];
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int n = ty * S + s;
#pragma unroll
                for (int k = 0; k < K; ++k) {
                    const int col = c0 + k;
                    if (col < W) {
                        adj[s][k] = ld(Cp, n * HW + row + col) * dy[k] + carry[s][k];
                        if (col + 1 < W) {
#if MODE == 0
                            dec[s][k] = (k + 1 < K) ? a[s][k + 1] : ex2_(d1x * A1r[s]);
#else
                            const float dn = (k + 1 < K) ? d2[k + 1] : d2x;
                            dec[s][k] = w_left(i, col + 1) * ex2_(dn * A2r[s]);
#endif
                        } else {
                            dec[s][k] = 0.f;
                        }
                    } else {
                        adj[s][k] = 0.f;
                        dec[s][k] = 1.f;
                    }
                }
            }
#if MODE == 0
            // G (vertical adjoint) is needed besides F: keep a copy before the scan overwrites it
            float G[S][K];
#pragma unroll
            for (int s = 0; s < S; ++s)
#pragma unroll
                for (int k = 0; k < K; ++k) G[s][k] = adj[s][k];
#endif
            scan_rev(dec, adj, scan_sm, lane, warp);
#if MODE == 0
            // the decay of the column left of this thread's first (for the horizontal state entering it)
            float aprev[S];
            const float dprev = c0 > 0 && c0 - 1 < W ? cells_a[ROWCAP + c0 - 1] : 0.f;
#pragma unroll
            for (int s = 0; s < S; ++s) aprev[s] = ex2_(dprev * A1r[s]);
#endif
            float acc0[K], acc1[K], acc2[K];  // MODE 0: d dt, du, y;  MODE 1: d dt_t, d dt_l, du
#pragma unroll
            for (int k = 0; k < K; ++k) { acc0[k] = 0.f; acc1[k] = 0.f; acc2[k] = 0.f; }
#pragma unroll
            for (int s = 0; s < S; ++s) {
                const int n = ty * S + s;
#pragma unroll
                for (int k = 0; k < K; ++k) {
                    const int col = c0 + k;
                    if (col >= W) continue;
                    const long idx = n * HW + row + col;
                    const float h = hcur[n * W + col];
                    const float hu = hup[n * W + col];
#if MODE == 0
                    const float F = adj[s][k];
                    // the horizontal state g of the column to the left, from h = a * h_up + g of the stored rows
                    // (no second scan along the row)
                    const float gl = col > 0 ? fmaf(-(k > 0 ? a[s][k - 1] : aprev[s]), hup[n * W + col - 1],
                                                    hcur[n * W + col - 1])
                                             : 0.f;
                    const float Bv = ld(B1p, idx);
                    const float da = G[s][k] * hu + F * gl;
                    const float dav = da * a[s][k];
                    acc0[k] += dav * A1n[s] + F * Bv * uu[k];
                    acc1[k] += F * d1[k] * Bv;
                    acc2[k] += ld(Cp, idx) * h;
                    dA1acc[s] += dav * d1[k];
                    gsm[n * ROWCAP + col] = F * d1[k] * uu[k];
                    carry[s][k] = a[s][k] * G[s][k];
#else
                    const float Hb = adj[s][k];
                    const float hl = col > 0 ? hcur[n * W + col - 1] : 0.f;
                    const float wl = w_left(i, col), wu = w_up(i, col);
                    const float at = ex2_(d1[k] * A1r[s]);
                    const float al = ex2_(d2[k] * A2r[s]);
                    const float Bt = ld(B1p, idx), Bl = ld(B2p, idx);
                    const float dul = wl * Hb, dut = wu * Hb;
                    const float dal = dul * hl * al, dat = dut * hu * at;
                    acc0[k] += dat * A1n[s] + dut * Bt * uu[k];
                    acc1[k] += dal * A2n[s] + dul * Bl * uu[k];
                    acc2[k] += dul * d2[k] * Bl + dut * d1[k] * Bt;
                    dA1acc[s] += dat * d1[k];
                    dA2acc[s] += dal * d2[k];
                    gsm[n * ROWCAP + col] = dut * d1[k] * uu[k];
                    gsm[NS * ROWCAP + n * ROWCAP + col] = dul * d2[k] * uu[k];
                    carry[s][k] = wu * at * Hb;
#endif
                }
            }
            if (ty == 0) {
#pragma unroll
                for (int k = 0; k < K; ++k) dysm[c0 + k] = dy[k];
            }
#pragma unroll
            for (int k = 0; k < K; ++k) {
                red[(0 * NGRP + ty) * ROWCAP + c0 + k] = acc0[k];
                red[(1 * NGRP + ty) * ROWCAP + c0 + k] = acc1[k];
                red[(2 * NGRP + ty) * ROWCAP + c0 + k] = acc2[k];
            }
            __syncthreads();
            // dB, dC of this row: the (state, column) pairs spread over all the block's threads, consecutive
            // threads on consecutive columns (coalesced atomics)
            for (int n = pair_n, col = pair_col; n < NS;) {
                const long at = n * HW + row + col;
                fixed_add(dB1p + at, gsm[n * ROWCAP + col]);
#if MODE == 1
                fixed_add(dB2p + at, gsm[NS * ROWCAP + n * ROWCAP + col]);
#endif
                fixed_add(dCp + at, dysm[col] * hcur[n * W + col]);
                n += pair_dn;
                col += pair_dc;
                if (col >= W) {
                    col -= W;
                    ++n;
                }
            }
            // the whole block finishes the row, one column per thread: fixed-order sums over state groups
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                const int col = cell_col(tid, c);
                if (col >= W) break;
                float s0 = 0.f, s1 = 0.f, s2 = 0.f;
                for (int gi = 0; gi < NGRP; ++gi) {
                    s0 += red[(0 * NGRP + gi) * ROWCAP + col];
                    s1 += red[(1 * NGRP + gi) * ROWCAP + col];
                    s2 += red[(2 * NGRP + gi) * ROWCAP + col];
                }
                const long idx = (long)be * HW + row + col;
#if KEEP_ADJ
                const float uv = acur.u[c], gov = acur.g[c];
#else
                const float uv = ld(u, idx), gov = ld(dout, idx);
#endif
#if MODE == 0
                float dyv = gov, zv = 0.f;
                if (z) {
                    zv = KEEP_ADJ ? acur.z[c] : ld(z, idx);
                    dyv = gov * zv * sigmoidf_(zv);
                }
                st(du, idx, s1 + Dv * dyv);
                dDacc += dyv * uv;
                const float x = (KEEP_ADJ ? acur.d1[c] : ld(dt1, idx)) + bias;
                const float gdt = x > 20.f ? s0 : s0 * sigmoidf_(x);
                st(ddt1, idx, gdt);
                dbacc += gdt;
                if (z) {
                    const float y = s2 + Dv * uv;
                    const float sg = sigmoidf_(zv);
                    st(dz, idx, gov * y * sg * (1.f + zv * (1.f - sg)));
                }
#else
                st(du, idx, s2 + Dv * gov);
                dDacc += gov * uv;
                st(ddt1, idx, s0);
                st(ddt2, idx, s1);
#endif
            }
            // every warp read this row's cells before the barrier above
            if (i > i0) {
                store_adjoint_cells(W, bias, zp != nullptr, araw, cells_a, tid);
                if (KEEP_ADJ) acur = araw;
                if (i - 2 >= i0) load_adjoint_cells(i - 2, W, up, d1p, d2p, gp, zp, tid, araw);
            }
            __syncthreads();
        }
        __syncthreads();  // hrows is rewritten by the next segment
    }

    // block sums of dA (per state), dD and d dt_bias in a fixed order
    for (int s = 0; s < S; ++s) {
        red[ty * NTX + tx] = dA1acc[s];
        red[NGRP * NTX + ty * NTX + tx] = dA2acc[s];
        __syncthreads();
        if (tx == 0) {
            float s1 = 0.f, s2 = 0.f;
            for (int t = 0; t < NTX; ++t) {
                s1 += red[ty * NTX + t];
                s2 += red[NGRP * NTX + ty * NTX + t];
            }
            dA1[(long)be * NS + ty * S + s] = s1;
            if (dA2) dA2[(long)be * NS + ty * S + s] = s2;
        }
        __syncthreads();
    }
    block_sum_pair(red, ty * NTX + tx, NTX * NGRP, dDacc, dbacc, dD + be, dbias + be);
}

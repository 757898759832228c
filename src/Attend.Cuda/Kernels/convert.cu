// Strided element-type conversion of a rank-4 tensor [B, S, H, D] into another strided tensor, zero-padding the
// last dimension: dst[b, s', h, d] = d < src_dim ? convert(src[b, s'', h, d]) : 0 for d < dst_dim, where s'' and s'
// are s or, when a row map is given, map[(b·H + h)·S + s] (a gather from the source / a scatter into the
// destination: token permutations of block plans).
// Used to bring f32 or non-contiguous inputs into the packed layout the attention kernel reads, and back.
//   SRC_T, DST_T: 0 = f32, 1 = f16, 2 = bf16.

#ifndef SRC_T
#define SRC_T 0
#endif
#ifndef DST_T
#define DST_T 2
#endif
#include "elements.cuh"

struct ConvertParams
{
    const void* src;
    void* dst;
    i64 src_stride[4];
    i64 dst_stride[4];
    int shape[3];       // B, S, H
    int src_dim;        // D of the source
    int dst_dim;        // D of the destination (>= src_dim; the rest is zero)
    const int* src_rows; // null, or the source row of each (b, h, s)
    const int* dst_rows; // null, or the destination row of each (b, h, s)
};

__device__ __forceinline__ void store_elem(void* base, i64 i, float x)
{
#if DST_T == 0
    ((float*)base)[i] = x;
#elif DST_T == 1
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(x));
    ((u16*)base)[i] = h;
#else
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(h) : "f"(x));
    ((u16*)base)[i] = h;
#endif
}

extern "C" __global__ void convert4d(const ConvertParams p)
{
    const i64 total = (i64)p.shape[0] * p.shape[1] * p.shape[2] * p.dst_dim;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x)
    {
        i64 r = i;
        int d = (int)(r % p.dst_dim); r /= p.dst_dim;
        int h = (int)(r % p.shape[2]); r /= p.shape[2];
        int s = (int)(r % p.shape[1]);
        int b = (int)(r / p.shape[1]);
        const i64 map = ((i64)b * p.shape[2] + h) * p.shape[1] + s;
        const int from = p.src_rows ? p.src_rows[map] : s, to = p.dst_rows ? p.dst_rows[map] : s;
        float x = 0.f;
        if (d < p.src_dim)
        {
            x = load_elem(p.src, b * p.src_stride[0] + from * p.src_stride[1] + h * p.src_stride[2] + d * p.src_stride[3]);
        }
        store_elem(p.dst, b * p.dst_stride[0] + to * p.dst_stride[1] + h * p.dst_stride[2] + d * p.dst_stride[3], x);
    }
}

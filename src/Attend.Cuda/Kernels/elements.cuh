// Element types of the kernels' tensors, shared by the kernels that read f32, f16 or bf16 inputs (inlined by
// KernelCompiler.Source). SRC_T: 0 = f32, 1 = f16, 2 = bf16 (the includer's default applies when undefined).

#ifndef SRC_T
#define SRC_T 2
#endif

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// base[i] (of the SRC_T type) as a float.
__device__ __forceinline__ float load_elem(const void* base, i64 i)
{
#if SRC_T == 0
    return ((const float*)base)[i];
#elif SRC_T == 1
    float f;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(((const u16*)base)[i]));
    return f;
#else
    return __uint_as_float(((u32)((const u16*)base)[i]) << 16);
#endif
}

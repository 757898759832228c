using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;

namespace Attend.Cpu;

/// <summary>
/// The vector operations the CPU kernels are written in. Each kernel is one generic body over
/// <c>TOps : ISimd&lt;TV&gt;</c>; the JIT specializes it per width (as System.Numerics.Tensors does), so the
/// scalar, 128-, 256- and 512-bit paths share every line of kernel code.
/// </summary>
internal unsafe interface ISimd<TV> where TV : unmanaged
{
    static abstract int Count { get; }
    static abstract TV Zero { get; }
    static abstract TV Load(float* p);
    static abstract void Store(float* p, TV v);
    static abstract TV Broadcast(float x);
    /// <summary>a·b + c (fused where the hardware fuses).</summary>
    static abstract TV Fma(TV a, TV b, TV c);
    static abstract TV Add(TV a, TV b);
    static abstract TV Sub(TV a, TV b);
    static abstract TV Mul(TV a, TV b);
    static abstract TV Div(TV a, TV b);
    /// <summary>Maximum; NaN handling is the platform's (a NaN row stays NaN through exp2 either way).</summary>
    static abstract TV Max(TV a, TV b);
    static abstract TV Min(TV a, TV b);
    static abstract float ReduceMax(TV v);
    static abstract float ReduceSum(TV v);
    /// <summary>2^x: relative error ≤ 2 ulp; exactly 0 for x &lt; −126 (and −∞); NaN stays NaN; saturates at 2^127.</summary>
    static abstract TV Exp2(TV x);
}

// Degree-7 Taylor polynomial of 2^f on |f| ≤ 0.5: truncation error 5e-9, below float's half ulp.
file static class Exp2Coefficients
{
    public const float C1 = 0.6931471805599453f;
    public const float C2 = 0.2402265069591007f;
    public const float C3 = 0.05550410866482158f;
    public const float C4 = 0.009618129107628477f;
    public const float C5 = 0.0013333558146428443f;
    public const float C6 = 0.00015403530393381608f;
    public const float C7 = 1.525273380405984e-05f;
}

internal readonly unsafe struct ScalarOps : ISimd<float>
{
    public static int Count => 1;
    public static float Zero => 0f;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Load(float* p) => *p;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, float v) => *p = v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Broadcast(float x) => x;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Fma(float a, float b, float c) => MathF.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Add(float a, float b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Sub(float a, float b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Mul(float a, float b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Div(float a, float b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Max(float a, float b) => a > b ? a : b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Min(float a, float b) => a < b ? a : b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceMax(float v) => v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(float v) => v;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float Exp2(float x) => float.Exp2(x);
}

internal readonly unsafe struct V128Ops : ISimd<Vector128<float>>
{
    public static int Count => Vector128<float>.Count;
    public static Vector128<float> Zero => Vector128<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Load(float* p) => Vector128.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector128<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Broadcast(float x) => Vector128.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Fma(Vector128<float> a, Vector128<float> b, Vector128<float> c) => Vector128.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Add(Vector128<float> a, Vector128<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Sub(Vector128<float> a, Vector128<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Mul(Vector128<float> a, Vector128<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Div(Vector128<float> a, Vector128<float> b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Max(Vector128<float> a, Vector128<float> b) => Vector128.MaxNative(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector128<float> Min(Vector128<float> a, Vector128<float> b) => Vector128.MinNative(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ReduceMax(Vector128<float> v)
    {
        float m = v[0];
        for (int i = 1; i < Vector128<float>.Count; i++) m = MathF.Max(m, v[i]);
        return m;
    }
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(Vector128<float> v) => Vector128.Sum(v);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector128<float> Exp2(Vector128<float> x)
    {
        Vector128<float> xc = Vector128.MinNative(Vector128.MaxNative(x, Vector128.Create(-127f)), Vector128.Create(127f));
        Vector128<float> n = Vector128.Round(xc);
        Vector128<float> f = xc - n;
        Vector128<float> p = Vector128.FusedMultiplyAdd(Vector128.Create(Exp2Coefficients.C7), f, Vector128.Create(Exp2Coefficients.C6));
        p = Vector128.FusedMultiplyAdd(p, f, Vector128.Create(Exp2Coefficients.C5));
        p = Vector128.FusedMultiplyAdd(p, f, Vector128.Create(Exp2Coefficients.C4));
        p = Vector128.FusedMultiplyAdd(p, f, Vector128.Create(Exp2Coefficients.C3));
        p = Vector128.FusedMultiplyAdd(p, f, Vector128.Create(Exp2Coefficients.C2));
        p = Vector128.FusedMultiplyAdd(p, f, Vector128.Create(Exp2Coefficients.C1));
        p = Vector128.FusedMultiplyAdd(p, f, Vector128<float>.One);
        Vector128<float> r = (p.AsInt32() + Vector128.ShiftLeft(Vector128.ConvertToInt32(n), 23)).AsSingle();
        r = Vector128.ConditionalSelect(Vector128.LessThan(x, Vector128.Create(-126f)), Vector128<float>.Zero, r);
        return Vector128.ConditionalSelect(Vector128.Equals(x, x), r, x);
    }
}

internal readonly unsafe struct V256Ops : ISimd<Vector256<float>>
{
    public static int Count => Vector256<float>.Count;
    public static Vector256<float> Zero => Vector256<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Load(float* p) => Vector256.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector256<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Broadcast(float x) => Vector256.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Fma(Vector256<float> a, Vector256<float> b, Vector256<float> c) => Vector256.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Add(Vector256<float> a, Vector256<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Sub(Vector256<float> a, Vector256<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Mul(Vector256<float> a, Vector256<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Div(Vector256<float> a, Vector256<float> b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Max(Vector256<float> a, Vector256<float> b) => Vector256.MaxNative(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector256<float> Min(Vector256<float> a, Vector256<float> b) => Vector256.MinNative(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceMax(Vector256<float> v) => V128Ops.ReduceMax(Vector128.MaxNative(v.GetLower(), v.GetUpper()));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(Vector256<float> v) => Vector256.Sum(v);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector256<float> Exp2(Vector256<float> x)
    {
        Vector256<float> xc = Vector256.MinNative(Vector256.MaxNative(x, Vector256.Create(-127f)), Vector256.Create(127f));
        Vector256<float> n = Vector256.Round(xc);
        Vector256<float> f = xc - n;
        Vector256<float> p = Vector256.FusedMultiplyAdd(Vector256.Create(Exp2Coefficients.C7), f, Vector256.Create(Exp2Coefficients.C6));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(Exp2Coefficients.C5));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(Exp2Coefficients.C4));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(Exp2Coefficients.C3));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(Exp2Coefficients.C2));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256.Create(Exp2Coefficients.C1));
        p = Vector256.FusedMultiplyAdd(p, f, Vector256<float>.One);
        Vector256<float> r = (p.AsInt32() + Vector256.ShiftLeft(Vector256.ConvertToInt32(n), 23)).AsSingle();
        r = Vector256.ConditionalSelect(Vector256.LessThan(x, Vector256.Create(-126f)), Vector256<float>.Zero, r);
        return Vector256.ConditionalSelect(Vector256.Equals(x, x), r, x);
    }
}

internal readonly unsafe struct V512Ops : ISimd<Vector512<float>>
{
    public static int Count => Vector512<float>.Count;
    public static Vector512<float> Zero => Vector512<float>.Zero;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Load(float* p) => Vector512.Load(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static void Store(float* p, Vector512<float> v) => v.Store(p);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Broadcast(float x) => Vector512.Create(x);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Fma(Vector512<float> a, Vector512<float> b, Vector512<float> c) => Vector512.FusedMultiplyAdd(a, b, c);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Add(Vector512<float> a, Vector512<float> b) => a + b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Sub(Vector512<float> a, Vector512<float> b) => a - b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Mul(Vector512<float> a, Vector512<float> b) => a * b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Div(Vector512<float> a, Vector512<float> b) => a / b;
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Max(Vector512<float> a, Vector512<float> b) => Vector512.MaxNative(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static Vector512<float> Min(Vector512<float> a, Vector512<float> b) => Vector512.MinNative(a, b);
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceMax(Vector512<float> v) => V256Ops.ReduceMax(Vector256.MaxNative(v.GetLower(), v.GetUpper()));
    [MethodImpl(MethodImplOptions.AggressiveInlining)] public static float ReduceSum(Vector512<float> v) => Vector512.Sum(v);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Vector512<float> Exp2(Vector512<float> x)
    {
        Vector512<float> xc = Vector512.MinNative(Vector512.MaxNative(x, Vector512.Create(-127f)), Vector512.Create(127f));
        Vector512<float> n = Vector512.Round(xc);
        Vector512<float> f = xc - n;
        Vector512<float> p = Vector512.FusedMultiplyAdd(Vector512.Create(Exp2Coefficients.C7), f, Vector512.Create(Exp2Coefficients.C6));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(Exp2Coefficients.C5));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(Exp2Coefficients.C4));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(Exp2Coefficients.C3));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(Exp2Coefficients.C2));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512.Create(Exp2Coefficients.C1));
        p = Vector512.FusedMultiplyAdd(p, f, Vector512<float>.One);
        Vector512<float> r = (p.AsInt32() + Vector512.ShiftLeft(Vector512.ConvertToInt32(n), 23)).AsSingle();
        r = Vector512.ConditionalSelect(Vector512.LessThan(x, Vector512.Create(-126f)), Vector512<float>.Zero, r);
        return Vector512.ConditionalSelect(Vector512.Equals(x, x), r, x);
    }
}

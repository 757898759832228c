namespace Attend.Tensors;

/// <summary>Element types that Attend reads, writes and computes with.</summary>
public enum DType
{
    /// <summary>IEEE 754 binary32 (<see cref="float"/>).</summary>
    Float32,
    /// <summary>IEEE 754 binary16 (<see cref="Half"/>).</summary>
    Float16,
    /// <summary>bfloat16 (<see cref="Tensors.BFloat16"/>): the upper 16 bits of a binary32.</summary>
    BFloat16,
    /// <summary>IEEE 754 binary64 (<see cref="double"/>); used by files and the reference, not by kernels.</summary>
    Float64,
}

/// <summary>Facts about <see cref="DType"/> values and the CLR types that carry them.</summary>
public static class DTypes
{
    /// <summary>Size of one element in bytes.</summary>
    public static int SizeOf(DType dtype) => dtype switch
    {
        DType.Float32 => 4,
        DType.Float16 => 2,
        DType.BFloat16 => 2,
        DType.Float64 => 8,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, "unknown dtype"),
    };

    /// <summary>The dtype of the CLR element type <typeparamref name="T"/>.</summary>
    /// <exception cref="NotSupportedException">for element types Attend does not know.</exception>
    public static DType Of<T>() where T : unmanaged =>
        typeof(T) == typeof(float) ? DType.Float32
        : typeof(T) == typeof(Half) ? DType.Float16
        : typeof(T) == typeof(BFloat16) ? DType.BFloat16
        : typeof(T) == typeof(double) ? DType.Float64
        : throw new NotSupportedException($"element type {typeof(T).Name} is not one of float, Half, BFloat16, double");

    /// <summary>The short name used in messages and on the command line: f32, f16, bf16, f64.</summary>
    public static string Name(DType dtype) => dtype switch
    {
        DType.Float32 => "f32",
        DType.Float16 => "f16",
        DType.BFloat16 => "bf16",
        DType.Float64 => "f64",
        _ => dtype.ToString(),
    };

    /// <summary>Parses f32/f16/bf16/f64 (also fp32, float32, half, …).</summary>
    public static DType Parse(string name) => name.ToLowerInvariant() switch
    {
        "f32" or "fp32" or "float32" or "float" => DType.Float32,
        "f16" or "fp16" or "float16" or "half" => DType.Float16,
        "bf16" or "bfloat16" => DType.BFloat16,
        "f64" or "fp64" or "float64" or "double" => DType.Float64,
        _ => throw new ArgumentException($"dtype must be one of f32, f16, bf16, f64; got '{name}'", nameof(name)),
    };
}

using Attend.Cpu;
using Attend.Tensors;

namespace Attend;

/// <summary>Fused scaled-dot-product attention: the public entry point.</summary>
public static class Attention
{
    /// <summary>
    /// Computes <c>output = softmax(scale · q·kᵀ [+ mods, masks]) · v</c> per (batch, head) with f32 accumulation.
    /// Semantics are those of <see cref="AttentionOptions"/> and of the float64 <see cref="Reference.AttentionReference"/>.
    /// </summary>
    /// <param name="q">Queries [B, Sq, H, D].</param>
    /// <param name="k">Keys [B, Skv, Hkv, D]; H must be a multiple of Hkv (GQA/MQA read K/V without copies).</param>
    /// <param name="v">Values [B, Skv, Hkv, Dv].</param>
    /// <param name="output">Written: [B, Sq, H, Dv]; must not overlap the inputs.</param>
    /// <param name="options">What to compute; null for <see cref="AttentionOptions.Default"/>.</param>
    /// <param name="lse">Optional, written: [B, Sq, H] natural-log log-sum-exp of each row's scores (−∞ for empty rows).</param>
    /// <param name="tuning">How to compute it (SIMD path, threads, block size); null for defaults.</param>
    /// <exception cref="ArgumentException">for shapes, options or aliasing that do not fit, naming the argument, expected and actual shape.</exception>
    public static void Forward<T>(
        TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> output,
        AttentionOptions? options = null, TensorView<float> lse = default, KernelTuning? tuning = null)
        where T : unmanaged => Forward(q, k, v, output, options, lse, tuning, packed: null);

    /// <summary><see cref="Forward{T}(TensorView{T}, TensorView{T}, TensorView{T}, TensorView{T}, AttentionOptions?, TensorView{float}, KernelTuning?)"/> on K and V already packed for the executor (by <see cref="Sparse.SparseAttention"/>).</summary>
    internal static void Forward<T>(
        TensorView<T> q, TensorView<T> k, TensorView<T> v, TensorView<T> output,
        AttentionOptions? options, TensorView<float> lse, KernelTuning? tuning, PackedKv? packed)
        where T : unmanaged
    {
        options ??= AttentionOptions.Default;
        tuning ??= KernelTuning.Default;
        RequireElementType<T>();
        AttentionShape shape = AttentionShape.Of(q, k, v);
        shape.RequireOutput(output, nameof(output));
        if (!lse.IsDefault) shape.RequireLse(lse, nameof(lse));
        float scale = shape.Validate(options);
        Validate(tuning);
        RejectOverlap(output, nameof(output), q, k, v, options.Bias);
        if (!lse.IsDefault) RejectOverlap(lse, nameof(lse), q, k, v, options.Bias);
        if (!lse.IsDefault && lse.Overlaps(output))
        {
            throw new ArgumentException("lse must not overlap output", nameof(lse));
        }
        if (options.Plan?.Permutation is not null)
        {
            PermutedExecution.Forward(q, k, v, output, lse, shape, scale, options, tuning);
            return;
        }
        if (options.Plan?.Compensation is Masks.Compensation.Centroid)
        {
            // The merge needs the plan's LSE even when the caller does not ask for it.
            if (lse.IsDefault) lse = new TensorView<float>(new float[(long)shape.Batch * shape.QueryLength * shape.Heads], shape.Batch, shape.QueryLength, shape.Heads);
            FlashAttentionCpu.Forward(q, k, v, output, lse, shape, scale, options, tuning, packed);
            Sparse.CentroidCompensation.Apply(q, k, v, options.Plan, scale, output, lse, tuning);
            return;
        }
        FlashAttentionCpu.Forward(q, k, v, output, lse, shape, scale, options, tuning, packed);
    }

    internal static void RequireElementType<T>()
    {
        if (typeof(T) != typeof(float) && typeof(T) != typeof(Half) && typeof(T) != typeof(Tensors.BFloat16))
        {
            throw new ArgumentException($"element type must be float, Half or BFloat16; got {typeof(T).Name}", "q");
        }
    }

    internal static void Validate(KernelTuning tuning)
    {
        if (tuning.Threads < 0)
        {
            throw new ArgumentException($"Threads must be ≥ 0 (0 = all cores); got {tuning.Threads}", nameof(tuning));
        }
        if (tuning.BlockQ < 4 || tuning.BlockQ > 256 || tuning.BlockQ % 4 != 0)
        {
            throw new ArgumentException($"BlockQ must be a multiple of 4 in 4..256; got {tuning.BlockQ}", nameof(tuning));
        }
        if (!Enum.IsDefined(tuning.Path))
        {
            throw new ArgumentException($"unknown KernelPath {tuning.Path}", nameof(tuning));
        }
    }

    private static void RejectOverlap<TOut, T>(in TensorView<TOut> written, string name, in TensorView<T> q, in TensorView<T> k, in TensorView<T> v, in TensorView<float> bias)
        where TOut : unmanaged where T : unmanaged
    {
        if (written.Overlaps(q) || written.Overlaps(k) || written.Overlaps(v) || written.Overlaps(bias))
        {
            throw new ArgumentException($"{name} must not overlap the inputs q, k, v or the bias (aliased buffers would be overwritten while read)", name);
        }
    }
}

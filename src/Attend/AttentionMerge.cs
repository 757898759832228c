using Attend.Tensors;

namespace Attend;

/// <summary>
/// Combines attention results computed over disjoint key sets into the result over their union, exactly:
/// <c>lse = log Σᵢ exp(lseᵢ)</c>, <c>o = Σᵢ exp(lseᵢ − lse)·oᵢ</c> (split-K decoding, compensation, ring attention;
/// NATTEN's merge_attentions). Parts with LSE −∞ (no key) contribute nothing; if every part is −∞ the output is 0.
/// </summary>
public static class AttentionMerge
{
    /// <summary>Merges partial outputs [B, Sq, H, Dv] with their LSEs [B, Sq, H] into <paramref name="output"/> and <paramref name="lse"/>.</summary>
    /// <param name="outputs">Partial outputs, all the same shape.</param>
    /// <param name="lses">Their log-sum-exps, one per output.</param>
    /// <param name="output">Written: merged output (may be one of <paramref name="outputs"/>).</param>
    /// <param name="lse">Optional, written: merged LSE.</param>
    public static void Merge<T>(IReadOnlyList<TensorView<T>> outputs, IReadOnlyList<TensorView<float>> lses, TensorView<T> output, TensorView<float> lse = default)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(outputs);
        ArgumentNullException.ThrowIfNull(lses);
        if (outputs.Count == 0 || outputs.Count != lses.Count)
        {
            throw new ArgumentException($"need one LSE per partial output and at least one part; got {outputs.Count} outputs and {lses.Count} LSEs", nameof(lses));
        }
        TensorView<T> first = outputs[0];
        if (first.Rank != 4)
        {
            throw new ArgumentException($"outputs must have shape [B, Sq, H, Dv]; got {first.ShapeString()}", nameof(outputs));
        }
        int b = first.Dim(0), sq = first.Dim(1), h = first.Dim(2), dv = first.Dim(3);
        var shape = new AttentionShape(b, sq, 1, h, h, dv, dv);
        for (int i = 0; i < outputs.Count; i++)
        {
            shape.RequireOutput(outputs[i], $"{nameof(outputs)}[{i}]");
            shape.RequireLse(lses[i], $"{nameof(lses)}[{i}]");
        }
        shape.RequireOutput(output, nameof(output));
        if (!lse.IsDefault) shape.RequireLse(lse, nameof(lse));

        int parts = outputs.Count;
        Parallel.For(0, b * sq, row =>
        {
            int bi = row / sq, si = row % sq;
            Span<float> weights = parts <= 64 ? stackalloc float[parts] : new float[parts];
            Span<float> acc = dv <= 512 ? stackalloc float[dv] : new float[dv];
            for (int hi = 0; hi < h; hi++)
            {
                float max = float.NegativeInfinity;
                for (int i = 0; i < parts; i++) max = MathF.Max(max, lses[i][bi, si, hi]);
                float total = 0;
                for (int i = 0; i < parts; i++)
                {
                    float l = lses[i][bi, si, hi];
                    weights[i] = float.IsNegativeInfinity(l) ? 0f : MathF.Exp(l - max);
                    total += weights[i];
                }
                acc.Clear();
                for (int i = 0; i < parts; i++)
                {
                    if (weights[i] == 0f) continue;
                    float wgt = weights[i] / total;
                    for (int d = 0; d < dv; d++) acc[d] += wgt * ElementConvert.ToSingle(outputs[i][bi, si, hi, d]);
                }
                for (int d = 0; d < dv; d++) output[bi, si, hi, d] = ElementConvert.FromSingle<T>(acc[d]);
                if (!lse.IsDefault) lse[bi, si, hi] = total == 0f ? float.NegativeInfinity : max + MathF.Log(total);
            }
        });
    }
}

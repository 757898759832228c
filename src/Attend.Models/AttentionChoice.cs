using System.Globalization;
using Attend.Masks;
using Attend.Sparse;
using Attend.Tensors;

namespace Attend.Models;

/// <summary>
/// Which attention a model layer runs, from a spec: <c>dense</c>; <c>window:N</c> (causal, the last N keys including
/// the query's own); <c>sink:S+window:N</c> (also the first S keys); <c>mask:EXPR</c> (a mask expression, AND-ed with
/// causal); or any selector spec (<c>xattention:t=0.9</c>, <c>pooled:budget=p0.95</c>, <c>auto:err=0.02</c>, …).
/// </summary>
public sealed class AttentionChoice
{
    private readonly Mask? _mask;
    private readonly ISparsitySelector? _selector;

    private AttentionChoice(string spec, Mask? mask, ISparsitySelector? selector)
    {
        Spec = spec;
        _mask = mask;
        _selector = selector;
    }

    /// <summary>Dense causal attention.</summary>
    public static AttentionChoice Dense { get; } = new("dense", null, null);

    /// <summary>The spec it was parsed from.</summary>
    public string Spec { get; }

    /// <inheritdoc/>
    public override string ToString() => Spec;

    /// <summary>Parses a spec (see the class remarks).</summary>
    public static AttentionChoice Parse(string spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        string s = spec.Trim();
        if (s is "dense" or "") return Dense;
        if (s.StartsWith("mask:", StringComparison.Ordinal)) return new(s, Mask.Causal & MaskExpression.Parse(s[5..]), null);
        Mask? window = null;
        foreach (string part in s.Split('+', StringSplitOptions.TrimEntries))
        {
            string[] kv = part.Split(':', 2);
            if (kv.Length == 2 && kv[0] is "window" or "sink")
            {
                if (!int.TryParse(kv[1], NumberStyles.Integer, CultureInfo.InvariantCulture, out int n) || n < 1)
                {
                    throw new ArgumentException($"attention '{spec}': {kv[0]} needs a positive integer; got '{kv[1]}'", nameof(spec));
                }
                Mask m = kv[0] == "window" ? Mask.SlidingWindow(n - 1) : Mask.Sink(n);
                window = window is null ? m : window | m;
                continue;
            }
            if (window is not null) throw new ArgumentException($"attention '{spec}': '{part}' cannot follow a window or sink", nameof(spec));
            return new(s, null, Selectors.ParseAny(s));
        }
        return new(s, Mask.Causal & window!, null);
    }

    /// <summary>Runs causal attention for one layer; returns the fraction of the causal pairs computed.</summary>
    internal double Run(TensorView<float> q, TensorView<float> k, TensorView<float> v, TensorView<float> output, KernelTuning tuning)
    {
        if (_selector is not null)
        {
            (SparsityPlan plan, _) = SparseAttention.Forward(_selector, q, k, v, output, new AttentionOptions { Causal = true }, tuning: tuning);
            return Metrics.Density(plan, causal: true);
        }
        if (_mask is not null)
        {
            Attention.Forward(q, k, v, output, new AttentionOptions { Mask = _mask }, tuning: tuning);
            int s = q.Shape[1];
            return Metrics.Density(BlockMask.Create(_mask, 1, 1, s, k.Shape[1], 128, 128), causal: true);
        }
        Attention.Forward(q, k, v, output, new AttentionOptions { Causal = true }, tuning: tuning);
        return 1;
    }
}

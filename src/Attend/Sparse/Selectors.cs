using System.Globalization;

namespace Attend.Sparse;

/// <summary>The built-in selectors by name, for the CLI, the benchmark and configuration files.</summary>
public static class Selectors
{
    /// <summary>Every built-in selector at its documented defaults.</summary>
    public static IReadOnlyList<SparsitySelector> Defaults() =>
    [
        new PooledBlockSelector(),
        new VerticalSlashSelector(),
        new FlexPrefillSelector(),
        new XAttentionSelector(),
        new AnchorSelector(),
        new HierarchicalSelector(),
        new SaleSelector(),
        new DhsaSelector(),
    ];

    /// <summary>
    /// Like <see cref="Parse"/>, and also <c>auto:err=0.02[,sample=4096]</c> (calibration on a sample of the call's own
    /// queries, <see cref="AutoSelector"/>), <c>hash:buckets=8[,seed=0,block=128]</c> (hash-sparse,
    /// <see cref="HashSparseSelector"/>) and <c>cluster:q=32,k=64,p=0.9[,iters=4,seed=0,block=128]</c> (k-means
    /// semantic permutation, <see cref="ClusterSelector"/>), <c>topk:k=64[,dims=0,seed=0]</c> (per-row top-k,
    /// <see cref="RowTopKSelector"/>); any spec + <c>+centroid</c> compensates the skipped
    /// blocks (<see cref="CentroidCompensation"/>), <c>+ear[=0.05]</c> routes the worst-compensated blocks to exact
    /// computation first (<see cref="ErrorAwareSelector"/>).
    /// </summary>
    public static ISparsitySelector ParseAny(string spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        if (spec.TrimEnd().EndsWith("+centroid", StringComparison.OrdinalIgnoreCase))
        {
            return new CompensatedSelector(ParseAny(spec.TrimEnd()[..^"+centroid".Length]));
        }
        int ear = spec.LastIndexOf("+ear", StringComparison.OrdinalIgnoreCase);
        if (ear > 0)
        {
            string extra = spec[(ear + "+ear".Length)..].Trim();
            double fraction = extra.Length == 0 ? 0.05
                : extra.StartsWith('=') && double.TryParse(extra[1..], NumberStyles.Float, CultureInfo.InvariantCulture, out double f) ? f
                : throw new ArgumentException($"selector '{spec}': +ear takes an optional =FRACTION (e.g. +ear=0.05)", nameof(spec));
            return new ErrorAwareSelector(ParseAny(spec[..ear]), fraction);
        }
        (string name, Dictionary<string, string> args) = Split(spec);
        if (name is not ("auto" or "hash" or "cluster" or "topk")) return Parse(spec);
        RequireKnown(name, args, spec, name switch
        {
            "auto" => ["err", "sample"],
            "hash" => ["buckets", "seed", "block"],
            "topk" => ["k", "dims", "seed"],
            _ => ["q", "k", "p", "iters", "seed", "block"],
        });
        if (name == "auto") return new AutoSelector(Double(args, "err", 0.02, spec), sampleQueries: Int(args, "sample", 4096, spec));
        if (name == "topk") return new RowTopKSelector { TopK = Int(args, "k", 64, spec), EstimateDims = Int(args, "dims", 0, spec), Seed = Int(args, "seed", 0, spec) };
        if (name == "hash") return new HashSparseSelector { Buckets = Int(args, "buckets", 8, spec), Seed = Int(args, "seed", 0, spec), BlockSize = Int(args, "block", 128, spec) };
        return new ClusterSelector
        {
            QueryClusters = Int(args, "q", 32, spec), KeyClusters = Int(args, "k", 64, spec), TopP = Double(args, "p", 0.9, spec),
            Iterations = Int(args, "iters", 4, spec), Seed = Int(args, "seed", 0, spec), BlockSize = Int(args, "block", 128, spec),
        };
    }

    /// <summary>Names <see cref="Parse"/> accepts.</summary>
    public static IReadOnlyList<string> Names { get; } = ["pooled", "vertical-slash", "flexprefill", "xattention", "anchor", "hierarchical", "sale", "dhsa"];

    /// <summary>
    /// Parses <c>name[:key=value,...]</c>, e.g. <c>xattention:t=0.95,stride=16</c>, <c>pooled:budget=top8</c>,
    /// <c>pooled:budget=p0.9</c>, <c>vertical-slash:v=2000,s=500</c>, <c>flexprefill:gamma=0.9,tau=0.1</c>,
    /// <c>anchor:theta=6</c>, <c>hierarchical:k=16</c>, <c>sale:t=0.02,bits=4,rows=4</c>, <c>dhsa:L=64,budget=1024,window=8</c>. Every selector also takes <c>block=64|128|256</c>.
    /// </summary>
    public static SparsitySelector Parse(string spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        (string name, Dictionary<string, string> args) = Split(spec);
        int block = Int(args, "block", 128, spec);
        SparsitySelector selector = name switch
        {
            "pooled" => new PooledBlockSelector { BlockSize = block, Budget = Budget(args.GetValueOrDefault("budget", "p0.95"), spec) },
            "vertical-slash" => new VerticalSlashSelector
            {
                BlockSize = block, Verticals = Int(args, "v", 1000, spec), Slashes = Int(args, "s", 200, spec), LastQueries = Int(args, "last", 64, spec),
            },
            "flexprefill" => new FlexPrefillSelector
            {
                BlockSize = block, Gamma = Double(args, "gamma", 0.95, spec), Tau = Double(args, "tau", 0.1, spec), MinBudget = Int(args, "min", 1024, spec),
            },
            "xattention" => new XAttentionSelector { BlockSize = block, Threshold = Double(args, "t", 0.9, spec), Stride = Int(args, "stride", 8, spec) },
            "anchor" => new AnchorSelector { BlockSize = block, Theta = Double(args, "theta", 12.5, spec), AnchorRowStride = Int(args, "rows", 8, spec) },
            "hierarchical" => new HierarchicalSelector { BlockSize = block, TopK = Int(args, "k", 16, spec) },
            "sale" => new SaleSelector { BlockSize = block, Threshold = Double(args, "t", 0.02, spec), Bits = Int(args, "bits", 4, spec), RowStride = Int(args, "rows", 4, spec) },
            "dhsa" => new DhsaSelector { BlockSize = block, ChunkLength = Int(args, "L", 64, spec), TokenBudget = Int(args, "budget", 1024, spec), Window = Int(args, "window", 8, spec) },
            _ => throw new ArgumentException($"unknown selector '{name}'; expected one of {string.Join(", ", Names)}", nameof(spec)),
        };
        RequireKnown(name, args, spec, name switch
        {
            "pooled" => ["block", "budget"],
            "vertical-slash" => ["block", "v", "s", "last"],
            "flexprefill" => ["block", "gamma", "tau", "min"],
            "xattention" => ["block", "t", "stride"],
            "hierarchical" => ["block", "k"],
            "sale" => ["block", "t", "bits", "rows"],
            "dhsa" => ["block", "L", "budget", "window"],
            _ => ["block", "theta", "rows"],
        });
        return selector;
    }

    /// <summary>Splits <c>name[:key=value,...]</c> into the name and its arguments.</summary>
    private static (string Name, Dictionary<string, string> Args) Split(string spec)
    {
        string[] head = spec.Trim().Split(':', 2);
        var args = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        foreach (string part in head.Length == 2 ? head[1].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) : [])
        {
            string[] kv = part.Split('=', 2, StringSplitOptions.TrimEntries);
            if (kv.Length != 2 || kv[1].Length == 0) throw new ArgumentException($"selector '{spec}': expected key=value, got '{part}'", nameof(spec));
            args[kv[0]] = kv[1];
        }
        return (head[0].Trim(), args);
    }

    private static void RequireKnown(string name, Dictionary<string, string> args, string spec, string[] known)
    {
        foreach (string key in args.Keys)
        {
            if (!known.Contains(key, StringComparer.OrdinalIgnoreCase))
            {
                throw new ArgumentException($"selector '{spec}' has no parameter '{key}'; {name} takes {string.Join(", ", known)}", nameof(spec));
            }
        }
    }

    private static BlockBudget Budget(string text, string spec)
    {
        if (text.StartsWith("top", StringComparison.OrdinalIgnoreCase) && int.TryParse(text[3..], NumberStyles.Integer, CultureInfo.InvariantCulture, out int k)) return BlockBudget.TopK(k);
        if (text.StartsWith('p') && double.TryParse(text[1..], NumberStyles.Float, CultureInfo.InvariantCulture, out double p)) return BlockBudget.TopP(p);
        if (text.StartsWith('t') && double.TryParse(text[1..], NumberStyles.Float, CultureInfo.InvariantCulture, out double t)) return BlockBudget.Threshold(t);
        throw new ArgumentException($"selector '{spec}': budget must be topK (e.g. top8), pP (e.g. p0.95) or tT (e.g. t0.01); got '{text}'", nameof(spec));
    }

    private static int Int(Dictionary<string, string> args, string key, int fallback, string spec) =>
        !args.TryGetValue(key, out string? s) ? fallback
        : int.TryParse(s, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) ? v
        : throw new ArgumentException($"selector '{spec}': {key} must be an integer; got '{s}'", nameof(spec));

    private static double Double(Dictionary<string, string> args, string key, double fallback, string spec) =>
        !args.TryGetValue(key, out string? s) ? fallback
        : double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) ? v
        : throw new ArgumentException($"selector '{spec}': {key} must be a number; got '{s}'", nameof(spec));
}

using Attend.Masks;
using Attend.Tensors;
using Vectors = Attend.Linear.Vectors;

namespace Attend.Sparse;

/// <summary>
/// Semantic permutation: k-means clusters of the queries and of the keys per head (Sparse VideoGen2 arXiv:2505.18875;
/// Routing Transformer arXiv:2003.05997), tokens sorted by cluster so that each (query cluster, key cluster) pair is
/// a dense rectangle, and for every query cluster the key clusters taken in order of their estimated share of the
/// attention mass — SVG2's centroid estimate p(i, j) ∝ |K_j|·exp(scale·c_i·c_j) — until the cumulative share reaches
/// <see cref="TopP"/>. Runs as a <see cref="BucketPlan"/> over a token permutation. Designed for bidirectional
/// attention (video, diffusion); with causal attention a query whose chosen key clusters hold no earlier key gets
/// output 0. TopP = 1 computes every pair (dense).
/// </summary>
public sealed class ClusterSelector : ISparsitySelector
{
    private readonly int _queryClusters = 32, _keyClusters = 64, _iterations = 4, _blockSize = 128;
    private readonly double _topP = 0.9;

    /// <summary>Query clusters per head, 1..1024 (default 32).</summary>
    public int QueryClusters { get => _queryClusters; init => _queryClusters = value is >= 1 and <= 1024 ? value : throw new ArgumentOutOfRangeException(nameof(QueryClusters), value, "QueryClusters must be 1..1024"); }

    /// <summary>Key clusters per key/value head, 1..1024 (default 64).</summary>
    public int KeyClusters { get => _keyClusters; init => _keyClusters = value is >= 1 and <= 1024 ? value : throw new ArgumentOutOfRangeException(nameof(KeyClusters), value, "KeyClusters must be 1..1024"); }

    /// <summary>Lloyd iterations of k-means, 1..50 (default 4).</summary>
    public int Iterations { get => _iterations; init => _iterations = value is >= 1 and <= 50 ? value : throw new ArgumentOutOfRangeException(nameof(Iterations), value, "Iterations must be 1..50"); }

    /// <summary>Cumulative estimated mass each query cluster keeps, in (0, 1] (default 0.9).</summary>
    public double TopP { get => _topP; init => _topP = value is > 0 and <= 1 ? value : throw new ArgumentOutOfRangeException(nameof(TopP), value, "TopP must be in (0, 1]"); }

    /// <summary>Seed of the k-means initialisation.</summary>
    public int Seed { get; init; }

    /// <summary>Block size of the permuted plan: 64, 128 or 256.</summary>
    public int BlockSize { get => _blockSize; init => _blockSize = value is 64 or 128 or 256 ? value : throw new ArgumentOutOfRangeException(nameof(BlockSize), value, "BlockSize must be 64, 128 or 256"); }

    /// <inheritdoc/>
    public string Name => $"cluster(q={QueryClusters},k={KeyClusters},p={TopP:0.###})";

    /// <inheritdoc/>
    public override string ToString() => Name;

    /// <inheritdoc/>
    public SparsityPlan Plan<T>(TensorView<T> q, TensorView<T> k, bool causal = true, float? scale = null) where T : unmanaged
    {
        (int batch, int sq, int heads, int d, int skv, int kvHeads, float s) = SparsitySelector.CheckInputs(q, k, scale);
        int cq = Math.Min(QueryClusters, sq), ck = Math.Min(KeyClusters, skv);
        var queryBuckets = new int[batch * heads * sq];
        var keyBuckets = new int[batch * kvHeads * skv];
        var queryCentroids = new float[batch * heads][];
        var keyCentroids = new float[batch * kvHeads][];
        var keyCounts = new int[batch * kvHeads][];
        Parallel.For(0, batch * kvHeads, index =>
        {
            float[] rows = SparsitySelector.Gather(k, index / kvHeads, index % kvHeads, skv, d, 1f);
            (keyCentroids[index], keyCounts[index]) = KMeans(rows, skv, d, ck, Iterations, Seed + index, keyBuckets.AsSpan(index * skv, skv));
        });
        Parallel.For(0, batch * heads, index =>
        {
            float[] rows = SparsitySelector.Gather(q, index / heads, index % heads, sq, d, 1f);
            (queryCentroids[index], _) = KMeans(rows, sq, d, cq, Iterations, Seed + 7919 + index, queryBuckets.AsSpan(index * sq, sq));
        });

        // Per query cluster: key clusters by estimated mass, kept until the cumulative share reaches TopP.
        var allowed = new bool[(long)batch * heads * cq * ck];
        Parallel.For(0, batch * heads, index =>
        {
            int b = index / heads, h = index % heads, kvIndex = b * kvHeads + h / (heads / kvHeads);
            float[] kc = keyCentroids[kvIndex];
            int[] counts = keyCounts[kvIndex];
            var logits = new double[ck];
            var order = new int[ck];
            for (int i = 0; i < cq; i++)
            {
                ReadOnlySpan<float> ci = queryCentroids[index].AsSpan(i * d, d);
                double max = double.NegativeInfinity;
                for (int j = 0; j < ck; j++)
                {
                    logits[j] = counts[j] == 0 ? double.NegativeInfinity : Math.Log(counts[j]) + s * Vectors.Dot(ci, kc.AsSpan(j * d, d));
                    max = Math.Max(max, logits[j]);
                }
                double total = 0;
                for (int j = 0; j < ck; j++) total += logits[j] = Math.Exp(logits[j] - max);
                for (int j = 0; j < ck; j++) order[j] = j;
                Array.Sort(order, (x, y) => logits[y].CompareTo(logits[x]));
                double kept = 0;
                foreach (int j in order)
                {
                    if (kept >= TopP * total && TopP < 1) break;
                    allowed[((long)index * cq + i) * ck + j] = true;
                    kept += logits[j];
                }
            }
        });
        return BucketPlan.Build(batch, heads, kvHeads, sq, skv, queryBuckets, keyBuckets, causal, BlockSize, new ClusterPairs(cq, ck, allowed));
    }

    /// <summary>Lloyd's k-means (squared Euclidean): centroids initialised from distinct random rows; returns centroids and cluster sizes.</summary>
    private static (float[] Centroids, int[] Counts) KMeans(float[] rows, int n, int d, int clusters, int iterations, int seed, Span<int> assignment)
    {
        var rng = new Random(seed);
        var centroids = new float[clusters * d];
        int[] picks = [.. Enumerable.Range(0, n).OrderBy(_ => rng.Next()).Take(clusters)];
        for (int c = 0; c < clusters; c++) rows.AsSpan(picks[c] * d, d).CopyTo(centroids.AsSpan(c * d, d));
        var counts = new int[clusters];
        var bias = new float[clusters];                    // −‖c‖²/2
        var similarity = new float[64 * clusters];
        for (int iteration = 0; ; iteration++)
        {
            // argmin ‖x − c‖² = argmax (x·c − ‖c‖²/2). A row with NaN keeps cluster 0.
            for (int c = 0; c < clusters; c++) bias[c] = -0.5f * Vectors.Dot(centroids.AsSpan(c * d, d), centroids.AsSpan(c * d, d));
            ScoreGemm.AssignNearest(rows.AsSpan(0, n * d), d, new PackedPanels(centroids, clusters, d), bias, assignment, similarity);
            Array.Clear(counts);
            for (int i = 0; i < n; i++) counts[assignment[i]]++;
            if (iteration == iterations) break;
            var sums = new float[clusters * d];
            for (int i = 0; i < n; i++) Vectors.Axpy(1f, rows.AsSpan(i * d, d), sums.AsSpan(assignment[i] * d, d));
            for (int c = 0; c < clusters; c++)
            {
                if (counts[c] == 0) continue;   // an empty cluster keeps its centroid
                Vectors.Scale(sums.AsSpan(c * d, d), 1f / counts[c]);
                sums.AsSpan(c * d, d).CopyTo(centroids.AsSpan(c * d, d));
            }
        }
        return (centroids, counts);
    }
}

using BenchmarkDotNet.Running;

BenchmarkSwitcher.FromAssembly(typeof(Attend.Benchmarks.DenseAttentionBenchmarks).Assembly).Run(args);

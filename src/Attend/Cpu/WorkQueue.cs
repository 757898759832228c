namespace Attend.Cpu;

/// <summary>
/// Runs <c>count</c> work items on up to <c>threads</c> threads that pull the next index from a shared counter
/// (dynamic scheduling: causal work items differ in cost). Each thread creates its scratch state once.
/// </summary>
internal static class WorkQueue
{
    public static void Run<TState>(int count, int threads, Func<TState> init, Action<int, TState> body, Action<TState>? cleanup = null)
    {
        if (count <= 0)
        {
            return;
        }
        int workers = Math.Clamp(threads, 1, count);
        if (workers == 1)
        {
            TState only = init();
            try
            {
                for (int i = 0; i < count; i++) body(i, only);
            }
            finally
            {
                cleanup?.Invoke(only);
            }
            return;
        }
        int next = -1;
        try
        {
            RunWorkers();
        }
        catch (AggregateException e) when (e.InnerExceptions.Count >= 1)
        {
            // The caller sees the worker's exception (a corrupt file, a policy's error), not the parallel wrapper.
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Capture(e.InnerExceptions[0]).Throw();
        }

        void RunWorkers() => Parallel.For(0, workers, new ParallelOptions { MaxDegreeOfParallelism = workers }, _ =>
        {
            TState state = init();
            try
            {
                int i;
                while ((i = Interlocked.Increment(ref next)) < count)
                {
                    body(i, state);
                }
            }
            finally
            {
                cleanup?.Invoke(state);
            }
        });
    }
}

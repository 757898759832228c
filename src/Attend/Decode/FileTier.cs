using System.Runtime.InteropServices;

namespace Attend.Decode;

/// <summary>
/// Where a <see cref="KvCache"/> puts the pages that do not fit its resident budget: a file (created, or truncated)
/// at <paramref name="Path"/>; full pages beyond <paramref name="ResidentBytes"/> of resident memory move there, oldest
/// first, and are read back on demand through a cache of the <paramref name="CachedPages"/> most recently read pages —
/// a step's selected pages are its best guess of the next step's, so they stay loaded (Quest's choices barely move
/// from one token to the next). Page summaries (Quest's min/max, the landmark means) always stay in memory.
/// Size <paramref name="CachedPages"/> to hold a step's working set (the offloaded pages the policy reads over all kv
/// heads): a smaller cache evicts each page before the next step reads it again, and every step reloads its pages
/// (measured: ≈ 1065 loads and 100 ms per step with 512 cached pages against ≈ 1300 needed; ≈ 20 loads and 24 ms per step with 2048).
/// The cached pages' memory comes on top of <paramref name="ResidentBytes"/>.
/// Up to <paramref name="IoThreads"/> background threads load pages ahead of use (<see cref="KvCache.Prefetch"/>;
/// a decode step prefetches the pages it selected and its policy's next-best ones, see <see cref="DecodeOptions.Prefetch"/>):
/// reads that wait on a device overlap each other and the step's arithmetic.
/// </summary>
public sealed record KvOffload(string Path, long ResidentBytes, int CachedPages = 256, int IoThreads = 4);

/// <summary>
/// A file tier's counters: pages written to the file, pages read back from it (<paramref name="Loads"/>, of which
/// <paramref name="Prefetched"/> by the background threads), reads served by its page cache, and reads that found their
/// page still being loaded by a background thread and waited for it.
/// </summary>
public readonly record struct OffloadCounters(long Offloaded, long Loads, long CacheHits, long Prefetched, long Waited);

/// <summary>The file tier of a <see cref="KvCache"/> (see <see cref="KvOffload"/>).</summary>
internal sealed class FileTier
{
    private readonly KvCache _cache;
    private readonly FileStream _file;
    private readonly int _cachedPages, _ioThreads;
    private readonly LinkedList<KvCache.Page> _full = [];       // resident full pages, oldest first: eviction order
    private readonly Dictionary<KvCache.Page, (KvCache.PageData Data, LinkedListNode<KvCache.Page> Node)> _loaded = [];
    private readonly LinkedList<KvCache.Page> _recent = [];     // loaded pages, most recent last (each one's node in _loaded)
    private readonly long _budget;
    private readonly Lock _gate = new();
    private readonly Stack<KvCache.PageData> _spare = [];          // arrays free for loads (moved to the file, or retired)
    private readonly List<KvCache.PageData> _retired = [];         // arrays of pages the page cache dropped: a step may still read them
    private int _readers;                                          // decode steps reading the cache now
    private long _next;

    // Prefetching: pages queued for the background threads, and every page queued or being read (so a step that needs
    // one either takes it over, if no thread has started it, or waits for the read in progress — never reads it twice).
    private readonly Queue<KvCache.Page> _queue = [];
    private readonly Dictionary<KvCache.Page, Pending> _pending = [];
    private readonly SemaphoreSlim _queued = new(0);
    private int _threads;

    private sealed class Pending
    {
        public bool Started;
        public readonly TaskCompletionSource<KvCache.PageData> Done = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    public FileTier(KvCache cache, KvOffload options)
    {
        ArgumentException.ThrowIfNullOrEmpty(options.Path, nameof(options));
        if (options.CachedPages < 1) throw new ArgumentOutOfRangeException(nameof(options), options.CachedPages, "CachedPages must be ≥ 1");
        if (options.IoThreads < 0) throw new ArgumentOutOfRangeException(nameof(options), options.IoThreads, "IoThreads must be ≥ 0 (0: no prefetching)");
        _cache = cache;
        _budget = options.ResidentBytes;
        _cachedPages = options.CachedPages;
        _ioThreads = options.IoThreads;
        _file = new FileStream(options.Path, FileMode.Create, FileAccess.ReadWrite, FileShare.Read, 1 << 16, FileOptions.RandomAccess | FileOptions.DeleteOnClose);
    }

    private long _offloaded, _loads, _hits, _prefetched, _waited;

    public OffloadCounters Counters
    {
        get
        {
            lock (_gate) return new(_offloaded, _loads, _hits, _prefetched, _waited);
        }
    }

    /// <summary>A decode step starts reading pages (see <see cref="EndRead"/>).</summary>
    public void BeginRead()
    {
        lock (_gate) _readers++;
    }

    /// <summary>A decode step is done: when no other step is reading, the arrays of pages dropped meanwhile become free.</summary>
    public void EndRead()
    {
        lock (_gate)
        {
            if (--_readers > 0) return;
            foreach (KvCache.PageData data in _retired)
                if (_spare.Count < _cachedPages) _spare.Push(data);
            _retired.Clear();
        }
    }

    /// <summary>Drops a page's cached copy (it came back into memory, or is about to be written again).</summary>
    public void Forget(KvCache.Page page)
    {
        lock (_gate)
        {
            if (!_loaded.Remove(page, out var entry)) return;
            _recent.Remove(entry.Node);
            _retired.Add(entry.Data);
        }
    }

    /// <summary>A page just filled up: it may move to the file later.</summary>
    public void Full(KvCache.Page page)
    {
        lock (_gate) _full.AddLast(page);
    }

    /// <summary>Moves the oldest full pages to the file until the resident bytes fit the budget.</summary>
    public void Balance()
    {
        lock (_gate)
        {
            while (_cache.ResidentBytes > _budget && _full.Count > 0)
            {
                KvCache.Page page = _full.First!.Value;
                _full.RemoveFirst();
                if (!page.IsResident || page.Count < _cache.PageSize) continue;   // gone already, or truncated since
                Forget(page);                      // a copy cached from an earlier time in the file is stale now
                KvCache.PageData released = page.Release();
                Span<byte> keys = KeyBytes(released), values = ValueBytes(released);
                RandomAccess.Write(_file.SafeFileHandle, keys, _next);
                RandomAccess.Write(_file.SafeFileHandle, values, _next + keys.Length);
                page.FileOffset = _next;
                page.Checksum = Checksum(keys, values);
                if (_spare.Count < _cachedPages) _spare.Push(released);
                _next += keys.Length + values.Length;
                _cache.ResidentBytes -= _cache.DataBytes;
                _offloaded++;
            }
        }
    }

    /// <summary>
    /// Queues offloaded pages for the background threads (in the order given; pages in memory, cached or already queued
    /// are skipped) and returns at once. With <see cref="KvOffload.IoThreads"/> 0 it does nothing.
    /// </summary>
    public void Prefetch(IEnumerable<KvCache.Page> pages)
    {
        if (_ioThreads == 0) return;
        int added = 0, start = 0;
        lock (_gate)
        {
            foreach (KvCache.Page page in pages)
            {
                if (page.IsResident || _loaded.ContainsKey(page) || _pending.ContainsKey(page)) continue;
                _pending[page] = new Pending();
                _queue.Enqueue(page);
                added++;
            }
            if (added == 0) return;
            start = Math.Min(_ioThreads - _threads, _queue.Count);
            _threads += start;
        }
        _queued.Release(added);
        // Threads live while there is work (and a second after), so a dropped cache does not keep them.
        for (int i = 0; i < start; i++) new Thread(Drain) { IsBackground = true, Name = "attend kv prefetch" }.Start();
    }

    private void Drain()
    {
        while (true)
        {
            if (!_queued.Wait(1000))
            {
                lock (_gate)
                {
                    if (_queue.Count > 0) continue;
                    _threads--;
                    return;
                }
            }
            KvCache.Page page;
            Pending? pending;
            lock (_gate)
            {
                page = _queue.Dequeue();
                if (!_pending.TryGetValue(page, out pending) || pending.Started) continue;   // a step took it over
                pending.Started = true;
            }
            try
            {
                // A page brought back into memory since it was queued (a truncation) has nothing to load.
                pending.Done.SetResult(page.IsResident ? Resident(page) : Read(page, pending, prefetched: true));
            }
            catch (Exception e)
            {
                // The step that needs the page sees this (a corrupt file is named there); nobody may need it.
                lock (_gate) _pending.Remove(page);
                pending.Done.SetException(e);
            }
        }
    }

    /// <summary>
    /// The data of an offloaded page: from the cache of recently read pages, from a background read in progress, else
    /// read from the file now. Reads and checksums run outside the lock, so workers load different pages at once.
    /// </summary>
    public KvCache.PageData Load(KvCache.Page page)
    {
        Pending? pending;
        bool inProgress = false;
        lock (_gate)
        {
            if (TryCached(page, out KvCache.PageData? hit)) return hit;
            if (_pending.TryGetValue(page, out pending))
            {
                // Being read by a background thread: wait for it. Queued, not started: read it here instead of
                // waiting behind the queue.
                inProgress = pending.Started;
                if (inProgress) _waited++;
                pending.Started = true;
            }
        }
        if (inProgress) return pending!.Done.Task.GetAwaiter().GetResult();
        try
        {
            KvCache.PageData data = Read(page, pending, prefetched: false);
            pending?.Done.SetResult(data);
            return data;
        }
        catch (Exception e) when (pending is not null)
        {
            lock (_gate) _pending.Remove(page);
            pending.Done.SetException(e);
            throw;
        }
    }

    private KvCache.PageData Resident(KvCache.Page page)
    {
        lock (_gate) _pending.Remove(page);
        return page.Data;
    }

    /// <summary>Reads a page from the file into spare (or new) arrays, verifies it and puts it in the page cache.</summary>
    private KvCache.PageData Read(KvCache.Page page, Pending? pending, bool prefetched)
    {
        KvCache.PageData data;
        lock (_gate) data = _spare.Count > 0 ? _spare.Pop() : new KvCache.PageData(_cache);
        try
        {
            // Straight into the page's arrays (no staging buffer): keys, then values.
            Span<byte> keys = KeyBytes(data), values = ValueBytes(data);
            int read = RandomAccess.Read(_file.SafeFileHandle, keys, page.FileOffset);
            if (read == keys.Length) read += RandomAccess.Read(_file.SafeFileHandle, values, page.FileOffset + keys.Length);
            if (read != keys.Length + values.Length)
                throw new InvalidDataException($"the offload file {_file.Name} is truncated: page at {page.FileOffset} has {read} of {keys.Length + values.Length} bytes");
            if (Checksum(keys, values) != page.Checksum) throw new InvalidDataException($"the offload file {_file.Name} is corrupt: page at {page.FileOffset} fails its checksum");
        }
        catch
        {
            lock (_gate) _spare.Push(data);
            throw;
        }
        lock (_gate)
        {
            if (pending is not null) _pending.Remove(page);
            // Another worker may have loaded it meanwhile (without a pending entry): one copy stays cached.
            if (_loaded.TryGetValue(page, out var other))
            {
                _spare.Push(data);
                return other.Data;
            }
            if (_recent.Count >= _cachedPages)
            {
                // The least recently read page leaves the cache. A worker of a step in progress may still be reading its
                // arrays: they are reused once no step reads the cache (allocating 256 KB arrays for every load instead
                // cost page faults: a drifting query's step took 166 ms, session 10).
                KvCache.Page oldest = _recent.First!.Value;
                _retired.Add(_loaded[oldest].Data);
                _loaded.Remove(oldest);
                _recent.RemoveFirst();
            }
            _loads++;
            if (prefetched) _prefetched++;
            _loaded[page] = (data, _recent.AddLast(page));
            return data;
        }
    }

    private bool TryCached(KvCache.Page page, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out KvCache.PageData? data)
    {
        if (!_loaded.TryGetValue(page, out var entry))
        {
            data = null;
            return false;
        }
        _hits++;
        _recent.Remove(entry.Node);           // O(1): the node, not a search
        _recent.AddLast(entry.Node);
        data = entry.Data;
        return true;
    }

    private static Span<byte> KeyBytes(KvCache.PageData data) => data.KF is not null ? MemoryMarshal.AsBytes(data.KF.AsSpan()) : MemoryMarshal.AsBytes(data.KH.AsSpan());

    private static Span<byte> ValueBytes(KvCache.PageData data) => data.VF is not null ? MemoryMarshal.AsBytes(data.VF.AsSpan()) : MemoryMarshal.AsBytes(data.VH.AsSpan());

    /// <summary>
    /// FNV-1a over the keys' and then the values' bytes, 8 at a time in four interleaved lanes (one lane's multiply
    /// waits for the previous one: four lanes keep four in flight), the tail byte by byte; the lanes folded at the end.
    /// </summary>
    private static ulong Checksum(ReadOnlySpan<byte> keys, ReadOnlySpan<byte> values)
    {
        Span<ulong> lanes = [14695981039346656037UL, 14695981039346656037UL ^ 1, 14695981039346656037UL ^ 2, 14695981039346656037UL ^ 3];
        Fold(keys, lanes);
        Fold(values, lanes);
        return (((((lanes[0] * Prime) ^ lanes[1]) * Prime) ^ lanes[2]) * Prime) ^ lanes[3];
    }

    private const ulong Prime = 1099511628211UL;

    private static void Fold(ReadOnlySpan<byte> bytes, Span<ulong> lanes)
    {
        ReadOnlySpan<ulong> words = MemoryMarshal.Cast<byte, ulong>(bytes);
        ulong h0 = lanes[0], h1 = lanes[1], h2 = lanes[2], h3 = lanes[3];
        int i = 0;
        for (; i + 4 <= words.Length; i += 4)
        {
            h0 = (h0 ^ words[i]) * Prime;
            h1 = (h1 ^ words[i + 1]) * Prime;
            h2 = (h2 ^ words[i + 2]) * Prime;
            h3 = (h3 ^ words[i + 3]) * Prime;
        }
        for (; i < words.Length; i++) h0 = (h0 ^ words[i]) * Prime;
        for (int b = words.Length * 8; b < bytes.Length; b++) h1 = (h1 ^ bytes[b]) * Prime;
        lanes[0] = h0;
        lanes[1] = h1;
        lanes[2] = h2;
        lanes[3] = h3;
    }
}

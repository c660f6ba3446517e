"""What every bench stands on; no bench of its own lives here.

``edge`` (the edge child process, one-shot requests, pings), ``link`` (the emulated
network link), ``devices`` (well-behaved devices whose every answer is checked),
``workload`` (the questions), ``timing`` (per-step timing), ``rss`` (a process's
resident memory), ``sections`` (writing a section of BENCHMARKS.md).
"""

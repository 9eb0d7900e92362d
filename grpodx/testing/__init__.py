"""Stand-ins used by the tests and the benchmarks: nothing here runs in a training run."""

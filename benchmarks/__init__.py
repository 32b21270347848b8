"""warmstart benchmarks: each compares warmstart with a plain baseline measured in the same run."""

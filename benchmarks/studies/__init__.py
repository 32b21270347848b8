"""One-off studies that decided a default; each conclusion is in BENCHMARKS.md (its section names the command)."""

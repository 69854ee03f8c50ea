"""Load-test harness for tokenfan and its peers (see docs/benchmarks.md)."""

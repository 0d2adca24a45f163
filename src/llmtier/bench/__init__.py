"""The studies: I/O sweeps, workload benchmarks, peers side by side."""

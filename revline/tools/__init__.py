"""Tools, not part of the runtime: the benchmark, the workload generator,
the local broker and the isolated pipeline runs they drive."""

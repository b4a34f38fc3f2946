//! Training over sequence parallelism (in progress).

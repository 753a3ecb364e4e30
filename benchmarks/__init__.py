"""Speed and memory benchmarks against the plain references of the tests: python -m benchmarks.benchmark."""

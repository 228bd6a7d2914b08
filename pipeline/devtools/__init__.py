"""Tools for development, tests, demos and the benchmark, kept out of the core: a local S3 server."""

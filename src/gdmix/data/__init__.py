"""Datasets for demos, tests and benchmarks: MovieLens-100K (fetched, never committed) and
a synthetic GLMix problem with known true coefficients."""

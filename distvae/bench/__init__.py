"""`distvae bench`: measurements, each in its own module, all side by side in one run.

- data: images per CPU second, the reference loader against our stream (and the peers with --peers);
- step: training images/s, a bare PyTorch loop against distvae's loop and its end to end run;
- pack, plan, order, boundary: the packer, the global plan at scale, the order's diversity, the epoch boundary;
- report: BENCHMARKS.md from the JSON figures of the others.
"""

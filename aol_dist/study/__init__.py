"""``aol study``: methods x seeds x benchmarks through the training entry point, then mean, spread and
paired differences.

benchmarks.py  the built-in benchmarks (one declarative table) and the function that builds any of them
synthetic.py   the label sets of the synthetic benchmarks one-clean and instance
grid.py        the methods table, the presets and the plan: one run per (benchmark, method, seed)
runner.py      runs the plan as ``python -m aol_dist.train`` subprocesses, resumable, into results.csv
summary.py     mean and standard deviation over seeds, paired differences to the best baseline; table, JSON
plots.py       study.png: bars with spread
command.py     the command line
"""

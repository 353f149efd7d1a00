"""Benchmarking, in one place: prefill and decode throughput of onnxruntime, our PyTorch model and transformers.

- measure.py: the plan and the timed loop (`run_bench`), one `BenchRow` per runtime, batch and context;
- runners.py: one adapter per runtime (the Engine protocol's runtimes, transformers);
- memory.py: the bytes a step must read and the measured memory bandwidth (the floor of a decode step);
- report.py: the rows as a text table, JSON and a plot.

`dsv3c bench` (cli/cmd_bench.py) is the command over it; the scripts in bench/ call it or these modules and
record their runs in bench/results/.
"""

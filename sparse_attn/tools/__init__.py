"""What the command line runs (bench, calibrate, demo, needle) and the synthetic workloads they use; the library
itself never imports this package."""

"""hourai's benchmark suite: `python -m bench [PART ...] [--quick] [--out DIR]`."""

"""hourai: a single-host serverless runtime built on pre-forked snapshot workers."""

__version__ = "0.1.0"

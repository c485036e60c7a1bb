"""mtrl: multi-task SAC on Meta-World with pluggable gradient combiners."""

__version__ = "0.1.0"

__all__ = ["__version__", "load_policy"]


def __getattr__(name: str):
    # Imported lazily so that `import mtrl` stays cheap (no torch/Meta-World import until needed).
    if name == "load_policy":
        from mtrl.policy import load_policy

        return load_policy
    raise AttributeError(f"module 'mtrl' has no attribute {name!r}")

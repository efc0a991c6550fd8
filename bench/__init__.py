"""hyrank bench: one module per benchmark, each printing ratios measured side by side in one run."""

if __name__ != "hyrank.bench":  # a checkout's root on sys.path must not make a second, top-level copy
    raise ImportError(f"import hyrank.bench, not {__name__}: hyrank installs its packages under one namespace")

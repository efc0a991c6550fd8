"""hyrank jobs: torchx components and shipped run configs."""

if __name__ != "hyrank.jobs":  # a checkout's root on sys.path must not make a second, top-level copy
    raise ImportError(f"import hyrank.jobs, not {__name__}: hyrank installs its packages under one namespace")

"""hyrank pipeline: config, data, training loop, distributed wrappers, checkpoints, export, serving."""

if __name__ != "hyrank.pipeline":  # a checkout's root on sys.path must not make a second, top-level copy
    raise ImportError(f"import hyrank.pipeline, not {__name__}: hyrank installs its packages under one namespace")

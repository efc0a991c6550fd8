"""hyrank jobs."""

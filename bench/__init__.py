"""hyrank bench."""

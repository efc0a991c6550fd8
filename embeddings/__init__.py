"""hyrank embeddings."""

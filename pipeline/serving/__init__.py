"""Serving: export a checkpoint to a verified artifact, load it, score requests (HTTP server, batch scoring)."""

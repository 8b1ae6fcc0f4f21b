"""vfm-modeld: physical foundation models, loading and streaming generation."""

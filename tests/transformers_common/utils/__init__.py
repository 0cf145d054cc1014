"""Stand-in for a transformers test module that its 5.24.0 sdist does not ship."""

"""Nothing here is collected on its own: these modules are imported by test_transformers_conformance.py."""

collect_ignore_glob = ["*.py"]

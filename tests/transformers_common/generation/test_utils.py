"""Stand-in for transformers' ``tests/generation/test_utils.py``, which the 5.24.0 sdist does not ship.

``ModelTesterMixin.test_generation_tester_mixin_inheritance`` only checks whether a tester
inherits ``GenerationTesterMixin``; a model that cannot ``generate`` (this one) must not.
"""


class GenerationTesterMixin:
    """Empty: the generation tests are not part of the sdist, and image models do not generate."""

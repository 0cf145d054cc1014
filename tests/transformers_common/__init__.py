"""transformers' own common model tests, vendored unchanged from the transformers 5.24.0 sdist.

``test_modeling_common.py`` (``ModelTesterMixin``) and ``test_configuration_common.py``
(``ConfigTester``) are byte-for-byte copies of ``tests/`` in ``transformers-5.24.0.tar.gz``
(Apache-2.0, see ``LICENSE`` and each file's header). The sdist lacks three modules they
import; ``exporters/``, ``generation/`` and ``utils/`` hold small stand-ins for them.
``tests/test_transformers_conformance.py`` runs the mixin on ``TimmMultiTaskModel``.
See ``README.md`` here for how to refresh the copy.
"""

TRANSFORMERS_VERSION = "5.24.0"
"""The transformers release these files were copied from."""

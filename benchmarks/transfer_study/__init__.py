"""The transfer study (an experiment, not a recipe): ``python benchmarks/transfer_study/run.py
benchmarks/transfer_study/config.yaml``. Its results live beside it (``README.md``, ``results.*``, ``full/``,
``replication/``). A package so that its spawned workers (``--workers``) and ``benchmarks/bn_policies.py``
import it by one name, ``transfer_study``, from the ``benchmarks/`` folder.
"""

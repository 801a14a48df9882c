"""Comparison of model results with reference results (``dicomnode models evaluate``).

A stage-level package, independent of the other stages: ``metrics`` (Dice,
surface distances, volumes, classification metrics), ``references`` (SEG /
NIfTI / CSV references on the series grid), ``report`` (JSON, table) and
``plots`` (PNG). Running the model is done above the stages, in
:mod:`dicomnode.cli.models_evaluate`.
"""

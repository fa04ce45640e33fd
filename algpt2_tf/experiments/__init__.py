"""Experiments: compare model variants ("arms") at an equal training budget.

`algpt2 experiment run SPEC --out DIR` (`runner.run_experiment`) and
`algpt2 experiment report DIR` (`report.write_report`); the spec format is in `spec.py`.
"""

from algpt2_tf.experiments.spec import ExperimentSpec, SpecError, load_spec, parse_spec

__all__ = ["ExperimentSpec", "SpecError", "load_spec", "parse_spec"]

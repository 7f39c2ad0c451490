"""Evaluation: the speculative-vs-autoregressive harness and result files with provenance."""

from opd.eval.harness import evaluate, load_eval_records, write_eval

__all__ = ["evaluate", "load_eval_records", "write_eval"]

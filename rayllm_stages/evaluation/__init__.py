"""Evaluation: config (`config`), per-example metrics (`metrics`), intervals, baselines and gates
(`stats`), reports (`report`) and the run itself (`run`).
"""

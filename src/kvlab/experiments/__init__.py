"""Experiments: modules that produce results and plots."""

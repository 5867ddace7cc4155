"""Measuring methods: ``tokensieve bench quality`` (accuracy on synthetic video QA) and ``speed``."""

"""Measuring methods: ``visiontrim bench quality`` (accuracy on synthetic video QA) and ``speed``."""

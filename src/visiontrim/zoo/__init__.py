"""The embedded video model and its synthetic video question answering.

* :mod:`visiontrim.zoo.synthvid` — seeded 16-frame clips and one-word-answer questions in five
  families (needle, count, order, position, attribute), with a held-out seed range.
* :mod:`visiontrim.zoo.model` — the tiny LLaVA-OneVision architecture, its word-level tokenizer
  and processor, and :func:`~visiontrim.zoo.model.load_embedded` for the shipped weights.
* :mod:`visiontrim.zoo.train` — ``python -m visiontrim.zoo.train`` trains it from scratch.
* :mod:`visiontrim.zoo.evaluate` — answering and scoring with ``generate``.
* :mod:`visiontrim.zoo.demo` — ``visiontrim demo``.
"""

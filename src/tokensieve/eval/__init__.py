"""Evaluation the way the field does it: an lmms-eval model plugin and an offline task.

- :mod:`tokensieve.eval.lmms_manifest`: the ``lmms_eval.models`` entry point (import-light).
- :mod:`tokensieve.eval.lmms_model`: :class:`~tokensieve.eval.lmms_model.TokensieveLMM`, the
  model class ``lmms-eval --model tokensieve`` loads (needs ``pip install "tokensieve[eval]"``).
- :mod:`tokensieve.eval.synth_task`: writes the download-free task ``tokensieve_synthvid``
  (``tokensieve eval make-task DIR``) from the synthetic video questions of the embedded models.
"""
